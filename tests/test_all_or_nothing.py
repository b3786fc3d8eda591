"""A refused call changes nothing, for every strategy: the twin test.

Two Personalizers see the same stream; one of them also gets a call that is refused (bad
input, inference mode for a gradient strategy, an overflowing forward, an error raised in
the middle of the strategy's update). Afterwards both must give bit-identical predictions
and states: the refused call left no trace. The update error is the strongest case: it is
raised *after* the strategy has written into the state it was handed, so it only passes
because steps run on a working copy that replaces the state when the whole call succeeded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import (
    PersonalizerFactory,
    assert_same_prediction,
    assert_states_finite,
    states_equal,
    target_frames,
)
from torch import Tensor

import ttaperso
from ttaperso import ConfigError, InputError
from ttaperso.strategies import SubjectState

STRATEGIES = ttaperso.list_strategies()


def _stream(calls: int, seed: int, batch: int = 2) -> list[Tensor]:
    return list(target_frames(calls * batch, seed=seed).split(batch))


def _twins(
    factory: PersonalizerFactory, strategy: str, **kw: Any
) -> tuple[ttaperso.Personalizer, ttaperso.Personalizer]:
    """Two Personalizers that have seen the same warm-up for subjects A and B."""
    p, twin = factory(strategy, **kw), factory(strategy, **kw)
    for frames in _stream(3, seed=1):
        for q in (p, twin):
            q.predict(frames, "A")
            q.predict(frames * 0.5, "B")
    return p, twin


def _assert_twins_agree(p: ttaperso.Personalizer, twin: ttaperso.Personalizer) -> None:
    """Same subjects, same states, and the same predictions from here on."""
    assert p.subjects == twin.subjects
    for s in p.subjects:
        assert states_equal(p.state_dict(s), twin.state_dict(s)), s
    for frames in _stream(2, seed=2):
        for s in p.subjects:
            assert_same_prediction(p.predict(frames, s), twin.predict(frames, s))


def _forward_is_finite(p: ttaperso.Personalizer, subject: str, frames: Tensor) -> bool:
    """Oracle: does the strategy's forward for ``subject`` give finite logits/moments?"""
    state = SubjectState.from_flat(p.state_dict(subject))
    out = p.strategy.forward(state, frames)
    checked = [out.logits.detach().reshape(-1)]
    if out.features is not None:
        checked.append(out.features.detach().reshape(-1))
    for m, sq in (out.moments or {}).values():
        checked += [m.reshape(-1), sq.reshape(-1)]
    return bool(torch.isfinite(torch.cat(checked)).all())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_refused_inputs_leave_no_trace(
    personalizer_factory: PersonalizerFactory, strategy: str
) -> None:
    p, twin = _twins(personalizer_factory, strategy)
    nan = target_frames(2, seed=3)
    nan[1, 0, 0, 0] = float("nan")
    for call in (
        lambda: p.predict(nan, "A"),
        lambda: p.predict(torch.zeros(2, 3, 16, 16), "A"),
        lambda: p.predict(target_frames(2, seed=3).to(torch.int64), "A"),
        lambda: p.predict(torch.empty(0, 1, 16, 16), "A"),
        lambda: p.predict_many({"A": target_frames(2, seed=3), "B": nan}),
        lambda: p.predict(target_frames(2, seed=3), ""),
    ):
        with pytest.raises(InputError):
            call()
    _assert_twins_agree(p, twin)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_error_inside_the_update_leaves_no_trace(
    personalizer_factory: PersonalizerFactory, strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The strategy writes into the state, then fails: the live state is untouched."""
    p, twin = _twins(personalizer_factory, strategy)
    real_adapt = p.strategy.adapt

    def adapt_then_fail(state: SubjectState, *args: Any) -> Tensor:
        real_adapt(state, *args)
        for tensor in state.flat().values():  # scribble over everything it was handed
            if tensor.is_floating_point() and tensor.numel():
                tensor.fill_(1e3)
        raise RuntimeError("update failed half-way")

    monkeypatch.setattr(p.strategy, "adapt", adapt_then_fail)
    frames = target_frames(4, seed=4)
    with pytest.raises(RuntimeError, match="half-way"):
        p.predict(frames, "A")
    with pytest.raises(RuntimeError, match="half-way"):
        p.predict(frames, "new subject")
    with pytest.raises(RuntimeError, match="half-way"):
        p.predict_many({"B": frames, "A": frames})  # B's step succeeds in the copy, then A fails
    monkeypatch.undo()
    _assert_twins_agree(p, twin)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_overflowing_frames_are_refused_exactly_when_the_forward_overflows(
    personalizer_factory: PersonalizerFactory, strategy: str
) -> None:
    """Huge finite frames: refused (no trace) iff the forward is non-finite, else finite state."""
    p, twin = _twins(personalizer_factory, strategy)
    for scale in (1e3, 1e18, 1e30):
        frames = target_frames(4, seed=5) * scale
        if _forward_is_finite(p, "A", frames):
            p.predict(frames, "A")
            twin.predict(frames, "A")
            assert_states_finite(p.state_dict("A"))
        else:
            with pytest.raises(InputError, match="non-finite"):
                p.predict(frames, "A")
            with pytest.raises(InputError, match="non-finite"):
                p.predict_many({"B": target_frames(2, seed=6), "A": frames})
    if p.strategy.collects_moments():
        # Squared activations of 1e30 overflow float32: the refusal path really ran.
        assert not _forward_is_finite(p, "A", target_frames(4, seed=5) * 1e30)
    _assert_twins_agree(p, twin)


# ------------------------------------------------------------------ inference mode
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_inference_mode(personalizer_factory: PersonalizerFactory, strategy: str) -> None:
    """Gradient strategies refuse inference mode (no trace); the others run as outside it."""
    p, twin = _twins(personalizer_factory, strategy)
    frames = target_frames(4, seed=7)
    calls: list[Callable[[ttaperso.Personalizer], object]] = [
        lambda q: q.predict(frames, "A"),
        lambda q: q.predict(frames, "new subject"),
        lambda q: q.predict_many({"A": frames, "B": frames}),
    ]
    for call in calls:
        if p.strategy.needs_gradients:
            with torch.inference_mode(), pytest.raises(ConfigError, match="inference_mode"):
                call(p)
        else:
            with torch.inference_mode():
                inside = call(p)
            outside = call(twin)
            if isinstance(inside, dict):
                for s in inside:
                    assert_same_prediction(inside[s], outside[s])  # type: ignore[index]
            else:
                assert_same_prediction(inside, outside)  # type: ignore[arg-type]
    # Nothing made under inference mode got into a state: normal calls keep working.
    _assert_twins_agree(p, twin)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_calibrate_inside_inference_mode(
    personalizer_factory: PersonalizerFactory, strategy: str
) -> None:
    """Calibration takes no gradient: inside inference mode it equals a normal call."""
    p, twin = _twins(personalizer_factory, strategy)
    neutral = target_frames(6, seed=8)
    with torch.inference_mode():
        p.calibrate("A", neutral)
        p.calibrate("C", neutral)
    twin.calibrate("A", neutral)
    twin.calibrate("C", neutral)
    _assert_twins_agree(p, twin)


def test_inference_made_frames_and_no_grad(personalizer_factory: PersonalizerFactory) -> None:
    """Frames created under inference mode and a caller's no_grad() do not break tent."""
    p, twin = _twins(personalizer_factory, "tent")
    with torch.inference_mode():
        frames = target_frames(4, seed=9) + 0.0  # an inference tensor
    assert frames.is_inference()
    with torch.no_grad():
        got = p.predict(frames, "A")
    expected = twin.predict(frames.clone(), "A")
    assert_same_prediction(got, expected)
    assert bool(got.updated.any())
    _assert_twins_agree(p, twin)
