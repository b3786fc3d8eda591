"""Benchmarks of the personalization runtime (``ttaperso bench``).

Speed of every registered strategy relative to the frozen model (interleaved ratios),
per-subject state bytes in memory and on disk, subject-switch time, resident memory with
thousands of subjects, and many interleaved subjects vs one stream. See
``docs/benchmarks.md`` for what each figure means and the committed results in
``experiments/results/bench.{md,json}``.

    from ttaperso.bench import BenchOptions, run_bench, write_results
    result = run_bench(BenchOptions.quick_options())
    write_results(result, "bench-out/", command="...")
"""

from __future__ import annotations

from .report import evaluate_goals, render_markdown, write_results
from .suite import BenchOptions, run_bench

__all__ = ["BenchOptions", "run_bench", "write_results", "render_markdown", "evaluate_goals"]
