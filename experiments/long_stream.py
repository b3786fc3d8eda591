"""Long label-correlated streams with and without the collapse guard; neutral calibration.

Part 1 (``--part stream``): the fer mini-XCEPTION adapts to long streams made of long runs
of one expression, where entropy minimisation is known to collapse:

* JAFFE: per subject, the images sorted by expression, each repeated ``--repeats`` times
  with small augmentations (brightness, contrast, noise, 1-pixel shifts), so a run of one
  expression lasts 3-4 images x repeats frames;
* SynthFace: target subjects' natural-order videos (expression clips of 60-90 frames).

``tent`` and ``sar`` run with aggressive learning rates and no gates (so that collapse
really happens without a guard), each with and without ``CollapseGuard()`` (defaults);
the frozen model is the floor. Accuracy is reported along the stream (each subject's
stream cut into ten equal segments, pooled over subjects) and overall.

Part 2 (``--part calib``): SynthFace target subjects with a resting-face bias; accuracy per
subject of ``norm`` and ``tent`` (defaults) without calibration, with ``Personalizer.calibrate``
of the BN statistics only (``neutral_label=None``) and with statistics plus the neutral logit
offset (the default), on a 48-frame neutral recording of the same session's capture; and the
frozen model with the offset alone (``source``).

    python experiments/long_stream.py --part calib --tag calib   # part 2 only, about 2 min

    python experiments/long_stream.py              # both parts, about 20 min on 2 busy cores
    python experiments/long_stream.py --quick      # a small smoke run

Writes ``experiments/results/long_stream.{json,md}`` (``--quick``: ``*_quick``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import ttaperso
from ttaperso.guards import CollapseGuard
from ttaperso.streams import read_jaffe
from ttaperso.synthface import SynthFace

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 8
SEGMENTS = 10

#: aggressive settings under which TENT/SAR drift on correlated streams without a guard
AGGRESSIVE: dict[str, dict[str, Any]] = {
    "tent": {"lr": 5e-3, "update_every": 8, "gates": ()},
    "sar": {"lr": 5e-2, "update_every": 8, "gates": ()},
}


#: guard settings compared: off, the defaults, and stricter thresholds
GUARDS: dict[str, CollapseGuard | None] = {
    "": None,
    "guard": CollapseGuard(),
    "strict guard": CollapseGuard(dominance=0.4, max_divergence=0.5),
}
DEFAULT_CONFIGS = ["frozen", "tent", "tent + guard", "sar", "sar + guard"]


def augmented_repeats(images: Tensor, repeats: int, seed: int) -> Tensor:
    """Each image ``repeats`` times with small photometric jitter and 1-pixel shifts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for image in images:
        for _ in range(repeats):
            x = image * (0.95 + 0.1 * torch.rand(1, generator=g))
            x = x + 0.08 * (torch.rand(1, generator=g) - 0.5)
            x = x + 0.01 * torch.randn(x.shape, generator=g)
            dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
            out.append(torch.roll(x, shifts=(dy, dx), dims=(-2, -1)).clamp(0.0, 1.0))
    return torch.stack(out)


def jaffe_streams(repeats: int, limit: int | None) -> list[tuple[str, Tensor, Tensor]]:
    """(subject, images in [0, 1], labels), images sorted by expression and repeated."""
    out = []
    for i, stream in enumerate(read_jaffe()[:limit]):
        order = torch.argsort(stream.labels, stable=True)
        images = augmented_repeats(stream.images[order], repeats, seed=i)
        labels = stream.labels[order].repeat_interleave(repeats)
        out.append((f"jaffe-{stream.subject}", images, labels))
    return out


def synthface_streams(n: int, frames: tuple[int, int]) -> list[tuple[str, Tensor, Tensor]]:
    sf = SynthFace(seed=0)
    out = []
    for identity in sf.sample_subjects(n, split="target"):
        s = sf.subject_stream(identity, sessions=1, repeats=2, frames_per_clip=frames)
        out.append((f"synthface-{identity.id}", s.images, s.labels))
    return out


def run_stream(p: ttaperso.Personalizer | None, model: Any, subject: str, x: Tensor) -> Tensor:
    """Predicted labels along the stream (predict then adapt, batches of BATCH)."""
    preds = []
    for chunk in x.split(BATCH):
        if p is None:
            with torch.no_grad():
                preds.append(model(chunk).argmax(1))
        else:
            preds.append(p.predict(chunk, subject).labels)
    return torch.cat(preds)


def segment_accuracy(pred: Tensor, target: Tensor) -> list[tuple[int, int]]:
    """(correct, total) in each of SEGMENTS equal parts of one stream."""
    bounds = torch.linspace(0, len(target), SEGMENTS + 1).long().tolist()
    return [
        (int((pred[a:b] == target[a:b]).sum()), b - a)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def part_stream(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    datasets = {
        "jaffe": jaffe_streams(args.repeats, 2 if args.quick else None),
        "synthface": synthface_streams(1 if args.quick else 2, (60, 90)),
    }
    configs: dict[str, Callable[[], ttaperso.Personalizer | None]] = {"frozen": lambda: None}
    for name in ("tent", "sar"):
        for guard_name, guard in GUARDS.items():
            label = f"{name}{' + ' + guard_name if guard_name else ''}"
            opts = dict(AGGRESSIVE[name])
            if guard is not None:
                opts["guard"] = guard
            configs[label] = lambda name=name, opts=opts: ttaperso.Personalizer(model, name, **opts)
    configs = {k: v for k, v in configs.items() if k in args.configs}
    results: dict[str, Any] = {}
    for dataset, streams in datasets.items():
        frames = sum(len(t) for _, _, t in streams)
        print(f"{dataset}: {len(streams)} subjects, {frames} frames")
        results[dataset] = {"subjects": len(streams), "frames": frames, "configs": {}}
        for label, make in configs.items():
            start = time.time()
            p = make()
            segments = [[0, 0] for _ in range(SEGMENTS)]
            per_subject = {}
            trips = 0
            for subject, images, labels in streams:
                pred = run_stream(p, model, subject, model.prepare(images))
                per_subject[subject] = float((pred == labels).float().mean())
                for k, (c, t) in enumerate(segment_accuracy(pred, labels)):
                    segments[k][0] += c
                    segments[k][1] += t
                if p is not None and p.config.guard is not None:
                    trips += int(p.state_dict(subject)["memory/guard.trips"])
            correct = sum(c for c, _ in segments)
            row = {
                "accuracy": correct / frames,
                "segments": [c / t for c, t in segments],
                "per_subject": per_subject,
                "guard_trips": trips,
                "seconds": time.time() - start,
            }
            results[dataset]["configs"][label] = row
            print(
                f"  {label:<12} acc {row['accuracy']:.3f} trips {trips:3d} "
                f"segments {' '.join(f'{a:.2f}' for a in row['segments'])} "
                f"({row['seconds']:.0f} s)",
                flush=True,
            )
    return results


def part_calib(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    sf = SynthFace(seed=0)
    people = [i for i in sf.sample_subjects(12, split="target") if i.resting_face != "none"]
    people = people[: 2 if args.quick else 5]
    out: dict[str, Any] = {}
    pooled: dict[str, list[int]] = {}
    neutral_index = list(model.labels).index("neutral")
    for identity in people:
        stream = sf.subject_stream(identity, sessions=1, frames_per_clip=(24, 48))
        neutral = sf.subject_stream(
            identity, sessions=1, expressions=("neutral",), frames_per_clip=(48, 48)
        )
        x, y = model.prepare(stream.images), stream.labels
        rest = model.prepare(neutral.images)
        row: dict[str, float] = {}
        with torch.no_grad():
            row["frozen"] = float((model(x).argmax(1) == y).float().mean())
            row["frozen on neutral recording: share predicted neutral"] = float(
                (model(rest).argmax(1) == neutral_index).float().mean()
            )
        # calibration variants: none, BN statistics only, statistics + the neutral logit
        # offset (the offset alone for `source`, which keeps no statistics)
        variants = {
            "source": [("source + offset", {})],
            "norm": [
                ("norm", None),
                ("norm + calibrate statistics", {"neutral_label": None}),
                ("norm + calibrate statistics and offset", {}),
                # sensitivity to the a-priori margin (not used to choose the default)
                ("norm + calibrate statistics and offset, margin 0", {"margin": 0.0}),
            ],
            "tent": [
                ("tent", None),
                ("tent + calibrate statistics", {"neutral_label": None}),
                ("tent + calibrate statistics and offset", {}),
            ],
        }
        for name, runs in variants.items():
            for label, calib in runs:
                p = ttaperso.Personalizer(model, name)
                if calib is not None:
                    p.calibrate("s", rest, **calib)
                pred = run_stream(p, model, "s", x)
                row[label] = float((pred == y).float().mean())
                # pooled over subjects: neutral frames vs expressive frames
                is_neutral = y == neutral_index
                tally = pooled.setdefault(label, [0, 0, 0, 0])
                tally[0] += int((pred[is_neutral] == neutral_index).sum())
                tally[1] += int(is_neutral.sum())
                tally[2] += int((pred[~is_neutral] == y[~is_neutral]).sum())
                tally[3] += int((~is_neutral).sum())
        out[identity.id] = {"resting_face": identity.resting_face, "frames": len(y), **row}
        print(identity.id, identity.resting_face, {k: round(v, 3) for k, v in row.items()})
    out["pooled"] = {
        label: {
            "neutral_frames": t[1],
            "neutral_recall": t[0] / max(t[1], 1),
            "expressive_frames": t[3],
            "expressive_accuracy": t[2] / max(t[3], 1),
        }
        for label, t in pooled.items()
    }
    return out


def to_markdown(results: dict[str, Any]) -> str:
    lines = ["# Long label-correlated streams and neutral calibration", ""]
    lines.append(f"Command: `{results['command']}`")
    for dataset, block in results.get("stream", {}).items():
        lines += [
            "",
            f"## {dataset}: {block['subjects']} subjects, {block['frames']} frames, "
            f"batches of {BATCH}",
            "",
            "| config | accuracy | guard trips | accuracy by tenth of the stream |",
            "|---|---|---|---|",
        ]
        for label, row in block["configs"].items():
            seg = " ".join(f"{a:.2f}" for a in row["segments"])
            lines.append(f"| {label} | {row['accuracy']:.3f} | {row['guard_trips']} | {seg} |")
    if "calib" in results:
        lines += ["", "## Neutral calibration, SynthFace target subjects with a resting-face bias"]
        rows = {k: v for k, v in results["calib"].items() if k != "pooled"}
        keys = [k for k in next(iter(rows.values())) if k not in ("resting_face", "frames")]
        lines += ["", "| subject | resting face | frames | " + " | ".join(keys) + " |"]
        lines.append("|---" * (3 + len(keys)) + "|")
        for sid, row in rows.items():
            values = " | ".join(f"{row[k]:.3f}" for k in keys)
            lines.append(f"| {sid} | {row['resting_face']} | {row['frames']} | {values} |")
        means = " | ".join(f"{sum(r[k] for r in rows.values()) / len(rows):.3f}" for k in keys)
        lines.append(f"| mean | | | {means} |")
        pooled = results["calib"].get("pooled", {})
        if pooled:
            lines += [
                "",
                "Pooled over the subjects: frames labelled neutral (onsets, offsets, neutral "
                "clips) vs expressive frames.",
                "",
                "| config | neutral recall | expressive accuracy |",
                "|---|---|---|",
            ]
            for label, t in pooled.items():
                lines.append(
                    f"| {label} | {t['neutral_recall']:.3f} ({t['neutral_frames']} frames) | "
                    f"{t['expressive_accuracy']:.3f} ({t['expressive_frames']} frames) |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["stream", "calib", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=6, help="JAFFE repeats per image")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=DEFAULT_CONFIGS,
        help="stream configs to run (also: 'tent + strict guard', 'sar + strict guard')",
    )
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ttaperso.load_model("fer-mini-xception")
    results: dict[str, Any] = {
        "command": "python experiments/long_stream.py"
        + (f" --part {args.part}" if args.part != "both" else "")
        + (f" --repeats {args.repeats}" if args.repeats != 6 else "")
        + (" --quick" if args.quick else "")
        + (
            " --configs " + " ".join(repr(c) for c in args.configs)
            if args.configs != DEFAULT_CONFIGS
            else ""
        )
        + (f" --tag {args.tag}" if args.tag else ""),
        "guards": {k or "off": None if g is None else g.to_dict() for k, g in GUARDS.items()},
        "aggressive": {k: {**v, "gates": []} for k, v in AGGRESSIVE.items()},
    }
    if args.part in ("stream", "both"):
        results["stream"] = part_stream(args, model)
    if args.part in ("calib", "both"):
        results["calib"] = part_calib(args, model)
    RESULTS.mkdir(exist_ok=True)
    stem = (
        "long_stream"
        + ("_quick" if args.quick else "")
        + (f"_{args.part}" if args.part != "both" else "")
        + (f"_{args.tag}" if args.tag else "")
    )
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{stem}.md").write_text(to_markdown(results))
    print(to_markdown(results))


if __name__ == "__main__":
    main()
