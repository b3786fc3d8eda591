"""Reader for CK+-style sequence folders: ``<root>/<subject>/<sequence>/<frames>``.

Each sequence is a short posed video stored as images, from a neutral onset to the apex
of one expression (CK+: ``S005/001/S005_001_00000001.png`` ...). A sequence carries one
label; the frames get it by the usual convention: the first ``neutral_frames`` frames are
``neutral``, the last ``apex_frames`` frames carry the sequence's label, the frames in
between are unlabelled (they adapt the subject's state but are not scored). A sequence
without a label gives neutral onset frames and unlabelled others.

Sequence labels come from, in this order: ``sequence_labels`` (a mapping
``{(subject, sequence): label name}``), CK+'s ``Emotion`` folder
(``<emotion_root>/<subject>/<sequence>/*_emotion.txt`` holding a code 0-7, see
:data:`ttaperso.streams.data.CKPLUS_EMOTIONS`), or a ``label.txt`` file inside the sequence folder
holding the label name.

Faces are detected on every frame and cropped like fer; a frame where detection fails is
cropped with the sequence's last detected box (see
:func:`ttaperso.streams.faces.crop_sequence_like_fer`); a sequence without any face raises.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, InputError
from .data import CKPLUS_EMOTIONS
from .datasets import IMAGE_SUFFIXES
from .faces import crop_sequence_like_fer, load_gray
from .frames import Crop, check_crop, resize_gray, stack_faces
from .types import UNLABELLED, SubjectStream

__all__ = ["CKPLUS_LABELS", "read_sequence_folders"]

#: default label names: CK+'s 8 classes with FER2013 names ("contempt" is not a FER2013 class:
#: relabel onto a 7-class model refuses it, naming the file; drop those sequences first)
CKPLUS_LABELS: tuple[str, ...] = tuple(CKPLUS_EMOTIONS[k] for k in sorted(CKPLUS_EMOTIONS))


def _natural_key(path: Path) -> list[object]:
    # "frame10.png" after "frame9.png": compare digit runs as numbers.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def read_sequence_folders(
    root: str | os.PathLike[str],
    *,
    sequence_labels: Mapping[tuple[str, str], str] | None = None,
    emotion_root: str | os.PathLike[str] | None = None,
    label_names: Sequence[str] = CKPLUS_LABELS,
    neutral_frames: int = 1,
    apex_frames: int | None = 3,
    crop: Crop = "fer",
    size: int | None = 64,
) -> list[SubjectStream]:
    """One stream per subject; its sequences one after another, frames in name order.

    Args:
        root: the folder holding ``<subject>/<sequence>/<image files>``.
        sequence_labels: ``{(subject, sequence): label name}``; wins over the files.
        emotion_root: CK+'s ``Emotion`` folder (numeric codes, :data:`CKPLUS_EMOTIONS`).
        label_names: the allowed class names in index order; a sequence label outside them
            raises, naming the sequence folder.
        neutral_frames: how many onset frames are labelled ``neutral`` (0: none; needs
            ``"neutral"`` in ``label_names`` when > 0).
        apex_frames: how many final frames carry the sequence label; ``None``: every frame
            after the neutral onset.
        crop: ``"fer"`` (detect per frame, carry the box over misses) or ``"none"``.
        size: side of the crops.
    """
    check_crop(crop, size)
    names = tuple(str(n) for n in label_names)
    for arg, value in (("neutral_frames", neutral_frames), ("apex_frames", apex_frames)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ConfigError(
                f"Expected argument `{arg}` to be a non-negative int but got {value!r}"
            )
    if neutral_frames > 0 and "neutral" not in names:
        raise ConfigError(
            f"neutral_frames={neutral_frames} needs 'neutral' in `label_names` {names}"
        )
    folder = Path(root)
    if not folder.is_dir():
        raise InputError(f"{str(folder)!r} is not a folder of <subject>/<sequence>/ folders")
    streams = []
    for subject_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        faces: list[np.ndarray] = []
        labels: list[int] = []
        sequences: list[str] = []
        sources: list[str] = []
        for seq_dir in sorted(p for p in subject_dir.iterdir() if p.is_dir()):
            entries = [p for p in seq_dir.iterdir() if not p.name.startswith(".")]
            odd = [
                p
                for p in entries
                if p.name != "label.txt" and p.suffix.lower() not in IMAGE_SUFFIXES
            ]
            if odd:
                raise InputError(
                    f"{odd[0]}: not an image file (expected one of {IMAGE_SUFFIXES} or "
                    "label.txt in a sequence folder)"
                )
            files = sorted((p for p in entries if p.name != "label.txt"), key=_natural_key)
            if not files:
                raise InputError(f"{seq_dir}: a sequence folder without image files")
            label_name = _sequence_label(subject_dir.name, seq_dir, sequence_labels, emotion_root)
            if label_name is not None and label_name not in names:
                raise InputError(f"{seq_dir}: sequence label {label_name!r} is not one of {names}")
            grays = (load_gray(p) for p in files)  # load_gray names an unreadable file
            if crop == "fer":
                crops, _ = crop_sequence_like_fer(grays, size or 64, name=str(seq_dir))
            else:
                crops = [resize_gray(g, size) for g in grays]
            faces.extend(crops)
            labels.extend(_frame_labels(len(files), label_name, names, neutral_frames, apex_frames))
            sequences.extend([seq_dir.name] * len(files))
            sources.extend(str(p) for p in files)
        if faces:
            streams.append(
                SubjectStream(
                    subject=subject_dir.name,
                    images=stack_faces(faces, sources),
                    labels=torch.tensor(labels, dtype=torch.long),
                    label_names=names,
                    sequences=tuple(sequences),
                    sources=tuple(sources),
                )
            )
    if not streams:
        raise InputError(f"{str(folder)!r}: no <subject>/<sequence>/ image folders inside")
    return streams


def _sequence_label(
    subject: str,
    seq_dir: Path,
    given: Mapping[tuple[str, str], str] | None,
    emotion_root: str | os.PathLike[str] | None,
) -> str | None:
    if given is not None and (subject, seq_dir.name) in given:
        return str(given[(subject, seq_dir.name)])
    if emotion_root is not None:
        files = sorted((Path(emotion_root) / subject / seq_dir.name).glob("*_emotion.txt"))
        if files:
            text = files[0].read_text().strip()
            try:
                code = int(float(text))
            except ValueError:
                raise InputError(
                    f"{files[0]}: expected a CK+ emotion code but got {text!r}"
                ) from None
            if code not in CKPLUS_EMOTIONS:
                raise InputError(
                    f"{files[0]}: emotion code {code} is not one of {sorted(CKPLUS_EMOTIONS)}"
                )
            return CKPLUS_EMOTIONS[code]
    label_file = seq_dir / "label.txt"
    if label_file.is_file():
        return label_file.read_text(encoding="utf-8").strip() or None
    return None


def _frame_labels(
    count: int,
    label_name: str | None,
    names: tuple[str, ...],
    neutral_frames: int,
    apex_frames: int | None,
) -> list[int]:
    labels = [UNLABELLED] * count
    onset = min(neutral_frames, count)
    if label_name is not None:
        start = onset if apex_frames is None else max(onset, count - apex_frames)
        for i in range(start, count):
            labels[i] = names.index(label_name)
    for i in range(onset):
        labels[i] = names.index("neutral")
    return labels
