"""What :meth:`~ttaperso.Personalizer.predict` returns."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["Prediction"]


@dataclass(frozen=True)
class Prediction:
    """What :meth:`Personalizer.predict` returns for a batch of ``N`` frames.

    Attributes:
        subject: the subject id.
        logits: ``(N, C)`` logits of the subject's model (before output smoothing).
        probs: ``(N, C)`` class probabilities (smoothed over the subject's recent frames
            when the strategy's ``smoothing`` > 1).
        labels: ``(N,)`` predicted class indices (argmax of ``probs``).
        updated: ``(N,)`` bool, True where the frame passed the gates and went into the
            subject's state (statistics, accumulated gradients, or SAR's pending buffer,
            whose own reliability filter may still leave it out of the SAM step).
        class_names: the model's class labels.
    """

    subject: str
    logits: Tensor
    probs: Tensor
    labels: Tensor
    updated: Tensor
    class_names: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        """Predicted class names, one per frame."""
        return [self.class_names[i] for i in self.labels.tolist()]
