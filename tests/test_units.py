"""Unit tests of the pure pieces: functional maths, gates, configs, store names, BN layers,
and a few strategy mechanics (norm batch statistics, SAR recovery, TENT step counting)."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ttaperso
from ttaperso import ConfigError, EntropyGate, TemporalGate
from ttaperso.functional import mix_moments, normalized_entropy, softmax_entropy, window_majority
from ttaperso.gates import Gate, GateBatch, gate_from_dict, list_gates
from ttaperso.norm_layers import NormControl, SubjectBatchNorm
from ttaperso.smoothing import smooth_probs
from ttaperso.stores import FORMAT_VERSION, FolderStore, subject_filename
from ttaperso.strategies import get_config_class

try:
    from conftest import INPUT_SHAPE, LABELS, PersonalizerFactory, states_equal, target_frames
except ImportError:  # tests/ made a package
    from tests.conftest import (  # type: ignore[no-redef]
        INPUT_SHAPE,
        LABELS,
        PersonalizerFactory,
        states_equal,
        target_frames,
    )


# ====================================================================== functional
def _entropy_by_hand(row: list[float]) -> float:
    """Shannon entropy (nats) of softmax(row), computed in plain Python."""
    z = [math.exp(v - max(row)) for v in row]
    total = sum(z)
    return -sum((p / total) * math.log(p / total) for p in z if p > 0)


def test_softmax_entropy_matches_hand_computation() -> None:
    rows = [
        [0.0, 0.0, 0.0, 0.0],
        [2.0, -1.0, 0.5, 0.0],
        [10.0, 0.0, 0.0, 0.0],
        [-3.0, 4.0, 1.0, 1.0],
    ]
    got = softmax_entropy(torch.tensor(rows, dtype=torch.float64))
    assert got.shape == (4,)
    for value, row in zip(got.tolist(), rows, strict=True):
        assert value == pytest.approx(_entropy_by_hand(row), abs=1e-12)
    assert got[0].item() == pytest.approx(math.log(4), abs=1e-12)


def test_softmax_entropy_is_stable_for_huge_logits() -> None:
    got = softmax_entropy(torch.tensor([[1e4, 0.0, -1e4]]))
    assert torch.isfinite(got).all() and got.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("num_classes", [2, 4, 7])
def test_normalized_entropy_is_entropy_over_ln_c(num_classes: int) -> None:
    logits = torch.randn(
        5, num_classes, generator=torch.Generator().manual_seed(num_classes), dtype=torch.float64
    )
    got = normalized_entropy(logits)
    expected = [_entropy_by_hand(r) / math.log(num_classes) for r in logits.tolist()]
    assert got.tolist() == pytest.approx(expected, abs=1e-12)
    assert normalized_entropy(torch.zeros(1, num_classes)).item() == pytest.approx(1.0, abs=1e-6)
    one_hot = torch.full((1, num_classes), -1e4)
    one_hot[0, 0] = 1e4
    assert normalized_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-6)


def test_mix_moments_equals_moments_of_concatenation() -> None:
    """With weights = sample counts, the mixture is the mean/var of the concatenated samples."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 3, generator=g, dtype=torch.float64) * 2 + 1
    b = torch.randn(5, 3, generator=g, dtype=torch.float64) * 0.5 - 3
    mean, var = mix_moments(
        a.mean(0), a.var(0, correction=0), 7.0, b.mean(0), b.var(0, correction=0), 5.0
    )
    both = torch.cat([a, b])
    torch.testing.assert_close(mean, both.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(var, both.var(0, correction=0), rtol=0, atol=1e-12)


def test_mix_moments_hand_values_and_limits() -> None:
    # {0, 0, 0} (mean 0, var 0) mixed with {4} (mean 4, var 0): mean 1, var 3.
    mean, var = mix_moments(
        torch.tensor(0.0), torch.tensor(0.0), 3.0, torch.tensor(4.0), torch.tensor(0.0), 1.0
    )
    assert (mean.item(), var.item()) == pytest.approx((1.0, 3.0))
    # A zero weight returns the other population unchanged.
    mean, var = mix_moments(
        torch.tensor(2.0), torch.tensor(5.0), 0.0, torch.tensor(-1.0), torch.tensor(0.5), 4.0
    )
    assert (mean.item(), var.item()) == pytest.approx((-1.0, 0.5))
    # Tensor weights work too.
    mean, _ = mix_moments(
        torch.tensor(0.0),
        torch.tensor(1.0),
        torch.tensor(1.0),
        torch.tensor(3.0),
        torch.tensor(1.0),
        torch.tensor(2.0),
    )
    assert mean.item() == pytest.approx(2.0)


def test_window_majority() -> None:
    label, count = window_majority(torch.tensor([2, 1, 2, -1, 2, 1]), 4)
    assert (int(label), int(count)) == (2, 3)
    # Ties go to the smallest label index.
    label, count = window_majority(torch.tensor([3, 1, 3, 1, -1]), 4)
    assert (int(label), int(count)) == (1, 2)
    # Empty slots only.
    label, count = window_majority(torch.tensor([-1, -1, -1]), 4)
    assert (int(label), int(count)) == (-1, 0)
    label, count = window_majority(torch.tensor([], dtype=torch.int64), 4)
    assert (int(label), int(count)) == (-1, 0)


# ====================================================================== gates
def _logits_for(labels: list[int], num_classes: int = 4) -> tuple[Tensor, Tensor]:
    """Confident logits predicting ``labels``."""
    logits = torch.zeros(len(labels), num_classes)
    logits[torch.arange(len(labels)), torch.tensor(labels)] = 5.0
    return logits, torch.tensor(labels)


def _admit(gate: Gate, memory: dict[str, Tensor], labels: list[int]) -> list[bool]:
    logits, lab = _logits_for(labels)
    return gate.admit(memory, GateBatch(logits, lab)).tolist()


def test_temporal_gate_warm_up_steady_and_change() -> None:
    gate = TemporalGate(window=5, min_agreement=0.6)
    assert gate.required_votes == 3
    memory = gate.init_memory(4)
    assert memory["history"].tolist() == [-1] * 5
    # Warm-up: frames are rejected until the label holds 3 votes.
    assert _admit(gate, memory, [1, 1, 1]) == [False, False, True]
    # A steady label is admitted; memory survives across calls.
    assert _admit(gate, memory, [1]) == [True]
    assert _admit(gate, memory, [1]) == [True]
    assert memory["history"].tolist() == [1, 1, 1, 1, 1]
    # A changed label is rejected until it becomes the majority with enough votes.
    assert _admit(gate, memory, [2]) == [False]
    assert _admit(gate, memory, [2]) == [False]
    assert _admit(gate, memory, [2]) == [True]  # history [1, 1, 2, 2, 2]
    assert memory["history"].tolist() == [1, 1, 2, 2, 2]
    # The old label, now a minority, is rejected.
    assert _admit(gate, memory, [1]) == [False]


def test_temporal_gate_batch_equals_frame_by_frame() -> None:
    gate = TemporalGate(window=4, min_agreement=0.5)
    labels = [0, 0, 3, 3, 3, 1, 3, 0, 0, 0, 2]
    one_by_one: list[bool] = []
    memory = gate.init_memory(4)
    for label in labels:
        one_by_one += _admit(gate, memory, [label])
    batched_memory = gate.init_memory(4)
    assert _admit(gate, batched_memory, labels) == one_by_one
    assert torch.equal(memory["history"], batched_memory["history"])


def test_temporal_gate_tie_and_validation() -> None:
    gate = TemporalGate(window=4, min_agreement=0.5)
    memory = gate.init_memory(4)
    assert _admit(gate, memory, [0, 0, 1, 1]) == [False, True, False, True]  # tie 2-2 admits
    assert TemporalGate(window=1).required_votes == 1
    assert _admit(TemporalGate(window=1), TemporalGate(window=1).init_memory(4), [3]) == [True]
    with pytest.raises(ConfigError, match=r"`window`.*got 0"):
        TemporalGate(window=0)
    with pytest.raises(ConfigError, match=r"`window`.*got 2\.5"):
        TemporalGate(window=2.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"`min_agreement`.*got 0"):
        TemporalGate(min_agreement=0)
    with pytest.raises(ConfigError, match=r"`min_agreement`.*got 1\.5"):
        TemporalGate(min_agreement=1.5)


def _logits_with_entropy(num_classes: int, nats: float) -> Tensor:
    """One row of logits ``[a, 0, ..., 0]`` whose softmax entropy is ``nats`` (bisection on a)."""
    lo, hi = 0.0, 50.0
    for _ in range(200):
        a = (lo + hi) / 2
        h = softmax_entropy(
            torch.tensor([[a] + [0.0] * (num_classes - 1)], dtype=torch.float64)
        ).item()
        lo, hi = (a, hi) if h > nats else (lo, a)
    return torch.tensor([[(lo + hi) / 2] + [0.0] * (num_classes - 1)])


@pytest.mark.parametrize("num_classes", [2, 7])
def test_entropy_gate_thresholds_scale_with_ln_c(num_classes: int) -> None:
    gate = EntropyGate(max_entropy=0.4)
    threshold = 0.4 * math.log(num_classes)
    below = _logits_with_entropy(num_classes, threshold * 0.95)
    above = _logits_with_entropy(num_classes, threshold * 1.05)
    logits = torch.cat([below, above])
    admitted = gate.admit({}, GateBatch(logits, logits.argmax(1)))
    assert admitted.tolist() == [True, False]
    # The same absolute entropy (0.5 nats) is confident for 7 classes, not for 2.
    half_nat = _logits_with_entropy(num_classes, 0.5)
    assert gate.admit({}, GateBatch(half_nat, half_nat.argmax(1))).tolist() == [num_classes == 7]


def test_entropy_gate_band_and_validation() -> None:
    gate = EntropyGate(max_entropy=0.9, min_entropy=0.3)
    c = 4
    rows = [_logits_with_entropy(c, f * math.log(c)) for f in (0.1, 0.5, 0.95)]
    logits = torch.cat(rows)
    assert gate.admit({}, GateBatch(logits, logits.argmax(1))).tolist() == [False, True, False]
    assert gate.init_memory(c) == {}
    with pytest.raises(ConfigError, match=r"`max_entropy`.*got 1\.5"):
        EntropyGate(max_entropy=1.5)
    with pytest.raises(ConfigError, match=r"`min_entropy`.*got -0\.1"):
        EntropyGate(min_entropy=-0.1)
    with pytest.raises(ConfigError, match=r"`min_entropy` < `max_entropy`.*0\.5 >= 0\.4"):
        EntropyGate(max_entropy=0.4, min_entropy=0.5)
    with pytest.raises(ConfigError, match=r"`max_entropy`.*got True"):
        EntropyGate(max_entropy=True)


def test_gate_from_dict() -> None:
    assert gate_from_dict({"kind": "temporal", "window": 3}) == TemporalGate(window=3)
    assert gate_from_dict({"kind": "entropy"}) == EntropyGate()
    gate = EntropyGate(max_entropy=0.2)
    assert gate_from_dict(gate) is gate
    for g in (TemporalGate(window=7, min_agreement=0.5), EntropyGate(0.3, 0.1)):
        assert gate_from_dict(json.loads(json.dumps(g.to_dict()))) == g
    assert list_gates() == ["entropy", "prototype", "temporal"]
    with pytest.raises(ConfigError, match=r"'kind' key but got \{'window': 3\}"):
        gate_from_dict({"window": 3})
    with pytest.raises(ConfigError, match=r"'kind' key but got 'temporal'"):
        gate_from_dict("temporal")  # type: ignore[arg-type]
    with pytest.raises(
        ConfigError, match=r"Unknown gate kind 'magic'; available: entropy, prototype, temporal"
    ):
        gate_from_dict({"kind": "magic"})
    with pytest.raises(
        ConfigError, match=r"Unknown option\(s\) \['size'\].*valid options: window, min_agreement"
    ):
        gate_from_dict({"kind": "temporal", "size": 3})
    with pytest.raises(ConfigError, match=r"`window`.*got -1"):
        gate_from_dict({"kind": "temporal", "window": -1})


def test_smooth_probs_over_calls() -> None:
    rows = torch.softmax(torch.randn(5, 4, generator=torch.Generator().manual_seed(3)), dim=1)
    memory = {"smooth.probs": torch.zeros(0, 4)}
    out = smooth_probs(memory, rows[:2], window=3)
    torch.testing.assert_close(out[0], rows[0])
    torch.testing.assert_close(out[1], (rows[0] + rows[1]) / 2)
    assert torch.equal(memory["smooth.probs"], rows[:2])
    out = smooth_probs(memory, rows[2:5], window=3)
    for i, end in enumerate((3, 4, 5)):
        torch.testing.assert_close(out[i], rows[end - 3 : end].mean(0))
    assert torch.equal(memory["smooth.probs"], rows[3:5])
    # window 1 is the identity and keeps no memory.
    same = smooth_probs({}, rows, window=1)
    assert same is rows


def test_smoothing_in_personalizer(personalizer_factory: PersonalizerFactory) -> None:
    """Returned probs average softmax(logits) over the last frames; labels follow the probs."""
    p = personalizer_factory("source", smoothing=3)
    frames = target_frames(6, seed=3)
    history: list[Tensor] = []
    for i in range(0, 6, 2):
        out = p.predict(frames[i : i + 2], "A")
        history += list(out.logits.softmax(dim=1))
        for j in range(2):
            end = len(history) - 1 + j  # index after frame j of this call
            window = history[max(0, end - 3) : end]
            torch.testing.assert_close(out.probs[j], torch.stack(window).mean(0))
        assert torch.equal(out.labels, out.probs.argmax(1))
    with pytest.raises(ConfigError, match=r"`smoothing`.*>= 1.*got 0"):
        personalizer_factory("source", smoothing=0)


# ====================================================================== configs
@pytest.mark.parametrize("strategy", ttaperso.list_strategies())
def test_config_round_trip(strategy: str) -> None:
    cls = get_config_class(strategy)
    default = cls()
    assert cls.strategy_name == strategy
    for config in (
        default,
        default.replace(
            gates=(TemporalGate(window=3), EntropyGate(0.5, 0.1)), smoothing=4, episodic=True
        ),
    ):
        data = config.to_dict()
        assert list(data) == cls.field_names()
        assert cls.from_dict(json.loads(json.dumps(data))) == config
        assert cls.from_dict(data).to_dict() == data


@pytest.mark.parametrize("strategy", ttaperso.list_strategies())
def test_config_unknown_keys(strategy: str) -> None:
    cls = get_config_class(strategy)
    valid = ", ".join(cls.field_names())
    with pytest.raises(
        ConfigError, match=rf"Unknown config key\(s\) \['zz_bad'\] for strategy '{strategy}'"
    ):
        cls.from_dict({"zz_bad": 1})
    with pytest.raises(ConfigError) as info:
        cls().replace(zz_bad=1)
    assert f"valid keys: {valid}" in str(info.value)
    with pytest.raises(ConfigError, match=r"mapping of config keys but got list"):
        cls.from_dict([("smoothing", 2)])  # type: ignore[arg-type]


def test_config_types_and_ranges() -> None:
    from ttaperso import NormConfig, SarConfig, TentConfig

    assert TentConfig(lr=1).lr == 1.0 and isinstance(TentConfig(lr=1).lr, float)
    with pytest.raises(ConfigError, match=r"`optimizer`.*\['adam', 'sgd'\] but got 'rmsprop'"):
        TentConfig(optimizer="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"`lr`.*number but got True"):
        TentConfig(lr=True)
    with pytest.raises(ConfigError, match=r"`max_frames`.*at least `source_prior`"):
        NormConfig(source_prior=100.0, max_frames=10)
    with pytest.raises(ConfigError, match=r"`reset_threshold`.*got 1\.0"):
        SarConfig(reset_threshold=1.0)
    with pytest.raises(ConfigError, match=r"`margin`.*got 0\.0"):
        SarConfig(margin=0.0)
    with pytest.raises(ConfigError, match=r"`momentum`.*got 1\.0"):
        SarConfig(momentum=1.0)
    assert TentConfig().gates == (EntropyGate(max_entropy=0.4),)


# ====================================================================== store
NASTY_IDS = [
    "a/b",
    "a_b",
    "a?b",
    "a\\b",
    "a b",
    "a:b",
    "..",
    "../..",
    "../../etc/passwd",
    ".",
    "",
    "\x00",
    "a\x00b",
    "é",
    "e",
    "_",
    "-",
    "." * 300,
    "x" * 300,
    "CON",
    "/abs/path",
    "~user",
]


def test_subject_filename_is_safe_and_unique() -> None:
    names = [subject_filename(s) for s in NASTY_IDS]
    for subject, name in zip(NASTY_IDS, names, strict=True):
        assert "/" not in name and "\\" not in name and "\x00" not in name, subject
        assert ".." not in name, subject
        assert not name.startswith("."), subject
        assert name.endswith(".safetensors") and len(name) <= 100, subject
        assert Path(name).name == name
    assert len(set(names)) == len(names)
    assert subject_filename("patient-017") == subject_filename("patient-017")
    assert subject_filename("patient-017").startswith("patient-017-")


def test_save_never_escapes_the_folder(
    personalizer_factory: PersonalizerFactory, tmp_path: Path
) -> None:
    folder = tmp_path / "deep" / "states"
    p = personalizer_factory("norm")
    evil = ["../../etc/passwd", "..", "/abs", "a/../../b", "..\\..\\win"]
    x = target_frames(2, seed=1)
    for s in evil:
        p.predict(x, s)
    assert sorted(p.save(folder)) == sorted(evil)
    written = [Path(root) / f for root, _, files in os.walk(tmp_path) for f in files]
    assert len(written) == len(evil)
    assert all(f.parent == folder for f in written), written
    q = personalizer_factory("norm")
    assert sorted(q.load(folder)) == sorted(evil)
    assert sorted(FolderStore(folder).subjects()) == sorted(evil)
    for s in evil:
        assert states_equal(q.state_dict(s), p.state_dict(s))


def test_folder_store_round_trip_and_missing(tmp_path: Path) -> None:
    store = FolderStore(tmp_path / "s")
    with pytest.raises(ttaperso.StateFileError, match="no such state folder"):
        store.subjects()
    tensors = {"memory/x": torch.arange(3.0), "memory/e": torch.zeros(0, 4)}
    meta = {"format": "ttaperso.subject-state", "version": FORMAT_VERSION, "k": [1, 2]}
    store.write("A", tensors, meta)
    got, got_meta = store.read("A")
    assert states_equal(got, tensors)
    assert got_meta == {**meta, "subject": "A", "state_version": 1}
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ttaperso.StateFileError, match="no state for subject 'B'"):
        store.read("B")
    with pytest.raises(ttaperso.InputError, match="version 99"):
        store.write("V", tensors, {**meta, "version": 99})  # never written: unreadable
    assert store.subjects() == ["A"]


# ====================================================================== SubjectBatchNorm
def _bn_pair(prior: float) -> tuple[nn.BatchNorm2d, SubjectBatchNorm, NormControl]:
    g = torch.Generator().manual_seed(5)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(3, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(3, generator=g))
        bn.running_mean.copy_(torch.randn(3, generator=g))
        bn.running_var.copy_(torch.rand(3, generator=g) + 0.5)
    bn.eval()
    control = NormControl(prior=prior)
    layer = SubjectBatchNorm(copy.deepcopy(bn), "bn", control)
    return bn, layer, control


def _bn_input(n: int = 5, seed: int = 6) -> Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed)) * 2 + 1


def test_subject_bn_prior_inf_equals_eval_exactly() -> None:
    bn, layer, _ = _bn_pair(math.inf)
    x = _bn_input()
    with torch.no_grad():
        assert torch.equal(layer(x), bn(x))
    assert [n for n, _ in layer.named_buffers()] == [
        "running_mean",
        "running_var",
        "num_batches_tracked",
    ]


def test_subject_bn_prior_zero_equals_batch_statistics() -> None:
    bn, layer, _ = _bn_pair(0.0)
    x = _bn_input()
    running = (bn.running_mean.clone(), bn.running_var.clone())
    train_bn = copy.deepcopy(bn).train()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), train_bn(x), rtol=0, atol=1e-5)
    # The layer's own buffers are never updated.
    assert torch.equal(layer.running_mean, running[0]) and torch.equal(
        layer.running_var, running[1]
    )


@pytest.mark.parametrize("prior", [1.0, 3.0, 40.0])
def test_subject_bn_mixed_prior_equals_concatenation(prior: float) -> None:
    """prior=P with source stats of P frames == batch norm over the concatenated frames."""
    bn, layer, _ = _bn_pair(prior)
    source = _bn_input(int(prior), seed=7) * 0.5 - 1
    with torch.no_grad():
        layer.running_mean.copy_(source.mean(dim=(0, 2, 3)))
        layer.running_var.copy_(source.var(dim=(0, 2, 3), correction=0))
    x = _bn_input(4)
    both = torch.cat([source, x])
    mean, var = both.mean(dim=(0, 2, 3)), both.var(dim=(0, 2, 3), correction=0)
    expected = F.batch_norm(x, mean, var, layer.weight, layer.bias, training=False, eps=layer.eps)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    # And it matches the explicit mixture formula with N = number of frames.
    m, v = mix_moments(
        layer.running_mean,
        layer.running_var,
        prior,
        x.mean(dim=(0, 2, 3)),
        x.var(dim=(0, 2, 3), correction=0),
        4.0,
    )
    torch.testing.assert_close(m, mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(v, var, rtol=0, atol=1e-5)


def test_subject_bn_collects_per_sample_moments() -> None:
    _, layer, control = _bn_pair(math.inf)
    control.collect = {}
    x = _bn_input()
    with torch.no_grad():
        layer(x)
    per_mean, per_sq = control.collect["bn"]
    torch.testing.assert_close(per_mean, x.mean(dim=(2, 3)))
    torch.testing.assert_close(per_sq, (x * x).mean(dim=(2, 3)))


def test_subject_bn_mixed_prior_has_gradients() -> None:
    """TENT differentiates through mixed statistics: weight and bias get gradients."""
    _, layer, _ = _bn_pair(4.0)
    x = _bn_input()
    layer(x).square().sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None
    assert torch.isfinite(layer.weight.grad).all()


def test_subject_bn_refuses_untracked_layer() -> None:
    with pytest.raises(ttaperso.ModelInterfaceError, match=r"'x'.*track_running_stats=False"):
        SubjectBatchNorm(nn.BatchNorm2d(3, track_running_stats=False), "x", NormControl())


# ====================================================================== norm strategy
def test_norm_pure_batch_statistics(
    personalizer_factory: PersonalizerFactory, model: nn.Module
) -> None:
    """source_prior=0, accumulate=False normalises every batch with its own statistics."""
    p = personalizer_factory("norm", source_prior=0.0, accumulate=False)
    train_model = copy.deepcopy(model).train()
    for i in range(3):
        x = target_frames(5, seed=60 + i, scale=1 + i, shift=float(i))
        out = p.predict(x, "A")
        with torch.no_grad():
            torch.testing.assert_close(out.logits, train_model(x), rtol=0, atol=1e-5)
        assert not out.updated.any()
    assert p.state_dict("A") == {}
    assert p.state_nbytes("A") == 0


def test_norm_accumulates_admitted_frames(
    personalizer_factory: PersonalizerFactory, model: nn.Module
) -> None:
    """The running estimate after k frames is the mixture of source stats (prior) and the frames'."""
    p = personalizer_factory("norm", source_prior=8.0, max_frames=512)
    x = target_frames(3, seed=70)
    out = p.predict(x, "A")
    assert out.updated.all()
    state = p.state_dict("A")
    assert state["memory/norm.count"].item() == 11.0
    # First BN layer sees the first conv's output: check its statistics exactly.
    with torch.no_grad():
        h = model[0](x)
    bn = model[1]
    mean, var = mix_moments(
        bn.running_mean,
        bn.running_var,
        8.0,
        h.mean(dim=(0, 2, 3)),
        h.var(dim=(0, 2, 3), correction=0),
        3.0,
    )
    torch.testing.assert_close(state["buffers/network.1.running_mean"], mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(state["buffers/network.1.running_var"], var, rtol=0, atol=1e-5)


# ====================================================================== SAR recovery
def test_sar_recovery_really_resets(
    personalizer_factory: PersonalizerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMA below the threshold: params/moments/stats back to source, resets += 1, fresh EMA."""
    p = personalizer_factory("sar", reset_threshold=0.999)
    strategy = p.strategy
    source_params = {f"params/{k}": v.clone() for k, v in strategy.initial_state().params.items()}
    source_state = p.strategy.initial_state().flat()

    second_pass: list[Tensor] = []
    ema_at_recovery: list[float] = []
    entropy_grads = strategy._entropy_grads
    recover = strategy.recover

    def spy_entropy(state: Any, frames: Tensor) -> Any:
        entropy, leaves = entropy_grads(state, frames)
        second_pass.append(entropy.detach().clone())
        return entropy, leaves

    def spy_recover(state: Any) -> None:
        ema_at_recovery.append(float(state.memory["sar.ema"]))
        recover(state)

    monkeypatch.setattr(strategy, "_entropy_grads", spy_entropy)
    monkeypatch.setattr(strategy, "recover", spy_recover)

    frames = target_frames(8, seed=80)
    for i in range(4):
        p.predict(frames[i : i + 1], "A")
    assert len(ema_at_recovery) == 1, "the recovery did not fire: choose a higher reset_threshold"
    state = p.state_dict("A")
    assert int(state["memory/sar.resets"]) == 1
    assert int(state["memory/sar.ema_updates"]) == 0  # the EMA starts afresh
    assert not [k for k in state if k.startswith("optim/")]
    for key in [k for k in source_state if k.startswith(("params/", "buffers/"))] + [
        "memory/norm.count"
    ]:
        assert torch.equal(state[key], source_state[key]), key
    for key, value in source_params.items():
        assert torch.equal(state[key], value)
    first_loss = _second_pass_loss(second_pass[:2], strategy.margin)
    assert ema_at_recovery[0] == pytest.approx(first_loss, rel=1e-6)

    # The next update starts from a fresh EMA (the reference code keeps the old one).
    second_pass.clear()
    for i in range(4, 8):
        p.predict(frames[i : i + 1], "A")
    assert len(ema_at_recovery) == 2
    loss = _second_pass_loss(second_pass[:2], strategy.margin)
    assert ema_at_recovery[1] == pytest.approx(loss, rel=1e-6)
    blended = 0.9 * first_loss + 0.1 * loss
    assert ema_at_recovery[1] != pytest.approx(blended, rel=1e-6)
    assert int(p.state_dict("A")["memory/sar.resets"]) == 2


def _second_pass_loss(passes: list[Tensor], margin: float) -> float:
    """SAR's second-pass loss from the two entropy passes of one update."""
    first, second = passes
    reliable = first < margin
    second = second[reliable]
    return float(second[second < margin].mean())


def test_sar_without_recovery_keeps_ema(personalizer_factory: PersonalizerFactory) -> None:
    p = personalizer_factory("sar")  # default threshold: 0.2/ln(1000) * ln C, never reached here
    for frames in target_frames(8, seed=81).split(1):
        p.predict(frames, "A")
    state = p.state_dict("A")
    assert int(state["memory/sar.resets"]) == 0
    assert math.isfinite(float(state["memory/sar.ema"]))
    assert state["memory/sar.pending"].shape == (0, *INPUT_SHAPE)
    assert [k for k in state if k.startswith("optim/")]


# ====================================================================== TENT step count
def test_tent_update_every_takes_one_step_per_k_frames(
    personalizer_factory: PersonalizerFactory,
) -> None:
    p = personalizer_factory("tent", update_every=4, optimizer="adam")
    source = p.strategy.initial_state().flat()
    frames = target_frames(12, seed=90)

    def steps() -> set[float]:
        return {
            float(v)
            for k, v in p.state_dict("A").items()
            if k.startswith("optim/") and k.endswith("/step")
        }

    for i in range(3):
        assert p.predict(frames[i : i + 1], "A").updated.all()
        state = p.state_dict("A")
        assert not [k for k in state if k.startswith("optim/")]
        assert float(state["memory/tent.pending"]) == i + 1
        for key in (k for k in source if k.startswith("params/")):
            assert torch.equal(state[key], source[key]), key
    p.predict(frames[3:4], "A")
    state = p.state_dict("A")
    assert steps() == {1.0}
    assert float(state["memory/tent.pending"]) == 0.0
    assert not [k for k in state if k.startswith("memory/grad/")]
    assert any(not torch.equal(state[k], source[k]) for k in source if k.startswith("params/"))
    # Two frames: gradients accumulate, no step.
    p.predict(frames[4:6], "A")
    assert steps() == {1.0}
    assert float(p.state_dict("A")["memory/tent.pending"]) == 2.0
    # A batch of 5 reaches 7 >= 4 pending frames: exactly one more step, not one per 4 frames.
    p.predict(frames[6:11], "A")
    assert steps() == {2.0}
    assert float(p.state_dict("A")["memory/tent.pending"]) == 0.0
    assert len([k for k in state if k.endswith("/step")]) == len(p.strategy.param_names)


def test_tent_gates_block_updates(personalizer_factory: PersonalizerFactory) -> None:
    """With the default entropy gate the near-uniform tiny model never updates."""
    p = personalizer_factory("tent", adapt=False, update_every=1)
    source = p.strategy.initial_state().flat()
    for frames in target_frames(6, seed=91).split(2):
        assert not p.predict(frames, "A").updated.any()
    assert states_equal(p.state_dict("A"), source)


def test_labels_and_shapes(personalizer_factory: PersonalizerFactory) -> None:
    p = personalizer_factory("source")
    assert p.labels == LABELS
    out = p.predict(target_frames(3), "A")
    assert out.class_names == LABELS and out.subject == "A"
    assert len(out.names) == 3


# ------------------------------------------------------------------ source data
def test_source_data_validation(model: nn.Module) -> None:
    frames = torch.zeros(4, 1, 16, 16)
    with pytest.raises(ttaperso.InputError, match="shape \\(4,\\)"):
        ttaperso.SourceData(frames, labels=[0, 1])
    with pytest.raises(ttaperso.InputError, match="integer class indices"):
        ttaperso.SourceData(frames, labels=torch.zeros(4))
    with pytest.raises(ttaperso.InputError, match="4 non-empty str ids"):
        ttaperso.SourceData(frames, subjects=["a", "b"])
    with pytest.raises(ttaperso.InputError, match="labels in \\[0, 4\\)"):
        ttaperso.Personalizer(
            model,
            "norm",
            labels=("a", "b", "c", "d"),
            input_shape=(1, 16, 16),
            source=ttaperso.SourceData(frames, labels=[0, 1, 2, 9]),
        )
    with pytest.raises(ttaperso.InputError, match="channel"):
        ttaperso.Personalizer(
            model,
            "norm",
            labels=("a", "b", "c", "d"),
            input_shape=(1, 16, 16),
            source=ttaperso.SourceData(torch.zeros(4, 3, 16, 16)),
        )
    with pytest.raises(ttaperso.InputError, match="SourceData"):
        ttaperso.Personalizer(
            model, "norm", labels=("a", "b", "c", "d"), input_shape=(1, 16, 16), source=frames
        )


def test_gradient_strategies_work_under_callers_no_grad(
    personalizer_factory: Any,
) -> None:
    """A caller's ``torch.no_grad()`` gives the same predictions and states as without it."""
    from conftest import target_frames

    for strategy in ("tent", "sar", "eata", "shot", "fisher"):
        plain = personalizer_factory(strategy)
        guarded = personalizer_factory(strategy)
        for i in range(3):
            x = target_frames(4, seed=i)
            a = plain.predict(x, subject="s")
            with torch.no_grad():
                b = guarded.predict(x, subject="s")
            assert torch.equal(a.logits, b.logits)
        sa, sb = plain.state_dict("s"), guarded.state_dict("s")
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), strategy


# ====================================================================== weights cache
def test_unreadable_weights_cache_names_the_file_and_the_fix(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from ttaperso.cache import load_cached_weights
    from ttaperso.errors import ModelInterfaceError

    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(2)}, str(good))
    assert torch.equal(load_cached_weights(good)["w"], torch.ones(2))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00not a safetensors file")
    with pytest.raises(ModelInterfaceError, match=r"bad\.safetensors.*delete the file"):
        load_cached_weights(bad)
