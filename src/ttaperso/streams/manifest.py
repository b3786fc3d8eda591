"""Reader for an image folder described by a CSV manifest.

The manifest has a header row and one row per frame::

    path,subject,sequence,frame,label
    p017/visit1/0001.png,patient-017,visit1,1,neutral
    p017/visit1/0002.png,patient-017,visit1,2,
    ...

``path`` and ``subject`` are required; ``sequence`` (video/session id), ``frame`` (an integer
position inside the sequence) and ``label`` (a class name; empty = unlabelled) are optional
columns. Relative paths are relative to the manifest's folder (or ``root``). One
:class:`SubjectStream` per subject, in order of first appearance in the file; inside a
subject, sequences in order of first appearance and frames by ``frame`` when the column is
there, else in file order.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .frames import Crop, check_crop, stack_faces, still_face
from .types import UNLABELLED, SubjectStream

__all__ = ["MANIFEST_COLUMNS", "read_manifest"]

#: the columns a manifest may have; the first two are required
MANIFEST_COLUMNS = ("path", "subject", "sequence", "frame", "label")


def read_manifest(
    manifest: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    label_names: Sequence[str] | None = None,
    crop: Crop = "fer",
    size: int | None = 64,
) -> list[SubjectStream]:
    """Read the frames a CSV manifest lists, grouped into one stream per subject.

    Args:
        manifest: the CSV file (UTF-8, header row, comma separated).
        root: folder that relative paths start from (default: the manifest's folder).
        label_names: the allowed class names, in index order (e.g. ``model.labels``); a
            label outside them raises, naming the file. Default: the sorted names found.
        crop: ``"fer"`` detects and crops the face as fer does; ``"none"`` for face crops.
        size: side of the returned crops (``None`` with ``crop="none"``: keep the size).

    Raises:
        InputError: a missing required column, an unknown column, an empty path or subject,
            a non-integer ``frame``, a label outside ``label_names``, an unreadable image or a
            missed face (each names the manifest line or the image file).
    """
    check_crop(crop, size)
    path = Path(manifest)
    base = Path(root) if root is not None else path.parent
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = tuple(c.strip() for c in (reader.fieldnames or ()))
            rows = [
                ({(k or "").strip(): (v or "").strip() for k, v in row.items()}, reader.line_num)
                for row in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"Could not read the manifest {str(path)!r}: {exc}") from exc
    missing = [c for c in MANIFEST_COLUMNS[:2] if c not in columns]
    unknown = [c for c in columns if c not in MANIFEST_COLUMNS]
    if missing or unknown:
        raise InputError(
            f"{path}: expected a header with columns {MANIFEST_COLUMNS[:2]} (required) and "
            f"optionally {MANIFEST_COLUMNS[2:]}; missing {missing}, unknown {unknown}"
        )
    if not rows:
        raise InputError(f"{path}: the manifest lists no frames")

    names = _label_names(rows, label_names)
    by_subject: dict[str, list[tuple[tuple[int, int, int], str, str, int, Path]]] = defaultdict(
        list
    )
    sequence_rank: dict[tuple[str, str], int] = {}
    for row, line in rows:
        where = f"{path}:{line}"
        if not row.get("path") or not row.get("subject"):
            raise InputError(f"{where}: empty `path` or `subject`")
        subject, sequence = row["subject"], row.get("sequence", "")
        rank = sequence_rank.setdefault((subject, sequence), len(sequence_rank))
        frame = 0
        if row.get("frame", ""):
            try:
                frame = int(row["frame"])
            except ValueError:
                raise InputError(
                    f"{where}: expected an integer `frame` but got {row['frame']!r}"
                ) from None
        label_name = row.get("label", "")
        file = Path(row["path"])
        file = file if file.is_absolute() else base / file
        if label_name and label_name not in names:
            raise InputError(f"{file} ({where}): label {label_name!r} is not one of {tuple(names)}")
        label = names.index(label_name) if label_name else UNLABELLED
        by_subject[subject].append(((rank, frame, line), sequence, str(file), label, file))

    streams = []
    for subject, entries in by_subject.items():
        entries.sort(key=lambda e: e[0])
        faces: list[np.ndarray] = [still_face(e[4], crop, size) for e in entries]
        sources = tuple(e[2] for e in entries)
        streams.append(
            SubjectStream(
                subject=subject,
                images=stack_faces(faces, sources),
                labels=torch.tensor([e[3] for e in entries], dtype=torch.long),
                label_names=tuple(names),
                sequences=tuple(e[1] for e in entries),
                sources=sources,
            )
        )
    return streams


def _label_names(rows: list[tuple[dict[str, str], int]], given: Sequence[str] | None) -> list[str]:
    if given is not None:
        names = [str(n) for n in given]
        if not names or len(set(names)) != len(names):
            raise InputError(
                f"Expected argument `label_names` to be unique class names but got {names!r}"
            )
        return names
    return sorted({row.get("label", "") for row, _ in rows} - {""})
