"""Train CLIP-AU on labelled subject streams (the source subjects).

What is trained: the per-AU offsets and the temporal head, as published (CLIP frozen), and
optionally CLIP's image tower (``train_vision=True``: needed when CLIP is not a pretrained
model, e.g. the tiny test model). The loss is the cross-entropy of every labelled frame's
logits, plus, when the streams carry Action-Unit intensities (SynthFace's ``extras["au"]``),
a binary cross-entropy between each AU's activation (a logit) and its intensity in ``[0, 1]``
that makes the AU-activation vector mean what its name says.

Training samples are clips of ``clip_length`` consecutive frames of one sequence (video /
session), the temporal head seeing them in order. Two entry points with the same loss:
:func:`train_clip_au` (a plain loop) and :func:`make_lightning_module` (Lightning).

Command line (tiny or named open_clip architecture, SynthFace source subjects)::

    python -m ttaperso.clip_au.train --help
    python -m ttaperso.clip_au.train --arch ViT-B-32 --checkpoint clip.safetensors \\
        --synthface-subjects 8 --epochs 5 --out clip_au.safetensors
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError, StateFileError
from ..streams.types import SubjectStream
from .model import CLIPAUModel

__all__ = [
    "TrainConfig",
    "ClipDataset",
    "clip_au_loss",
    "train_clip_au",
    "make_lightning_module",
    "save_clip_au",
    "load_clip_au_weights",
    "main",
]


@dataclass(frozen=True)
class TrainConfig:
    """Options of CLIP-AU training.

    Args:
        epochs: passes over all clips.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        clip_length: consecutive frames per training clip.
        stride: frames between the starts of two clips of a sequence.
        batch_clips: clips per optimizer step.
        au_weight: weight of the AU-intensity loss (0 = expression labels only).
        train_vision: also train CLIP's image tower (not only AU offsets and temporal head).
        balanced: weight the cross-entropy by inverse class frequency of the training frames
            (expression videos are mostly neutral frames).
        seed: seed of the clip order.
    """

    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.01
    clip_length: int = 16
    stride: int = 8
    batch_clips: int = 8
    au_weight: float = 1.0
    train_vision: bool = False
    balanced: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "clip_length", "stride", "batch_clips"):
            if getattr(self, name) < 1:
                raise InputError(f"Expected `{name}` >= 1 but got {getattr(self, name)!r}")
        for name in ("lr", "weight_decay", "au_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise InputError(f"Expected `{name}` to be a finite number >= 0 but got {value!r}")


class ClipDataset(torch.utils.data.Dataset):
    """Clips of consecutive frames of one sequence, with labels and AU targets.

    Args:
        model: the CLIP-AU model (its ``prepare`` turns images into model input).
        streams: labelled subject streams (images in ``[0, 1]``).
        au_ids: FACS numbers of the columns of ``extras["au"]`` (``None``: no AU targets).
        clip_length: frames per clip (shorter sequences give one shorter clip).
        stride: frames between clip starts.

    Items: ``(frames (T, C, H, W), labels (T,), au (T, A), au_mask (A,))`` with the AU
    targets in the model's AU order; ``au_mask`` marks the model AUs the streams measure.
    """

    def __init__(
        self,
        model: CLIPAUModel,
        streams: Sequence[SubjectStream],
        *,
        au_ids: Sequence[int] | None = None,
        clip_length: int = 16,
        stride: int = 8,
    ) -> None:
        if not streams:
            raise InputError("Expected at least one labelled SubjectStream to train on")
        model_aus = {au: i for i, au in enumerate(model.au_ids)}
        self.au_mask = torch.zeros(len(model_aus), dtype=torch.bool)
        columns: list[tuple[int, int]] = []  # (stream column, model column)
        for col, au_id in enumerate(au_ids or ()):
            if au_id in model_aus:
                columns.append((col, model_aus[au_id]))
                self.au_mask[model_aus[au_id]] = True
        self.items: list[tuple[Tensor, Tensor, Tensor]] = []
        self.labels = tuple(model.labels)
        for stream in streams:
            if tuple(stream.label_names) != tuple(model.labels):
                raise InputError(
                    f"Stream {stream.subject!r} labels {stream.label_names} differ from the "
                    f"model's {model.labels}"
                )
            x = model.prepare(stream.images)
            au = torch.zeros(x.shape[0], len(model_aus))
            if columns:
                raw = stream.extras.get("au")
                if raw is None or raw.shape[1] != len(au_ids or ()):
                    raise InputError(
                        f"Stream {stream.subject!r} has no extras['au'] with {len(au_ids or ())} "
                        "columns (pass au_ids=None to train without AU targets)"
                    )
                for col, target in columns:
                    au[:, target] = raw[:, col].float().clamp(0.0, 1.0)
            bounds = _sequence_bounds(stream.sequences)
            for lo, hi in bounds:
                for start in range(lo, max(lo + 1, hi - clip_length + 1), stride):
                    end = min(start + clip_length, hi)
                    self.items.append((x[start:end], stream.labels[start:end], au[start:end]))

    def __len__(self) -> int:
        return len(self.items)

    def class_weights(self) -> Tensor:
        """Inverse-frequency class weights over the clips' labelled frames (mean 1 over frames)."""
        num_classes = len(self.labels)
        labels = torch.cat([item[1] for item in self.items])
        counts = torch.bincount(labels[labels >= 0], minlength=num_classes).float()
        weights = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), 0.0)
        return weights

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        frames, labels, au = self.items[index]
        return frames, labels, au, self.au_mask


def _sequence_bounds(sequences: Sequence[str]) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of equal sequence ids."""
    bounds: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(sequences) + 1):
        if i == len(sequences) or sequences[i] != sequences[start]:
            bounds.append((start, i))
            start = i
    return bounds


def clip_au_loss(
    model: CLIPAUModel,
    batch: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]],
    au_weight: float,
    class_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Mean frame cross-entropy (+ ``au_weight`` x AU BCE) over a list of clips.

    ``class_weights``: per-class cross-entropy weights (the CE is then their weighted mean).
    """
    ce_terms, au_terms, correct, labelled, frames_seen = [], [], 0, 0.0, 0
    for frames, labels, au, mask in batch:
        z = model.features(frames)
        logits = model.sequence_logits(z)
        known = labels >= 0
        if bool(known.any()):
            ce_terms.append(
                F.cross_entropy(logits[known], labels[known], weight=class_weights, reduction="sum")
            )
            correct += int((logits[known].argmax(1) == labels[known]).sum())
            frames_seen += int(known.sum())
            labelled += (
                int(known.sum())
                if class_weights is None
                else float(class_weights[labels[known]].sum())
            )
        if au_weight > 0 and bool(mask.any()):
            acts = model.au_activations(z)[:, mask]
            au_terms.append(F.binary_cross_entropy_with_logits(acts, au[:, mask]))
    loss = torch.zeros(())
    if ce_terms:
        loss = loss + torch.stack(ce_terms).sum() / max(labelled, 1e-12)
    if au_terms:
        loss = loss + au_weight * torch.stack(au_terms).mean()
    return loss, {"loss": float(loss.detach()), "accuracy": correct / max(frames_seen, 1)}


def _trainable(model: CLIPAUModel, train_vision: bool) -> list[torch.nn.Parameter]:
    model.requires_grad_(False)
    model.au_bias.requires_grad_(True)
    model.temporal.requires_grad_(True)
    if train_vision:
        model.clip.clip.visual.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def train_clip_au(
    model: CLIPAUModel,
    streams: Sequence[SubjectStream],
    *,
    au_ids: Sequence[int] | None = None,
    config: TrainConfig = TrainConfig(),
    log: Callable[[str], None] | None = print,
) -> list[dict[str, float]]:
    """Train ``model`` in place on labelled streams (plain loop); return per-epoch metrics.

    CLIP's text tower is never trained, so the fixed AU text embeddings stay valid; the
    model is left in eval mode with ``requires_grad`` off.
    """
    data = ClipDataset(
        model, streams, au_ids=au_ids, clip_length=config.clip_length, stride=config.stride
    )
    class_weights = data.class_weights() if config.balanced else None
    params = _trainable(model, config.train_vision)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    model.train()
    try:
        for epoch in range(config.epochs):
            order = torch.randperm(len(data), generator=generator).tolist()
            totals = {"loss": 0.0, "accuracy": 0.0}
            steps = 0
            start = time.perf_counter()
            for i in range(0, len(order), config.batch_clips):
                batch = [data[j] for j in order[i : i + config.batch_clips]]
                loss, parts = clip_au_loss(model, batch, config.au_weight, class_weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for key in totals:
                    totals[key] += parts[key]
                steps += 1
            row = {k: v / max(steps, 1) for k, v in totals.items()}
            row.update(epoch=float(epoch), seconds=time.perf_counter() - start)
            history.append(row)
            if log is not None:
                log(
                    f"epoch {epoch}: loss {row['loss']:.4f} frame accuracy "
                    f"{row['accuracy']:.3f} ({row['seconds']:.1f} s)"
                )
    finally:
        model.eval()
        model.requires_grad_(False)
    return history


def make_lightning_module(
    model: CLIPAUModel, config: TrainConfig = TrainConfig(), class_weights: Tensor | None = None
) -> Any:
    """A ``pytorch_lightning.LightningModule`` with the same loss and optimizer as
    :func:`train_clip_au` (Lightning is imported only when this is called).

    ``class_weights``: e.g. ``ClipDataset.class_weights()`` for a class-balanced loss. Use with
    a :class:`ClipDataset` in a DataLoader whose ``collate_fn`` is ``list`` (clips differ in
    length)::

        module = make_lightning_module(model, TrainConfig(epochs=5))
        loader = DataLoader(ClipDataset(model, streams, au_ids=AU_IDS), batch_size=8,
                            shuffle=True, collate_fn=list)
        pl.Trainer(max_epochs=5, accelerator="cpu").fit(module, loader)
        model.eval()
    """
    import pytorch_lightning as pl

    class CLIPAULightningModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self._params = _trainable(model, config.train_vision)

        def on_fit_start(self) -> None:
            self.model.train()

        def on_fit_end(self) -> None:
            self.model.eval()
            self.model.requires_grad_(False)

        def training_step(self, batch: list, batch_idx: int) -> Tensor:
            loss, parts = clip_au_loss(self.model, batch, config.au_weight, class_weights)
            self.log("train_loss", parts["loss"], batch_size=len(batch))
            self.log("train_accuracy", parts["accuracy"], batch_size=len(batch))
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self._params, lr=config.lr, weight_decay=config.weight_decay)

    return CLIPAULightningModule()


def save_clip_au(model: CLIPAUModel, path: str | Path) -> None:
    """Write the model's state dict (CLIP, AU offsets, temporal head, AU text) as safetensors."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "ttaperso-clip-au"})


def load_clip_au_weights(model: CLIPAUModel, path: str | Path) -> None:
    """Load weights written by :func:`save_clip_au` into a model of the same architecture."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - unreadable file
        raise StateFileError(f"{str(path)!r} is not a readable safetensors file: {exc}") from exc
    from ttaperso.adapters.open_clip_fer import check_state_dict_fits

    check_state_dict_fits(model, tensors, f"CLIP-AU weights {str(path)!r}")
    model.load_state_dict(tensors, strict=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: train CLIP-AU on SynthFace source subjects and save the weights."""
    parser = argparse.ArgumentParser(
        prog="python -m ttaperso.clip_au.train",
        description="Train CLIP-AU (AU offsets + temporal head, optionally the image tower) "
        "on SynthFace source subjects with known expressions and AU intensities.",
    )
    parser.add_argument("--arch", default="tiny", help="'tiny' or an open_clip architecture name")
    parser.add_argument("--checkpoint", type=Path, help="local CLIP weights (.safetensors/.pt)")
    parser.add_argument("--image-size", type=int, default=None, help="input size (tiny: 32)")
    parser.add_argument("--synthface-subjects", type=int, default=6)
    parser.add_argument("--synthface-seed", type=int, default=0)
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clip-length", type=int, default=16)
    parser.add_argument("--au-weight", type=float, default=1.0)
    parser.add_argument("--train-vision", action="store_true", help="also train the image tower")
    parser.add_argument("--balanced", action="store_true", help="class-balanced cross-entropy")
    parser.add_argument("--lightning", action="store_true", help="train with Lightning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output .safetensors")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from ..synthface import AU_IDS, EXPRESSIONS, SynthFace

    model = build_model(args.arch, args.checkpoint, EXPRESSIONS, args.image_size, args.seed)
    size = model.input_shape[1] or 64
    faces = SynthFace(seed=args.synthface_seed, size=max(16, int(size)))
    people = faces.sample_subjects(args.synthface_subjects, split="source")
    streams = [faces.subject_stream(p, sessions=args.sessions) for p in people]
    config = TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        clip_length=args.clip_length,
        stride=max(1, args.clip_length // 2),
        au_weight=args.au_weight,
        train_vision=args.train_vision,
        balanced=args.balanced,
        seed=args.seed,
    )
    if args.lightning:
        import pytorch_lightning as pl

        data = ClipDataset(model, streams, au_ids=AU_IDS, clip_length=config.clip_length)
        loader = torch.utils.data.DataLoader(
            data, batch_size=config.batch_clips, shuffle=True, collate_fn=list
        )
        trainer = pl.Trainer(
            max_epochs=config.epochs, accelerator="cpu", logger=False, enable_checkpointing=False
        )
        weights = data.class_weights() if config.balanced else None
        trainer.fit(make_lightning_module(model, config, weights), loader)
        model.eval()
        model.requires_grad_(False)
    else:
        train_clip_au(model, streams, au_ids=AU_IDS, config=config)
    save_clip_au(model, args.out)
    print(f"wrote {args.out}")
    return 0


def build_model(
    arch: str,
    checkpoint: Path | None,
    labels: Sequence[str],
    image_size: int | None = None,
    seed: int = 0,
) -> CLIPAUModel:
    """A CLIP-AU model on the tiny test CLIP (``arch="tiny"``) or an open_clip architecture."""
    from ttaperso.adapters.open_clip_fer import CLIPFER, tiny_clip_config

    if arch == "tiny":
        clip = CLIPFER(
            None,
            checkpoint,
            labels=labels,
            config=tiny_clip_config(image_size=image_size or 32),
            channels=1,
            seed=seed,
        )
    else:
        clip = CLIPFER(arch, checkpoint, labels=labels, image_size=image_size, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return CLIPAUModel(clip, labels)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
