"""Unit tests of ``fisher``, ``eata``, ``t3a``, ``shot`` and their pure maths.

The invariant table (tests/test_invariants.py) covers the four strategies automatically;
these tests check the maths against hand computations and the strategies' own promises
(state size follows the budget, bounded memories, what is adapted).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttaperso
from ttaperso import InputError, StateFileError
from ttaperso.stores import FolderStore
from ttaperso.strategies.feature_math import (
    centroid_pseudo_labels,
    empirical_fisher_diagonal,
    expected_fisher_diagonal,
    information_maximization,
    split_flat_indices,
    t3a_filter,
    t3a_prototypes,
    top_k_indices,
)
from ttaperso.strategies.fisher import default_budget

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


# ------------------------------------------------------------------ Fisher maths
def _linear_model(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(4, generator=g, dtype=torch.float64).requires_grad_(True)
    return x, w, b


def test_expected_fisher_matches_hand_computation() -> None:
    """Softmax regression: F_W[k, j] = mean_i p_ik (1 - p_ik) x_ij^2, F_b[k] = mean p (1 - p)."""
    x, w, b = _linear_model()
    log_probs = (x @ w.T + b).log_softmax(dim=1)
    fw, fb = expected_fisher_diagonal(log_probs, [w, b])
    p = log_probs.detach().exp()
    v = p * (1 - p)
    assert torch.allclose(fw, (v.T @ x**2) / x.shape[0], atol=1e-12)
    assert torch.allclose(fb, v.mean(dim=0), atol=1e-12)


def test_empirical_fisher_matches_hand_computation() -> None:
    """With yhat = argmax: F_W[k, j] = mean_i (onehot_ik - p_ik)^2 x_ij^2."""
    x, w, b = _linear_model(1)
    log_probs = (x @ w.T + b).log_softmax(dim=1)
    fw, fb = empirical_fisher_diagonal(log_probs, [w, b])
    p = log_probs.detach().exp()
    r = (F.one_hot(p.argmax(dim=1), 4).to(p) - p) ** 2
    assert torch.allclose(fw, (r.T @ x**2) / x.shape[0], atol=1e-12)
    assert torch.allclose(fb, r.mean(dim=0), atol=1e-12)


def test_top_k_exact_budget_and_brute_force() -> None:
    g = torch.Generator().manual_seed(3)
    scores = [
        torch.rand(3, 4, generator=g),
        torch.rand(7, generator=g),
        torch.rand(2, 2, generator=g),
    ]
    flat = torch.cat([s.reshape(-1) for s in scores])
    for budget in (1, 5, 10, 23, 100):
        idx = top_k_indices(scores, budget)
        assert idx.numel() == min(budget, flat.numel())
        assert bool((idx[1:] > idx[:-1]).all())  # sorted, unique
        chosen = flat[idx]
        rest = flat[torch.ones_like(flat, dtype=torch.bool).index_fill(0, idx, False)]
        if rest.numel():
            assert float(chosen.min()) >= float(rest.max())


def test_top_k_ties_are_deterministic_and_nonfinite_count_as_zero() -> None:
    scores = [torch.tensor([1.0, 1.0, 1.0, float("nan"), float("inf"), 2.0])]
    assert top_k_indices(scores, 3).tolist() == [0, 1, 5]


def test_split_flat_indices_roundtrip() -> None:
    sizes = [4, 1, 6]
    idx = torch.tensor([0, 3, 4, 7, 10])
    parts = split_flat_indices(idx, sizes)
    assert [(t, local.tolist(), where.tolist()) for t, local, where in parts] == [
        (0, [0, 3], [0, 1]),
        (1, [0], [2]),
        (2, [2, 5], [3, 4]),
    ]


def test_default_budget_rule() -> None:
    assert default_budget(56_951) == 256  # the mini-XCEPTION: the floor
    assert default_budget(5_500_000) == 22_000  # ~ the paper's 22k for a ~5M network
    assert default_budget(100) == 100  # never more than the model has


# ------------------------------------------------------------------ T3A / SHOT maths
def test_t3a_filter_keeps_lowest_entropy_per_class() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 0])
    entropy = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.2, 0.7, 0.05])
    kept = t3a_filter(labels, entropy, num_classes=4, filter_k=2)
    assert kept.tolist() == [6, 1, 4, 3, 5]
    assert t3a_filter(labels, entropy, 4, filter_k=0).tolist() == list(range(7))
    assert t3a_filter(labels, entropy, 4, filter_k=-1).numel() == 7  # "all" means all


def test_t3a_prototypes_are_normalised_sums_of_normalised_supports() -> None:
    supports = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    protos = t3a_prototypes(supports, labels, num_classes=3)
    s = 2**-0.5
    assert torch.allclose(protos[:, 0], torch.tensor([s, s]))
    assert torch.allclose(protos[:, 1], torch.tensor([0.0, 1.0]))
    assert torch.equal(protos[:, 2], torch.zeros(2))  # class without supports


def test_centroid_pseudo_labels_on_separable_data() -> None:
    """Two well-separated clusters with half-wrong soft predictions get their cluster label."""
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([5.0, 0.0, 0.0]) + 0.3 * torch.randn(20, 3, generator=g)
    b = torch.tensor([0.0, 5.0, 0.0]) + 0.3 * torch.randn(20, 3, generator=g)
    z = torch.cat([a, b])
    truth = torch.cat([torch.zeros(20), torch.ones(20)]).long()
    probs = F.one_hot(truth, 3).float() * 0.6 + 0.4 / 3
    flip = torch.arange(40) % 3 == 0  # a third of the soft predictions point the wrong way
    probs[flip] = probs[flip][:, [1, 0, 2]]
    assert not torch.equal(probs.argmax(dim=1), truth)
    assert torch.equal(centroid_pseudo_labels(z, probs, rounds=1), truth)


def test_information_maximization_terms() -> None:
    confident = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ent, mean_ent = information_maximization(confident)
    assert float(ent) == pytest.approx(0.0, abs=1e-6)
    assert float(mean_ent) == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-6)
    # With a window that predicted only class 1, one class-1 frame has a low diversity term.
    ent1, mean1 = information_maximization(confident[1:], torch.tensor([0.0, 9.0]), 9.0)
    assert float(mean1) == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------ mini-XCEPTION head
def test_mini_xception_linear_head_is_exact() -> None:
    """head(z) == z @ W.T + b, and the features/head split reproduces forward (random init)."""
    from ttaperso.adapters.fer_mini_xception import MiniXception

    torch.manual_seed(0)
    model = MiniXception().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
        x = torch.rand(3, 1, 64, 64) * 2 - 1
        logits, z = model(x, return_features=True)
        w, b = model.linear_head()
        assert torch.allclose(model.head(z), z @ w.T + b, atol=1e-5)
        assert torch.allclose(logits, z @ w.T + b, atol=1e-5)
        assert torch.allclose(model.forward(x), logits)


# ------------------------------------------------------------------ fisher strategy
def _feed(
    p: ttaperso.Personalizer, subject: str, calls: int, batch: int = 2, seed: int = 0
) -> None:
    frames = target_frames(calls * batch, seed=seed)
    for x in frames.split(batch):
        p.predict(x, subject)


def test_fisher_state_size_follows_budget(personalizer_factory: PersonalizerFactory) -> None:
    """Each selected scalar costs 4 (value) + 4 (int32 index) bytes, + 8 for Adam's moments."""
    sizes = {}
    for budget in (64, 128):
        p = personalizer_factory("fisher", budget=budget, update_every=2)
        sizes["fresh", budget] = p.state_nbytes()
        _feed(p, "A", calls=2)  # selection on call 1, one Adam step on call 2
        state = p.state_dict("A")
        assert state["params/fisher.values"].shape == (budget,)
        assert not any(k.startswith("memory/grad/") for k in state)
        sizes["adapted", budget] = p.state_nbytes("A")
    assert sizes[("fresh", 128)] - sizes[("fresh", 64)] == 64 * 8
    assert sizes[("adapted", 128)] - sizes[("adapted", 64)] == 64 * 16


def test_fisher_changes_only_selected_scalars(personalizer_factory: PersonalizerFactory) -> None:
    p = personalizer_factory("fisher", budget=50)
    _feed(p, "A", calls=6)
    picked = p.inspect("A").details["selected"]
    assert sum(picked.values()) == 50
    assert set(picked) <= {n for n, _ in p.model.named_parameters()}
    strategy = p.strategy
    state = ttaperso.strategies.SubjectState.from_flat(p.state_dict("A"))
    tensors, names = strategy._model_tensors(state)
    changed = 0
    for name, src in p.model.named_parameters():
        if name in names:
            diff = (tensors[name] != src).reshape(-1).nonzero().squeeze(1)
            assert diff.numel() <= picked[name]
            changed += diff.numel()
        else:
            assert name not in picked
    assert changed > 0  # the update moved some selected scalars


def test_fisher_before_selection_is_norm(personalizer_factory: PersonalizerFactory) -> None:
    """Until ``fisher_frames`` frames are seen, predictions equal ``norm``'s with the same options."""
    fisher = personalizer_factory("fisher", fisher_frames=7)
    norm = personalizer_factory("norm")
    for x in target_frames(6, seed=3).split(2):
        assert torch.equal(fisher.predict(x, "A").logits, norm.predict(x, "A").logits)
    assert fisher.inspect("A").details["selected"] == {}
    with pytest.raises(InputError, match="'nobody'"):
        fisher.inspect("nobody")
    assert "selected" not in norm.inspect("A").details


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (lambda i: i.flip(0), "not strictly increasing"),
        (lambda i: i.index_fill(0, torch.tensor([i.numel() - 1]), 10**6), "beyond the model"),
        (lambda i: i.index_fill(0, torch.tensor([0]), -1), "mixes unselected"),
    ],
)
def test_fisher_refuses_bad_indices_on_load(
    personalizer_factory: PersonalizerFactory, tmp_path: Path, damage, pattern: str
) -> None:
    p = personalizer_factory("fisher", budget=32)
    _feed(p, "S", calls=3)
    state = p.state_dict("S")
    state["memory/fisher.index"] = damage(state["memory/fisher.index"])
    store = FolderStore(tmp_path)
    store.write("S", state, p.state_metadata())
    with pytest.raises(StateFileError, match=pattern):
        personalizer_factory("fisher", budget=32).load(store)


# ------------------------------------------------------------------ t3a strategy
def test_t3a_is_gradient_free_and_bounded(personalizer_factory: PersonalizerFactory) -> None:
    k = 3
    p = personalizer_factory("t3a", filter_k=k)
    _feed(p, "A", calls=20, batch=4)
    state = p.state_dict("A")
    assert not any(key.startswith(("params/", "optim/", "buffers/")) for key in state)
    supports = state["memory/t3a.supports"]
    assert supports.shape[0] <= len(LABELS) * k
    counts = torch.bincount(state["memory/t3a.labels"], minlength=len(LABELS))
    assert int(counts.max()) <= k
    d = supports.shape[1]
    assert p.state_nbytes("A") <= len(LABELS) * k * (4 * d + 8 + 4)


def test_t3a_fresh_subject_uses_head_rows(personalizer_factory: PersonalizerFactory) -> None:
    """Before any support is added, the supports are the head's rows, labelled (as in the
    reference) by the head's own argmax on them; logits are z @ prototypes, bias dropped."""
    p = personalizer_factory("t3a", filter_k=0, include_current=False)
    x = target_frames(3, seed=4)
    logits = p.predict(x, "A").logits
    net = p.model
    with torch.no_grad():
        _, z = net(x, return_features=True)
        w, b = net.linear_head()
        labels = (w @ w.T + b).argmax(dim=1)
        onehot = F.one_hot(labels, len(LABELS)).to(w)
        protos = F.normalize(F.normalize(w, dim=1).T @ onehot, dim=0)
    assert torch.allclose(logits, z @ protos, atol=1e-6)
    supports = p.state_dict("A")["memory/t3a.supports"]
    assert torch.equal(supports[:4], w.detach())  # filter_k=0: the rows, then the 3 frames
    assert supports.shape[0] == 4 + 3


def test_t3a_include_current_classifies_with_own_frames(
    personalizer_factory: PersonalizerFactory,
) -> None:
    """Reference behaviour: a call's frames are among the supports that classify them."""
    p = personalizer_factory("t3a", filter_k=0)
    x = target_frames(3, seed=4)
    logits = p.predict(x, "A").logits
    net = p.model
    with torch.no_grad():
        _, z = net(x, return_features=True)
        w, b = net.linear_head()
        supports = torch.cat([w, z])
        labels = torch.cat([w @ w.T + b, z @ w.T + b]).argmax(dim=1)
    assert torch.allclose(logits, z @ t3a_prototypes(supports, labels, len(LABELS)), atol=1e-6)


# ------------------------------------------------------------------ shot / eata
def test_shot_window_is_bounded(personalizer_factory: PersonalizerFactory) -> None:
    p = personalizer_factory("shot", window=5)
    _feed(p, "A", calls=6, batch=2)
    state = p.state_dict("A")
    assert state["memory/shot.features"].shape[0] == 5
    assert state["memory/shot.probs"].shape == (5, len(LABELS))


def test_eata_without_source_warns_and_drops_anchor(
    personalizer_factory: PersonalizerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="ttaperso.strategies.eata"):
        p = personalizer_factory("eata", source=None)
    assert "no Fisher anchor" in caplog.text
    assert p.strategy.fisher is None
    with_source = personalizer_factory("eata")
    fisher = with_source.strategy.fisher
    assert fisher is not None and set(fisher) == set(with_source.strategy.param_names)
    assert all(bool(torch.isfinite(f).all()) and bool((f >= 0).all()) for f in fisher.values())
    assert any(float(f.sum()) > 0 for f in fisher.values())


def test_eata_redundancy_filter_drops_repeated_predictions(
    personalizer_factory: PersonalizerFactory,
) -> None:
    """After the running mean exists, a frame predicted like it (|cos| >= eps) is not used."""
    p = personalizer_factory("eata", redundancy=0.05)
    x = target_frames(2, seed=9)
    p.predict(x, "A")
    assert int(p.state_dict("A")["memory/eata.selected"]) == 2  # first batch: no mean yet
    p.predict(x, "A")  # same frames: cosine ~ 1 to the running mean
    assert int(p.state_dict("A")["memory/eata.selected"]) == 2


def test_feature_strategies_need_a_linear_head(model: nn.Module) -> None:
    """t3a/shot on a model without a named head raise ModelInterfaceError."""
    for strategy in ("t3a", "shot"):
        with pytest.raises(ttaperso.ModelInterfaceError):
            ttaperso.Personalizer(model, strategy, labels=LABELS, input_shape=INPUT_SHAPE)
    ttaperso.Personalizer(model, "t3a", labels=LABELS, input_shape=INPUT_SHAPE, head=HEAD)


def test_fisher_neutral_calibration_after_selection(
    personalizer_factory: PersonalizerFactory,
) -> None:
    """Calibration runs with the rebuilt parameters and moves only the BN statistics."""
    p = personalizer_factory("fisher", budget=32)
    _feed(p, "A", calls=3)
    before = p.state_dict("A")
    p.calibrate("A", target_frames(4, seed=21))
    after = p.state_dict("A")
    assert torch.equal(before["params/fisher.values"], after["params/fisher.values"])
    assert torch.equal(before["memory/fisher.index"], after["memory/fisher.index"])
    moved = [k for k in before if k.startswith("buffers/") and not torch.equal(before[k], after[k])]
    assert moved
