"""Pure tensor maths shared by strategies and gates (tested on their own)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "softmax_entropy",
    "normalized_entropy",
    "window_majority",
    "mix_moments",
]


def softmax_entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of the softmax of each row of ``logits``: shape ``(N,)``."""
    log_probs = logits.log_softmax(dim=1)
    return -(log_probs.exp() * log_probs).sum(dim=1)


def normalized_entropy(logits: Tensor) -> Tensor:
    """Softmax entropy divided by ``ln C``: 0 for a one-hot, 1 for the uniform distribution.

    Thresholds in ttaperso are fractions of ``ln C`` so they mean the same for a
    2-class pain detector and a 7-class FER head (ImageNet thresholds do not transfer).
    """
    return softmax_entropy(logits) / math.log(logits.shape[1])


def window_majority(history: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Most frequent label in ``history`` (entries < 0 are empty slots) and its count.

    Ties go to the smallest label index, so the result is deterministic.
    """
    valid = history[history >= 0]
    if valid.numel() == 0:
        return torch.tensor(-1), torch.tensor(0)
    counts = torch.bincount(valid, minlength=num_classes)
    count, label = counts.max(dim=0)
    return label, count


def mix_moments(
    mean_a: Tensor,
    var_a: Tensor,
    weight_a: float | Tensor,
    mean_b: Tensor,
    var_b: Tensor,
    weight_b: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """Mean and variance of the mixture of two populations with the given weights.

    The variance keeps the between-group term, so mixing the source statistics with a
    shifted batch widens the variance instead of underestimating it.
    """
    total = weight_a + weight_b
    wa = weight_a / total
    wb = weight_b / total
    if not isinstance(wa, Tensor) and not isinstance(wb, Tensor):
        # Same mixture in 4 kernels instead of 11 (it runs per BN layer per call): with
        # d = mean_b - mean_a, mean = mean_a + wb d and var = wa var_a + wb var_b + wa wb d^2.
        d = mean_b - mean_a
        mean = torch.add(mean_a, d, alpha=wb)
        var = torch.addcmul(torch.lerp(var_a, var_b, wb), d, d, value=wa * wb)
        return mean, var
    mean = wa * mean_a + wb * mean_b
    var = wa * (var_a + (mean_a - mean) ** 2) + wb * (var_b + (mean_b - mean) ** 2)
    return mean, var
