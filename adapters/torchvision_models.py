"""Generic adapter for torchvision and timm image classifiers.

``from_torchvision("resnet18", labels=FER_LABELS, weights=None)`` builds the architecture
with one output per label and wraps it as a :class:`~ttaperso.model.FERModel` whose head
is the network's final ``nn.Linear`` (found by walking the modules, or named with
``head=``), so strategies that need features + a linear head work on it.

Weights never come from a hub: ``weights=None`` gives a randomly initialised network (tests,
smoke runs), ``weights=<path>`` loads a local file of your own fine-tuned FER model — a
``.safetensors`` file, or a torch state dict read with ``torch.load(weights_only=True)``. The
file must fit the architecture built with ``num_classes=len(labels)``.

Preprocessing: ``prepare`` maps face crops in [0, 1] to ``channels x size x size`` (gray
repeated to RGB) and, when ``mean``/``std`` are given (the normalisation your weights were
trained with), standardises each channel with them. Nothing assumes ImageNet constants.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ttaperso.errors import ConfigError, ModelInterfaceError

from .torch_classifier import TorchClassifier

__all__ = ["VisionClassifier", "from_timm", "from_torchvision", "load_local_weights"]


class VisionClassifier(TorchClassifier):
    """A :class:`TorchClassifier` whose ``prepare`` can standardise channels.

    Args:
        network, labels, input_shape, head, name: as :class:`TorchClassifier`.
        mean, std: per-channel normalisation applied after scaling to [0, 1] (both or
            neither; ``std`` > 0). Without them frames are in [0, 1].
    """

    def __init__(
        self,
        network: nn.Module,
        labels: Sequence[str],
        input_shape: tuple[int, int | None, int | None],
        *,
        head: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        name: str | None = None,
    ) -> None:
        channels = input_shape[0]
        if (mean is None) != (std is None):
            raise ConfigError("Pass both `mean` and `std` (or neither)")
        if mean is not None and std is not None:
            if len(mean) != channels or len(std) != channels or min(std) <= 0:
                raise ConfigError(
                    f"Expected `mean` and `std` with {channels} values each (std > 0) but got "
                    f"{list(mean)} and {list(std)}"
                )
            m = torch.tensor([float(v) for v in mean])
            s = torch.tensor([float(v) for v in std])
            input_range = (float(((0 - m) / s).min()), float(((1 - m) / s).max()))
        else:
            m = s = None  # type: ignore[assignment]
            input_range = (0.0, 1.0)
        super().__init__(
            network, labels, input_shape, head=head, input_range=input_range, name=name
        )
        # Plain attributes, not buffers: preprocessing constants are not model state.
        self._mean, self._std = m, s

    def prepare(self, images: Tensor) -> Tensor:
        """Face crops in [0, 1] -> network input (resized, channels converted, standardised)."""
        x = super().prepare(images)  # resized and mapped linearly onto input_range
        if self._mean is None or self._std is None:
            return x
        lo, hi = self.input_range  # type: ignore[misc]
        x = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)  # back to [0, 1], then standardise
        mean = self._mean.to(x).view(1, -1, 1, 1)
        std = self._std.to(x).view(1, -1, 1, 1)
        return ((x - mean) / std).contiguous()


def load_local_weights(network: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a local ``.safetensors`` or torch state-dict file into ``network`` (strict).

    Raises :class:`ModelInterfaceError` naming the file when it is missing, unreadable or
    does not fit (missing/unexpected keys, wrong shapes).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelInterfaceError(f"Expected argument `weights` to be a file: {str(file)!r}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if file.suffix == ".safetensors":
            state: Any = load_file(str(file))
        else:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
    except (
        OSError,
        RuntimeError,
        ValueError,
        EOFError,
        pickle.UnpicklingError,
        SafetensorError,
    ) as exc:
        raise ModelInterfaceError(
            f"{file}: cannot read weights ({type(exc).__name__}: {exc})"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelInterfaceError(f"{file}: expected a state dict of tensors")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelInterfaceError(f"{file}: the weights do not fit the network: {exc}") from exc


def _final_linear(network: nn.Module, num_classes: int, family: str, model: str) -> str:
    linears = [n for n, m in network.named_modules() if isinstance(m, nn.Linear) and n]
    if not linears or network.get_submodule(linears[-1]).out_features != num_classes:
        raise ModelInterfaceError(
            f"{family} model {model!r}: no final nn.Linear with {num_classes} outputs found; "
            f"name the classifier with `head=` (linear modules: {linears[-5:]})"
        )
    return linears[-1]


def _finish(
    network: nn.Module,
    labels: Sequence[str],
    weights: str | os.PathLike[str] | None,
    head: str | None,
    family: str,
    name: str,
    size: int,
    channels: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> VisionClassifier:
    if weights is not None:
        load_local_weights(network, weights)
    network.eval()
    network.requires_grad_(False)
    head_name = head if head is not None else _final_linear(network, len(labels), family, name)
    return VisionClassifier(
        network,
        labels,
        (channels, size, size),
        head=head_name,
        mean=mean,
        std=std,
        name=f"{family}:{name}",
    )


def _check_common(labels: Sequence[str], size: int, weights: object) -> None:
    if isinstance(labels, str) or len(labels) < 2:
        raise ConfigError(f"Expected argument `labels` to name >= 2 classes but got {labels!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"Expected argument `size` to be a positive int but got {size!r}")
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise ConfigError(
            "Expected argument `weights` to be None (random initialisation) or a local file "
            f"path but got {weights!r}; hub weights are never downloaded"
        )


def from_torchvision(
    name: str,
    labels: Sequence[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    size: int = 224,
    head: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> VisionClassifier:
    """A torchvision classifier (``torchvision.models.get_model(name)``) as a FERModel.

    Args:
        name: a torchvision model name (``torchvision.models.list_models()``), e.g.
            ``"resnet18"``, ``"mobilenet_v3_small"``, ``"efficientnet_b0"``.
        labels: class names; the network is built with ``num_classes=len(labels)``.
        weights: ``None`` (random) or a local weights file (see the module docstring).
        size: input side (frames are ``3 x size x size``).
        head: dotted name of the classification layer (default: the last ``nn.Linear``).
        mean, std: the per-channel normalisation the weights expect (default: none).
        **kwargs: passed to the torchvision builder.
    """
    import torchvision

    _check_common(labels, size, weights)
    available = torchvision.models.list_models()
    if name not in available:
        raise ConfigError(f"Unknown torchvision model {name!r}; available: {', '.join(available)}")
    network = torchvision.models.get_model(name, weights=None, num_classes=len(labels), **kwargs)
    return _finish(network, labels, weights, head, "torchvision", name, size, 3, mean, std)


def from_timm(
    name: str,
    labels: Sequence[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    size: int = 224,
    in_chans: int = 3,
    head: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> VisionClassifier:
    """A timm classifier (``timm.create_model(name, pretrained=False)``) as a FERModel.

    timm is optional (``pip install timm``). Arguments as :func:`from_torchvision`, plus
    ``in_chans`` (1 builds a gray-input network). The head defaults to the module timm's
    ``get_classifier()`` returns.
    """
    try:
        import timm
    except ImportError as exc:
        raise ModelInterfaceError(
            "from_timm needs the optional package timm: pip install timm"
        ) from exc
    _check_common(labels, size, weights)
    if not timm.is_model(name):
        raise ConfigError(f"Unknown timm model {name!r}; see timm.list_models()")
    network = timm.create_model(
        name, pretrained=False, num_classes=len(labels), in_chans=in_chans, **kwargs
    )
    if head is None:
        classifier = getattr(network, "get_classifier")()  # noqa: B009 - timm API, untyped
        head = next((n for n, m in network.named_modules() if m is classifier and n), None)
    return _finish(network, labels, weights, head, "timm", name, size, in_chans, mean, std)
