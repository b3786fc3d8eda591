"""``shot``: online SHOT for subject streams (information maximisation + centroid labels).

After Liang et al., ICML 2020 (tim-learn/SHOT), which is offline: the classifier is
frozen and the feature extractor is trained on the whole target set with information
maximisation (mean per-sample entropy minus the entropy of the mean prediction) plus
``0.3`` x cross-entropy to pseudo-labels from probability-weighted cosine centroids (soft
centroids, then one hard refinement, over the whole target set, once per epoch).

Online, per subject, this strategy:

* trains the affine parameters of the normalization layers (the head and every other
  weight stay frozen), with ``norm``'s per-subject BN statistics, accumulating gradients
  over ``update_every`` admitted frames per optimizer step as ``tent`` does;
* computes the diversity term's mean prediction over the current admitted frames plus the
  subject's recent window (those as constants), so single frames work;
* takes pseudo-labels from centroids over the window plus the current frames, recomputed
  at every call (soft, then ``refine_rounds`` hard refinements; the reference's one);
* keeps the window bounded: the last ``window`` admitted frames' features (the head's
  input) and probabilities, ``window * (D + C)`` floats per subject
  (``memory/shot.features``, ``memory/shot.probs``).

The window's features were computed with the subject's parameters at the time; they go
stale as the parameters move (the offline method recomputes them every epoch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import StateFileError
from ..gates import Gate
from ..runtime import ForwardOutput, ModelRuntime
from ..source_data import SourceData
from ..state import SubjectState
from .feature_math import centroid_pseudo_labels, information_maximization
from .registry import register_strategy
from .tent import TentConfig, TentStrategy

__all__ = ["ShotConfig", "ShotStrategy"]


@dataclass(frozen=True)
class ShotConfig(TentConfig):
    """Options of online SHOT (plus ``tent``'s and ``norm``'s options).

    Args:
        beta: weight of the cross-entropy to centroid pseudo-labels (reference 0.3).
        window: recent admitted frames kept per subject for centroids and diversity.
        refine_rounds: hard refinements of the centroids after the soft ones.
    """

    strategy_name = "shot"
    gates: tuple[Gate, ...] = field(default=())
    beta: float = 0.3
    window: int = 64
    refine_rounds: int = 1

    def validate(self) -> None:
        super().validate()
        self._check("beta", self.beta >= 0.0, "a number >= 0")
        self._check("window", self.window >= 1, "an int >= 1")
        self._check("refine_rounds", self.refine_rounds >= 0, "an int >= 0")


@register_strategy
class ShotStrategy(TentStrategy):
    """Online SHOT with per-subject affine parameters, moments, statistics and window."""

    config_class = ShotConfig
    config: ShotConfig
    variable_memory = TentStrategy.variable_memory + ("shot.features", "shot.probs")
    uses_features = True  # the window keeps the admitted frames' features

    def __init__(
        self, config: ShotConfig, runtime: ModelRuntime, source: SourceData | None = None
    ) -> None:
        weight, _ = runtime.module.linear_head()  # SHOT needs a features/head split
        self.feature_dim = int(weight.shape[1])
        super().__init__(config, runtime, source)

    def init_state(self) -> SubjectState:
        state = super().init_state()
        dtype = self.runtime.dtype
        state.memory["shot.features"] = torch.zeros(0, self.feature_dim, dtype=dtype)
        state.memory["shot.probs"] = torch.zeros(0, self.num_classes, dtype=dtype)
        return state

    def adapt_admitted(
        self,
        state: SubjectState,
        frames: Tensor,
        out: ForwardOutput,
        admitted: Tensor,
        updated: Tensor,
    ) -> Tensor:
        if out.features is None:  # pragma: no cover - uses_features: the forward returns them
            return torch.zeros_like(admitted)
        index = admitted.nonzero().squeeze(1).to(out.logits.device)
        logits = out.logits.index_select(0, index)
        probs = logits.softmax(dim=1)
        z = out.features.index_select(0, index).detach()
        past_z = state.memory["shot.features"].to(z)
        past_p = state.memory["shot.probs"].to(probs)
        ent, mean_ent = information_maximization(probs, past_p.sum(dim=0), float(past_p.shape[0]))
        k = float(index.numel())
        loss = ent - k * mean_ent
        if self.config.beta > 0:
            with torch.no_grad():
                all_labels = centroid_pseudo_labels(
                    torch.cat([past_z, z]),
                    torch.cat([past_p, probs.detach()]),
                    self.config.refine_rounds,
                )
            pseudo = all_labels[past_z.shape[0] :]
            loss = loss + self.config.beta * F.cross_entropy(logits, pseudo, reduction="sum")
        leaves = [out.leaves[n] for n in self.param_names]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        if not all(g is None or bool(torch.isfinite(g).all()) for g in grads):
            return torch.zeros_like(admitted)
        window = self.config.window
        dtype = self.runtime.dtype
        state.memory["shot.features"] = torch.cat([past_z, z]).cpu()[-window:].to(dtype).clone()
        state.memory["shot.probs"] = (
            torch.cat([past_p, probs.detach()]).cpu()[-window:].to(dtype).clone()
        )
        self.accumulate_and_step(state, dict(zip(self.param_names, grads, strict=True)), k)
        return admitted.clone()

    def check_state(self, state: SubjectState, source: str) -> None:
        """Also refuse windows whose two parts disagree or exceed ``window`` frames."""
        super().check_state(state, source)
        n_z = state.memory["shot.features"].shape[0]
        n_p = state.memory["shot.probs"].shape[0]
        if n_z != n_p or n_z > self.config.window:
            raise StateFileError(
                f"{source}: memory/shot.features ({n_z} rows) and memory/shot.probs ({n_p} "
                f"rows) must hold the same number of frames, at most window={self.config.window}"
            )
