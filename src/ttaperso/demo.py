"""The embedded demo behind ``ttaperso demo``: every strategy on SynthFace subjects, on CPU.

1. Train (or load from the cache) a small BatchNorm CNN on SynthFace *source* subjects
   (one nominal session each; the weights are cached as safetensors under
   ``$TTAPERSO_CACHE/demo``, keyed by a hash of the generator, the architecture and the
   training plan).
2. Personalize it to held-out *target* subjects: people with stronger idiosyncrasies
   (resting faces, weak or exaggerated or asymmetric expressions), recorded in sessions
   with capture shifts (lighting, exposure, gamma, contrast, noise, blur, pose,
   occluders). Each subject's video is streamed in natural order, :data:`DEMO_BATCH`
   consecutive frames per call, through one :class:`~ttaperso.Personalizer` per registered
   strategy (default config, given a labelled :class:`~ttaperso.SourceData` sample of the
   source subjects); a frame is scored by the prediction returned for it, made before
   that call's update. ``tent`` is also run one frame per call.
3. Print a per-subject table, write a PNG plot and a JSON file of the numbers.

A strategy that cannot run on this model (e.g. one that needs a CLIP model) is reported
as not applicable, with the reason, instead of stopping the demo. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import synthface
from .adapters.torch_classifier import TorchClassifier
from .cache import cache_root, load_cached_weights, save_cached_weights
from .errors import ModelInterfaceError, TTAPersoError
from .model import FERModel
from .personalizer import Personalizer
from .source_data import SourceData
from .strategies import list_strategies
from .streams.types import SubjectStream

__all__ = [
    "DEMO_BATCH",
    "IMAGE_SIZE",
    "PLANS",
    "DemoNet",
    "DemoPlan",
    "DemoData",
    "cache_dir",
    "demo_data",
    "source_model",
    "stream_accuracy",
    "format_table",
    "run_demo",
]

log = logging.getLogger(__name__)

DEMO_BATCH = 8
FRAME_BY_FRAME = "tent"  # the strategy also run one frame per call
#: frame side of the demo (SynthFace renders at this size directly; 32 px keeps training
#: on 2 CPU cores to about a minute while brows, lids and lips stay a few pixels wide)
IMAGE_SIZE = 32
#: index of the first held-out source subject (training subjects are 0, 1, ...)
HELDOUT_START = 10_000


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of a demo run.

    Attributes:
        train_subjects: source subjects the model is trained on (one session each).
        epochs: training epochs.
        heldout_subjects: other source subjects: the frozen model's in-domain accuracy.
        targets: target subjects the strategies personalize to.
        target_sessions: shifted sessions per target subject.
        frames_per_clip: clip lengths of the held-out and target streams (every session
            shows each expression once).
        train_frames_per_clip: clip lengths of the training streams (short clips: many
            people matter more than many near-identical frames of one person).
        source_sample: frames per source subject in the SourceData given to strategies.
    """

    train_subjects: int
    epochs: int
    heldout_subjects: int
    targets: int
    target_sessions: int
    frames_per_clip: tuple[int, int]
    train_frames_per_clip: tuple[int, int]
    source_sample: int = 24


PLANS: dict[str, DemoPlan] = {
    "full": DemoPlan(
        train_subjects=96,
        epochs=5,
        heldout_subjects=6,
        targets=6,
        target_sessions=2,
        frames_per_clip=(16, 32),
        train_frames_per_clip=(10, 16),
        source_sample=8,
    ),
    "quick": DemoPlan(
        train_subjects=12,
        epochs=6,
        heldout_subjects=2,
        targets=2,
        target_sessions=1,
        frames_per_clip=(12, 20),
        train_frames_per_clip=(12, 20),
        source_sample=8,
    ),
}

_TRAIN = {"batch_size": 64, "lr": 3e-3, "weight_decay": 1e-4}


class DemoNet(nn.Module):
    """A small BatchNorm CNN for ``(N, 1, 32, 32)`` frames in [-1, 1]; the linear head is ``fc``."""

    def __init__(self, num_classes: int = len(synthface.EXPRESSIONS), width: int = 12) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]

        self.body = nn.Sequential(
            *block(1, width),
            nn.MaxPool2d(2),
            *block(width, 2 * width),
            nn.MaxPool2d(2),
            *block(2 * width, 4 * width),
            nn.MaxPool2d(2),
            *block(4 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x))


def as_fer_model(net: nn.Module) -> FERModel:
    """The demo network as the runtime sees it: SynthFace labels, head ``fc``, input [-1, 1]."""
    return TorchClassifier(
        net,
        labels=synthface.EXPRESSIONS,
        input_shape=(1, IMAGE_SIZE, IMAGE_SIZE),
        head="fc",
        input_range=(-1.0, 1.0),
        name="synthface-demo-cnn",
    )


# ------------------------------------------------------------------------------ data
@dataclass
class DemoData:
    """The streams of a demo run (images in [0, 1], as SynthFace renders them)."""

    train: list[SubjectStream]
    heldout: list[SubjectStream]
    targets: list[SubjectStream]
    target_ids: list[synthface.Identity]


def demo_data(plan: DemoPlan, seed: int) -> DemoData:
    """Source training streams, held-out source streams and shifted target streams."""
    sf = synthface.SynthFace(seed, size=IMAGE_SIZE)
    clip = plan.frames_per_clip
    train = [
        sf.subject_stream(s, sessions=1, frames_per_clip=plan.train_frames_per_clip)
        for s in sf.sample_subjects(plan.train_subjects, "source")
    ]
    # held-out source subjects: same population and capture, never among the training ones
    heldout = [
        sf.subject_stream(s, sessions=1, frames_per_clip=clip)
        for s in sf.sample_subjects(plan.heldout_subjects, "source", start=HELDOUT_START)
    ]
    ids = sf.sample_subjects(plan.targets, "target")
    targets = [
        sf.subject_stream(s, sessions=plan.target_sessions, frames_per_clip=clip) for s in ids
    ]
    return DemoData(train, heldout, targets, ids)


def source_sample(model: FERModel, train: list[SubjectStream], per_subject: int) -> SourceData:
    """A labelled SourceData: ``per_subject`` evenly spaced frames of each training subject."""
    frames, labels, subjects = [], [], []
    for stream in train:
        idx = torch.linspace(0, len(stream) - 1, min(per_subject, len(stream))).round().long()
        frames.append(model.prepare(stream.images[idx]))
        labels.append(stream.labels[idx])
        subjects += [stream.subject] * len(idx)
    return SourceData(torch.cat(frames), torch.cat(labels), subjects)


# ------------------------------------------------------------------------------ cache
def cache_dir() -> Path:
    """Folder of the demo's cached weights: ``demo/`` in the weights cache (:mod:`ttaperso.cache`)."""
    return cache_root() / "demo"


def _code_digest() -> str:
    """Digest of the code the weights depend on: the generator and the training loop."""
    try:
        parts = [inspect.getsource(_train)]
        for name in ("facs", "identity", "render", "video"):
            parts.append(inspect.getsource(sys.modules[f"{synthface.__name__}.{name}"]))
        parts.append(inspect.getsource(synthface))
        code = "".join(parts)
    except (OSError, TypeError, KeyError):  # no source available (frozen install)
        code = synthface.GENERATOR_VERSION
    return hashlib.sha256(code.encode()).hexdigest()


def _cache_key(model: nn.Module, plan: DemoPlan, seed: int) -> str:
    """Hash of everything the trained weights depend on: generator, architecture, plan, seed."""
    h = hashlib.sha256(_CODE_DIGEST.encode())
    h.update(repr(model).encode())
    config = {
        "train_subjects": plan.train_subjects,
        "train_frames_per_clip": plan.train_frames_per_clip,
        "epochs": plan.epochs,
        "seed": seed,
        "train": _TRAIN,
        "size": IMAGE_SIZE,
    }
    h.update(json.dumps(config, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _save_weights(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Write the state dict to the cache atomically (:func:`ttaperso.cache.save_cached_weights`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_cached_weights(path, tensors, metadata)


def _load_weights(model: nn.Module, path: Path) -> bool:
    """Load cached weights into ``model``; False (and a warning) if the file is unusable."""
    try:
        model.load_state_dict(load_cached_weights(path), strict=True)
    except (ModelInterfaceError, RuntimeError) as exc:
        log.warning("Ignoring unusable cached weights %s (%s); retraining", path, exc)
        return False
    return True


# ----------------------------------------------------------------------------- training
def _progress(**kwargs: Any) -> Any:
    """A tqdm bar on stderr, shown only when stdout is a terminal."""
    from tqdm.auto import tqdm

    return tqdm(disable=not sys.stdout.isatty(), leave=False, **kwargs)


def _train(model: nn.Module, frames: Tensor, labels: Tensor, epochs: int, seed: int) -> None:
    """Plain supervised training on the source frames (AdamW, one-cycle schedule, h-flips)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=_TRAIN["lr"], weight_decay=_TRAIN["weight_decay"]
    )
    bs = int(_TRAIN["batch_size"])
    steps = epochs * math.ceil(len(frames) / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=_TRAIN["lr"], total_steps=steps)
    model.train()
    bar = _progress(total=steps, desc="training the source model", unit="step")
    for epoch in range(epochs):
        order = torch.randperm(len(frames), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for start in range(0, len(frames), bs):
            idx = order[start : start + bs]
            x, y = frames[idx], labels[idx]
            # SynthFace expressions are mirror-symmetric up to the subject's asymmetry
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            total += len(idx)
            bar.update()
        log.debug(
            "epoch %d/%d: loss %.3f, train accuracy %.3f",
            epoch + 1,
            epochs,
            loss_sum / total,
            correct / total,
        )
    bar.close()
    model.eval()


_CODE_DIGEST = _code_digest()  # at import: a monkeypatched `_train` keeps the same key


def source_model(plan: DemoPlan, seed: int, data: DemoData | None = None) -> tuple[DemoNet, str]:
    """The trained source model (from the cache when possible) and where it is cached.

    ``data`` (from :func:`demo_data`) saves regenerating the training streams.
    """
    torch.manual_seed(seed)
    model = DemoNet()
    path = cache_dir() / f"demonet-{_cache_key(model, plan, seed)}.safetensors"
    if path.is_file() and _load_weights(model, path):
        log.info("Loaded the source model from %s", path)
        model.eval()
        return model, str(path)
    data = data or demo_data(plan, seed)
    frames = torch.cat([s.images for s in data.train]) * 2.0 - 1.0
    labels = torch.cat([s.labels for s in data.train])
    log.info(
        "Training the source model on %d SynthFace source subjects (%d frames; cached "
        "afterwards)...",
        len(data.train),
        len(frames),
    )
    t0 = time.perf_counter()
    _train(model, frames, labels, plan.epochs, seed)
    log.info("Trained in %.1f s", time.perf_counter() - t0)
    try:
        _save_weights(
            model,
            path,
            {
                "generator": synthface.GENERATOR_VERSION,
                "seed": str(seed),
                "labels": ",".join(synthface.EXPRESSIONS),
            },
        )
    except OSError as exc:  # a read-only home must not stop the demo
        log.warning("Could not cache the model weights at %s (%s)", path, exc)
    return model, str(path)


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def _frozen_accuracy(model: FERModel, streams: list[SubjectStream]) -> float:
    correct = sum(
        int((model(model.prepare(s.images)).argmax(1) == s.labels).sum()) for s in streams
    )
    return correct / sum(len(s) for s in streams)


def _uar(pred: Tensor, target: Tensor, num_classes: int) -> float:
    """Mean recall over the classes present in ``target`` (the convention of
    :func:`ttaperso.metrics.uar`, computed here without importing torchmetrics, whose import
    alone costs the demo seconds)."""
    hits = torch.bincount(target[pred == target], minlength=num_classes).float()
    counts = torch.bincount(target, minlength=num_classes).float()
    present = counts > 0
    return float((hits[present] / counts[present]).mean())


def stream_accuracy(
    p: Personalizer, model: FERModel, stream: SubjectStream, batch: int
) -> dict[str, float]:
    """Feed ``stream`` in order, ``batch`` frames per call; score each call's predictions.

    Returns accuracy, UAR, accuracy over the stream's second half and the fraction of
    frames that updated the subject's state.
    """
    frames = model.prepare(stream.images)
    predicted, updated = [], 0
    for start in range(0, len(frames), batch):
        out = p.predict(frames[start : start + batch], subject=stream.subject)
        predicted.append(out.labels)
        updated += int(out.updated.sum())
    pred = torch.cat(predicted)
    correct = (pred == stream.labels).float()
    half = len(stream) // 2
    return {
        "accuracy": float(correct.mean()),
        "uar": _uar(pred, stream.labels, model.num_classes),
        "second_half": float(correct[half:].mean()),
        "updated": updated / len(stream),
    }


def format_table(results: dict[str, Any]) -> str:
    """The demo's plain-text table: subjects x methods, mean rows and the worst change."""
    methods = list(results["accuracy"])
    subjects = results["subjects"]
    rows: list[tuple[str, dict[str, float], str]] = [
        (s, {m: results["accuracy"][m][s] for m in methods}, ".3f") for s in subjects
    ]
    summary: list[tuple[str, dict[str, float], str]] = [
        ("mean accuracy", results["mean"], ".3f"),
        ("mean UAR", results["mean_uar"], ".3f"),
        ("mean, 2nd half of streams", results["mean_second_half"], ".3f"),
        ("worst change vs source", results["worst_change_vs_source"], "+.3f"),
        ("frames that updated", results["updated_fraction"], ".2f"),
    ]
    first = max(len(name) for name, _, _ in rows + summary)
    width = {m: max(6, len(m)) + 2 for m in methods}
    header = f"{'subject':<{first}}" + "".join(f"{m:>{width[m]}}" for m in methods)
    rule = "-" * len(header)

    def line(name: str, values: dict[str, float], fmt: str) -> str:
        cells = "".join(format(values[m], fmt).rjust(width[m]) for m in methods)
        return f"{name:<{first}}{cells}"

    lines = [header, rule, *(line(*r) for r in rows), rule, *(line(*r) for r in summary)]
    for name, reason in results.get("unavailable", {}).items():
        lines.append(f"n/a  {name}: {reason}")
    return "\n".join(lines)


def _plot(results: dict[str, Any], path: Path) -> None:
    """Grouped bars: per-subject accuracy of the frozen model and of each strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results["accuracy"])
    groups = [*results["subjects"], "mean"]
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 3.5, 4.4))
    w = 0.85 / len(methods)
    colors = plt.get_cmap("tab20")
    for i, m in enumerate(methods):
        values = [results["accuracy"][m][s] for s in results["subjects"]] + [results["mean"][m]]
        frozen = m == "source"
        ax.bar(
            [g + (i - (len(methods) - 1) / 2) * w for g in range(len(groups))],
            values,
            w,
            label="source (frozen)" if frozen else m,
            color="0.4" if frozen else colors(i % 20),
        )
    ax.axhline(
        results["source_domain_accuracy"], color="k", ls="--", lw=1, label="frozen, source subjects"
    )
    ax.axhline(1.0 / len(results["labels"]), color="grey", ls=":", lw=1, label="chance")
    ax.set_xticks(range(len(groups)), groups, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (predictions before each update)")
    ax.set_title(f"ttaperso demo: SynthFace target subjects, seed {results['seed']}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out_dir: str | Path, seed: int = 0, quick: bool = False) -> dict[str, Any]:
    """Run every registered strategy on SynthFace target subjects; print a table, write PNG + JSON.

    Each target subject's video is fed in natural order, :data:`DEMO_BATCH` consecutive
    frames per ``predict`` call (``tent`` is also run one frame per call), through one
    Personalizer per strategy with its default config and a labelled source sample; a frame
    is scored by the prediction returned for it (made before that call's update). Torch
    runs on one CPU thread meanwhile (restored afterwards): for 8-frame batches of a tiny
    CNN, more threads cost more than they save, and much more on a busy machine.

    Args:
        out_dir: folder for ``demo_results.json`` and ``demo_accuracy.png`` (created).
        seed: seed of the data and of the source model's training.
        quick: a smaller, faster run (fewer subjects and frames; used by the tests).

    Returns:
        The results: per-subject accuracy of every strategy that could run
        (``accuracy[method][subject]``), mean accuracy and UAR, means over the streams'
        second halves, the worst subject's change against ``source``, the fraction of
        frames that updated each strategy's states, strategies that could not run and why
        (``unavailable``), the frozen model's accuracy on held-out source subjects and on the
        targets, the configs used, timings and the output paths.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(Path(out_dir), seed, quick)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: Path, seed: int, quick: bool) -> dict[str, Any]:
    t_start = time.perf_counter()
    plan = PLANS["quick" if quick else "full"]
    out.mkdir(parents=True, exist_ok=True)
    data = demo_data(plan, seed)
    t_data = time.perf_counter() - t_start
    net, weights_path = source_model(plan, seed, data)
    model = as_fer_model(net)
    t_model = time.perf_counter() - t_start - t_data
    source_domain = _frozen_accuracy(model, data.heldout)
    log.info("Frozen model on held-out source subjects: accuracy %.3f", source_domain)
    source = source_sample(model, data.train, plan.source_sample)

    strategies = list_strategies()
    # The frozen model first: it is the reference every other column is compared to.
    runs = [(s, DEMO_BATCH) for s in sorted(strategies, key=lambda name: name != "source")]
    if FRAME_BY_FRAME in strategies:
        runs.append((FRAME_BY_FRAME, 1))
    subjects = [s.subject for s in data.targets]
    scores: dict[str, dict[str, dict[str, float]]] = {}
    unavailable: dict[str, str] = {}
    timing: dict[str, float] = {}
    configs: dict[str, dict[str, Any]] = {}
    with _progress(
        total=len(runs) * len(data.targets), desc="strategies x subjects", unit="subject"
    ) as bar:
        for strategy, batch in runs:
            column = strategy if batch == DEMO_BATCH else f"{strategy} (1/call)"
            t0 = time.perf_counter()
            done = 0
            try:
                p = Personalizer(model, strategy=strategy, source=source)
                configs[column] = p.config.to_dict()
                scores[column] = {}
                for stream in data.targets:
                    bar.set_postfix_str(f"{column} / {stream.subject}")
                    scores[column][stream.subject] = stream_accuracy(p, model, stream, batch)
                    bar.update()
                    done += 1
            except TTAPersoError as exc:
                # e.g. a strategy that needs a CLIP model: reported, not fatal
                unavailable[column] = f"{type(exc).__name__}: {exc}"
                scores.pop(column, None)
                configs.pop(column, None)
                bar.update(len(data.targets) - done)
                log.info("%s cannot run on the demo model: %s", column, exc)
                continue
            timing[column] = time.perf_counter() - t0
            log.debug("%s: %.1f s", column, timing[column])

    def per(key: str) -> dict[str, dict[str, float]]:
        return {m: {s: v[s][key] for s in subjects} for m, v in scores.items()}

    def mean(table: dict[str, dict[str, float]]) -> dict[str, float]:
        return {m: sum(row.values()) / len(row) for m, row in table.items()}

    accuracy = per("accuracy")
    results: dict[str, Any] = {
        "seed": seed,
        "quick": quick,
        "plan": asdict(plan),
        "image_size": IMAGE_SIZE,
        "generator": synthface.GENERATOR_VERSION,
        "labels": list(synthface.EXPRESSIONS),
        "strategies": strategies,
        "subjects": subjects,
        "batch_size": DEMO_BATCH,
        "frames_per_subject": {s.subject: len(s) for s in data.targets},
        "source_domain_accuracy": source_domain,
        "accuracy": accuracy,
        "uar": per("uar"),
        "mean": mean(accuracy),
        "mean_uar": mean(per("uar")),
        "mean_second_half": mean(per("second_half")),
        "worst_change_vs_source": {
            m: min(a[s] - accuracy["source"][s] for s in subjects) for m, a in accuracy.items()
        },
        "updated_fraction": mean(per("updated")),
        "unavailable": unavailable,
        "configs": configs,
        "target_subjects": {
            i.id: {
                "resting_face": i.resting_face,
                "gain": i.gain,
                "asymmetry": i.asymmetry,
                "sessions": [
                    {"id": s.id, "pose": list(s.pose), **asdict(s.capture)}
                    for s in synthface.SynthFace(seed, size=IMAGE_SIZE).sessions(
                        i, plan.target_sessions
                    )
                ],
            }
            for i in data.target_ids
        },
        "model_weights": weights_path,
        "timing_s": {"data": t_data, "model": t_model, **timing},
        "png": str(out / "demo_accuracy.png"),
        "json": str(out / "demo_results.json"),
    }
    _plot(results, Path(results["png"]))
    results["timing_s"]["total"] = time.perf_counter() - t_start
    Path(results["json"]).write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(results))
    n_frames = sum(len(s) for s in data.targets)
    print(
        f"\nfrozen model on held-out source subjects: {source_domain:.3f}, on the targets: "
        f"{results['mean']['source']:.3f} (chance {1 / len(synthface.EXPRESSIONS):.2f}); "
        f"{len(subjects)} target subjects, {n_frames} frames in {plan.target_sessions} "
        f"shifted session(s) each, {DEMO_BATCH} consecutive frames per call (1/call: one "
        f"frame per call)"
    )
    print(f"wrote {results['png']} and {results['json']}")
    log.info("Demo finished in %.1f s", results["timing_s"]["total"])
    return results
