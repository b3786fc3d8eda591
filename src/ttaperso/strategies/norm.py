"""``norm``: per-subject BatchNorm statistics (no gradients).

The statistics used for a batch are a mixture, weighted in frames, of the subject's
estimate and the batch's own statistics (Schneider et al. 2020's prior ``N``, with the
mixture variance). The subject's estimate starts as the source statistics with weight
``source_prior`` and, when ``accumulate`` is on, absorbs the frames the gates admit, up to
``max_frames`` of memory. Special cases:

* ``source_prior=0, accumulate=False``: each batch's own statistics (TENT's reference BN
  adaptation, "BN batch statistics" in FACTS.md section 4);
* ``source_prior>0, accumulate=False``: source + batch mixture only;
* default: a running per-subject estimate. A video batch of a few nearly identical frames
  moves it by little, where pure batch statistics of such a batch collapse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import StrategyConfig
from ..errors import ModelInterfaceError
from ..functional import mix_moments
from ..runtime import ForwardOutput
from ..state import SubjectState
from .base import Strategy

__all__ = ["NormConfig", "GradientNormConfig", "NormStrategy"]


@dataclass(frozen=True)
class NormConfig(StrategyConfig):
    """Options of BN statistics adaptation.

    Args:
        source_prior: weight, in frames, of the source statistics in a fresh subject's
            estimate (0: batch statistics only).
        accumulate: admitted frames update the subject's running estimate.
        max_frames: cap on the estimate's weight; beyond it older frames fade
            geometrically (an exponential moving average with momentum 1/max_frames).
    """

    strategy_name = "norm"
    source_prior: float = 16.0
    accumulate: bool = True
    max_frames: int = 512

    def validate(self) -> None:
        super().validate()
        self._check("source_prior", self.source_prior >= 0.0, "a number >= 0")
        self._check("max_frames", self.max_frames >= 1, "an int >= 1")
        self._check("max_frames", self.max_frames >= self.source_prior, "at least `source_prior`")


@dataclass(frozen=True)
class GradientNormConfig(NormConfig):
    """Options shared by the gradient strategies built on ``norm`` (TENT, SAR).

    Args:
        lr: learning rate.
        momentum: SGD momentum.
        update_every: admitted frames gathered per update.
    """

    lr: float = 1e-4
    momentum: float = 0.9
    update_every: int = 16

    def validate(self) -> None:
        super().validate()
        self._check("lr", self.lr > 0.0, "a number > 0")
        self._check("momentum", 0.0 <= self.momentum < 1.0, "in [0, 1)")
        self._check("update_every", self.update_every >= 1, "an int >= 1")


class NormStrategy(Strategy):
    """Per-subject BN statistics; base class of the gradient strategies that keep them."""

    config_class = NormConfig
    config: NormConfig

    def __init__(self, config: NormConfig, runtime, source=None) -> None:  # type: ignore[no-untyped-def]
        if not runtime.bn_layers:
            raise ModelInterfaceError(
                f"Strategy {config.strategy_name!r} adapts BatchNorm statistics but model "
                f"{runtime.module.model_name!r} has no BatchNorm layer"
            )
        super().__init__(config, runtime, source)

    def init_state(self) -> SubjectState:
        state = SubjectState()
        if self.config.accumulate:
            for name in self.runtime.bn_layers:
                for buf in ("running_mean", "running_var"):
                    key = f"{name}.{buf}"
                    state.buffers[key] = self.runtime.buffers[key].detach().clone()
            state.memory["norm.count"] = torch.tensor(self.config.source_prior, dtype=torch.float64)
        return state

    def bn_prior(self, state: SubjectState) -> float:
        if self.config.accumulate:
            return float(state.memory["norm.count"])
        return self.config.source_prior

    def collects_moments(self) -> bool:
        return self.config.accumulate

    @property
    def batches_subjects(self) -> bool:
        """True when predictions take no gradient and use the base forward (``norm``, and
        ``sar``, whose SAM step runs its own forwards in ``adapt``); subclasses that train
        through the prediction forward or replace it step subjects one by one."""
        cls = type(self)
        return (
            cls.forward is Strategy.forward
            and cls.model_forward is Strategy.model_forward
            and cls.head is Strategy.head
            and not self.returns_features  # the batched forward returns logits only
            and not self.trainable(self._initial)
        )

    def batched_model_forward(
        self, states: list[SubjectState], frames: list[Tensor]
    ) -> list[ForwardOutput]:
        """One forward for several subjects, each with its own BN statistics mixture."""
        sizes = [f.shape[0] for f in frames]
        x = torch.cat(frames)
        segments = torch.repeat_interleave(
            torch.arange(len(frames), device=x.device), torch.tensor(sizes, device=x.device)
        )
        prior = torch.tensor([self.bn_prior(s) for s in states], dtype=x.dtype, device=x.device)
        counts = torch.tensor(sizes, dtype=x.dtype, device=x.device)
        out = self.runtime.forward_segments(
            [s.model_tensors() for s in states],
            x,
            segments,
            prior.unsqueeze(1),
            counts.unsqueeze(1),
            collect_moments=self.collects_moments(),
        )
        outputs, start = [], 0
        for n in sizes:
            part = slice(start, start + n)
            moments = (
                None
                if out.moments is None
                else {k: (m[part], sq[part]) for k, (m, sq) in out.moments.items()}
            )
            outputs.append(
                ForwardOutput(logits=out.logits[part], features=None, leaves={}, moments=moments)
            )
            start += n
        return outputs

    @torch.no_grad()
    def update_statistics(
        self, state: SubjectState, out: ForwardOutput, admitted: Tensor
    ) -> Tensor:
        """Fold the admitted frames' BN moments into the subject's estimate."""
        if not self.config.accumulate or out.moments is None or not bool(admitted.any()):
            return torch.zeros_like(admitted)
        names = self.runtime.bn_layers
        count = float(state.memory["norm.count"])
        # All layers at once: channels concatenated, so the cost per call is a fixed
        # dozen kernels instead of a dozen per BN layer.
        per_mean = torch.cat([out.moments[n][0] for n in names], dim=1)
        per_sq = torch.cat([out.moments[n][1] for n in names], dim=1)
        if not bool(admitted.all()):
            index = admitted.nonzero().squeeze(1).to(per_mean.device)
            per_mean = per_mean.index_select(0, index)
            per_sq = per_sq.index_select(0, index)
        k = float(per_mean.shape[0])
        mean_b = per_mean.mean(dim=0)
        var_b = (per_sq.mean(dim=0) - mean_b * mean_b).clamp_min(0.0)
        running_means = [state.buffers[f"{n}.running_mean"] for n in names]
        running_vars = [state.buffers[f"{n}.running_var"] for n in names]
        mean, var = mix_moments(
            torch.cat(running_means), torch.cat(running_vars), count, mean_b, var_b, k
        )
        sizes = [t.numel() for t in running_means]
        torch._foreach_copy_(running_means, list(mean.split(sizes)))
        torch._foreach_copy_(running_vars, list(var.split(sizes)))
        state.memory["norm.count"].fill_(min(count + k, float(self.config.max_frames)))
        return admitted.clone()

    def adapt(
        self, state: SubjectState, frames: Tensor, out: ForwardOutput, admitted: Tensor
    ) -> Tensor:
        return self.update_statistics(state, out, admitted)

    def calibrate(self, state: SubjectState, frames: Tensor) -> None:
        """Fold a neutral recording's BN statistics into the subject's estimate.

        See :func:`ttaperso.calibration.calibrate_bn_statistics` (shared by tent and sar).
        """
        from ..calibration import calibrate_bn_statistics

        calibrate_bn_statistics(self, state, frames)
