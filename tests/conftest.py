"""Shared fixtures: a tiny deterministic CPU classifier, source/target frames, Personalizers.

The model is small enough that the whole suite runs in seconds, but it has two BatchNorm
layers whose running statistics were estimated on "source" data, so the statistics of the
shifted "target" frames differ from them and every adapting strategy really moves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import ttaperso
from ttaperso.strategies import get_config_class

# The models here are tiny: intra-op threads only add contention (10-60x slower on a
# loaded 2-core machine), and one thread keeps results independent of the machine.
torch.set_num_threads(1)

#: shape of one preprocessed frame (C, H, W)
INPUT_SHAPE: tuple[int, int, int] = (1, 16, 16)
LABELS: tuple[str, ...] = ("anger", "happy", "neutral", "sad")
#: the tiny model's classification head (its final nn.Linear), for feature strategies
HEAD = "8"

#: Per-strategy overrides that make a strategy adapt on the tiny model within a few
#: frames: no gates (the tiny model is near-uniform, so entropy gates would reject every
#: frame), small update batches and a learning rate large enough to move float32 values.
#: Strategies not listed get :func:`fallback_adapt_overrides`.
ADAPT_OVERRIDES: dict[str, dict[str, Any]] = {
    "source": {},
    "norm": {"gates": ()},
    "tent": {"gates": (), "update_every": 4, "lr": 1e-2},
    "sar": {"gates": (), "update_every": 4, "lr": 1e-2, "margin": 1.0},
    "fisher": {"gates": (), "update_every": 4, "lr": 1e-2, "fisher_frames": 2},
    # margin 1 and redundancy 1: every frame passes EATA's filters on the near-uniform model
    "eata": {"gates": (), "update_every": 4, "lr": 1e-2, "margin": 1.0, "redundancy": 1.0},
    "t3a": {"gates": (), "filter_k": 3},
    "shot": {"gates": (), "update_every": 4, "lr": 1e-2},
    # near-uniform tiny model (entropy ~0.98-0.997 ln C): bands that split it into both caches
    "tta_cap": {
        "gates": (),
        "positive_entropy": 0.995,
        "negative_entropy": 1.0,
        "calibration_frames": 2,
    },
}


def fallback_adapt_overrides(strategy: str) -> dict[str, Any]:
    """ "Make it adapt" overrides for a strategy registered after these tests were written."""
    fields = set(get_config_class(strategy).field_names())
    guesses: dict[str, Any] = {"gates": (), "update_every": 4, "lr": 1e-2, "margin": 1.0}
    return {k: v for k, v in guesses.items() if k in fields}


def adapt_overrides(strategy: str) -> dict[str, Any]:
    """Config overrides under which ``strategy`` updates its state on the tiny model."""
    if strategy in ADAPT_OVERRIDES:
        return dict(ADAPT_OVERRIDES[strategy])
    return fallback_adapt_overrides(strategy)


def build_model(seed: int = 0) -> nn.Sequential:
    """Tiny conv classifier (1x16x16 -> 4 logits) with BN statistics fitted on source data."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, len(LABELS)),
    )
    with torch.no_grad():
        # Non-trivial affine parameters, so "back to source" is distinguishable from identity.
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        model.train()
        for i in range(8):
            model(source_frames(16, seed=1000 * seed + i))
    model.eval()
    return model


def source_frames(n: int, seed: int = 0) -> Tensor:
    """``n`` frames from the "source" distribution (standard normal noise), seeded."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, *INPUT_SHAPE), generator=generator)


def source_data(n: int = 48, seed: int = 7) -> ttaperso.SourceData:
    """A labelled source sample of 4 source subjects (labels cycle over the classes)."""
    labels = torch.arange(n) % len(LABELS)
    subjects = [f"src{i % 4}" for i in range(n)]
    return ttaperso.SourceData(source_frames(n, seed=seed), labels=labels, subjects=subjects)


def target_frames(n: int, seed: int = 0, scale: float = 1.5, shift: float = 0.7) -> Tensor:
    """``n`` shifted "target" frames (source-like noise * scale + shift), seeded."""
    return source_frames(n, seed=10_000 + seed) * scale + shift


def states_equal(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    """Same keys, dtypes, shapes and bit-identical values (NaN equals NaN)."""
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if x.is_floating_point():
            same = (x == y) | (torch.isnan(x) & torch.isnan(y))
            if not bool(same.all()):
                return False
        elif not torch.equal(x, y):
            return False
    return True


def state_differs(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    """True when some tensor was added, removed or changed between two state dicts."""
    return not states_equal(a, b)


def assert_same_prediction(a: ttaperso.Prediction, b: ttaperso.Prediction) -> None:
    """Bit-identical logits, probs, labels and ``updated`` flags."""
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.probs, b.probs)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.updated, b.updated)


def all_states(p: ttaperso.Personalizer) -> dict[str, dict[str, Tensor]]:
    """Copies of every subject's state, by subject id."""
    return {s: p.state_dict(s) for s in p.subjects}


#: state keys where NaN is a documented "empty" sentinel (none today)
NAN_SENTINELS: frozenset[str] = frozenset()


def assert_states_finite(state: Mapping[str, Tensor], allow_sentinels: bool = True) -> None:
    """Every floating tensor of a state dict is finite (NaN sentinels allowed if asked)."""
    bad = [
        k
        for k, v in state.items()
        if v.is_floating_point()
        and not bool(torch.isfinite(v).all())
        and not (allow_sentinels and k in NAN_SENTINELS and bool(torch.isnan(v).all()))
    ]
    assert not bad, f"non-finite state tensors: {bad}"


PersonalizerFactory = Callable[..., ttaperso.Personalizer]


def _tiny_clip_au(seed: int) -> nn.Module:
    from ttaperso.clip_au import tiny_clip_au

    # One gray 16x16 channel like INPUT_SHAPE, so the table's frames and bad inputs apply.
    return tiny_clip_au(LABELS, image_size=16, channels=1, window=4, hidden=16, seed=seed)


#: Strategies that only run on a model family of their own: strategy -> ``factory(seed)``
#: of a tiny model of that family (a FERModel taking INPUT_SHAPE frames, LABELS classes).
#: The ``model``/``other_model`` fixtures and the Personalizer factory use it.
STRATEGY_MODELS: dict[str, Callable[[int], nn.Module]] = {"clip_autt": _tiny_clip_au}
#: strategies that run on every model family
MODEL_AGNOSTIC: frozenset[str] = frozenset({"source"})


def build_model_for(strategy: object, seed: int = 0) -> nn.Module:
    """The tiny test model ``strategy`` runs on (the BN CNN unless STRATEGY_MODELS names one)."""
    if isinstance(strategy, ttaperso.StrategyConfig):
        strategy = strategy.strategy_name
    factory = STRATEGY_MODELS.get(strategy) if isinstance(strategy, str) else None
    return factory(seed) if factory is not None else build_model(seed=seed)


def strategies_sharing_model(strategy: str) -> list[str]:
    """Registered strategies that run on ``strategy``'s test model (including itself)."""
    family = STRATEGY_MODELS.get(strategy)
    return [
        s
        for s in ttaperso.list_strategies()
        if s in MODEL_AGNOSTIC or STRATEGY_MODELS.get(s) is family
    ]


def _test_strategy(request: pytest.FixtureRequest) -> object:
    callspec = getattr(request.node, "callspec", None)
    return callspec.params.get("strategy") if callspec is not None else None


@pytest.fixture
def model(request: pytest.FixtureRequest) -> nn.Module:
    """The caller's model (fresh per test): the one the test's ``strategy`` parameter runs on."""
    return build_model_for(_test_strategy(request), seed=0)


@pytest.fixture
def other_model(request: pytest.FixtureRequest) -> nn.Module:
    """A model with the same architecture and different weights."""
    return build_model_for(_test_strategy(request), seed=1)


@pytest.fixture
def personalizer_factory(model: nn.Module, request: pytest.FixtureRequest) -> PersonalizerFactory:
    """``factory(strategy, *, adapt=True, model=None, **overrides)`` -> Personalizer.

    Every Personalizer gets the head name and a labelled source sample (strategies that
    need neither ignore them); pass ``source=None`` to leave the sample out.
    With ``adapt=True`` the strategy's "make it adapt" overrides are applied first and
    ``overrides`` win over them; ``model`` defaults to the test's ``model`` fixture.
    """

    def factory(
        strategy: str | ttaperso.StrategyConfig,
        *,
        adapt: bool = True,
        model: nn.Module | None = None,
        **overrides: Any,
    ) -> ttaperso.Personalizer:
        options: dict[str, Any] = {"head": HEAD, "source": source_data()}
        if adapt and isinstance(strategy, str):
            options.update(adapt_overrides(strategy))
        options.update(overrides)
        if model is None:
            name = strategy if isinstance(strategy, str) else strategy.strategy_name
            shares = name in MODEL_AGNOSTIC or STRATEGY_MODELS.get(name) is default_family
            model = default_model if shares else build_model_for(name, seed=0)
        if isinstance(model, ttaperso.FERModel):
            # An adapter states its own labels, input shape and head.
            options.pop("head", None)
            return ttaperso.Personalizer(model, strategy, **options)
        return ttaperso.Personalizer(
            model,
            strategy,
            labels=LABELS,
            input_shape=INPUT_SHAPE,
            **options,
        )

    default_model = model
    default_family = STRATEGY_MODELS.get(_test_strategy(request))  # type: ignore[arg-type]
    return factory


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    """Seed torch for every test (tests also pass explicit generators)."""
    torch.manual_seed(12345)


def log_c(num_classes: int) -> float:
    """``ln C``, the scale of every entropy threshold."""
    return math.log(num_classes)
