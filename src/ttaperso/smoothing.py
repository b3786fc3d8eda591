"""Output smoothing: average a subject's returned probabilities over its recent frames.

Separate from the gates (:mod:`ttaperso.gates`): smoothing changes what ``predict``
returns, never what adapts. The recent rows live in the subject's state
(``memory/smooth.probs``), so they are saved, reset and isolated with the subject.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SMOOTHING_MEMORY", "smooth_probs"]

#: memory key of the last ``window - 1`` probability rows of a subject
SMOOTHING_MEMORY = "smooth.probs"


def smooth_probs(memory: dict[str, Tensor], probs: Tensor, window: int) -> Tensor:
    """Average each frame's probabilities with the previous ``window - 1`` frames' (in order).

    ``memory`` holds the last ``window - 1`` probability rows (``smooth.probs``) of the
    subject; it is updated in place.
    """
    if window <= 1:
        return probs
    past = memory[SMOOTHING_MEMORY]
    sequence = torch.cat([past.to(probs.dtype), probs], dim=0)
    n_past = past.shape[0]
    out = torch.empty_like(probs)
    for i in range(probs.shape[0]):
        end = n_past + i + 1
        out[i] = sequence[max(0, end - window) : end].mean(dim=0)
    memory[SMOOTHING_MEMORY] = sequence[-(window - 1) :].detach().clone()
    return out
