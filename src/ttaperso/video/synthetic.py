"""Test videos made on the spot: SynthFace faces composited into full-size frames.

:func:`write_synthface_video` writes an MP4 (or AVI) of one or more SynthFace people, each
a gray face in its own place of a 640 x 480 frame, drifting slowly, showing expression
clips, with the true label of every frame and face. Nothing is downloaded; the same
arguments give the same video. Frames are rendered and encoded a segment (about ten
seconds) at a time, so a ten-minute video never sits in memory.

Used by the README's first example, the tests of ``ttaperso run`` (one- and two-face
videos) and ``experiments/run_speed.py``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError

__all__ = ["SyntheticVideo", "identity_consistency", "write_synthface_video"]


@dataclass(frozen=True)
class SyntheticVideo:
    """What :func:`write_synthface_video` wrote.

    Attributes:
        path: the video file.
        frames: number of frames.
        fps: frame rate.
        labels: ``(frames, faces)`` true expression index per frame and face (SynthFace's
            FER2013-order :data:`~ttaperso.synthface.EXPRESSIONS`).
        boxes: ``(faces, 4)`` where each face's square sits in the first frame ``(x, y, w, h)``.
        centres: ``(frames, faces, 2)`` the centre of each face's square per frame.
    """

    path: Path
    frames: int
    fps: float
    labels: np.ndarray
    boxes: np.ndarray
    centres: np.ndarray


def _layout(faces: int, width: int, height: int, face: int) -> list[tuple[int, int]]:
    """Top-left corners of ``faces`` squares spread over the frame's width."""
    gap = width / faces
    y = (height - face) // 2
    return [(int(gap * (i + 0.5) - face / 2), y) for i in range(faces)]


def write_synthface_video(
    path: str | os.PathLike[str],
    *,
    seconds: float = 10.0,
    faces: int = 1,
    fps: float = 25.0,
    size: tuple[int, int] = (640, 480),
    face_size: int = 160,
    seed: int = 0,
    drift: float = 12.0,
    shifted: bool = False,
) -> SyntheticVideo:
    """Write a video of ``faces`` SynthFace people; return where and the true labels.

    Args:
        path: output file (``.mp4``: OpenCV's ``mp4v`` codec; ``.avi``: ``MJPG``).
        seconds: duration.
        faces: people side by side (each keeps its place, drifting by ``drift`` px).
        fps: frame rate.
        size: frame ``(width, height)``.
        face_size: side of each face's square in pixels.
        seed: the SynthFace population (people ``0 .. faces - 1`` of its target split).
        shifted: give the recordings SynthFace's capture shifts (lighting, noise, blur,
            occluders), which also make faces harder to detect.
    """
    import cv2
    import torch

    from ..synthface import SynthFace

    width, height = size
    if faces < 1 or faces * face_size > width or face_size + 2 * drift > height:
        raise ConfigError(
            f"{faces} face(s) of {face_size} px (drift {drift}) do not fit a {width}x{height} frame"
        )
    if seconds <= 0 or fps <= 0:
        raise ConfigError(
            f"Expected a positive duration and frame rate but got {seconds!r}, {fps!r}"
        )
    total = int(round(seconds * fps))
    out = Path(path)
    fourcc = cv2.VideoWriter.fourcc(*("MJPG" if out.suffix.lower() == ".avi" else "mp4v"))
    writer = cv2.VideoWriter(str(out), fourcc, float(fps), (width, height), False)
    if not writer.isOpened():
        raise InputError(f"{out}: OpenCV cannot write a video file here")
    people = SynthFace(seed, size=face_size).sample_subjects(faces, "target")
    corners = _layout(faces, width, height, face_size)
    yy, xx = np.mgrid[0:height, 0:width]
    background = (70 + 40 * xx / width + 20 * yy / height).astype(np.uint8)  # a lit wall
    labels = np.zeros((total, faces), dtype=np.int64)
    centres = np.zeros((total, faces, 2), dtype=np.float32)
    written, segment = 0, 0
    try:
        while written < total:
            # One segment: each person's next recording session (about 10 s of clips).
            sf = SynthFace(seed + 1000 * (segment + 1), size=face_size)
            clips = [
                sf.subject_stream(person, sessions=1, shifted=shifted, frames_per_clip=(24, 48))
                for person in people
            ]
            n = min(min(len(c) for c in clips), total - written)
            pixels = [(c.images[:n, 0] * 255).round().to(torch.uint8).numpy() for c in clips]
            for t in range(n):
                frame = background.copy()
                k = written + t
                for i, ((x0, y0), face) in enumerate(zip(corners, pixels, strict=True)):
                    # slow, smooth drift so that the tracker has something to follow
                    dx = int(round(drift * np.sin(2 * np.pi * k / (fps * 7.0) + i)))
                    dy = int(round(drift * 0.5 * np.cos(2 * np.pi * k / (fps * 5.0) + i)))
                    x, y = x0 + dx, y0 + dy
                    frame[y : y + face_size, x : x + face_size] = face[t]
                    labels[k, i] = int(clips[i].labels[t])
                    centres[k, i] = (x + face_size / 2, y + face_size / 2)
                writer.write(frame)
            written += n
            segment += 1
    finally:
        writer.release()
    boxes = np.array([(x, y, face_size, face_size) for x, y in corners], dtype=np.int64)
    return SyntheticVideo(out, total, float(fps), labels, boxes, centres)


def identity_consistency(
    video: SyntheticVideo, rows: Iterable[tuple[int, str, tuple[int, int, int, int]]]
) -> dict[str, Any]:
    """How well subject ids follow the people of a synthetic video.

    Args:
        video: what :func:`write_synthface_video` returned.
        rows: ``(frame, subject, (x, y, w, h))`` for every reported face (e.g. from
            ``predictions.csv``).

    Returns:
        ``per_person``: for each person, its majority subject id and the fraction of *all*
        the video's frames in which a face reported under that id sits on the person
        (frames where the person is missed or carries another id count as failures);
        ``distinct``: whether the people's majority ids all differ; ``min``: the worst
        person's fraction.
    """
    face = float(video.boxes[0, 2])
    seen: list[list[str | None]] = [[None] * video.frames for _ in range(video.boxes.shape[0])]
    for frame, subject, (x, y, w, h) in rows:
        if not subject or not 0 <= frame < video.frames:
            continue
        cx, cy = x + w / 2, y + h / 2
        dist = np.hypot(video.centres[frame, :, 0] - cx, video.centres[frame, :, 1] - cy)
        person = int(np.argmin(dist))
        if dist[person] <= face / 2:
            seen[person][frame] = subject
    per_person: list[dict[str, Any]] = []
    for ids in seen:
        counts = Counter(i for i in ids if i is not None)
        majority_id, hits = counts.most_common(1)[0] if counts else ("", 0)
        per_person.append({"subject": majority_id or None, "fraction": hits / video.frames})
    majority = [p["subject"] for p in per_person]
    return {
        "per_person": per_person,
        "distinct": None not in majority and len(set(majority)) == len(majority),
        "min": min(float(p["fraction"]) for p in per_person),
    }
