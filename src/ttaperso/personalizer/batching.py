"""Several subjects in one forward: chunking within the per-call limits, splitting outputs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from ..errors import InputError
from ..runtime import ForwardOutput
from ..validation import MAX_FRAMES_PER_CALL, MAX_VALUES_PER_CALL

__all__ = ["check_finite_outputs", "chunk_subjects", "split_output"]


def chunk_subjects(batches: Mapping[str, Tensor]) -> list[list[str]]:
    """Subjects grouped so that one forward per group stays within the per-call limits."""
    groups: list[list[str]] = [[]]
    frames = values = 0
    shape: tuple[int, ...] | None = None
    for key, x in batches.items():
        # A chunk holds frames of one shape (models with free H/W may get several)
        # within the per-call limits that a single predict call enforces.
        fits = (
            frames + x.shape[0] <= MAX_FRAMES_PER_CALL
            and values + x.numel() <= MAX_VALUES_PER_CALL
            and (shape is None or tuple(x.shape[1:]) == shape)
        )
        if not fits:
            groups.append([])
            frames = values = 0
        groups[-1].append(key)
        frames, values, shape = frames + x.shape[0], values + x.numel(), tuple(x.shape[1:])
    return groups


def split_output(
    out: ForwardOutput, group: list[str], batches: Mapping[str, Tensor]
) -> dict[str, ForwardOutput]:
    """One subject's slice of a forward run over the concatenated frames of ``group``."""
    outputs: dict[str, ForwardOutput] = {}
    start = 0
    for key in group:
        part = slice(start, start + batches[key].shape[0])
        outputs[key] = ForwardOutput(
            logits=out.logits[part],
            features=None if out.features is None else out.features[part],
            leaves={},
            moments=None
            if out.moments is None
            else {k: (m[part], sq[part]) for k, (m, sq) in out.moments.items()},
            extras={k: v[part] for k, v in out.extras.items()},
        )
        start = part.stop
    return outputs


def check_finite_outputs(outputs: Iterable[ForwardOutput]) -> None:
    """Refuse (changing nothing) when any logits, features or BN moments are not finite."""
    checked: list[Tensor] = []
    for out in outputs:
        checked.append(out.logits.detach().reshape(-1))
        if out.features is not None:
            checked.append(out.features.detach().reshape(-1))
        for m, sq in (out.moments or {}).values():
            checked += [m.reshape(-1), sq.reshape(-1)]
    if checked and not bool(torch.isfinite(torch.cat(checked)).all()):
        raise InputError(
            "The model produced non-finite logits, features or activation statistics for these "
            "frames (extreme input values?); no subject's state was changed"
        )
