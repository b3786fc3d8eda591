"""The data type every reader, generator and protocol speaks: one subject's stream.

A :class:`SubjectStream` is an ordered sequence of face images of one subject, with an
optional sequence (video/session) id and label per frame. Images are kept model-neutral:
``(T, 1 or 3, H, W)`` float32 in ``[0, 1]``; a model turns them into its input with
:meth:`ttaperso.FERModel.prepare`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import InputError

__all__ = ["SubjectStream", "UNLABELLED"]

#: label index of a frame without a label
UNLABELLED = -1


@dataclass(frozen=True)
class SubjectStream:
    """One subject's frames in stream order.

    Attributes:
        subject: the subject id.
        images: ``(T, 1 or 3, H, W)`` float32 in ``[0, 1]``.
        labels: ``(T,)`` int64 indices into ``label_names``; :data:`UNLABELLED` (-1) where
            a frame has no label.
        label_names: the class names the label indices refer to.
        sequences: per-frame sequence/video/session id (``""`` when the source has none).
        sources: per-frame origin (file path, ``video.mp4#frame``, ``synthface:...``), used
            in error messages and reports.
        extras: per-frame side information with first dimension ``T`` (e.g. SynthFace's
            ``"au"``: Action-Unit intensities).
    """

    subject: str
    images: Tensor
    labels: Tensor
    label_names: tuple[str, ...]
    sequences: tuple[str, ...]
    sources: tuple[str, ...]
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        t = self.images.shape[0] if isinstance(self.images, Tensor) else -1
        if (
            not isinstance(self.images, Tensor)
            or self.images.dim() != 4
            or self.images.shape[1] not in (1, 3)
        ):
            raise InputError(
                f"Stream {self.subject!r}: expected images (T, 1 or 3, H, W) but got "
                f"{tuple(self.images.shape) if isinstance(self.images, Tensor) else self.images!r}"
            )
        if self.labels.shape != (t,):
            raise InputError(
                f"Stream {self.subject!r}: expected labels of shape ({t},) but got "
                f"{tuple(self.labels.shape)}"
            )
        if len(self.sequences) != t or len(self.sources) != t:
            raise InputError(
                f"Stream {self.subject!r}: expected {t} sequence ids and sources but got "
                f"{len(self.sequences)} and {len(self.sources)}"
            )
        for key, value in self.extras.items():
            if value.shape[:1] != (t,):
                raise InputError(
                    f"Stream {self.subject!r}: extra {key!r} has {value.shape[0]} rows, "
                    f"expected {t}"
                )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def select(self, index: Tensor | Sequence[int]) -> SubjectStream:
        """The frames at ``index`` (in that order), as a new stream of the same subject."""
        idx = torch.as_tensor(index, dtype=torch.long)
        order = idx.tolist()
        return SubjectStream(
            subject=self.subject,
            images=self.images.index_select(0, idx),
            labels=self.labels.index_select(0, idx),
            label_names=self.label_names,
            sequences=tuple(self.sequences[i] for i in order),
            sources=tuple(self.sources[i] for i in order),
            extras={k: v.index_select(0, idx) for k, v in self.extras.items()},
        )

    def relabel(self, label_names: Sequence[str]) -> SubjectStream:
        """Map labels onto another label set (e.g. a model's), refusing unknown names.

        Raises :class:`~ttaperso.errors.InputError` naming the first file whose label is
        not in ``label_names``.
        """
        target = tuple(label_names)
        mapping = []
        for name in self.label_names:
            mapping.append(target.index(name) if name in target else None)
        new = self.labels.clone()
        for i, label in enumerate(self.labels.tolist()):
            if label == UNLABELLED:
                continue
            mapped = mapping[label]
            if mapped is None:
                raise InputError(
                    f"{self.sources[i]}: label {self.label_names[label]!r} is not one of the "
                    f"model's labels {target}"
                )
            new[i] = mapped
        return SubjectStream(
            self.subject, self.images, new, target, self.sequences, self.sources, self.extras
        )
