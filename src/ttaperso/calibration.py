"""Neutral-baseline calibration: start a subject from a short neutral recording.

Clinicians record a few seconds of the patient's resting face before a session. For the
BN-statistics strategies (``norm``, ``tent``, ``sar``) those frames are folded into the
subject's running BN estimate exactly as admitted frames would be (no gates, no gradient
step): the estimate becomes a mixture, weighted in frames, of the source statistics (weight
``source_prior``, or the subject's current count) and the neutral frames' statistics. The
camera, lighting and face-shape part of the subject's shift is then corrected from the
first frame of the session instead of after a few dozen.

Strategies opt in through the :meth:`~ttaperso.strategies.base.Strategy.calibrate` hook
(``calibrates_statistics``; the BN-statistics strategies share
:meth:`~ttaperso.strategies.norm.NormStrategy.calibrate_statistics`); the base class
refuses with a clear error. When the strategy has a collapse guard with
snapshot recovery, the calibrated state becomes the guard's last good snapshot, so a
recovery returns to the calibrated baseline rather than to before it.

BN statistics are class-agnostic: they correct the camera and the face's appearance, not a
*resting-face bias* (a neutral face that the model reads as sad or surprised). For that,
every strategy also gets an expression-relative **logit offset** (:func:`neutral_logit_offset`):
each class whose mean logit on the neutral recording exceeds the neutral class's (minus a
margin) is lowered by that excess, so the recording reads neutral on average by the margin,
and classes the resting face does not resemble are left alone. The offset lives in the
subject's state (``memory/calib.offset``), is added to the logits of every later prediction
(and so seen by the gates), and is kept by collapse-guard recoveries; adaptation objectives
still use the model's own logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import ConfigError, InputError

__all__ = ["DEFAULT_MARGIN", "neutral_logit_offset"]

#: default margin (in logits, i.e. nats of probability ratio) by which the neutral class
#: should lead on the neutral recording after the offset; fixed a priori, not tuned
DEFAULT_MARGIN = 1.0


def neutral_logit_offset(logits: Tensor, neutral: int, margin: float = DEFAULT_MARGIN) -> Tensor:
    """Per-class logit offset ``(C,)`` that makes a neutral recording read neutral.

    ``offset[c] = min(0, mean(logits[:, neutral]) - mean(logits[:, c]) - margin)`` for
    ``c != neutral`` and 0 for the neutral class: only classes that the resting face looks
    like (on average within ``margin`` of neutral, or above it) are lowered, and only by
    as much as needed. Mean logit differences equal mean log-probability ratios, so the
    offset does not depend on the logits' per-frame constant.
    """
    if logits.dim() != 2 or not 0 <= neutral < logits.shape[1]:
        raise InputError(
            f"Expected logits (N, C) and a neutral class index in [0, C) but got shape "
            f"{tuple(logits.shape)} and index {neutral}"
        )
    if not margin >= 0.0 or margin == float("inf"):
        raise ConfigError(f"Expected argument `margin` to be a finite number >= 0 but got {margin}")
    mean = logits.detach().float().mean(dim=0)
    offset = torch.clamp(mean[neutral] - mean - margin, max=0.0)
    offset[neutral] = 0.0
    return offset
