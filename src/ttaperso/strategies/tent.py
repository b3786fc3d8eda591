"""``tent``: entropy minimisation on the normalization layers' affine parameters.

Wang et al., ICLR 2021 (DequanWang/tent). Per subject: the affine weight/bias of every
normalization layer, the optimizer's moments, and (as in ``norm``) the BN statistics.
The prediction returned is the one made before the update, as in the reference code.

Differences from the reference code, on purpose:

* it never mutates the caller's model (the reference sets BN buffers to ``None`` and
  ``requires_grad`` on the caller's modules);
* gradients are accumulated over admitted frames and one optimizer step is taken per
  ``update_every`` admitted frames, so frame-by-frame streaming works (a step on a
  single frame's entropy is noise); ``update_every=1`` steps once per ``predict`` call,
  which is the reference behaviour for batched input;
* BN statistics follow ``norm``'s options: ``source_prior=0, accumulate=False`` is the
  reference's pure batch statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..errors import ModelInterfaceError
from ..functional import softmax_entropy
from ..gates import EntropyGate, Gate
from ..norm_layers import norm_affine_parameters
from ..runtime import ForwardOutput, ModelRuntime
from ..source_data import SourceData
from ..state import SubjectState
from .base import OptimizerFactory, optimizer_step
from .norm import GradientNormConfig, NormStrategy
from .registry import register_strategy

__all__ = ["TentConfig", "TentStrategy", "make_optimizer"]


@dataclass(frozen=True)
class TentConfig(GradientNormConfig):
    """Options of TENT (plus ``norm``'s statistics options).

    Args:
        lr: learning rate (reference: Adam 1e-3 at batch 200, SGD 2.5e-4 at batch 64).
        optimizer: ``"adam"`` or ``"sgd"`` (SGD keeps one moment per parameter instead of
            two: a smaller subject state).
        momentum: SGD momentum (ignored by Adam; Adam uses torch's default betas).
        update_every: admitted frames whose gradients are accumulated per optimizer step.
    """

    strategy_name = "tent"
    gates: tuple[Gate, ...] = field(default=(EntropyGate(max_entropy=0.4),))
    optimizer: Literal["adam", "sgd"] = "adam"


def make_optimizer(kind: str, lr: float, momentum: float) -> OptimizerFactory:
    """Factory building a torch optimizer over a parameter list for one step."""
    # foreach: one multi-tensor kernel per update stage instead of a Python loop over the
    # (tens of) normalization parameters; same update rule.
    if kind == "adam":
        return lambda params: torch.optim.Adam(params, lr=lr, foreach=True)
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum, foreach=True)


@register_strategy
class TentStrategy(NormStrategy):
    """TENT with per-subject affine parameters, moments and BN statistics."""

    config_class = TentConfig
    config: TentConfig
    per_param_memory = ("grad/",)
    needs_gradients = True
    batches_subjects = False  # the prediction forward differentiates the subject's leaves

    def __init__(
        self, config: TentConfig, runtime: ModelRuntime, source: SourceData | None = None
    ) -> None:
        self.param_names = tuple(norm_affine_parameters(runtime.module))
        if not self.param_names:
            raise ModelInterfaceError(
                f"Strategy {config.strategy_name!r} trains normalization affine parameters but "
                f"model {runtime.module.model_name!r} has none"
            )
        super().__init__(config, runtime, source)
        self._make_optimizer = make_optimizer(config.optimizer, config.lr, config.momentum)

    def init_state(self) -> SubjectState:
        state = super().init_state()
        for name in self.param_names:
            state.params[name] = self.runtime.parameters[name].detach().clone()
        state.memory["tent.pending"] = torch.tensor(0.0, dtype=torch.float64)
        return state

    def trainable(self, state: SubjectState) -> tuple[str, ...]:
        return self.param_names

    def adapt_admitted(
        self,
        state: SubjectState,
        frames: Tensor,
        out: ForwardOutput,
        admitted: Tensor,
        updated: Tensor,
    ) -> Tensor:
        index = admitted.nonzero().squeeze(1).to(out.logits.device)
        loss = softmax_entropy(out.logits.index_select(0, index)).sum()
        leaves = [out.leaves[n] for n in self.param_names]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        present = [g.reshape(-1) for g in grads if g is not None]
        if present and not bool(torch.isfinite(torch.cat(present)).all()):  # one sync
            return torch.zeros_like(admitted)  # a non-finite gradient never reaches the state
        self.accumulate_and_step(
            state, dict(zip(self.param_names, grads, strict=True)), float(index.numel())
        )
        return admitted.clone()

    @torch.no_grad()
    def accumulate_and_step(
        self, state: SubjectState, grads: dict[str, Tensor | None], frames: float
    ) -> None:
        """Add summed per-frame gradients; step with their mean once enough frames are in."""
        pending = float(state.memory["tent.pending"]) + frames
        if pending < self.config.update_every:
            sums: list[Tensor] = []
            addends: list[Tensor] = []
            for name, grad in grads.items():
                if grad is None:
                    continue
                key = f"grad/{name}"
                if key in state.memory:
                    sums.append(state.memory[key])
                    addends.append(grad)
                else:
                    state.memory[key] = grad.detach().clone()
            if sums:
                torch._foreach_add_(sums, addends)  # one call for all parameters
            state.memory["tent.pending"].fill_(pending)
            return
        total: dict[str, Tensor] = {}
        for name, grad in grads.items():
            acc = state.memory.pop(f"grad/{name}", None)
            if grad is None and acc is None:
                continue
            if acc is None:
                assert grad is not None  # both None was skipped above
                g = grad
            else:
                g = acc if grad is None else acc + grad
            total[name] = g / pending
        if total:
            optimizer_step(state, total, self._make_optimizer)
        state.memory["tent.pending"].fill_(0.0)
