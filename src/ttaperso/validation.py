"""Input checks done before any state is touched: clear messages, no partial updates."""

from __future__ import annotations

import math
import unicodedata

import torch
from torch import Tensor

from .errors import InputError
from .model import FERModel

__all__ = [
    "validate_frames",
    "validate_subject",
    "MAX_FRAMES_PER_CALL",
    "MAX_PIXELS_PER_FRAME",
    "MAX_VALUES_PER_CALL",
    "MAX_SUBJECT_ID_LENGTH",
]

MAX_FRAMES_PER_CALL = 4096
#: frames larger than this (H x W) are refused: no face crop needs more than 4096 x 4096
MAX_PIXELS_PER_FRAME = 4096 * 4096
#: values (N x C x H x W) per call: 2**28 float32 values are 1 GiB before any activation
MAX_VALUES_PER_CALL = 2**28
MAX_SUBJECT_ID_LENGTH = 256


def validate_subject(subject: object) -> str:
    """Return ``subject`` if it is a usable subject id, else raise :class:`InputError`.

    Ids are free text (they never become paths unsanitised, see the stores), but must be
    non-empty, at most 256 characters, and free of control characters such as NUL.
    """
    if not isinstance(subject, str):
        raise InputError(
            f"Expected argument `subject` to be a str but got {type(subject).__name__}"
        )
    if not subject or len(subject) > MAX_SUBJECT_ID_LENGTH:
        raise InputError(
            f"Expected argument `subject` to have 1 to {MAX_SUBJECT_ID_LENGTH} characters "
            f"but got {len(subject)}"
        )
    bad = [c for c in subject if unicodedata.category(c).startswith("C")]
    if bad:
        raise InputError(
            f"Expected argument `subject` without control characters but got {subject[:64]!r}"
        )
    return subject


def validate_frames(
    frames: object, model: FERModel, *, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Check preprocessed frames against the model's declared input; return them ready to run."""
    if not isinstance(frames, Tensor):
        raise InputError(
            "Expected argument `frames` to be a torch.Tensor of shape (N, C, H, W) but got "
            f"{type(frames).__name__} (use torch.from_numpy and the model's preprocessing)"
        )
    if frames.device.type == "meta":
        raise InputError(
            "Expected argument `frames` to hold data but got a tensor on the 'meta' device "
            "(shape only, no values); create or move the frames on a real device (cpu, cuda)"
        )
    c, h, w = model.input_shape
    expected = f"(N, {c}, {h or 'H'}, {w or 'W'})"
    if frames.dim() == 3:
        raise InputError(
            f"Expected argument `frames` to be a batch of shape {expected} but got shape "
            f"{tuple(frames.shape)}; add a batch dimension (frames.unsqueeze(0)) for one frame"
        )
    if frames.dim() != 4:
        raise InputError(
            f"Expected argument `frames` to have shape {expected} but got shape {tuple(frames.shape)}"
        )
    n = frames.shape[0]
    if n == 0:
        raise InputError(
            f"Expected argument `frames` to hold at least one frame but got shape {tuple(frames.shape)}"
        )
    if n > MAX_FRAMES_PER_CALL:
        raise InputError(
            f"Expected at most {MAX_FRAMES_PER_CALL} frames per call but got {n}; split the batch"
        )
    pixels = frames.shape[2] * frames.shape[3]
    if pixels > MAX_PIXELS_PER_FRAME or frames.numel() > MAX_VALUES_PER_CALL:
        raise InputError(
            f"Expected frames of at most {MAX_PIXELS_PER_FRAME} pixels and at most "
            f"{MAX_VALUES_PER_CALL} values per call but got shape {tuple(frames.shape)}; "
            "resize the frames or split the batch"
        )
    if frames.shape[1] != c:
        raise InputError(
            f"Expected argument `frames` to have {c} channel(s) (shape {expected}) but got "
            f"{frames.shape[1]} (shape {tuple(frames.shape)})"
        )
    if (h is not None and frames.shape[2] != h) or (w is not None and frames.shape[3] != w):
        raise InputError(
            f"Expected frames of size {h}x{w} (shape {expected}) but got "
            f"{frames.shape[2]}x{frames.shape[3]} (shape {tuple(frames.shape)})"
        )
    if frames.dtype.is_complex or not frames.dtype.is_floating_point:
        raise InputError(
            f"Expected argument `frames` to be a floating-point tensor (preprocessed) but got "
            f"dtype {frames.dtype}"
        )
    # One fused pass: aminmax propagates NaN, and +-Inf shows up as an extreme, so finite
    # extremes mean finite frames (the per-frame scan runs only to name the bad frames).
    extremes = torch.aminmax(frames)
    fmin, fmax = (float(v) for v in torch.stack(extremes).tolist())
    if not (math.isfinite(fmin) and math.isfinite(fmax)):
        finite = torch.isfinite(frames)
        bad = (~finite).reshape(n, -1).any(dim=1).nonzero().squeeze(1).tolist()
        raise InputError(f"Expected finite frame values but frame(s) {bad[:10]} contain NaN or Inf")
    if model.input_range is not None:
        lo, hi = model.input_range
        tol = 1e-3 * (hi - lo)
        if fmin < lo - tol or fmax > hi + tol:
            raise InputError(
                f"Expected frame values in [{lo}, {hi}] (model {model.model_name!r}) but got values in "
                f"[{fmin:.4g}, {fmax:.4g}]; apply the model's preprocessing first"
            )
    # Detached: a caller's autograd graph must never make TENT-like strategies
    # backpropagate into the frames (or further); gradients stop at the first adapted tensor.
    return frames.detach().to(device=device, dtype=dtype).contiguous()
