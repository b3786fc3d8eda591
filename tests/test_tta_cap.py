"""``tta_cap``: cache maths alone, the prototype gate, and the strategy's own promises.

The invariant table (tests/test_invariants.py) covers isolation, save/load, reset,
determinism and bad input; this file checks what is specific to TTA-CaP.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import ttaperso
from ttaperso import ConfigError, InputError, ModelInterfaceError, PrototypeGate
from ttaperso.gates import EntropyGate, GateBatch, TemporalGate, gate_from_dict
from ttaperso.strategies.cache_math import (
    cache_insert,
    class_prototypes,
    diagonal_moments,
    frechet_diagonal,
    fuse,
    retrieve,
    unit,
    video_prediction,
)
from ttaperso.strategies.tta_cap import TtaCapConfig

try:
    from conftest import HEAD, INPUT_SHAPE, LABELS, PersonalizerFactory, target_frames
except ImportError:  # tests/ made a package
    from tests.conftest import (  # type: ignore[no-redef]
        HEAD,
        INPUT_SHAPE,
        LABELS,
        PersonalizerFactory,
        target_frames,
    )

ADAPTING = {
    "gates": (),
    "positive_entropy": 0.995,
    "negative_entropy": 1.0,
    "calibration_frames": 2,
}


# ------------------------------------------------------------------ cache maths
def test_frechet_diagonal_matches_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(5, generator=g), torch.randn(5, generator=g)
    v1, v2 = torch.rand(5, generator=g) + 0.1, torch.rand(5, generator=g) + 0.1
    # Full-covariance Frechet distance with diagonal matrices: tr(S1 + S2 - 2 (S1 S2)^1/2).
    expected = ((m1 - m2) ** 2).sum() + (v1 + v2 - 2 * (v1 * v2).sqrt()).sum()
    assert torch.allclose(frechet_diagonal(m1, v1, m2, v2), expected)
    assert float(frechet_diagonal(m1, v1, m1, v1)) == pytest.approx(0.0, abs=1e-6)
    # broadcast over leading dims: one query against 3 references
    refs_m, refs_v = torch.stack([m1, m2, m1 + 1]), torch.stack([v1, v2, v1])
    d = frechet_diagonal(m1[None], v1[None], refs_m, refs_v)
    assert d.shape == (3,) and int(d.argmin()) == 0
    assert float(d[2]) == pytest.approx(5.0, rel=1e-5)  # mean shifted by 1 in 5 dims


def test_diagonal_moments() -> None:
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
    mean, var = diagonal_moments(x.sum(0), (x**2).sum(0), 20)
    assert torch.allclose(mean, x.mean(0), atol=1e-6)
    assert torch.allclose(var, x.var(0, unbiased=False), atol=1e-5)


def test_class_prototypes_are_normalised_means_and_flag_missing_classes() -> None:
    feats = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    protos, counts = class_prototypes(feats, torch.tensor([0, 0, 2]), num_classes=3)
    assert counts.tolist() == [2, 0, 1]
    assert torch.allclose(protos[0], unit(torch.tensor([1.0, 1.0])))
    assert torch.equal(protos[1], torch.zeros(2))
    assert torch.allclose(protos[2].norm(), torch.tensor(1.0))


def test_retrieve_weights_by_affinity_and_ignores_invalid_entries() -> None:
    keys = torch.eye(3)
    q = unit(torch.tensor([[1.0, 0.1, 0.0]]))
    valid = torch.tensor([True, True, False])
    r = retrieve(q, keys, valid, sharpness=5.0)
    cos = (q @ keys.T)[0]
    w = torch.exp(-5.0 * (1 - cos[:2]))
    assert torch.allclose(r[0], torch.cat([w / w.sum(), torch.zeros(1)]), atol=1e-6)
    # an empty cache retrieves nothing
    assert torch.equal(retrieve(q, keys, torch.zeros(3, dtype=torch.bool), 5.0), torch.zeros(1, 3))
    assert torch.equal(
        retrieve(q, torch.zeros(0, 3), torch.zeros(0, dtype=torch.bool), 5.0), torch.zeros(1, 3)
    )
    # sharpness 0: plain mean of the valid entries
    assert torch.allclose(retrieve(q, keys, valid, 0.0)[0], torch.tensor([0.5, 0.5, 0.0]))


def test_fuse_adds_source_positive_subtracts_negative() -> None:
    f, s, p, n = torch.eye(4).unbind(0)
    g = fuse(f[None], s[None], p[None], n[None], (1.0, 2.0, 1.0))
    assert torch.allclose(g[0], unit(torch.tensor([1.0, 1.0, 2.0, -1.0])))
    assert torch.allclose(fuse(f[None], s[None], p[None], n[None], (0.0, 0.0, 0.0)), f[None])


def test_cache_insert_keeps_lowest_entropy_per_class() -> None:
    c, k, d = 2, 2, 3
    keys = torch.zeros(c, k, d)
    ent = torch.zeros(c, k)
    valid = torch.zeros(c, k, dtype=torch.bool)
    new = torch.arange(12, dtype=torch.float32).view(4, 3)
    keys2, ent2, valid2 = cache_insert(
        keys, ent, valid, new, torch.tensor([0.3, 0.1, 0.2, 0.4]), torch.tensor([0, 0, 0, 1])
    )
    # class 0: three candidates, keeps 0.1 and 0.2 (sorted); class 1: one entry, one empty slot
    assert ent2[0].tolist() == pytest.approx([0.1, 0.2])
    assert torch.equal(keys2[0], new[[1, 2]])
    assert valid2.tolist() == [[True, True], [True, False]]
    assert torch.equal(keys2[1, 1], torch.zeros(3)) and float(ent2[1, 1]) == 0.0
    assert torch.isfinite(ent2).all()  # empty slots are a mask, never an inf sentinel
    # inputs untouched
    assert not valid.any() and torch.equal(keys, torch.zeros(c, k, d))
    # a worse entry does not evict; an equal one does not replace the resident entry
    keys3, ent3, _ = cache_insert(
        keys2, ent2, valid2, torch.ones(2, 3), torch.tensor([0.9, 0.2]), torch.tensor([0, 0])
    )
    assert torch.equal(keys3[0], keys2[0]) and torch.equal(ent3, ent2)
    # capacity 0: nothing kept
    k0 = cache_insert(
        torch.zeros(2, 0, 3),
        torch.zeros(2, 0),
        torch.zeros(2, 0, dtype=torch.bool),
        new,
        torch.rand(4),
        torch.tensor([0, 1, 0, 1]),
    )
    assert k0[0].shape == (2, 0, 3)


def test_video_prediction_sums_frame_logits() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.5, 0.0], [0.0, 1.0, 0.0]])
    total, label = video_prediction(logits)
    assert torch.equal(total, torch.tensor([2.0, 2.5, 0.0])) and label == 1
    with pytest.raises(InputError, match=r"\(T, C\).*\(0, 3\)"):
        video_prediction(torch.zeros(0, 3))


# ------------------------------------------------------------------ prototype gate
def test_prototype_gate_margin_and_agreement() -> None:
    gate = PrototypeGate(margin=0.05)
    scores = torch.tensor([[0.9, 0.8, 0.1], [0.9, 0.88, 0.0], [0.2, 0.9, 0.1]])
    labels = torch.tensor([0, 0, 0])
    assert gate.admit_scores(scores, labels).tolist() == [True, False, False]
    assert gate_from_dict(gate.to_dict()) == gate
    assert gate_from_dict({"kind": "prototype", "margin": 0.2}).margin == 0.2
    for bad in (-0.1, 2.0, "0.1", True):
        with pytest.raises(ConfigError, match="`margin` of PrototypeGate"):
            PrototypeGate(margin=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="prototype similarities"):
        gate.admit({}, GateBatch(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long)))


# ------------------------------------------------------------------ strategy
def test_defaults_are_the_papers() -> None:
    cfg = TtaCapConfig()
    assert cfg.gates == (
        TemporalGate(window=3, min_agreement=0.6),
        EntropyGate(max_entropy=0.8),
        PrototypeGate(margin=0.05),
    )
    assert cfg.gates[0].required_votes == 2  # majority of the last 3
    assert (cfg.positive_capacity, cfg.negative_capacity) == (5, 4)
    assert (cfg.positive_entropy, cfg.negative_entropy) == (0.5, 0.8)
    assert TtaCapConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [
        ("positive_capacity", -1, r"`positive_capacity`.*>= 0 but got -1"),
        ("negative_entropy", 0.3, r"`negative_entropy`.*\[positive_entropy, 1\] but got 0.3"),
        ("positive_entropy", 1.5, r"`positive_entropy`.*but got 1.5"),
        ("source_weight", -1.0, r"`source_weight`.*>= 0 but got -1"),
        ("calibration_frames", 0, r"`calibration_frames`.*>= 1 but got 0"),
        ("source_subjects", 0, r"`source_subjects`.*>= 1 but got 0"),
        ("sharpness", float("inf"), r"`sharpness`.*finite"),
    ],
)
def test_bad_options(
    personalizer_factory: PersonalizerFactory, key: str, value: object, pattern: str
) -> None:
    with pytest.raises(ConfigError, match=pattern):
        personalizer_factory("tta_cap", **{key: value})


def test_empty_caches_give_exactly_the_frozen_model(
    personalizer_factory: PersonalizerFactory,
) -> None:
    """Source cache off and nothing in the target caches: bit-identical frozen logits."""
    p = personalizer_factory("tta_cap", source_weight=0.0)
    x = target_frames(6, seed=3)
    assert torch.equal(p.predict(x, "A").logits, p.predict_frozen(x))
    # all three caches off: stays the frozen model however long the stream
    q = personalizer_factory(
        "tta_cap", adapt=False, source_weight=0.0, positive_weight=0.0, negative_weight=0.0
    )
    for frames in target_frames(12, seed=4).split(3):
        assert torch.equal(q.predict(frames, "A").logits, q.predict_frozen(frames))


def test_retrieval_happens_before_the_update(personalizer_factory: PersonalizerFactory) -> None:
    """A call's frames are predicted with the caches as they were before the call."""
    p = personalizer_factory("tta_cap", **ADAPTING, source_weight=0.0)
    x = target_frames(4, seed=5)
    first = p.predict(x, "A")
    assert bool(first.updated.any())  # they entered the caches...
    assert torch.equal(first.logits, p.predict_frozen(x))  # ...but did not retrieve themselves
    second = p.predict(x, "A")
    assert not torch.equal(second.logits, first.logits)  # the next call does


def test_caches_fill_by_entropy_band_and_stay_bounded(
    personalizer_factory: PersonalizerFactory,
) -> None:
    p = personalizer_factory("tta_cap", **ADAPTING)
    frames = target_frames(60, seed=6)
    for chunk in frames.split(4):
        p.predict(chunk, "A")
    state = p.state_dict("A")
    pos_valid, neg_valid = state["memory/cap.pos_valid"], state["memory/cap.neg_valid"]
    assert pos_valid.shape == (len(LABELS), 5) and neg_valid.shape == (len(LABELS), 4)
    assert bool(pos_valid.any()) and bool(neg_valid.any())
    for name in ("pos", "neg"):
        ent = state[f"memory/cap.{name}_entropy"]
        valid = state[f"memory/cap.{name}_valid"]
        keys = state[f"memory/cap.{name}_keys"]
        norms = keys.norm(dim=2)
        assert torch.allclose(norms[valid], torch.ones(int(valid.sum())), atol=1e-5)
        assert bool((norms[~valid] == 0).all())
        # lowest entropy first in each class, within the entry's band
        for c in range(len(LABELS)):
            e = ent[c][valid[c]]
            assert torch.equal(e, e.sort().values)
        low, high = (0.0, 0.995) if name == "pos" else (0.995, 1.0)
        assert bool(((ent[valid] >= low) & (ent[valid] < high)).all())


def test_gate_counts_and_helper(personalizer_factory: PersonalizerFactory) -> None:
    gates = [TemporalGate(window=3), EntropyGate(max_entropy=1.0), PrototypeGate(margin=0.0)]
    p = personalizer_factory("tta_cap", gates=gates)
    for chunk in target_frames(20, seed=7).split(5):
        p.predict(chunk, "A")
    counts = p.inspect("A").details["gates"]
    assert list(counts) == ["temporal", "entropy", "prototype", "all"]
    for kind, c in counts.items():
        assert c["admitted"] + c["rejected"] == 20, kind
    assert counts["entropy"]["admitted"] == 20  # every entropy < ln C
    assert counts["all"]["admitted"] <= min(c["admitted"] for c in counts.values())
    assert counts["temporal"]["rejected"] >= 1  # the first frame has no majority of 2
    norm = personalizer_factory("norm")
    norm.predict(target_frames(2), "A")
    assert "gates" not in norm.inspect("A").details


def test_prototype_gate_refused_by_strategies_without_prototypes(
    personalizer_factory: PersonalizerFactory,
) -> None:
    with pytest.raises(ConfigError, match=r"needs \['prototype_scores'\].*'norm'"):
        personalizer_factory("norm", gates=[PrototypeGate()])


def test_personalised_source_picks_closest_subject_by_frechet(model: nn.Module) -> None:
    """Source subjects with distinct feature statistics: the target's twin is chosen."""
    g = torch.Generator().manual_seed(0)
    # three source subjects: plain, brightened+contrast, inverted-looking frames
    base = torch.randn(24, *INPUT_SHAPE, generator=g)
    looks = {"plain": base, "bright": base * 2.5 + 1.5, "dark": -base * 0.5 - 1.0}
    frames = torch.cat(list(looks.values()))
    subjects = [s for s in looks for _ in range(24)]
    labels = torch.arange(72) % len(LABELS)
    source = ttaperso.SourceData(frames, labels=labels, subjects=subjects)
    p = ttaperso.Personalizer(
        model,
        "tta_cap",
        labels=LABELS,
        input_shape=INPUT_SHAPE,
        head=HEAD,
        source=source,
        source_subjects=1,
        calibration_frames=8,
    )
    strategy = p.strategy
    for twin, scale, shift in (("bright", 2.5, 1.5), ("dark", -0.5, -1.0), ("plain", 1.0, 0.0)):
        target = torch.randn(8, *INPUT_SHAPE, generator=g) * scale + shift
        subject = f"target-{twin}"
        p.predict(target[:5], subject)
        assert p.inspect(subject).details["source_subjects"] == []  # not calibrated yet
        p.predict(target[5:], subject)
        assert p.inspect(subject).details["source_subjects"] == [twin]
        # the choice is the Frechet-closest subject, computed independently here
        with torch.no_grad():
            z = unit(p.strategy.runtime.forward({}, target, return_features=True).features)
        d = {
            s: float(
                frechet_diagonal(
                    z.mean(0),
                    z.var(0, unbiased=False),
                    strategy.source_mean[i],
                    strategy.source_var[i],
                )
            )
            for i, s in enumerate(strategy.source_ids)
        }
        assert min(d, key=d.get) == twin
        # its prototypes are that subject's class means
        protos = p.state_dict(subject)["memory/cap.src_protos"]
        i = strategy.source_ids.index(twin)
        assert torch.allclose(protos, unit(strategy.source_class_sums[i]), atol=1e-6)


def test_without_source_uses_head_rows(model: nn.Module) -> None:
    p = ttaperso.Personalizer(model, "tta_cap", labels=LABELS, input_shape=INPUT_SHAPE, head=HEAD)
    weight = model[8].weight.detach()
    assert torch.allclose(p.strategy.sample_prototypes, unit(weight))
    out = p.predict(target_frames(4), "A")
    assert out.logits.shape == (4, len(LABELS))
    assert torch.allclose(p.state_dict("A")["memory/cap.src_protos"], unit(weight))


def test_unlabelled_source_uses_frozen_predictions(model: nn.Module) -> None:
    x = target_frames(32, seed=9) * 0.5
    p = ttaperso.Personalizer(
        model,
        "tta_cap",
        labels=LABELS,
        input_shape=INPUT_SHAPE,
        head=HEAD,
        source=ttaperso.SourceData(x),
    )
    with torch.no_grad():
        out = p.strategy.runtime.forward({}, x, return_features=True)
    logits, feats = out.logits, out.features
    protos, counts = class_prototypes(feats, logits.argmax(1), len(LABELS))
    expected = torch.where((counts > 0)[:, None], protos, unit(model[8].weight.detach()))
    assert torch.allclose(p.strategy.sample_prototypes, expected, atol=1e-6)


def test_needs_a_linear_head(model: nn.Module) -> None:
    with pytest.raises(ModelInterfaceError, match="tta_cap.*linear head"):
        ttaperso.Personalizer(model, "tta_cap", labels=LABELS, input_shape=INPUT_SHAPE)


def test_state_size_follows_capacities(personalizer_factory: PersonalizerFactory) -> None:
    small = personalizer_factory("tta_cap", positive_capacity=1, negative_capacity=0)
    big = personalizer_factory("tta_cap")
    d = 8  # the tiny model's feature dimension
    assert big.state_nbytes() - small.state_nbytes() == len(LABELS) * 8 * (d * 4 + 4 + 1)
    assert math.isfinite(float(big.state_nbytes()))
