"""Every strategy's declared capabilities match what it does (nothing is guessed).

The Personalizer, ``predict_many`` and the Lightning callback act on the class variables
``needs_gradients``, ``shares_model_forward``, ``batches_subjects``,
``calibrates_statistics`` and ``uses_features``; each is checked here against behaviour,
for every registered strategy, so a wrong declaration fails a test instead of a user.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import PersonalizerFactory, states_equal, target_frames
from torch import Tensor

import ttaperso
from ttaperso import ConfigError
from ttaperso.strategies import Strategy, SubjectState

STRATEGIES = ttaperso.list_strategies()
CAPABILITIES = (
    "needs_gradients",
    "shares_model_forward",
    "batches_subjects",
    "calibrates_statistics",
    "uses_features",
)


def _adapted(p: ttaperso.Personalizer, subject: str, seed: int, scale: float) -> SubjectState:
    for frames in target_frames(12, seed=seed, scale=scale).split(3):
        p.predict(frames, subject)
    return SubjectState.from_flat(p.state_dict(subject))


def test_capabilities_are_class_variables() -> None:
    """Declared on the class, as plain bools, never computed from overrides at run time."""
    for name in STRATEGIES:
        cls = ttaperso.strategies.get_strategy_class(name)
        for capability in CAPABILITIES:
            value = getattr(cls, capability)
            assert isinstance(value, bool), (name, capability, value)
            assert not isinstance(getattr(Strategy, capability), property), capability


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_needs_gradients_matches_autograd_use(
    personalizer_factory: PersonalizerFactory, strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = personalizer_factory(strategy)
    calls = {"n": 0}
    real_grad, real_backward = torch.autograd.grad, torch.Tensor.backward

    def counting_grad(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return real_grad(*args, **kwargs)

    def counting_backward(self: Tensor, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return real_backward(self, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    monkeypatch.setattr(torch.Tensor, "backward", counting_backward)
    for frames in target_frames(24, seed=1).split(4):
        p.predict(frames, "A")
    assert (calls["n"] > 0) == p.strategy.needs_gradients, calls


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_uses_features_matches_the_model_forward(
    personalizer_factory: PersonalizerFactory, strategy: str
) -> None:
    p = personalizer_factory(strategy)
    state = p.strategy.initial_state()
    out = p.strategy.model_forward(state, target_frames(2, seed=2))
    assert (out.features is not None) == p.strategy.uses_features


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_shares_model_forward_matches_subject_independence(
    personalizer_factory: PersonalizerFactory, strategy: str
) -> None:
    p = personalizer_factory(strategy)
    a = _adapted(p, "A", seed=3, scale=1.5)
    b = _adapted(p, "B", seed=4, scale=3.0)
    frames = target_frames(3, seed=5)
    if p.strategy.shares_model_forward:
        # Nothing of the subject's goes into the model part: no tensor to swap in, and the
        # forward is the same for every subject (and for the shared call).
        assert not a.params and not a.buffers
        shared = p.strategy.shared_forward(frames).logits
        for state in (a, b):
            assert torch.equal(p.strategy.model_forward(state, frames).logits, shared)
    else:
        assert a.params or a.buffers, "a subject-specific forward swaps the subject's tensors in"
        with pytest.raises(ConfigError, match="subject-specific model forward"):
            p.strategy.shared_forward(frames)
        assert not torch.equal(
            p.strategy.forward(a, frames).logits, p.strategy.forward(b, frames).logits
        )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_batches_subjects_matches_batched_forward(
    personalizer_factory: PersonalizerFactory, strategy: str
) -> None:
    p = personalizer_factory(strategy)
    a = _adapted(p, "A", seed=6, scale=1.5)
    b = _adapted(p, "B", seed=7, scale=3.0)
    xa, xb = target_frames(2, seed=8), target_frames(3, seed=9)
    if not p.strategy.batches_subjects:
        with pytest.raises(ConfigError, match="cannot batch"):
            p.strategy.batched_model_forward([a, b], [xa, xb])
        return
    outs = p.strategy.batched_model_forward([a, b], [xa, xb])
    for out, state, x in zip(outs, (a, b), (xa, xb), strict=True):
        single = p.strategy.model_forward(state, x)
        torch.testing.assert_close(out.logits, single.logits, atol=1e-5, rtol=1e-5)
        if single.moments is not None:
            assert out.moments is not None and out.moments.keys() == single.moments.keys()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_calibrates_statistics_matches_calibrate(
    personalizer_factory: PersonalizerFactory, strategy: str
) -> None:
    p = personalizer_factory(strategy)
    state = p.strategy.initial_state()
    before = state.flat()
    before = {k: v.clone() for k, v in before.items()}
    neutral = target_frames(6, seed=10, scale=2.0)
    if not p.strategy.calibrates_statistics:
        with pytest.raises(ConfigError, match="does not support neutral-baseline calibration"):
            p.strategy.calibrate(state, neutral)
        assert states_equal(state.flat(), before)
        return
    p.strategy.calibrate(state, neutral)
    changed = [
        k
        for k, v in state.flat().items()
        if k.startswith("buffers/") and not torch.equal(v, before[k])
    ]
    assert changed, "calibrate left every BN statistic unchanged"
