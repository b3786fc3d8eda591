"""Value-range checks of a loaded subject state: values no adaptation can produce.

A state file whose tensors have the right keys, shapes and dtypes (the strategy's
``check_state``) can still hold impossible values: a negative or zero variance, a BN
weight of 1e30, a negative frame count, a class label beyond the model's classes. Such a
state would load and then make every prediction of the subject fail (or, worse, silently
wrong). :func:`check_state_values` refuses it on load with a
:class:`~ttaperso.errors.StateFileError` naming the tensor.

The rules read the on-disk key (``group/name``) of every tensor, so they cover the
built-in strategies' tensors and the guard's snapshots; a strategy with other meanings
for its memory would need a hook of its own (none has one yet).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .errors import StateFileError

__all__ = ["MAX_MAGNITUDE", "REFERENCE_FACTOR", "check_state_values"]

#: every float value must satisfy |x| <= max(MAX_MAGNITUDE, REFERENCE_FACTOR x the largest
#: |x| of the same tensor in the source state): far beyond what adaptation reaches, far
#: below what overflows a forward pass
MAX_MAGNITUDE = 1e6
REFERENCE_FACTOR = 1e3
#: names (last part of a key) that count frames, steps or events: never negative
_COUNT_WORDS = (
    "count",
    "pending",
    "frames",
    "trips",
    "resets",
    "updates",
    "selected",
    "filled",
    "since",
    "step",
    "admitted",
    "rejected",
)
_PROBABILITIES = ("probs", "mean_probs", "last_probs", "adapted", "frozen")
#: guard snapshots hold copies of params/buffers under these prefixes
_SNAPSHOTS = ("memory/guard.good/", "memory/guard.cand/")
_TOLERANCE = 1e-3


def _name(key: str) -> str:
    """``buffers/network.1.running_var`` -> ``running_var``; ``memory/norm.count`` -> ``count``."""
    return key.rsplit("/", 1)[-1].rsplit(".", 1)[-1]


def _reference_key(key: str) -> str:
    for prefix in _SNAPSHOTS:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _refuse(where: str, key: str, found: str, expected: str) -> StateFileError:
    return StateFileError(
        f"{where}: tensor {key} holds {found}, expected {expected}; the state file was "
        "edited or corrupted and is refused"
    )


def _bound(key: str, reference: Mapping[str, Tensor] | None) -> float:
    ref = None if reference is None else reference.get(_reference_key(key))
    if ref is None or not ref.is_floating_point() or ref.numel() == 0:
        return MAX_MAGNITUDE
    return max(MAX_MAGNITUDE, REFERENCE_FACTOR * float(ref.detach().abs().max()))


def _check_float(
    where: str, key: str, t: Tensor, num_classes: int, reference: Mapping[str, Tensor] | None
) -> None:
    values = t.detach().to(torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise _refuse(where, key, "NaN or infinite values", "finite values")
    lo, hi = float(values.min()), float(values.max())
    bound = _bound(key, reference)
    if max(-lo, hi) > bound:
        raise _refuse(where, key, f"values in [{lo:.4g}, {hi:.4g}]", f"|value| <= {bound:.4g}")
    name = _name(key)
    if name.endswith("running_var") and lo <= 0.0:
        raise _refuse(where, key, f"a variance of {lo:.4g}", "variances > 0")
    if name.endswith("_sq") and lo < 0.0:
        raise _refuse(where, key, f"a squared sum of {lo:.4g}", "values >= 0")
    if name in _PROBABILITIES and (lo < -_TOLERANCE or hi > 1.0 + _TOLERANCE):
        raise _refuse(where, key, f"probabilities in [{lo:.4g}, {hi:.4g}]", "values in [0, 1]")
    if "entropy" in name:
        top = max(1.0, math.log(max(num_classes, 2))) + _TOLERANCE
        if lo < -_TOLERANCE or hi > top:
            raise _refuse(
                where, key, f"entropies in [{lo:.4g}, {hi:.4g}]", f"values in [0, {top:.4g}]"
            )
    if t.dim() == 0 and any(w in name for w in _COUNT_WORDS) and lo < 0.0:
        raise _refuse(where, key, f"a count of {lo:.4g}", "a count >= 0")


def _check_int(where: str, key: str, t: Tensor, num_classes: int) -> None:
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    name = _name(key)
    if any(w in name for w in _COUNT_WORDS) and lo < 0:
        raise _refuse(where, key, f"a count of {lo}", "counts >= 0")
    if name == "labels" and (lo < 0 or hi >= num_classes):
        raise _refuse(
            where, key, f"class indices in [{lo}, {hi}]", f"indices in [0, {num_classes - 1}]"
        )
    if name == "history" and (lo < -1 or hi >= num_classes):
        raise _refuse(
            where,
            key,
            f"class indices in [{lo}, {hi}]",
            f"indices in [0, {num_classes - 1}] or -1 (empty)",
        )


def _check_guard_window(where: str, tensors: Mapping[str, Tensor]) -> None:
    window = tensors.get("memory/guard.adapted")
    if window is None or window.dim() < 1:
        return
    size = int(window.shape[0])
    for key, top in (("memory/guard.pos", size - 1), ("memory/guard.filled", size)):
        t = tensors.get(key)
        if t is not None and t.numel() == 1 and not 0 <= int(t) <= max(top, 0):
            raise _refuse(where, key, f"{int(t)}", f"a position in [0, {max(top, 0)}]")


def check_state_values(
    tensors: Mapping[str, Tensor],
    *,
    where: str,
    num_classes: int,
    reference: Mapping[str, Tensor] | None = None,
) -> None:
    """Refuse a state (on-disk keys) holding values no adaptation can produce.

    Every float tensor finite and bounded (see :data:`MAX_MAGNITUDE`; ``reference``, the
    source state's tensors, widens the bound for models with large values); variances
    (``*running_var``) > 0, squared sums (``*_sq``) >= 0, probabilities in [0, 1],
    entropies in [0, max(1, ln C)], counts >= 0, class labels in [0, C), the guard's
    window position inside its window. Raises StateFileError naming the tensor.
    """
    for key, t in tensors.items():
        if t.is_complex():
            raise _refuse(where, key, f"complex values ({t.dtype})", "real values")
        if t.is_floating_point():
            if t.numel():
                _check_float(where, key, t, num_classes, reference)
        elif t.dtype != torch.bool:
            _check_int(where, key, t, num_classes)
    _check_guard_window(where, tensors)
