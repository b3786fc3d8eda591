"""SynthFace renderer: identity + per-frame AU intensities + pose + capture -> grey frames.

Vectorised over frames with torch on one CPU thread. Every face part is drawn with
antialiased soft edges (a sigmoid of a distance, about half a pixel wide) in the canonical
face frame, inside a small box of rows/columns around the part, so a frame costs little
more than its parts' areas. The head pose (translation, scale, roll) is then applied with
one bilinear warp, and the capture chain (directional lighting, exposure, gamma,
contrast, blur, sensor noise) acts on the warped image.

How each AU moves the face (``y`` points down; left/right are image sides, the
subject's ``asymmetry`` makes bilateral AUs stronger on one side):

* AU1 raises the inner brow ends, AU2 the outer ends; both draw forehead lines.
* AU4 lowers the brows, pulls their inner ends together and down, draws glabella furrows.
* AU5 raises the upper lids (more eye white), AU7 tightens both lids, AU6 raises the
  cheeks (lower lid up, cheek highlight and crease), AU45 closes the eyes (blink).
* AU9 wrinkles the nose bridge and lifts the nostrils, AU10 raises the upper lip; both
  deepen the nasolabial folds.
* AU12 pulls the lip corners up and out, AU15 pulls them down, AU20 stretches the mouth
  sideways, AU23 narrows and thins the lips, AU17 pushes the lower lip up (chin boss).
* AU25 parts the lips, AU26 drops the jaw (mouth opening, longer face).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .facs import AU_IDS
from .identity import Identity

__all__ = ["Capture", "NOMINAL_CAPTURE", "OCCLUSIONS", "render_frames"]

#: Occluder kinds a capture may have.
OCCLUSIONS: tuple[str, ...] = ("none", "hand", "scarf", "hair")


@dataclass(frozen=True)
class Capture:
    """Conditions of one recording session (camera, lighting, occluder).

    Attributes:
        light_angle: direction (radians, image plane) the light comes from.
        light_strength: strength of the directional lighting ramp (0 = flat).
        level: exposure gain.
        gamma: camera response exponent.
        contrast: contrast around mid-grey.
        noise: standard deviation of additive sensor noise.
        blur: Gaussian blur sigma, in pixels of a 64-pixel frame (scaled with the size).
        occlusion: one of :data:`OCCLUSIONS`.
        occ_x, occ_y: where the occluder sits (canonical face units).
        occ_tone: grey level of the occluder.
    """

    light_angle: float = 0.0
    light_strength: float = 0.0
    level: float = 1.0
    gamma: float = 1.0
    contrast: float = 1.0
    noise: float = 0.01
    blur: float = 0.0
    occlusion: str = "none"
    occ_x: float = 0.0
    occ_y: float = 0.0
    occ_tone: float = 0.5

    def __post_init__(self) -> None:
        if self.occlusion not in OCCLUSIONS:
            raise ValueError(f"Expected `occlusion` in {OCCLUSIONS} but got {self.occlusion!r}")


#: The capture of source sessions: flat light, clean camera.
NOMINAL_CAPTURE = Capture()

_COL = {au: i for i, au in enumerate(AU_IDS)}


class _Canvas:
    """Frames ``(N, S, S)`` plus the canonical pixel-centre coordinates of rows/columns."""

    def __init__(self, n: int, size: int, value: float) -> None:
        self.size = size
        self.img = torch.full((n, size, size), float(value))
        self.coord = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2.0 - 1.0
        self.px = 2.0 / size  # one pixel in canonical units
        self.edge = 0.5 * self.px  # antialiasing width

    def box(
        self, y0: float | Tensor, y1: float | Tensor, x0: float | Tensor, x1: float | Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """A writable view of the pixels whose centres lie in the box, with its coordinates
        ``y`` ``(1, h, 1)`` and ``x`` ``(1, 1, w)`` (empty when the box is off the image).

        Per-frame bounds (tensors) give the box that holds every frame's."""

        def span(a: float | Tensor, b: float | Tensor) -> slice:
            a = float(a.min()) if isinstance(a, Tensor) else a
            b = float(b.max()) if isinstance(b, Tensor) else b
            lo = max(0, math.floor((a + 1.0) / self.px))
            hi = min(self.size, math.ceil((b + 1.0) / self.px))
            return slice(lo, max(lo, hi))

        rows, cols = span(y0, y1), span(x0, x1)
        return (
            self.img[:, rows, cols],
            self.coord[rows].view(1, -1, 1),
            self.coord[cols].view(1, 1, -1),
        )

    def cover(self, d: Tensor, width: float | None = None) -> Tensor:
        """Antialiased coverage of the region ``d < 0`` (``d`` a distance in canonical units)."""
        return torch.sigmoid(d * (-1.0 / (width or self.edge)))


def _paint(view: Tensor, mask: Tensor, value: Tensor | float) -> None:
    """Blend ``value`` into ``view`` in place with coverage ``mask``."""
    if view.numel() == 0:
        return
    end = value if isinstance(value, Tensor) else torch.tensor(float(value))
    view.lerp_(end.expand_as(view) if end.dim() else end, mask.expand_as(view))


def render_frames(
    identity: Identity,
    au: np.ndarray | Tensor,
    pose: np.ndarray | Tensor,
    capture: Capture = NOMINAL_CAPTURE,
    *,
    size: int = 64,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Render ``N`` frames of ``identity``.

    Args:
        identity: the subject.
        au: ``(N, len(AU_IDS))`` AU intensities in ``[0, 1]`` (resting face included).
        pose: ``(N, 5)`` per-frame head pose ``dx, dy, scale, roll (radians), yaw`` (yaw in
            about ``[-1, 1]`` turns the inner features sideways).
        capture: the session's camera, lighting and occluder.
        size: frame side in pixels.
        generator: draws the sensor noise; no noise when ``None``.

    Returns:
        ``(N, 1, size, size)`` float32 frames in ``[0, 1]``.
    """
    au_t = torch.as_tensor(np.asarray(au, dtype=np.float32))
    pose_t = torch.as_tensor(np.asarray(pose, dtype=np.float32))
    n = au_t.shape[0]
    if au_t.shape != (n, len(AU_IDS)) or pose_t.shape != (n, 5) or n < 1:
        raise ValueError(
            f"Expected `au` (N, {len(AU_IDS)}) and `pose` (N, 5) with N >= 1 but got "
            f"{tuple(au_t.shape)} and {tuple(pose_t.shape)}"
        )
    if size < 16:
        raise ValueError(f"Expected argument `size` >= 16 but got {size!r}")
    idn = identity
    cv = _Canvas(n, size, idn.background)
    a = {au_id: au_t[:, i].view(n, 1, 1).clamp(0.0, 1.0) for au_id, i in _COL.items()}
    asym = idn.asymmetry

    def side(au_id: int, s: float) -> Tensor:
        # image side s = -1 (left) / +1 (right); asymmetry > 0 makes the left side stronger
        return (a[au_id] * (1.0 - s * asym)).clamp(0.0, 1.0)

    yaw = pose_t[:, 4].view(n, 1, 1)
    shift = 0.06 * yaw  # inner features slide sideways when the head turns
    cy = idn.face_cy
    skin = idn.skin

    # -- hair behind the head
    if idn.hair_style != 2:
        view, y, x = cv.box(cy - idn.face_h - 0.15, cy + 0.2, -idn.face_w - 0.15, idn.face_w + 0.15)
        d = torch.sqrt((x / (idn.face_w + 0.09)) ** 2 + ((y - cy + 0.05) / (idn.face_h + 0.1)) ** 2)
        _paint(view, cv.cover(d - 1.0, 0.02), idn.hair_tone)

    # -- face: an ellipse narrowing towards the chin; the jaw drop lengthens it
    jaw_drop = 0.06 * a[26]
    view, y, x = cv.box(
        cy - idn.face_h - 0.02, cy + idn.face_h + 0.1, -idn.face_w - 0.02, idn.face_w + 0.02
    )
    below = (y - cy).clamp(min=0.0) / idn.face_h
    half_w = idn.face_w * (1.0 - (1.0 - idn.jaw) * below**2)
    h = torch.where(y > cy, idn.face_h + jaw_drop, torch.tensor(idn.face_h))
    d = torch.sqrt((x / half_w) ** 2 + ((y - cy) / h) ** 2)
    shade = skin * (1.0 - 0.08 * (y - cy))  # a little darker towards the chin
    _paint(view, cv.cover(d - 1.0, 0.02), shade)
    if idn.hair_style == 1:  # fringe over the forehead
        top = cy - idn.face_h
        view, y, x = cv.box(top - 0.02, top + 0.35, -idn.face_w, idn.face_w)
        line = top + 0.22 + 0.05 * torch.cos(x * 9.0)
        _paint(view, cv.cover(y - line) * cv.cover(torch.abs(x) - idn.face_w * 0.95), idn.hair_tone)

    dark = skin * 0.55  # creases and furrows
    ink = min(idn.hair_tone, skin * 0.35)  # brows and lashes

    # -- cheeks (AU6): highlight above a crease, lifted with the cheek
    for s in (-1.0, 1.0):
        cx, cyc = s * idn.eye_dx + shift, idn.eye_y + 0.16
        view, y, x = cv.box(cyc - 0.14, cyc + 0.12, cx - 0.14, cx + 0.14)
        lift = side(6, s)
        bump = torch.exp(-(((x - cx) / 0.09) ** 2 + ((y - cyc + 0.04 * lift) / 0.06) ** 2))
        _paint(view, bump * (0.9 * lift), min(1.0, skin * 1.25))

    # -- eyes
    for s in (-1.0, 1.0):
        ex, ey = s * idn.eye_dx + shift, idn.eye_y
        view, y, x = cv.box(ey - 0.16, ey + 0.1, ex - idn.eye_w - 0.05, ex + idn.eye_w + 0.05)
        blink = 1.0 - a[45]
        up = (
            idn.eye_h
            * (1.0 + 0.9 * side(5, s) - 0.45 * a[7] - 0.3 * side(6, s) - 0.25 * a[4])
            * blink
        )
        lo = idn.eye_h * 0.75 * (1.0 - 0.55 * a[7] - 0.6 * side(6, s)) * blink
        u = (x - ex) / idn.eye_w
        bell = (1.0 - u**2).clamp(min=0.0)
        y_up, y_lo = ey - up.clamp(min=0.0) * bell, ey + lo.clamp(min=0.0) * bell
        inside = cv.cover(torch.abs(u) - 1.0, 0.05)
        white = inside * cv.cover(y_up - y) * cv.cover(y - y_lo)
        _paint(view, white, 0.92)
        iris = torch.sqrt((x - ex) ** 2 + (y - ey) ** 2) - idn.eye_h * 0.95
        _paint(view, white * cv.cover(iris), 0.12)
        # upper lid line (lashes): visible also when the eye is closed
        lid = torch.abs(y - y_up) - 0.55 * cv.px
        _paint(view, inside * cv.cover(lid), ink)
        # lower-lid crease of a raised cheek / tightened lid
        crease = torch.abs(y - (y_lo + 0.035)) - 0.35 * cv.px
        _paint(view, inside * cv.cover(crease) * (0.6 * (side(6, s) + 0.5 * a[7])), dark)

    # -- brows: a thick curve from the inner to the outer end
    for s in (-1.0, 1.0):
        ex = s * idn.eye_dx + shift
        by = idn.eye_y - idn.brow_gap
        view, y, x = cv.box(by - 0.17, by + 0.1, ex - idn.brow_len - 0.06, ex + idn.brow_len + 0.06)
        x_in = ex - s * (0.5 * idn.brow_len - 0.035 * a[4])
        x_out = ex + s * 0.5 * idn.brow_len
        t = ((x - x_in) / (x_out - x_in)).clamp(-0.2, 1.2)
        tc = t.clamp(0.0, 1.0)
        y_c = (
            by
            - idn.brow_arch * 4.0 * tc * (1.0 - tc)
            - 0.09 * side(1, s) * (1.0 - tc) ** 1.5
            - 0.09 * side(2, s) * tc**1.5
            + 0.05 * a[4]
            + 0.03 * a[4] * (1.0 - tc) ** 2
        )
        along = cv.cover(-t, 0.04) * cv.cover(t - 1.0, 0.04)
        thick = idn.brow_thick * (1.0 - 0.3 * tc)
        _paint(view, along * cv.cover(torch.abs(y - y_c) - thick), ink)
    # forehead lines (AU1/AU2) and glabella furrows (AU4)
    top_brow = idn.eye_y - idn.brow_gap
    view, y, x = cv.box(top_brow - 0.3, top_brow - 0.1, -0.3 + shift, 0.3 + shift)
    lines = torch.abs(torch.sin((y - top_brow) * 55.0)) - 0.35
    lift = 0.5 * (a[1] + a[2])
    _paint(
        view, cv.cover(lines, 0.15) * cv.cover(torch.abs(x - shift) - 0.26, 0.03) * lift * 0.8, dark
    )
    view, y, x = cv.box(top_brow - 0.06, top_brow + 0.08, -0.1 + shift, 0.1 + shift)
    furrow = torch.abs(torch.abs(x - shift) - 0.035) - 0.4 * cv.px
    _paint(
        view, cv.cover(furrow) * cv.cover(torch.abs(y - top_brow - 0.01) - 0.06, 0.02) * a[4], dark
    )

    # -- nose: wrinkles on the bridge (AU9), nostrils lifted by AU9/AU10, nasolabial folds
    ny = idn.eye_y + idn.nose_len
    nshift = 1.4 * shift
    view, y, x = cv.box(idn.eye_y - 0.02, ny + 0.06, -0.16 + nshift, 0.16 + nshift)
    wr = torch.abs(torch.sin((y - idn.eye_y) * 70.0)) - 0.4
    band = cv.cover(torch.abs(x - nshift) - 0.07, 0.02) * cv.cover(
        torch.abs(y - idn.eye_y - 0.09) - 0.06, 0.02
    )
    _paint(view, cv.cover(wr, 0.15) * band * a[9], dark)
    lift = 0.03 * a[9] + 0.02 * a[10]
    for s in (-1.0, 1.0):
        nostril = torch.sqrt(
            ((x - nshift - s * idn.nose_w * 0.55) / (0.035 + 0.01 * a[9])) ** 2
            + ((y - ny + lift) / 0.018) ** 2
        )
        _paint(view, cv.cover(nostril - 1.0, 0.15), skin * 0.3)
    side_line = torch.abs(torch.abs(x - nshift) - idn.nose_w * 0.9) - 0.4 * cv.px
    _paint(
        view,
        cv.cover(side_line) * cv.cover(torch.abs(y - ny + 0.06 + lift) - 0.06, 0.02) * 0.5,
        dark,
    )

    # -- mouth
    my = idn.mouth_y
    half = idn.mouth_w * (1.0 + 0.22 * a[12] + 0.4 * a[20] - 0.25 * a[23] - 0.1 * a[17])
    open_h = 0.025 * a[25] + 0.13 * a[26]
    view, y, x = cv.box(
        ny - 0.02,
        my + 0.32,
        -idn.mouth_w * 1.9 - 0.08 + shift,
        idn.mouth_w * 1.9 + 0.08 + shift,
    )
    xm = x - shift
    u = (xm / half).clamp(-1.3, 1.3)
    left = (u < 0).float()
    corner = left * (-0.09 * side(12, -1.0) + 0.07 * side(15, -1.0)) + (1.0 - left) * (
        -0.09 * side(12, 1.0) + 0.07 * side(15, 1.0)
    )
    corner = corner + 0.015 * a[20]
    y_line = my + corner * u**2 - 0.025 * a[10] * (1.0 - u**2).clamp(min=0.0) - 0.02 * a[17]
    inside = cv.cover(torch.abs(u) - 1.0, 0.04)
    thin = 1.0 - 0.65 * a[23]
    lip_up = idn.lip_thick * thin * (0.8 + 0.4 * a[10])
    lip_lo = idn.lip_thick * 1.2 * thin * (1.0 + 0.4 * a[17])
    bell = (1.0 - u**2).clamp(min=0.0).sqrt()
    gap = open_h * bell
    lip_tone = skin * 0.72
    upper = cv.cover(y - y_line) * cv.cover(y_line - lip_up * bell - y)
    lower = cv.cover(y - y_line - gap - lip_lo * bell) * cv.cover(y_line + gap - y)
    _paint(view, inside * (upper + lower).clamp(max=1.0), lip_tone)
    opening = cv.cover(y_line - y) * cv.cover(y - y_line - gap) * inside
    _paint(view, opening, 0.08)
    teeth = opening * cv.cover(y - y_line - 0.4 * gap) * (a[12] + a[10]).clamp(max=1.0)
    _paint(view, teeth, 0.85)
    line = torch.abs(y - y_line) - 0.45 * cv.px
    _paint(view, inside * cv.cover(line), skin * 0.3)
    # nasolabial folds: from the nose wing to beyond the mouth corner, deeper with AU6/9/10/12
    fold = (0.25 + 0.5 * (a[12] + a[10] + 0.5 * a[9] + 0.5 * a[6])).clamp(max=1.0)
    for s in (-1.0, 1.0):
        x0, y0 = s * (idn.nose_w + 0.02), ny - 0.02
        x1 = s * (idn.mouth_w * (1.0 + 0.2 * side(12, s)) + 0.06)
        y1 = my + 0.06
        tt = ((y - y0) / (y1 - y0)).clamp(0.0, 1.0)
        xf = x0 + (x1 - x0) * tt.sqrt()
        d = torch.abs(xm - xf) - 0.45 * cv.px
        band_y = cv.cover(-(y - y0), 0.02) * cv.cover(y - y1, 0.02)
        _paint(view, cv.cover(d) * band_y * fold * 0.7, dark)
    # chin boss (AU17)
    view, y, x = cv.box(my + 0.05, my + 0.3, -0.2 + shift, 0.2 + shift)
    boss = torch.exp(-((((x - shift) / 0.1) ** 2) + ((y - my - 0.15 - 0.5 * open_h) / 0.05) ** 2))
    _paint(view, boss * 0.8 * a[17], dark)

    # -- glasses: two rings and a bridge, in front of the eyes
    if idn.glasses:
        r = idn.eye_w * 1.45
        for s in (-1.0, 1.0):
            ex = s * idn.eye_dx + shift
            view, y, x = cv.box(
                idn.eye_y - r - 0.05,
                idn.eye_y + r + 0.05,
                ex - r - 0.05,
                ex + r + 0.05,
            )
            ring = (
                torch.abs(torch.sqrt((x - ex) ** 2 + ((y - idn.eye_y) * 1.25) ** 2) - r)
                - 0.6 * cv.px
            )
            _paint(view, cv.cover(ring), 0.1)
        view, y, x = cv.box(idn.eye_y - 0.05, idn.eye_y + 0.02, -idn.eye_dx, idn.eye_dx)
        bridge = torch.abs(y - idn.eye_y + 0.02) - 0.5 * cv.px
        _paint(view, cv.cover(bridge) * cv.cover(torch.abs(x - shift) - (idn.eye_dx - r)), 0.1)

    # -- occluder (moves with the head)
    _occlude(cv, capture, idn)

    img = _warp(cv.img, pose_t)
    return _camera(img, capture, generator)


def _occlude(cv: _Canvas, capture: Capture, idn: Identity) -> None:
    kind = capture.occlusion
    if kind == "none":
        return
    ox, oy = capture.occ_x, capture.occ_y
    if kind == "hand":  # a hand over one side of the mouth/jaw
        view, y, x = cv.box(oy - 0.35, oy + 0.6, ox - 0.3, ox + 0.3)
        d = torch.sqrt(((x - ox) / 0.2) ** 2 + ((y - oy) / 0.3) ** 2)
        arm = cv.cover(torch.abs(x - ox) - 0.15, 0.02) * cv.cover(oy - y, 0.02)
        _paint(view, torch.maximum(cv.cover(d - 1.0, 0.05), arm), capture.occ_tone)
    elif kind == "scarf":  # covers the chin up to about the lower lip
        view, y, x = cv.box(oy - 0.05, 1.0, -1.0, 1.0)
        edge = oy + 0.03 * torch.sin(x * 6.0 + ox * 10.0)
        _paint(view, cv.cover(edge - y, 0.015), capture.occ_tone)
    else:  # a strand of hair across one eye and brow
        view, y, x = cv.box(idn.eye_y - 0.35, idn.eye_y + 0.25, ox - 0.3, ox + 0.3)
        d = torch.abs((x - ox) + 0.6 * (y - idn.eye_y)) - 0.05
        _paint(view, cv.cover(d, 0.015), idn.hair_tone)


def _warp(img: Tensor, pose: Tensor) -> Tensor:
    """Apply each frame's pose (translation, scale, roll) with one bilinear warp."""
    n = img.shape[0]
    dx, dy, scale, roll = pose[:, 0], pose[:, 1], pose[:, 2].clamp(min=0.3), pose[:, 3]
    if bool((dx == 0).all() and (dy == 0).all() and (scale == 1).all() and (roll == 0).all()):
        return img.unsqueeze(1)
    cos, sin = torch.cos(roll) / scale, torch.sin(roll) / scale
    # output -> input: R(-roll) (p - d) / scale
    theta = torch.stack(
        [
            torch.stack([cos, sin, -(cos * dx + sin * dy)], 1),
            torch.stack([-sin, cos, sin * dx - cos * dy], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, [n, 1, img.shape[1], img.shape[2]], align_corners=False)
    return F.grid_sample(
        img.unsqueeze(1), grid, mode="bilinear", padding_mode="border", align_corners=False
    )


def _camera(img: Tensor, cap: Capture, generator: torch.Generator | None) -> Tensor:
    """Lighting, exposure, response curve, blur and noise of one session's camera."""
    size = img.shape[-1]
    if cap.light_strength:
        coord = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2.0 - 1.0
        ramp = math.cos(cap.light_angle) * coord.view(1, -1) + math.sin(
            cap.light_angle
        ) * coord.view(-1, 1)
        img = img * (1.0 + cap.light_strength * ramp)
    img = (img * cap.level).clamp(0.0, 1.0)
    if cap.gamma != 1.0:
        img = img.pow(cap.gamma)
    img = (img - 0.5) * cap.contrast + 0.5
    sigma = cap.blur * size / 64.0
    if sigma > 0.1:
        radius = max(1, math.ceil(2.5 * sigma))
        k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
        k = k / k.sum()
        img = F.pad(img, (radius, radius, radius, radius), mode="replicate")
        img = F.conv2d(img, k.view(1, 1, 1, -1))
        img = F.conv2d(img, k.view(1, 1, -1, 1))
    if generator is not None and cap.noise > 0:
        img = img + cap.noise * torch.randn(img.shape, generator=generator)
    return img.clamp(0.0, 1.0).contiguous()
