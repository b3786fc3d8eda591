"""Markdown and JSON rendering of a benchmark result, with the issue's goals checked."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..io import atomic_write_bytes
from .suite import REFERENCE_TENT, TENT_ALL_FRAMES

__all__ = ["evaluate_goals", "render_markdown", "write_results"]

KIB = 1024
#: strategies that take no gradient step (the 1.15x goal)
GRADIENT_FREE = ("norm", "t3a", "tta_cap")


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _throughput_row(result: dict[str, Any], model: str, batch: int, variant: str) -> Any:
    for row in result.get("throughput", []):
        if (row["model"], row["batch"], row["variant"]) == (model, batch, variant):
            return row
    return None


def evaluate_goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals with the measured figure and whether each was met."""
    goals: list[dict[str, Any]] = []
    models = sorted({r["model"] for r in result.get("throughput", [])})
    batch = 16 if any(r["batch"] == 16 for r in result.get("throughput", [])) else None
    for model in models:
        if batch is None:
            break
        for name in GRADIENT_FREE:
            row = _throughput_row(result, model, batch, name)
            if row is not None and "cost" in row:
                goals.append(
                    {
                        "goal": f"{name} on {model}, batch {batch}: cost <= 1.15x frozen",
                        "measured": f"{row['cost']:.2f}x",
                        "met": row["cost"] <= 1.15,
                    }
                )
        for variant in ("tent", TENT_ALL_FRAMES):
            row = _throughput_row(result, model, batch, variant)
            if row is not None and "cost" in row:
                goals.append(
                    {
                        "goal": f"{variant} on {model}, batch {batch}: cost <= 1.6x frozen",
                        "measured": f"{row['cost']:.2f}x (frames admitted "
                        f"{_fmt(row.get('admitted'))})",
                        "met": row["cost"] <= 1.6,
                    }
                )
            ref = _throughput_row(result, model, batch, REFERENCE_TENT)
            if row is not None and ref is not None and "speed" in row and "speed" in ref:
                goals.append(
                    {
                        "goal": f"{variant} on {model}, batch {batch}: faster than the "
                        "reference-structure TENT",
                        "measured": f"{row['speed']:.2f} vs {ref['speed']:.2f} of frozen speed",
                        "met": row["speed"] > ref["speed"],
                    }
                )
    for row in result.get("state_sizes", []):
        if row["strategy"].split(",")[0] in ("norm", "tent") and row["model"] == "resnet18-112":
            if "adapted_memory_bytes" not in row:
                continue
            worst = max(row["adapted_memory_bytes"], row["adapted_disk_bytes"])
            goals.append(
                {
                    "goal": f"{row['strategy']} state on {row['model']} <= 120 KiB",
                    "measured": f"{row['adapted_memory_bytes'] / KIB:.1f} KiB in memory, "
                    f"{row['adapted_disk_bytes'] / KIB:.1f} KiB on disk (fully adapted)",
                    "met": worst <= 120 * KIB,
                }
            )
    for row in result.get("memory", []):
        added = row.get("rss_added") or {}
        if "10000" in added and added["10000"] is not None:
            goals.append(
                {
                    "goal": f"10,000 {row['strategy']} subjects ({row['model']}) < 1.5 GB resident",
                    "measured": f"{added['10000'] / 1e9:.2f} GB",
                    "met": added["10000"] < 1.5e9,
                }
            )
    for row in result.get("switching", []):
        if "switch_ms" in row:
            goals.append(
                {
                    "goal": f"switching subject ({row['strategy']}, {row['model']}) < 1 ms",
                    "measured": f"state lookup + tensor swap {row['swap_ms']:.3f} ms; extra "
                    f"time of an alternating call {row['switch_ms']:.2f} ms (noise: "
                    f"{row['call_ms']:.1f} ms calls)",
                    "met": row["swap_ms"] < 1.0,
                }
            )
    for row in result.get("interleaved", []):
        if "relative_throughput" in row:
            goals.append(
                {
                    "goal": f"{row['subjects']} interleaved {row['strategy']} subjects >= 0.8x "
                    "single stream",
                    "measured": f"{row['relative_throughput']:.2f}x",
                    "met": row["relative_throughput"] >= 0.8,
                }
            )
    return goals


def render_markdown(result: dict[str, Any], command: str) -> str:
    """The report as Markdown (tables per section, conditions, goals)."""
    c = result["conditions"]
    lines = [
        "# ttaperso benchmark",
        "",
        f"Produced by `{command}` on {c['date']}: {c['cpu']} ({c['cpu_count']} cores shared "
        f"with other work; load average {_fmt(c['load_average_start'][0]) if c.get('load_average_start') else 'n/a'} "
        f"at start, {_fmt(c['load_average_end'][0]) if c.get('load_average_end') else 'n/a'} at end), "
        f"torch {c['torch']}, {c['torch_threads']} thread(s), ttaperso {c['ttaperso']}; "
        f"{c['wall_seconds'] / 60:.1f} min.",
        "",
        "Speeds are ratios measured interleaved: each round times the frozen model (the "
        "caller's module in eval mode under `no_grad`) and the variant back to back on the "
        f"same frames (blocks of >= {16} frames), the figure is the median over rounds of "
        "frozen time / variant time. `speed` = variant frames/s / frozen frames/s; `cost` = "
        "1/speed. `admitted` = fraction of frames that updated the subject's state.",
        "",
    ]
    goals = evaluate_goals(result)
    if goals:
        lines += ["## Goals", "", "| goal | measured | met |", "|---|---|---|"]
        lines += [
            f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else 'NO'} |" for g in goals
        ]
        lines.append("")
    if result.get("models_na"):
        lines += ["Models not available: "]
        lines += [f"- {k}: {v}" for k, v in result["models_na"].items()]
        lines.append("")
    lines += [
        "## Throughput relative to the frozen model",
        "",
        "| model | batch | variant | speed (min-max) | cost | frozen ms/frame | ms/frame | admitted | rounds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.get("throughput", []):
        if "na" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | n/a: {r['na']} |||||")
            continue
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['variant']} | {r['speed']:.2f} "
            f"({r['speed_min']:.2f}-{r['speed_max']:.2f}) | {r['cost']:.2f}x | "
            f"{r['frozen_ms_per_frame']:.2f} | {r['ms_per_frame']:.2f} | {_fmt(r['admitted'])} "
            f"| {r['rounds']} |"
        )
    lines += [
        "",
        "## Per-subject state",
        "",
        "After the first call with the default config, and fully adapted (`gates=()`, 40 "
        "frames in calls of 8: optimizer moments after two steps plus 8 frames of pending "
        "gradients, the largest layout).",
        "",
        "| model | strategy | first call: memory | disk | adapted: memory | disk | tensors |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result.get("state_sizes", []):
        if "na" in r:
            lines.append(f"| {r['model']} | {r['strategy']} | n/a: {r['na']} |||||")
            continue
        lines.append(
            f"| {r['model']} | {r['strategy']} | {r['first_call_memory_bytes'] / KIB:.1f} KiB | "
            f"{r['first_call_disk_bytes'] / KIB:.1f} KiB | {r['adapted_memory_bytes'] / KIB:.1f} "
            f"KiB | {r['adapted_disk_bytes'] / KIB:.1f} KiB | {r['tensors']} |"
        )
    lines += [
        "",
        "## Switching subjects",
        "",
        "`swap`: what a switch does besides the forward (look the subject's state up, put its "
        "tensors into the shared model's slots and restore them), timed directly. `extra`: "
        "extra time of a batch-1 `predict` whose subject differs from the previous call's "
        "(alternating two subjects vs one, interleaved; median over rounds; within the noise "
        "of the call itself on a shared machine).",
        "",
        "| model | strategy | swap ms | extra ms per alternating call | ms per call | rounds |",
        "|---|---|---|---|---|---|",
    ]
    for r in result.get("switching", []):
        if "na" in r:
            lines.append(f"| {r['model']} | {r['strategy']} | n/a: {r['na']} ||||")
            continue
        lines.append(
            f"| {r['model']} | {r['strategy']} | {r['swap_ms']:.3f} | {r['switch_ms']:.3f} | "
            f"{r['call_ms']:.2f} | {r['rounds']} |"
        )
    lines += [
        "",
        "## Many subjects interleaved frame by frame",
        "",
        "Throughput of batch-1 calls cycling over N subjects relative to the same calls on "
        "one subject (interleaved blocks; > 1 means faster).",
        "",
        "| model | strategy | subjects | relative throughput (min-max) | single ms/frame | "
        "interleaved ms/frame |",
        "|---|---|---|---|---|---|",
    ]
    for r in result.get("interleaved", []):
        if "na" in r:
            lines.append(f"| {r['model']} | {r['strategy']} | {r['subjects']} | n/a: {r['na']} |||")
            continue
        lines.append(
            f"| {r['model']} | {r['strategy']} | {r['subjects']} | "
            f"{r['relative_throughput']:.2f} ({r['spread'][0]:.2f}-{r['spread'][1]:.2f}) | "
            f"{r['single_ms_per_frame']:.2f} | {r['interleaved_ms_per_frame']:.2f} |"
        )
    lines += [
        "",
        "## Several subjects per call",
        "",
        "One frame from each of N subjects per tick. Speed of `predict_many` (one call) and of "
        "a loop of N `predict` calls, each relative to the frozen model on the same N frames "
        "as one batch (interleaved; 1.0 = as fast as plain batched inference). `shared`: the "
        "strategy runs the model once for all subjects (`Strategy.shares_model_forward`); "
        "the others step each subject in turn.",
        "",
        "| model | strategy | subjects | shared | predict_many (min-max) | loop of predict "
        "(min-max) | frozen ms/tick |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result.get("many_subjects", []):
        if "na" in r:
            lines.append(
                f"| {r['model']} | {r['strategy']} | {r['subjects']} | n/a: {r['na']} ||||"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['strategy']} | {r['subjects']} | "
            f"{'yes' if r['shares_model_forward'] else 'no'} | "
            f"{r['many_speed']:.2f} ({r['many_spread'][0]:.2f}-{r['many_spread'][1]:.2f}) | "
            f"{r['loop_speed']:.2f} ({r['loop_spread'][0]:.2f}-{r['loop_spread'][1]:.2f}) | "
            f"{r['frozen_ms_per_tick']:.1f} |"
        )
    lines += [
        "",
        "## Resident memory",
        "",
        "Resident set size added by installing N fully adapted subject states, each in a "
        "fresh process (`python -m ttaperso.bench.memory`).",
        "",
        "| model | strategy | state bytes | tensors | N | RSS added | per subject | "
        "load ms/subject |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result.get("memory", []):
        if "error" in r:
            lines.append(f"| {r['model']} | {r['strategy']} | n/a: {r['error']} ||||||")
            continue
        for n, added in (r.get("rss_added") or {}).items():
            per = "n/a" if added is None else f"{added / int(n) / KIB:.1f} KiB"
            total = "n/a" if added is None else f"{added / 1e6:.0f} MB"
            lines.append(
                f"| {r['model']} | {r['strategy']} | {r['state_memory_bytes'] / KIB:.1f} KiB | "
                f"{r['tensors_per_state']} | {n} | {total} | {per} | "
                f"{r['load_ms_per_subject']:.1f} |"
            )
    lines.append("")
    return "\n".join(lines)


def write_results(result: dict[str, Any], out_dir: str | Path, command: str) -> list[Path]:
    """Write ``bench.json`` and ``bench.md`` into ``out_dir``; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, **result, "goals": evaluate_goals(result)}
    json_path = out / "bench.json"
    md_path = out / "bench.md"
    atomic_write_bytes(json_path, (json.dumps(payload, indent=1, default=str) + "\n").encode())
    atomic_write_bytes(md_path, render_markdown(result, command).encode())
    return [md_path, json_path]
