"""A sample of the model's source domain, for strategies that need one.

Some strategies need data from the domain the frozen model was trained on: EATA's Fisher
anchor, TTA-CaP's source prototypes (chosen per subject among the closest source
subjects), calibration. The user hands such a sample to the Personalizer once:

    source = SourceData(frames, labels=labels, subjects=subject_ids)
    p = Personalizer(model, "eata", source=source)

Frames are preprocessed exactly like the frames given to ``predict``. Labels and subject
ids are optional; strategies say what they need and refuse a sample without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import InputError
from .model import FERModel
from .validation import validate_frames

__all__ = ["SourceData"]


@dataclass(frozen=True)
class SourceData:
    """Preprocessed source-domain frames with optional labels and subject ids.

    Args:
        frames: ``(N, C, H, W)`` preprocessed frames, ``N >= 1``.
        labels: optional ``(N,)`` integer class indices in the model's label order.
        subjects: optional ``N`` subject ids (source subjects, for per-subject choices).
    """

    frames: Tensor
    labels: Tensor | None = None
    subjects: tuple[str, ...] | None = None

    def __init__(
        self,
        frames: Tensor,
        labels: Tensor | Sequence[int] | None = None,
        subjects: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(frames, Tensor) or frames.dim() != 4 or frames.shape[0] < 1:
            shape = tuple(frames.shape) if isinstance(frames, Tensor) else type(frames).__name__
            raise InputError(
                f"Expected argument `frames` of SourceData to be a tensor (N, C, H, W) with "
                f"N >= 1 but got {shape}"
            )
        n = frames.shape[0]
        label_tensor: Tensor | None = None
        if labels is not None:
            label_tensor = torch.as_tensor(labels)
            if label_tensor.dtype.is_floating_point or label_tensor.dtype == torch.bool:
                raise InputError(
                    "Expected argument `labels` of SourceData to hold integer class indices "
                    f"but got dtype {label_tensor.dtype}"
                )
            if label_tensor.shape != (n,):
                raise InputError(
                    f"Expected argument `labels` of SourceData to have shape ({n},) but got "
                    f"{tuple(label_tensor.shape)}"
                )
            label_tensor = label_tensor.to(torch.long)
        subject_ids: tuple[str, ...] | None = None
        if subjects is not None:
            subject_ids = tuple(subjects)
            if len(subject_ids) != n or not all(isinstance(s, str) and s for s in subject_ids):
                raise InputError(
                    f"Expected argument `subjects` of SourceData to be {n} non-empty str ids "
                    f"but got {len(subject_ids)} entries"
                )
        object.__setattr__(self, "frames", frames)
        object.__setattr__(self, "labels", label_tensor)
        object.__setattr__(self, "subjects", subject_ids)

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    def checked_for(
        self, model: FERModel, *, dtype: torch.dtype, device: torch.device
    ) -> SourceData:
        """This sample validated against ``model`` (input shape, range, finite, labels)."""
        frames = torch.cat(
            [
                validate_frames(chunk, model, dtype=dtype, device=device)
                for chunk in self.frames.split(1024)
            ]
        )
        if self.labels is not None:
            bad = (self.labels < 0) | (self.labels >= model.num_classes)
            if bool(bad.any()):
                raise InputError(
                    f"Expected SourceData labels in [0, {model.num_classes}) for labels "
                    f"{model.labels} but got {sorted(set(self.labels[bad].tolist()))[:10]}"
                )
        return SourceData(frames, self.labels, self.subjects)

    def require(self, strategy: str, *, labels: bool = False, subjects: bool = False) -> None:
        """Raise a clear error when a strategy needs labels or subject ids the sample lacks."""
        if labels and self.labels is None:
            raise InputError(f"Strategy {strategy!r} needs SourceData with `labels`")
        if subjects and self.subjects is None:
            raise InputError(f"Strategy {strategy!r} needs SourceData with `subjects`")
