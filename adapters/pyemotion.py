"""PyEmotion's FER2013 CNN (PyEmotion 1.0.0, MIT licence), rebuilt for the runtime.

The weights are ``PyEmotion/model/main_model.pkl`` inside the ``PyEmotion`` wheel on PyPI:
a ``torch.save`` dictionary ``{"network": state_dict, "optimizer": ..., "epochs": 50,
"accuracy": ...}`` that loads with ``torch.load(..., weights_only=True)`` (plain tensors,
no pickled module). :func:`fetch_pyemotion_state` downloads the wheel alone (``pip download
--no-deps``: its dependencies include facenet-pytorch and others the model does not need),
checks the file's size and sha256, loads it safely and keeps only the network's tensors;
:func:`load_pyemotion` caches those as safetensors, so later calls read no pickle at all.

Architecture (PyEmotion's ``NetworkV2(in_c=1, nl=32, out_f=7)``): four blocks of
reflection-pad 1 -> 3x3 conv (stride 1, 2, 2, 2; 32, 64, 128, 256 channels, with bias) ->
BatchNorm -> ReLU on a 48 x 48 gray input normalised to [-1, 1] (``Normalize(0.5, 0.5)``),
flatten (256 x 6 x 6 = 9216) -> Linear 256 -> ReLU -> Linear 7 -> Sigmoid. Classes in
FER2013 order: angry, disgust, fear, happy, sad, surprise, neutral. 2.75M parameters,
4 BatchNorm layers (480 channels).

Differences from the package, on purpose:

* The logits are the last Linear layer's outputs, *before* PyEmotion's final Sigmoid. The
  Sigmoid is monotone, so the predicted class is the same; but a softmax over sigmoid
  outputs (values in (0, 1)) would be almost uniform, which would make every entropy-based
  strategy and gate meaningless. :meth:`PyEmotionNet.head` is therefore exactly linear on
  the 256-d features (``linear_head`` returns it).
* ReLUs are not in-place (the runtime may need their inputs for gradients).
* PyEmotion crops faces with MTCNN (facenet-pytorch); here the faces come from the
  readers (fer's Haar crop), and ``prepare`` resizes them to 48 x 48 with antialiased
  bilinear interpolation (PyEmotion: PIL's bilinear resize of the crop).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ttaperso.cache import ensure_cache_dir, load_cached_weights, save_cached_weights
from ttaperso.errors import ModelInterfaceError
from ttaperso.model import FERModel
from ttaperso.wheels import download_wheel

__all__ = [
    "PYEMOTION_LABELS",
    "PYEMOTION_VERSION",
    "PyEmotionNet",
    "fetch_pyemotion_state",
    "load_pyemotion",
]

PYEMOTION_VERSION = "1.0.0"
PYEMOTION_LABELS: tuple[str, ...] = (
    "angry",
    "disgust",
    "fear",
    "happy",
    "sad",
    "surprise",
    "neutral",
)

# Facts of the file inside PyEmotion-1.0.0-py3-none-any.whl, checked on every extraction.
_PKL_MEMBER = "PyEmotion/model/main_model.pkl"
_PKL_SIZE = 33_017_347
_PKL_SHA256 = "d2789940007ee6175130fefd3ed9a523a1afa4475fbdafbf64f2948db6c29537"
# Bump when the state-dict layout or the conversion changes: old cache files are then ignored.
_CONVERTER_VERSION = "1"
_WIDTH = 32  # NetworkV2's nl


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ReflectionPad2d(1),
        nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=0),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class PyEmotionNet(FERModel):
    """PyEmotion's NetworkV2 as a :class:`~ttaperso.model.FERModel`.

    Input ``(N, 1, 48, 48)`` in ``[-1, 1]``; ``features`` are the 256-d hidden layer (after
    its ReLU), ``head`` the final Linear (logits before PyEmotion's Sigmoid). The module
    names match PyEmotion's state dict (``conv_1.1.weight`` ... ``linear.2.bias``).
    """

    def __init__(self) -> None:
        super().__init__(PYEMOTION_LABELS, (1, 48, 48), input_range=(-1.0, 1.0), name="pyemotion")
        w = _WIDTH
        self.conv_1 = _block(1, w, 1)
        self.conv_2 = _block(w, 2 * w, 2)
        self.conv_3 = _block(2 * w, 4 * w, 2)
        self.conv_4 = _block(4 * w, 8 * w, 2)
        # Index 1 is the ReLU and index 2 the classifier, as in PyEmotion's nn.Sequential
        # (whose index 3, the Sigmoid, is left out: see the module docstring).
        self.linear = nn.Sequential(nn.Linear(8 * w * 6 * 6, 256), nn.ReLU(), nn.Linear(256, 7))

    def features(self, x: Tensor) -> Tensor:
        x = self.conv_4(self.conv_3(self.conv_2(self.conv_1(x))))
        return self.linear[1](self.linear[0](x.flatten(1)))

    def head(self, z: Tensor) -> Tensor:
        return self._last_linear()(z)

    def linear_head(self) -> tuple[Tensor, Tensor]:
        layer = self._last_linear()
        return layer.weight, layer.bias

    def _last_linear(self) -> nn.Linear:
        layer = self.linear[2]
        assert isinstance(layer, nn.Linear)  # the architecture above; not input validation
        return layer


def _download_wheel(dest: Path) -> Path:
    advice = (
        f"Download PyEmotion-{PYEMOTION_VERSION}-py3-none-any.whl by other means, extract "
        f"{_PKL_MEMBER} and call load_pyemotion(pkl_path=...) with its path."
    )
    return download_wheel("PyEmotion", PYEMOTION_VERSION, dest, "[Pp]y[Ee]motion-*.whl", advice)


def _state_from_pickle(data: bytes, source: str) -> dict[str, Tensor]:
    """The network tensors of a PyEmotion checkpoint, loaded with ``weights_only=True``."""
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise ModelInterfaceError(
            f"{source}: not a weights-only torch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    network = checkpoint.get("network") if isinstance(checkpoint, Mapping) else None
    if not isinstance(network, Mapping) or not all(isinstance(v, Tensor) for v in network.values()):
        raise ModelInterfaceError(
            f"{source}: expected a dict with a 'network' state dict of tensors"
        )
    return {str(k): v.detach().clone().contiguous() for k, v in network.items()}


def fetch_pyemotion_state(cache_dir: str | Path | None = None) -> dict[str, Tensor]:
    """Download PyEmotion's wheel once and return its network state dict.

    Runs ``pip download --no-deps PyEmotion==1.0.0`` into a temporary folder inside the
    cache, checks ``main_model.pkl``'s size and sha256, and loads it with
    ``weights_only=True``. The wheel is not kept (:func:`load_pyemotion` caches the
    converted tensors instead).
    """
    cache = ensure_cache_dir(cache_dir)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".pyemotion-download-") as tmp:
        wheel = _download_wheel(Path(tmp))
        try:
            with zipfile.ZipFile(wheel) as archive:
                data = archive.read(_PKL_MEMBER)
        except (KeyError, zipfile.BadZipFile, OSError) as exc:
            raise ModelInterfaceError(
                f"Could not read {_PKL_MEMBER} from {wheel.name}: {exc}"
            ) from exc
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != _PKL_SIZE or digest != _PKL_SHA256:
        raise ModelInterfaceError(
            f"{_PKL_MEMBER} in PyEmotion {PYEMOTION_VERSION} has {len(data):,} bytes and sha256 "
            f"{digest}; expected {_PKL_SIZE:,} bytes and {_PKL_SHA256}"
        )
    return _state_from_pickle(data, f"PyEmotion=={PYEMOTION_VERSION}:{_PKL_MEMBER}")


def _load_state(model: PyEmotionNet, state: Mapping[str, Tensor], source: str) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    bad = sorted(k for k in state if k in expected and state[k].shape != expected[k])
    if missing or unexpected or bad:
        raise ModelInterfaceError(
            f"Weights in {source!r} do not fit PyEmotionNet: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {bad[:5]}"
        )
    model.load_state_dict(dict(state))


def load_pyemotion(
    cache_dir: str | Path | None = None, *, pkl_path: str | Path | None = None
) -> PyEmotionNet:
    """PyEmotion's FER2013 network with its real weights, frozen and in eval mode.

    The first call downloads the PyEmotion wheel (or reads ``pkl_path``, a local copy of
    ``main_model.pkl``), loads the checkpoint with ``weights_only=True`` and caches the
    network's tensors as safetensors in ``cache_dir`` (default ``$TTAPERSO_CACHE`` or
    ``~/.cache/ttaperso``); later calls only read that file.

    Raises:
        ModelInterfaceError: the weights can be neither found, downloaded nor loaded.
    """
    cache = ensure_cache_dir(cache_dir)
    if pkl_path is not None:
        source = Path(pkl_path).expanduser()
        if not source.is_file():
            raise ModelInterfaceError(f"Expected argument `pkl_path` to be a file: {str(source)!r}")
        data = source.read_bytes()
        source_sha = hashlib.sha256(data).hexdigest()
    else:
        data, source_sha = None, _PKL_SHA256
    cached = cache / (
        f"pyemotion-{PYEMOTION_VERSION}-networkv2-{source_sha[:16]}-v{_CONVERTER_VERSION}"
        ".safetensors"
    )
    model = PyEmotionNet()
    if cached.is_file():
        state = load_cached_weights(cached)
        _load_state(model, state, str(cached))
    else:
        if data is None:
            state = fetch_pyemotion_state(cache)
        else:
            state = _state_from_pickle(data, str(pkl_path))
        _load_state(model, state, str(pkl_path or _PKL_MEMBER))
        metadata = {
            "format": "pt",
            "source": f"PyEmotion=={PYEMOTION_VERSION}:{_PKL_MEMBER}"
            if pkl_path is None
            else Path(pkl_path).name,
            "source_sha256": source_sha,
            "converter_version": _CONVERTER_VERSION,
        }
        save_cached_weights(cached, state, metadata)
    model.eval()
    model.requires_grad_(False)
    return model
