"""Temporal-consistency gates: which frames may update a subject's state.

A gate decides, per frame, whether that frame may update a subject's state. Gates are
small frozen config objects; whatever they remember (the recent predictions) lives in the
subject's state under ``memory/gate<i>.<kind>.*``, so it is saved, restored and reset with
the subject and never shared between subjects. A strategy's gates are combined with AND;
every gate sees every frame (the temporal history records rejected frames too).

Output smoothing (averaging the probabilities over the last few frames) is separate
(:mod:`ttaperso.smoothing`): it changes what ``predict`` returns, not what adapts.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from .errors import ConfigError
from .functional import normalized_entropy

__all__ = [
    "PROTOTYPE_SCORES",
    "Gate",
    "GateBatch",
    "TemporalGate",
    "EntropyGate",
    "PrototypeGate",
    "gate_from_dict",
    "list_gates",
]


#: ``GateBatch.extras`` key of ``(N, C)`` cosine similarities of each frame's feature to
#: the subject's class prototypes (computed by strategies that keep prototypes: ``tta_cap``)
PROTOTYPE_SCORES = "prototype_scores"


@dataclass(frozen=True)
class GateBatch:
    """What the gates see of one call's frames (built per call: nothing is shared).

    Attributes:
        logits: ``(N, C)`` detached logits as predicted (calibration offset included).
        labels: ``(N,)`` predicted classes (CPU).
        features: ``(N, D)`` detached features when the strategy's forward returns them.
        extras: per-frame values the strategy's head computed (see ``Strategy.provides``),
            e.g. :data:`PROTOTYPE_SCORES`.
    """

    logits: Tensor
    labels: Tensor
    features: Tensor | None = None
    extras: Mapping[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Gate:
    """Base class: admit every frame. Subclasses override :meth:`admit` and, when they
    remember something, :meth:`init_memory`; ``requires`` names the
    :attr:`GateBatch.extras` they read (checked against the strategy when it is built)."""

    kind: ClassVar[str] = "gate"
    requires: ClassVar[frozenset[str]] = frozenset()

    def init_memory(self, num_classes: int) -> dict[str, Tensor]:
        """Initial memory of this gate for one subject (keys without the gate prefix)."""
        return {}

    def admit(self, memory: dict[str, Tensor], batch: GateBatch) -> Tensor:
        """Boolean mask ``(N,)`` of the frames that may update the state; updates ``memory``."""
        return torch.ones(batch.labels.shape[0], dtype=torch.bool)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description, inverse of :func:`gate_from_dict`."""
        return {"kind": self.kind, **asdict(self)}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | Gate) -> Gate:
        """A gate from itself or its :meth:`to_dict` (config fields use this)."""
        return gate_from_dict(spec)


@dataclass(frozen=True)
class TemporalGate(Gate):
    """Admit a frame only if its prediction is the majority of the last ``window`` predictions.

    The window includes the frame itself, and the majority must hold at least
    ``ceil(min_agreement * window)`` votes, so the first frames of a subject are not
    admitted until enough history agrees (a video's first frames are cheap to skip).

    Args:
        window: number of recent predictions considered (W).
        min_agreement: fraction of the window the frame's class must hold.
    """

    kind: ClassVar[str] = "temporal"
    window: int = 5
    min_agreement: float = 0.6

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise ConfigError(
                f"Expected argument `window` of TemporalGate to be a positive int but got {self.window!r}"
            )
        if not isinstance(self.min_agreement, (int, float)) or not 0.0 < self.min_agreement <= 1.0:
            raise ConfigError(
                "Expected argument `min_agreement` of TemporalGate to be in (0, 1] "
                f"but got {self.min_agreement!r}"
            )

    @property
    def required_votes(self) -> int:
        return max(1, math.ceil(self.min_agreement * self.window - 1e-9))

    def init_memory(self, num_classes: int) -> dict[str, Tensor]:
        return {"history": torch.full((self.window,), -1, dtype=torch.int64)}

    def admit(self, memory: dict[str, Tensor], batch: GateBatch) -> Tensor:
        history = memory["history"].tolist()
        admitted: list[bool] = []
        for label in batch.labels.tolist():
            history = history[1:] + [label]
            votes = Counter(h for h in history if h >= 0)
            top = max(votes.values())
            admitted.append(votes[label] == top and votes[label] >= self.required_votes)
        memory["history"] = torch.tensor(history, dtype=torch.int64)
        return torch.tensor(admitted, dtype=torch.bool)


@dataclass(frozen=True)
class EntropyGate(Gate):
    """Admit frames whose softmax entropy lies in ``[min_entropy, max_entropy)`` x ``ln C``.

    Thresholds are fractions of ``ln C``: 0.4 is SAR/EATA's E0 = 0.4 ln C for any number of
    classes (their code hard-codes ln 1000).
    """

    kind: ClassVar[str] = "entropy"
    max_entropy: float = 0.4
    min_entropy: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_entropy", "min_entropy"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0.0 <= value <= 1.0
            ):
                raise ConfigError(
                    f"Expected argument `{name}` of EntropyGate to be a fraction of ln C in [0, 1] "
                    f"but got {value!r}"
                )
        if self.min_entropy >= self.max_entropy:
            raise ConfigError(
                "Expected `min_entropy` < `max_entropy` in EntropyGate but got "
                f"{self.min_entropy!r} >= {self.max_entropy!r}"
            )

    def admit(self, memory: dict[str, Tensor], batch: GateBatch) -> Tensor:
        h = normalized_entropy(batch.logits.detach().float())
        return (h >= self.min_entropy) & (h < self.max_entropy)


@dataclass(frozen=True)
class PrototypeGate(Gate):
    """Admit a frame only if its nearest class prototype agrees with its prediction.

    TTA-CaP's prototype-consistency gate: the class whose prototype is most similar (cosine)
    to the frame's feature must be the predicted class, ahead of the second most similar
    prototype by more than ``margin``. The similarities come from a strategy that keeps
    prototypes (``tta_cap``'s personalised source prototypes) in the call's
    :attr:`GateBatch.extras` under :data:`PROTOTYPE_SCORES`; a strategy that computes none
    is refused when it is built.

    Args:
        margin: minimum cosine gap between the best and second-best prototype.
    """

    kind: ClassVar[str] = "prototype"
    requires: ClassVar[frozenset[str]] = frozenset({PROTOTYPE_SCORES})
    margin: float = 0.05

    def __post_init__(self) -> None:
        value = self.margin
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 2:
            raise ConfigError(
                "Expected argument `margin` of PrototypeGate to be a cosine gap in [0, 2) "
                f"but got {value!r}"
            )

    def admit(self, memory: dict[str, Tensor], batch: GateBatch) -> Tensor:
        scores = batch.extras.get(PROTOTYPE_SCORES)
        if scores is None:  # the strategy check at build time makes this unreachable
            raise ConfigError(
                "PrototypeGate needs prototype similarities, which only a strategy with class "
                "prototypes (tta_cap) supplies; remove it from this strategy's gates"
            )
        return self.admit_scores(scores, batch.labels)

    def admit_scores(self, scores: Tensor, labels: Tensor) -> Tensor:
        """Mask ``(N,)`` from prototype similarities ``scores (N, C)`` and predictions."""
        top = scores.detach().float().topk(min(2, scores.shape[1]), dim=1)
        agrees = top.indices[:, 0].cpu() == labels.cpu()
        if scores.shape[1] < 2:
            return agrees
        return agrees & ((top.values[:, 0] - top.values[:, 1]).cpu() > self.margin)


_GATES: dict[str, type[Gate]] = {
    "temporal": TemporalGate,
    "entropy": EntropyGate,
    "prototype": PrototypeGate,
}


def list_gates() -> list[str]:
    """Names of the available gate kinds."""
    return sorted(_GATES)


def gate_from_dict(spec: Mapping[str, Any] | Gate) -> Gate:
    """Build a gate from ``{"kind": ..., **options}`` (a :class:`Gate` passes through)."""
    if isinstance(spec, Gate):
        return spec
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise ConfigError(
            f"Expected a gate to be a Gate or a mapping with a 'kind' key but got {spec!r}"
        )
    kind = spec["kind"]
    if kind not in _GATES:
        raise ConfigError(f"Unknown gate kind {kind!r}; available: {', '.join(list_gates())}")
    cls = _GATES[kind]
    options = {k: v for k, v in spec.items() if k != "kind"}
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(
            f"Unknown option(s) {unknown} for gate {kind!r}; valid options: {', '.join(valid)}"
        )
    return cls(**options)
