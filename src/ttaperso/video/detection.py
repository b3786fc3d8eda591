"""Face detectors for video frames: fer's Haar cascade (default) and MTCNN (optional).

A detector returns :class:`Detection` boxes ``(x, y, w, h)`` in frame pixels. Both accept
a search window (``roi``) and a face-size range, which the session uses to look for an
already tracked face around where it was: a small window and a narrow size range cost a
fraction of a full-frame search (measured: Haar on a 640x480 frame 117 ms, around a known
100-px face ~3 ms).

* ``haar``: the fer package's detector and settings (:mod:`ttaperso.streams.faces`:
  OpenCV's frontal-face cascade, scaleFactor 1.1, minNeighbors 5, faces >= 50 px), so a
  video frame is cropped exactly as the published fer figures were.
* ``mtcnn``: MTCNN from the ``facenet-pytorch`` wheel, which ships its weights (2 MB);
  loaded with ``torch.load(weights_only=True)`` (never unpickles code). Better on turned,
  small or poorly lit faces; ~30 ms per 640x480 frame on one core. Install it with
  ``pip install --no-deps facenet-pytorch`` (its wheel pins an old torch; the detector
  needs only torch, torchvision and Pillow, which ttaperso already requires).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..errors import ConfigError
from ..streams import faces

__all__ = [
    "DETECTORS",
    "Box",
    "Detection",
    "FaceDetector",
    "HaarDetector",
    "MTCNNDetector",
    "make_detector",
    "mtcnn_available",
]

#: ``(x, y, w, h)`` in pixels
Box = tuple[int, int, int, int]

#: names accepted by :func:`make_detector`
DETECTORS = ("haar", "mtcnn")


@dataclass(frozen=True)
class Detection:
    """A face found in a frame: its box and the detector's confidence (1.0 for Haar)."""

    box: Box
    score: float = 1.0


class FaceDetector(Protocol):
    """Finds faces in one BGR frame, optionally inside ``roi`` and within a size range."""

    name: str
    #: smallest face side (pixels) a full-frame search looks for
    min_size: int

    def detect(
        self,
        image: np.ndarray,
        gray: np.ndarray,
        roi: Box | None = None,
        size_range: tuple[int, int] | None = None,
    ) -> list[Detection]: ...


def _window(shape: tuple[int, ...], roi: Box | None) -> tuple[int, int, int, int]:
    """``roi`` clipped to the frame as ``(x0, y0, x1, y1)``; the whole frame for None."""
    h, w = shape[:2]
    if roi is None:
        return 0, 0, w, h
    x, y, bw, bh = roi
    return max(0, x), max(0, y), min(w, x + bw), min(h, y + bh)


class HaarDetector:
    """fer's Haar cascade (see :func:`ttaperso.streams.faces.detect_faces_like_fer`)."""

    name = "haar"

    def __init__(self, min_size: int = 50) -> None:
        self.min_size = int(min_size)

    def detect(
        self,
        image: np.ndarray,
        gray: np.ndarray,
        roi: Box | None = None,
        size_range: tuple[int, int] | None = None,
    ) -> list[Detection]:
        x0, y0, x1, y1 = _window(gray.shape, roi)
        lo, hi = size_range if size_range is not None else (self.min_size, 0)
        lo = max(self.min_size, lo)
        if x1 - x0 < lo or y1 - y0 < lo:
            return []
        boxes = faces.detect_faces_like_fer(
            np.ascontiguousarray(gray[y0:y1, x0:x1]), min_size=lo, max_size=hi or None
        )
        return [Detection((bx + x0, by + y0, bw, bh)) for bx, by, bw, bh in boxes]


def mtcnn_available() -> bool:
    """Whether the ``facenet-pytorch`` package (MTCNN and its weights) is installed."""
    return importlib.util.find_spec("facenet_pytorch") is not None


class MTCNNDetector:
    """MTCNN (facenet-pytorch's port and shipped weights), on the CPU.

    Args:
        min_size: smallest face side searched in a full frame (MTCNN's ``minsize``).
        thresholds: the three stages' face-probability thresholds (facenet's defaults).
        min_score: detections below this final probability are dropped.
    """

    name = "mtcnn"

    def __init__(
        self,
        min_size: int = 40,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        min_score: float = 0.9,
    ) -> None:
        if not mtcnn_available():
            raise ConfigError(
                "The MTCNN face detector needs the facenet-pytorch package: "
                "pip install --no-deps facenet-pytorch (or use the default Haar detector)"
            )
        import importlib.resources

        import torch
        from facenet_pytorch.models.mtcnn import ONet, PNet, RNet
        from facenet_pytorch.models.utils.detect_face import detect_face

        data = importlib.resources.files("facenet_pytorch") / "data"
        nets = []
        for cls, stem in ((PNet, "pnet"), (RNet, "rnet"), (ONet, "onet")):
            net = cls(pretrained=False)  # built empty: the weights are loaded safely below
            with importlib.resources.as_file(data / f"{stem}.pt") as path:
                net.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))
            net.eval()
            nets.append(net)
        self._nets: list[Any] = nets
        self._detect_face = detect_face
        self._torch = torch
        self.min_size = int(min_size)
        self.thresholds = list(thresholds)
        self.min_score = float(min_score)

    def detect(
        self,
        image: np.ndarray,
        gray: np.ndarray,
        roi: Box | None = None,
        size_range: tuple[int, int] | None = None,
    ) -> list[Detection]:
        x0, y0, x1, y1 = _window(image.shape, roi)
        lo = self.min_size if size_range is None else max(12, min(size_range[0], self.min_size))
        if x1 - x0 < lo or y1 - y0 < lo:
            return []
        rgb = np.ascontiguousarray(image[y0:y1, x0:x1, ::-1])
        with self._torch.no_grad():
            boxes, probs = self._detect_face(
                rgb[None], lo, *self._nets, self.thresholds, 0.709, self._torch.device("cpu")
            )[:2]
        out = []
        for row in np.asarray(boxes[0]) if len(boxes) and boxes[0] is not None else []:
            bx0, by0, bx1, by1, score = (float(v) for v in row[:5])
            if score < self.min_score:
                continue
            box = (
                int(round(bx0)) + x0,
                int(round(by0)) + y0,
                int(round(bx1 - bx0)),
                int(round(by1 - by0)),
            )
            if size_range is not None and size_range[1] and max(box[2:]) > size_range[1]:
                continue
            if box[2] > 0 and box[3] > 0:
                out.append(Detection(box, score))
        return out


def make_detector(name: str) -> HaarDetector | MTCNNDetector:
    """The detector called ``name`` (one of :data:`DETECTORS`)."""
    if name == "haar":
        return HaarDetector()
    if name == "mtcnn":
        return MTCNNDetector()
    raise ConfigError(f"Unknown face detector {name!r}; available: {', '.join(DETECTORS)}")
