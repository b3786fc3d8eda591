"""The pixel contract: prepare() and predict take uint8 0..255 and float [0, 1], nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import HEAD, INPUT_SHAPE, LABELS, build_model

import ttaperso
from ttaperso.adapters.torch_classifier import TorchClassifier
from ttaperso.errors import InputError


def _model() -> ttaperso.FERModel:
    return TorchClassifier(build_model(), LABELS, INPUT_SHAPE, head=HEAD, input_range=(-1.0, 1.0))


def _pixels(n: int = 3, size: int = 24, channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8)


def test_uint8_and_unit_floats_give_the_same_input() -> None:
    model = _model()
    u8 = _pixels()
    floats = torch.from_numpy(u8).float() / 255.0
    a = model.prepare(torch.from_numpy(u8))
    b = model.prepare(floats)
    c = model.prepare(u8)  # NumPy array
    d = model.prepare(np.ascontiguousarray(u8.transpose(0, 2, 3, 1)))  # channels-last
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    assert a.shape == (3, *INPUT_SHAPE) and float(a.min()) >= -1.0 and float(a.max()) <= 1.0


def test_rgb_channels_last_is_converted_like_channels_first() -> None:
    model = _model()
    rgb = _pixels(channels=3)
    assert torch.equal(model.prepare(rgb), model.prepare(rgb.transpose(0, 2, 3, 1).copy()))


@pytest.mark.parametrize(
    ("images", "pattern"),
    [
        (
            torch.rand(2, 1, 20, 20, generator=torch.Generator().manual_seed(0)) * 255,
            r"values in \[0, 1\].*got values in \[.*, 2\d\d.*\].*uint8",
        ),
        (torch.rand(2, 1, 20, 20, generator=torch.Generator().manual_seed(1)) * 2 - 1, r"got values in \[-.*\].*preprocessed"),
        (torch.full((1, 1, 8, 8), float("nan")), r"NaN or Inf"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.int64), r"uint8 \(0\.\.255\).*torch\.int64"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.bool), r"torch\.bool"),
        (np.zeros((2, 8, 8, 4), np.uint8), r"1 \(gray\) or 3 \(RGB\) channels.*\(2, 8, 8, 4\)"),
        (np.zeros((8, 8), np.uint8), r"batch.*images\[None\]"),
        ([[0.0]], r"torch\.Tensor or numpy\.ndarray but got list"),
    ],
)
def test_prepare_refuses_anything_else_naming_what_it_got(images: object, pattern: str) -> None:
    with pytest.raises(InputError, match=pattern):
        _model().prepare(images)  # type: ignore[arg-type]


def test_prepare_never_modifies_the_callers_tensor() -> None:
    x = torch.full((1, 1, 16, 16), 1.0 + 1e-4)  # rounding slack: clamped, on a copy
    model = _model()
    model.prepare(x)
    assert float(x.max()) == pytest.approx(1.0 + 1e-4)


def test_predict_takes_uint8_pixels_and_numpy_like_prepared_tensors() -> None:
    model = _model()
    u8 = _pixels(n=4, size=16)
    a = ttaperso.Personalizer(model, "norm")
    b = ttaperso.Personalizer(model, "norm")
    c = ttaperso.Personalizer(model, "norm")
    out_a = a.predict(u8, "s")  # raw uint8 NumPy pixels: prepared by the model
    out_b = b.predict(model.prepare(torch.from_numpy(u8)), "s")  # preprocessed tensor
    out_c = c.predict(model.prepare(u8).numpy(), "s")  # preprocessed NumPy array
    assert torch.equal(out_a.probs, out_b.probs) and torch.equal(out_a.probs, out_c.probs)
    for key, value in a.state_dict("s").items():
        assert torch.equal(value, b.state_dict("s")[key])


def test_predict_transposes_channels_last_preprocessed_input() -> None:
    model = _model()
    x = model.prepare(_pixels(n=2, size=16))
    a = ttaperso.Personalizer(model, "source").predict(x, "s")
    out = ttaperso.Personalizer(model, "source").predict(x.permute(0, 2, 3, 1).numpy(), "s")
    assert torch.equal(a.logits, out.logits)


def test_predict_refuses_unit_floats_outside_a_models_range_without_touching_state() -> None:
    model = TorchClassifier(build_model(), LABELS, INPUT_SHAPE, head=HEAD, input_range=(-1.0, 1.0))
    p = ttaperso.Personalizer(model, "norm")
    with pytest.raises(InputError, match=r"\[-1\.0, 1\.0\].*model\.prepare"):
        p.predict(torch.rand(2, 1, 16, 16) * 255, "s")
    assert p.subjects == ()
