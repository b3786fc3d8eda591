"""Stream readers and protocols, on files the tests create (and on ../shared/data if present)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import INPUT_SHAPE, LABELS, build_model
from PIL import Image

import ttaperso
from ttaperso.adapters.fer_mini_xception import FER_LABELS
from ttaperso.adapters.torch_classifier import TorchClassifier
from ttaperso.errors import ConfigError, InputError
from ttaperso.streams import (
    UNLABELLED,
    SubjectStream,
    list_protocols,
    make_schedule,
    read_class_folders,
    read_jaffe,
    read_manifest,
    read_sequence_folders,
    read_video,
    read_yale,
    run_protocol,
    source_data_from_stream,
)
from ttaperso.streams.data import data_root


def _cv2_with_cascade():  # noqa: ANN202 - the cv2 module
    cv2 = pytest.importorskip("cv2")
    if not hasattr(cv2, "CascadeClassifier"):
        pytest.skip(f"OpenCV {cv2.__version__} has no CascadeClassifier (needs opencv<5)")
    return cv2


@pytest.fixture(scope="module")
def face_gray() -> np.ndarray:
    """A real face photo (scikit-image's astronaut), gray, 256 x 256: the detector finds it."""
    skdata = pytest.importorskip("skimage.data")
    cv2 = _cv2_with_cascade()
    gray = cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2GRAY)
    return cv2.resize(gray, (256, 256))


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _noise(seed: int, size: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


# ----------------------------------------------------------------------------- manifest


def _manifest(tmp_path: Path, rows: list[str], header: str = "path,subject,sequence,frame,label"):
    csv = tmp_path / "manifest.csv"
    csv.write_text("\n".join([header, *rows]) + "\n")
    return csv


def test_manifest_groups_orders_and_labels(tmp_path: Path) -> None:
    images = {f"img{i}.png": _noise(i) for i in range(6)}
    for name, array in images.items():
        _png(tmp_path / "faces" / name, array)
    csv = _manifest(
        tmp_path,
        [
            "faces/img0.png,bob,v2,1,sad",
            "faces/img1.png,ann,v1,2,happy",
            "faces/img2.png,ann,v1,1,",  # frame 1 comes first; unlabelled
            "faces/img3.png,bob,v1,1,happy",
            "faces/img4.png,ann,v2,1,sad",
            f"{tmp_path / 'faces' / 'img5.png'},bob,v1,2,sad",  # absolute path
        ],
    )
    streams = read_manifest(csv, crop="none", size=None)
    assert [s.subject for s in streams] == ["bob", "ann"]  # order of first appearance
    bob, ann = streams
    assert bob.label_names == ("happy", "sad") == ann.label_names
    # bob: sequence v2 appeared first, then v1 (frames 1, 2)
    assert bob.sequences == ("v2", "v1", "v1")
    assert [Path(s).name for s in bob.sources] == ["img0.png", "img3.png", "img5.png"]
    assert ann.labels.tolist() == [UNLABELLED, 0, 1]
    assert [Path(s).name for s in ann.sources] == ["img2.png", "img1.png", "img4.png"]
    assert ann.images.shape == (3, 1, 20, 20) and ann.images.dtype == torch.float32
    expected = torch.from_numpy(images["img2.png"]).float() / 255
    assert torch.equal(ann.images[0, 0], expected)


def test_manifest_errors_name_the_problem(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", _noise(0))
    (tmp_path / "broken.png").write_text("not an image")
    with pytest.raises(InputError, match=r"missing \['subject'\]"):
        read_manifest(_manifest(tmp_path, ["a.png,1"], header="path,frame"), crop="none")
    with pytest.raises(InputError, match=r"unknown \['mood'\]"):
        read_manifest(_manifest(tmp_path, ["a.png,s,x"], header="path,subject,mood"), crop="none")
    with pytest.raises(InputError, match=r"a\.png .*label 'joy' is not one of \('happy', 'sad'\)"):
        read_manifest(
            _manifest(tmp_path, ["a.png,s,,,joy"]), crop="none", label_names=("happy", "sad")
        )
    with pytest.raises(InputError, match=r"broken\.png"):
        read_manifest(_manifest(tmp_path, ["broken.png,s,,,"]), crop="none")
    with pytest.raises(InputError, match=r"integer `frame` but got 'x'"):
        read_manifest(_manifest(tmp_path, ["a.png,s,,x,"]), crop="none")
    with pytest.raises(ConfigError, match="crop"):
        read_manifest(_manifest(tmp_path, ["a.png,s,,,"]), crop="dlib")  # type: ignore[arg-type]


def test_manifest_fer_crop_and_missed_face(tmp_path: Path, face_gray: np.ndarray) -> None:
    _png(tmp_path / "face.png", face_gray)
    _png(tmp_path / "blank.png", np.full((256, 256), 120, np.uint8))
    streams = read_manifest(_manifest(tmp_path, ["face.png,s,,,happy"]))
    assert streams[0].images.shape == (1, 1, 64, 64)
    with pytest.raises(InputError, match=r"blank\.png: no face found"):
        read_manifest(_manifest(tmp_path, ["face.png,s,,,", "blank.png,s,,,"]))


def test_relabel_refuses_labels_outside_the_model(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", _noise(0))
    _png(tmp_path / "b.png", _noise(1))
    (stream,) = read_manifest(
        _manifest(tmp_path, ["a.png,s,,,happy", "b.png,s,,,contempt"]), crop="none"
    )
    with pytest.raises(InputError, match=r"b\.png: label 'contempt' is not one of the model's"):
        stream.relabel(LABELS)


# ----------------------------------------------------------------------------- class folders


def _class_folders(tmp_path: Path, per_class: dict[str, int]) -> Path:
    root = tmp_path / "fer"
    for c, (cls, n) in enumerate(per_class.items()):
        for i in range(n):
            _png(root / cls / f"{i:03d}.png", _noise(100 * c + i, size=16))
    return root


def test_class_folders_sampling_and_source_data(tmp_path: Path) -> None:
    root = _class_folders(tmp_path, {"happy": 5, "sad": 3, "anger": 4})
    full = read_class_folders(root)
    assert full.subject == "fer" and full.label_names == ("anger", "happy", "sad")
    assert torch.bincount(full.labels).tolist() == [4, 5, 3]
    a = read_class_folders(root, max_per_class=2, seed=1)
    b = read_class_folders(root, max_per_class=2, seed=1)
    assert a.sources == b.sources and torch.bincount(a.labels).tolist() == [2, 2, 2]
    others = {read_class_folders(root, max_per_class=2, seed=s).sources for s in range(2, 8)}
    assert len(others | {a.sources}) > 1  # the seed picks the sample
    model = TorchClassifier(build_model(), LABELS, INPUT_SHAPE, input_range=(0.0, 1.0))
    source = source_data_from_stream(full, model)
    assert source.frames.shape == (12, *INPUT_SHAPE)
    assert sorted(set(source.labels.tolist())) == [0, 1, 3]  # anger, happy, sad in LABELS
    p = ttaperso.Personalizer(model, "norm", source=source)
    assert p.predict(source.frames[:2], "x").labels.shape == (2,)


def test_class_folders_refuse_non_images(tmp_path: Path) -> None:
    root = _class_folders(tmp_path, {"happy": 2})
    (root / "happy" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"notes\.txt: not an image file name"):
        read_class_folders(root)
    with pytest.raises(InputError, match="not a folder"):
        read_class_folders(tmp_path / "missing")


# ----------------------------------------------------------------------------- CK+ sequences


def test_sequence_folders_labels(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    for seq, n in (("001", 5), ("002", 4)):
        for i in range(n):
            # frame 10 sorts after frame 9 (natural order)
            _png(root / "S005" / seq / f"S005_{seq}_{i + 8}.png", _noise(i))
    (root / "S005" / "001" / "label.txt").write_text("happy\n")
    emotion = tmp_path / "Emotion" / "S005" / "002"
    emotion.mkdir(parents=True)
    (emotion / "S005_002_00000011_emotion.txt").write_text("   7.0000000e+00\n")
    (stream,) = read_sequence_folders(root, emotion_root=tmp_path / "Emotion", crop="none", size=16)
    names = stream.label_names
    assert stream.sequences == ("001",) * 5 + ("002",) * 4
    assert [Path(s).name.split("_")[-1] for s in stream.sources[:5]] == [
        "8.png", "9.png", "10.png", "11.png", "12.png"
    ]  # fmt: skip
    labels = [names[i] if i >= 0 else None for i in stream.labels.tolist()]
    assert labels[:5] == ["neutral", None, "happy", "happy", "happy"]
    assert labels[5:] == ["neutral", "surprise", "surprise", "surprise"]
    (stream,) = read_sequence_folders(
        root, sequence_labels={("S005", "002"): "sad"}, apex_frames=None, crop="none", size=16
    )
    assert [names[i] for i in stream.labels[5:].tolist()] == ["neutral", "sad", "sad", "sad"]
    with pytest.raises(InputError, match=r"002: sequence label 'bored'"):
        read_sequence_folders(
            root, sequence_labels={("S005", "002"): "bored"}, crop="none", size=16
        )


def test_sequence_folders_carry_face_over_and_refuse_faceless(
    tmp_path: Path, face_gray: np.ndarray
) -> None:
    blank = np.full_like(face_gray, 120)
    root = tmp_path / "ck"
    for i, image in enumerate([blank, face_gray, blank]):
        _png(root / "S1" / "001" / f"{i}.png", image)
    (stream,) = read_sequence_folders(root)
    assert stream.images.shape == (3, 1, 64, 64)
    # frames without a detection are cropped with the detected box: same crop geometry,
    # so a blank frame gives a uniform crop (not the whole, rescaled picture of the face)
    assert float(stream.images[0].std()) < 0.01 and float(stream.images[1].std()) > 0.05
    for i in range(2):
        _png(root / "S2" / "001" / f"{i}.png", blank)
    with pytest.raises(InputError, match=r"S2[/\\]001: no face found in any of its 2 frames"):
        read_sequence_folders(root)


# ----------------------------------------------------------------------------- video


def _write_video(path: Path, frames: list[np.ndarray]) -> Path:
    cv2 = _cv2_with_cascade()
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (w, h))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG/avi")
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


def test_video_reader_carries_crop_over_missed_frames(
    tmp_path: Path, face_gray: np.ndarray
) -> None:
    blank = np.full_like(face_gray, 120)
    video = _write_video(tmp_path / "clip.avi", [blank, face_gray, face_gray, blank, face_gray])
    stream = read_video(video, "p1", label="happy", label_names=LABELS)
    assert len(stream) == 5 and stream.images.shape[1:] == (1, 64, 64)
    assert stream.extras["face_detected"].tolist() == [False, True, True, False, True]
    assert stream.labels.tolist() == [LABELS.index("happy")] * 5
    assert stream.sequences == ("clip.avi",) * 5 and stream.sources[3].endswith("clip.avi#3")
    every = read_video(video, "p1", every=2)
    assert len(every) == 3 and every.labels.tolist() == [UNLABELLED] * 3


def test_video_reader_errors(tmp_path: Path) -> None:
    _cv2_with_cascade()
    blank = np.full((128, 128), 120, np.uint8)
    video = _write_video(tmp_path / "empty_face.avi", [blank, blank])
    with pytest.raises(InputError, match=r"empty_face\.avi: no face found in any of its 2 frames"):
        read_video(video, "p")
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"not a video")
    with pytest.raises(InputError, match=r"junk\.avi"):
        read_video(junk, "p")
    with pytest.raises(InputError, match=r"label 'joy' is not one of"):
        read_video(video, "p", label="joy", label_names=LABELS)


# ----------------------------------------------------------------------------- protocols


def _stream(subject: str, labels: list[int], sequences: list[str], seed: int) -> SubjectStream:
    g = torch.Generator().manual_seed(seed)
    t = len(labels)
    # shifted target-like frames in [0, 1]
    images = (torch.rand((t, *INPUT_SHAPE), generator=g) * 0.6 + 0.3).clamp(0, 1)
    return SubjectStream(
        subject,
        images,
        torch.tensor(labels),
        LABELS,
        tuple(sequences),
        tuple(f"{subject}:{i}" for i in range(t)),
    )


@pytest.fixture()
def streams() -> list[SubjectStream]:
    return [
        _stream("a", [0, 1, 2, 3, 0, 1, 2, 3, -1, 1], ["s1"] * 6 + ["s2"] * 4, 1),
        _stream("b", [3, 3, 1, 1, 0, 2], ["s1"] * 6, 2),
    ]


def test_protocol_orders(streams: list[SubjectStream]) -> None:
    natural = make_schedule(streams, "natural", batch_size=4)
    assert [(s.key, s.index.tolist(), s.reset) for s in natural] == [
        ("a", [0, 1, 2, 3], True), ("a", [4, 5, 6, 7], False), ("a", [8, 9], False),
        ("b", [0, 1, 2, 3], True), ("b", [4, 5], False),
    ]  # fmt: skip
    shuffled = make_schedule(streams, "shuffled", batch_size=4, seed=3)
    assert shuffled[0].index.tolist() == np.random.default_rng(3).permutation(10)[:4].tolist()
    assert sorted(torch.cat([s.index for s in shuffled[:3]]).tolist()) == list(range(10))
    assert [s.index.tolist() for s in make_schedule(streams, "shuffled", batch_size=4, seed=3)] == [
        s.index.tolist() for s in shuffled
    ]
    independent = make_schedule(streams, "independent", batch_size=4)
    assert [(s.key, s.index.tolist(), s.reset) for s in independent[:3]] == [
        ("a/s1", [0, 1, 2, 3], True), ("a/s1", [4, 5], False), ("a/s2", [6, 7, 8, 9], True),
    ]  # fmt: skip
    continual = make_schedule(streams, "continual", batch_size=4)
    assert [(s.key, s.index.tolist(), s.reset) for s in continual[:3]] == [
        ("a", [0, 1, 2, 3], True), ("a", [4, 5], False), ("a", [6, 7, 8, 9], False),
    ]  # fmt: skip
    inter = make_schedule(streams, "interleaved", batch_size=1)
    assert [s.key for s in inter[:4]] == ["a", "b", "a", "b"] and len(inter) == 16
    assert [s.key for s in inter[-4:]] == ["a"] * 4


def test_label_correlated_gives_runs(streams: list[SubjectStream]) -> None:
    schedule = make_schedule(streams, "label_correlated", batch_size=3, seed=0)
    order = torch.cat([s.index for s in schedule if s.key == "a"])
    labels = streams[0].labels[order].tolist()
    changes = sum(1 for x, y in zip(labels, labels[1:], strict=False) if x != y)
    assert sorted(order.tolist()) == list(range(10))
    assert changes == 4 and labels[-1] == UNLABELLED  # 4 label runs, then the unlabelled one
    other = make_schedule(streams, "label_correlated", batch_size=3, seed=5)
    assert [s.index.tolist() for s in other] != [s.index.tolist() for s in schedule]


def test_protocol_errors(streams: list[SubjectStream]) -> None:
    with pytest.raises(ConfigError, match="Unknown protocol 'random'; available: independent"):
        make_schedule(streams, "random")
    with pytest.raises(ConfigError, match="batch_size"):
        make_schedule(streams, "natural", batch_size=0)
    with pytest.raises(InputError, match="Two streams have the subject id 'a'"):
        make_schedule([streams[0], streams[0]], "natural")
    assert list_protocols() == [
        "independent", "shuffled", "natural", "label_correlated", "continual", "interleaved"
    ]  # fmt: skip


def _personalizer() -> ttaperso.Personalizer:
    return ttaperso.Personalizer(build_model(), "norm", labels=LABELS, input_shape=INPUT_SHAPE)


def test_run_protocol_outputs_and_isolation(streams: list[SubjectStream]) -> None:
    natural = run_protocol(_personalizer(), streams, "natural", batch_size=2)
    a = natural["a"]
    assert a["logits"].shape == (10, len(LABELS)) and a["updated"].dtype == torch.bool
    assert a["targets"].tolist() == streams[0].labels.tolist()
    assert a["labels"].tolist() == a["logits"].argmax(1).tolist()
    assert a["sequences"] == list(streams[0].sequences) and a["keys"] == ["a"] * 10
    assert bool(a["updated"].any())
    # interleaving the subjects changes nothing for any of them (states are isolated)
    inter = run_protocol(_personalizer(), streams, "interleaved", batch_size=2)
    for subject in ("a", "b"):
        assert torch.allclose(inter[subject]["logits"], natural[subject]["logits"], atol=1e-6)
    # continual carries the state into session s2; independent restarts it there
    cont = run_protocol(_personalizer(), streams, "continual", batch_size=2)
    ind = run_protocol(_personalizer(), streams, "independent", batch_size=2)
    assert torch.allclose(cont["a"]["logits"][:6], ind["a"]["logits"][:6])
    assert not torch.allclose(cont["a"]["logits"][6:], ind["a"]["logits"][6:])
    assert ind["a"]["keys"][6:] == ["a/s2"] * 4
    # a Personalizer that already knows a subject starts it again from the frozen model
    p = _personalizer()
    first = run_protocol(p, streams, "natural", batch_size=2)
    again = run_protocol(p, streams, "natural", batch_size=2)
    assert torch.equal(first["b"]["logits"], again["b"]["logits"])


def test_run_protocol_times_the_frozen_model_on_the_same_batches(
    streams: list[SubjectStream],
) -> None:
    plain = run_protocol(_personalizer(), streams, "natural", batch_size=2)
    timed = run_protocol(_personalizer(), streams, "natural", batch_size=2, time_frozen=True)
    for subject in ("a", "b"):
        assert "seconds_frozen" not in plain[subject]
        assert plain[subject]["seconds_predict"] > 0 and timed[subject]["seconds_frozen"] > 0
        # the frozen passes run beside predict but change nothing it returns
        assert torch.equal(plain[subject]["logits"], timed[subject]["logits"])


def test_run_protocol_refuses_foreign_labels(streams: list[SubjectStream]) -> None:
    foreign = SubjectStream(
        "c", streams[1].images, torch.tensor([0] * 6), ("contempt",), ("",) * 6,
        tuple(f"clip{i}.png" for i in range(6)),
    )  # fmt: skip
    with pytest.raises(InputError, match=r"clip0\.png: label 'contempt' is not one of"):
        run_protocol(_personalizer(), [foreign], "natural")


# ----------------------------------------------------------------------------- real data


def _real(name: str) -> Path:
    folder = data_root() / name
    if not folder.is_dir():
        pytest.skip(f"{folder} not found (set TTAPERSO_DATA)")
    _cv2_with_cascade()
    return folder


@pytest.mark.real_data
def test_jaffe_reader_on_the_real_set() -> None:
    streams = read_jaffe(_real("jaffe"))
    assert len(streams) == 10 and sum(len(s) for s in streams) == 213
    assert [s.subject for s in streams] == [
        "KA",
        "KL",
        "KM",
        "KR",
        "MK",
        "NA",
        "NM",
        "TM",
        "UY",
        "YM",
    ]
    labels = torch.cat([s.labels for s in streams])
    assert int((labels == UNLABELLED).sum()) == 0 and len(set(labels.tolist())) == 7
    assert streams[0].images.shape[1:] == (1, 64, 64)


@pytest.mark.real_data
def test_yale_reader_on_the_real_set() -> None:
    folder = _real("yale")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        streams = read_yale(folder)
    assert any("subject04.sad" in str(w.message) for w in caught)
    assert len(streams) == 15 and all(len(s) == 6 for s in streams)
    s = streams[0]
    assert s.sequences == ("happy", "normal", "sad", "sleepy", "surprised", "wink")
    names = [s.label_names[i] if i >= 0 else None for i in s.labels.tolist()]
    assert names == ["happy", "neutral", "sad", None, "surprise", None]
    s.relabel(FER_LABELS)  # all labels are FER2013 names
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # normal == noglasses is by design: no warning
        sessions = read_yale(folder, conditions=("normal", "noglasses"))
    assert all(s.sequences == ("noglasses", "normal") for s in sessions)
    neutral = sessions[0].label_names.index("neutral")
    assert all(s.labels.tolist() == [UNLABELLED, neutral] for s in sessions)
    with pytest.raises(ConfigError, match="Unknown Yale conditions \\['smiling'\\]"):
        read_yale(folder, conditions=("smiling",))
