"""``ttaperso study ... --ray ADDRESS``: a study's cells as Ray tasks.

The driver plans the cells exactly as a local run does (dev cells first, then the eval
cells of the selected options), sends the missing ones to the cluster as tasks (one CPU
each), and writes the results into the same cache and report. A worker loads the models
and datasets a config names once per worker process and keeps them for its next cells.
Datasets are read where the task runs: on a multi-machine cluster every node needs the
same data paths. Dataset and model kinds registered in the driver travel with each task
(their loaders must be importable functions).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from .config import StudyConfig
from .runner import Cell, CellExecutor, _Resources, compute_cell

__all__ = ["ray_executor"]

log = logging.getLogger("ttaperso.study")

#: per worker process: resources of the configs it has seen (models, datasets loaded once)
_WORKER_RESOURCES: dict[str, _Resources] = {}


def _config_key(config: StudyConfig) -> str:
    return hashlib.sha256(json.dumps(config.raw, sort_keys=True, default=str).encode()).hexdigest()


def _run_cell(
    config: StudyConfig, cell: Cell, kinds: tuple[dict[str, Any], dict[str, Any]]
) -> dict[str, Any]:
    """The body of one Ray task."""
    from . import sources

    datasets, models = kinds
    for kind, loader in datasets.items():
        sources.register_dataset_kind(kind, loader)
    for kind, loader in models.items():
        sources.register_model_kind(kind, loader)
    key = _config_key(config)
    if key not in _WORKER_RESOURCES:
        _WORKER_RESOURCES.clear()  # one config at a time: bound the worker's memory
        _WORKER_RESOURCES[key] = _Resources(config)
    return compute_cell(config, cell, _WORKER_RESOURCES[key])


def ray_executor(address: str | None = None, *, num_cpus: int | None = None) -> CellExecutor:
    """An executor for :func:`~ttaperso.study.run_study` that runs cells as Ray tasks.

    ``address``: a running cluster (``ray://...`` or ``host:port``), or None / ``"local"``
    for a local cluster on loopback (started on first use, stopped at exit).
    """
    from ..serve.ray_backend import start_ray

    def execute(config: StudyConfig, cells: list[Cell]) -> list[dict[str, Any]]:
        from . import sources

        start_ray(address, num_cpus=num_cpus)
        import ray

        task = ray.remote(num_cpus=1, max_retries=2)(_run_cell)
        kinds = (dict(sources._DATASETS), dict(sources._MODELS))
        refs = [task.remote(config, cell, kinds) for cell in cells]
        log.info("%d cell(s) submitted to Ray", len(refs))
        return list(ray.get(refs))

    execute.name = f"Ray ({address or 'local cluster'})"  # type: ignore[attr-defined]
    return execute
