"""Shared pieces of the readers: reading one still, cropping it, stacking crops as a tensor.

Every reader hands its images through :func:`still_face` (or the sequence cropper in
:mod:`ttaperso.streams.faces`) and :func:`stack_faces`, so all of them crop, resize and scale the same
way and fail with the same messages.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, InputError
from .faces import crop_face_like_fer, load_gray

__all__ = ["Crop", "check_crop", "resize_gray", "stack_faces", "still_face"]

#: ``"fer"``: detect the face and crop it as the fer package does (JAFFE, Yale, raw photos,
#: video); ``"none"``: the image is already a face crop (FER2013, aligned sets), only resized.
Crop = Literal["fer", "none"]


def check_crop(crop: str, size: int | None) -> None:
    """Refuse an unknown crop mode or a bad size with the valid values named."""
    if crop not in ("fer", "none"):
        raise ConfigError(f"Expected argument `crop` to be 'fer' or 'none' but got {crop!r}")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise ConfigError(f"Expected argument `size` to be a positive int or None but got {size!r}")
    if crop == "fer" and size is None:
        raise ConfigError("crop='fer' needs an output `size` (fer crops at 64)")


def resize_gray(gray: np.ndarray, size: int | None) -> np.ndarray:
    """``gray`` resized to ``size x size`` with OpenCV's bilinear resize (fer's), or as is."""
    if size is None or gray.shape == (size, size):
        return gray
    import cv2

    return cv2.resize(gray, (size, size))


def still_face(path: str | os.PathLike[str], crop: Crop, size: int | None) -> np.ndarray:
    """One image file as a uint8 gray face crop.

    Raises:
        InputError: the file is not a readable image, or ``crop="fer"`` finds no face in it
            (the file is named; nothing is skipped silently).
    """
    gray = load_gray(path)
    if crop == "none":
        return resize_gray(gray, size)
    face = crop_face_like_fer(gray, size if size is not None else 64)
    if face is None:
        raise InputError(
            f"{os.fspath(path)}: no face found (fer's Haar detector); crop the image first "
            "and read it with crop='none', or remove it from the set"
        )
    return face


def stack_faces(faces: Sequence[np.ndarray], sources: Sequence[str]) -> Tensor:
    """uint8 gray crops of one size -> ``(T, 1, H, W)`` float32 in ``[0, 1]``.

    The values are ``k / 255`` exactly, so a model's :meth:`~ttaperso.FERModel.prepare`
    (``x * 2 - 1`` for a ``[-1, 1]`` model) reproduces fer's ``(k / 255 - 0.5) * 2`` to
    float32 rounding.
    """
    if not faces:
        return torch.zeros(0, 1, 1, 1)
    shape = faces[0].shape
    for face, source in zip(faces, sources, strict=True):
        if face.shape != shape:
            raise InputError(
                f"{source}: image of size {face.shape} differs from {shape} of {sources[0]}; "
                "pass `size=` to resize every image to one size"
            )
    array = np.stack(faces).astype(np.float32) / np.float32(255.0)
    return torch.from_numpy(array[:, None]).contiguous()
