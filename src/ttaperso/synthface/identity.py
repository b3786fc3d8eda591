"""SynthFace identities: who a synthetic subject is and how they express.

An :class:`Identity` holds the face's geometry and tones (fixed for a person) and the
idiosyncrasies that make a model trained on other people misread this one:

* ``rest_au``: a resting face: AU intensities present in every frame, e.g. inner brows
  raised and lip corners down (a resting face that looks sad), or brows lowered and lids
  tightened (one that looks angry);
* ``gain``: expressivity, multiplying every expression's AU intensities (weak or
  exaggerated expressions);
* ``asymmetry``: how much stronger the left side of bilateral AUs is than the right
  (asymmetric smiles, one-sided brow raises);
* ``blink_every``: mean number of frames between blinks.

Source subjects (the population a model is trained on) have mild idiosyncrasies; target
subjects (the people it is later personalized to) are drawn with stronger ones.
All coordinates are in the canonical face frame: ``x`` and ``y`` in ``[-1, 1]`` across the
image at scale 1, ``y`` pointing down.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .facs import AU_IDS, au_index

__all__ = ["Identity", "RESTING_FACES", "SPLITS", "sample_identity"]

#: Populations a subject can be drawn from.
SPLITS: tuple[str, ...] = ("source", "target")

#: Resting-face AU patterns (intensity at full strength) a subject may carry.
RESTING_FACES: dict[str, dict[int, float]] = {
    "none": {},
    "sad": {1: 0.45, 4: 0.25, 15: 0.6, 17: 0.3},
    "angry": {4: 0.65, 7: 0.45, 23: 0.45},
    "smiling": {6: 0.25, 12: 0.45},
    "surprised": {1: 0.35, 2: 0.45, 5: 0.45},
}


@dataclass(frozen=True)
class Identity:
    """One synthetic person: geometry, tones, accessories and idiosyncrasies.

    Geometry is in canonical face units (see the module docstring); tones are grey
    levels in ``[0, 1]``.
    """

    id: str
    split: str
    # face outline
    face_w: float
    face_h: float
    face_cy: float
    jaw: float
    # eyes and brows
    eye_dx: float
    eye_y: float
    eye_w: float
    eye_h: float
    brow_gap: float
    brow_len: float
    brow_thick: float
    brow_arch: float
    # nose and mouth
    nose_len: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    lip_thick: float
    # tones and accessories
    skin: float
    background: float
    hair_tone: float
    hair_style: int  # 0 short, 1 fringe, 2 none (bald/shaved)
    glasses: bool
    # idiosyncrasies
    resting_face: str
    rest_au: tuple[float, ...] = field(default=(0.0,) * len(AU_IDS))
    gain: float = 1.0
    asymmetry: float = 0.0
    blink_every: float = 60.0

    def rest_vector(self) -> np.ndarray:
        """The resting AU intensities as a float32 array ``(len(AU_IDS),)``."""
        return np.asarray(self.rest_au, dtype=np.float32)


def _resting(rng: np.random.Generator, split: str) -> tuple[str, tuple[float, ...]]:
    names = list(RESTING_FACES)
    if split == "source":
        # Most source people have a plain resting face; a few a faint bias.
        kind = str(rng.choice(names, p=[0.7, 0.075, 0.075, 0.075, 0.075]))
        strength = rng.uniform(0.1, 0.4)
    else:
        kind = str(rng.choice(names, p=[0.2, 0.3, 0.3, 0.1, 0.1]))
        strength = rng.uniform(0.6, 1.0)
    rest = np.zeros(len(AU_IDS), dtype=np.float64)
    for au, value in RESTING_FACES[kind].items():
        rest[au_index(au)] = value * strength
    return kind, tuple(float(v) for v in rest)


def sample_identity(rng: np.random.Generator, split: str, subject_id: str) -> Identity:
    """Draw one identity of population ``split`` (``"source"`` or ``"target"``) from ``rng``."""
    if split not in SPLITS:
        raise ValueError(f"Expected argument `split` in {SPLITS} but got {split!r}")
    u = rng.uniform
    face_cy = u(-0.02, 0.06)
    eye_y = face_cy + u(-0.20, -0.10)
    resting_face, rest_au = _resting(rng, split)
    if split == "source":
        gain = u(0.8, 1.15)
        asymmetry = u(-0.15, 0.15)
    else:
        # weak, typical or exaggerated expressers; asymmetric faces are common
        gain = float(rng.choice([u(0.45, 0.7), u(0.8, 1.1), u(1.2, 1.5)], p=[0.4, 0.3, 0.3]))
        asymmetry = float(rng.choice([-1.0, 1.0]) * u(0.1, 0.6))
    skin = u(0.4, 0.85)
    return Identity(
        id=subject_id,
        split=split,
        face_w=u(0.56, 0.70),
        face_h=u(0.76, 0.88),
        face_cy=face_cy,
        jaw=u(0.55, 0.9),
        eye_dx=u(0.22, 0.30),
        eye_y=eye_y,
        eye_w=u(0.10, 0.135),
        eye_h=u(0.05, 0.07),
        brow_gap=u(0.10, 0.15),
        brow_len=u(0.17, 0.24),
        brow_thick=u(0.025, 0.045),
        brow_arch=u(0.0, 0.04),
        nose_len=u(0.20, 0.28),
        nose_w=u(0.07, 0.10),
        mouth_y=eye_y + u(0.40, 0.50),
        mouth_w=u(0.15, 0.21),
        lip_thick=u(0.025, 0.045),
        skin=skin,
        background=float(rng.choice([u(0.05, 0.3), u(0.6, 0.95)])),
        hair_tone=u(0.03, 0.45) if skin > 0.55 else u(0.03, 0.25),
        hair_style=int(rng.choice(3, p=[0.5, 0.35, 0.15])),
        glasses=bool(rng.uniform() < 0.25),
        resting_face=resting_face,
        rest_au=rest_au,
        gain=float(gain),
        asymmetry=float(asymmetry),
        blink_every=u(40.0, 110.0),
    )
