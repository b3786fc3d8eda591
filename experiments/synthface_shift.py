"""SynthFace: the demo source model's accuracy across the shift, generator speed, and the
TemporalGate on natural-order streams.

    python experiments/synthface_shift.py            # full demo plan (trains/caches the model)
    python experiments/synthface_shift.py --quick    # the demo's quick plan

Measures, with the demo's source model (``ttaperso.demo.source_model``, cached weights):

1. frozen accuracy on the training subjects, on held-out source subjects, on the target
   subjects filmed with the nominal capture (identity/idiosyncrasy shift only) and in their
   shifted sessions (the demo's targets);
2. generator frames/s on one thread at 64x64 and 32x32 (whole ``subject_stream`` calls:
   dynamics + rendering + capture), interleaved repeats, median;
3. ``norm`` and ``tent`` with and without ``TemporalGate()`` and output smoothing 5 on the
   demo's target streams (natural order, 8 frames per call, and one frame per call).

Writes ``experiments/results/synthface_shift.json`` and ``.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ttaperso import Personalizer, TemporalGate
from ttaperso.demo import (
    DEMO_BATCH,
    IMAGE_SIZE,
    PLANS,
    as_fer_model,
    demo_data,
    source_model,
    source_sample,
    stream_accuracy,
)
from ttaperso.gates import EntropyGate
from ttaperso.synthface import SynthFace

RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def frozen(model: Any, streams: list) -> float:
    hits = sum(int((model(model.prepare(s.images)).argmax(1) == s.labels).sum()) for s in streams)
    return hits / sum(len(s) for s in streams)


def generator_speed(seed: int, repeats: int = 3) -> dict[str, float]:
    """Median frames/s of ``subject_stream`` (2 shifted sessions) per size, interleaved: per
    wall-clock second and per CPU second of this process (the latter barely depends on how
    busy the shared machine is)."""
    wall: dict[int, list[float]] = {64: [], 32: []}
    cpu: dict[int, list[float]] = {64: [], 32: []}
    for r in range(repeats):
        for size in wall:
            sf = SynthFace(seed + r, size=size)
            people = sf.sample_subjects(4, "target")
            t0, c0 = time.perf_counter(), time.process_time()
            n = sum(len(sf.subject_stream(p, sessions=2)) for p in people)
            wall[size].append(n / (time.perf_counter() - t0))
            cpu[size].append(n / (time.process_time() - c0))
    out = {f"{s}x{s} per wall s": statistics.median(v) for s, v in wall.items()}
    out.update({f"{s}x{s} per CPU s": statistics.median(v) for s, v in cpu.items()})
    return out


def gate_study(model: Any, streams: list, source: Any) -> dict[str, dict[str, float]]:
    configs: dict[str, dict[str, Any]] = {
        "norm (default)": {},
        "norm + TemporalGate": {"gates": [TemporalGate()]},
        "norm + smoothing 5": {"smoothing": 5},
        "norm + TemporalGate + smoothing 5": {"gates": [TemporalGate()], "smoothing": 5},
        "tent (default: EntropyGate)": {},
        "tent + TemporalGate": {"gates": [EntropyGate(), TemporalGate()]},
        "tent + smoothing 5": {"smoothing": 5},
        "tent + TemporalGate + smoothing 5": {
            "gates": [EntropyGate(), TemporalGate()],
            "smoothing": 5,
        },
    }
    out: dict[str, dict[str, float]] = {}
    for batch in (DEMO_BATCH, 1):
        for name, options in configs.items():
            strategy = name.split()[0]
            p = Personalizer(model, strategy, source=source, **options)
            rows = [stream_accuracy(p, model, s, batch) for s in streams]
            key = f"{name}, {batch}/call"
            out[key] = {
                k: sum(r[k] for r in rows) / len(rows)
                for k in ("accuracy", "uar", "second_half", "updated")
            }
            out[key]["worst_subject"] = min(r["accuracy"] for r in rows)
            print(f"{key:50s} " + " ".join(f"{k} {v:.3f}" for k, v in out[key].items()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "synthface_shift")
    parser.add_argument(
        "--part", choices=["all", "speed"], default="all", help="speed: generator frames/s only"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.part == "speed":
        speed = generator_speed(args.seed)
        print("generator frames/s (1 thread):", {k: round(v) for k, v in speed.items()})
        return
    plan = PLANS["quick" if args.quick else "full"]
    data = demo_data(plan, args.seed)
    net, weights = source_model(plan, args.seed, data)
    model = as_fer_model(net)
    sf = SynthFace(args.seed, size=IMAGE_SIZE)
    nominal_targets = [
        sf.subject_stream(
            i, sessions=plan.target_sessions, shifted=False, frames_per_clip=plan.frames_per_clip
        )
        for i in data.target_ids
    ]
    accuracy = {
        "source subjects (training)": frozen(model, data.train),
        "source subjects (held out)": frozen(model, data.heldout),
        "target subjects, nominal capture": frozen(model, nominal_targets),
        "target subjects, shifted sessions (demo)": frozen(model, data.targets),
    }
    for k, v in accuracy.items():
        print(f"frozen accuracy, {k}: {v:.3f}")
    speed = generator_speed(args.seed)
    print("generator frames/s (1 thread):", {k: round(v) for k, v in speed.items()})
    source = source_sample(model, data.train, plan.source_sample)
    gates = gate_study(model, data.targets, source)
    results = {
        "seed": args.seed,
        "plan": "quick" if args.quick else "full",
        "model_weights": weights,
        "frozen_accuracy": accuracy,
        "generator_frames_per_s": speed,
        "gate_study": gates,
        "target_frames": sum(len(s) for s in data.targets),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"# SynthFace shift (seed {args.seed}, {results['plan']} demo plan)",
        "",
        "`python experiments/synthface_shift.py" + (" --quick" if args.quick else "") + "`",
        "",
        "| frozen demo model on | accuracy |",
        "|---|---|",
        *(f"| {k} | {v:.3f} |" for k, v in accuracy.items()),
        "",
        "Generator (whole `subject_stream`, 1 thread): "
        + ", ".join(f"{k}: {v:.0f} frames/s" for k, v in speed.items()),
        "",
        "| config (demo target streams, natural order) | accuracy | UAR | 2nd half | updated | worst subject |",
        "|---|---|---|---|---|---|",
        *(
            f"| {k} | {v['accuracy']:.3f} | {v['uar']:.3f} | {v['second_half']:.3f} | "
            f"{v['updated']:.2f} | {v['worst_subject']:.3f} |"
            for k, v in gates.items()
        ),
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
