"""The pixel contract of :meth:`ttaperso.FERModel.prepare` (and of raw frames given to ``predict``).

Face images come in two explicit encodings, and the same pixels give the same result:

* ``uint8`` in ``0..255`` (what OpenCV, PIL and ``numpy.asarray(image)`` give);
* floating point in ``[0, 1]`` (``k / 255``; what the stream readers and SynthFace give).

Anything else is refused with an :class:`~ttaperso.errors.InputError` that names the range
found: other integer types, booleans, complex numbers, NaN/Inf, and floats outside
``[0, 1]`` (a float tensor of 0..255 values, or input already mapped to ``[-1, 1]``, used
to be clamped silently and gave ~15 % on JAFFE). NumPy arrays are accepted wherever a
tensor is. Both channel layouts are understood: ``(N, C, H, W)`` and channels-last
``(N, H, W, C)`` with ``C`` 1 (gray) or 3 (RGB); a shape where both readings are possible
(``(N, 3, H, 3)``) is read channels-first.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import InputError

__all__ = ["PIXEL_CHANNELS", "FLOAT_SLACK", "as_tensor", "to_unit_pixels"]

#: channel counts a face image may have (gray, RGB)
PIXEL_CHANNELS = (1, 3)
#: floats up to this far outside [0, 1] are rounding (e.g. ``k / 255.0`` in float16) and
#: are clamped; anything further is refused
FLOAT_SLACK = 1e-3


def as_tensor(images: Any, *, argument: str = "images") -> Tensor:
    """``images`` as a tensor: tensors as they are, NumPy arrays without a copy where possible.

    Raises:
        InputError: anything else (lists, PIL images, None, ...), naming the type.
    """
    if isinstance(images, Tensor):
        return images
    if isinstance(images, np.ndarray):
        if images.dtype == object or images.dtype.kind not in "biufc":
            raise InputError(
                f"Expected argument `{argument}` to be a numeric array but got dtype {images.dtype}"
            )
        if images.dtype.kind == "c" or images.dtype == np.bool_:
            raise InputError(
                f"Expected argument `{argument}` to be uint8 (0..255) or float (0..1) pixels "
                f"but got dtype {images.dtype}"
            )
        # from_numpy shares memory; a read-only or non-contiguous array is copied first
        # (torch cannot wrap read-only memory without a warning).
        array = images if images.flags.writeable else images.copy()
        return torch.from_numpy(np.ascontiguousarray(array))
    hint = " (convert with numpy.asarray(image))" if hasattr(images, "mode") else ""
    raise InputError(
        f"Expected argument `{argument}` to be a torch.Tensor or numpy.ndarray but got "
        f"{type(images).__name__}{hint}"
    )


def _channels_first(x: Tensor, argument: str) -> Tensor:
    if x.dim() in (2, 3):
        raise InputError(
            f"Expected argument `{argument}` to be a batch (N, 1|3, H, W) or (N, H, W, 1|3) but "
            f"got shape {tuple(x.shape)}; for one image add a batch dimension "
            "(images[None]); for gray images (N, H, W) add a channel (images[:, None])"
        )
    if x.dim() != 4:
        raise InputError(
            f"Expected argument `{argument}` to have shape (N, 1|3, H, W) or (N, H, W, 1|3) but "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[1] in PIXEL_CHANNELS:
        out = x
    elif x.shape[3] in PIXEL_CHANNELS:
        out = x.permute(0, 3, 1, 2)  # channels-last (OpenCV, PIL, NumPy)
    else:
        out = None
    if out is not None:
        if out.shape[2] == 0 or out.shape[3] == 0:
            raise InputError(
                f"Expected argument `{argument}` to hold images of at least 1x1 pixels but got "
                f"shape {tuple(x.shape)}"
            )
        return out
    raise InputError(
        f"Expected argument `{argument}` to have 1 (gray) or 3 (RGB) channels, as (N, C, H, W) "
        f"or (N, H, W, C), but got shape {tuple(x.shape)} (drop an alpha channel first)"
    )


def to_unit_pixels(images: Any, *, argument: str = "images") -> Tensor:
    """Check face images against the pixel contract; return float32 ``(N, C, H, W)`` in [0, 1].

    ``uint8`` values become ``k / 255`` (bit-identical to float input made that way), float
    values are checked, not rescaled. See the module docstring for what is accepted.
    """
    x = _channels_first(as_tensor(images, argument=argument), argument)
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if x.dtype.is_complex or not x.dtype.is_floating_point:
        raise InputError(
            f"Expected argument `{argument}` to be uint8 (0..255) or float (0..1) pixels but "
            f"got dtype {x.dtype}; convert 0..255 integers with .to(torch.uint8) "
            "(numpy: .astype(numpy.uint8))"
        )
    x = x.float()
    if x.numel() == 0:
        return x
    lo, hi = (float(v) for v in torch.aminmax(x))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputError(
            f"Expected finite pixel values in argument `{argument}` but found NaN or Inf"
        )
    if lo < -FLOAT_SLACK or hi > 1.0 + FLOAT_SLACK:
        if lo >= 0.0 and hi <= 255.0:
            hint = "; these look like 0..255 pixels: pass them as uint8 or divide by 255"
        elif lo >= -1.0 - FLOAT_SLACK and hi <= 1.0 + FLOAT_SLACK:
            hint = (
                "; these look like already preprocessed model input: give them to predict "
                "directly, not to prepare"
            )
        else:
            hint = ""
        raise InputError(
            f"Expected float pixel values in [0, 1] (or uint8 0..255) in argument "
            f"`{argument}` but got values in [{lo:.4g}, {hi:.4g}]{hint}"
        )
    # out of place: x may be the caller's own tensor
    return x.clamp(0.0, 1.0) if lo < 0.0 or hi > 1.0 else x
