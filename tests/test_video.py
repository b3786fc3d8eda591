"""ttaperso.video: frame sources, detection, tracking and the Session, on videos written here.

Videos are SynthFace faces composited into small frames and written with OpenCV (real
files decoded by the real decoder); the model is the tiny test CNN, so these tests need
no weights. The ``ttaperso run`` command on the real fer model is tested in
tests/test_run_cli.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from conftest import HEAD, INPUT_SHAPE, LABELS, build_model

import ttaperso
from ttaperso.adapters.torch_classifier import TorchClassifier
from ttaperso.errors import ConfigError, InputError
from ttaperso.video import (
    Detection,
    FaceTracker,
    NoFaceError,
    Session,
    make_detector,
    open_source,
    run_video,
)
from ttaperso.video import sources as sources_module
from ttaperso.video.detection import mtcnn_available
from ttaperso.video.synthetic import identity_consistency, write_synthface_video

#: small frames keep the Haar detector fast (the speed goal is measured at 640x480 by
#: experiments/run_speed.py, not here)
FRAME = (320, 240)
FACE = 100


def _model() -> ttaperso.FERModel:
    return TorchClassifier(build_model(), LABELS, INPUT_SHAPE, head=HEAD, input_range=(-1.0, 1.0))


def _personalizer(strategy: str = "norm") -> ttaperso.Personalizer:
    return ttaperso.Personalizer(_model(), strategy)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("videos")
    one = write_synthface_video(root / "one.avi", seconds=3, size=FRAME, face_size=FACE, drift=8)
    two = write_synthface_video(
        root / "two.avi", seconds=6, faces=2, size=FRAME, face_size=FACE, drift=8, seed=3
    )
    return {"one": one, "two": two, "root": root}


# ------------------------------------------------------------------------ sources
def test_video_file_frames_stream_in_order_with_times(videos: dict[str, Any]) -> None:
    source = open_source(videos["one"].path)
    assert source.frame_count == videos["one"].frames and source.fps == 25.0
    frames = list(source)
    source.close()
    assert [f.index for f in frames] == list(range(videos["one"].frames))
    assert frames[10].time == pytest.approx(0.4)
    assert frames[0].image.shape == (FRAME[1], FRAME[0], 3) and frames[0].image.dtype == np.uint8


class _FakeCapture:
    """A camera: frames on demand, counting reads (nothing may be decoded ahead)."""

    def __init__(self, frames: int = 5) -> None:
        self.left, self.reads, self.released = frames, 0, False

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return True

    def get(self, prop: int) -> float:
        return 0.0  # cameras often report no fps or frame count

    def read(self) -> tuple[bool, np.ndarray | None]:
        self.reads += 1
        if self.left == 0:
            return False, None
        self.left -= 1
        return True, np.full((48, 64, 3), 100, np.uint8)

    def release(self) -> None:
        self.released = True


def test_camera_index_opens_a_live_capture_and_decodes_nothing_ahead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = _FakeCapture()
    opened: list[object] = []

    def opener(target: object) -> _FakeCapture:
        opened.append(target)
        return fake

    monkeypatch.setattr(sources_module, "_open_capture", opener)
    source = open_source("0")
    assert opened == [0] and source.live and source.fps == 25.0 and source.frame_count is None
    it = iter(source)
    first = next(it)
    assert fake.reads == 1 and first.index == 0 and first.time == pytest.approx(0.0, abs=0.05)
    assert len(list(it)) == 4
    source.close()
    assert fake.released


def test_stream_url_goes_to_opencv(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[object] = []

    def opener(target: object) -> _FakeCapture:
        opened.append(target)
        return _FakeCapture(1)

    monkeypatch.setattr(sources_module, "_open_capture", opener)
    source = open_source("rtsp://127.0.0.1:8554/cam")
    assert opened == ["rtsp://127.0.0.1:8554/cam"] and source.live


def test_image_folder_in_natural_order(tmp_path: Path) -> None:
    for i in (10, 2, 1):
        cv2.imwrite(str(tmp_path / f"frame{i}.png"), np.full((20, 30, 3), i, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    source = open_source(tmp_path, fps=5)
    frames = list(source)
    assert [int(f.image[0, 0, 0]) for f in frames] == [1, 2, 10]
    assert [f.time for f in frames] == [0.0, 0.2, 0.4]


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda p: p / "missing.mp4", r"missing\.mp4: no such video file or image folder"),
        (lambda p: (p / "empty").mkdir() or p / "empty", r"empty: the folder holds no images"),
        (
            lambda p: (p / "junk.mp4").write_bytes(b"not a video" * 100) and p / "junk.mp4",
            r"junk\.mp4: OpenCV (cannot open|opened the file but decoded no frame)",
        ),
    ],
    ids=["missing", "no-images", "unreadable"],
)
def test_bad_sources_are_refused_naming_them(tmp_path: Path, make: Any, pattern: str) -> None:
    with pytest.raises(InputError, match=pattern):
        source = open_source(make(tmp_path))
        list(source)


# ------------------------------------------------------------------------ tracking
def _det(x: int, y: int, side: int = 50) -> Detection:
    return Detection((x, y, side, side))


def test_tracker_keeps_ids_when_detections_come_in_any_order() -> None:
    tracker = FaceTracker(max_missed=2)
    first = tracker.update([_det(10, 10), _det(200, 10)])
    ids = {t.subject: t.box[0] for t in first}
    assert set(ids) == {"face-1", "face-2"}
    for step in range(1, 20):
        dets = [_det(200 - step, 10 + step), _det(10 + step, 10)]  # swapped order, moving
        tracks = tracker.update(dets[::-1] if step % 2 else dets)
        by_id = {t.subject: t.box[0] for t in tracks}
        assert by_id["face-1"] == 10 + step and by_id["face-2"] == 200 - step


def test_tracker_carries_a_short_miss_and_revives_a_lost_face() -> None:
    tracker = FaceTracker(max_missed=2, forget_after=10)
    tracker.update([_det(10, 10)])
    for _ in range(2):  # short miss: carried over, reported as not detected
        (track,) = tracker.update([])
        assert track.subject == "face-1" and not track.detected
    assert tracker.update([]) == []  # lost
    (back,) = tracker.update([_det(14, 12)])  # found again near where it was
    assert back.subject == "face-1" and back.detected
    (other,) = [t for t in tracker.update([_det(14, 12), _det(250, 10)]) if t.subject != "face-1"]
    assert other.subject == "face-2"


def test_tracker_forgets_after_the_revival_window() -> None:
    tracker = FaceTracker(max_missed=0, forget_after=2)
    tracker.update([_det(10, 10)])
    for _ in range(4):
        tracker.update([])
    (track,) = tracker.update([_det(10, 10)])
    assert track.subject == "face-2"  # ids are never reused


def test_single_subject_mode_follows_the_largest_face_anywhere() -> None:
    tracker = FaceTracker(max_missed=1, single_subject="anna")
    tracker.update([_det(10, 10, 40), _det(200, 10, 80)])
    (track,) = tracker.tracks
    assert track.subject == "anna" and track.box[0] == 200
    tracker.update([])
    tracker.update([])  # lost ...
    (again,) = tracker.update([_det(5, 5, 60)])  # ... the same person when seen again
    assert again.subject == "anna"


# ------------------------------------------------------------------------ session
def test_two_people_keep_distinct_ids(videos: dict[str, Any]) -> None:
    video = videos["two"]
    rows = []
    for result in run_video(video.path, _personalizer()):
        rows += [(result.index, f.subject, f.box) for f in result.faces]
    report = identity_consistency(video, rows)
    assert report["distinct"], report
    assert report["min"] >= 0.95, report


def test_run_video_is_an_iterator_that_saves_states(videos: dict[str, Any], tmp_path: Path) -> None:
    p = _personalizer()
    it = run_video(videos["one"].path, p, states=tmp_path / "states", subject="anna")
    first = next(it)
    assert first.index == 0 and [f.subject for f in first.faces] == ["anna"]
    face = first.faces[0]
    assert face.face_found and face.label in LABELS and len(face.probs) == len(LABELS)
    assert sum(face.probs) == pytest.approx(1.0, abs=1e-5)
    rest = list(it)
    assert len(rest) == videos["one"].frames - 1
    assert p.subjects == ("anna",)
    resumed = _personalizer()
    assert resumed.load(tmp_path / "states") == ["anna"]
    for key, value in p.state_dict("anna").items():
        assert torch.equal(value, resumed.state_dict("anna")[key])


def test_calibrate_neutral_uses_the_first_seconds(videos: dict[str, Any]) -> None:
    p = _personalizer()
    results = list(run_video(videos["one"].path, p, subject="anna", calibrate_neutral=1.0))
    calibrating = [r.faces[0].calibrating for r in results if r.faces]
    assert calibrating[:24] == [True] * 24 and not any(calibrating[26:])
    assert not any(r.faces[0].updated for r in results[:25] if r.faces)
    assert "memory/calib.offset" in p.inspect("anna").tensors


def test_no_face_for_too_long_raises_and_keeps_states(tmp_path: Path) -> None:
    blank = tmp_path / "blank"
    blank.mkdir()
    for i in range(12):
        cv2.imwrite(str(blank / f"{i:03d}.png"), np.full((120, 160, 3), 90, np.uint8))
    states = tmp_path / "states"
    p = _personalizer()
    p.predict(torch.rand(2, 1, 16, 16) * 2 - 1, "anna")
    p.save(states)
    before = {f.name: f.read_bytes() for f in states.iterdir()}
    with pytest.raises(NoFaceError, match=r"no face found for 10\.0 s"):
        list(run_video(blank, _personalizer(), states=states, fps=1.0))
    assert {f.name: f.read_bytes() for f in states.iterdir()} == before


def test_session_refuses_bad_settings() -> None:
    with pytest.raises(ConfigError, match="scan_every"):
        Session(_personalizer(), scan_every=0)
    with pytest.raises(ConfigError, match="Unknown face detector 'yolo'"):
        Session(_personalizer(), detector="yolo")
    with pytest.raises(InputError, match="control characters"):
        Session(_personalizer(), subject="a\nb")


def test_mtcnn_detector_finds_a_synthface_face(videos: dict[str, Any]) -> None:
    if not mtcnn_available():
        pytest.skip("facenet-pytorch is not installed (pip install --no-deps facenet-pytorch)")
    detector = make_detector("mtcnn")
    frame = next(iter(open_source(videos["one"].path)))
    gray = cv2.cvtColor(frame.image, cv2.COLOR_BGR2GRAY)
    (det,) = detector.detect(frame.image, gray)
    x, y, w, h = det.box
    cx, cy = videos["one"].centres[0, 0]
    assert abs(x + w / 2 - cx) < FACE / 4 and abs(y + h / 2 - cy) < FACE / 4 and det.score > 0.9


def test_mtcnn_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from ttaperso.video import detection

    monkeypatch.setattr(detection, "mtcnn_available", lambda: False)
    with pytest.raises(ConfigError, match="facenet-pytorch"):
        make_detector("mtcnn")


def test_streams_iter_video_gives_read_videos_crops_in_chunks(videos: dict[str, Any]) -> None:
    from ttaperso.streams import iter_video, read_video

    path = videos["one"].path
    whole = read_video(path, "p")
    chunks = list(iter_video(path, "p", chunk=16))
    assert [len(c) for c in chunks[:-1]] == [16] * (len(chunks) - 1)
    assert torch.equal(torch.cat([c.images for c in chunks]), whole.images)
    assert torch.equal(
        torch.cat([c.extras["face_detected"] for c in chunks]), whole.extras["face_detected"]
    )
    assert chunks[1].sources[0] == whole.sources[16]
    with pytest.raises(ConfigError, match="chunk"):
        next(iter_video(path, "p", chunk=0))


def test_push_batches_predictions_and_process_answers_at_once(videos: dict[str, Any]) -> None:
    source = open_source(videos["one"].path)
    frames = [f for _, f in zip(range(12), source, strict=False)]
    source.close()
    batched = Session(_personalizer(), subject="anna", batch=5)
    batched.start(25.0)
    sizes = [len(batched.push(f)) for f in frames]
    assert sizes == [0, 0, 0, 0, 5, 0, 0, 0, 0, 5, 0, 0] and len(batched.flush()) == 2
    single = Session(_personalizer(), subject="anna", batch=1)
    single.start(25.0)
    out = [single.process(f) for f in frames]
    assert [r.index for r in out] == list(range(12))
    batched.push(frames[0])
    with pytest.raises(ConfigError, match="pending"):
        batched.process(frames[1])
