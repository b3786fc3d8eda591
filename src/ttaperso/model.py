"""The runtime's model interface.

A strategy never guesses a model's structure from module names. It talks to a
:class:`FERModel`, which states what it is: class labels, expected input, and, when it
can, a split into ``features(x) -> z`` and ``head(z) -> logits``. Model families get an
adapter in :mod:`ttaperso.adapters` that builds one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ModelInterfaceError

__all__ = ["FERModel"]


class FERModel(nn.Module):
    """A frozen facial-expression classifier as the runtime sees it.

    Subclasses implement :meth:`features` and :meth:`head` (or override :meth:`forward`
    when no split exists). ``forward(x)`` returns logits of shape ``(N, num_classes)``;
    ``forward(x, return_features=True)`` returns ``(logits, features)``.

    Args:
        labels: class names, in the order of the logits.
        input_shape: expected ``(C, H, W)`` of one preprocessed frame; ``H``/``W`` may be
            ``None`` when the network accepts any size.
        input_range: closed interval the preprocessed pixel values must lie in, or
            ``None`` when the model documents no range.
        name: short identifier (used in messages and state metadata).
    """

    def __init__(
        self,
        labels: Sequence[str],
        input_shape: tuple[int, int | None, int | None],
        *,
        input_range: tuple[float, float] | None = None,
        name: str = "model",
    ) -> None:
        super().__init__()
        labels = tuple(str(label) for label in labels)
        if len(labels) < 2:
            raise ModelInterfaceError(
                f"Expected argument `labels` to name at least 2 classes but got {labels!r}"
            )
        if len(set(labels)) != len(labels):
            raise ModelInterfaceError(f"Expected argument `labels` to be unique but got {labels!r}")
        if len(input_shape) != 3 or not isinstance(input_shape[0], int) or input_shape[0] < 1:
            raise ModelInterfaceError(
                "Expected argument `input_shape` to be (C, H, W) with C a positive int "
                f"but got {input_shape!r}"
            )
        self.labels: tuple[str, ...] = labels
        self.input_shape: tuple[int, int | None, int | None] = (
            input_shape[0],
            input_shape[1],
            input_shape[2],
        )
        self.input_range = (
            None if input_range is None else (float(input_range[0]), float(input_range[1]))
        )
        self.model_name = name

    @property
    def num_classes(self) -> int:
        """Number of classes (length of :attr:`labels`)."""
        return len(self.labels)

    def features(self, x: Tensor) -> Tensor:
        """Map preprocessed frames ``(N, C, H, W)`` to feature vectors ``(N, D)``."""
        raise ModelInterfaceError(
            f"Model {self.model_name!r} exposes no features/head split; build it with an "
            "adapter that names the head (e.g. TorchClassifier(model, head='fc'))"
        )

    def head(self, z: Tensor) -> Tensor:
        """Map feature vectors ``(N, D)`` to logits ``(N, num_classes)``."""
        raise ModelInterfaceError(f"Model {self.model_name!r} exposes no classification head")

    def linear_head(self) -> tuple[Tensor, Tensor | None]:
        """Return ``(W, b)`` with ``head(z) == z @ W.T + b`` for strategies that need it."""
        raise ModelInterfaceError(f"Model {self.model_name!r} has no linear head")

    def prepare(self, images: Tensor) -> Tensor:
        """Turn face images into this model's input (the preprocessing it expects).

        ``images``: ``(N, 1 or 3, H, W)`` floats in ``[0, 1]`` (grayscale or RGB face crops of
        any size, e.g. from :mod:`ttaperso.streams` or SynthFace). The default converts the
        channel count (RGB -> luminance, gray -> repeated), resizes to the declared
        ``H x W`` (bilinear with antialiasing) and maps ``[0, 1]`` linearly onto
        :attr:`input_range` when the model declares one. Adapters whose preprocessing
        differs (e.g. CLIP's mean/std normalisation) override it.
        """
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ModelInterfaceError(
                f"Expected argument `images` to be a tensor (N, 1 or 3, H, W) in [0, 1] but got "
                f"{shape}"
            )
        x = images.float()
        c, h, w = self.input_shape
        if x.shape[1] != c:
            if c == 1:
                weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
                x = (x * weights.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
            elif x.shape[1] == 1:
                x = x.expand(-1, c, -1, -1)
            else:
                raise ModelInterfaceError(
                    f"Model {self.model_name!r} expects {c} channels; cannot convert "
                    f"{x.shape[1]}-channel images"
                )
        if h is not None and w is not None and tuple(x.shape[2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        x = x.clamp(0.0, 1.0)
        if self.input_range is not None:
            lo, hi = self.input_range
            x = x * (hi - lo) + lo
        return x.contiguous()

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        z = self.features(x)
        logits = self.head(z)
        return (logits, z) if return_features else logits

    def extra_repr(self) -> str:
        return f"name={self.model_name!r}, labels={self.labels}, input_shape={self.input_shape}"
