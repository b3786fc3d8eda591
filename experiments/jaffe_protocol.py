"""JAFFE per-subject personalization study (FACTS.md section 4 protocol).

Every subject is its own stream starting from the frozen fer mini-XCEPTION, its images in
a shuffled order (seed 0), fed in batches of 16 (or one frame at a time with
``--frame-by-frame``), predict then adapt. Reports accuracy and UAR over all images,
per-subject accuracy and the worst subject's change against the frozen model.

    python experiments/jaffe_protocol.py                     # batches of 16
    python experiments/jaffe_protocol.py --frame-by-frame    # N = 1 per call

UAR here is sklearn's balanced accuracy: the mean recall over the classes present in the
targets (JAFFE has all 7 classes, so it is the plain mean of 7 recalls).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ttaperso
from ttaperso.adapters.fer_mini_xception import preprocess_gray
from ttaperso.data import JAFFE_EXPRESSIONS, data_root
from ttaperso.faces import crop_face_like_fer, load_gray

log = logging.getLogger("jaffe")

REPO = Path(__file__).resolve().parents[1]

# name -> (strategy, overrides). "authors" rows reproduce the reference code's settings:
# pure batch statistics, no gates, one update per batch of 16.
AUTHORS = {"source_prior": 0.0, "accumulate": False}
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "source": ("source", {}),
    "norm (authors: batch stats)": ("norm", AUTHORS),
    "tent (authors: Adam 1e-3)": ("tent", {**AUTHORS, "gates": [], "update_every": 1, "lr": 1e-3}),
    "tent (authors: Adam 1e-4)": ("tent", {**AUTHORS, "gates": [], "update_every": 1, "lr": 1e-4}),
    "sar (authors)": ("sar", {**AUTHORS, "update_every": 1}),
    "norm (default)": ("norm", {}),
    "tent (default)": ("tent", {}),
    "sar (default)": ("sar", {}),
}


def load_jaffe(root: Path, labels: tuple[str, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Subject -> (frames (N,1,64,64) in [-1,1], label indices), faces cropped as fer does."""
    folder = root / "jaffe"
    if not folder.is_dir():
        raise SystemExit(f"JAFFE not found at {folder} (pass --data or set TTAPERSO_DATA)")
    frames: dict[str, list[torch.Tensor]] = defaultdict(list)
    targets: dict[str, list[int]] = defaultdict(list)
    missed = []
    for path in sorted(folder.glob("*.tiff")):
        subject, code = path.name.split(".")[:2]
        label = labels.index(JAFFE_EXPRESSIONS[code[:2]])
        face = crop_face_like_fer(load_gray(path))
        if face is None:
            missed.append(path.name)
            continue
        frames[subject].append(preprocess_gray(face))
        targets[subject].append(label)
    if missed:
        log.warning("no face found in %d JAFFE images: %s", len(missed), missed)
    return {s: (torch.cat(frames[s]), torch.tensor(targets[s])) for s in sorted(frames)}


def uar(pred: np.ndarray, target: np.ndarray) -> float:
    classes = np.unique(target)
    return float(np.mean([(pred[target == c] == c).mean() for c in classes]))


def run_config(
    model, strategy: str, overrides: dict[str, Any], data, batch: int, seed: int
) -> dict[str, Any]:
    """One Personalizer, every subject its own stream; returns per-subject predictions."""
    p = ttaperso.Personalizer(model, strategy, **overrides)
    per_subject = {}
    preds_all, targets_all = [], []
    start = time.perf_counter()
    for subject, (x, y) in data.items():
        order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
        x, y = x[order], y[order]
        preds = []
        for i in range(0, len(y), batch):
            preds.append(p.predict(x[i : i + batch], subject=subject).labels)
        pred = torch.cat(preds).numpy()
        per_subject[subject] = float((pred == y.numpy()).mean())
        preds_all.append(pred)
        targets_all.append(y.numpy())
    elapsed = time.perf_counter() - start
    pred, target = np.concatenate(preds_all), np.concatenate(targets_all)
    extra = {}
    if strategy == "sar":
        extra["sar_resets"] = {s: int(p.state_dict(s)["memory/sar.resets"]) for s in data}
    return {
        "accuracy": float((pred == target).mean()),
        "uar": uar(pred, target),
        "per_subject": per_subject,
        "seconds": elapsed,
        "config": p.config.to_dict(),
        **extra,
    }


def markdown(results: dict[str, dict[str, Any]], subjects: list[str], title: str) -> str:
    base = results["source"]["per_subject"]
    lines = [
        f"### {title}",
        "",
        "| config | acc | UAR | worst subject change | " + " | ".join(subjects) + " |",
        "|---|---|---|---|" + "---|" * len(subjects),
    ]
    for name, r in results.items():
        deltas = {s: r["per_subject"][s] - base[s] for s in subjects}
        worst = min(deltas, key=deltas.get)
        lines.append(
            f"| {name} | {100 * r['accuracy']:.1f} | {100 * r['uar']:.1f} | "
            f"{100 * deltas[worst]:+.1f} ({worst}) | "
            + " | ".join(f"{100 * r['per_subject'][s]:.0f}" for s in subjects)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=data_root())
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frame-by-frame", action="store_true", help="feed one frame per call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="also report mean/std accuracy over this many stream orders (seeds 0..k-1)",
    )
    parser.add_argument("--only", nargs="*", help="config names to run (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    model = ttaperso.load_model("fer-mini-xception")
    data = load_jaffe(args.data, model.labels)
    batch = 1 if args.frame_by_frame else args.batch
    results = {}
    for name, (strategy, overrides) in CONFIGS.items():
        if args.only and name not in args.only and name != "source":
            continue
        results[name] = run_config(model, strategy, overrides, data, batch, args.seed)
        log.info(
            "%-30s acc %.1f%%  UAR %.1f%%  (%.1fs)",
            name,
            100 * results[name]["accuracy"],
            100 * results[name]["uar"],
            results[name]["seconds"],
        )
    seed_lines = []
    if args.seeds > 1:
        seed_lines = [
            "",
            f"Accuracy over {args.seeds} stream orders (seeds 0..{args.seeds - 1}):",
            "",
            "| config | mean acc | std | min | max |",
            "|---|---|---|---|---|",
        ]
        for name, (strategy, overrides) in CONFIGS.items():
            if name not in results:
                continue
            accs = [
                results[name]["accuracy"]
                if s == args.seed
                else run_config(model, strategy, overrides, data, batch, s)["accuracy"]
                for s in range(args.seeds)
            ]
            results[name]["accuracy_over_seeds"] = accs
            seed_lines.append(
                f"| {name} | {100 * np.mean(accs):.1f} | {100 * np.std(accs):.1f} | "
                f"{100 * min(accs):.1f} | {100 * max(accs):.1f} |"
            )
            log.info("%-30s over seeds: %s", name, [round(100 * a, 1) for a in accs])
    mode = "frame-by-frame" if args.frame_by_frame else f"batches of {batch}"
    title = f"JAFFE, fer mini-XCEPTION, {sum(len(v[1]) for v in data.values())} images, {mode}, seed {args.seed}"
    table = markdown(results, list(data), title) + "\n".join(seed_lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"jaffe_core_{'frame' if args.frame_by_frame else f'batch{batch}'}"
    (args.out / f"{stem}.md").write_text(
        table
        + f"\nCommand: `python experiments/jaffe_protocol.py{' --frame-by-frame' if args.frame_by_frame else ''}"
        f" --seeds {args.seeds}`\n"
    )
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
