"""Collapse guard: detect a subject's adaptation degenerating, without labels, and recover.

Long label-correlated streams (weeks of one patient, minutes of one expression) are where
entropy minimisation collapses: the adapted model ends up predicting one class, very
confidently, whatever the face does. The guard watches three label-free signals over a
window of recent frames, comparing the adapted model with the frozen source model on the
*same* frames (so a subject who is genuinely happy for an hour is not flagged: the frozen
model says happy too):

* **entropy collapse**: the adapted predictions' mean entropy is below
  ``entropy_floor x ln C`` while the frozen model's mean entropy on the same frames is at
  least ``5 x entropy_floor x ln C`` (near one-hot outputs on frames the source model is
  unsure about; a confident source model agreeing is not flagged);
* **dominance**: one class takes more than ``1/C + dominance x (1 - 1/C)`` of the adapted
  probability mass over the window while the frozen model gives that class less than
  ``frozen_support`` times that share on the same frames (soft shares: the mean
  probability per class, so near-uniform outputs whose argmax flips are not "dominated");
* **divergence**: the mean ``KL(adapted || frozen)`` exceeds ``max_divergence x ln C``.

The frozen forward costs one forward of a few frames every ``check_every`` frames (the
last ``sample`` frames of the call that crosses the boundary), so the guard is cheap.

Recovery when any signal fires: ``"snapshot"`` restores the last good snapshot (the
parameters and buffers of the subject as they were one healthy check before the last
healthy check, so the degradation the window needed to become visible is not restored
with it), ``"source"`` resets the subject to the source state. After a snapshot restore the
snapshot falls back to the source, so a second trip before the next healthy check resets
to the source. Recovery keeps the gates' and the guard's own memory (and counts the trip
with its cause); the strategy's other memory (optimizer moments, accumulated gradients,
pending frames, statistic counts) restarts from a fresh subject's values.

Everything the guard remembers (the window, the counters, the two snapshots) lives in the
subject's state under ``memory/guard.*``: it is saved, loaded, reset and isolated with the
subject, and bounded (two copies of the adapted parameters and buffers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import Tensor

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .state import SubjectState

__all__ = [
    "CollapseGuard",
    "GuardEvent",
    "guard_from_dict",
    "CAUSE_ENTROPY",
    "CAUSE_DOMINANCE",
    "CAUSE_DIVERGENCE",
    "cause_names",
    "GuardHost",
    "refresh_snapshots",
]

#: cause bits recorded in ``memory/guard.last_cause``
CAUSE_ENTROPY = 1
CAUSE_DOMINANCE = 2
CAUSE_DIVERGENCE = 4
_CAUSES = {CAUSE_ENTROPY: "entropy", CAUSE_DOMINANCE: "dominance", CAUSE_DIVERGENCE: "divergence"}
_PREFIX = "guard."
_GOOD = "guard.good/"
_CANDIDATE = "guard.cand/"


class GuardHost(Protocol):
    """What the guard needs of the strategy it watches (a :class:`~ttaperso.strategies.Strategy`)."""

    num_classes: int

    def frozen_logits(self, frames: Tensor) -> Tensor:
        """Logits of the unadapted model for ``frames``."""
        ...

    def initial_state(self) -> SubjectState:
        """A fresh subject's state."""
        ...


def cause_names(bits: int) -> list[str]:
    """Names of the signals set in a cause bit mask."""
    return [name for bit, name in _CAUSES.items() if bits & bit]


@dataclass(frozen=True)
class GuardEvent:
    """One recovery, as reported to the audit log."""

    causes: tuple[str, ...]
    frame: int
    recovered_to: str
    signals: dict[str, float]


@dataclass(frozen=True)
class CollapseGuard:
    """Label-free collapse detection and recovery (see the module docstring).

    Args:
        window: paired (adapted, frozen) frames the signals are computed over.
        check_every: frames between two frozen-model checks.
        sample: frames of a checked call run through the frozen model (its last ones).
        min_frames: paired frames needed before any signal is evaluated.
        entropy_floor: entropy-collapse threshold, a fraction of ln C.
        dominance: dominant-class share threshold as ``1/C + dominance x (1 - 1/C)``.
        frozen_support: the dominance signal fires only when the frozen model's share of
            the same class is below ``frozen_support`` x the adapted share.
        max_divergence: threshold on the window's mean KL(adapted || frozen), fraction of
            ln C.
        recover: ``"snapshot"`` (last good snapshot) or ``"source"``.
        signals: which signals may trigger recovery (subset of entropy, dominance,
            divergence).
    """

    window: int = 64
    check_every: int = 8
    sample: int = 4
    min_frames: int = 32
    entropy_floor: float = 0.05
    dominance: float = 0.6
    frozen_support: float = 0.5
    max_divergence: float = 1.0
    recover: Literal["snapshot", "source"] = "snapshot"
    signals: tuple[str, ...] = ("entropy", "dominance", "divergence")

    def __post_init__(self) -> None:
        for name in ("window", "check_every", "sample", "min_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"Expected argument `{name}` of CollapseGuard to be an int >= 1 but got "
                    f"{value!r}"
                )
        if self.min_frames > self.window:
            raise ConfigError(
                "Expected `min_frames` <= `window` in CollapseGuard but got "
                f"{self.min_frames!r} > {self.window!r}"
            )
        for name, upper in (
            ("entropy_floor", 1.0),
            ("dominance", 1.0),
            ("frozen_support", 1.0),
            ("max_divergence", math.inf),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(
                    f"Expected argument `{name}` of CollapseGuard to be a number but got {value!r}"
                )
            if not 0.0 < value <= upper or not math.isfinite(value):
                raise ConfigError(
                    f"Expected argument `{name}` of CollapseGuard to be in (0, {upper}] but got "
                    f"{value!r}"
                )
        if self.recover not in ("snapshot", "source"):
            raise ConfigError(
                "Expected argument `recover` of CollapseGuard to be one of ['snapshot', "
                f"'source'] but got {self.recover!r}"
            )
        signals = self.signals
        if isinstance(signals, str) or not isinstance(signals, (list, tuple)) or not signals:
            raise ConfigError(
                "Expected argument `signals` of CollapseGuard to be a non-empty list of "
                f"{sorted(_CAUSES.values())} but got {signals!r}"
            )
        bad = [s for s in signals if s not in _CAUSES.values()]
        if bad:
            raise ConfigError(
                f"Unknown guard signal(s) {bad}; valid signals: {sorted(_CAUSES.values())}"
            )
        object.__setattr__(self, "signals", tuple(signals))

    # ------------------------------------------------------------- description
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description, inverse of :func:`guard_from_dict`."""
        out = asdict(self)
        out["signals"] = list(self.signals)
        return out

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | CollapseGuard | None) -> CollapseGuard | None:
        """A guard from itself, its :meth:`to_dict` or None (config fields use this)."""
        return guard_from_dict(spec)

    # ------------------------------------------------------------------ memory
    def init_memory(self, state: SubjectState, num_classes: int) -> dict[str, Tensor]:
        """The guard's memory for a fresh subject (keys include the ``guard.`` prefix)."""
        memory: dict[str, Tensor] = {
            "guard.adapted": torch.zeros(self.window, num_classes),
            "guard.frozen": torch.zeros(self.window, num_classes),
            "guard.filled": torch.tensor(0, dtype=torch.int64),
            "guard.pos": torch.tensor(0, dtype=torch.int64),
            "guard.since": torch.tensor(0, dtype=torch.int64),
            "guard.frames": torch.tensor(0, dtype=torch.int64),
            "guard.trips": torch.tensor(0, dtype=torch.int64),
            "guard.last_cause": torch.tensor(0, dtype=torch.int64),
            "guard.last_trip_frame": torch.tensor(-1, dtype=torch.int64),
        }
        if self.recover == "snapshot":
            for prefix in (_GOOD, _CANDIDATE):
                for key, value in _model_tensors(state).items():
                    memory[prefix + key] = value.detach().clone()
        return memory

    def describe(self, state: SubjectState) -> dict[str, Any]:
        """JSON-safe counters of the guard in ``state`` (for ``Personalizer.inspect``)."""
        memory = state.memory
        return {
            "trips": int(memory["guard.trips"]),
            "last_cause": cause_names(int(memory["guard.last_cause"])),
            "last_trip_frame": int(memory["guard.last_trip_frame"]),
            "frames": int(memory["guard.frames"]),
        }

    # ---------------------------------------------------------------- checking
    def signals_of(self, adapted: Tensor, frozen: Tensor) -> dict[str, float]:
        """The three signals over paired probability rows ``(n, C)`` (pure function)."""
        c = adapted.shape[1]
        log_c = math.log(c)
        eps = 1e-12
        h_a = float(-(adapted * (adapted + eps).log()).sum(1).mean()) / log_c
        h_f = float(-(frozen * (frozen + eps).log()).sum(1).mean()) / log_c
        # Soft shares (mean probability mass per class): argmax counts of near-uniform
        # outputs flip on noise and would flag an undecided model as "dominated".
        mass_a = adapted.mean(0)
        top = int(mass_a.argmax())
        share_a = float(mass_a[top])
        share_f = float(frozen.mean(0)[top])
        kl = float((adapted * ((adapted + eps).log() - (frozen + eps).log())).sum(1).mean()) / log_c
        return {
            "entropy": h_a,
            "frozen_entropy": h_f,
            "dominant_class": float(top),
            "dominant_share": share_a,
            "frozen_share": share_f,
            "divergence": kl,
        }

    def causes_of(self, s: Mapping[str, float], num_classes: int) -> int:
        """Bit mask of the enabled signals that fire for the values ``s``."""
        bits = 0
        # Near one-hot outputs on frames the source model is unsure about (a confident
        # source model agreeing with a confident adapted one is not a collapse).
        if s["entropy"] < self.entropy_floor and s["frozen_entropy"] >= 5.0 * self.entropy_floor:
            bits |= CAUSE_ENTROPY
        threshold = 1.0 / num_classes + self.dominance * (1.0 - 1.0 / num_classes)
        if (
            s["dominant_share"] > threshold
            and s["frozen_share"] < self.frozen_support * s["dominant_share"]
        ):
            bits |= CAUSE_DOMINANCE
        if s["divergence"] > self.max_divergence:
            bits |= CAUSE_DIVERGENCE
        enabled = sum(bit for bit, name in _CAUSES.items() if name in self.signals)
        return bits & enabled

    @torch.no_grad()
    def observe(
        self, strategy: GuardHost, state: SubjectState, frames: Tensor, logits: Tensor
    ) -> GuardEvent | None:
        """Account for one predict call; check and recover when a check is due.

        ``logits`` are the adapted model's outputs for ``frames`` (the ones returned).
        Returns the recovery event when the guard tripped, else None.
        """
        n = frames.shape[0]
        memory = state.memory
        memory["guard.frames"] += n
        memory["guard.since"] += n
        if int(memory["guard.since"]) < self.check_every:
            return None
        memory["guard.since"].zero_()
        take = min(self.sample, n)
        frozen = strategy.frozen_logits(frames[n - take :]).float().softmax(1).cpu()
        adapted = logits[n - take :].float().softmax(1).cpu()
        if not bool(torch.isfinite(frozen).all()):
            return None  # the source model overflowed on these frames: no evidence either way
        self._push(memory, adapted, frozen)
        filled = int(memory["guard.filled"])
        if filled < self.min_frames:
            return None
        s = self.signals_of(memory["guard.adapted"][:filled], memory["guard.frozen"][:filled])
        bits = self.causes_of(s, strategy.num_classes)
        if not bits:
            self._promote(state)
            return None
        return self._recover(strategy, state, bits, s)

    def _push(self, memory: dict[str, Tensor], adapted: Tensor, frozen: Tensor) -> None:
        pos = int(memory["guard.pos"])
        for a, f in zip(adapted, frozen, strict=True):
            memory["guard.adapted"][pos] = a
            memory["guard.frozen"][pos] = f
            pos = (pos + 1) % self.window
        memory["guard.pos"].fill_(pos)
        memory["guard.filled"].fill_(min(self.window, int(memory["guard.filled"]) + len(adapted)))

    def _promote(self, state: SubjectState) -> None:
        """Healthy check: good <- candidate <- current (one check of delay)."""
        if self.recover != "snapshot":
            return
        current = _model_tensors(state)
        for key in current:
            state.memory[_GOOD + key].copy_(state.memory[_CANDIDATE + key])
            state.memory[_CANDIDATE + key].copy_(current[key])

    def _recover(
        self, strategy: GuardHost, state: SubjectState, bits: int, signals: dict[str, float]
    ) -> GuardEvent:
        fresh = strategy.initial_state()
        restored = "source"
        if self.recover == "snapshot":
            good = {k[len(_GOOD) :]: v for k, v in state.memory.items() if k.startswith(_GOOD)}
            source = _model_tensors(fresh)
            differs = any(not torch.equal(v, source[k]) for k, v in good.items())
            if differs:
                for key, value in good.items():
                    group, _, name = key.partition("/")
                    getattr(fresh, group)[name] = value.clone()
                restored = "snapshot"
        # Keep the gates', smoothing's and the guard's memory and the neutral-baseline
        # calibration (a property of the subject, not of the adaptation); the rest restarts.
        kept = {
            k: v
            for k, v in state.memory.items()
            if k.startswith((_PREFIX, "gate", "smooth.", "calib."))
        }
        state.params = fresh.params
        state.buffers = fresh.buffers
        state.optim = {}
        state.memory = {**fresh.memory, **kept}
        memory = state.memory
        memory["guard.filled"].zero_()
        memory["guard.pos"].zero_()
        memory["guard.trips"] += 1
        memory["guard.last_cause"].fill_(bits)
        memory["guard.last_trip_frame"].copy_(memory["guard.frames"])
        if self.recover == "snapshot":
            source = _model_tensors(strategy.initial_state())
            current = _model_tensors(state)
            for key in current:
                # Next trip before a healthy check goes to the source.
                memory[_GOOD + key].copy_(source[key])
                memory[_CANDIDATE + key].copy_(current[key])
        return GuardEvent(
            causes=tuple(cause_names(bits)),
            frame=int(memory["guard.frames"]),
            recovered_to=restored,
            signals=signals,
        )


def refresh_snapshots(state: SubjectState) -> None:
    """Make the current parameters and buffers the guard's snapshots (if it keeps any).

    Called after a deliberate change of the subject's baseline (neutral-baseline
    calibration), so that a recovery returns to the new baseline rather than to before it.
    """
    current = _model_tensors(state)
    for prefix in (_GOOD, _CANDIDATE):
        for key, value in current.items():
            slot = state.memory.get(prefix + key)
            if slot is not None:
                slot.copy_(value)


def _model_tensors(state: SubjectState) -> dict[str, Tensor]:
    """``params/<name>`` and ``buffers/<name>`` of a state (what snapshots hold)."""
    out = {f"params/{k}": v for k, v in state.params.items()}
    out.update({f"buffers/{k}": v for k, v in state.buffers.items()})
    return out


def guard_from_dict(spec: Mapping[str, Any] | CollapseGuard | None) -> CollapseGuard | None:
    """Build a guard from :meth:`CollapseGuard.to_dict` output (a guard or None passes)."""
    if spec is None or isinstance(spec, CollapseGuard):
        return spec
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"Expected a guard to be a CollapseGuard, a mapping of its options or None but got "
            f"{spec!r}"
        )
    valid = [f.name for f in fields(CollapseGuard)]
    unknown = sorted(set(spec) - set(valid))
    if unknown:
        raise ConfigError(
            f"Unknown option(s) {unknown} for CollapseGuard; valid options: {', '.join(valid)}"
        )
    options = dict(spec)
    if isinstance(options.get("signals"), list):
        options["signals"] = tuple(options["signals"])
    return CollapseGuard(**options)
