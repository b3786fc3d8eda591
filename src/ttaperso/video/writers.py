"""What ``ttaperso run`` writes: predictions (CSV + JSONL), an annotated MP4, a timeline PNG.

Every writer takes one :class:`~ttaperso.video.session.FrameResult` at a time and keeps
nothing per frame in memory (the timeline keeps a fixed number of bins per subject), so
a camera can run for hours. Rows are flushed every second of video, so an interrupted
run leaves valid files with everything up to the interruption.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from .session import FaceResult, FrameResult

__all__ = [
    "PredictionWriter",
    "AnnotatedVideoWriter",
    "Timeline",
    "prediction_columns",
]


def prediction_columns(labels: Sequence[str]) -> list[str]:
    """Columns of ``predictions.csv``: one row per decoded frame and face."""
    return [
        "frame",
        "time",
        "subject",
        "x",
        "y",
        "w",
        "h",
        "label",
        *(f"p_{label}" for label in labels),
        "updated",
        "face_found",
    ]


class PredictionWriter:
    """``predictions.csv`` and its JSONL twin ``predictions.jsonl`` (same rows, same order).

    A frame without any face gets one row with an empty subject, box and label and
    ``face_found`` false; a face carried over a detector miss has ``face_found`` false
    and its subject's last probabilities (see :class:`~ttaperso.video.session.FaceResult`).
    """

    def __init__(self, folder: Path, labels: Sequence[str], flush_every: int = 25) -> None:
        self.labels = tuple(labels)
        self.columns = prediction_columns(self.labels)
        self.csv_path = folder / "predictions.csv"
        self.jsonl_path = folder / "predictions.jsonl"
        self._csv_file: IO[str] = open(self.csv_path, "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._jsonl: IO[str] = open(self.jsonl_path, "w", encoding="utf-8")  # noqa: SIM115
        self._csv = csv.writer(self._csv_file)
        self._csv.writerow(self.columns)
        self._flush_every = max(1, flush_every)
        self.rows = 0
        self.frames = 0

    def _row(self, result: FrameResult, face: FaceResult | None) -> dict[str, Any]:
        row: dict[str, Any] = {"frame": result.index, "time": round(result.time, 4)}
        if face is None:
            row.update(subject="", x="", y="", w="", h="", label="")
            row.update({f"p_{label}": "" for label in self.labels})
            row.update(updated=False, face_found=False)
            return row
        x, y, w, h = face.box
        row.update(subject=face.subject, x=x, y=y, w=w, h=h, label=face.label)
        if face.probs:
            row.update(
                {f"p_{k}": round(v, 6) for k, v in zip(self.labels, face.probs, strict=True)}
            )
        else:  # a subject carried over before its first prediction
            row.update({f"p_{k}": "" for k in self.labels})
        row.update(updated=face.updated, face_found=face.face_found)
        return row

    def write(self, result: FrameResult) -> None:
        """Append the rows of one frame."""
        for face in result.faces or (None,):
            row = self._row(result, face)
            self._csv.writerow([_csv_value(row[c]) for c in self.columns])
            self._jsonl.write(
                json.dumps({k: (None if v == "" else v) for k, v in row.items()}) + "\n"
            )
            self.rows += 1
        self.frames += 1
        if self.frames % self._flush_every == 0:
            self.flush()

    def flush(self) -> None:
        self._csv_file.flush()
        self._jsonl.flush()

    def close(self) -> None:
        self._csv_file.close()
        self._jsonl.close()


def _csv_value(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


# ------------------------------------------------------------------------- video
_COLOURS = [(80, 200, 80), (60, 140, 255), (255, 160, 60), (200, 80, 220), (60, 220, 220)]


class AnnotatedVideoWriter:
    """The input frames with each face's box, label and a confidence bar, as an MP4.

    Encoded with OpenCV's ``mp4v`` codec (available in every opencv-python wheel); opened
    at the first frame, whose size it keeps.
    """

    def __init__(self, path: Path, fps: float) -> None:
        self.path = path
        self.fps = float(fps)
        self._writer: Any = None
        self._colours: dict[str, tuple[int, int, int]] = {}
        self.frames = 0

    def _colour(self, subject: str) -> tuple[int, int, int]:
        if subject not in self._colours:
            self._colours[subject] = _COLOURS[len(self._colours) % len(_COLOURS)]
        return self._colours[subject]

    def write(self, result: FrameResult) -> None:
        import cv2

        image = result.image
        if self._writer is None:
            h, w = image.shape[:2]
            fourcc = cv2.VideoWriter.fourcc(*"mp4v")
            self._writer = cv2.VideoWriter(str(self.path), fourcc, self.fps, (w, h))
            if not self._writer.isOpened():
                from ..errors import InputError

                raise InputError(f"{self.path}: OpenCV cannot write an MP4 video here")
        canvas = image.copy()
        for face in result.faces:
            self._draw(cv2, canvas, face)
        self._writer.write(canvas)
        self.frames += 1

    def _draw(self, cv2: Any, canvas: np.ndarray, face: FaceResult) -> None:
        x, y, w, h = face.box
        colour = self._colour(face.subject)
        thickness = 2 if face.face_found else 1
        cv2.rectangle(canvas, (x, y), (x + w, y + h), colour, thickness)
        text = f"{face.subject}: {face.label or '...'}"
        if face.probs:
            text += f" {face.confidence:.2f}"
        if face.calibrating:
            text += " (calibrating)"
        top = max(14, y - 18)
        cv2.putText(canvas, text, (x, top), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, 1, cv2.LINE_AA)
        # confidence bar under the label: full width of the box = probability 1
        bar_y = top + 4
        cv2.rectangle(canvas, (x, bar_y), (x + w, bar_y + 5), (40, 40, 40), -1)
        cv2.rectangle(canvas, (x, bar_y), (x + int(w * face.confidence), bar_y + 5), colour, -1)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()


# ----------------------------------------------------------------------- timeline
class Timeline:
    """Per-subject probability curves for ``timeline.png``, in a fixed number of bins.

    Each subject keeps at most ``bins`` points: when full, neighbouring points are merged
    (averaged) and the bin width doubles, so memory is bounded whatever the duration.
    """

    def __init__(self, labels: Sequence[str], bins: int = 2048) -> None:
        self.labels = tuple(labels)
        self.bins = max(16, bins)
        self._data: dict[str, dict[str, Any]] = {}

    def add(self, result: FrameResult) -> None:
        for face in result.faces:
            if not face.face_found or not face.probs:
                continue
            entry = self._data.setdefault(
                face.subject, {"width": 1, "t": [], "p": [], "acc_t": 0.0, "acc_p": None, "n": 0}
            )
            probs = np.asarray(face.probs, dtype=np.float64)
            entry["acc_t"] += result.time
            entry["acc_p"] = probs if entry["acc_p"] is None else entry["acc_p"] + probs
            entry["n"] += 1
            if entry["n"] == entry["width"]:
                entry["t"].append(entry["acc_t"] / entry["n"])
                entry["p"].append(entry["acc_p"] / entry["n"])
                entry["acc_t"], entry["acc_p"], entry["n"] = 0.0, None, 0
                if len(entry["t"]) >= self.bins:
                    entry["t"] = [
                        (a + b) / 2 for a, b in zip(entry["t"][::2], entry["t"][1::2], strict=False)
                    ]
                    entry["p"] = [
                        (a + b) / 2 for a, b in zip(entry["p"][::2], entry["p"][1::2], strict=False)
                    ]
                    entry["width"] *= 2

    def curves(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Subject -> (times ``(T,)``, probabilities ``(T, C)``)."""
        out = {}
        for subject, entry in self._data.items():
            t, p = list(entry["t"]), list(entry["p"])
            if entry["n"]:
                t.append(entry["acc_t"] / entry["n"])
                p.append(entry["acc_p"] / entry["n"])
            if t:
                out[subject] = (np.asarray(t), np.stack(p))
        return out

    def save(self, path: Path, title: str = "") -> bool:
        """Write the PNG (one panel per subject); False when no face was ever predicted."""
        curves = self.curves()
        if not curves:
            return False
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(
            len(curves), 1, figsize=(10, 2.2 * len(curves) + 0.6), sharex=True, squeeze=False
        )
        for ax, (subject, (t, p)) in zip(axes[:, 0], curves.items(), strict=True):
            # a gap (the face was not seen for more than a second) breaks the lines
            gaps = np.flatnonzero(
                np.diff(t) > max(1.0, 4 * float(np.median(np.diff(t))) if len(t) > 1 else 1.0)
            )
            t = np.insert(t, gaps + 1, np.nan)
            p = np.insert(p, gaps + 1, np.nan, axis=0)
            for k, label in enumerate(self.labels):
                ax.plot(t, p[:, k], label=label, linewidth=1.0)
            ax.set_ylim(0, 1)
            ax.set_ylabel("probability")
            ax.set_title(subject, fontsize=10, loc="left")
        axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        axes[-1, 0].set_xlabel("time (s)")
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return True
