"""The strategy base class: it owns the per-call loop; a strategy fills in a few hooks.

One ``predict`` call for one subject runs :meth:`Strategy.step` on a *copy* of the
subject's state (the Personalizer makes it live only when the whole call succeeded):

1. :meth:`~Strategy.forward` = :meth:`~Strategy.model_forward` (the shared model with the
   subject's tensors swapped in) then :meth:`~Strategy.head` (the subject-specific part);
2. :meth:`~Strategy.finish`: one finiteness check, the subject's calibration offset, the
   gates (:meth:`~Strategy.apply_gates`, every gate sees every frame), :meth:`~Strategy.adapt`,
   the collapse guard and output smoothing.

**Class variables** a strategy sets:

* ``config_class``: its config dataclass (a :class:`~ttaperso.config.StrategyConfig`);
* capabilities, declared (never guessed from overrides; ``tests/test_capabilities.py``
  checks each against behaviour): ``needs_gradients`` (its step takes gradients, so it
  refuses ``torch.inference_mode``), ``shares_model_forward`` (the model part is the same
  for every subject: :meth:`~Strategy.shared_forward`), ``batches_subjects`` (it implements
  :meth:`~Strategy.batched_model_forward`), ``calibrates_statistics`` (it implements
  :meth:`~Strategy.calibrate`), ``uses_features`` (its model forward returns features),
  ``uses_source`` (``"no"``, ``"optional"``, ``"required"``: a source-domain sample),
  ``provides`` (names of the per-frame ``extras`` its head computes, for gates that
  require them);
* state layout: ``variable_memory`` (memory keys whose first dimension varies) and
  ``per_param_memory`` (prefixes of memory tensors shaped like an adapted parameter).

**Hooks** (all optional; the base class is the ``source`` strategy):
:meth:`~Strategy.init_state` (the tensors a fresh subject owns), :meth:`~Strategy.trainable`,
:meth:`~Strategy.bn_prior`, :meth:`~Strategy.collects_moments` (how the model forward runs),
:meth:`~Strategy.head`, :meth:`~Strategy.adapt` (the update), and less often
:meth:`~Strategy.model_forward` / :meth:`~Strategy.forward` (a forward of its own),
:meth:`~Strategy.batched_model_forward`, :meth:`~Strategy.calibrate`,
:meth:`~Strategy.on_gate_decisions` (see each gate's verdict), :meth:`~Strategy.describe`
(what :meth:`ttaperso.Personalizer.inspect` reports) and :meth:`~Strategy.check_state`
(extra checks of a loaded state). ``docs/write-a-strategy.md`` walks through one.

Everything a call computes travels in that call's objects (:class:`ForwardOutput`,
:class:`~ttaperso.gates.GateBatch`, :class:`StepResult`); the strategy object is shared by
every subject and every thread and holds no per-call or per-subject value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from ..config import StrategyConfig
from ..errors import ConfigError, InputError, StateFileError
from ..gates import GateBatch
from ..guards import GuardEvent
from ..runtime import ForwardOutput, ModelRuntime
from ..smoothing import SMOOTHING_MEMORY, smooth_probs
from ..source_data import SourceData
from ..state import SubjectState

__all__ = ["CALIBRATION_OFFSET", "Strategy", "StepResult", "optimizer_step"]

#: memory key of a subject's neutral-baseline logit offset ``(C,)`` (optional in every state;
#: set by :meth:`ttaperso.Personalizer.calibrate`, see :mod:`ttaperso.calibration`)
CALIBRATION_OFFSET = "calib.offset"


@dataclass
class StepResult:
    """Per-frame outputs of one step (detached), and what happened in it."""

    logits: Tensor
    probs: Tensor
    labels: Tensor
    updated: Tensor
    #: the collapse guard's recovery in this step (None: no guard, or no trip)
    guard_event: GuardEvent | None = None


class Strategy:
    """Base class of all strategies (and the ``source`` strategy: no adaptation)."""

    config_class: ClassVar[type[StrategyConfig]] = StrategyConfig
    config: StrategyConfig

    # ------------------------------------------------------ declared capabilities
    #: the step takes gradients (so it cannot run under ``torch.inference_mode()``)
    needs_gradients: ClassVar[bool] = False
    #: :meth:`model_forward` is the same for every subject (no subject tensors swapped in,
    #: no gradients, stored statistics only): :meth:`~ttaperso.Personalizer.predict_many`
    #: runs it once for several subjects' frames and only :meth:`head` and the rest of the
    #: step run per subject.
    shares_model_forward: ClassVar[bool] = False
    #: :meth:`batched_model_forward` runs several subjects' forwards in one pass
    batches_subjects: ClassVar[bool] = False
    #: :meth:`calibrate` folds a neutral recording into the subject's statistics
    calibrates_statistics: ClassVar[bool] = False
    #: :meth:`model_forward` also returns the model's features (``out.features``)
    uses_features: ClassVar[bool] = False
    #: whether the strategy needs a :class:`~ttaperso.source_data.SourceData` sample
    #: (``"required"`` refuses to build without one; ``"optional"`` uses it when given)
    uses_source: ClassVar[Literal["no", "optional", "required"]] = "no"
    #: per-frame extras :meth:`head` puts in ``ForwardOutput.extras`` (for gates)
    provides: ClassVar[frozenset[str]] = frozenset()

    # ------------------------------------------------------------- state layout
    #: memory keys whose first dimension may vary (validated on dtype and trailing shape)
    variable_memory: ClassVar[tuple[str, ...]] = (SMOOTHING_MEMORY,)
    #: memory key prefixes ``P`` of optional per-parameter tensors ``P<param name>``, shaped
    #: like that adapted parameter (e.g. TENT's accumulated gradients, ``grad/``)
    per_param_memory: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, config: StrategyConfig, runtime: ModelRuntime, source: SourceData | None = None
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.num_classes = runtime.num_classes
        if source is None and self.uses_source == "required":
            raise ConfigError(
                f"Strategy {config.strategy_name!r} needs a sample of source-domain data: "
                "pass source=SourceData(frames, labels=..., subjects=...) to the Personalizer"
            )
        for gate in config.gates:
            missing = sorted(gate.requires - self.provides)
            if missing:
                raise ConfigError(
                    f"Gate {gate.kind!r} needs {missing}, which strategy "
                    f"{config.strategy_name!r} does not compute (it provides "
                    f"{sorted(self.provides) or 'nothing'}); remove the gate or use a strategy "
                    "that provides it (tta_cap provides prototype scores)"
                )
        #: the validated source sample (None when not given or not used)
        self.source = source if self.uses_source != "no" else None
        self._initial = self._complete_state(self.init_state())

    # ----------------------------------------------------------------- hooks
    def init_state(self) -> SubjectState:
        """The tensors a fresh subject owns (clones of the source values)."""
        return SubjectState()

    def trainable(self, state: SubjectState) -> tuple[str, ...]:
        """Parameter names the prediction forward differentiates with respect to."""
        return ()

    def bn_prior(self, state: SubjectState) -> float:
        """Weight (frames) of the subject's BN statistics vs the current batch (inf: eval)."""
        return math.inf

    def collects_moments(self) -> bool:
        """Whether the prediction forward records per-sample BN moments."""
        return False

    def adapt(
        self, state: SubjectState, frames: Tensor, out: ForwardOutput, admitted: Tensor
    ) -> Tensor:
        """Update ``state`` from the admitted frames; return the mask of frames that did."""
        return torch.zeros_like(admitted)

    def calibrate(self, state: SubjectState, frames: Tensor) -> None:
        """Initialise ``state``'s statistics from a short neutral recording (hook).

        Implemented by strategies that declare ``calibrates_statistics`` (the BN-statistics
        ones); must raise before changing ``state``. The logit offset of
        :meth:`ttaperso.Personalizer.calibrate` works for every strategy and does not go
        through this hook.
        """
        raise ConfigError(
            f"Strategy {self.config.strategy_name!r} does not support neutral-baseline calibration"
        )

    def on_gate_decisions(
        self, state: SubjectState, decisions: list[Tensor], admitted: Tensor
    ) -> None:
        """See each gate's mask (``decisions[i]`` for ``config.gates[i]``) and their AND."""

    def describe(self, state: SubjectState) -> dict[str, Any]:
        """JSON-safe facts about ``state`` for :meth:`ttaperso.Personalizer.inspect`.

        Subclasses extend the dict (``{**super().describe(state), ...}``).
        """
        details: dict[str, Any] = {"strategy": self.config.strategy_name}
        offset = state.memory.get(CALIBRATION_OFFSET)
        if offset is not None:
            details["calibration_offset"] = [round(float(v), 6) for v in offset.tolist()]
        if self.config.guard is not None:
            details["guard"] = self.config.guard.describe(state)
        return details

    # ------------------------------------------------------------ machinery
    def _complete_state(self, state: SubjectState) -> SubjectState:
        for i, gate in enumerate(self.config.gates):
            for key, value in gate.init_memory(self.num_classes).items():
                state.memory[f"gate{i}.{gate.kind}.{key}"] = value
        if self.config.smoothing > 1:
            state.memory[SMOOTHING_MEMORY] = torch.zeros(0, self.num_classes)
        if self.config.guard is not None:
            state.memory.update(self.config.guard.init_memory(state, self.num_classes))
        return state

    def initial_state(self) -> SubjectState:
        """A fresh subject's state (an independent, unpacked copy: ready for a step)."""
        return self._initial.unpacked()

    def frozen_logits(self, frames: Tensor) -> Tensor:
        """Logits of the unadapted model (what the collapse guard compares against)."""
        with torch.no_grad():
            return self.runtime.forward({}, frames).logits

    def model_forward(self, state: SubjectState, frames: Tensor) -> ForwardOutput:
        """The shared model's part of the prediction forward, with the subject's tensors."""
        return self.runtime.forward(
            state.model_tensors(),
            frames,
            trainable=self.trainable(state),
            bn_prior=self.bn_prior(state),
            collect_moments=self.collects_moments(),
            return_features=self.uses_features,
        )

    def head(self, state: SubjectState, frames: Tensor, out: ForwardOutput) -> ForwardOutput:
        """The subject-specific part after the model (hook; default: the model's logits)."""
        return out

    def forward(self, state: SubjectState, frames: Tensor) -> ForwardOutput:
        """Prediction forward of one subject: :meth:`model_forward`, then :meth:`head`."""
        return self.head(state, frames, self.model_forward(state, frames))

    def shared_forward(self, frames: Tensor) -> ForwardOutput:
        """:meth:`model_forward` for frames of any subjects (needs ``shares_model_forward``)."""
        if not self.shares_model_forward:
            raise ConfigError(
                f"Strategy {self.config.strategy_name!r} has a subject-specific model forward"
            )
        return self.model_forward(self._initial, frames)

    def batched_model_forward(
        self, states: list[SubjectState], frames: list[Tensor]
    ) -> list[ForwardOutput]:
        """:meth:`model_forward` of several subjects at once (needs ``batches_subjects``)."""
        raise ConfigError(
            f"Strategy {self.config.strategy_name!r} cannot batch several subjects' forwards"
        )

    def apply_gates(self, state: SubjectState, batch: GateBatch) -> Tensor:
        """AND of all gates; each gate's memory is read from and written to ``state``."""
        admitted = torch.ones(batch.labels.shape[0], dtype=torch.bool)
        decisions: list[Tensor] = []
        for i, gate in enumerate(self.config.gates):
            prefix = f"gate{i}.{gate.kind}."
            memory = {k[len(prefix) :]: v for k, v in state.memory.items() if k.startswith(prefix)}
            mask = gate.admit(memory, batch).to(torch.bool).cpu()
            for key, value in memory.items():
                state.memory[prefix + key] = value
            decisions.append(mask)
            admitted &= mask
        self.on_gate_decisions(state, decisions, admitted)
        return admitted

    def step(self, state: SubjectState, frames: Tensor) -> StepResult:
        """One predict call for one subject: forward, gates, adapt, smoothing."""
        return self.finish(state, frames, self.forward(state, frames))

    def finish(self, state: SubjectState, frames: Tensor, out: ForwardOutput) -> StepResult:
        """The rest of a step after the forward: checks, gates, adapt, guard, smoothing."""
        logits = out.logits
        # One check (one device sync) over the logits and every layer's moments.
        checked = [logits.detach().reshape(-1)]
        if out.moments is not None:
            for m, sq in out.moments.values():
                checked += [m.reshape(-1), sq.reshape(-1)]
        if not bool(torch.isfinite(torch.cat(checked)).all()):
            # Raised before any write: a bad frame must never poison a subject's state
            # (finite but huge frames can overflow activations or their squares).
            raise InputError(
                "The model produced non-finite logits or activation statistics for these "
                "frames (extreme input values?); the subject's state was not changed"
            )
        detached = logits.detach()
        offset = state.memory.get(CALIBRATION_OFFSET)
        if offset is not None:
            # The subject's neutral baseline shifts what is predicted (and what the gates
            # see); `adapt` still gets the model's own output in `out`.
            detached = detached + offset.to(detached.device, detached.dtype)
        labels = detached.argmax(dim=1).cpu()
        batch = GateBatch(
            logits=detached,
            labels=labels,
            features=None if out.features is None else out.features.detach(),
            extras=out.extras,
        )
        admitted = self.apply_gates(state, batch)
        # A caller's torch.no_grad() must not break gradient strategies: `adapt` builds its
        # losses (and SAR its extra forwards) in the same grad mode as a plain call would.
        with torch.enable_grad():
            updated = self.adapt(state, frames, out, admitted).to(torch.bool).cpu()
        guard = self.config.guard
        event = None if guard is None else guard.observe(self, state, frames, detached)
        probs = detached.softmax(dim=1)
        if self.config.smoothing > 1:
            probs = smooth_probs(state.memory, probs.cpu(), self.config.smoothing).to(probs.device)
            labels = probs.argmax(dim=1).cpu()
        return StepResult(
            logits=detached, probs=probs, labels=labels, updated=updated, guard_event=event
        )

    def check_state(self, state: SubjectState, source: str) -> None:
        """Refuse a loaded state whose tensors do not fit this strategy and model."""
        ref = self._initial
        for group in ("params", "buffers"):
            got, want = getattr(state, group), getattr(ref, group)
            if got.keys() != want.keys():
                missing = sorted(want.keys() - got.keys())[:5]
                extra = sorted(got.keys() - want.keys())[:5]
                raise StateFileError(
                    f"{source}: {group} do not match this strategy/model "
                    f"(missing {missing}, unexpected {extra})"
                )
            for key, tensor in got.items():
                _check_like(source, f"{group}/{key}", tensor, want[key], variable=False)
        for key, tensor in state.memory.items():
            if key in ref.memory:
                _check_like(
                    source,
                    f"memory/{key}",
                    tensor,
                    ref.memory[key],
                    variable=key in self.variable_memory,
                )
            elif key == CALIBRATION_OFFSET:
                if not tensor.is_floating_point() or tensor.shape != (self.num_classes,):
                    raise StateFileError(
                        f"{source}: memory/{key} is {tensor.dtype} {tuple(tensor.shape)}, "
                        f"expected a float tensor of shape ({self.num_classes},)"
                    )
                if not torch.isfinite(tensor).all():
                    raise StateFileError(f"{source}: memory/{key} holds non-finite values")
            elif self.per_param_memory and key.startswith(self.per_param_memory):
                prefix = next(p for p in self.per_param_memory if key.startswith(p))
                name = key[len(prefix) :]
                if name not in ref.params:
                    raise StateFileError(f"{source}: memory/{key} names no adapted parameter")
                _check_like(source, f"memory/{key}", tensor, ref.params[name], variable=False)
            else:
                raise StateFileError(f"{source}: unexpected tensor memory/{key} for this strategy")
        missing_memory = sorted(ref.memory.keys() - state.memory.keys())
        if missing_memory:
            raise StateFileError(
                f"{source}: missing tensors {['memory/' + k for k in missing_memory]}"
            )
        param_names = set(ref.params)
        for key, tensor in state.optim.items():
            owner = key.rpartition("/")[0]
            if owner not in param_names:
                raise StateFileError(
                    f"{source}: optimizer state optim/{key} names no adapted parameter"
                )
            param = ref.params[owner]
            # Moments are shaped like their parameter; step counters are scalars.
            if not tensor.is_floating_point() or tensor.shape not in (param.shape, torch.Size([])):
                raise StateFileError(
                    f"{source}: optim/{key} is {tensor.dtype} {tuple(tensor.shape)}, expected a "
                    f"float tensor shaped like its parameter {tuple(param.shape)} or a scalar"
                )
            if not torch.isfinite(tensor).all():
                raise StateFileError(f"{source}: optim/{key} holds non-finite values")


def _check_like(source: str, key: str, got: Tensor, want: Tensor, *, variable: bool) -> None:
    if variable:
        # First dimension free; trailing dimensions fixed where the reference knows them.
        shape_ok = got.dim() == want.dim() and all(
            w in (0, g) for g, w in zip(got.shape[1:], want.shape[1:], strict=True)
        )
    else:
        shape_ok = got.shape == want.shape
    if got.dtype != want.dtype or not shape_ok:
        raise StateFileError(
            f"{source}: tensor {key} is {got.dtype} {tuple(got.shape)}, expected "
            f"{want.dtype} {tuple(want.shape)}"
        )
    if got.is_floating_point() and not torch.isfinite(got).all():
        raise StateFileError(f"{source}: tensor {key} holds non-finite values")


OptimizerFactory = Callable[[list[Tensor]], torch.optim.Optimizer]


@torch.no_grad()
def optimizer_step(state: SubjectState, grads: dict[str, Tensor], make: OptimizerFactory) -> None:
    """Apply one step of a torch optimizer to the subject's parameters.

    The optimizer object is built for this step only and its per-parameter state (moments,
    step counts) is loaded from and stored back to ``state.optim`` under
    ``<param>/<key>``: the subject owns its moments, torch owns the update rule.
    """
    names = list(grads)
    params = [state.params[n] for n in names]
    optimizer = make(params)
    for name, param in zip(names, params, strict=True):
        prefix = f"{name}/"
        saved = {k[len(prefix) :]: v for k, v in state.optim.items() if k.startswith(prefix)}
        if saved:
            optimizer.state[param] = saved
        param.grad = grads[name].to(param.dtype)
    optimizer.step()
    for name, param in zip(names, params, strict=True):
        param.grad = None
        for key, value in optimizer.state[param].items():
            state.optim[f"{name}/{key}"] = (
                value if isinstance(value, Tensor) else torch.tensor(value)
            )
