"""``sar``: sharpness-aware and reliable entropy minimisation with model recovery.

Niu et al., ICLR 2023 (mr-eggplant/SAR). Per update batch:

1. entropy filter: keep frames with entropy < ``margin`` x ln C (E0 = 0.4 ln C; the
   reference hard-codes ln 1000);
2. SAM: gradient of the mean filtered entropy, move the parameters by
   ``rho * g / ||g||``, recompute the entropy there, filter again, and step the base
   optimizer (SGD with momentum) with the gradient taken at the perturbed point;
3. recovery: an EMA (decay 0.9) of the second-pass loss below ``reset_threshold`` x ln C
   resets the subject's parameters, moments and statistics to the source.

Fixed with respect to the reference code: the recovery really resets (the reference
writes the old EMA back after ``reset()``, issue #4, so it keeps firing), the reset
threshold scales with ln C (0.2 / ln 1000 of it by default: 0.2 for 1000 classes; the
reference's fixed 0.2 fires constantly for 2 classes), and an update with no reliable
frame is skipped instead of stepping on a NaN loss. Trainable tensors: affine parameters
of all normalization layers, except the last ``frozen_last_norms`` (the reference skips
ResNets' ``layer4`` by name; here it is a count, in module order).

Admitted frames are buffered per subject until ``update_every`` of them are pending, so
single frames work; the prediction returned is the one made before the update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ModelInterfaceError
from ..functional import softmax_entropy
from ..norm_layers import norm_affine_parameters
from ..runtime import ForwardOutput, ModelRuntime
from ..source_data import SourceData
from ..state import SubjectState
from .base import optimizer_step
from .norm import GradientNormConfig, NormStrategy
from .registry import register_strategy

__all__ = ["SarConfig", "SarStrategy"]


@dataclass(frozen=True)
class SarConfig(GradientNormConfig):
    """Options of SAR (plus ``norm``'s statistics options).

    Args:
        lr: SGD learning rate (reference: 2.5e-4 at batch 64).
        momentum: SGD momentum.
        rho: SAM neighbourhood radius.
        margin: entropy filter E0 as a fraction of ln C.
        reset_threshold: recovery threshold e_m as a fraction of ln C.
        ema_decay: decay of the loss EMA watched by the recovery.
        update_every: admitted frames buffered per SAR update.
        frozen_last_norms: number of last normalization layers (module order) not adapted.
    """

    strategy_name = "sar"
    lr: float = 2.5e-4
    rho: float = 0.05
    margin: float = 0.4
    reset_threshold: float = 0.2 / math.log(1000)
    ema_decay: float = 0.9
    frozen_last_norms: int = 0

    def validate(self) -> None:
        super().validate()
        self._check("rho", self.rho >= 0.0, "a number >= 0")
        self._check("margin", 0.0 < self.margin <= 1.0, "a fraction of ln C in (0, 1]")
        self._check(
            "reset_threshold", 0.0 <= self.reset_threshold < 1.0, "a fraction of ln C in [0, 1)"
        )
        self._check("ema_decay", 0.0 <= self.ema_decay < 1.0, "in [0, 1)")
        self._check("frozen_last_norms", self.frozen_last_norms >= 0, "an int >= 0")


@register_strategy
class SarStrategy(NormStrategy):
    """SAR with per-subject parameters, SGD moments, loss EMA and pending frames.

    Predictions take no gradient (the SAM step runs its own forwards in :meth:`adapt`), so
    several subjects' prediction forwards still batch (``batches_subjects``).
    """

    config_class = SarConfig
    config: SarConfig
    variable_memory = NormStrategy.variable_memory + ("sar.pending",)
    needs_gradients = True

    def __init__(
        self, config: SarConfig, runtime: ModelRuntime, source: SourceData | None = None
    ) -> None:
        names = norm_affine_parameters(runtime.module)
        layers = list(dict.fromkeys(n.rpartition(".")[0] for n in names))
        keep = set(layers[: max(0, len(layers) - config.frozen_last_norms)])
        self.param_names = tuple(n for n in names if n.rpartition(".")[0] in keep)
        if not self.param_names:
            raise ModelInterfaceError(
                f"Strategy 'sar' has no normalization parameter to adapt in model "
                f"{runtime.module.model_name!r} (found {len(layers)} layers, "
                f"frozen_last_norms={config.frozen_last_norms})"
            )
        super().__init__(config, runtime, source)
        c = config
        self._make_optimizer = lambda params: torch.optim.SGD(params, lr=c.lr, momentum=c.momentum)
        log_c = math.log(self.num_classes)
        self.margin = c.margin * log_c
        self.reset_below = c.reset_threshold * log_c

    def init_state(self) -> SubjectState:
        state = super().init_state()
        for name in self.param_names:
            state.params[name] = self.runtime.parameters[name].detach().clone()
        shape = self.runtime.module.input_shape
        state.memory["sar.pending"] = torch.zeros(
            (0, *[s or 0 for s in shape]), dtype=self.runtime.dtype
        )
        # EMA of the second-pass loss; "sar.ema_updates" == 0 means no EMA yet (NaN would be
        # refused by the state checks on load).
        state.memory["sar.ema"] = torch.tensor(0.0, dtype=torch.float64)
        state.memory["sar.ema_updates"] = torch.tensor(0, dtype=torch.int64)
        state.memory["sar.resets"] = torch.tensor(0, dtype=torch.int64)
        return state

    def adapt_admitted(
        self,
        state: SubjectState,
        frames: Tensor,
        out: ForwardOutput,
        admitted: Tensor,
        updated: Tensor,
    ) -> Tensor:
        new = frames[admitted.to(frames.device)].detach()
        pending = state.memory["sar.pending"]
        if pending.shape[1:] != new.shape[1:]:
            # First frames of a model without a fixed input size, or the size changed
            # mid-stream: start a new buffer.
            pending = new.new_zeros((0, *new.shape[1:]))
        pending = torch.cat([pending.to(new.device, new.dtype), new], dim=0)
        if pending.shape[0] >= self.config.update_every:
            self.sar_update(state, pending)
            pending = pending[:0]
        state.memory["sar.pending"] = pending.clone()
        return admitted.clone()

    def _entropy_grads(self, state: SubjectState, frames: Tensor) -> tuple[Tensor, list[Tensor]]:
        out = self.runtime.forward(
            state.model_tensors(), frames, trainable=self.param_names, bn_prior=self.bn_prior(state)
        )
        return softmax_entropy(out.logits), [out.leaves[n] for n in self.param_names]

    def sar_update(self, state: SubjectState, frames: Tensor) -> None:
        """One SAM step on ``frames`` with the reliability filters and the recovery check."""
        entropy, leaves = self._entropy_grads(state, frames)
        reliable = entropy < self.margin
        if not bool(reliable.any()):
            return
        grads = torch.autograd.grad(entropy[reliable].mean(), leaves)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if not bool(torch.isfinite(norm)):
            return
        perturbation = [self.config.rho * g / (norm + 1e-12) for g in grads]
        params = [state.params[n] for n in self.param_names]
        with torch.no_grad():
            for p, e in zip(params, perturbation, strict=True):
                p.add_(e)
        try:
            entropy2, leaves2 = self._entropy_grads(state, frames)
            entropy2 = entropy2[reliable]
            reliable2 = entropy2 < self.margin
            grads2 = (
                torch.autograd.grad(entropy2[reliable2].mean(), leaves2)
                if bool(reliable2.any())
                else None
            )
        finally:
            with torch.no_grad():
                for p, e in zip(params, perturbation, strict=True):
                    p.sub_(e)
        if grads2 is None or not all(bool(torch.isfinite(g).all()) for g in grads2):
            return
        optimizer_step(
            state, dict(zip(self.param_names, grads2, strict=True)), self._make_optimizer
        )
        loss2 = float(entropy2[reliable2].detach().mean())
        ema = float(state.memory["sar.ema"])
        decay = self.config.ema_decay
        ema = (
            loss2
            if int(state.memory["sar.ema_updates"]) == 0
            else decay * ema + (1 - decay) * loss2
        )
        state.memory["sar.ema"].fill_(ema)
        state.memory["sar.ema_updates"] += 1
        if ema < self.reset_below:
            self.recover(state)

    def describe(self, state: SubjectState) -> dict[str, Any]:
        return {**super().describe(state), "sar_resets": int(state.memory["sar.resets"])}

    def recover(self, state: SubjectState) -> None:
        """Reset parameters, moments, statistics and the EMA to the source (gates keep memory)."""
        fresh = self.initial_state()
        state.params = fresh.params
        state.buffers = fresh.buffers
        state.optim = {}
        for key in ("norm.count", "sar.ema", "sar.ema_updates"):
            if key in fresh.memory:
                state.memory[key] = fresh.memory[key]
        state.memory["sar.resets"] += 1
