"""Packed subject states: one buffer per dtype at rest, separate tensors while stepping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ttaperso.state import SubjectState

try:
    from conftest import PersonalizerFactory, assert_same_prediction, states_equal, target_frames
except ImportError:  # tests/ made a package
    from tests.conftest import (  # type: ignore[no-redef]
        PersonalizerFactory,
        assert_same_prediction,
        states_equal,
        target_frames,
    )


def _storages(state: SubjectState) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in state.flat().values() if t.numel()}


def _sample_state() -> SubjectState:
    return SubjectState(
        params={"w": torch.randn(3, 2), "b": torch.randn(2)},
        buffers={"mean": torch.randn(2)},
        optim={"w/exp_avg": torch.randn(3, 2), "w/step": torch.tensor(4.0)},
        memory={"count": torch.tensor(7.0, dtype=torch.float64), "hist": torch.zeros(0, 5)},
    )


def test_packed_is_an_equal_copy_in_one_buffer_per_dtype() -> None:
    state = _sample_state()
    packed = state.packed()
    assert packed.is_packed and not state.is_packed
    assert states_equal(packed.flat(), state.flat())
    assert list(packed.flat()) == list(state.flat())  # key order kept
    assert len(packed.buffers) == 2 and packed.nbytes() == state.nbytes()  # float32, float64
    assert _storages(packed).isdisjoint(_storages(state))
    assert packed.flat()["memory/hist"].shape == (0, 5)
    assert set(packed.model_tensors()) == {"w", "b", "mean"}
    # subjects with the same tensors share one layout object
    assert state.clone().packed().layout is packed.layout
    # unpacking gives separate, independent tensors with the same values
    unpacked = packed.unpacked()
    assert not unpacked.is_packed and states_equal(unpacked.flat(), state.flat())
    assert len(_storages(unpacked)) == len(unpacked.flat()) - 1  # the empty one owns nothing
    unpacked.params["b"].add_(1.0)
    assert torch.equal(packed.flat()["params/b"], state.params["b"])
    copy = packed.clone()
    assert _storages(copy).isdisjoint(_storages(packed)) and copy.layout is packed.layout


@pytest.mark.parametrize("strategy", ["norm", "tent", "sar", "eata", "shot", "fisher", "t3a"])
def test_states_rest_packed_and_step_unpacked(
    personalizer_factory: PersonalizerFactory, strategy: str, tmp_path: Path
) -> None:
    """Loaded and just-saved states are packed; stepping them behaves exactly as before."""
    p = personalizer_factory(strategy)
    ref = personalizer_factory(strategy)
    stream = list(target_frames(12, seed=3).split(3))
    for x in stream[:2]:
        assert_same_prediction(p.predict(x, "A"), ref.predict(x, "A"))
    assert not p.inspect("A").at_rest
    p.save(tmp_path)
    assert p.inspect("A").at_rest  # at rest after the save
    assert states_equal(p.state_dict("A"), ref.state_dict("A"))
    loaded = personalizer_factory(strategy)
    loaded.load(tmp_path)
    assert loaded.inspect("A").at_rest
    # stepping a packed state (gradient strategies included) gives the same results
    for x in stream[2:]:
        a, b, c = p.predict(x, "A"), ref.predict(x, "A"), loaded.predict(x, "A")
        assert_same_prediction(a, b)
        assert_same_prediction(c, b)
    assert not p.inspect("A").at_rest
    assert states_equal(p.state_dict("A"), ref.state_dict("A"))
