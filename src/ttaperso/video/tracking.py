"""Keep one subject id per face across frames: IoU/centroid matching with short-miss tolerance.

Each frame's detections are matched to the live tracks by an optimal assignment
(:func:`scipy.optimize.linear_sum_assignment`) on a cost mixing box overlap and centre
distance; a pair is allowed only when the boxes overlap (IoU >= ``min_iou``) or their
centres are within ``max_shift`` face widths. A track not matched keeps its last box for
up to ``max_missed`` frames (a blink, a turned head, a detector miss) and is then put
aside as *lost*; a detection matched to no live track revives the nearest lost track
(same gating, ``max_shift`` doubled) if it was lost less than ``forget_after`` frames ago,
so a face the detector misses for a second or two keeps its id; otherwise it starts a new
track with the next id (``face-1``, ``face-2``, ...). Ids are never reused within a run.

With ``single_subject`` set (``ttaperso run --subject ID``) there is one person: the
largest face of each frame is that subject, whatever its position, and no other face is
tracked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .detection import Box, Detection

__all__ = ["Track", "FaceTracker", "iou"]


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``(x, y, w, h)`` boxes."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def _shift(a: Box, b: Box) -> float:
    """Distance between the boxes' centres, in units of their mean side."""
    ca = (a[0] + a[2] / 2, a[1] + a[3] / 2)
    cb = (b[0] + b[2] / 2, b[1] + b[3] / 2)
    side = max(1.0, (a[2] + a[3] + b[2] + b[3]) / 4)
    return float(np.hypot(ca[0] - cb[0], ca[1] - cb[1]) / side)


@dataclass
class Track:
    """One face followed across frames.

    Attributes:
        subject: the subject id its frames are personalized under.
        box: the last box (detected, or carried over while missed).
        detected: whether this frame's detector found it (False: carried over).
        missed: consecutive frames without a detection.
        frames: frames it was detected in.
        first_time: time (s) of its first detection.
    """

    subject: str
    box: Box
    detected: bool = True
    missed: int = 0
    frames: int = 1
    first_time: float = 0.0


class FaceTracker:
    """Matches each frame's detections to subjects (see the module docstring).

    Args:
        max_missed: frames a track survives without a detection.
        forget_after: frames a lost track can still be revived by a detection near it.
        min_iou: overlap that allows a match.
        max_shift: centre distance (in face sides) that allows a match without overlap.
        single_subject: the one subject id of a one-person video, or None.
        prefix: ids of new tracks are ``f"{prefix}-{n}"``.
    """

    def __init__(
        self,
        *,
        max_missed: int = 12,
        forget_after: int = 250,
        min_iou: float = 0.2,
        max_shift: float = 0.75,
        single_subject: str | None = None,
        prefix: str = "face",
    ) -> None:
        if not isinstance(max_missed, int) or max_missed < 0:
            raise ConfigError(f"Expected a number of missed frames >= 0 but got {max_missed!r}")
        self.max_missed = max_missed
        self.forget_after = max(0, int(forget_after))
        self.lost: list[Track] = []
        self.min_iou = float(min_iou)
        self.max_shift = float(max_shift)
        self.single_subject = single_subject
        self.prefix = prefix
        self.tracks: list[Track] = []
        self._next = 1

    def _new(self, detection: Detection, t: float) -> Track:
        if self.single_subject is not None:
            subject = self.single_subject
        else:
            subject = f"{self.prefix}-{self._next}"
            self._next += 1
        return Track(subject, detection.box, first_time=t)

    def update(self, detections: Sequence[Detection], t: float = 0.0) -> list[Track]:
        """Advance one frame; return the live tracks (matched, new, or carried over)."""
        if self.single_subject is not None:
            return self._update_single(detections, t)
        tracks, dets = self.tracks, list(detections)
        pairs = self._assign(tracks, dets, self.max_shift)
        for i, j in pairs:
            tracks[i].box, tracks[i].detected, tracks[i].missed = dets[j].box, True, 0
            tracks[i].frames += 1
        matched_tracks = {i for i, _ in pairs}
        matched_dets = {j for _, j in pairs}
        alive = []
        for i, track in enumerate(tracks):
            if i not in matched_tracks:
                track.detected = False
                track.missed += 1
                if track.missed > self.max_missed:
                    self.lost.append(track)
                    continue
            alive.append(track)
        for track in self.lost:
            track.missed += 1
        self.lost = [t for t in self.lost if t.missed <= self.max_missed + self.forget_after]
        rest = [d for j, d in enumerate(dets) if j not in matched_dets]
        if rest and self.lost:
            revived = self._assign(self.lost, rest, 2 * self.max_shift)
            for i, j in revived:
                track = self.lost[i]
                track.box, track.detected, track.missed = rest[j].box, True, 0
                track.frames += 1
                alive.append(track)
            gone = {i for i, _ in revived}
            self.lost = [t for i, t in enumerate(self.lost) if i not in gone]
            rest = [d for j, d in enumerate(rest) if j not in {j for _, j in revived}]
        # New faces, largest first (stable ids when several appear at once).
        new = sorted(rest, key=lambda d: (-d.box[2] * d.box[3], d.box[0], d.box[1]))
        alive += [self._new(d, t) for d in new]
        self.tracks = alive
        return list(alive)

    def _assign(
        self, tracks: Sequence[Track], dets: Sequence[Detection], max_shift: float
    ) -> list[tuple[int, int]]:
        """Optimal (track, detection) index pairs among the allowed ones."""
        if not tracks or not dets:
            return []
        from scipy.optimize import linear_sum_assignment

        big = 1e6
        cost = np.full((len(tracks), len(dets)), big)
        for i, track in enumerate(tracks):
            for j, det in enumerate(dets):
                overlap, shift = iou(track.box, det.box), _shift(track.box, det.box)
                if overlap >= self.min_iou or shift <= max_shift:
                    cost[i, j] = (1.0 - overlap) + shift
        rows, cols = linear_sum_assignment(cost)
        return [
            (i, j) for i, j in zip(rows.tolist(), cols.tolist(), strict=True) if cost[i, j] < big
        ]

    def _update_single(self, detections: Sequence[Detection], t: float) -> list[Track]:
        largest = max(detections, key=lambda d: d.box[2] * d.box[3], default=None)
        if not self.tracks:
            if largest is None:
                return []
            self.tracks = [self._new(largest, t)]
            return list(self.tracks)
        track = self.tracks[0]
        if largest is not None:
            track.box, track.detected, track.missed = largest.box, True, 0
            track.frames += 1
        else:
            track.detected = False
            track.missed += 1
            if track.missed > self.max_missed:
                # The subject keeps its id (and state): only the box is forgotten.
                self.tracks = []
                return []
        return list(self.tracks)
