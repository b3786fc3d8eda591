"""The predict path's speed-ups compute exactly what the plain formulations compute."""

from __future__ import annotations

import pytest
import torch
from conftest import INPUT_SHAPE, LABELS, build_model, target_frames
from torch.func import functional_call

from ttaperso.functional import mix_moments
from ttaperso.models import as_fer_model
from ttaperso.norm_layers import _MixtureBatchNorm, sample_moments
from ttaperso.runtime import ModelRuntime
from ttaperso.validation import validate_frames


def _formula_bn(x, w, b, mean_s, var_s, prior, eps):  # type: ignore[no-untyped-def]
    """The mixture BN written out, differentiated by autograd (the reference)."""
    per_mean, per_sq = sample_moments(x)
    batch_mean = per_mean.mean(0)
    batch_var = per_sq.mean(0) - batch_mean * batch_mean
    mean, var = mix_moments(mean_s, var_s, prior, batch_mean, batch_var, float(x.shape[0]))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - mean.view(shape)) * torch.rsqrt(var + eps).view(shape) * w.view(shape) + b.view(
        shape
    )


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (3, 6), (2, 4, 7)])
@pytest.mark.parametrize("prior", [16.0, 0.5])
def test_mixture_bn_backward_equals_autograd_of_the_formula(shape, prior) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(0)
    c = shape[1]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    w = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(c, generator=gen, dtype=torch.float64).requires_grad_()
    mean_s = torch.randn(c, generator=gen, dtype=torch.float64)
    var_s = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    want = _formula_bn(x, w, b, mean_s, var_s, prior, 1e-3)
    want_grads = torch.autograd.grad((want * g).sum(), (x, w, b))
    per_mean, per_sq = sample_moments(x.detach())
    batch_mean = per_mean.mean(0)
    batch_var = per_sq.mean(0) - batch_mean * batch_mean
    n = float(shape[0])
    got = _MixtureBatchNorm.apply(
        x, w, b, mean_s, var_s, batch_mean, batch_var, prior / (prior + n), n / (prior + n), 1e-3
    )
    got_grads = torch.autograd.grad((got * g).sum(), (x, w, b))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, e in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_sample_moments_match_var_mean() -> None:
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64) * 3 + 1
    per_mean, per_sq = sample_moments(x)
    var, mean = torch.var_mean(x, dim=(2, 3), correction=0)
    torch.testing.assert_close(per_mean, mean)
    torch.testing.assert_close(per_sq - per_mean**2, var)


def test_cached_slot_swap_equals_functional_call() -> None:
    model = as_fer_model(build_model(), labels=LABELS, input_shape=INPUT_SHAPE)
    runtime = ModelRuntime(model)
    tensors = {k: v.clone() * 1.1 for k, v in runtime.buffers.items() if "running" in k}
    tensors.update({k: v.clone() + 0.05 for k, v in runtime.parameters.items()})
    x = target_frames(6, seed=3)
    got = runtime.forward(tensors, x).logits
    with torch.no_grad():
        want = functional_call(runtime.module, tensors, (x,), tie_weights=False, strict=False)
    assert torch.equal(got, want)
    # the shared copy is back to its own tensors afterwards
    assert torch.equal(runtime.forward({}, x).logits, runtime.module(x))


def test_validation_rejects_nan_and_inf_in_one_pass_and_detaches() -> None:
    model = as_fer_model(build_model(), labels=LABELS, input_shape=INPUT_SHAPE)
    runtime = ModelRuntime(model)
    x = target_frames(3, seed=1)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[1, 0, 2, 2] = bad
        with pytest.raises(Exception, match=r"frame\(s\) \[1\] contain NaN or Inf"):
            validate_frames(y, runtime.module, dtype=torch.float32, device=torch.device("cpu"))
    leaf = x.clone().requires_grad_()
    out = validate_frames(leaf, runtime.module, dtype=torch.float32, device=torch.device("cpu"))
    assert not out.requires_grad
