"""SynthFace videos: expression clips with onset -> apex -> offset, blinks and sessions.

A subject's stream is a list of *sessions* (recordings), each a sequence of *clips*; a
clip shows one expression: a few neutral frames, the onset (AU intensities rising with a
smooth step), the apex (held, with small fluctuations), the offset (falling back) and a
neutral tail. Blinks (AU45) happen at random times, independently of the clips. The head
drifts slowly within a session around the session's base pose.

Per-frame labels: the clip's expression while its intensity envelope is at least
:data:`LABEL_THRESHOLD` of the apex, ``neutral`` otherwise (a face at 10% of a smile is
a neutral face). The AU intensities in ``extras["au"]`` are the rendered ones: resting
face + expressivity gain x envelope x the expression's prototype (with per-clip
variation), and blinks.

Sessions of *target* subjects get capture shifts (lighting direction and level, gamma,
contrast, noise, blur, pose, occluders); sessions of *source* subjects vary only slightly
around the nominal capture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .facs import AU_IDS, EXPRESSIONS, NEUTRAL, au_index, prototype
from .identity import Identity
from .render import OCCLUSIONS, Capture

__all__ = [
    "LABEL_THRESHOLD",
    "Session",
    "Clip",
    "sample_session",
    "clip_envelope",
    "blink_track",
    "plan_clip",
]

#: Fraction of the apex above which a frame is labelled with the clip's expression.
LABEL_THRESHOLD = 0.35


@dataclass(frozen=True)
class Session:
    """One recording of a subject: its camera/lighting/occluder and base head pose."""

    id: str
    capture: Capture
    pose: tuple[float, float, float, float, float]  # dx, dy, scale, roll, yaw
    shifted: bool


@dataclass(frozen=True)
class Clip:
    """One expression clip: per-frame AUs, labels and envelope."""

    expression: str
    au: np.ndarray  # (T, len(AU_IDS)) float32 in [0, 1]
    labels: np.ndarray  # (T,) int64
    envelope: np.ndarray  # (T,) float32 in [0, 1]


def sample_session(rng: np.random.Generator, session_id: str, shifted: bool) -> Session:
    """Draw a session's capture and base pose: nominal +- a little, or a real shift."""
    u = rng.uniform
    if not shifted:
        capture = Capture(
            light_angle=u(0.0, 2.0 * math.pi),
            light_strength=u(0.0, 0.2),
            level=math.exp(u(-0.15, 0.15)),
            contrast=math.exp(u(-0.15, 0.15)),
            noise=u(0.005, 0.025),
            blur=u(0.0, 0.7),
        )
        pose = (
            rng.normal(0, 0.02),
            rng.normal(0, 0.02),
            u(0.96, 1.04),
            rng.normal(0, 0.03),
            u(-0.15, 0.15),
        )
        return Session(session_id, capture, tuple(float(p) for p in pose), False)  # type: ignore[arg-type]
    occlusion = str(rng.choice(OCCLUSIONS, p=[0.6, 0.15, 0.1, 0.15]))
    occ_x, occ_y = 0.0, 0.0
    if occlusion == "hand":
        occ_x, occ_y = float(rng.choice([-1.0, 1.0]) * u(0.2, 0.4)), u(0.45, 0.65)
    elif occlusion == "scarf":
        occ_y = u(0.55, 0.7)
    elif occlusion == "hair":
        occ_x = float(rng.choice([-1.0, 1.0]) * u(0.15, 0.3))
    capture = Capture(
        light_angle=u(0.0, 2.0 * math.pi),
        light_strength=u(0.15, 0.5),
        level=math.exp(u(-0.4, 0.2)),
        gamma=math.exp(u(-0.35, 0.35)),
        contrast=math.exp(float(rng.choice([-1.0, 1.0])) * u(0.1, 0.35)),
        noise=u(0.01, 0.035),
        blur=u(0.2, 1.2),
        occlusion=occlusion,
        occ_x=occ_x,
        occ_y=occ_y,
        occ_tone=u(0.2, 0.8),
    )
    pose = (
        rng.normal(0, 0.04),
        rng.normal(0, 0.04),
        u(0.92, 1.08),
        rng.normal(0, 0.06),
        u(-0.4, 0.4),
    )
    return Session(session_id, capture, tuple(float(p) for p in pose), True)  # type: ignore[arg-type]


def clip_envelope(rng: np.random.Generator, length: int) -> np.ndarray:
    """Intensity envelope ``(length,)`` in [0, 1]: neutral lead, onset, apex, offset, tail."""
    if length < 4:
        raise ValueError(f"Expected a clip length >= 4 frames but got {length!r}")
    parts = rng.dirichlet([1.0, 1.6, 3.0, 1.6, 0.8])  # lead, onset, apex, offset, tail
    edges = np.round(np.cumsum(parts) * length).astype(int)
    t = np.arange(length) + 0.5
    env = np.zeros(length, dtype=np.float64)
    a, b, c, d = edges[0], edges[1], edges[2], edges[3]

    def ramp(lo: float, hi: float) -> np.ndarray:
        s = np.clip((t - lo) / max(hi - lo, 1.0), 0.0, 1.0)
        return s * s * (3.0 - 2.0 * s)  # smoothstep: starts and ends gently

    env = ramp(a, b) * (1.0 - ramp(c, d))
    return env.astype(np.float32)


def blink_track(rng: np.random.Generator, length: int, every: float) -> np.ndarray:
    """AU45 intensities ``(length,)``: blinks ~4 frames long, about one per ``every`` frames."""
    track = np.zeros(length, dtype=np.float32)
    shape = np.array([0.5, 1.0, 1.0, 0.4], dtype=np.float32)
    t = int(rng.exponential(every))
    while t < length:
        end = min(length, t + len(shape))
        track[t:end] = np.maximum(track[t:end], shape[: end - t])
        t = end + int(rng.exponential(every)) + 8
    return track


def plan_clip(rng: np.random.Generator, identity: Identity, expression: str, length: int) -> Clip:
    """AU intensities and labels of one clip of ``identity`` showing ``expression``."""
    env = clip_envelope(rng, length)
    apex = prototype(expression) * rng.uniform(0.75, 1.15, size=len(AU_IDS)).astype(np.float32)
    apex *= float(rng.uniform(0.8, 1.0) * identity.gain)
    au = identity.rest_vector()[None, :] + env[:, None] * apex[None, :]
    au += rng.normal(0.0, 0.03, size=au.shape).astype(np.float32)  # micro-movements
    au[:, au_index(45)] = 0.0
    label = EXPRESSIONS.index(expression)
    labels = np.where(env >= LABEL_THRESHOLD, label, NEUTRAL).astype(np.int64)
    return Clip(expression, np.clip(au, 0.0, 1.0).astype(np.float32), labels, env)


def head_motion(
    rng: np.random.Generator, base: Sequence[float], length: int, shifted: bool
) -> np.ndarray:
    """Per-frame pose ``(length, 5)``: the session's base pose plus a slow random drift."""
    step = np.array([0.004, 0.004, 0.002, 0.006, 0.02]) * (1.5 if shifted else 1.0)
    drift = np.cumsum(rng.normal(0.0, step, size=(length, 5)), axis=0)
    drift -= np.linspace(0, 1, length)[:, None] * drift[-1:]  # returns near the base pose
    return (np.asarray(base, dtype=np.float64)[None, :] + drift).astype(np.float32)
