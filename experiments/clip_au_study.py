"""CLIP-AU / clip_autt study: state size, step time, AU correlation, clip_autt vs frozen.

Parts (each prints its figures and they are written to experiments/results/clip_au_study.*):

1. ``cost``: per-subject state bytes and CPU time (1 thread) of a ``clip_autt`` predict call
   without and with an AdamW step, and of the text encoder over all AU prompts, for
   ViT-B-32 (random weights: timing only) and the tiny test model. Repetitions interleaved.
2. ``synthface``: a tiny CLIP-AU (32x32 gray, image tower + AU offsets + temporal head) trained
   briefly on SynthFace source subjects with expression labels and AU intensities; Pearson
   correlation of each AU activation with the true AU intensity on held-out target subjects
   (and for the untrained model); then ``clip_autt`` vs the frozen CLIP-AU on SynthFace target
   subjects (shifted sessions, natural order), both streamed in chunks through the same
   causal-context code path (the frozen run is ``clip_autt`` with no update).

    python experiments/clip_au_study.py               # both parts (about 10 min on 2 busy cores)
    python experiments/clip_au_study.py --part cost
    python experiments/clip_au_study.py --part synthface --targets 6
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import ttaperso
from ttaperso.adapters.open_clip_fer import CLIPFER, tiny_clip_config
from ttaperso.clip_au import CLIPAUModel
from ttaperso.clip_au.train import TrainConfig, train_clip_au
from ttaperso.metrics import accuracy, uar

RESULTS = Path(__file__).parent / "results"


# ------------------------------------------------------------------ part 1: cost
def _clip_au(arch: str) -> CLIPAUModel:
    if arch == "tiny":
        clip = CLIPFER(None, config=tiny_clip_config(image_size=32), channels=1, seed=0)
    else:
        clip = CLIPFER(arch, seed=0)
    torch.manual_seed(1)
    return CLIPAUModel(clip)


def measure_cost(arch: str, reps: int) -> dict[str, Any]:
    """State bytes and interleaved timings of one ``clip_autt`` subject on ``arch``."""
    model = _clip_au(arch)
    c, h, w = model.input_shape
    frames = torch.rand(64, c, h, w)
    p = ttaperso.Personalizer(model, "clip_autt", update_every=2)
    ctx_shape = tuple(p.strategy.initial_state().params["ctx"].shape)
    for i in range(32):  # fill the subject's frame memory (32 frames)
        p.predict(frames[i : i + 1], "S")
    times: dict[str, list[float]] = {"predict_no_step": [], "predict_with_step": [], "text": []}
    for r in range(reps):
        # pending is 0 after the warm-up's last step: frame 1 predicts, frame 2 also steps
        t0 = time.perf_counter()
        p.predict(frames[32 + 2 * r : 33 + 2 * r], "S")
        t1 = time.perf_counter()
        p.predict(frames[33 + 2 * r : 34 + 2 * r], "S")
        t2 = time.perf_counter()
        with torch.no_grad():
            model.au_text_from_context(model.context_init())
        t3 = time.perf_counter()
        times["predict_no_step"].append(t1 - t0)
        times["predict_with_step"].append(t2 - t1)
        times["text"].append(t3 - t2)
    state = p.state_dict("S")
    return {
        "arch": arch,
        "parameters": sum(t.numel() for t in model.parameters()),
        "aus": len(model.aus),
        "ctx_shape": list(ctx_shape),
        "ctx_parameters": math.prod(ctx_shape),
        "state_bytes": p.state_nbytes("S"),
        "state_bytes_by_key": {k: v.numel() * v.element_size() for k, v in state.items()},
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "reps": reps,
    }


# ------------------------------------------------------------------ part 2: SynthFace
def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom > 0 else float("nan")


@torch.no_grad()
def au_correlations(model: CLIPAUModel, streams: list, au_ids: tuple[int, ...]) -> dict[str, float]:
    """Pearson r between each AU activation and the true intensity, pooled over frames."""
    acts, truth = [], []
    for s in streams:
        acts.append(model.au_activations(model.features(model.prepare(s.images))))
        truth.append(s.extras["au"])
    a, t = torch.cat(acts), torch.cat(truth)
    out = {}
    for col, au in enumerate(au_ids):
        if au in model.au_ids and float(t[:, col].std()) > 0:
            out[f"AU{au}"] = _pearson(a[:, model.au_ids.index(au)], t[:, col])
    return out


def run_stream(
    p: ttaperso.Personalizer, model: CLIPAUModel, stream: Any, chunk: int
) -> torch.Tensor:
    x = model.prepare(stream.images)
    return torch.cat([p.predict(c, stream.subject).labels for c in x.split(chunk)])


def synthface_part(args: argparse.Namespace) -> dict[str, Any]:
    from ttaperso.synthface import AU_IDS, EXPRESSIONS, SynthFace

    faces = SynthFace(seed=args.seed, size=args.size)
    sources = [
        faces.subject_stream(person, sessions=1)
        for person in faces.sample_subjects(args.sources, split="source")
    ]
    heldout = [
        faces.subject_stream(person, sessions=1)
        for person in faces.sample_subjects(args.heldout, split="source", start=args.sources)
    ]
    targets = [
        faces.subject_stream(person, sessions=2)
        for person in faces.sample_subjects(args.targets, split="target")
    ]
    config = tiny_clip_config(image_size=args.size, width=args.width)
    config["vision_cfg"].update(patch_size=args.patch, layers=args.layers)
    clip = CLIPFER(None, labels=EXPRESSIONS, config=config, channels=1, seed=args.seed)
    torch.manual_seed(args.seed + 1)
    model = CLIPAUModel(clip, EXPRESSIONS)
    untrained_r = au_correlations(model, targets, AU_IDS)
    t0 = time.perf_counter()
    history = train_clip_au(
        model,
        sources,
        au_ids=AU_IDS,
        config=TrainConfig(
            epochs=args.epochs,
            lr=args.lr,
            train_vision=True,
            balanced=args.balanced,
            seed=args.seed,
        ),
    )
    train_s = time.perf_counter() - t0
    source_r = au_correlations(model, sources, AU_IDS)
    heldout_r = au_correlations(model, heldout, AU_IDS)
    target_r = au_correlations(model, targets, AU_IDS)
    runs: dict[str, dict[str, Any]] = {}
    settings = {"frozen": {"update_every": 10**9}}
    for lr in args.lrs:
        settings[f"clip_autt lr={lr:g}"] = {"lr": lr}
    n = len(EXPRESSIONS)
    for name, overrides in settings.items():
        p = ttaperso.Personalizer(model, "clip_autt", **overrides)
        per_subject, preds_all, labels_all = {}, [], []
        start = time.perf_counter()
        for s in targets:
            preds = run_stream(p, model, s, args.chunk)
            per_subject[s.subject] = {
                "accuracy": accuracy(preds, s.labels, n),
                "uar": uar(preds, s.labels, n),
            }
            preds_all.append(preds)
            labels_all.append(s.labels)
        preds, labels = torch.cat(preds_all), torch.cat(labels_all)
        runs[name] = {
            "accuracy": accuracy(preds, labels, n),
            "uar": uar(preds, labels, n),
            "per_subject": per_subject,
            "seconds": time.perf_counter() - start,
        }
        print(f"{name}: accuracy {runs[name]['accuracy']:.4f} UAR {runs[name]['uar']:.4f}")
    frozen = runs["frozen"]["per_subject"]
    for run in runs.values():
        deltas = [run["per_subject"][s]["accuracy"] - frozen[s]["accuracy"] for s in frozen]
        run["worst_subject_delta_accuracy"] = min(deltas)
        run["best_subject_delta_accuracy"] = max(deltas)
    return {
        "sources": args.sources,
        "targets": args.targets,
        "frames_source": sum(len(s.labels) for s in sources),
        "frames_target": sum(len(s.labels) for s in targets),
        "epochs": args.epochs,
        "train_seconds": train_s,
        "train_history": history,
        "au_correlation_untrained_target": untrained_r,
        "au_correlation_trained_source": source_r,
        "au_correlation_trained_heldout_source": heldout_r,
        "heldout": args.heldout,
        "vision": {"patch": args.patch, "width": args.width, "layers": args.layers},
        "size": args.size,
        "balanced": args.balanced,
        "parameters": sum(t.numel() for t in model.parameters()),
        "au_correlation_trained_target": target_r,
        "chunk": args.chunk,
        "runs": runs,
    }


# ------------------------------------------------------------------ report
def _mean(values: dict[str, float]) -> float:
    finite = [v for v in values.values() if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def write_markdown(results: dict[str, Any], path: Path) -> None:
    lines = ["# CLIP-AU / clip_autt study", "", f"Command: `{results['command']}`", ""]
    for row in results.get("cost", []):
        m = row["median_s"]
        lines += [
            f"## Cost: {row['arch']} ({row['parameters']:,} parameters, {row['aus']} AUs), "
            "CPU, 1 thread",
            "",
            f"- context vectors {row['ctx_shape']} = {row['ctx_parameters']:,} parameters",
            f"- subject state {row['state_bytes']:,} bytes (ctx + AdamW moments + 32-frame "
            "embedding memory + counters)",
            f"- predict 1 frame, no step: {m['predict_no_step'] * 1000:.1f} ms; with an AdamW "
            f"step: {m['predict_with_step'] * 1000:.1f} ms; text encoder over all AU prompts "
            f"(no grad): {m['text'] * 1000:.1f} ms (medians of {row['reps']})",
            "",
        ]
    sf = results.get("synthface")
    if sf:
        lines += [
            f"## SynthFace ({sf['sources']} source subjects / {sf['frames_source']} frames for "
            f"training, {sf['targets']} target subjects / {sf['frames_target']} frames)",
            "",
            f"Small CLIP-AU ({sf['parameters']:,} parameters, {sf['size']}x{sf['size']} gray, "
            f"vision {sf['vision']}, balanced CE {sf['balanced']}) trained {sf['epochs']} "
            f"epochs ({sf['train_seconds']:.0f} s); "
            f"final frame accuracy on source clips {sf['train_history'][-1]['accuracy']:.3f}.",
            "",
            "AU activation vs true AU intensity, Pearson r over frames:",
            "",
            f"| AU | untrained (target) | trained: training subjects | trained: "
            f"{sf['heldout']} held-out source subjects | trained: target subjects (shifted) |",
            "|---|---|---|---|---|",
        ]
        keys = (
            "au_correlation_untrained_target",
            "au_correlation_trained_source",
            "au_correlation_trained_heldout_source",
            "au_correlation_trained_target",
        )
        for au in sf["au_correlation_trained_target"]:
            cells = " | ".join(f"{sf[k].get(au, float('nan')):.3f}" for k in keys)
            lines.append(f"| {au} | {cells} |")
        lines.append("| mean | " + " | ".join(f"{_mean(sf[k]):.3f}" for k in keys) + " |")
        lines += [
            "",
            f"Target subjects streamed in chunks of {sf['chunk']} frames (natural order):",
            "",
            "| run | accuracy | UAR | worst / best subject vs frozen (accuracy) |",
            "|---|---|---|---|",
        ]
        for name, run in sf["runs"].items():
            lines.append(
                f"| {name} | {run['accuracy']:.4f} | {run['uar']:.4f} | "
                f"{run['worst_subject_delta_accuracy']:+.4f} / "
                f"{run['best_subject_delta_accuracy']:+.4f} |"
            )
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["all", "cost", "synthface"], default="all")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sources", type=int, default=6)
    parser.add_argument("--targets", type=int, default=6)
    parser.add_argument("--heldout", type=int, default=4, help="held-out source subjects")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--size", type=int, default=32, help="SynthFace frame and model input size")
    parser.add_argument("--patch", type=int, default=4, help="vision patch size")
    parser.add_argument("--balanced", action="store_true", help="class-balanced cross-entropy")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="clip_au_study")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import sys

    results: dict[str, Any] = {
        "command": "python " + " ".join(["experiments/clip_au_study.py", *sys.argv[1:]])
    }
    if args.part in ("all", "cost"):
        results["cost"] = []
        for arch in ("tiny", "ViT-B-32"):
            row = measure_cost(arch, args.reps)
            print(json.dumps(row["median_s"]), arch, row["state_bytes"])
            results["cost"].append(row)
    if args.part in ("all", "synthface"):
        results["synthface"] = synthface_part(args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=1))
    write_markdown(results, RESULTS / f"{args.out}.md")
    print((RESULTS / f"{args.out}.md").read_text())


if __name__ == "__main__":
    main()
