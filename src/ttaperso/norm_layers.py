"""Batch normalization whose statistics a subject controls.

The Personalizer's private copy of the model has every ``BatchNorm{1,2,3}d`` replaced by a
:class:`SubjectBatchNorm` with the same parameter and buffer names. Its running buffers are
swapped per subject (``torch.func.functional_call``); how they are mixed with the current
batch is decided by a :class:`NormControl` that the runtime sets for one forward under its
lock. Keeping the mode outside the module means no ``train()``/``eval()`` flipping and no
``running_mean = None`` surgery (which is how TENT's reference code mutates the caller's
model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ModelInterfaceError
from .functional import mix_moments

__all__ = [
    "NormControl",
    "SubjectBatchNorm",
    "convert_batchnorms",
    "norm_affine_parameters",
    "sample_moments",
]


@dataclass
class NormControl:
    """Switches read by every :class:`SubjectBatchNorm` during one forward.

    Attributes:
        prior: weight, in frames, of the stored (running) statistics against the current
            batch. ``math.inf`` uses the stored statistics only (plain eval mode); ``0``
            uses the batch's own statistics (TENT's reference behaviour).
        collect: when not ``None``, each layer writes its per-sample channel moments
            ``(mean, mean of squares)``, each ``(N, C)``, under its module name, so a
            strategy can update statistics from the frames its gates admitted.
    """

    prior: float = math.inf
    collect: dict[str, tuple[Tensor, Tensor]] | None = None
    #: several subjects in one forward (``predict_many``): per-sample subject index ``(N,)``;
    #: the running buffers are then stacked ``(S, C)`` (or shared ``(C,)``) and each
    #: subject's statistics are mixed with its own frames' moments
    segments: Tensor | None = None
    #: per-subject weight of the stored statistics ``(S, 1)`` and frame count ``(S, 1)``
    segment_prior: Tensor | None = None
    segment_frames: Tensor | None = None

    def reset(self) -> None:
        self.prior = math.inf
        self.collect = None
        self.segments = None
        self.segment_prior = None
        self.segment_frames = None


class SubjectBatchNorm(nn.Module):
    """A BatchNorm layer (any dimensionality) driven by a shared :class:`NormControl`."""

    running_mean: Tensor
    running_var: Tensor
    _control: NormControl

    def __init__(self, source: nn.modules.batchnorm._BatchNorm, name: str, control: NormControl):
        super().__init__()
        if source.running_mean is None or source.running_var is None:
            raise ModelInterfaceError(
                f"BatchNorm layer {name!r} keeps no running statistics "
                "(track_running_stats=False); ttaperso needs the source statistics"
            )
        self.num_features = source.num_features
        self.eps = source.eps
        self.layer_name = name
        # Reuse the (private copy's) tensors: no extra memory, identical state_dict names.
        self.weight = source.weight
        self.bias = source.bias
        self.register_buffer("running_mean", source.running_mean)
        self.register_buffer("running_var", source.running_var)
        if source.num_batches_tracked is not None:
            self.register_buffer("num_batches_tracked", source.num_batches_tracked)
        # A plain attribute, not a submodule: the control is runtime state, not model state.
        object.__setattr__(self, "_control", control)

    def forward(self, x: Tensor) -> Tensor:
        control = self._control
        if control.segments is not None:
            return self._segmented(x, control)
        prior = control.prior
        eval_mode = math.isinf(prior)
        moments: tuple[Tensor, Tensor] | None = None
        if control.collect is not None or not (eval_mode or prior <= 0.0):
            moments = sample_moments(x)
            if control.collect is not None:
                control.collect[self.layer_name] = (moments[0].detach(), moments[1].detach())
        if eval_mode:
            return F.batch_norm(
                x,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                training=False,
                momentum=0.0,
                eps=self.eps,
            )
        if prior <= 0.0:
            # Pure batch statistics: the fused kernel, no buffer update (running stats None).
            return F.batch_norm(
                x, None, None, self.weight, self.bias, training=True, momentum=0.0, eps=self.eps
            )
        per_mean, per_sq = moments  # type: ignore[misc]
        batch_mean = per_mean.detach().mean(dim=0)
        batch_var = (per_sq.detach().mean(dim=0) - batch_mean * batch_mean).clamp_min(0.0)
        n = float(x.shape[0])
        if torch.is_grad_enabled() and x.requires_grad and not self.running_mean.requires_grad:
            # Gradients flow through the batch statistics (TENT differentiates through
            # them): one autograd node with the fused forward and an analytic backward.
            return _MixtureBatchNorm.apply(
                x,
                self.weight,
                self.bias,
                self.running_mean,
                self.running_var,
                batch_mean,
                batch_var,
                prior / (prior + n),
                n / (prior + n),
                self.eps,
            )
        mean, var = mix_moments(
            self.running_mean, self.running_var, prior, batch_mean, batch_var, n
        )
        # No gradient through the statistics (no_grad, or x needs none): the fused eval
        # kernel with the mixed statistics is one pass over x and still differentiates
        # with respect to weight and bias.
        return F.batch_norm(
            x, mean, var, self.weight, self.bias, training=False, momentum=0.0, eps=self.eps
        )

    def _segmented(self, x: Tensor, control: NormControl) -> Tensor:
        """Several subjects' frames in one batch, each normalised with its own mixture.

        The same statistics as one call per subject (stored estimate mixed with that
        subject's frames, :func:`~ttaperso.functional.mix_moments`), applied per sample as
        one scale-and-shift pass. No gradients (gradient-free strategies only).
        """
        seg, prior, frames = control.segments, control.segment_prior, control.segment_frames
        assert seg is not None and prior is not None and frames is not None
        per_mean, per_sq = sample_moments(x)
        if control.collect is not None:
            control.collect[self.layer_name] = (per_mean.detach(), per_sq.detach())
        subjects, channels = prior.shape[0], x.shape[1]
        mean_b = per_mean.new_zeros(subjects, channels).index_add_(0, seg, per_mean) / frames
        sq_b = per_sq.new_zeros(subjects, channels).index_add_(0, seg, per_sq) / frames
        var_b = (sq_b - mean_b * mean_b).clamp_min(0.0)
        stored_mean = self.running_mean.expand(subjects, channels)
        stored_var = self.running_var.expand(subjects, channels)
        mean, var = mix_moments(stored_mean, stored_var, prior, mean_b, var_b, frames)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        shape = (x.shape[0], channels) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift[seg].view(shape), x, scale[seg].view(shape))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, layer={self.layer_name!r}"


class _MixtureBatchNorm(torch.autograd.Function):
    """BatchNorm with source/batch mixed statistics, differentiable through the batch part.

    Statistics: ``mean = wa m_s + wb m_b``, ``var = wa v_s + wb v_b + wa wb (m_b - m_s)^2``
    (:func:`~ttaperso.functional.mix_moments`) with ``m_b, v_b`` the batch's own moments
    over ``(N, *spatial)``. The forward is torch's fused eval kernel; the backward is the
    closed form (two reductions and one elementwise pass, like native training-mode BN)
    where autograd through the written-out formula took about ten passes over the
    activations. Equal to autograd through the formula (tested with gradcheck).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean_s: Tensor,
        var_s: Tensor,
        batch_mean: Tensor,
        batch_var: Tensor,
        wa: float,
        wb: float,
        eps: float,
    ) -> Tensor:
        d = batch_mean - mean_s
        mean = torch.add(mean_s, d, alpha=wb)
        var = torch.addcmul(torch.lerp(var_s, batch_var, wb), d, d, value=wa * wb)
        ctx.save_for_backward(x, weight, mean, var, d, batch_mean)
        ctx.coeffs = (wa, wb, eps)
        return F.batch_norm(x, mean, var, weight, bias, training=False, momentum=0.0, eps=eps)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, var, d, batch_mean = ctx.saved_tensors
        wa, wb, eps = ctx.coeffs
        shape = (1, -1) + (1,) * (x.dim() - 2)
        count = x.numel() / x.shape[1]
        r = torch.rsqrt(var + eps)
        w = weight if weight is not None else torch.ones_like(r)
        # torch's own eval-mode BN backward does the two reductions and the
        # statistics-free input gradient (g * w * r) in fused passes: sum(g) is its bias
        # gradient and sum(g (x - mean)) * r its weight gradient.
        grad_x_eval, grad_w_eval, sum_g = torch.ops.aten.native_batch_norm_backward(
            grad.contiguous(), x, w, mean, var, None, None, False, eps, [True, True, True]
        )
        centered = grad_w_eval / r  # sum of g (x - mean)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            d_mean = -r * w * sum_g
            d_var = -0.5 * r**3 * w * centered
            # The statistics' share: d mean/d x and d var/d x are per-channel affine in x.
            d_mb = wb * d_mean + d_var * (2.0 * wa * wb * d - 2.0 * wb * batch_mean)
            d_qb = wb * d_var
            coef_x = (2.0 * d_qb / count).view(shape)
            shift = (d_mb / count).view(shape)
            grad_x = grad_x_eval.addcmul_(x, coef_x).add_(shift)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = grad_w_eval
        if ctx.needs_input_grad[2]:
            grad_b = sum_g
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


def sample_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample channel moments of ``x`` ``(N, C, *)``: mean and mean of squares, each ``(N, C)``.

    Written as a contiguous last-dimension mean and a vector norm because both are single
    fast passes on CPU, where ``Tensor.var`` over ``(0, 2, 3)`` is 10-30x slower than an
    eval-mode BatchNorm (measured in docs/benchmarks.md). The batch variance is derived
    from these moments (``E[x^2] - E[x]^2``, clamped at 0); BN inputs have a mean of the
    order of their standard deviation, so float32 cancellation stays far below the
    statistics' own sampling noise.
    """
    if x.dim() == 2:
        return x, x * x
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    size = flat.shape[-1]
    per_mean = flat.mean(dim=-1)
    per_sq = torch.linalg.vector_norm(flat, dim=-1).square() / size
    return per_mean, per_sq


def convert_batchnorms(module: nn.Module, control: NormControl) -> list[str]:
    """Replace every BatchNorm in ``module`` (in place) by a :class:`SubjectBatchNorm`.

    Only call this on the runtime's private copy of a model. Returns the replaced
    module names in module order.
    """
    replaced: list[str] = []
    for name, child in list(module.named_modules()):
        for child_name, grandchild in list(child.named_children()):
            if isinstance(grandchild, nn.modules.batchnorm._BatchNorm):
                full = f"{name}.{child_name}" if name else child_name
                setattr(child, child_name, SubjectBatchNorm(grandchild, full, control))
                replaced.append(full)
    return replaced


_NORM_TYPES = (SubjectBatchNorm, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d)


def norm_affine_parameters(module: nn.Module) -> list[str]:
    """Names of the affine weight/bias parameters of all normalization layers, in order.

    Chosen by module type, never by name, so any architecture works.
    """
    names: list[str] = []
    for mod_name, mod in module.named_modules():
        if isinstance(mod, _NORM_TYPES):
            for pname, param in mod.named_parameters(recurse=False):
                if pname in ("weight", "bias") and param is not None:
                    names.append(f"{mod_name}.{pname}" if mod_name else pname)
    return names
