"""Personalize videos, image folders, cameras and streams frame by frame.

    for result in ttaperso.run_video("interview.mp4", subject="patient-017"):
        for face in result.faces:
            print(result.index, face.subject, face.label, face.confidence)

Modules: :mod:`~ttaperso.video.sources` (streaming frame sources), :mod:`~ttaperso.video.detection`
(Haar / MTCNN face detectors), :mod:`~ttaperso.video.tracking` (one subject id per face),
:mod:`~ttaperso.video.session` (:class:`Session`, :func:`run_video`),
:mod:`~ttaperso.video.writers` (CSV/JSONL, annotated MP4, timeline PNG) and
:mod:`~ttaperso.video.command` (``ttaperso run``). See ``docs/run.md``.
"""

from __future__ import annotations

from .detection import (
    DETECTORS,
    Detection,
    FaceDetector,
    HaarDetector,
    MTCNNDetector,
    make_detector,
)
from .session import FaceResult, FrameResult, NoFaceError, Session, run_video
from .sources import CaptureSource, Frame, FrameSource, ImageFolderSource, open_source
from .tracking import FaceTracker, Track

__all__ = [
    "DETECTORS",
    "CaptureSource",
    "Detection",
    "FaceDetector",
    "FaceResult",
    "FaceTracker",
    "Frame",
    "FrameResult",
    "FrameSource",
    "HaarDetector",
    "ImageFolderSource",
    "MTCNNDetector",
    "NoFaceError",
    "Session",
    "Track",
    "make_detector",
    "open_source",
    "run_video",
]
