"""Study report: aggregated figures (JSON), a Markdown report and PNG plots.

Per (model, eval dataset, protocol, strategy), over seeds: pooled accuracy / UAR / macro-F1
(:mod:`ttaperso.metrics`), mean per-subject accuracy, video accuracy (when the streams have
sequence ids), per-subject change of accuracy against the frozen model (``source``) of the
same seed (mean gain, worst subject, share harmed by more than 2 points), gate admission
rate (share of frames with ``Prediction.updated``), adaptation cost (frames/s inside
``predict`` and its ratio to the frozen model's, state bytes per subject).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import metrics
from .runner import Cell, StudyRun

__all__ = ["aggregate", "write_report"]


def _seed_figures(result: dict[str, Any], num_classes: int) -> dict[str, Any]:
    subjects = result["subjects"]
    preds = torch.tensor([p for s in subjects.values() for p in s["preds"]], dtype=torch.long)
    targets = torch.tensor([t for s in subjects.values() for t in s["targets"]], dtype=torch.long)
    pooled = metrics.scores(preds, targets, num_classes).to_dict()
    vp = torch.tensor([p for s in subjects.values() for p in s["video_preds"]], dtype=torch.long)
    vt = torch.tensor([t for s in subjects.values() for t in s["video_targets"]], dtype=torch.long)
    per_subject = {
        name: metrics.scores(
            torch.tensor(s["preds"], dtype=torch.long),
            torch.tensor(s["targets"], dtype=torch.long),
            num_classes,
        ).to_dict()
        for name, s in subjects.items()
    }
    frames = result["frames"]
    seconds = result["seconds_in_protocol"]
    frozen_s = result.get("seconds_frozen", float("nan"))
    return {
        **pooled,
        "video_accuracy": metrics.accuracy(vp, vt, num_classes) if vt.numel() else float("nan"),
        "videos": int(vt.numel()),
        "admission_rate": float(np.mean([u for s in subjects.values() for u in s["updated"]])),
        "frames_per_s": frames / seconds if seconds > 0 else float("nan"),
        # frozen time / predict time on the same batches, timed interleaved in one cell
        "speed_vs_frozen": frozen_s / seconds if seconds > 0 else float("nan"),
        "state_nbytes": float(np.mean([s["state_nbytes"] for s in subjects.values()])),
        "per_subject": per_subject,
        "confusion": metrics.confusion_matrix(preds, targets, num_classes).tolist(),
    }


def _nanmean(values: list[float]) -> float:
    arr = np.array(values, dtype=float)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


def aggregate(run: StudyRun) -> dict[str, Any]:
    """Machine-readable results: per (model, dataset, protocol) a table of strategies."""
    groups: dict[tuple[str, str, str], dict[str, list[tuple[Cell, dict[str, Any]]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for cell, result in run.cells:
        if cell.phase == "eval":
            groups[(cell.model, cell.dataset, cell.protocol)][cell.strategy].append((cell, result))
    tables = []
    for (model, dataset, protocol), by_strategy in groups.items():
        labels = run.label_names[model]
        frozen_by_seed = {
            c.seed: _seed_figures(r, len(labels))
            for c, r in by_strategy.get("source", [])
            if r["status"] == "ok"
        }
        rows = {}
        for strategy, cells in by_strategy.items():
            ok = [(c, r) for c, r in cells if r["status"] == "ok"]
            if not ok:
                rows[strategy] = {"status": "n/a", "reason": cells[0][1].get("reason", "")}
                continue
            seeds = {c.seed: _seed_figures(r, len(labels)) for c, r in ok}
            row: dict[str, Any] = {"status": "ok", "options": ok[0][0].options}
            row["config"] = ok[0][1].get("config", {})
            for key in (
                "accuracy",
                "uar",
                "macro_f1",
                "video_accuracy",
                "admission_rate",
                "frames_per_s",
                "speed_vs_frozen",
                "state_nbytes",
            ):
                row[key] = _nanmean([f[key] for f in seeds.values()])
            row["accuracy_std"] = float(np.std([f["accuracy"] for f in seeds.values()]))
            row["videos"] = next(iter(seeds.values()))["videos"]
            subjects = list(next(iter(seeds.values()))["per_subject"])
            row["per_subject_accuracy"] = {
                s: _nanmean([f["per_subject"][s]["accuracy"] for f in seeds.values()])
                for s in subjects
            }
            row["per_subject_uar"] = {
                s: _nanmean([f["per_subject"][s]["uar"] for f in seeds.values()]) for s in subjects
            }
            row["mean_subject_accuracy"] = _nanmean(list(row["per_subject_accuracy"].values()))
            row["confusion"] = np.sum([f["confusion"] for f in seeds.values()], axis=0).tolist()
            changes = [
                metrics.change_against_frozen(
                    {s: v["accuracy"] for s, v in f["per_subject"].items()},
                    {s: v["accuracy"] for s, v in frozen_by_seed[seed]["per_subject"].items()},
                )
                for seed, f in seeds.items()
                if seed in frozen_by_seed
            ]
            if changes:
                row["gain"] = float(np.mean([c.mean_gain for c in changes]))
                row["worst_change"] = float(np.mean([c.worst for c in changes]))
                per = defaultdict(list)
                for c in changes:
                    for s, d in c.per_subject.items():
                        per[s].append(d)
                row["change_per_subject"] = {s: float(np.mean(d)) for s, d in per.items()}
                row["worst_subject"] = min(
                    row["change_per_subject"], key=lambda s: row["change_per_subject"][s]
                )
                row["share_harmed"] = float(np.mean([c.share_harmed for c in changes]))
            rows[strategy] = row
        tables.append(
            {
                "model": model,
                "dataset": dataset,
                "protocol": protocol,
                "labels": list(labels),
                "strategies": rows,
            }
        )
    return {
        "study": run.config.name,
        "config": run.config.to_dict(),
        "selections": run.selections,
        "cells_computed": run.computed,
        "cells_loaded": run.loaded,
        "wall_s": run.wall_s,
        "cell_seconds_total": float(sum(r.get("seconds", 0.0) for _, r in run.cells)),
        "tables": tables,
    }


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None or value != value:
        return "–"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def _slug(*parts: str) -> str:
    return "_".join("".join(ch if ch.isalnum() else "-" for ch in p) for p in parts)


def _plots(table: dict[str, Any], run: StudyRun, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {s: r for s, r in table["strategies"].items() if r["status"] == "ok"}
    slug = _slug(table["model"], table["dataset"], table["protocol"])
    written = []
    if "source" in rows:
        frozen = rows["source"]["per_subject_accuracy"]
        fig, ax = plt.subplots(figsize=(5.5, 5))
        for strategy, row in rows.items():
            if strategy == "source":
                continue
            xs = [frozen[s] for s in frozen]
            ys = [row["per_subject_accuracy"][s] for s in frozen]
            ax.scatter(xs, ys, label=strategy, s=22, alpha=0.8)
        ax.plot([0, 1], [0, 1], color="grey", lw=1)
        ax.set_xlabel("frozen model accuracy per subject")
        ax.set_ylabel("adapted accuracy per subject")
        ax.set_title(f"{table['dataset']} / {table['protocol']}: per subject", fontsize=10)
        ax.legend(fontsize=7)
        name = f"per_subject_{slug}.png"
        fig.tight_layout()
        fig.savefig(folder / name, dpi=90)
        plt.close(fig)
        written.append(name)
    # accuracy along the stream: correctness by position, averaged over subjects and seeds
    fig, ax = plt.subplots(figsize=(7, 4))
    for strategy in rows:
        curves = []
        for cell, result in run.cells:
            if (
                cell.phase == "eval"
                and (cell.model, cell.dataset, cell.protocol, cell.strategy)
                == (table["model"], table["dataset"], table["protocol"], strategy)
                and result["status"] == "ok"
            ):
                for s in result["subjects"].values():
                    p, t = np.array(s["preds"]), np.array(s["targets"])
                    curves.append(np.where(t >= 0, (p == t).astype(float), np.nan))
        if not curves:
            continue
        length = max(len(c) for c in curves)
        stack = np.full((len(curves), length), np.nan)
        for i, c in enumerate(curves):
            stack[i, : len(c)] = c
        counts = np.isfinite(stack).sum(axis=0)
        mean = np.where(counts > 0, np.nansum(stack, axis=0) / np.maximum(counts, 1), np.nan)
        window = max(1, length // 20)
        kernel = np.ones(window) / window
        valid = np.isfinite(mean)
        smooth = np.convolve(np.where(valid, mean, 0), kernel, mode="same") / np.maximum(
            np.convolve(valid.astype(float), kernel, mode="same"), 1e-9
        )
        ax.plot(np.arange(length), smooth, label=strategy, lw=1.2)
    ax.set_xlabel("frame position in the subject's stream")
    ax.set_ylabel(f"accuracy (running mean over {max(1, length // 20)} frames)")
    ax.set_title(
        f"{table['dataset']} / {table['protocol']}: accuracy along the stream", fontsize=10
    )
    ax.legend(fontsize=7, ncol=2)
    name = f"stream_{slug}.png"
    fig.tight_layout()
    fig.savefig(folder / name, dpi=90)
    plt.close(fig)
    written.append(name)
    # confusion matrices (row-normalised, pooled over subjects and seeds)
    labels = table["labels"]
    n = len(rows)
    cols = min(n, 4)
    fig, axes = plt.subplots(
        (n + cols - 1) // cols, cols, figsize=(3.2 * cols, 3.0 * ((n + cols - 1) // cols))
    )
    axes = np.atleast_1d(axes).ravel()
    for ax, (strategy, row) in zip(axes, rows.items(), strict=False):
        cm = np.array(row["confusion"], dtype=float)
        cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(cm, vmin=0, vmax=1, cmap="Blues")
        ax.set_title(strategy, fontsize=9)
        ax.set_xticks(range(len(labels)), [lab[:3] for lab in labels], fontsize=6)
        ax.set_yticks(range(len(labels)), [lab[:3] for lab in labels], fontsize=6)
    for ax in axes[n:]:
        ax.axis("off")
    fig.suptitle(f"{table['dataset']} / {table['protocol']}: confusion (rows = truth)", fontsize=10)
    name = f"confusion_{slug}.png"
    fig.tight_layout()
    fig.savefig(folder / name, dpi=90)
    plt.close(fig)
    written.append(name)
    return written


def _markdown(results: dict[str, Any], plots: dict[int, list[str]], command: str) -> str:
    cfg = results["config"]
    lines = [f"# Study `{results['study']}`", ""]
    if cfg.get("description"):
        lines += [cfg["description"], ""]
    lines += [
        f"Regenerate: `{command}`",
        "",
        f"Wall time of the run that wrote this report: {results['wall_s']:.0f} s "
        f"({results['cells_computed']} cells computed, {results['cells_loaded']} loaded from "
        f"the cell cache); compute time of all cells: {results['cell_seconds_total']:.0f} s.",
        f"Seeds: {cfg.get('seeds', [0])}. Figures are means over seeds; accuracies in %.",
        "",
        "UAR = mean recall over the classes present in the targets (sklearn's balanced "
        "accuracy; `ttaperso.metrics`). Change = per-subject accuracy minus the frozen model's "
        "(same stream order); harmed = share of subjects losing more than 2 points. "
        "Admission = share of frames that updated the state (`Prediction.updated`). "
        "Speed = frozen-model time / `predict` time on the same batches, timed interleaved "
        "within each cell (> 1 = faster than frozen; coarse: one pass, use `ttaperso bench` "
        "for speed claims).",
        "",
        "## Hyperparameter selection",
        "",
    ]
    dev = cfg.get("dev") or ""
    lines.append(
        f"Selected on the dev set `{dev}` by {cfg.get('select_metric', 'uar')} (pooled), then "
        "frozen for the eval sets; eval data were not used to choose."
        if dev
        else "No dev set: every strategy runs with its configured options."
    )
    lines += ["", "| model | protocol | strategy | selected options | dev candidates |"]
    lines.append("|---|---|---|---|---|")
    for sel in results["selections"]:
        cands = "; ".join(
            f"{json.dumps(c['options'], sort_keys=True)}: {_pct(c['score'])}"
            for c in sel["candidates"]
        )
        lines.append(
            f"| {sel['model']} | {sel['protocol']} | {sel['strategy']} | "
            f"`{json.dumps(sel['selected'], sort_keys=True)}` | {cands or '(no grid)'} |"
        )
    for index, table in enumerate(results["tables"]):
        lines += [
            "",
            f"## {table['dataset']} — model `{table['model']}`, protocol `{table['protocol']}`",
            "",
            "| strategy | acc | UAR | macro-F1 | video acc | mean subj. acc | gain | worst "
            "(subject) | harmed | admission | speed vs frozen | state bytes |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for strategy, row in table["strategies"].items():
            if row["status"] != "ok":
                lines.append(f"| {strategy} | n/a: {row['reason'][:160]} |" + " |" * 10)
                continue
            worst = (
                f"{_pct(row.get('worst_change'), True)} ({row.get('worst_subject', '')})"
                if "worst_change" in row
                else "–"
            )
            lines.append(
                f"| {strategy} | {_pct(row['accuracy'])} | {_pct(row['uar'])} | "
                f"{_pct(row['macro_f1'])} | {_pct(row['video_accuracy'])} | "
                f"{_pct(row['mean_subject_accuracy'])} | {_pct(row.get('gain'), True)} | "
                f"{worst} | {_pct(row.get('share_harmed'))} | {_pct(row['admission_rate'])} | "
                f"{row.get('speed_vs_frozen', float('nan')):.2f} | {row['state_nbytes']:.0f} |"
            )
        ok = {s: r for s, r in table["strategies"].items() if r["status"] == "ok"}
        subjects = list(next(iter(ok.values()))["per_subject_accuracy"]) if ok else []
        if subjects:
            lines += [
                "",
                "Per-subject accuracy (%):",
                "",
                "| strategy | " + " | ".join(subjects) + " |",
                "|---|" + "---|" * len(subjects),
            ]
            for strategy, row in ok.items():
                lines.append(
                    f"| {strategy} | "
                    + " | ".join(_pct(row["per_subject_accuracy"][s]) for s in subjects)
                    + " |"
                )
        lines.append("")
        lines += [f"![{name}]({name})" for name in plots.get(index, [])]
    return "\n".join(lines) + "\n"


def write_report(run: StudyRun, out: str | Path | None = None, command: str = "") -> Path:
    """Write ``results.json``, ``report.md`` and the PNG plots; return the report's path."""
    from ..io import atomic_write_bytes

    folder = Path(out) if out is not None else run.out
    folder.mkdir(parents=True, exist_ok=True)
    results = aggregate(run)
    plots = {i: _plots(t, run, folder) for i, t in enumerate(results["tables"])}
    results["command"] = command
    atomic_write_bytes(folder / "results.json", json.dumps(results, indent=1).encode())
    report = folder / "report.md"
    atomic_write_bytes(report, _markdown(results, plots, command).encode())
    return report
