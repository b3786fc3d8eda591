"""Personalize a video frame by frame: find faces, follow them, predict and adapt per subject.

:class:`Session` turns one :class:`~ttaperso.video.sources.Frame` at a time into a
:class:`FrameResult` (one :class:`FaceResult` per tracked face), holding nothing but the
current frame, the live tracks and each subject's small state, so memory does not grow
with the video's length. :func:`run_video` wraps it as an iterator over a whole source.

Per frame:

1. **find faces**: a full-frame search every ``scan_every`` frames (and on every frame
   while no face is tracked); in between, a search only around each tracked face, over
   a narrow size range (a fraction of the cost);
2. **follow them**: :class:`~ttaperso.video.tracking.FaceTracker` keeps one subject id
   per face through short misses;
3. **crop** each detected face as the fer package does
   (:func:`ttaperso.streams.faces.crop_box_like_fer`: squared, widened by 10 px,
   mean-grey padded, 64 x 64 gray) and **predict** them, ``batch`` frames at a time (8
   by default), every face of those frames in one
   :meth:`~ttaperso.Personalizer.predict_many` call, which adapts each subject's state;
4. a face carried over a miss (no detection this frame) is reported with its last box
   and its subject's last probabilities, ``face_found=False``, and adapts nothing: a
   frame without a face never changes a state;
5. with ``calibrate_neutral=S``, a new subject's first ``S`` seconds are predicted by the
   frozen model and then used as its neutral baseline
   (:meth:`~ttaperso.Personalizer.calibrate`) before it adapts.

No face at all for ``no_face_timeout`` seconds raises :class:`NoFaceError`: a camera
pointed at a wall or a video of something else stops with a clear message instead of
running for hours; states adapted so far are intact (saving them is the caller's choice,
:func:`run_video` and ``ttaperso run`` save them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, InputError
from ..model import FERModel
from ..personalizer import Personalizer
from ..personalizer.personalizer import DEFAULT_STRATEGY
from ..streams.faces import crop_box_like_fer
from .detection import Box, Detection, FaceDetector, make_detector
from .sources import Frame, FrameSource, open_source
from .tracking import FaceTracker, Track, iou

__all__ = [
    "CROP_SIZE",
    "FaceResult",
    "FrameResult",
    "NoFaceError",
    "Session",
    "run_video",
]

#: side of the face crops (fer's crop size; models resize it in ``prepare``)
CROP_SIZE = 64
#: most neutral-calibration crops kept per subject (a cap on memory for long windows)
MAX_CALIBRATION_FRAMES = 512


class NoFaceError(InputError):
    """No face was found for longer than the session's ``no_face_timeout``.

    ``results``: the frames completed before it (so that nothing already seen is lost).
    """

    results: list[FrameResult] = []  # noqa: RUF012 - replaced per instance by Session.push


@dataclass(frozen=True)
class FaceResult:
    """One face in one frame.

    Attributes:
        subject: the subject id its state is kept under.
        box: ``(x, y, w, h)`` in frame pixels.
        face_found: whether the detector found it in this frame (False: carried over a
            short miss; then nothing was adapted and ``probs`` are the subject's last).
        label: the predicted class name ("" when the subject has no prediction yet).
        probs: class probabilities in the model's label order (empty when none yet).
        updated: whether this frame adapted the subject's state.
        calibrating: whether the frame is in the subject's neutral-calibration window.
    """

    subject: str
    box: Box
    face_found: bool
    label: str
    probs: tuple[float, ...]
    updated: bool
    calibrating: bool = False

    @property
    def confidence(self) -> float:
        """Probability of the predicted class (0 when there is no prediction)."""
        return max(self.probs, default=0.0)


@dataclass(frozen=True)
class FrameResult:
    """What the session made of one frame: its faces (possibly none) and the frame itself."""

    index: int
    time: float
    faces: tuple[FaceResult, ...]
    image: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class _PendingFace:
    subject: str
    box: Box
    crop: np.ndarray | None  # None: carried over (not detected this frame)
    calibrating: bool


@dataclass(frozen=True)
class _Pending:
    frame: Frame
    faces: list[_PendingFace]


@dataclass
class _Calibration:
    crops: list[np.ndarray] = field(default_factory=list)
    done: bool = False


class Session:
    """Per-frame face finding, tracking and personalization (see the module docstring).

    Args:
        personalizer: the Personalizer whose subjects are the faces.
        detector: ``"haar"`` (fer's cascade), ``"mtcnn"``, or a detector object.
        subject: the one person's id when the video shows one person (the largest face
            of each frame is that subject); None tracks every face as ``face-1``, ...
        calibrate_neutral: seconds of each new subject's first appearance used as its
            neutral baseline (0: none).
        scan_every: frames between full-frame searches while faces are tracked.
        max_missed_s: seconds a track survives without a detection (reported with its
            last box, ``face_found=False``).
        forget_after_s: seconds after that during which a detection near the lost
            track gets its id back (a face missed for a moment keeps its subject).
        no_face_timeout: seconds without any face before :class:`NoFaceError` (0: never).
        threads: torch threads while a frame is processed (restored after each frame);
            1 by default: a frame's few face crops are tiny batches, for which more
            threads cost more than they save (10-60x slower on a busy 2-core machine).
            None leaves torch's setting alone.
        batch: frames predicted per call (1: each frame at once). Batching divides the
            model's per-call cost (a batch-1 forward of the fer model costs nearly what a
            batch-8 one does) at the price of up to ``batch - 1`` frames of latency; the
            default 8 is the demo's and the studies' video batch. Faces are found and
            followed frame by frame either way.
    """

    def __init__(
        self,
        personalizer: Personalizer,
        *,
        detector: str | FaceDetector = "haar",
        subject: str | None = None,
        calibrate_neutral: float = 0.0,
        scan_every: int = 5,
        max_missed_s: float = 0.5,
        forget_after_s: float = 10.0,
        no_face_timeout: float = 10.0,
        threads: int | None = 1,
        batch: int = 8,
    ) -> None:
        if not isinstance(personalizer, Personalizer):
            raise ConfigError(f"Expected a Personalizer but got {type(personalizer).__name__}")
        for name, value in (
            ("calibrate_neutral", calibrate_neutral),
            ("max_missed_s", max_missed_s),
            ("forget_after_s", forget_after_s),
            ("no_face_timeout", no_face_timeout),
        ):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(
                    f"Expected {name} to be a number of seconds >= 0 but got {value!r}"
                )
        if not isinstance(scan_every, int) or isinstance(scan_every, bool) or scan_every < 1:
            raise ConfigError(
                f"Expected scan_every to be a positive number of frames but got {scan_every!r}"
            )
        if subject is not None:
            from ..validation import validate_subject

            validate_subject(subject)
        self.personalizer = personalizer
        self.detector: FaceDetector = (
            make_detector(detector) if isinstance(detector, str) else detector
        )
        self.subject = subject
        self.calibrate_neutral = float(calibrate_neutral)
        self.scan_every = scan_every
        self.max_missed_s = float(max_missed_s)
        self.forget_after_s = float(forget_after_s)
        self.no_face_timeout = float(no_face_timeout)
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"Expected threads to be a positive int or None but got {threads!r}")
        self.threads = threads
        if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= 256:
            raise ConfigError(
                f"Expected batch to be a number of frames from 1 to 256 but got {batch!r}"
            )
        self.batch = batch
        self._pending: list[_Pending] = []
        self.tracker: FaceTracker | None = None
        self._last_scan = -(10**9)
        self._last_face_time: float | None = None
        self._last: dict[str, tuple[str, tuple[float, ...]]] = {}
        self._calibration: dict[str, _Calibration] = {}
        #: subjects seen in this session, in order of first appearance
        self.subjects: list[str] = []

    # ------------------------------------------------------------------ per frame
    def start(self, fps: float) -> None:
        """Reset the tracker for a new source at ``fps`` frames per second."""
        self.tracker = FaceTracker(
            max_missed=max(0, int(round(self.max_missed_s * fps))),
            forget_after=max(0, int(round(self.forget_after_s * fps))),
            single_subject=self.subject,
        )
        self._last_scan = -(10**9)
        self._last_face_time = None
        self._pending = []

    def process(self, frame: Frame) -> FrameResult:
        """Find, follow, crop, predict and adapt the faces of one frame, now (no batching)."""
        if self._pending:
            raise ConfigError(
                f"{len(self._pending)} pushed frame(s) are pending: call flush() before process()"
            )
        (result,) = self.push(frame) + self.flush()
        return result

    def push(self, frame: Frame) -> list[FrameResult]:
        """Add one frame; return the results that are complete (in frame order).

        Faces are found and followed at once; predictions run when ``batch`` frames are
        pending (one :meth:`~ttaperso.Personalizer.predict_many` call for all of them), so
        results come out up to ``batch - 1`` frames late. :meth:`flush` completes the rest.

        Raises:
            NoFaceError: no face for ``no_face_timeout`` seconds; its ``results`` attribute
                holds the frames completed before it.
        """
        with self._threads():
            self._pending.append(self._observe(frame))
            if self._timed_out(frame):
                error = NoFaceError(
                    f"{frame.name}: no face found for {frame.time - self._last_face_time:.1f} s "  # type: ignore[operator]
                    f"(since {self._last_face_time:.1f} s); is a face in view, large enough "
                    f"(>= {self.detector.min_size} px) and lit? (or try the MTCNN detector)"
                )
                error.results = self._predict_pending()
                raise error
            if len(self._pending) >= self.batch:
                return self._predict_pending()
            return []

    def flush(self) -> list[FrameResult]:
        """Predict every pending frame; return their results in frame order."""
        with self._threads():
            return self._predict_pending()

    @contextmanager
    def _threads(self) -> Iterator[None]:
        if self.threads is None:
            yield
            return
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def _timed_out(self, frame: Frame) -> bool:
        return bool(
            self.no_face_timeout
            and self._last_face_time is not None
            and frame.time - self._last_face_time >= self.no_face_timeout
        )

    def _observe(self, frame: Frame) -> _Pending:
        """Find and follow the frame's faces, crop the detected ones (nothing predicted yet)."""
        if self.tracker is None:
            self.start(25.0)
        assert self.tracker is not None  # for type checkers; set just above
        gray = _gray(frame.image)
        detections = self._find(frame, gray)
        tracks = self.tracker.update(detections, frame.time)
        if detections or self._last_face_time is None:
            self._last_face_time = frame.time  # the timeout counts from the first frame
        faces = []
        for track in tracks:
            if track.subject not in self.subjects:
                self.subjects.append(track.subject)
            crop = crop_box_like_fer(gray, track.box, CROP_SIZE) if track.detected else None
            if crop is None:  # not detected, or the widened box lies outside the frame
                faces.append(_PendingFace(track.subject, track.box, None, False))
            else:
                calibrating = self._calibrating(track, frame.time, crop)
                faces.append(_PendingFace(track.subject, track.box, crop, calibrating))
        return _Pending(frame, faces)

    def _find(self, frame: Frame, gray: np.ndarray) -> list[Detection]:
        assert self.tracker is not None
        tracks = self.tracker.tracks
        if not tracks or frame.index - self._last_scan >= self.scan_every:
            self._last_scan = frame.index
            return self.detector.detect(frame.image, gray)
        found: list[Detection] = []
        for track in tracks:
            x, y, w, h = track.box
            side = max(w, h)
            # the face moved at most half its size since it was last seen
            roi = (x - side // 2, y - side // 2, w + side, h + side)
            size_range = (max(1, int(side * 0.7)), int(side * 1.5) + 1)
            for det in self.detector.detect(frame.image, gray, roi, size_range):
                if all(iou(det.box, other.box) < 0.5 for other in found):
                    found.append(det)
        return found

    def _predict_pending(self) -> list[FrameResult]:
        """One predict_many for the pending frames' adapting crops, one frozen forward for
        the calibrating ones; then the results, frame by frame."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        p = self.personalizer
        adapt: dict[str, list[np.ndarray]] = {}
        frozen: list[np.ndarray] = []
        for entry in pending:
            for face in entry.faces:
                if face.crop is not None:
                    (frozen if face.calibrating else adapt.setdefault(face.subject, [])).append(
                        face.crop
                    )
        # uint8 (k, 1, 64, 64): raw pixels, prepared by the model inside predict
        outputs = (
            p.predict_many({s: torch.from_numpy(np.stack(c))[:, None] for s, c in adapt.items()})
            if adapt
            else {}
        )
        frozen_probs = None
        if frozen:
            with torch.no_grad():
                logits = p.predict_frozen(torch.from_numpy(np.stack(frozen))[:, None])
            frozen_probs = torch.softmax(logits, dim=1)
        seen = dict.fromkeys(outputs, 0)
        frozen_seen = 0
        results = []
        for entry in pending:
            faces = []
            for face in entry.faces:
                s = face.subject
                if face.crop is None:  # carried over a miss: the subject's last output
                    label, probs = self._last.get(s, ("", ()))
                    faces.append(FaceResult(s, face.box, False, label, probs, False))
                    continue
                if face.calibrating:
                    assert frozen_probs is not None
                    row, updated = frozen_probs[frozen_seen], False
                    frozen_seen += 1
                else:
                    i = seen[s]
                    seen[s] += 1
                    row, updated = outputs[s].probs[i], bool(outputs[s].updated[i])
                probs = tuple(float(v) for v in row.tolist())
                label = p.labels[int(np.argmax(probs))]
                self._last[s] = (label, probs)
                faces.append(FaceResult(s, face.box, True, label, probs, updated, face.calibrating))
            frame = entry.frame
            results.append(FrameResult(frame.index, frame.time, tuple(faces), frame.image))
        return results

    def _calibrating(self, track: Track, t: float, crop: np.ndarray) -> bool:
        """Whether ``track``'s frame goes into its neutral baseline (calibrating at its end)."""
        if not self.calibrate_neutral:
            return False
        record = self._calibration.setdefault(track.subject, _Calibration())
        if record.done:
            return False
        if t - track.first_time < self.calibrate_neutral:
            if len(record.crops) < MAX_CALIBRATION_FRAMES:
                record.crops.append(crop)
            return True
        record.done = True
        if record.crops:
            neutral = torch.from_numpy(np.stack(record.crops))[:, None]
            labels = [name.lower() for name in self.personalizer.labels]
            self.personalizer.calibrate(
                track.subject, neutral, neutral_label="neutral" if "neutral" in labels else None
            )
        record.crops.clear()
        return False

    # ----------------------------------------------------------------- per source
    def run(self, source: FrameSource) -> Iterator[FrameResult]:
        """Process every frame of ``source`` in order (the source is not closed)."""
        self.start(source.fps)
        for frame in source:
            yield from self.push(frame)
        yield from self.flush()


def _gray(image: np.ndarray) -> np.ndarray:
    import cv2

    if image.ndim == 2:
        return image
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def run_video(
    source: str | int | os.PathLike[str] | FrameSource,
    model: str | FERModel | Personalizer = "fer-mini-xception",
    strategy: str | Any = DEFAULT_STRATEGY,
    *,
    states: str | os.PathLike[str] | None = None,
    subject: str | None = None,
    detector: str | FaceDetector = "haar",
    calibrate_neutral: float = 0.0,
    fps: float | None = None,
    session_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> Iterator[FrameResult]:
    """Personalize a video, image folder, camera or stream; yield one result per frame.

    Frames are decoded, searched, cropped and predicted one at a time (nothing is
    decoded ahead), so a long video or a camera runs in constant memory. Each face's
    subject state adapts as it goes.

    Args:
        source: a video file, image folder, camera index, stream URL (see
            :func:`~ttaperso.video.sources.open_source`) or an opened source.
        model: a registered model name (:func:`ttaperso.list_models`), a FERModel, or a
            ready :class:`~ttaperso.Personalizer` (then ``strategy`` and ``options`` are
            not used).
        strategy: strategy name or config (default :data:`ttaperso.DEFAULT_STRATEGY`).
        states: folder of saved subject states: loaded first when it exists, and saved
            when the iteration ends (normally, by an error, or by ``close()``).
        subject: the one person's id for a one-person video (else ``face-1``, ...).
        detector: ``"haar"`` (default, fer's) or ``"mtcnn"``.
        calibrate_neutral: seconds of each subject's first appearance used as its neutral
            baseline.
        fps: frame rate of an image folder (default 25).
        session_options: further :class:`Session` arguments (``scan_every``, ...).
        **options: strategy config overrides (``lr=1e-4``, ...).

    Example::

        for result in ttaperso.run_video("clip.mp4", subject="patient-017"):
            for face in result.faces:
                print(result.index, face.subject, face.label, face.confidence)
    """
    if isinstance(model, Personalizer):
        if options:
            raise ConfigError(
                f"Strategy options {sorted(options)} cannot be applied to a ready Personalizer"
            )
        p = model
    else:
        from ..models import load_model

        fer_model = load_model(model) if isinstance(model, str) else model
        p = Personalizer(fer_model, strategy, **options)
    opened = open_source(source, fps=fps) if not hasattr(source, "fps") else source
    folder = Path(states) if states is not None else None
    return _run(
        p, opened, folder, subject, detector, calibrate_neutral, dict(session_options or {})
    )


def _run(
    p: Personalizer,
    source: Any,
    states: Path | None,
    subject: str | None,
    detector: str | FaceDetector,
    calibrate_neutral: float,
    session_options: dict[str, Any],
) -> Iterator[FrameResult]:
    try:
        if states is not None and states.is_dir() and any(states.iterdir()):
            p.load(states)
        session = Session(
            p,
            detector=detector,
            subject=subject,
            calibrate_neutral=calibrate_neutral,
            **session_options,
        )
        try:
            yield from session.run(source)
        finally:
            # only this run's subjects: resumed states it never touched stay as they were
            touched = [s for s in session.subjects if s in p.subjects]
            if states is not None and touched:
                p.save(states, touched)
    finally:
        source.close()
