"""The invariant table: every registered strategy on a tiny CPU model.

Each test is parametrized over :func:`ttaperso.list_strategies`, so a newly registered
strategy is covered automatically (its "make it adapt" overrides fall back to
``conftest.fallback_adapt_overrides``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

import ttaperso
from ttaperso import ConfigError, InputError, StateFileError
from ttaperso.runtime import model_digest

try:
    from conftest import (
        INPUT_SHAPE,
        LABELS,
        PersonalizerFactory,
        all_states,
        assert_same_prediction,
        assert_states_finite,
        states_equal,
        strategies_sharing_model,
        target_frames,
    )
except ImportError:  # tests/ made a package
    from tests.conftest import (  # type: ignore[no-redef]
        INPUT_SHAPE,
        LABELS,
        PersonalizerFactory,
        all_states,
        assert_same_prediction,
        assert_states_finite,
        states_equal,
        strategies_sharing_model,
        target_frames,
    )

STRATEGIES = ttaperso.list_strategies()
#: strategies whose state is expected to stay empty/unchanged (no adaptation at all)
NON_ADAPTING = {"source"}


def _stream(n_calls: int, seed: int, batch: int = 2, **shift: float) -> list[Tensor]:
    """``n_calls`` target batches of ``batch`` frames, seeded."""
    frames = target_frames(n_calls * batch, seed=seed, **shift)
    return list(frames.split(batch))


def _snapshot_module(module: nn.Module) -> dict[str, Any]:
    """Everything about a module a Personalizer must not touch."""
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "requires_grad": {k: p.requires_grad for k, p in module.named_parameters()},
        "training": {k: m.training for k, m in module.named_modules()},
        "grads": {k: p.grad is None for k, p in module.named_parameters()},
        "hooks": {
            k: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for k, m in module.named_modules()
        },
    }


def _assert_snapshot_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        x, y = a["state"][key], b["state"][key]
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert x.numpy().tobytes() == y.numpy().tobytes(), f"caller's tensor {key} changed"
    assert a["requires_grad"] == b["requires_grad"]
    assert a["training"] == b["training"]
    assert a["grads"] == b["grads"]
    assert a["hooks"] == b["hooks"]


def _storages(tensors: dict[str, Tensor]) -> dict[int, str]:
    """Storage base pointers of the non-empty tensors (empty ones own no memory)."""
    return {t.untyped_storage().data_ptr(): k for k, t in tensors.items() if t.numel() > 0}


def _live_state(p: ttaperso.Personalizer, subject: str) -> dict[str, Tensor]:
    """The subject's live tensors (not copies): needed to check storage sharing."""
    return p._states[subject].flat()  # white-box: storage checks need the live tensors


def _without_smoothing(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state without the output-smoothing memory (which changes without adaptation)."""
    return {k: v for k, v in state.items() if k != "memory/smooth.probs"}


def _adapt(p: ttaperso.Personalizer, subject: str, batches: list[Tensor], strategy: str) -> None:
    """Feed ``batches`` to ``subject`` and check the state really changed (unless no-op)."""
    if subject not in p.subjects:
        p.predict(batches[0], subject)
        batches = batches[1:]
    before = _without_smoothing(p.state_dict(subject))
    for frames in batches:
        p.predict(frames, subject)
    after = _without_smoothing(p.state_dict(subject))
    if strategy in NON_ADAPTING:
        assert states_equal(before, after)
    else:
        assert not states_equal(before, after), (
            f"strategy {strategy!r} did not change its state: the isolation tests cannot fail; "
            "fix its 'make it adapt' overrides in conftest.ADAPT_OVERRIDES"
        )


# ------------------------------------------------------------------ adaptation happens
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_adaptation_changes_state(personalizer_factory: PersonalizerFactory, strategy: str) -> None:
    """Under the test overrides every strategy but ``source`` updates (else isolation is vacuous)."""
    p = personalizer_factory(strategy)
    _adapt(p, "A", _stream(6, seed=1), strategy)
    if strategy not in NON_ADAPTING:
        # Outputs differ from the unadapted model on the same frames, too.
        x = target_frames(4, seed=50)
        assert not torch.equal(
            p.predict(x, "A").logits, personalizer_factory(strategy).predict(x, "Z").logits
        )


# ------------------------------------------------------------------ base model unchanged
@pytest.mark.parametrize("caller_mode", ["eval", "train"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_base_model_unchanged(
    personalizer_factory: PersonalizerFactory, model: nn.Module, strategy: str, caller_mode: str
) -> None:
    """The caller's model keeps its bytes, requires_grad, mode flags, grads and hooks."""
    model.train(caller_mode == "train")
    before = _snapshot_module(model)
    probe = target_frames(3, seed=77)
    model.eval()
    with torch.no_grad():
        reference_logits = model(probe).clone()
    model.train(caller_mode == "train")

    p = personalizer_factory(strategy)
    digest_at_start = p.model_digest
    for i, frames in enumerate(_stream(10, seed=2)):
        p.predict(frames, "A" if i % 2 else "B")
    for frames in _stream(6, seed=3, batch=1):
        p.predict(frames, "C")
    p.predict_frozen(probe)

    _assert_snapshot_equal(before, _snapshot_module(model))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(probe), reference_logits)
    # The private copy is unchanged too, and the digest is the caller's model's.
    assert p.model_digest == digest_at_start == p.strategy.runtime.digest()
    assert p.strategy.runtime.digest() == p.strategy.runtime.source_digest
    assert not any(t.requires_grad for t in p.strategy.runtime.module.parameters())


# ------------------------------------------------------------------ isolation
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_isolation_between_subjects(
    personalizer_factory: PersonalizerFactory, strategy: str
) -> None:
    """Adapting A never changes B's outputs or state: compare with a Personalizer that only saw B."""
    p = personalizer_factory(strategy)
    only_b = personalizer_factory(strategy)
    stream_b = _stream(4, seed=10)
    stream_a = _stream(9, seed=20, scale=2.5, shift=-1.0)  # a very different subject

    assert_same_prediction(p.predict(stream_b[0], "B"), only_b.predict(stream_b[0], "B"))
    _adapt(p, "A", stream_a[:3], strategy)
    assert_same_prediction(p.predict(stream_b[1], "B"), only_b.predict(stream_b[1], "B"))
    _adapt(p, "A", stream_a[3:], strategy)
    assert states_equal(p.state_dict("B"), only_b.state_dict("B"))
    for frames in stream_b[2:]:
        assert_same_prediction(p.predict(frames, "B"), only_b.predict(frames, "B"))
    assert states_equal(p.state_dict("B"), only_b.state_dict("B"))
    assert p.subjects == ("B", "A")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_isolation_no_shared_storage(
    personalizer_factory: PersonalizerFactory, model: nn.Module, strategy: str
) -> None:
    """A's tensors share no storage with B's, with the private copy or with the caller's model."""
    p = personalizer_factory(strategy)
    _adapt(p, "A", _stream(5, seed=4), strategy)
    _adapt(p, "B", _stream(5, seed=5), strategy)
    p.predict(target_frames(1, seed=6), "C")  # a fresh subject, before any update
    a, b, c = (_storages(_live_state(p, s)) for s in ("A", "B", "C"))
    shared_model = _storages(
        {
            **dict(p.strategy.runtime.module.named_parameters()),
            **dict(p.strategy.runtime.module.named_buffers()),
        }
    )
    caller = _storages(dict(model.state_dict()))
    initial = _storages(p.strategy._initial.flat())
    for name, own in (("A", a), ("B", b), ("C", c)):
        for other_name, other in (
            ("shared model", shared_model),
            ("caller's model", caller),
            ("strategy's initial state", initial),
        ):
            common = own.keys() & other.keys()
            assert not common, f"{name} shares {[own[k] for k in common]} with the {other_name}"
    assert not a.keys() & b.keys()
    assert not a.keys() & c.keys()
    assert not b.keys() & c.keys()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_outputs_and_inputs_do_not_alias_state(
    personalizer_factory: PersonalizerFactory, strategy: str
) -> None:
    """Mutating returned tensors, state_dict copies or the caller's frame buffer changes nothing."""
    p = personalizer_factory(strategy, smoothing=3)
    ref = personalizer_factory(strategy, smoothing=3)
    buffer = torch.empty((2, *INPUT_SHAPE))  # a video loop reusing one frame buffer
    for frames in _stream(7, seed=8):
        buffer.copy_(frames)
        out = p.predict(buffer, "A")
        expected = ref.predict(frames.clone(), "A")
        assert_same_prediction(out, expected)
        for t in (out.logits, out.probs, out.labels, out.updated):
            t.zero_()
        for t in p.state_dict("A").values():
            t.zero_()
        buffer.fill_(123.0)
    assert states_equal(p.state_dict("A"), ref.state_dict("A"))


# ------------------------------------------------------------------ save -> load
def _save_load_roundtrip(
    personalizer_factory: PersonalizerFactory, strategy: str, tmp_path: Path, warmup_calls: int
) -> None:
    p = personalizer_factory(strategy, smoothing=2)
    for i, frames in enumerate(_stream(warmup_calls, seed=11, batch=1)):
        p.predict(frames, "A")
        if i % 2 == 0:
            p.predict(frames * 0.5, "B")
    saved = p.save(tmp_path / "states")
    assert sorted(saved) == sorted(p.subjects)

    q = personalizer_factory(strategy, smoothing=2)
    loaded = q.load(tmp_path / "states")
    assert sorted(loaded) == sorted(p.subjects)
    for s in p.subjects:
        assert states_equal(q.state_dict(s), p.state_dict(s)), s
    for frames in _stream(5, seed=12, batch=3):
        for s in ("A", "B"):
            assert_same_prediction(p.predict(frames, s), q.predict(frames, s))
    for s in p.subjects:
        assert states_equal(q.state_dict(s), p.state_dict(s)), s


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_save_load_identity(
    personalizer_factory: PersonalizerFactory, strategy: str, tmp_path: Path
) -> None:
    """Loading into a NEW Personalizer continues bit-identically (outputs and states)."""
    _save_load_roundtrip(personalizer_factory, strategy, tmp_path, warmup_calls=10)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_save_load_before_first_update(
    personalizer_factory: PersonalizerFactory,
    strategy: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """A subject saved after one frame (before any optimizer update) loads back too."""
    _save_load_roundtrip(personalizer_factory, strategy, tmp_path, warmup_calls=1)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_save_selected_subjects_and_load_by_name(
    personalizer_factory: PersonalizerFactory, strategy: str, tmp_path: Path
) -> None:
    """``save(subjects=...)`` writes only those; ``load(subjects=...)`` reads only those."""
    p = personalizer_factory(strategy)
    for s in ("A", "B", "C"):
        _adapt(p, s, _stream(5, seed=ord(s)), strategy)
    assert p.save(tmp_path, subjects=["A", "C"]) == ["A", "C"]
    q = personalizer_factory(strategy)
    assert q.load(tmp_path, subjects=["C"]) == ["C"]
    assert q.subjects == ("C",)
    assert states_equal(q.state_dict("C"), p.state_dict("C"))
    with pytest.raises(StateFileError, match="'B'"):
        q.load(tmp_path, subjects=["B"])
    with pytest.raises(InputError, match="'nobody'"):
        p.save(tmp_path, subjects=["nobody"])


# ------------------------------------------------------------------ reset
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_reset_restores_fresh_subject(
    personalizer_factory: PersonalizerFactory, strategy: str
) -> None:
    """reset(S) makes S behave like a new subject; others are kept; reset() clears all."""
    p = personalizer_factory(strategy)
    _adapt(p, "A", _stream(6, seed=13), strategy)
    _adapt(p, "B", _stream(6, seed=14), strategy)
    b_state = p.state_dict("B")
    probe = _stream(3, seed=15)

    p.reset("A")
    assert p.subjects == ("B",)
    assert states_equal(p.state_dict("B"), b_state)
    fresh = personalizer_factory(strategy)
    for frames in probe:
        assert_same_prediction(p.predict(frames, "A"), fresh.predict(frames, "A"))
    assert states_equal(p.state_dict("A"), fresh.state_dict("A"))

    p.reset()
    assert p.subjects == ()
    fresh = personalizer_factory(strategy)
    for frames in probe:
        assert_same_prediction(p.predict(frames, "B"), fresh.predict(frames, "B"))
    with pytest.raises(InputError, match="'nobody'"):
        p.reset("nobody")
    with pytest.raises(InputError, match="`subject`"):
        p.reset("")


# ------------------------------------------------------------------ frame by frame
@pytest.mark.parametrize("config", ["adapting", "default"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_frame_by_frame(
    personalizer_factory: PersonalizerFactory, strategy: str, config: str
) -> None:
    """40 single-frame calls work, give (1,)-shaped outputs, and keep the state finite."""
    p = personalizer_factory(strategy, adapt=config == "adapting")
    frames = target_frames(40, seed=16)
    updated = 0
    for i in range(40):
        out = p.predict(frames[i : i + 1], "A")
        assert out.logits.shape == (1, len(LABELS))
        assert out.probs.shape == (1, len(LABELS))
        assert out.labels.shape == (1,) and out.labels.dtype == torch.int64
        assert out.updated.shape == (1,) and out.updated.dtype == torch.bool
        assert torch.allclose(out.probs.sum(dim=1), torch.ones(1))
        assert out.names[0] in LABELS
        updated += int(out.updated.sum())
        assert_states_finite(p.state_dict("A"))
    if config == "adapting" and strategy not in NON_ADAPTING:
        assert updated > 0
    if strategy in NON_ADAPTING:
        assert updated == 0


# ------------------------------------------------------------------ episodic
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_episodic_resets_after_every_call(
    personalizer_factory: PersonalizerFactory, strategy: str
) -> None:
    """episodic=True: every call starts from (and leaves) the fresh state."""
    p = personalizer_factory(strategy, episodic=True)  # 4-frame calls: updates happen inside
    fresh = p.strategy.initial_state().flat()
    x = target_frames(4, seed=18)
    first = p.predict(x, "A")
    for frames in _stream(3, seed=19, batch=4):
        p.predict(frames, "A")
        assert states_equal(p.state_dict("A"), fresh)
    assert_same_prediction(p.predict(x, "A"), first)


# ------------------------------------------------------------------ determinism
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_determinism(personalizer_factory: PersonalizerFactory, strategy: str) -> None:
    """Same model, config and stream: identical outputs and states."""
    p1 = personalizer_factory(strategy)
    p2 = personalizer_factory(strategy)
    stream = _stream(12, seed=17, batch=3)
    for i, frames in enumerate(stream):
        subject = ("A", "B", "C")[i % 3]
        assert_same_prediction(p1.predict(frames, subject), p2.predict(frames, subject))
    for s in p1.subjects:
        assert states_equal(p1.state_dict(s), p2.state_dict(s))


# ------------------------------------------------------------------ several subjects per call
def _close_prediction(a: ttaperso.Prediction, b: ttaperso.Prediction) -> None:
    """Same decisions; logits equal up to the rounding of a differently batched forward."""
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.probs, b.probs, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.updated, b.updated)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_predict_many_equals_one_call_per_subject(
    personalizer_factory: PersonalizerFactory, strategy: str
) -> None:
    """``predict_many({s: x})`` gives what ``predict(x, s)`` per subject, in order, gives."""
    many = personalizer_factory(strategy)
    one = personalizer_factory(strategy)
    streams = {s: _stream(5, seed=40 + i, batch=1 + i % 2) for i, s in enumerate("ABC")}
    for t in range(5):
        batch = {s: streams[s][t] for s in ("C", "A", "B")}  # mapping order is call order
        got = many.predict_many(batch)
        assert list(got) == ["C", "A", "B"]
        for s, x in batch.items():
            _close_prediction(got[s], one.predict(x, s))
    assert many.subjects == one.subjects
    for s in one.subjects:
        a, b = many.state_dict(s), one.state_dict(s)
        assert a.keys() == b.keys()
        for key in a:
            if a[key].is_floating_point():
                torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=key)
            else:
                assert torch.equal(a[key], b[key]), key
    # The shared forward is only claimed where the model part owns no subject tensors;
    # one batched forward with per-subject statistics only by strategies without gradients.
    strat = many.strategy
    if strat.shares_model_forward:
        assert not strat.initial_state().model_tensors()
    if strat.batches_subjects:
        assert not strat.trainable(strat.initial_state())
    # norm, and sar (whose prediction forward takes no gradient: SAM runs in its update)
    assert strat.batches_subjects == (strategy in ("norm", "sar"))


# Huge finite frames (refused exactly when the forward overflows): test_all_or_nothing.py


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_predict_many_bad_entry_changes_nothing(
    personalizer_factory: PersonalizerFactory, strategy: str
) -> None:
    """One bad batch or id among good ones: a clear error naming it, and no subject changes."""
    p = personalizer_factory(strategy)
    _adapt(p, "A", _stream(4, seed=33), strategy)
    before, subjects = all_states(p), p.subjects
    good = target_frames(2, seed=34)
    for bad, pattern in (
        ({"A": good, "B": _nan_frames()}, r"subject 'B'.*NaN or Inf"),
        ({"A": good, "B": torch.zeros(2, 3, 16, 16)}, r"subject 'B'.*1 channel"),
        ({"A": good, "": good}, r"1 to 256 characters"),
        ({}, r"at least one subject"),
        ([("A", good)], r"mapping.*got list"),
    ):
        with pytest.raises(InputError, match=pattern):
            p.predict_many(bad)  # type: ignore[arg-type]
        assert p.subjects == subjects
        after = all_states(p)
        assert all(states_equal(before[s], after[s]) for s in subjects)


# ------------------------------------------------------------------ bad input
def _nan_frames() -> Tensor:
    x = target_frames(3, seed=30)
    x[1, 0, 4, 4] = float("nan")
    return x


def _inf_frames() -> Tensor:
    x = target_frames(3, seed=30)
    x[2, 0, 0, 0] = float("-inf")
    return x


#: (frames factory, subject, exception, message pattern naming the bad value)
BAD_INPUTS: dict[str, tuple[Callable[[], Any], Any, type[Exception], str]] = {
    "nan": (_nan_frames, "A", InputError, r"frame\(s\) \[1\] contain NaN or Inf"),
    "inf": (_inf_frames, "A", InputError, r"frame\(s\) \[2\] contain NaN or Inf"),
    "3d": (lambda: target_frames(1)[0], "A", InputError, r"got shape \(1, 16, 16\).*unsqueeze"),
    "5d": (lambda: target_frames(2)[None], "A", InputError, r"got shape \(1, 2, 1, 16, 16\)"),
    "channels": (lambda: torch.zeros(2, 3, 16, 16), "A", InputError, r"1 channel.*but got 3"),
    "height_width": (lambda: torch.zeros(2, 1, 15, 16), "A", InputError, r"16x16.*got 15x16"),
    "uint8": (
        lambda: torch.zeros(2, 1, 16, 16, dtype=torch.uint8),
        "A",
        InputError,
        r"floating-point.*torch\.uint8",
    ),
    "int64": (
        lambda: torch.zeros(2, 1, 16, 16, dtype=torch.int64),
        "A",
        InputError,
        r"torch\.int64",
    ),
    "empty_batch": (
        lambda: torch.zeros(0, 1, 16, 16),
        "A",
        InputError,
        r"at least one frame.*\(0, 1, 16, 16\)",
    ),
    "numpy": (
        lambda: np.zeros((2, 1, 16, 16), dtype=np.float32),
        "A",
        InputError,
        r"torch\.Tensor.*got ndarray",
    ),
    "list": (lambda: [[0.0]], "A", InputError, r"got list"),
    "subject_int": (lambda: target_frames(2), 17, InputError, r"`subject` to be a str but got int"),
    "subject_none": (lambda: target_frames(2), None, InputError, r"got NoneType"),
    "subject_bytes": (lambda: target_frames(2), b"A", InputError, r"got bytes"),
    "subject_empty": (lambda: target_frames(2), "", InputError, r"1 to 256 characters but got 0"),
    "subject_nul": (lambda: target_frames(2), "A\x00B", InputError, r"control characters.*A\\x00B"),
    "subject_newline": (lambda: target_frames(2), "A\nB", InputError, r"control characters"),
    "subject_too_long": (lambda: target_frames(2), "x" * 257, InputError, r"but got 257"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bad_input_clear_error_no_state_change(
    personalizer_factory: PersonalizerFactory, strategy: str, case: str
) -> None:
    """Malformed frames or subject ids raise a matched InputError and change no state."""
    make_frames, subject, exc, pattern = BAD_INPUTS[case]
    p = personalizer_factory(strategy, smoothing=2)
    _adapt(p, "A", _stream(5, seed=31), strategy)
    before, subjects = all_states(p), p.subjects
    with pytest.raises(exc, match=pattern):
        p.predict(make_frames(), subject)
    assert p.subjects == subjects
    after = all_states(p)
    assert all(states_equal(before[s], after[s]) for s in subjects)
    # The same bad frames for an unknown subject do not create it.
    if subject == "A":
        with pytest.raises(exc, match=pattern):
            p.predict(make_frames(), "new-subject")
        assert p.subjects == subjects
    # And the subject continues exactly as if the bad call never happened.
    ref = personalizer_factory(strategy, smoothing=2)
    _adapt(ref, "A", _stream(5, seed=31), strategy)
    x = target_frames(2, seed=32)
    assert_same_prediction(p.predict(x, "A"), ref.predict(x, "A"))


# ------------------------------------------------------------------ bad config
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_unknown_config_key_lists_valid_keys(
    personalizer_factory: PersonalizerFactory, strategy: str
) -> None:
    with pytest.raises(ConfigError, match=r"Unknown config key\(s\) \['bogus_key'\]") as info:
        personalizer_factory(strategy, bogus_key=1)
    for key in ttaperso.strategies.get_config_class(strategy).field_names():
        assert key in str(info.value)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bad_config_values(personalizer_factory: PersonalizerFactory, strategy: str) -> None:
    """Out-of-range and mistyped values raise ConfigError naming the field and the value."""
    fields = ttaperso.strategies.get_config_class(strategy).field_names()
    with pytest.raises(ConfigError, match=r"`smoothing`.*but got 0"):
        personalizer_factory(strategy, smoothing=0)
    with pytest.raises(ConfigError, match=r"`smoothing`.*int but got '3'"):
        personalizer_factory(strategy, smoothing="3")
    with pytest.raises(ConfigError, match=r"`episodic`.*bool but got 1"):
        personalizer_factory(strategy, episodic=1)
    with pytest.raises(ConfigError, match=r"`gates`.*list of Gate"):
        personalizer_factory(strategy, gates={"kind": "temporal"})
    with pytest.raises(ConfigError, match=r"Unknown gate kind 'magic'"):
        personalizer_factory(strategy, gates=[{"kind": "magic"}])
    if "lr" in fields:
        with pytest.raises(ConfigError, match=r"`lr`.*> 0 but got -1"):
            personalizer_factory(strategy, lr=-1)
        with pytest.raises(ConfigError, match=r"`lr`.*finite but got nan"):
            personalizer_factory(strategy, lr=float("nan"))
    if "update_every" in fields:
        with pytest.raises(ConfigError, match=r"`update_every`.*but got 0"):
            personalizer_factory(strategy, update_every=0)
    if "source_prior" in fields:
        with pytest.raises(ConfigError, match=r"`source_prior`.*but got -1"):
            personalizer_factory(strategy, source_prior=-1)


def test_unknown_strategy_lists_valid_names(model: nn.Module) -> None:
    with pytest.raises(ConfigError, match=r"Unknown strategy 'tentt'") as info:
        ttaperso.Personalizer(model, "tentt", labels=LABELS, input_shape=INPUT_SHAPE)
    for name in STRATEGIES:
        assert name in str(info.value)


# ------------------------------------------------------------------ bad state files
def _saved(
    personalizer_factory: PersonalizerFactory, strategy: str, folder: Path, **kw: Any
) -> Path:
    """Save an adapted subject "S" into ``folder``; return its file."""
    p = personalizer_factory(strategy, **kw)
    _adapt(p, "S", _stream(5, seed=40), strategy)
    p.save(folder)
    (file,) = folder.iterdir()
    return file


def _victim(
    personalizer_factory: PersonalizerFactory, strategy: str, **kw: Any
) -> ttaperso.Personalizer:
    """A Personalizer with one adapted subject, to check that failed loads change nothing."""
    p = personalizer_factory(strategy, **kw)
    _adapt(p, "V", _stream(5, seed=41), strategy)
    return p


def _assert_load_refused(
    p: ttaperso.Personalizer, folder: Path, pattern: str, **load_options: Any
) -> None:
    before, subjects = all_states(p), p.subjects
    with pytest.raises(StateFileError, match=pattern):
        p.load(folder, **load_options)
    assert p.subjects == subjects
    after = all_states(p)
    assert all(states_equal(before[s], after[s]) for s in subjects)


@pytest.mark.parametrize("damage", ["truncate_half", "truncate_tail", "random_bytes", "empty"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_corrupt_state_file(
    personalizer_factory: PersonalizerFactory, strategy: str, damage: str, tmp_path: Path
) -> None:
    file = _saved(personalizer_factory, strategy, tmp_path)
    data = file.read_bytes()
    generator = np.random.default_rng(0)
    file.write_bytes(
        {
            "truncate_half": data[: len(data) // 2],
            "truncate_tail": data[:-3],
            "random_bytes": generator.integers(0, 256, 500, dtype=np.uint8).tobytes(),
            "empty": b"",
        }[damage]
    )
    _assert_load_refused(
        _victim(personalizer_factory, strategy), tmp_path, r"not a readable ttaperso state file"
    )
    with pytest.raises(StateFileError, match=r"not a readable"):
        _victim(personalizer_factory, strategy).load(tmp_path, subjects=["S"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_foreign_safetensors_file(
    personalizer_factory: PersonalizerFactory, strategy: str, tmp_path: Path
) -> None:
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    _assert_load_refused(
        _victim(personalizer_factory, strategy), tmp_path, r"without ttaperso metadata"
    )
    save_file(
        {"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"}
    )
    _assert_load_refused(
        _victim(personalizer_factory, strategy), tmp_path, r"without ttaperso metadata"
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_state_from_another_model(
    personalizer_factory: PersonalizerFactory, other_model: nn.Module, strategy: str, tmp_path: Path
) -> None:
    _saved(personalizer_factory, strategy, tmp_path, model=other_model)
    victim = _victim(personalizer_factory, strategy)
    _assert_load_refused(victim, tmp_path, rf"another model.*{victim.model_digest[:12]}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_state_from_another_strategy(
    personalizer_factory: PersonalizerFactory, strategy: str, tmp_path: Path
) -> None:
    # another strategy that runs on the same test model (else the digest check answers first)
    other = next(s for s in strategies_sharing_model(strategy) if s != strategy)
    _saved(personalizer_factory, other, tmp_path)
    _assert_load_refused(
        _victim(personalizer_factory, strategy), tmp_path, rf"strategy '{other}'.*runs '{strategy}'"
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_state_with_other_layout(
    personalizer_factory: PersonalizerFactory, strategy: str, tmp_path: Path
) -> None:
    """Same strategy, config that changes the tensor layout (smoothing memory) -> refused."""
    _saved(personalizer_factory, strategy, tmp_path, smoothing=3)
    victim = _victim(personalizer_factory, strategy)
    _assert_load_refused(victim, tmp_path, r"another \w+ config \(smoothing: saved 3")
    # Even when a config change is allowed, the tensors must fit this config's layout.
    _assert_load_refused(victim, tmp_path, r"smooth\.probs", allow_config_change=True)


def _misshapen(t: Tensor) -> Tensor:
    """A tensor like ``t`` with a different trailing shape (first dims may be variable)."""
    if t.dim() == 0:
        return torch.zeros(2, dtype=t.dtype)
    return torch.zeros((*t.shape[:-1], t.shape[-1] + 1), dtype=t.dtype)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_state_with_misshapen_tensor(
    personalizer_factory: PersonalizerFactory,
    strategy: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """A well-formed file whose tensor has the wrong shape is refused at load, for every key."""
    from ttaperso.stores import FolderStore

    p = personalizer_factory(strategy, smoothing=2)
    # 9 frames with update_every=4: one update, then pending gradients/frames where kept.
    _adapt(p, "S", _stream(3, seed=43, batch=3), strategy)
    state = p.state_dict("S")
    accepted = []
    for key in state:
        store = FolderStore(tmp_path / key.replace("/", "_"))
        store.write("S", {**state, key: _misshapen(state[key])}, p.state_metadata())
        victim = personalizer_factory(strategy, smoothing=2)
        try:
            victim.load(store)
        except StateFileError as exc:
            assert key in str(exc)
        else:
            accepted.append(key)
    assert not accepted, f"misshapen tensors accepted at load: {accepted}"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_load_is_all_or_nothing(
    personalizer_factory: PersonalizerFactory, strategy: str, tmp_path: Path
) -> None:
    """One bad file in the folder: nothing is loaded, not even the good subjects."""
    good = personalizer_factory(strategy)
    _adapt(good, "good", _stream(4, seed=42), strategy)
    good.save(tmp_path)
    (tmp_path / "zz-bad.safetensors").write_bytes(os.urandom(64))
    victim = _victim(personalizer_factory, strategy)
    _assert_load_refused(victim, tmp_path, r"zz-bad")
    assert "good" not in victim.subjects


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tampered_subject_id(
    personalizer_factory: PersonalizerFactory, strategy: str, tmp_path: Path
) -> None:
    """A file renamed to another subject's file name is refused (its header names its subject)."""
    file = _saved(personalizer_factory, strategy, tmp_path)
    from ttaperso.stores import subject_filename

    file.rename(tmp_path / subject_filename("T"))
    _assert_load_refused(
        _victim(personalizer_factory, strategy), tmp_path, r"does not match its subject id 'S'"
    )
    with pytest.raises(StateFileError, match=r"holds subject 'S', not 'T'"):
        _victim(personalizer_factory, strategy).load(tmp_path, subjects=["T"])


# ------------------------------------------------------------------ model digest
def test_model_digest_binds_weights(model: nn.Module, other_model: nn.Module) -> None:
    """The digest depends on the weights (and only reads the caller's model)."""
    p1 = ttaperso.Personalizer(model, "source", labels=LABELS, input_shape=INPUT_SHAPE)
    p2 = ttaperso.Personalizer(copy.deepcopy(model), "norm", labels=LABELS, input_shape=INPUT_SHAPE)
    p3 = ttaperso.Personalizer(other_model, "source", labels=LABELS, input_shape=INPUT_SHAPE)
    assert p1.model_digest == p2.model_digest != p3.model_digest
    assert len(p1.model_digest) == 64
    assert model_digest(model) == model_digest(copy.deepcopy(model))
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] += 1e-6  # one weight, one ulp-scale change
    assert ttaperso.Personalizer(
        model, "source", labels=LABELS, input_shape=INPUT_SHAPE
    ).model_digest != (p1.model_digest)
