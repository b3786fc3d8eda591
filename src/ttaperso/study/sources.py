"""What a study config's ``kind`` keys name: dataset readers and model loaders.

A dataset kind maps a ``[datasets.NAME]`` table to a list of
:class:`~ttaperso.streams.SubjectStream` (the readers live in :mod:`ttaperso.streams`; this
module only dispatches to them); a model kind maps a ``[models.NAME]`` table to a
:class:`~ttaperso.FERModel`. Register more with :func:`register_dataset_kind` /
:func:`register_model_kind` (tests register tiny synthetic ones).

Built-in dataset kinds: ``jaffe`` (``root``, ``crop``, ``size``), ``yale`` (``root``,
``conditions``, ``crop``, ``size``), ``class_folders`` (``folder`` under the data root or
``root``, ``max_per_class``, ``seed``, ``size``, ``crop``) and, when SynthFace is installed,
``synthface`` (:mod:`ttaperso.study.synthface_kinds`). Built-in model kinds: ``registry``
(``name``: :func:`ttaperso.load_model`) and ``synthface-demo`` (the demo's CNN trained on
SynthFace source subjects, cached).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import ConfigError, InputError
from ..model import FERModel
from ..source_data import SourceData
from ..streams.data import data_root
from ..streams.types import UNLABELLED, SubjectStream

__all__ = [
    "DatasetLoader",
    "ModelLoader",
    "register_dataset_kind",
    "register_model_kind",
    "dataset_kinds",
    "model_kinds",
    "load_dataset",
    "load_model_spec",
    "source_sample",
]

DatasetLoader = Callable[[Mapping[str, Any]], list[SubjectStream]]
ModelLoader = Callable[[Mapping[str, Any]], FERModel]

_DATASETS: dict[str, DatasetLoader] = {}
_MODELS: dict[str, ModelLoader] = {}


def register_dataset_kind(kind: str, loader: DatasetLoader) -> None:
    """Make ``kind = "<kind>"`` in a ``[datasets.NAME]`` table call ``loader(table)``."""
    _DATASETS[kind] = loader


def register_model_kind(kind: str, loader: ModelLoader) -> None:
    """Make ``kind = "<kind>"`` in a ``[models.NAME]`` table call ``loader(table)``."""
    _MODELS[kind] = loader


def dataset_kinds() -> list[str]:
    """Registered dataset kinds."""
    return sorted(_DATASETS)


def model_kinds() -> list[str]:
    """Registered model kinds."""
    return sorted(_MODELS)


def _options(spec: Mapping[str, Any], allowed: set[str], where: str) -> dict[str, Any]:
    options = {k: v for k, v in spec.items() if k != "kind"}
    bad = sorted(set(options) - allowed)
    if bad:
        raise ConfigError(f"{where}: unknown keys {bad}; valid: {sorted(allowed)}")
    return options


def _jaffe(spec: Mapping[str, Any]) -> list[SubjectStream]:
    from ..streams.datasets import read_jaffe

    return read_jaffe(**_options(spec, {"root", "crop", "size"}, "jaffe dataset"))


def _yale(spec: Mapping[str, Any]) -> list[SubjectStream]:
    from ..streams.datasets import read_yale

    options = _options(spec, {"root", "conditions", "crop", "size"}, "yale dataset")
    if isinstance(options.get("conditions"), list):
        options["conditions"] = tuple(options["conditions"])
    return read_yale(**options)


def _class_folders(spec: Mapping[str, Any]) -> list[SubjectStream]:
    from ..streams.datasets import read_class_folders

    allowed = {"folder", "root", "max_per_class", "seed", "size", "crop", "name"}
    options = _options(spec, allowed, "class_folders dataset")
    folder = options.pop("folder", None)
    if "root" not in options:
        if not isinstance(folder, str):
            raise ConfigError(
                "class_folders dataset needs `root` or `folder` (under the data root)"
            )
        options["root"] = data_root() / folder
    return [read_class_folders(**options)]


def _registry_model(spec: Mapping[str, Any]) -> FERModel:
    from ..models import load_model

    options = _options(spec, {"name", "source"}, "registry model")
    if "name" not in options:
        raise ConfigError("registry model needs `name` (see `ttaperso models`)")
    return load_model(options["name"])


def _synthface(spec: Mapping[str, Any]) -> list[SubjectStream]:
    from .synthface_kinds import load_synthface

    return load_synthface(spec)


def _synthface_demo(spec: Mapping[str, Any]) -> FERModel:
    from .synthface_kinds import synthface_demo_model

    return synthface_demo_model(spec)


register_dataset_kind("jaffe", _jaffe)
register_dataset_kind("synthface", _synthface)
register_model_kind("synthface-demo", _synthface_demo)
register_dataset_kind("yale", _yale)
register_dataset_kind("class_folders", _class_folders)
register_model_kind("registry", _registry_model)


def load_dataset(name: str, spec: Mapping[str, Any]) -> list[SubjectStream]:
    """The streams of ``[datasets.<name>]`` (ConfigError for an unknown kind)."""
    kind = spec.get("kind")
    if kind not in _DATASETS:
        raise ConfigError(
            f"[datasets.{name}] unknown kind {kind!r}; available: {', '.join(dataset_kinds())}"
        )
    from ..streams.datasets import DataFolderError

    try:
        streams = _DATASETS[kind](spec)
    except DataFolderError as exc:
        # in the study's own terms: a config key, or an override on the command line
        raise InputError(
            f"[datasets.{name}]: {str(exc.folder)!r} is not a folder; set `root` to the "
            f"{exc.dataset} folder in the config's [datasets.{name}] table (on the command "
            f"line: ttaperso study CONFIG datasets.{name}.root=PATH) or set TTAPERSO_DATA "
            "to the folder holding it"
        ) from exc
    if not streams:
        raise InputError(f"[datasets.{name}] holds no streams")
    return streams


def load_model_spec(name: str, spec: Mapping[str, Any]) -> FERModel:
    """The model of ``[models.<name>]`` (ConfigError for an unknown kind)."""
    kind = spec.get("kind")
    if kind not in _MODELS:
        raise ConfigError(
            f"[models.{name}] unknown kind {kind!r}; available: {', '.join(model_kinds())}"
        )
    return _MODELS[kind](spec)


def source_sample(streams: list[SubjectStream], model: FERModel) -> SourceData:
    """Labelled streams as the model's :class:`SourceData` (frames prepared, labels mapped).

    Unlabelled frames are dropped; each frame keeps its stream's subject id (source
    subjects, used by strategies that pick the closest source subjects).
    """
    frames, labels, subjects = [], [], []
    for stream in streams:
        mapped = stream.relabel(model.labels)
        keep = (mapped.labels != UNLABELLED).nonzero().flatten()
        if keep.numel() == 0:
            continue
        frames.append(torch.cat([model.prepare(c) for c in mapped.images[keep].split(512)]))
        labels.append(mapped.labels[keep])
        subjects += [stream.subject] * int(keep.numel())
    if not frames:
        raise InputError("The source dataset has no labelled frame")
    return SourceData(torch.cat(frames), labels=torch.cat(labels), subjects=subjects)
