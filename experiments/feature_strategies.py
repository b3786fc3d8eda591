"""Study of the feature/Fisher strategies (fisher, eata, t3a, shot) against source/norm/tent/sar.

Three parts, results in ``experiments/results/feature_strategies.{md,json}``:

1. per-subject state size in bytes of every strategy on the fer mini-XCEPTION and on a
   randomly initialised torchvision resnet18 (7 classes), against a full model copy;
2. JAFFE, FACTS.md section-4 protocol (each subject its own stream from the frozen model,
   images shuffled with seed 0, batches of 16, predict then adapt): accuracy, UAR and the
   worst subject's change, with T3A's filter_k sweep and EATA with a FER2013-test source
   sample (48x48 crops resized to 64x64, then the model's preprocessing);
3. ``fisher`` with 1, 3 and 10 frames for the Fisher estimate: accuracy, state size and
   which parameters it picked.

    python experiments/feature_strategies.py             # everything (~5 min on 2 cores)
    python experiments/feature_strategies.py --skip-resnet
    python experiments/feature_strategies.py --frame-by-frame   # JAFFE one frame per call
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ttaperso
from ttaperso.streams.data import data_root
from ttaperso.streams.datasets import read_class_folders, read_jaffe, source_data_from_stream

REPO = Path(__file__).resolve().parents[1]

log = logging.getLogger("feature_strategies")

STRATEGIES = ("source", "norm", "tent", "sar", "fisher", "eata", "t3a", "shot")

#: JAFFE rows: name -> (strategy, overrides, needs the FER2013 source sample)
JAFFE_CONFIGS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "source": ("source", {}, False),
    "norm": ("norm", {}, False),
    "tent": ("tent", {}, False),
    "sar": ("sar", {}, False),
    "fisher": ("fisher", {}, False),
    "fisher (consistency 0)": ("fisher", {"consistency": 0.0}, False),
    "fisher (update_every 4)": ("fisher", {"update_every": 4}, False),
    "fisher (lr 1e-2)": ("fisher", {"lr": 1e-2}, False),
    "tent (update_every 4)": ("tent", {"update_every": 4}, False),
    "eata (FER2013 source Fisher)": ("eata", {}, True),
    "eata (no source: ETA)": ("eata", {}, False),
    "eata (redundancy filter off)": ("eata", {"redundancy": 1.0}, True),
    "t3a (filter_k 1)": ("t3a", {"filter_k": 1}, False),
    "t3a (filter_k 5, default)": ("t3a", {}, False),
    "t3a (filter_k 20)": ("t3a", {"filter_k": 20}, False),
    "t3a (filter_k 100)": ("t3a", {"filter_k": 100}, False),
    "t3a (all)": ("t3a", {"filter_k": 0}, False),
    "t3a (filter_k 5, strict predict-then-adapt)": ("t3a", {"include_current": False}, False),
    "shot": ("shot", {}, False),
}


def uar(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean recall over the classes present in the targets (sklearn's balanced accuracy)."""
    return float(np.mean([(pred[target == c] == c).mean() for c in np.unique(target)]))


def load_jaffe(
    root: Path, model: ttaperso.FERModel
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Subject -> (model input frames, label indices in the model's order), fer crops."""
    data = {}
    for stream in read_jaffe(root / "jaffe"):
        mapped = stream.relabel(model.labels)
        data[stream.subject] = (model.prepare(mapped.images), mapped.labels)
    return data


def model_copy_bytes(model: torch.nn.Module) -> int:
    """Bytes of a full copy of the model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def state_bound(p: ttaperso.Personalizer, subject: str) -> int:
    """Largest size the subject's state can reach (bounded memories filled)."""
    state = p.state_dict(subject)
    size = sum(t.numel() * t.element_size() for t in state.values())
    c = len(p.labels)
    if p.strategy_name == "t3a":
        k = p.config.filter_k  # type: ignore[attr-defined]
        d = state["memory/t3a.supports"].shape[1]
        now = sum(state[f"memory/t3a.{x}"].nbytes for x in ("supports", "labels", "entropy"))
        size += c * k * (4 * d + 8 + 4) - now
    if p.strategy_name == "shot":
        w = p.config.window  # type: ignore[attr-defined]
        d = state["memory/shot.features"].shape[1]
        now = state["memory/shot.features"].nbytes + state["memory/shot.probs"].nbytes
        size += w * (d + c) * 4 - now
    return size


def state_sizes(
    name: str, model: ttaperso.FERModel, frames: torch.Tensor, **kwargs: Any
) -> list[dict[str, Any]]:
    """State bytes of every strategy after ``frames`` (batches of 16) for one subject."""
    rows = []
    copy = model_copy_bytes(model)
    for strategy in STRATEGIES:
        start = time.perf_counter()
        # No gates or sample filters: every strategy updates on the noise frames, so the
        # optimizer moments and memories it keeps are all in the measured state.
        forced = {} if strategy == "source" else {"gates": ()}
        if strategy in ("sar", "eata"):
            forced["margin"] = 1.0
        if strategy == "eata":
            forced["redundancy"] = 1.0
        p = ttaperso.Personalizer(model, strategy, **forced, **kwargs)
        for x in frames.split(16):
            p.predict(x, "S")
        measured = p.state_nbytes("S")
        bound = state_bound(p, "S")
        rows.append(
            {
                "model": name,
                "strategy": strategy,
                "fresh_bytes": p.state_nbytes(),
                "bytes_after_stream": measured,
                "max_bytes": bound,
                "model_copy_bytes": copy,
                "fraction_of_copy": bound / copy,
                "seconds": time.perf_counter() - start,
            }
        )
        log.info("%-18s %-7s max %9d B (%.4f of a copy)", name, strategy, bound, bound / copy)
    return rows


def run_jaffe(
    model: ttaperso.FERModel,
    strategy: str,
    overrides: dict[str, Any],
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    source: ttaperso.SourceData | None,
    batch: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """FACTS section-4 protocol for one config; per-subject accuracy and extras."""
    start = time.perf_counter()
    p = ttaperso.Personalizer(model, strategy, source=source, **overrides)
    setup = time.perf_counter() - start
    per_subject, preds_all, targets_all, extra = {}, [], [], {}
    for subject, (x, y) in data.items():
        order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
        x, y = x[order], y[order]
        pred = torch.cat(
            [p.predict(x[i : i + batch], subject).labels for i in range(0, len(y), batch)]
        )
        per_subject[subject] = float((pred == y).float().mean())
        preds_all.append(pred.numpy())
        targets_all.append(y.numpy())
    pred, target = np.concatenate(preds_all), np.concatenate(targets_all)
    if strategy == "fisher":
        picked: Counter[str] = Counter()
        for s in data:
            picked.update(p.inspect(s).details["selected"])
        extra["picked_total_over_subjects"] = dict(picked.most_common())
    if strategy == "eata":
        extra["frames_in_gradient"] = sum(
            int(p.state_dict(s)["memory/eata.selected"]) for s in data
        )
    return {
        "accuracy": float((pred == target).mean()),
        "uar": uar(pred, target),
        "per_subject": per_subject,
        "state_bytes_mean": float(np.mean([p.state_nbytes(s) for s in data])),
        "seconds": time.perf_counter() - start,
        "setup_seconds": setup,
        "config": p.config.to_dict(),
        **extra,
    }


def jaffe_table(results: dict[str, dict[str, Any]], subjects: list[str]) -> list[str]:
    base = results["source"]["per_subject"]
    lines = [
        "| config | acc | UAR | worst subject change | state bytes | "
        + " | ".join(subjects)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(subjects),
    ]
    for name, r in results.items():
        deltas = {s: r["per_subject"][s] - base[s] for s in subjects}
        worst = min(deltas, key=lambda s: deltas[s])
        lines.append(
            f"| {name} | {100 * r['accuracy']:.1f} | {100 * r['uar']:.1f} | "
            f"{100 * deltas[worst]:+.1f} ({worst}) | {r['state_bytes_mean']:.0f} | "
            + " | ".join(f"{100 * r['per_subject'][s]:.0f}" for s in subjects)
            + " |"
        )
    return lines


FRAME_ROWS = (
    "source",
    "norm",
    "tent",
    "sar",
    "fisher",
    "eata (FER2013 source Fisher)",
    "t3a (filter_k 5, default)",
    "shot",
)


def frame_by_frame(args: argparse.Namespace, model: ttaperso.FERModel) -> None:
    """The JAFFE table with one frame per call (main rows only)."""
    data = load_jaffe(args.data, model)
    source = source_data_from_stream(
        read_class_folders(
            args.data / "fer2013_test", size=64, max_per_class=args.source_per_class, seed=0
        ),
        model,
    )
    results = {}
    for name in FRAME_ROWS:
        strategy, overrides, needs_source = JAFFE_CONFIGS[name]
        results[name] = run_jaffe(
            model, strategy, overrides, data, source if needs_source else None, batch=1
        )
        log.info("%-32s acc %.1f%%", name, 100 * results[name]["accuracy"])
    text = "\n".join(
        [
            "# JAFFE, fer mini-XCEPTION, one frame per call, seed 0",
            "",
            *jaffe_table(results, list(data)),
            "",
            "Command: `python experiments/feature_strategies.py --frame-by-frame`",
            "",
        ]
    )
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "feature_strategies_frame.md").write_text(text)
    (args.out / "feature_strategies_frame.json").write_text(
        json.dumps(results, indent=1, default=str)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=data_root())
    parser.add_argument(
        "--source-per-class", type=int, default=80, help="FER2013-test images per class (EATA)"
    )
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument(
        "--frame-by-frame",
        action="store_true",
        help="only the JAFFE table, one frame per call, main rows (feature_strategies_frame.md)",
    )
    parser.add_argument("--only", nargs="*", help="JAFFE config names to run (source always)")
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    torch.manual_seed(0)

    model = ttaperso.load_model("fer-mini-xception")
    lines = ["# Feature/Fisher strategies: state sizes and JAFFE", ""]
    out: dict[str, Any] = {}

    if args.frame_by_frame:
        frame_by_frame(args, model)
        return

    # 1. state sizes ----------------------------------------------------------------
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(64, 1, 64, 64, generator=g) * 2 - 1
    rows = state_sizes("fer-mini-xception", model, noise)
    if not args.skip_resnet:
        from torchvision.models import resnet18

        from ttaperso.adapters.torch_classifier import TorchClassifier

        torch.manual_seed(0)
        net = resnet18(num_classes=7).eval()
        resnet = TorchClassifier(net, model.labels, (3, 112, 112), head="fc", name="resnet18")
        rows += state_sizes("resnet18 (random)", resnet, torch.rand(64, 3, 112, 112, generator=g))
    out["state_sizes"] = rows
    lines += [
        "## Per-subject state size",
        "",
        "Bytes of one subject's state after 64 frames (4 batches of 16, uniform noise; gates and "
        "sample filters off so that every strategy updates and holds its optimizer moments), and "
        "the most it can hold (T3A's supports at C x filter_k, SHOT's window full), against a full "
        "copy of the model (parameters + buffers, float32). resnet18 is torchvision's, randomly "
        "initialised, 7 classes, 112x112 input.",
        "",
        "| model | strategy | fresh | after 64 frames | max | model copy | max / copy |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['strategy']} | {r['fresh_bytes']:,} | "
            f"{r['bytes_after_stream']:,} | {r['max_bytes']:,} | {r['model_copy_bytes']:,} | "
            f"{r['fraction_of_copy']:.4f} |"
        )

    # 2. JAFFE ----------------------------------------------------------------------
    data = load_jaffe(args.data, model)
    subjects = list(data)
    fer_folder = args.data / "fer2013_test"
    source = None
    if fer_folder.is_dir():
        stream = read_class_folders(
            fer_folder, size=64, max_per_class=args.source_per_class, seed=0
        )
        source = source_data_from_stream(stream, model)
        log.info("FER2013-test source sample: %d frames", len(source))
    results: dict[str, dict[str, Any]] = {}
    for name, (strategy, overrides, needs_source) in JAFFE_CONFIGS.items():
        if args.only and name not in args.only and name != "source":
            continue
        if needs_source and source is None:
            log.warning("skipping %s: no %s", name, fer_folder)
            continue
        results[name] = run_jaffe(
            model, strategy, overrides, data, source if needs_source else None
        )
        r = results[name]
        log.info(
            "%-32s acc %.1f%%  UAR %.1f%%  (%.1fs)",
            name,
            100 * r["accuracy"],
            100 * r["uar"],
            r["seconds"],
        )
    out["jaffe"] = results
    n_images = sum(len(v[1]) for v in data.values())
    lines += [
        "",
        f"## JAFFE, fer mini-XCEPTION, {n_images} images, batches of 16, seed 0",
        "",
        "FACTS.md section-4 protocol. UAR = mean recall over the classes present in the "
        "targets (sklearn's balanced accuracy). State bytes: mean over subjects at the end.",
        "",
        *jaffe_table(results, subjects),
    ]
    for name, r in results.items():
        if "frames_in_gradient" in r:
            lines.append(f"\n{name}: {r['frames_in_gradient']} of {n_images} frames in a gradient.")
        if "picked_total_over_subjects" in r:
            lines.append(
                f"\n{name}: parameters picked (scalars summed over the {len(subjects)} subjects): "
                + ", ".join(f"{k} {v}" for k, v in r["picked_total_over_subjects"].items())
            )

    # 3. fisher frames ---------------------------------------------------------------
    fisher_rows = {}
    if not args.only:
        for frames in (1, 3, 10):
            r = run_jaffe(model, "fisher", {"fisher_frames": frames}, data, None)
            fisher_rows[frames] = r
            log.info("fisher frames %2d: acc %.1f%%", frames, 100 * r["accuracy"])
        out["fisher_frames"] = fisher_rows
        base = results["source"]["per_subject"]
        lines += [
            "",
            "## fisher: frames used for the Fisher estimate",
            "",
            "| fisher_frames | acc | UAR | worst subject change | state bytes | most-picked |",
            "|---|---|---|---|---|---|",
        ]
        for frames, r in fisher_rows.items():
            deltas = {s: r["per_subject"][s] - base[s] for s in subjects}
            worst = min(deltas, key=lambda s: deltas[s])
            top = list(r["picked_total_over_subjects"].items())[:3]
            lines.append(
                f"| {frames} | {100 * r['accuracy']:.1f} | {100 * r['uar']:.1f} | "
                f"{100 * deltas[worst]:+.1f} ({worst}) | {r['state_bytes_mean']:.0f} | "
                + ", ".join(f"{k} {v}" for k, v in top)
                + " |"
            )
    lines += ["", "Command: `python experiments/feature_strategies.py`", ""]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "feature_strategies" if not args.only else "feature_strategies_partial"
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(json.dumps(out, indent=1, default=str))
    log.info("wrote %s", args.out / f"{stem}.md")


if __name__ == "__main__":
    main()
