"""Neutral-baseline calibration of one subject (see :mod:`ttaperso.calibration`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..calibration import neutral_logit_offset
from ..errors import ConfigError, InputError
from ..state import SubjectState
from ..strategies import CALIBRATION_OFFSET, Strategy

__all__ = ["calibrate_state", "neutral_index"]


def neutral_index(labels: tuple[str, ...], neutral_label: str | None) -> int | None:
    """Index of ``neutral_label`` among ``labels`` (None: no offset wanted or possible)."""
    if neutral_label is None:
        return None
    if not isinstance(neutral_label, str):
        raise ConfigError(
            f"Expected argument `neutral_label` to be a str or None but got "
            f"{type(neutral_label).__name__}"
        )
    lowered = [label.lower() for label in labels]
    if neutral_label.lower() in lowered:
        return lowered.index(neutral_label.lower())
    if neutral_label != "neutral":  # an explicit label that does not exist is an error
        raise ConfigError(
            f"neutral_label {neutral_label!r} is not one of the model's labels {list(labels)}"
        )
    return None


def calibrate_state(
    strategy: Strategy, working: SubjectState, frames: Tensor, neutral: int | None, margin: float
) -> dict[str, Any]:
    """Calibrate ``working`` (a copy the caller commits) from neutral ``frames``.

    Statistics first (when the strategy calibrates statistics), then the logit offset
    (when ``neutral`` is a class index). Returns the audit record's data.
    """
    if strategy.calibrates_statistics:
        strategy.calibrate(working, frames)
    record: dict[str, Any] = {"frames": int(frames.shape[0])}
    if neutral is not None:
        with torch.no_grad():
            logits = strategy.forward(working, frames).logits.detach()
        if not bool(torch.isfinite(logits).all()):
            raise InputError(
                "The model produced non-finite logits for the neutral frames; the "
                "subject's state was not changed"
            )
        offset = neutral_logit_offset(logits, neutral, margin)
        working.memory[CALIBRATION_OFFSET] = offset.to(strategy.runtime.dtype)
        labels = strategy.runtime.labels
        record.update(neutral_label=labels[neutral], logit_offset=offset.tolist())
    return record
