"""Micro-benchmark behind SubjectBatchNorm's choice of kernels (docs/benchmarks.md).

Times, on 1 CPU thread, ways to get per-channel batch statistics of BN-sized activations
against an eval-mode BatchNorm (the frozen model's cost for that layer). Medians of 5
repeats of 30 calls, in microseconds per call.

    python experiments/bench_bn_kernels.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = [(16, 16, 62, 62), (16, 128, 16, 16), (1, 64, 28, 28), (16, 64, 56, 56), (16, 512, 7, 7)]


def _time_us(fn: Callable[[], object], calls: int = 30) -> float:
    fn()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(runs)[2]


def _cases(x: torch.Tensor) -> dict[str, Callable[[], object]]:
    n, c = x.shape[:2]
    flat = x.view(n, c, -1)
    rm, rv = torch.zeros(c), torch.ones(c)
    return {
        "var(0,2,3)": lambda: x.var(dim=[0, 2, 3], correction=0),
        "var_mean(0,2,3)": lambda: torch.var_mean(x, dim=[0, 2, 3], correction=0),
        "mean+vector_norm (used)": lambda: (flat.mean(-1), torch.linalg.vector_norm(flat, dim=-1)),
        "bn eval": lambda: F.batch_norm(x, rm, rv, None, None, False, 0.0, 1e-5),
        "bn train (batch stats)": lambda: F.batch_norm(x, None, None, None, None, True, 0.0),
    }


def main() -> None:
    torch.set_num_threads(1)
    header = None
    for shape in SHAPES:
        cases = _cases(torch.randn(*shape) * 2 + 1)
        if header is None:
            header = ["shape (us per call)", *cases]
            print("| " + " | ".join(header) + " |")
            print("|" + "---|" * len(header))
        cells = [f"{_time_us(fn):.0f}" for fn in cases.values()]
        print(f"| {shape} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
