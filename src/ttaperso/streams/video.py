"""Readers for video files (OpenCV ``VideoCapture``): one video -> one subject's stream.

:func:`read_video` returns the whole stream of face crops (64 x 64 each: ~4 KB per frame,
the decoded frames themselves are never kept); :func:`iter_video` yields it in chunks of
``chunk`` frames, for videos whose crops should not all be in memory at once (the
``ttaperso run`` command and :func:`ttaperso.run_video` stream frame by frame too).

Every frame is decoded, the face detected with fer's Haar detector and cropped like fer;
a frame where detection fails keeps the last detected box (frames before the first
detection use the first one), see :func:`ttaperso.streams.faces.crop_sequence_like_fer`. A video
without any detected face, an unopenable file or one that decodes to no frame raises an
:class:`~ttaperso.errors.InputError` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, InputError
from .faces import crop_sequence_like_fer
from .frames import Crop, check_crop, resize_gray, stack_faces
from .types import UNLABELLED, SubjectStream

__all__ = ["iter_video", "read_video"]


def _frames(path: Path, every: int, max_frames: int | None) -> Iterator[np.ndarray]:
    import cv2

    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise InputError(f"{path}: OpenCV cannot open this video file")
        index = kept = 0
        while max_frames is None or kept < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            if index % every == 0:
                kept += 1
                yield frame
            index += 1
    finally:
        capture.release()


def read_video(
    path: str | os.PathLike[str],
    subject: str,
    *,
    sequence: str | None = None,
    label: str | None = None,
    label_names: Sequence[str] | None = None,
    every: int = 1,
    max_frames: int | None = None,
    crop: Crop = "fer",
    size: int | None = 64,
) -> SubjectStream:
    """Decode a video into a subject stream of face crops.

    Args:
        path: the video file (any format the installed OpenCV decodes).
        subject: the subject id of the stream.
        sequence: the frames' sequence id (default: the file name).
        label: one label for every frame (e.g. a posed-expression clip); default unlabelled.
        label_names: the class names ``label`` indexes into (default: ``(label,)``); a label
            outside them raises, naming the file.
        every: keep every ``every``-th frame (1: all).
        max_frames: stop after this many kept frames.
        crop: ``"fer"`` (detect and crop each frame) or ``"none"`` (the frames are face crops).
        size: side of the crops.
    """
    check_crop(crop, size)
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ConfigError(f"Expected argument `every` to be a positive int but got {every!r}")
    if max_frames is not None and (not isinstance(max_frames, int) or max_frames < 1):
        raise ConfigError(
            f"Expected argument `max_frames` to be a positive int or None but got {max_frames!r}"
        )
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{file}: no such video file")
    names = tuple(label_names) if label_names is not None else ((label,) if label else ())
    if label is not None and label not in names:
        raise InputError(f"{file}: label {label!r} is not one of {names}")
    frames = _frames(file, every, max_frames)
    if crop == "fer":
        faces, detected = crop_sequence_like_fer(
            frames, size or 64, name=str(file), channel_order="bgr"
        )
    else:
        import cv2

        faces = [resize_gray(cv2.cvtColor(f, cv2.COLOR_BGR2GRAY), size) for f in frames]
        detected = [True] * len(faces)
        if not faces:
            raise InputError(f"{file}: the video decodes to no frames")
    count = len(faces)
    sources = tuple(f"{file}#{i * every}" for i in range(count))
    label_index = UNLABELLED if label is None else names.index(label)
    return SubjectStream(
        subject=subject,
        images=stack_faces(faces, sources),
        labels=torch.full((count,), label_index, dtype=torch.long),
        label_names=names,
        sequences=(sequence if sequence is not None else file.name,) * count,
        sources=sources,
        # Which frames had their own detection (False: the crop box was carried over).
        extras={"face_detected": torch.tensor(detected, dtype=torch.bool)},
    )


def iter_video(
    path: str | os.PathLike[str],
    subject: str,
    *,
    chunk: int = 256,
    every: int = 1,
    max_frames: int | None = None,
    size: int = 64,
    lookahead: int = 250,
) -> Iterator[SubjectStream]:
    """Decode a video into consecutive :class:`SubjectStream` chunks of face crops.

    The same crops as ``read_video(path, subject, crop="fer", every=..., size=...)``
    (fer's detection and crop per frame, carried over frames without a detection),
    ``chunk`` frames at a time, so memory stays bounded whatever the video's length.
    Frames before the first detection are held (gray, at most ``lookahead`` of them)
    until a face is found and are then cropped with its box.

    Raises:
        InputError: the file cannot be opened or decodes to no frame, or no face is found
            within the first ``lookahead`` frames (or in the whole video).
    """
    from .faces import _to_gray, crop_box_like_fer, largest_face_like_fer

    for name, value in (
        ("chunk", chunk),
        ("every", every),
        ("lookahead", lookahead),
        ("size", size),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"Expected argument `{name}` to be a positive int but got {value!r}")
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{file}: no such video file")
    crops: list[np.ndarray] = []
    detected: list[bool] = []
    first = 0  # index (in kept frames) of the first frame of the current chunk
    pending: list[np.ndarray] = []
    box: tuple[int, int, int, int] | None = None
    count = 0

    def emit(n: int) -> SubjectStream:
        nonlocal first
        faces, flags = crops[:n], detected[:n]
        del crops[:n], detected[:n]
        sources = tuple(f"{file}#{(first + i) * every}" for i in range(n))
        first += n
        return SubjectStream(
            subject=subject,
            images=stack_faces(faces, sources),
            labels=torch.full((n,), UNLABELLED, dtype=torch.long),
            label_names=(),
            sequences=(file.name,) * n,
            sources=sources,
            extras={"face_detected": torch.tensor(flags, dtype=torch.bool)},
        )

    def crop(gray: np.ndarray, use: tuple[int, int, int, int]) -> np.ndarray:
        face = crop_box_like_fer(gray, use, size)
        if face is None:
            raise InputError(f"{file}: face box {use} lies outside a {gray.shape} frame")
        return face

    for frame in _frames(file, every, max_frames):
        count += 1
        gray = _to_gray(frame, "bgr")
        found = largest_face_like_fer(gray)
        if found is not None and box is None:
            for earlier in pending:  # the first detection also crops the frames before it
                crops.append(crop(earlier, found))
                detected.append(False)
            pending.clear()
        if found is None and box is None:
            if len(pending) >= lookahead:
                raise InputError(f"{file}: no face found in its first {lookahead} frames")
            pending.append(gray)
            continue
        box = found if found is not None else box
        assert box is not None
        crops.append(crop(gray, box))
        detected.append(found is not None)
        while len(crops) >= chunk:
            yield emit(chunk)
    if count == 0:
        raise InputError(f"{file}: the video decodes to no frames")
    if box is None:
        raise InputError(f"{file}: no face found in any of its {count} frames")
    if crops:
        yield emit(len(crops))
