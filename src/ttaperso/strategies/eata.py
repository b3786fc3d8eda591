"""``eata``: efficient anti-forgetting test-time adaptation, per subject.

Niu et al., ICML 2022 (mr-eggplant/EATA). Like ``tent`` (per-subject BN affine
parameters, optimizer moments and ``norm``'s BN statistics), with three additions:

1. reliability filter: only frames with entropy < ``margin`` x ln C (E0 = 0.4 ln C) enter
   the gradient;
2. redundancy filter: of those, only frames whose probability vector has
   ``|cosine| < redundancy`` to the subject's running mean prediction (an EMA, decay 0.9,
   of the frames that passed both filters, kept in the subject's memory); each kept frame
   is weighted by ``1 / exp(H - E0)``;
3. anti-forgetting: ``alpha`` x sum_j F_j (theta_j - theta0_j)^2 anchors the adapted
   parameters to the source values, with F the diagonal Fisher information on a sample
   of the model's source domain (``SourceData``, up to ``fisher_samples`` frames).

``uses_source = "optional"``: without a source sample the anchor is left out (a warning
is logged), which is EATA's "ETA" variant.

Differences from the reference code:

* thresholds are fractions of ln C (the reference hard-codes 0.4 ln 1000);
* the Fisher is per frame (``1/N sum_i g_i^2`` with the model's own prediction as the
  label) and computed with the source BN statistics; the reference squares the gradient
  of each batch's mean loss, computed in training mode with batch statistics, which
  cancels the frames' disagreement and depends on the batch size. Its scale therefore
  differs: ``alpha = 2000`` is kept as the default but does not mean the same strength;
* gradients accumulate over ``update_every`` admitted frames as in ``tent``, and the BN
  statistics follow ``norm``; the reference steps once per batch with batch statistics.

With the default ``redundancy = 0.05`` on a 7-class model few frames pass the redundancy
filter: non-negative probability vectors of C classes are rarely near-orthogonal to their
own mean when C is small (for 1000 classes they usually are). The filter is kept as
published; see docs/strategies-features.md for what it does on JAFFE.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import softmax_entropy
from ..gates import Gate
from ..runtime import ForwardOutput, ModelRuntime
from ..source_data import SourceData
from ..state import SubjectState
from .feature_math import empirical_fisher_diagonal
from .registry import register_strategy
from .tent import TentConfig, TentStrategy

__all__ = ["EataConfig", "EataStrategy"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EataConfig(TentConfig):
    """Options of EATA (plus ``tent``'s and ``norm``'s options).

    Args:
        margin: reliability threshold E0 as a fraction of ln C.
        redundancy: a frame is redundant when ``|cos|`` to the running mean prediction is
            at least this (the paper's epsilon).
        alpha: weight of the Fisher anchor to the source parameters.
        fisher_samples: source frames used for the Fisher (the paper uses 2,000).
        mean_decay: decay of the running mean prediction.
    """

    strategy_name = "eata"
    gates: tuple[Gate, ...] = field(default=())
    optimizer: Literal["adam", "sgd"] = "sgd"
    lr: float = 2.5e-4
    margin: float = 0.4
    redundancy: float = 0.05
    alpha: float = 2000.0
    fisher_samples: int = 2000
    mean_decay: float = 0.9

    def validate(self) -> None:
        super().validate()
        self._check("margin", 0.0 < self.margin <= 1.0, "a fraction of ln C in (0, 1]")
        self._check("redundancy", 0.0 < self.redundancy <= 1.0, "in (0, 1]")
        self._check("alpha", self.alpha >= 0.0, "a number >= 0")
        self._check("fisher_samples", self.fisher_samples >= 1, "an int >= 1")
        self._check("mean_decay", 0.0 <= self.mean_decay < 1.0, "in [0, 1)")


@register_strategy
class EataStrategy(TentStrategy):
    """TENT with EATA's sample filters, weights and Fisher anchor, per subject."""

    config_class = EataConfig
    config: EataConfig
    uses_source = "optional"

    def __init__(
        self, config: EataConfig, runtime: ModelRuntime, source: SourceData | None = None
    ) -> None:
        super().__init__(config, runtime, source)
        self.e0 = config.margin * math.log(self.num_classes)
        self.anchor = {n: self.runtime.parameters[n].detach().clone() for n in self.param_names}
        self.fisher: dict[str, Tensor] | None = None
        if self.source is None:
            log.warning(
                "eata without a SourceData sample: no Fisher anchor to the source weights "
                "(EATA's ETA variant); pass source=SourceData(...) for the full method"
            )
        else:
            self.fisher = self._source_fisher(self.source.frames[: config.fisher_samples])

    def _source_fisher(self, frames: Tensor) -> dict[str, Tensor]:
        """Per-frame empirical Fisher of the BN affine parameters on source frames."""
        totals = {n: torch.zeros_like(p) for n, p in self.anchor.items()}
        n = 0
        # One frame per forward: a backward pass through a batch graph costs the whole batch.
        for chunk in frames.split(1):
            out = self.runtime.forward(
                {k: self.runtime.parameters[k] for k in self.param_names},
                chunk,
                trainable=self.param_names,
            )
            leaves = [out.leaves[k] for k in self.param_names]
            fisher = empirical_fisher_diagonal(out.logits.log_softmax(dim=1), leaves)
            for k, f in zip(self.param_names, fisher, strict=True):
                totals[k] += f * chunk.shape[0]
            n += chunk.shape[0]
        return {k: torch.nan_to_num(v / n, nan=0.0, posinf=0.0) for k, v in totals.items()}

    def init_state(self) -> SubjectState:
        state = super().init_state()
        state.memory["eata.mean_probs"] = torch.zeros(self.num_classes, dtype=self.runtime.dtype)
        state.memory["eata.has_mean"] = torch.tensor(False)
        state.memory["eata.selected"] = torch.tensor(0, dtype=torch.int64)
        return state

    def sample_filter(self, state: SubjectState, logits: Tensor) -> tuple[Tensor, Tensor]:
        """EATA's two filters on admitted frames: (kept mask, per-frame weights)."""
        entropy = softmax_entropy(logits.detach())
        reliable = entropy < self.e0
        keep = reliable.clone()
        if bool(state.memory["eata.has_mean"]) and bool(reliable.any()):
            probs = logits.detach().softmax(dim=1)
            mean = state.memory["eata.mean_probs"].to(probs)
            cosine = F.cosine_similarity(probs, mean[None], dim=1)
            keep &= cosine.abs() < self.config.redundancy
        weights = torch.exp(-(entropy - self.e0))  # 1 / exp(H - E0)
        return keep, weights

    def adapt_admitted(
        self,
        state: SubjectState,
        frames: Tensor,
        out: ForwardOutput,
        admitted: Tensor,
        updated: Tensor,
    ) -> Tensor:
        index = admitted.nonzero().squeeze(1).to(out.logits.device)
        logits = out.logits.index_select(0, index)
        keep, weights = self.sample_filter(state, logits)
        if not bool(keep.any()):
            return admitted.clone()  # statistics updated; nothing for the gradient
        kept = logits[keep]
        loss = (softmax_entropy(kept) * weights[keep]).sum()
        leaves = [out.leaves[n] for n in self.param_names]
        if self.fisher is not None and self.config.alpha > 0:
            # Counted once per kept frame so that the per-step mean carries it once.
            anchor = sum(
                (self.fisher[n] * (leaf - self.anchor[n].to(leaf)) ** 2).sum()
                for n, leaf in zip(self.param_names, leaves, strict=True)
            )
            loss = loss + self.config.alpha * float(kept.shape[0]) * anchor
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        if not all(g is None or bool(torch.isfinite(g).all()) for g in grads):
            return torch.zeros_like(admitted)
        with torch.no_grad():
            batch_mean = kept.detach().softmax(dim=1).mean(dim=0).cpu()
            if bool(state.memory["eata.has_mean"]):
                decay = self.config.mean_decay
                batch_mean = decay * state.memory["eata.mean_probs"] + (1 - decay) * batch_mean
            state.memory["eata.mean_probs"] = batch_mean.to(self.runtime.dtype).clone()
            state.memory["eata.has_mean"] = torch.tensor(True)
            state.memory["eata.selected"] += int(kept.shape[0])
        self.accumulate_and_step(
            state, dict(zip(self.param_names, grads, strict=True)), float(kept.shape[0])
        )
        return admitted.clone()
