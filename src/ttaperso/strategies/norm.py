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
from ..errors import ConfigError, InputError, ModelInterfaceError
from ..functional import mix_moments
from ..guards import refresh_snapshots
from ..runtime import ForwardOutput, ModelRuntime
from ..source_data import SourceData
from ..state import SubjectState
from .base import Strategy
from .registry import register_strategy

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


@register_strategy
class NormStrategy(Strategy):
    """Per-subject BN statistics; base class of the gradient strategies that keep them.

    Its :meth:`adapt` is a template: the admitted frames' statistics are folded in, then
    (when any frame was admitted) :meth:`adapt_admitted` runs, the hook of the strategies
    built on ``norm`` (``tent``, ``sar``, ``eata``, ``fisher``, ``shot``).
    """

    config_class = NormConfig
    config: NormConfig
    #: predictions take no gradient and use the base forward: several subjects run in one
    #: pass with per-subject statistics (subclasses that train through the prediction
    #: forward or replace it set this back to False)
    batches_subjects = True
    calibrates_statistics = True

    def __init__(
        self, config: NormConfig, runtime: ModelRuntime, source: SourceData | None = None
    ) -> None:
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

    def batched_model_forward(
        self, states: list[SubjectState], frames: list[Tensor]
    ) -> list[ForwardOutput]:
        """One forward for several subjects, each with its own BN statistics mixture."""
        if not self.batches_subjects:  # a subclass whose prediction forward is its own
            return super().batched_model_forward(states, frames)
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
        """Fold the admitted frames' statistics in, then :meth:`adapt_admitted` (if any)."""
        updated = self.update_statistics(state, out, admitted)
        if not bool(admitted.any()):
            return updated
        return self.adapt_admitted(state, frames, out, admitted, updated)

    def adapt_admitted(
        self,
        state: SubjectState,
        frames: Tensor,
        out: ForwardOutput,
        admitted: Tensor,
        updated: Tensor,
    ) -> Tensor:
        """Hook: the update from the admitted frames after the statistics (``updated``: the
        frames the statistics took). Returns the mask of frames that went into the state."""
        return updated

    def calibrate(self, state: SubjectState, frames: Tensor) -> None:
        """Fold a neutral recording's BN statistics into the subject's estimate."""
        self.calibrate_statistics(state, state.model_tensors(), frames)

    @torch.no_grad()
    def calibrate_statistics(
        self, state: SubjectState, tensors: dict[str, Tensor], frames: Tensor
    ) -> None:
        """Fold ``frames``' per-layer BN moments into ``state``'s statistics (all admitted).

        The forward runs the model with ``tensors`` (the subject's model tensors, holding
        ``state.buffers``' statistics) and normalises with the subject's current estimate
        mixed with the batch (the mixture a prediction uses), so deeper layers see the
        moments they will see at prediction time. Raises before any write when the
        strategy keeps no running estimate (``accumulate=False``) or the model produces
        non-finite values. The calibrated state becomes the collapse guard's snapshot.
        """
        if "norm.count" not in state.memory:
            raise ConfigError(
                f"Strategy {self.config.strategy_name!r} with accumulate=False keeps no "
                "per-subject BN statistics: neutral-baseline calibration needs accumulate=True"
            )
        out = self.runtime.forward(
            tensors, frames, bn_prior=self.bn_prior(state), collect_moments=True
        )
        moments_ok = out.moments is not None and all(
            bool(torch.isfinite(m).all() and torch.isfinite(sq).all())
            for m, sq in out.moments.values()
        )
        if not moments_ok or not bool(torch.isfinite(out.logits).all()):
            raise InputError(
                "The model produced non-finite activations for the neutral frames; the "
                "subject's state was not changed"
            )
        self.update_statistics(state, out, torch.ones(frames.shape[0], dtype=torch.bool))
        refresh_snapshots(state)
