"""Request payloads -> model input: PNG/JPEG face crops or a ``.npy`` array, within limits.

Nothing here runs code from a payload: images are decoded by Pillow (PNG and JPEG only),
arrays by ``numpy.load(allow_pickle=False)`` after their header was checked. Sizes are
checked *before* decoding: an image's declared width x height (from its header) and an
array's declared shape and dtype, so a decompression bomb or a 10^12-element array is
refused without allocating it. Every refusal is an :class:`~ttaperso.errors.InputError`
naming the part and what was expected (HTTP 400) or a :class:`PayloadTooLargeError` (413).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from numpy.lib import format as npy_format
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..errors import InputError, ModelInterfaceError
from ..model import FERModel

__all__ = ["Limits", "PayloadTooLargeError", "frames_from_array", "frames_from_images"]


class PayloadTooLargeError(InputError):
    """A request, image or array is larger than the server's limits (HTTP 413)."""


@dataclass(frozen=True)
class Limits:
    """What one request may hold (``ttaperso serve --max-...`` flags).

    Attributes:
        max_request_bytes: body size (checked on Content-Length and while reading).
        max_frames: frames per request (all subjects of a predict_many together).
        max_image_pixels: width x height of one image or array frame.
        max_subjects: subjects per predict_many.
    """

    max_request_bytes: int = 16 * 1024 * 1024
    max_frames: int = 64
    max_image_pixels: int = 1024 * 1024
    max_subjects: int = 64

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_frames", "max_image_pixels", "max_subjects"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"Expected limit `{name}` to be an int >= 1 but got {value!r}")


_FORMATS = ("PNG", "JPEG")


def _open_image(data: bytes, name: str, limits: Limits) -> np.ndarray:
    """One PNG/JPEG as an (H, W) or (H, W, 3) uint8 array; size checked before decoding."""
    if not data:
        raise InputError(f"Frame {name!r} is empty; expected a PNG or JPEG file")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies before Pillow's; its bomb warning is not an error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_FORMATS)
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > limits.max_image_pixels:
                raise PayloadTooLargeError(
                    f"Frame {name!r} is {width}x{height} = {width * height} pixels; this server "
                    f"accepts at most {limits.max_image_pixels} pixels per image"
                )
            if getattr(image, "n_frames", 1) > 1:
                raise InputError(f"Frame {name!r} is an animated image; send single frames")
            image.load()
    except Image.DecompressionBombError as exc:  # Pillow's own limit, above ours
        raise PayloadTooLargeError(
            f"Frame {name!r} declares more pixels than this server accepts (at most "
            f"{limits.max_image_pixels} pixels per image)"
        ) from exc
    except UnidentifiedImageError as exc:
        raise InputError(
            f"Frame {name!r} is not a readable PNG or JPEG image ({type(exc).__name__})"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated / corrupt data
        raise InputError(f"Frame {name!r} is a corrupt or truncated image ({exc})") from exc
    mode = (
        "L" if image.mode in ("1", "L", "LA", "I", "I;16", "F", "P") and _is_gray(image) else "RGB"
    )
    return np.asarray(image.convert(mode))


def _is_gray(image: Image.Image) -> bool:
    if image.mode != "P":
        return True
    palette = image.getpalette() or []
    rgb = [palette[i : i + 3] for i in range(0, len(palette), 3)]
    return all(r == g == b for r, g, b in rgb)


def _to_tensor(pixels: np.ndarray) -> Tensor:
    """(H, W) / (H, W, C) uint8 or [0, 1] floats -> (1, C, H, W) float32 in [0, 1]."""
    x = torch.from_numpy(np.array(pixels, copy=True))  # owned and writable
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.dim() == 2:
        x = x.unsqueeze(-1)
    return x.permute(2, 0, 1).unsqueeze(0)


def _prepare(model: FERModel, images: list[Tensor]) -> Tensor:
    """Each image through the model's ``prepare`` (sizes may differ), stacked."""
    try:
        return torch.cat([model.prepare(x) for x in images])
    except ModelInterfaceError as exc:
        raise InputError(str(exc)) from exc


def frames_from_images(files: list[tuple[str, bytes]], model: FERModel, limits: Limits) -> Tensor:
    """PNG/JPEG face crops -> the model's input ``(N, C, H, W)``."""
    if not files:
        raise InputError("Expected at least one frame (multipart field `frames`)")
    if len(files) > limits.max_frames:
        raise PayloadTooLargeError(
            f"Expected at most {limits.max_frames} frames per request but got {len(files)}"
        )
    return _prepare(model, [_to_tensor(_open_image(data, name, limits)) for name, data in files])


_ARRAY_DTYPES = (np.uint8, np.float32, np.float64, np.float16)


def frames_from_array(data: bytes, model: FERModel, limits: Limits, name: str = "array") -> Tensor:
    """A ``.npy`` array of face crops -> the model's input ``(N, C, H, W)``.

    Accepted: shape ``(N, H, W)`` (gray) or ``(N, H, W, C)`` with C in 1 or 3; dtype uint8
    (0-255) or float16/32/64 in [0, 1], finite. Never unpickled.
    """
    buffer = io.BytesIO(data)
    try:
        major, _ = npy_format.read_magic(buffer)
        if major == 1:
            shape, fortran, dtype = npy_format.read_array_header_1_0(buffer)
        elif major in (2, 3):
            shape, fortran, dtype = npy_format.read_array_header_2_0(buffer)
        else:
            raise ValueError(f"unsupported .npy version {major}")
    except Exception as exc:  # noqa: BLE001 - numpy's header parser raises many kinds
        raise InputError(
            f"Part {name!r} is not a .npy array ({type(exc).__name__}: {exc})"
        ) from exc
    if dtype.hasobject or dtype.type not in _ARRAY_DTYPES:
        raise InputError(
            f"Part {name!r}: expected dtype uint8, float16, float32 or float64 but got {dtype}"
        )
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
        raise InputError(
            f"Part {name!r}: expected shape (N, H, W) or (N, H, W, C) with C in (1, 3) but got "
            f"{shape}"
        )
    n, h, w = shape[0], shape[1], shape[2]
    if n < 1 or h < 1 or w < 1:
        raise InputError(f"Part {name!r}: expected at least one non-empty frame but got {shape}")
    if n > limits.max_frames:
        raise PayloadTooLargeError(
            f"Part {name!r}: expected at most {limits.max_frames} frames but got {n}"
        )
    if h * w > limits.max_image_pixels:
        raise PayloadTooLargeError(
            f"Part {name!r}: frames of {h}x{w} pixels; this server accepts at most "
            f"{limits.max_image_pixels} pixels per frame"
        )
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - buffer.tell() != expected:
        raise InputError(
            f"Part {name!r}: header declares {shape} {dtype} ({expected} bytes) but "
            f"{len(data) - buffer.tell()} bytes follow"
        )
    array = np.frombuffer(data, dtype=dtype, offset=buffer.tell()).reshape(
        shape, order="F" if fortran else "C"
    )
    if array.dtype != np.uint8:
        if not np.isfinite(array).all():
            raise InputError(f"Part {name!r}: expected finite values but got NaN or Inf")
        lo, hi = float(array.min()), float(array.max())
        if lo < 0.0 or hi > 1.0:
            raise InputError(
                f"Part {name!r}: expected float values in [0, 1] (or uint8 0-255) but got "
                f"values in [{lo:.4g}, {hi:.4g}]"
            )
    x = torch.from_numpy(np.array(array, copy=True))  # the request's buffer is read-only
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    x = x.unsqueeze(-1) if x.dim() == 3 else x
    return _prepare(model, [x.permute(0, 3, 1, 2)])
