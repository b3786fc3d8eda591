"""``ttaperso bench``: argument parsing and the command (wired into ``ttaperso.cli``)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError

__all__ = ["add_bench_parser", "run_bench_command"]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_bench_parser(sub: Any) -> None:
    """Add the ``bench`` subcommand to the ``ttaperso`` parser's subparsers."""
    from .models import MODEL_NAMES

    bench = sub.add_parser(
        "bench",
        help="measure every strategy's speed vs the frozen model, state sizes, memory",
        description="Benchmark the runtime: frames/s of Personalizer.predict relative to the "
        "frozen model (interleaved ratios, medians over rounds) for every registered strategy "
        "and a reference-structure TENT, per-subject state bytes, subject-switch time, "
        "resident memory with many subjects, and many interleaved subjects vs one stream. "
        "Writes bench.md and bench.json. The full run takes 10-20 min on 1 CPU thread.",
    )
    bench.add_argument("--out", default="bench-results/", metavar="DIR", help="output folder")
    bench.add_argument("--quick", action="store_true", help="tiny model and counts (seconds)")
    bench.add_argument(
        "--models",
        type=_name_list,
        metavar="A,B",
        help=f"models to time (default: all but tiny; known: {', '.join(MODEL_NAMES)})",
    )
    bench.add_argument("--batches", type=_int_list, metavar="1,16,64", help="batch sizes")
    bench.add_argument("--strategies", type=_name_list, metavar="A,B", help="default: all")
    bench.add_argument(
        "--memory-counts", type=_int_list, metavar="N,M", help="subject counts (1000,10000)"
    )
    bench.add_argument("--no-memory", action="store_true", help="skip the resident-memory part")
    bench.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    bench.add_argument("--min-rounds", type=int, help="interleaved rounds per cell, at least")


def run_bench_command(args: argparse.Namespace, argv: Sequence[str] | None) -> None:
    """Run ``ttaperso bench`` with parsed ``args``; print where the results went."""
    from ..models import list_models
    from ..strategies import list_strategies
    from .models import MODEL_NAMES
    from .report import write_results
    from .suite import BenchOptions, run_bench

    opts = BenchOptions.quick_options() if args.quick else BenchOptions()
    if args.models is not None:
        unknown = [m for m in args.models if m not in MODEL_NAMES]
        if unknown:
            raise ConfigError(
                f"Unknown benchmark model(s) {unknown}; known: {', '.join(MODEL_NAMES)} "
                f"(registered models: {', '.join(list_models())})"
            )
        opts.models = args.models
    if args.strategies is not None:
        unknown = [s for s in args.strategies if s not in list_strategies()]
        if unknown:
            raise ConfigError(
                f"Unknown strategy(ies) {unknown}; available: {', '.join(list_strategies())}"
            )
        opts.strategies = args.strategies
    if args.batches is not None:
        opts.batches = args.batches
    if args.memory_counts is not None:
        opts.memory_counts = args.memory_counts
    if args.no_memory:
        opts.memory_strategies = []
    if args.threads < 1:
        raise ConfigError(f"Expected --threads >= 1 but got {args.threads}")
    opts.threads = args.threads
    if args.min_rounds is not None:
        if args.min_rounds < 1:
            raise ConfigError(f"Expected --min-rounds >= 1 but got {args.min_rounds}")
        opts.min_rounds = args.min_rounds
        opts.max_rounds = max(opts.max_rounds, args.min_rounds)
    words = list(sys.argv[1:] if argv is None else argv)
    command = "ttaperso " + " ".join(shlex.quote(w) for w in words)
    result = run_bench(opts, log=lambda line: print(line, file=sys.stderr, flush=True))
    for path in write_results(result, args.out, command):
        print(path)
