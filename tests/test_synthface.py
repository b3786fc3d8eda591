"""SynthFace: determinism, shapes and ranges, AU geometry, clip dynamics, session shifts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ttaperso.streams.types import SubjectStream
from ttaperso.synthface import (
    AU_IDS,
    EXPRESSIONS,
    NEUTRAL,
    PROTOTYPES,
    Capture,
    SynthFace,
    au_index,
    prototype,
    render_frames,
)
from ttaperso.synthface.video import LABEL_THRESHOLD, blink_track, clip_envelope

SIZE = 32  # small frames keep the tests fast; geometry is the same at any size


@pytest.fixture(scope="module")
def gen() -> SynthFace:
    return SynthFace(seed=3, size=SIZE)


@pytest.fixture(scope="module")
def target_stream(gen: SynthFace) -> SubjectStream:
    person = gen.sample_subjects(1, "target")[0]
    return gen.subject_stream(person, sessions=2, frames_per_clip=(12, 16))


def _neutral_person(gen: SynthFace, **changes: object):
    person = gen.sample_subjects(1, "source")[0]
    rest = (0.0,) * len(AU_IDS)
    return dataclasses.replace(person, rest_au=rest, asymmetry=0.0, glasses=False, **changes)


def _render(person, aus: dict[int, float], size: int = 64) -> torch.Tensor:
    au = np.zeros((1, len(AU_IDS)), dtype=np.float32)
    for k, v in aus.items():
        au[0, au_index(k)] = v
    pose = np.array([[0.0, 0.0, 1.0, 0.0, 0.0]], dtype=np.float32)
    return render_frames(person, au, pose, Capture(noise=0.0), size=size)[0, 0]


def test_same_seed_gives_identical_bytes(gen: SynthFace, target_stream: SubjectStream) -> None:
    again = SynthFace(seed=3, size=SIZE)
    person = again.sample_subjects(1, "target")[0]
    stream = again.subject_stream(person, sessions=2, frames_per_clip=(12, 16))
    assert stream.images.numpy().tobytes() == target_stream.images.numpy().tobytes()
    assert torch.equal(stream.labels, target_stream.labels)
    assert torch.equal(stream.extras["au"], target_stream.extras["au"])
    assert stream.sources == target_stream.sources
    other = SynthFace(seed=4, size=SIZE).sample_subjects(1, "target")[0]
    assert other != person
    # a subject is the same whatever else is drawn: index i of a split is stable
    assert gen.sample_subjects(3, "source")[2] == gen.sample_subjects(1, "source", start=2)[0]


def test_stream_shapes_ranges_and_labels(target_stream: SubjectStream) -> None:
    s = target_stream
    t = len(s)
    assert s.images.shape == (t, 1, SIZE, SIZE) and s.images.dtype == torch.float32
    assert float(s.images.min()) >= 0.0 and float(s.images.max()) <= 1.0
    assert s.labels.dtype == torch.int64 and s.label_names == EXPRESSIONS
    assert EXPRESSIONS == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
    # every expression appears in each session (one clip each)
    assert set(s.labels.tolist()) == set(range(len(EXPRESSIONS)))
    au = s.extras["au"]
    assert au.shape == (t, len(AU_IDS)) and float(au.min()) >= 0.0 and float(au.max()) <= 1.0
    assert len(set(s.sequences)) == 2 and s.sequences[0].startswith(s.subject)
    assert {1, 2, 4, 5, 6, 7, 9, 12, 15, 20, 23, 26} <= set(AU_IDS)


def test_prototypes_are_facs_combinations() -> None:
    assert set(PROTOTYPES) == set(EXPRESSIONS)
    assert not prototype("neutral").any()
    happy = prototype("happy")
    assert happy[au_index(6)] > 0 and happy[au_index(12)] > 0 and happy[au_index(15)] == 0
    assert prototype("sad")[au_index(15)] > 0 and prototype("surprise")[au_index(26)] > 0
    with pytest.raises(ValueError, match="Action Unit"):
        au_index(3)
    with pytest.raises(ValueError, match="expression"):
        prototype("contempt")


@pytest.mark.parametrize(
    ("au", "region"),
    [
        (1, "brows"),
        (2, "brows"),
        (4, "brows"),
        (5, "eyes"),
        (7, "eyes"),
        (6, "eyes"),
        (45, "eyes"),
        (9, "nose"),
        (12, "mouth"),
        (15, "mouth"),
        (20, "mouth"),
        (23, "mouth"),
        (26, "jaw"),  # opens the mouth and lengthens the chin
    ],
)
def test_each_au_changes_its_own_region(gen: SynthFace, au: int, region: str) -> None:
    person = _neutral_person(gen)
    rest = _render(person, {})
    moved = _render(person, {au: 1.0})
    diff = (moved - rest).abs()
    size = diff.shape[0]

    def rows(y0: float, y1: float) -> slice:
        return slice(int((y0 + 1) / 2 * size), int((y1 + 1) / 2 * size) + 1)

    brow_y = person.eye_y - person.brow_gap
    regions = {
        "brows": rows(brow_y - 0.3, brow_y + 0.08),
        "eyes": rows(person.eye_y - 0.1, person.eye_y + 0.25),
        "nose": rows(person.eye_y, person.eye_y + person.nose_len + 0.05),
        "mouth": rows(person.mouth_y - 0.15, person.mouth_y + 0.35),
        "jaw": rows(person.mouth_y - 0.15, 1.0),
    }
    inside = float(diff[regions[region]].sum())
    assert inside > 2.0, f"AU{au} barely changes the {region}"
    # most of the change is in the AU's region, not elsewhere on the face
    assert inside / float(diff.sum()) > 0.7


def test_smile_lifts_the_lip_corners_and_au5_opens_the_eyes(gen: SynthFace) -> None:
    person = _neutral_person(gen)
    size = 64

    def dark_rows(img: torch.Tensor, x: float, y0: float, y1: float) -> float:
        """Mean row (in canonical y) of dark pixels in a column band."""
        col = int((x + 1) / 2 * size)
        r0, r1 = int((y0 + 1) / 2 * size), int((y1 + 1) / 2 * size)
        band = img[r0:r1, col - 1 : col + 2]
        weight = (band.max() - band).clamp(min=0)
        ys = torch.arange(r0, r1, dtype=torch.float32).view(-1, 1)
        return float((weight * ys).sum() / weight.sum())

    corner = person.mouth_w * 0.95
    y0, y1 = person.mouth_y - 0.15, person.mouth_y + 0.12
    rest_y = dark_rows(_render(person, {}), corner, y0, y1)
    assert dark_rows(_render(person, {12: 1.0}), corner, y0, y1) < rest_y - 0.5  # corners up
    assert dark_rows(_render(person, {15: 1.0}), corner, y0, y1) > rest_y + 0.5  # corners down

    # AU5 shows eye white above the iris; a blink hides the eye white
    def eye_white(img: torch.Tensor) -> float:
        r0, r1 = int((person.eye_y - 0.12 + 1) / 2 * size), int((person.eye_y + 0.1 + 1) / 2 * size)
        c0 = int((person.eye_dx - person.eye_w + 1) / 2 * size)
        c1 = int((person.eye_dx + person.eye_w + 1) / 2 * size)
        return float((img[r0:r1, c0:c1] - person.skin).clamp(min=0.0).sum())

    rest_white = eye_white(_render(person, {}))
    assert eye_white(_render(person, {5: 1.0})) > 1.3 * rest_white
    assert eye_white(_render(person, {45: 1.0})) < 0.5 * rest_white


def test_clip_dynamics_onset_apex_offset() -> None:
    env = clip_envelope(np.random.default_rng(0), 40)
    apex = int(env.argmax())
    assert env.max() == pytest.approx(1.0, abs=0.05)
    assert env[0] < 0.1 and env[-1] < 0.3
    assert 0 < apex < 39
    assert np.all(np.diff(env[: apex + 1]) >= -1e-6)  # rises to the apex ...
    assert np.all(np.diff(env[apex:]) <= 1e-6)  # ... then falls
    blinks = blink_track(np.random.default_rng(1), 600, every=50.0)
    assert blinks.max() == 1.0 and 3 <= int((np.diff((blinks > 0).astype(int)) == 1).sum()) <= 25


def test_stream_labels_follow_the_envelope(target_stream: SubjectStream) -> None:
    env, labels = target_stream.extras["envelope"], target_stream.labels
    expressive = labels != NEUTRAL
    assert bool((env[expressive] >= LABEL_THRESHOLD).all())
    # the AUs of an expression's prototype rise with the envelope within the clip
    happy = labels == EXPRESSIONS.index("happy")
    if bool(happy.any()):
        au12 = target_stream.extras["au"][:, au_index(12)]
        assert float(au12[happy].mean()) > float(au12[labels == NEUTRAL].mean())


def test_natural_order_is_a_video_and_shuffled_is_not(gen: SynthFace) -> None:
    person = gen.sample_subjects(1, "source")[0]
    natural = gen.subject_stream(person, sessions=1, frames_per_clip=(12, 16))
    shuffled = gen.subject_stream(person, sessions=1, frames_per_clip=(12, 16), order="shuffled")
    assert sorted(natural.sources) == sorted(shuffled.sources)
    step = float((natural.images[1:] - natural.images[:-1]).abs().mean())
    jump = float((shuffled.images[1:] - shuffled.images[:-1]).abs().mean())
    assert step < jump
    changes = int((natural.labels[1:] != natural.labels[:-1]).sum())
    assert changes <= 2 * len(EXPRESSIONS)  # runs of one label, not frame-to-frame flicker


def test_target_sessions_shift_image_statistics(gen: SynthFace) -> None:
    """Each person in nominal and in shifted sessions: shifted sessions' brightness, contrast
    and sharpness lie much further from the person's nominal sessions than those do."""

    def session_stats(s: SubjectStream) -> torch.Tensor:
        x = s.images[:, 0]
        grad = (x[:, :, 1:] - x[:, :, :-1]).abs().mean((1, 2))
        frame = torch.stack([x.mean((1, 2)), x.std((1, 2)), grad], 1)
        ids = sorted(set(s.sequences))
        return torch.stack(
            [frame[[q == i for q in s.sequences]].mean(0) for i in ids]  # type: ignore[index]
        )

    near, far = 0.0, 0.0
    for person in gen.sample_subjects(3, "target"):
        kw = {"sessions": 3, "frames_per_clip": (8, 8)}
        nominal = session_stats(gen.subject_stream(person, shifted=False, **kw))
        shifted = session_stats(gen.subject_stream(person, shifted=True, **kw))
        centre = nominal.mean(0)
        near += float((nominal - centre).norm(dim=1).mean())
        far += float((shifted - centre).norm(dim=1).mean())
    assert far > 2.0 * near
    captures = [s.capture for s in gen.sessions(person, 3, shifted=True)]
    assert any(c.light_strength > 0.1 for c in captures) and all(c.noise > 0 for c in captures)


def test_bad_arguments_raise(gen: SynthFace) -> None:
    person = gen.sample_subjects(1, "target")[0]
    with pytest.raises(ValueError, match="split"):
        gen.sample_subjects(1, "test")
    with pytest.raises(ValueError, match="expressions"):
        gen.subject_stream(person, expressions=["contempt"])
    with pytest.raises(ValueError, match="order"):
        gen.subject_stream(person, order="backwards")
    with pytest.raises(ValueError, match="frames_per_clip"):
        gen.subject_stream(person, frames_per_clip=(10, 5))
    with pytest.raises(ValueError, match="seed"):
        SynthFace(seed=-1)
    with pytest.raises(ValueError, match="au"):
        render_frames(person, np.zeros((2, 3)), np.zeros((2, 5)))
    with pytest.raises(ValueError, match="occlusion"):
        Capture(occlusion="mask")
