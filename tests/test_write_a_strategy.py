"""The example of docs/write-a-strategy.md runs as written and keeps the runtime's invariants."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import (
    HEAD,
    INPUT_SHAPE,
    LABELS,
    assert_same_prediction,
    build_model,
    states_equal,
    target_frames,
)

import ttaperso
from ttaperso import ConfigError
from ttaperso.strategies import registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "write-a-strategy.md"


def _example_source() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "the page has one example"
    return blocks[0]


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The page's code, executed as a module, its strategy registered for this test only."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    module = types.ModuleType("prior_correction_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look it up
    exec(compile(_example_source(), str(DOC), "exec"), module.__dict__)  # noqa: S102
    return module


def _personalizer(**options: object) -> ttaperso.Personalizer:
    return ttaperso.Personalizer(
        build_model(seed=0), "prior_correction", labels=LABELS, input_shape=INPUT_SHAPE, head=HEAD,
        **options,
    )  # fmt: skip


def test_example_is_short() -> None:
    code = [line for line in _example_source().splitlines() if line.strip()]
    assert len(code) <= 45, len(code)


def test_example_registers_and_adapts(example: types.ModuleType) -> None:
    assert "prior_correction" in ttaperso.list_strategies()
    p = _personalizer(strength=0.8)
    frozen = p.predict_frozen(target_frames(6, seed=1))
    first = p.predict(target_frames(6, seed=1), "A")
    torch.testing.assert_close(first.logits, frozen)  # a fresh subject's prior is uniform
    for frames in target_frames(24, seed=2).split(6):
        p.predict(frames, "A")
    prior = p.state_dict("A")["memory/prior.probs"]
    assert not torch.allclose(prior, torch.full_like(prior, 1 / len(LABELS)))
    later = p.predict(target_frames(6, seed=1), "A")
    assert not torch.allclose(later.logits, frozen)  # the subject's prior is divided out
    with pytest.raises(ConfigError, match="`momentum`.*in \\[0, 1\\)"):
        _personalizer(momentum=1.5)
    with pytest.raises(ConfigError, match="Unknown config key"):
        _personalizer(momentumm=0.5)


def test_example_keeps_the_invariants(example: types.ModuleType, tmp_path: Path) -> None:
    """Isolation, save -> load identity, predict_many == predict, a refused call leaves no trace."""
    p, twin = _personalizer(), _personalizer()
    for frames in target_frames(12, seed=3).split(4):
        for q in (p, twin):
            q.predict(frames, "A")
    b_before = None
    for frames in target_frames(8, seed=4).split(4):
        p.predict(frames * 2, "B")
        b_before = p.state_dict("B")
    p.predict(target_frames(4, seed=5), "A")
    assert states_equal(p.state_dict("B"), b_before)  # A's update left B alone
    p.save(tmp_path)
    q = _personalizer()
    q.load(tmp_path)
    for s in p.subjects:
        assert states_equal(q.state_dict(s), p.state_dict(s))
    many = q.predict_many({"A": target_frames(3, seed=6), "B": target_frames(2, seed=7)})
    assert_same_prediction(many["A"], p.predict(target_frames(3, seed=6), "A"))
    with pytest.raises(ttaperso.InputError):
        twin.predict(torch.full((2, *INPUT_SHAPE), float("nan")), "A")
    frames = target_frames(4, seed=8)
    assert_same_prediction(twin.predict(frames, "A"), _replay(frames))


def _replay(frames: torch.Tensor) -> ttaperso.Prediction:
    """What a Personalizer that never saw the refused call predicts."""
    p = _personalizer()
    for warm in target_frames(12, seed=3).split(4):
        p.predict(warm, "A")
    return p.predict(frames, "A")
