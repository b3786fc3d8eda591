"""The runtime's model interface.

A strategy never guesses a model's structure from module names. It talks to a
:class:`FERModel`, which states what it is: class labels, expected input, and, when it
can, a split into ``features(x) -> z`` and ``head(z) -> logits``. Model families get an
adapter in :mod:`ttaperso.adapters` that builds one.
"""

from __future__ import annotations

from collections.abc import Sequence

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
        self.input_shape = tuple(input_shape)
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

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        z = self.features(x)
        logits = self.head(z)
        return (logits, z) if return_features else logits

    def extra_repr(self) -> str:
        return f"name={self.model_name!r}, labels={self.labels}, input_shape={self.input_shape}"
