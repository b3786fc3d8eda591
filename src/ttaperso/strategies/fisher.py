"""``fisher``: Fisher-information-driven selective adaptation (FIESTA-style).

After arXiv 2503.23257 (FIESTA, video FER; no public code). Per subject:

1. the subject's first ``fisher_frames`` admitted frames (1-3 suffice in the paper) are
   buffered; until then the subject predicts with ``norm``'s BN statistics only;
2. the diagonal Fisher information of every floating parameter of the model (conv,
   linear and BN affine alike) is estimated on those frames, and the ``budget`` scalars
   with the largest Fisher value, over the whole model, are selected;
3. from then on only those scalars are trained, with the entropy of the admitted frames
   plus ``consistency`` x a temporal-consistency term (squared distance between a frame's
   probabilities and the previous admitted frame's, the latter held fixed; the previous
   frame of the first one in a call is the subject's last frame of the previous call).

Choices (the paper gives no code):

* **Expected Fisher**, ``sum_c p(c|x) (d log p(c|x))^2``, with the model's own predictive
  distribution: it needs no labels and, unlike the empirical Fisher with pseudo-labels,
  does not favour parameters that merely sharpen the current (possibly wrong) argmax.
  It is computed with BatchNorm in eval mode (the subject's statistics so far) so frames
  are independent: ``C`` backward passes per frame, once per subject.
* **Budget**: ``budget`` scalars; 0 picks ``max(256, 0.4%`` of the model's parameters):
  the paper's ~22k trained scalars are ~0.4% of a ~5M-parameter network, and for the
  57k-parameter mini-XCEPTION the rule gives its floor, 256.
* **BN statistics** follow ``norm`` (a per-subject running mixture starting at the source
  statistics; ``source_prior=0, accumulate=False`` gives batch statistics): on stills and
  video alike it is deterministic and saved with the subject.
* **State**: only the selected scalars: ``params/fisher.values`` (``budget`` floats),
  ``memory/fisher.index`` (their flat positions in the concatenation of the candidate
  parameters in ``named_parameters`` order, int32, sorted; all -1 until selected) and the
  optimizer's moments for them; never full parameter tensors. At forward time each touched
  parameter is rebuilt as the shared source tensor with the subject's values scattered in.

:meth:`FisherStrategy.selected_parameters` (``Personalizer.inspect(subject).details
["selected"]``) reports which parameters the selection touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import ModelInterfaceError, StateFileError
from ..functional import softmax_entropy
from ..gates import Gate
from ..runtime import ForwardOutput, ModelRuntime
from ..source_data import SourceData
from ..state import SubjectState
from .base import optimizer_step
from .feature_math import expected_fisher_diagonal, split_flat_indices, top_k_indices
from .norm import GradientNormConfig, NormStrategy
from .registry import register_strategy
from .tent import make_optimizer

__all__ = ["FisherConfig", "FisherStrategy", "default_budget"]

#: smallest automatic budget, in scalars
MIN_BUDGET = 256
#: automatic budget as a fraction of the model's parameters (~22k of ~5M in the paper)
BUDGET_FRACTION = 0.004


def default_budget(num_parameters: int) -> int:
    """The automatic budget: ``max(256, round(0.4% of the parameters))``, at most all."""
    return min(num_parameters, max(MIN_BUDGET, round(BUDGET_FRACTION * num_parameters)))


@dataclass(frozen=True)
class FisherConfig(GradientNormConfig):
    """Options of Fisher-selective adaptation (plus ``norm``'s statistics options).

    Args:
        fisher_frames: admitted frames used to estimate the Fisher information (>= 1).
        budget: number of scalars adapted per subject (0: ``max(256, 0.4%`` of the
            model's parameters)).
        consistency: weight of the temporal-consistency term (0 = entropy only).
        lr: learning rate of the optimizer on the selected scalars.
        optimizer: ``"adam"`` or ``"sgd"`` (one moment instead of two: a smaller state).
        update_every: admitted frames whose gradients are accumulated per step.
    """

    strategy_name = "fisher"
    gates: tuple[Gate, ...] = field(default=())
    lr: float = 1e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    fisher_frames: int = 3
    budget: int = 0
    consistency: float = 0.1

    def validate(self) -> None:
        super().validate()
        self._check("fisher_frames", self.fisher_frames >= 1, "an int >= 1")
        self._check("budget", self.budget >= 0, "an int >= 0 (0 = automatic)")
        self._check("consistency", self.consistency >= 0.0, "a number >= 0")


@register_strategy
class FisherStrategy(NormStrategy):
    """Per subject: BN statistics + a Fisher-selected sparse set of model scalars."""

    config_class = FisherConfig
    config: FisherConfig
    needs_gradients = True
    batches_subjects = False  # its forward rebuilds the subject's selected parameters
    variable_memory = NormStrategy.variable_memory + ("fisher.pending", "fisher.last_probs")
    per_param_memory = ("grad/",)
    values_key = "fisher.values"

    def __init__(
        self, config: FisherConfig, runtime: ModelRuntime, source: SourceData | None = None
    ) -> None:
        self.candidates = tuple(n for n, p in runtime.parameters.items() if p.is_floating_point())
        self.sizes = tuple(runtime.parameters[n].numel() for n in self.candidates)
        self.total = sum(self.sizes)
        if self.total == 0:
            raise ModelInterfaceError(
                f"Strategy 'fisher' found no floating parameter in model "
                f"{runtime.module.model_name!r}"
            )
        if self.total >= 2**31:
            raise ModelInterfaceError(
                f"Strategy 'fisher' indexes parameters with int32; model "
                f"{runtime.module.model_name!r} has {self.total} (>= 2**31)"
            )
        self.budget = (
            min(config.budget, self.total) if config.budget else default_budget(self.total)
        )
        super().__init__(config, runtime, source)
        self._make_optimizer = make_optimizer(config.optimizer, config.lr, config.momentum)

    # ------------------------------------------------------------------ state
    def init_state(self) -> SubjectState:
        state = super().init_state()
        state.params[self.values_key] = torch.zeros(self.budget, dtype=self.runtime.dtype)
        state.memory["fisher.index"] = torch.full((self.budget,), -1, dtype=torch.int32)
        shape = self.runtime.module.input_shape
        state.memory["fisher.pending"] = torch.zeros(
            (0, *[s or 0 for s in shape]), dtype=self.runtime.dtype
        )
        state.memory["fisher.last_probs"] = torch.zeros(
            0, self.num_classes, dtype=self.runtime.dtype
        )
        state.memory["fisher.pending_frames"] = torch.tensor(0.0, dtype=torch.float64)
        return state

    @staticmethod
    def is_selected(state: SubjectState) -> bool:
        """Whether the subject's Fisher selection has been made."""
        return bool(int(state.memory["fisher.index"][0]) >= 0)

    def selected_parameters(self, state: SubjectState) -> dict[str, int]:
        """``{parameter name: number of selected scalars}`` (empty before the selection)."""
        if not self.is_selected(state):
            return {}
        return {
            self.candidates[pos]: int(local.numel())
            for pos, local, _ in split_flat_indices(state.memory["fisher.index"], self.sizes)
        }

    def _model_tensors(self, state: SubjectState) -> tuple[dict[str, Tensor], tuple[str, ...]]:
        """BN buffers plus every touched parameter rebuilt as source + the subject's values."""
        tensors = dict(state.buffers)
        if not self.is_selected(state):
            return tensors, ()
        values = state.params[self.values_key]
        names = []
        for pos, local, where in split_flat_indices(state.memory["fisher.index"], self.sizes):
            name = self.candidates[pos]
            src = self.runtime.parameters[name].detach()
            flat = src.reshape(-1).scatter(
                0, local.to(src.device), values[where.to(values.device)].to(src.dtype)
            )
            tensors[name] = flat.view_as(src)
            names.append(name)
        return tensors, tuple(names)

    def model_forward(self, state: SubjectState, frames: Tensor) -> ForwardOutput:
        """The model with the subject's statistics and rebuilt selected parameters."""
        tensors, names = self._model_tensors(state)
        return self.runtime.forward(
            tensors,
            frames,
            trainable=names,
            bn_prior=self.bn_prior(state),
            collect_moments=self.collects_moments(),
        )

    def calibrate(self, state: SubjectState, frames: Tensor) -> None:
        """Fold a neutral recording's BN statistics into the subject's estimate (as ``norm``).

        The forward runs with the subject's rebuilt parameters: ``params/fisher.values`` is
        not a tensor of the model and cannot be swapped in by name.
        """
        tensors, _ = self._model_tensors(state)
        self.calibrate_statistics(state, tensors, frames)

    def describe(self, state: SubjectState) -> dict[str, Any]:
        """Adds ``selected``: ``{parameter name: selected scalars}`` (empty before selection)."""
        return {**super().describe(state), "selected": self.selected_parameters(state)}

    # ------------------------------------------------------------- selection
    def select(self, state: SubjectState, frames: Tensor) -> None:
        """Estimate the Fisher diagonal on ``frames`` and store the top-``budget`` scalars."""
        tensors = dict(state.buffers)
        tensors.update({n: self.runtime.parameters[n] for n in self.candidates})
        fisher = [torch.zeros_like(self.runtime.parameters[n]) for n in self.candidates]
        # One frame per forward: a backward pass through a batch graph costs the whole batch.
        for frame in frames.split(1):
            out = self.runtime.forward(tensors, frame, trainable=self.candidates, bn_prior=math.inf)
            leaves = [out.leaves[n] for n in self.candidates]
            for acc, f in zip(
                fisher, expected_fisher_diagonal(out.logits.log_softmax(dim=1), leaves), strict=True
            ):
                acc.add_(f)
        index = top_k_indices(fisher, self.budget)
        values = torch.zeros(self.budget, dtype=self.runtime.dtype)
        for pos, local, where in split_flat_indices(index, self.sizes):
            values[where] = (
                self.runtime.parameters[self.candidates[pos]]
                .detach()
                .reshape(-1)[local]
                .to(values.dtype)
            )
        state.memory["fisher.index"] = index.to(torch.int32)
        state.params[self.values_key] = values
        state.optim = {}
        state.memory.pop(f"grad/{self.values_key}", None)
        state.memory["fisher.pending_frames"].fill_(0.0)

    # ------------------------------------------------------------------ adapt
    def adapt_admitted(
        self,
        state: SubjectState,
        frames: Tensor,
        out: ForwardOutput,
        admitted: Tensor,
        updated: Tensor,
    ) -> Tensor:
        index = admitted.nonzero().squeeze(1).to(out.logits.device)
        last = state.memory["fisher.last_probs"].to(out.logits.device)
        if not self.is_selected(state):
            chosen = frames.index_select(0, index.to(frames.device))
            self._buffer_for_fisher(state, chosen)
            if not self.is_selected(state):
                probs = out.logits.index_select(0, index).detach().softmax(dim=1)
                state.memory["fisher.last_probs"] = probs[-1:].cpu().clone()
                return admitted.clone()
            # The selection was just made from this call's frames: adapt on them now (one
            # more forward, once per subject) rather than only from the next call on.
            out = self.forward(state, chosen)
            logits = out.logits
        else:
            logits = out.logits.index_select(0, index)
        if not self._gradient_update(state, logits, out.leaves, last):
            return torch.zeros_like(admitted)  # a non-finite gradient never reaches the state
        return admitted.clone()

    def _gradient_update(
        self, state: SubjectState, logits: Tensor, leaves: dict[str, Tensor], last: Tensor
    ) -> bool:
        """Entropy + temporal consistency on the selected scalars; False if non-finite."""
        probs = logits.softmax(dim=1)
        state.memory["fisher.last_probs"] = probs[-1:].detach().cpu().clone()
        loss = softmax_entropy(logits).sum()
        if self.config.consistency > 0:
            previous = torch.cat([last, probs[:-1].detach()])
            current = probs[probs.shape[0] - previous.shape[0] :]
            loss = loss + self.config.consistency * ((current - previous) ** 2).sum()
        names = list(leaves)
        grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
        flat_grad = torch.zeros(self.budget, dtype=self.runtime.dtype)
        by_name = dict(zip(names, grads, strict=True))
        for pos, local, where in split_flat_indices(state.memory["fisher.index"], self.sizes):
            grad = by_name.get(self.candidates[pos])
            if grad is not None:
                flat_grad[where] = grad.detach().reshape(-1)[local.to(grad.device)].cpu()
        if not bool(torch.isfinite(flat_grad).all()):
            return False
        self._accumulate_and_step(state, flat_grad, float(logits.shape[0]))
        return True

    def _buffer_for_fisher(self, state: SubjectState, new: Tensor) -> None:
        pending = state.memory["fisher.pending"]
        if pending.shape[1:] != new.shape[1:]:
            pending = new.new_zeros((0, *new.shape[1:]))  # model without a fixed input size
        pending = torch.cat([pending.to(new.device, new.dtype), new.detach()])
        pending = pending[: self.config.fisher_frames]
        if pending.shape[0] >= self.config.fisher_frames:
            self.select(state, pending)
            pending = pending[:0]
        state.memory["fisher.pending"] = pending.cpu().clone()

    @torch.no_grad()
    def _accumulate_and_step(self, state: SubjectState, grad: Tensor, frames: float) -> None:
        """Sum per-frame gradients; step with their mean once ``update_every`` frames are in."""
        key = f"grad/{self.values_key}"
        pending = float(state.memory["fisher.pending_frames"]) + frames
        acc = state.memory.pop(key, None)
        total = grad if acc is None else acc + grad
        if pending < self.config.update_every:
            state.memory[key] = total
            state.memory["fisher.pending_frames"].fill_(pending)
            return
        optimizer_step(state, {self.values_key: total / pending}, self._make_optimizer)
        state.memory["fisher.pending_frames"].fill_(0.0)

    # ------------------------------------------------------------------ checks
    def check_state(self, state: SubjectState, source: str) -> None:
        """Also refuse selection indices out of range, unsorted, or half-initialised."""
        super().check_state(state, source)
        index = state.memory["fisher.index"]
        if bool((index < 0).any()):
            if not bool((index == -1).all()):
                raise StateFileError(
                    f"{source}: memory/fisher.index mixes unselected (-1) and selected entries"
                )
        else:
            if int(index.max()) >= self.total:
                raise StateFileError(
                    f"{source}: memory/fisher.index holds {int(index.max())}, beyond the "
                    f"model's {self.total} parameters"
                )
            if index.numel() > 1 and bool((index[1:] <= index[:-1]).any()):
                raise StateFileError(
                    f"{source}: memory/fisher.index is not strictly increasing (duplicates?)"
                )
        pending = state.memory["fisher.pending"]
        if pending.shape[0] >= self.config.fisher_frames:
            raise StateFileError(
                f"{source}: memory/fisher.pending holds {pending.shape[0]} frames, expected "
                f"fewer than fisher_frames={self.config.fisher_frames}"
            )
        if state.memory["fisher.last_probs"].shape[0] > 1:
            raise StateFileError(f"{source}: memory/fisher.last_probs holds more than one frame")
