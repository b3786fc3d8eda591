"""Where frames come from: a video file, a folder of images, a camera or a stream URL.

Every source decodes one frame at a time (nothing is read ahead beyond OpenCV's own
buffer), so memory does not grow with the length of the video. :func:`open_source` picks
the kind from what the user typed:

* an integer (or a string of digits, ``"0"``): a camera index;
* a string with ``://`` (``rtsp://...``, ``http://...``): a stream URL, opened by OpenCV;
* an existing folder: its images in natural name order (``frame9.png`` before
  ``frame10.png``), one frame each, at ``fps`` frames per second (default 25);
* an existing file: a video file.

Bad input fails when the source is opened, before anything else happens, with an
:class:`~ttaperso.errors.InputError` naming it: a missing path, a file OpenCV cannot
decode, a folder without images.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import ConfigError, InputError
from ..streams.datasets import IMAGE_SUFFIXES

__all__ = [
    "DEFAULT_FPS",
    "Frame",
    "FrameSource",
    "CaptureSource",
    "ImageFolderSource",
    "open_source",
]

#: frame rate assumed for image folders and for cameras/streams that report none
DEFAULT_FPS = 25.0


@dataclass(frozen=True)
class Frame:
    """One decoded frame.

    Attributes:
        index: 0-based number of the frame in its source.
        time: seconds from the start (``index / fps`` for files and folders, the
            wall-clock time since the first frame for cameras and streams).
        image: the picture, ``uint8 (H, W, 3)`` in OpenCV's BGR order.
        name: where it came from (the file, ``video.mp4#12``), for messages.
    """

    index: int
    time: float
    image: np.ndarray
    name: str


class FrameSource(Protocol):
    """What :class:`~ttaperso.video.Session` reads: an iterable of :class:`Frame` s."""

    name: str
    fps: float
    #: number of frames when known in advance (files, folders), else None
    frame_count: int | None
    #: True for live sources (cameras, streams): frame times are wall-clock times
    live: bool

    def __iter__(self) -> Iterator[Frame]: ...

    def close(self) -> None: ...


def _cv2() -> Any:
    import cv2

    return cv2


def _open_capture(target: str | int) -> Any:
    """``cv2.VideoCapture(target)``; a seam for tests that fake a camera."""
    return _cv2().VideoCapture(target)


class CaptureSource:
    """Frames from ``cv2.VideoCapture``: a video file, a camera index or a stream URL.

    Args:
        target: file path, camera index or URL.
        live: whether frames arrive in real time (camera, stream): their time is the
            wall-clock time since the first frame, not ``index / fps``.
        opener: makes the capture object (default ``cv2.VideoCapture``).
    """

    def __init__(
        self,
        target: str | int,
        *,
        live: bool,
        name: str | None = None,
        opener: Callable[[str | int], Any] | None = None,
    ) -> None:
        self.name = name or str(target)
        self.live = live
        self._capture = (opener or _open_capture)(target)
        if not self._capture.isOpened():
            self._capture.release()
            kind = "camera" if isinstance(target, int) else "stream" if live else "video file"
            raise InputError(f"{self.name}: OpenCV cannot open this {kind}")
        cv2 = _cv2()
        fps = float(self._capture.get(cv2.CAP_PROP_FPS) or 0.0)
        # cameras and some containers report 0 or nonsense; frame times then assume 25/s
        self.fps = fps if 0.0 < fps <= 1000.0 else DEFAULT_FPS
        count = int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.frame_count: int | None = count if count > 0 and not live else None

    def __iter__(self) -> Iterator[Frame]:
        index = 0
        start: float | None = None
        while True:
            ok, image = self._capture.read()
            if not ok or image is None:
                break
            if start is None:
                start = time.monotonic()
            if image.ndim == 2:  # some backends give gray frames
                image = np.repeat(image[:, :, None], 3, axis=2)
            t = time.monotonic() - start if self.live else index / self.fps
            yield Frame(index, t, image, f"{self.name}#{index}")
            index += 1
        if index == 0 and not self.live:
            raise InputError(f"{self.name}: OpenCV opened the file but decoded no frame from it")

    def close(self) -> None:
        self._capture.release()


def _natural_key(path: Path) -> list[object]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


class ImageFolderSource:
    """The images of one folder, in natural name order, as frames at ``fps`` per second.

    Images are decoded one at a time with OpenCV (colour kept); a file that does not
    decode raises, naming it (a folder of frames with one broken file is not silently
    shortened).
    """

    live = False

    def __init__(self, folder: str | os.PathLike[str], fps: float = DEFAULT_FPS) -> None:
        self.folder = Path(folder)
        self.name = str(self.folder)
        self.fps = float(fps)
        self.files = sorted(
            (
                p
                for p in self.folder.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            ),
            key=_natural_key,
        )
        if not self.files:
            raise InputError(
                f"{self.folder}: the folder holds no images (looked for "
                f"{', '.join(IMAGE_SUFFIXES)})"
            )
        self.frame_count: int | None = len(self.files)

    def __iter__(self) -> Iterator[Frame]:
        cv2 = _cv2()
        for index, path in enumerate(self.files):
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                image = _read_with_pil(path)
            yield Frame(index, index / self.fps, image, str(path))

    def close(self) -> None:
        pass


def _read_with_pil(path: Path) -> np.ndarray:
    """Formats OpenCV does not read (GIF): PIL, converted to BGR."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from exc
    return np.ascontiguousarray(rgb[:, :, ::-1])


def open_source(
    source: str | int | os.PathLike[str], *, fps: float | None = None
) -> CaptureSource | ImageFolderSource:
    """Open ``source`` as the right kind of :class:`FrameSource` (see the module docstring).

    Args:
        source: video file, image folder, camera index or stream URL.
        fps: frame rate of an image folder (default 25); for a video file or camera, a
            value given here overrides what the container reports (frame times only).
    """
    if fps is not None and not (isinstance(fps, (int, float)) and 0 < fps <= 1000):
        raise ConfigError(f"Expected a frame rate between 0 and 1000 per second but got {fps!r}")
    opened: CaptureSource | ImageFolderSource
    if isinstance(source, bool):
        raise InputError(
            f"Expected a video file, image folder, camera index or URL but got {source!r}"
        )
    if isinstance(source, int) or (isinstance(source, str) and source.strip().isdigit()):
        index = int(source)
        opened = CaptureSource(index, live=True, name=f"camera {index}")
    elif isinstance(source, str) and "://" in source:
        opened = CaptureSource(source, live=True)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            return ImageFolderSource(path, fps=fps or DEFAULT_FPS)
        if not path.exists():
            raise InputError(f"{path}: no such video file or image folder")
        if not path.is_file():
            raise InputError(f"{path}: not a video file or image folder")
        opened = CaptureSource(str(path), live=False, name=str(path))
    if fps is not None:
        opened.fps = float(fps)
    return opened
