"""Toy cartoon faces for the embedded demo (``ttaperso demo``): procedural, numpy only.

Not a benchmark: a compact generator of grayscale cartoon faces with one of four expression
classes, so the demo runs on a fresh machine with nothing downloaded. (A fuller generator
with Action Units is a separate piece of work.)

* Expression (the label): mouth curvature and opening, eyebrow height and tilt, eye openness.
* Identity (per subject): face size, feature positions and sizes, skin and background tone.
* Idiosyncrasy (per subject): resting offsets of the mouth curvature, brows and eyes, so one
  person's neutral face can look slightly sad or happy to a model trained on others.
* Capture (per target subject): one global appearance shift (contrast, brightness, gamma,
  lighting gradient, vignetting, blur, sensor noise), the kind of shift per-subject
  BatchNorm statistics can absorb. Source subjects share the nominal capture.

A stream is a short video: runs of consecutive frames of one expression whose intensity
rises and falls, with small head jitter. Frames are float32 tensors ``(N, 1, S, S)`` in
``[-1, 1]``; labels are int64 class indices. Everything is a pure function of the seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from torch import Tensor

__all__ = ["CLASSES", "ToySubject", "make_subject", "render", "make_stream", "make_dataset"]

CLASSES: tuple[str, ...] = ("neutral", "happy", "sad", "surprise")
GENERATOR_VERSION = "toyfaces-1"

# Expression targets at full intensity: (mouth curve, mouth open, brow raise, brow tilt, eye open).
_EXPRESSIONS = np.array(
    [
        [0.0, 0.0, 0.0, 0.0, 1.0],  # neutral
        [1.0, 0.15, 0.05, 0.0, 0.75],  # happy: smile, squint
        [-0.8, 0.0, 0.1, 1.0, 0.8],  # sad: frown, inner brows up
        [0.0, 1.0, 1.0, 0.0, 1.35],  # surprise: open mouth, raised brows, wide eyes
    ],
    dtype=np.float64,
)
_NOMINAL_CAPTURE = {
    "contrast": 1.0,
    "brightness": 0.0,
    "gamma": 1.0,
    "gradient": 0.0,
    "angle": 0.0,
    "vignette": 0.0,
    "blur": 0.0,
    "noise": 0.02,
}


@dataclass(frozen=True)
class ToySubject:
    """One synthetic person: identity, idiosyncrasy and capture conditions.

    Attributes:
        id: subject id (also the Personalizer's subject key in the demo).
        identity: face geometry and tones (normalised image coordinates in [-1, 1]).
        rest: resting offsets added to the expression parameters (same order as the
            expression vector: mouth curve, mouth open, brow raise, brow tilt, eye open).
        capture: global appearance shift of the subject's camera and lighting.
    """

    id: str
    identity: dict[str, float]
    rest: tuple[float, ...]
    capture: dict[str, float] = field(default_factory=lambda: dict(_NOMINAL_CAPTURE))


def make_subject(seed: int, index: int, *, shifted: bool, prefix: str | None = None) -> ToySubject:
    """Draw subject ``index`` of a population; ``shifted`` gives it a random capture shift.

    Source and target populations use different random streams, so their people differ.
    """
    rng = np.random.default_rng([seed, int(shifted), index, 7919])
    u = rng.uniform
    identity = {
        "rx": u(0.62, 0.78),
        "ry": u(0.78, 0.92),
        "cy": u(-0.04, 0.06),
        "eye_dx": u(0.24, 0.34),
        "eye_y": u(-0.30, -0.16),
        "eye_r": u(0.08, 0.12),
        "brow_gap": u(0.13, 0.19),
        "brow_len": u(0.18, 0.26),
        "mouth_y": u(0.34, 0.48),
        "mouth_w": u(0.20, 0.32),
        "skin": u(0.1, 0.6),
        "bg": u(-0.9, -0.5),
        "ink": u(-1.0, -0.8),
    }
    rest = (
        rng.choice([-1.0, 1.0]) * u(0.15, 0.45) if shifted else u(-0.15, 0.15),
        0.0,
        u(-0.15, 0.15),
        u(-0.2, 0.2),
        u(-0.12, 0.12),
    )
    capture = dict(_NOMINAL_CAPTURE)
    if shifted:
        capture.update(
            contrast=float(np.exp(rng.choice([-1.0, 1.0]) * u(0.2, 0.45))),
            brightness=u(-0.15, 0.15),
            gamma=float(np.exp(u(-0.35, 0.35))),
            gradient=u(0.1, 0.4),
            angle=u(0.0, 2 * np.pi),
            vignette=u(0.0, 0.4),
            blur=u(0.0, 0.8),
            noise=u(0.02, 0.05),
        )
    name = prefix or ("target" if shifted else "source")
    return ToySubject(f"{name}-{index:02d}", identity, tuple(float(r) for r in rest), capture)


def _soft(d: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased coverage of the region ``d < 0`` (``d`` in image units)."""
    return 1.0 / (1.0 + np.exp(np.clip(d / width, -30.0, 30.0)))


def _paint(img: np.ndarray, mask: np.ndarray, value: np.ndarray | float) -> np.ndarray:
    return img * (1.0 - mask) + value * mask


def render(
    subject: ToySubject,
    expr: np.ndarray,
    offset: np.ndarray,
    size: int = 32,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Render frames of one subject: ``expr`` is ``(N, 5)`` expression parameters and
    ``offset`` ``(N, 3)`` head jitter (dx, dy, scale); returns ``(N, size, size)`` in [-1, 1].

    ``rng`` draws the sensor noise (none when ``None``).
    """
    idn, cap = subject.identity, subject.capture
    n = expr.shape[0]
    lin = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(lin, lin, indexing="ij")
    y, x = y[None], x[None]
    col = lambda a: a.reshape(n, 1, 1)  # noqa: E731 - per-frame scalars broadcast over pixels
    scale = col(offset[:, 2])
    cx, cy = col(offset[:, 0]), col(offset[:, 1]) + idn["cy"]
    px = 1.5 * 2.0 / size  # soft edge of about 1.5 pixels
    curve, mouth_open, raise_, tilt, eye_open = (col(expr[:, i]) for i in range(5))

    img = np.full((n, size, size), idn["bg"])
    face = ((x - cx) / (idn["rx"] * scale)) ** 2 + ((y - cy) / (idn["ry"] * scale)) ** 2
    img = _paint(img, _soft(face - 1.0, 0.08), idn["skin"] - 0.15 * (y - cy))
    ink = idn["ink"]
    for side in (-1.0, 1.0):
        ex = cx + side * idn["eye_dx"] * scale
        ey = cy + idn["eye_y"] * scale
        ry = idn["eye_r"] * scale * np.clip(eye_open, 0.15, 2.0) * 0.8
        eye = ((x - ex) / (idn["eye_r"] * scale)) ** 2 + ((y - ey) / ry) ** 2
        img = _paint(img, _soft(eye - 1.0, 0.25), ink)
        # Brow: a segment from the inner to the outer end; tilt raises the inner end.
        by = ey - (idn["brow_gap"] + 0.12 * raise_) * scale
        half = 0.5 * idn["brow_len"] * scale
        x0, x1 = ex - side * half, ex + side * half
        y0, y1 = by - 0.1 * tilt * scale, by + 0.03 * tilt * scale
        t = np.clip(
            ((x - x0) * (x1 - x0) + (y - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2),
            0.0,
            1.0,
        )
        dist = np.hypot(x - (x0 + t * (x1 - x0)), y - (y0 + t * (y1 - y0)))
        img = _paint(img, _soft(dist - 0.035 * scale, px), ink)
    # Mouth: a parabola whose centre drops for a smile (image y points down), plus an
    # ellipse for the opening.
    my, mw = cy + idn["mouth_y"] * scale, idn["mouth_w"] * scale
    u = np.clip((x - cx) / mw, -1.0, 1.0)
    dist = np.abs(y - (my + 0.2 * curve * scale * (1.0 - u**2)))
    inside = _soft(np.abs(x - cx) - mw, px)
    img = _paint(img, inside * _soft(dist - 0.045 * scale, px), ink)
    opening = ((x - cx) / (0.55 * mw)) ** 2 + ((y - my) / (0.2 * scale * mouth_open + 1e-3)) ** 2
    img = _paint(img, _soft(opening - 1.0, 0.3) * (mouth_open > 0.05), ink)

    # Capture: lighting and vignetting act on radiance, then the camera's response.
    v = (img + 1.0) / 2.0
    v = v * (1.0 + cap["gradient"] * (x * np.cos(cap["angle"]) + y * np.sin(cap["angle"])))
    v = v * (1.0 - cap["vignette"] * 0.5 * (x**2 + y**2))
    v = np.clip(v, 0.0, 1.0) ** cap["gamma"]
    v = (v - 0.5) * cap["contrast"] + 0.5 + cap["brightness"]
    if cap["blur"] > 0.05:
        v = gaussian_filter(v, sigma=(0.0, cap["blur"], cap["blur"]), mode="nearest")
    if rng is not None:
        v = v + rng.normal(0.0, cap["noise"], size=v.shape)
    return np.clip(v * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)


def make_stream(
    subject: ToySubject,
    n_frames: int,
    seed: int,
    *,
    size: int = 32,
    segment: tuple[int, int] = (16, 40),
) -> tuple[Tensor, Tensor]:
    """A video of ``subject``: consecutive segments of one expression each, in natural order.

    Within a segment the expression intensity rises and falls (onset, apex, offset) and the
    head jitters slightly. Returns ``(frames (N, 1, size, size) float32 in [-1, 1],
    labels (N,) int64)``.
    """
    if n_frames < 1:
        raise ValueError(f"Expected argument `n_frames` to be >= 1 but got {n_frames!r}")
    rng = np.random.default_rng([seed, *subject.id.encode()])
    labels, intensity, jitter = [], [], []
    previous = -1
    while len(labels) < n_frames:
        length = int(rng.integers(segment[0], segment[1] + 1))
        cls = int(rng.choice([c for c in range(len(CLASSES)) if c != previous]))
        previous = cls
        phase = np.sin(np.pi * (np.arange(length) + 0.5) / length)
        intensity.append(rng.uniform(0.6, 1.0) * (0.45 + 0.55 * phase))
        start = np.array([rng.normal(0, 0.04), rng.normal(0, 0.04), rng.uniform(0.92, 1.06)])
        walk = np.cumsum(rng.normal(0, [0.006, 0.006, 0.004], size=(length, 3)), axis=0)
        jitter.append(start + walk)
        labels.extend([cls] * length)
    labels_a = np.array(labels[:n_frames])
    amount = np.concatenate(intensity)[:n_frames, None]
    offset = np.concatenate(jitter)[:n_frames]
    neutral = _EXPRESSIONS[0]
    expr = neutral + amount * (_EXPRESSIONS[labels_a] - neutral) + np.array(subject.rest)
    expr = expr + rng.normal(0.0, 0.04, size=expr.shape)
    frames = render(subject, expr, offset, size=size, rng=rng)
    return torch.from_numpy(frames).unsqueeze(1), torch.from_numpy(labels_a).long()


def make_dataset(
    seed: int,
    n_subjects: int,
    frames_per_subject: int,
    *,
    shifted: bool = False,
    size: int = 32,
    prefix: str | None = None,
) -> tuple[Tensor, Tensor, list[ToySubject]]:
    """Concatenated streams of ``n_subjects`` new subjects: ``(frames, labels, subjects)``."""
    subjects = [make_subject(seed, i, shifted=shifted, prefix=prefix) for i in range(n_subjects)]
    parts = [make_stream(s, frames_per_subject, seed, size=size) for s in subjects]
    frames = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    return frames, labels, subjects
