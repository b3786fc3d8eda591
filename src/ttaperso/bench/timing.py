"""Interleaved timing: ratios against a baseline measured in the same round.

Other processes share the CPU, so absolute times drift by 2x within minutes. Every round
times one block of the baseline and one block of each candidate back to back (the order
alternates between rounds), and a candidate's figure is the median over rounds of
``baseline time / candidate time`` for the same frames: its speed as a fraction of the
baseline's, robust to what the machine does between rounds.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["RatioStats", "interleaved_ratios", "median"]

Block = Callable[[], object]


def median(values: list[float]) -> float:
    """Median, NaN for an empty list."""
    return statistics.median(values) if values else math.nan


@dataclass
class RatioStats:
    """Per-round measurements of one candidate against the baseline.

    ``ratios`` are baseline time / candidate time (> 1: faster than the baseline).
    """

    ratios: list[float] = field(default_factory=list)
    baseline_s: list[float] = field(default_factory=list)
    candidate_s: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return median(self.ratios)

    @property
    def spread(self) -> tuple[float, float]:
        """Lowest and highest round ratio."""
        return (min(self.ratios), max(self.ratios)) if self.ratios else (math.nan, math.nan)


def _timed(block: Block) -> float:
    start = time.perf_counter()
    block()
    return time.perf_counter() - start


def interleaved_ratios(
    baseline: Block,
    candidates: dict[str, Block],
    *,
    min_rounds: int,
    max_rounds: int,
    budget_s: float,
) -> dict[str, RatioStats]:
    """Time ``candidates`` against ``baseline`` in interleaved rounds.

    Rounds continue until ``min_rounds`` are done and ``budget_s`` seconds are spent, or
    ``max_rounds`` are done. Each block should already be warm (called once before).
    """
    stats = {name: RatioStats() for name in candidates}
    start = time.perf_counter()
    for round_index in range(max_rounds):
        if round_index >= min_rounds and time.perf_counter() - start >= budget_s:
            break
        for name, block in candidates.items():
            if round_index % 2 == 0:
                base = _timed(baseline)
                cand = _timed(block)
            else:
                cand = _timed(block)
                base = _timed(baseline)
            entry = stats[name]
            entry.baseline_s.append(base)
            entry.candidate_s.append(cand)
            entry.ratios.append(base / cand if cand > 0 else math.inf)
    return stats
