"""The embedded demo behind ``ttaperso demo``: every strategy on toy subjects, on CPU.

1. Train (or load from the cache) a small BatchNorm CNN on *source* subjects of
   :mod:`ttaperso.toyfaces`, all filmed with the nominal camera.
2. For each held-out *target* subject (its own camera, lighting and resting face), stream
   its video in natural order, 8 consecutive frames per call, through one
   :class:`~ttaperso.Personalizer` per registered strategy (default config), and score the
   predictions each call returns (made before that call's update). One strategy is also
   run frame by frame.
3. Print a table, and write a PNG plot and a JSON file of the numbers.

Nothing is downloaded; the trained weights are cached as safetensors under
``$TTAPERSO_CACHE/demo`` (default ``~/.cache/ttaperso/demo``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import toyfaces
from .io import atomic_write_bytes
from .personalizer import Personalizer
from .strategies import list_strategies

__all__ = ["ToyFERNet", "run_demo", "cache_dir", "format_table", "DEMO_BATCH"]

log = logging.getLogger(__name__)

DEMO_BATCH = 8
FRAME_BY_FRAME = "tent"  # the strategy also run one frame per call
IMAGE_SIZE = 32

# Sizes of a run: source subjects and frames each for training, epochs, target subjects and
# frames each (the streams), held-out source subjects (the frozen model's in-domain accuracy).
_PLANS: dict[str, dict[str, int]] = {
    "full": {
        "train_subjects": 40,
        "train_frames": 120,
        "epochs": 5,
        "targets": 6,
        "target_frames": 320,
        "heldout_subjects": 4,
    },
    "quick": {
        "train_subjects": 40,
        "train_frames": 40,
        "epochs": 4,
        "targets": 3,
        "target_frames": 160,
        "heldout_subjects": 2,
    },
}


class ToyFERNet(nn.Module):
    """A small BatchNorm CNN for ``(N, 1, 32, 32)`` frames; the linear head is ``fc``."""

    def __init__(self, num_classes: int = len(toyfaces.CLASSES), width: int = 12) -> None:
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


# ------------------------------------------------------------------------------ cache
def cache_dir() -> Path:
    """Folder of the demo's cached weights: ``$TTAPERSO_CACHE/demo`` or ``~/.cache/ttaperso/demo``."""
    root = os.environ.get("TTAPERSO_CACHE")
    if root:
        return Path(root).expanduser() / "demo"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ttaperso" / "demo"


def _cache_key(model: nn.Module, plan: dict[str, int], seed: int) -> str:
    """Hash of everything the trained weights depend on: generator, architecture, plan, seed."""
    h = hashlib.sha256(_CODE_DIGEST.encode())
    h.update(repr(model).encode())
    h.update(json.dumps({**plan, "seed": seed, "train": _TRAIN}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _save_weights(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Write the state dict as safetensors atomically (see :func:`ttaperso.io.atomic_write_bytes`)."""
    from safetensors.torch import save

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def _load_weights(model: nn.Module, path: Path) -> bool:
    """Load cached weights into ``model``; False (and a warning) if the file is unusable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except (OSError, RuntimeError, SafetensorError) as exc:
        log.warning("Ignoring unusable cached weights %s (%s); retraining", path, exc)
        return False
    return True


# ----------------------------------------------------------------------------- training
def _progress(**kwargs: Any) -> Any:
    """A tqdm bar on stderr, shown only when stdout is a terminal."""
    from tqdm.auto import tqdm

    return tqdm(disable=not sys.stdout.isatty(), leave=False, **kwargs)


_TRAIN = {"batch_size": 64, "lr": 3e-3, "weight_decay": 1e-4}


def _train(model: nn.Module, frames: Tensor, labels: Tensor, epochs: int, seed: int) -> None:
    """Plain supervised training on the source frames (AdamW, one-cycle schedule, h-flips)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=_TRAIN["lr"], weight_decay=_TRAIN["weight_decay"]
    )
    bs = _TRAIN["batch_size"]
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
            flip = torch.rand(len(idx), generator=gen) < 0.5  # faces are left-right symmetric
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


def _code_digest() -> str:
    """Digest of the code the weights depend on: the generator and the training loop."""
    try:
        code = inspect.getsource(toyfaces) + inspect.getsource(_train)
    except (OSError, TypeError):  # no source available (frozen install): version string only
        code = toyfaces.GENERATOR_VERSION
    return hashlib.sha256(code.encode()).hexdigest()


_CODE_DIGEST = _code_digest()  # at import: a monkeypatched `_train` keeps the same key


def _source_model(plan: dict[str, int], seed: int) -> tuple[ToyFERNet, str]:
    """The trained source model (from the cache when possible) and where it is cached."""
    torch.manual_seed(seed)
    model = ToyFERNet()
    path = cache_dir() / f"toyfernet-{_cache_key(model, plan, seed)}.safetensors"
    if path.is_file() and _load_weights(model, path):
        log.info("Loaded the toy source model from %s", path)
        model.eval()
        return model, str(path)
    log.info(
        "Training the toy source model on %d source subjects (cached afterwards)...",
        plan["train_subjects"],
    )
    t0 = time.perf_counter()
    frames, labels, _ = toyfaces.make_dataset(
        seed, plan["train_subjects"], plan["train_frames"], size=IMAGE_SIZE
    )
    _train(model, frames, labels, plan["epochs"], seed)
    log.info("Trained in %.1f s", time.perf_counter() - t0)
    try:
        _save_weights(
            model,
            path,
            {
                "generator": toyfaces.GENERATOR_VERSION,
                "seed": str(seed),
                "labels": ",".join(toyfaces.CLASSES),
            },
        )
    except OSError as exc:  # a read-only home must not stop the demo
        log.warning("Could not cache the model weights at %s (%s)", path, exc)
    return model, str(path)


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def _frozen_accuracy(model: nn.Module, frames: Tensor, labels: Tensor) -> float:
    return float((model(frames).argmax(1) == labels).float().mean())


def _stream(p: Personalizer, subject: str, frames: Tensor, batch: int) -> tuple[Tensor, float]:
    """Feed ``frames`` in order, ``batch`` per call; predicted labels and fraction updated."""
    labels, updated = [], 0
    for start in range(0, len(frames), batch):
        out = p.predict(frames[start : start + batch], subject=subject)
        labels.append(out.labels)
        updated += int(out.updated.sum())
    return torch.cat(labels), updated / len(frames)


def format_table(results: dict[str, Any]) -> str:
    """The demo's plain-text table: subjects x methods, mean rows and the worst change."""
    methods = list(results["accuracy"])
    subjects = results["subjects"]
    rows: list[tuple[str, dict[str, float], str]] = [
        (s, {m: results["accuracy"][m][s] for m in methods}, ".3f") for s in subjects
    ]
    summary: list[tuple[str, dict[str, float], str]] = [
        ("mean", results["mean"], ".3f"),
        ("mean, 2nd half of streams", results["mean_second_half"], ".3f"),
        ("worst change vs source", results["worst_change_vs_source"], "+.3f"),
        ("frames that updated", results["updated_fraction"], ".2f"),
    ]
    first = max(len(name) for name, _, _ in rows + summary)
    width = max(8, *(len(m) for m in methods)) + 2
    header = f"{'subject':<{first}}" + "".join(f"{m:>{width}}" for m in methods)
    rule = "-" * len(header)

    def line(name: str, values: dict[str, float], fmt: str) -> str:
        return f"{name:<{first}}" + "".join(format(values[m], fmt).rjust(width) for m in methods)

    return "\n".join([header, rule, *(line(*r) for r in rows), rule, *(line(*r) for r in summary)])


def _plot(results: dict[str, Any], path: Path) -> None:
    """Grouped bars: per-subject accuracy of the frozen model and of each strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results["accuracy"])
    groups = [*results["subjects"], "mean"]
    fig, ax = plt.subplots(figsize=(1.3 * len(groups) + 3.5, 4.2))
    w = 0.8 / len(methods)
    for i, m in enumerate(methods):
        values = [results["accuracy"][m][s] for s in results["subjects"]] + [results["mean"][m]]
        frozen = m == "source"
        ax.bar(
            [g + (i - (len(methods) - 1) / 2) * w for g in range(len(groups))],
            values,
            w,
            label="source (frozen)" if frozen else m,
            color="0.55" if frozen else None,
        )
    ax.axhline(
        results["source_domain_accuracy"], color="k", ls="--", lw=1, label="frozen, source subjects"
    )
    ax.axhline(1.0 / len(results["labels"]), color="grey", ls=":", lw=1, label="chance")
    ax.set_xticks(range(len(groups)), groups, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (predictions before each update)")
    ax.set_title(f"ttaperso demo: toy faces, seed {results['seed']}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out_dir: str | Path, seed: int = 0, quick: bool = False) -> dict[str, Any]:
    """Run every registered strategy on toy target subjects; print a table, write PNG + JSON.

    Each target subject's video is fed in natural order, :data:`DEMO_BATCH` consecutive
    frames per ``predict`` call (``tent`` is also run one frame per call), through one
    Personalizer per strategy with its default config; a frame is scored by the prediction
    returned for it (made before that call's update). Torch runs on one CPU thread
    meanwhile (restored afterwards): for 8-frame batches of a tiny CNN, more threads cost
    more than they save, and much more on a busy machine.

    Args:
        out_dir: folder for ``demo_results.json`` and ``demo_accuracy.png`` (created).
        seed: seed of the data and of the source model's training.
        quick: a smaller, faster run (fewer subjects and frames; used by the tests).

    Returns:
        The results: per-subject accuracy of every strategy (``accuracy[method][subject]``),
        their means (over whole streams and over their second halves), the worst subject's
        change against ``source``, the fraction of frames that updated each strategy's
        states, the frozen model's accuracy on held-out source subjects, the configs used,
        timings and the output paths.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(Path(out_dir), seed, quick)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: Path, seed: int, quick: bool) -> dict[str, Any]:
    t_start = time.perf_counter()
    plan = _PLANS["quick" if quick else "full"]
    out.mkdir(parents=True, exist_ok=True)
    model, weights_path = _source_model(plan, seed)
    t_model = time.perf_counter() - t_start

    held_x, held_y, _ = toyfaces.make_dataset(
        seed + 1_000_003,
        plan["heldout_subjects"],
        plan["target_frames"],
        size=IMAGE_SIZE,
        prefix="heldout",
    )
    source_domain = _frozen_accuracy(model, held_x, held_y)
    log.info("Frozen model on held-out source subjects: accuracy %.3f", source_domain)
    targets = [toyfaces.make_subject(seed, i, shifted=True) for i in range(plan["targets"])]
    streams = {
        s.id: toyfaces.make_stream(s, plan["target_frames"], seed, size=IMAGE_SIZE) for s in targets
    }
    half = plan["target_frames"] // 2

    strategies = list_strategies()
    # The frozen model first: it is the reference every other column is compared to.
    runs = [(s, DEMO_BATCH) for s in sorted(strategies, key=lambda name: name != "source")]
    if FRAME_BY_FRAME in strategies:
        runs.append((FRAME_BY_FRAME, 1))
    accuracy: dict[str, dict[str, float]] = {}
    second_half: dict[str, float] = {}
    updated: dict[str, float] = {}
    timing: dict[str, float] = {}
    configs: dict[str, dict[str, Any]] = {}
    options = {
        "labels": toyfaces.CLASSES,
        "input_shape": (1, IMAGE_SIZE, IMAGE_SIZE),
        "head": "fc",
        "input_range": (-1.0, 1.0),
    }
    with _progress(
        total=len(runs) * len(targets), desc="strategies x subjects", unit="subject"
    ) as bar:
        for strategy, batch in runs:
            column = strategy if batch == DEMO_BATCH else f"{strategy} (1/call)"
            t0 = time.perf_counter()
            p = Personalizer(model, strategy=strategy, **options)
            configs[column] = p.config.to_dict()
            accuracy[column], second_half[column], updated[column] = {}, 0.0, 0.0
            for sid, (frames, labels) in streams.items():
                bar.set_postfix_str(f"{column} / {sid}")
                predicted, frac = _stream(p, sid, frames, batch)
                correct = (predicted == labels).float()
                accuracy[column][sid] = float(correct.mean())
                second_half[column] += float(correct[half:].mean()) / len(streams)
                updated[column] += frac / len(streams)
                bar.update()
            timing[column] = time.perf_counter() - t0
            log.debug("%s: %.1f s", column, timing[column])

    subjects = list(streams)
    results: dict[str, Any] = {
        "seed": seed,
        "quick": quick,
        "labels": list(toyfaces.CLASSES),
        "strategies": strategies,
        "subjects": subjects,
        "batch_size": DEMO_BATCH,
        "frames_per_subject": plan["target_frames"],
        "source_domain_accuracy": source_domain,
        "accuracy": accuracy,
        "mean": {m: sum(a.values()) / len(a) for m, a in accuracy.items()},
        "mean_second_half": second_half,
        "worst_change_vs_source": {
            m: min(a[s] - accuracy["source"][s] for s in subjects) for m, a in accuracy.items()
        },
        "updated_fraction": updated,
        "configs": configs,
        "captures": {s.id: {**s.capture, "rest": list(s.rest)} for s in targets},
        "model_weights": weights_path,
        "timing_s": {"model": t_model, **timing},
        "png": str(out / "demo_accuracy.png"),
        "json": str(out / "demo_results.json"),
    }
    _plot(results, Path(results["png"]))
    results["timing_s"]["total"] = time.perf_counter() - t_start
    Path(results["json"]).write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(results))
    print(
        f"\nfrozen model on held-out source subjects: {source_domain:.3f} "
        f"(chance {1 / len(toyfaces.CLASSES):.2f}); {len(subjects)} target subjects, "
        f"{plan['target_frames']} frames each, {DEMO_BATCH} consecutive frames per call "
        f"(1/call: one frame per call)"
    )
    print(f"wrote {results['png']} and {results['json']}")
    log.info("Demo finished in %.1f s", results["timing_s"]["total"])
    return results
