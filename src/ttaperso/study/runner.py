"""Run a study: cells (model x dataset x protocol x strategy options x seed), cached on disk.

A *cell* is one Personalizer run over every subject stream of one dataset. Its result
(per-frame predictions, targets, admission flags, per-video predictions, timing, state
bytes) is written to ``<out>/cells/<hash>.json`` (atomically) as soon as it finishes; the
hash covers everything that determines the result: the model spec and its weights' digest,
the dataset spec (and the source dataset's, which strategies using a source sample see),
the protocol, the strategy's fully resolved config, the seed and :data:`CACHE_VERSION`.
Rerunning a study, interrupted or finished, loads every cell whose file exists and computes
only the others.

Hyperparameters: for each (model, protocol, strategy) with a grid, every grid point runs on
the ``dev`` dataset; the point with the best ``select_metric`` (pooled over the dev
subjects, mean over seeds; ties -> the first point) is frozen and is the only one run on the
``eval`` datasets. Eval data never influence the choice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import metrics
from ..errors import TTAPersoError
from ..io import atomic_write_bytes
from ..model import FERModel
from ..personalizer import Personalizer
from ..source_data import SourceData
from ..strategies import make_config
from ..streams.types import SubjectStream
from .config import ProtocolSpec, StudyConfig
from .sources import load_dataset, load_model_spec, source_sample

__all__ = [
    "CACHE_VERSION",
    "Cell",
    "CellExecutor",
    "StudyRun",
    "compute_cell",
    "feed_streams",
    "run_study",
]

log = logging.getLogger("ttaperso.study")

#: bump when the meaning of a cached cell result changes (invalidates every cache).
#: 2: cells time the frozen model on the same batches (``seconds_frozen``).
CACHE_VERSION = 2


@dataclass(frozen=True)
class Cell:
    """One Personalizer run over a dataset's subject streams."""

    phase: str  # "dev" or "eval"
    model: str
    dataset: str
    protocol: str
    strategy: str
    options: dict[str, Any]
    seed: int

    def describe(self) -> str:
        """Short human-readable name (logs, progress bar)."""
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return (
            f"{self.phase}:{self.model}/{self.dataset}/{self.protocol}/{self.strategy}"
            f"{'[' + opts + ']' if opts else ''}/seed{self.seed}"
        )


@dataclass
class StudyRun:
    """What :func:`run_study` did and found."""

    config: StudyConfig
    out: Path
    cells: list[tuple[Cell, dict[str, Any]]] = field(default_factory=list)
    selections: list[dict[str, Any]] = field(default_factory=list)
    computed: int = 0
    loaded: int = 0
    wall_s: float = 0.0
    label_names: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def feed_streams(
    personalizer: Personalizer, streams: list[SubjectStream], protocol: ProtocolSpec, seed: int
) -> dict[str, dict[str, Any]]:
    """Feed every stream through ``personalizer`` as ``protocol`` says (predict, then adapt).

    Delegates the order and state handling to :func:`ttaperso.streams.protocols.run_protocol`
    (``shuffled`` is the FACTS.md section 4 protocol: each subject's frames in the order
    ``numpy.random.default_rng(seed).permutation(T)``). Returns per subject the
    predictions, targets and admission flags in the order fed, per-video predictions, and
    the subject's mean state bytes. ``seconds_in_protocol`` is the time inside
    ``predict``; ``seconds_frozen`` the time of the frozen model on the same batches, each
    run right after its ``predict`` call (their ratio is the cell's cost, measured
    interleaved so that cells run at different times or loads stay comparable).
    """
    from ..streams.protocols import run_protocol

    fed = run_protocol(
        personalizer,
        streams,
        protocol.order,
        batch_size=protocol.batch_size,
        seed=seed,
        time_frozen=True,
    )
    out: dict[str, dict[str, Any]] = {}
    keys = personalizer.subjects
    for subject, result in fed.items():
        vpred, vtarget, vids = metrics.video_predictions(
            result["logits"].cpu(), result["targets"].cpu(), result["sequences"]
        )
        own = sorted(set(result["keys"]) & set(keys))  # "subject" or "subject/session"
        out[subject] = {
            "preds": result["labels"].tolist(),
            "targets": result["targets"].tolist(),
            "updated": result["updated"].int().tolist(),
            "video_preds": vpred.tolist(),
            "video_targets": vtarget.tolist(),
            "videos": vids,
            "state_nbytes": float(np.mean([personalizer.state_nbytes(k) for k in own]))
            if own
            else 0.0,
        }
    frames = sum(len(r["preds"]) for r in out.values())
    return {
        "subjects": out,
        "seconds_in_protocol": sum(r["seconds_predict"] for r in fed.values()),
        "seconds_frozen": sum(r["seconds_frozen"] for r in fed.values()),
        "frames": frames,
    }


class _Resources:
    """Models, prepared datasets and source samples, each loaded once per run."""

    def __init__(self, config: StudyConfig) -> None:
        self.config = config
        self._models: dict[str, tuple[FERModel, str]] = {}
        self._raw: dict[str, list[SubjectStream]] = {}
        self._sources: dict[str, SourceData | None] = {}

    def model(self, name: str) -> tuple[FERModel, str]:
        if name not in self._models:
            model = load_model_spec(name, self.config.models[name])
            digest = Personalizer(model, "source").model_digest
            self._models[name] = (model, digest)
        return self._models[name]

    def raw(self, dataset: str) -> list[SubjectStream]:
        if dataset not in self._raw:
            log.info("loading dataset %s", dataset)
            self._raw[dataset] = load_dataset(dataset, self.config.datasets[dataset])
        return self._raw[dataset]

    def source(self, model_name: str) -> SourceData | None:
        if model_name not in self._sources:
            name = self.config.models[model_name].get("source", "")
            model, _ = self.model(model_name)
            self._sources[model_name] = source_sample(self.raw(name), model) if name else None
        return self._sources[model_name]

    def label_names(self, model_name: str) -> tuple[str, ...]:
        return self.model(model_name)[0].labels


def _cell_payload(cell: Cell, res: _Resources) -> dict[str, Any]:
    """Everything that determines a cell's result (hashed into its file name)."""
    config = res.config
    _, digest = res.model(cell.model)
    model_spec = config.models[cell.model]
    source = model_spec.get("source", "")
    try:
        resolved: Any = make_config(cell.strategy, **cell.options).to_dict()
    except TTAPersoError as exc:
        resolved = {"invalid": str(exc), "options": cell.options}
    return {
        "cache_version": CACHE_VERSION,
        "model": {"spec": model_spec, "digest": digest},
        "dataset": config.datasets[cell.dataset],
        "source": config.datasets[source] if source else None,
        "protocol": config.protocols[cell.protocol].to_dict(),
        "strategy": cell.strategy,
        "config": resolved,
        "seed": cell.seed,
    }


def _compute(cell: Cell, res: _Resources) -> dict[str, Any]:
    model, _ = res.model(cell.model)
    streams = res.raw(cell.dataset)
    torch.manual_seed(cell.seed)
    try:
        p = Personalizer(model, cell.strategy, source=res.source(cell.model), **cell.options)
    except TTAPersoError as exc:  # e.g. a CLIP-only strategy on a CNN
        return {"status": "n/a", "reason": str(exc)}
    fed = feed_streams(p, streams, res.config.protocols[cell.protocol], cell.seed)
    return {"status": "ok", "config": p.config.to_dict(), **fed}


def _score(result: dict[str, Any], metric: str, num_classes: int) -> float:
    subjects = result["subjects"].values()
    if metric == "mean_subject_accuracy":
        accs = [
            metrics.accuracy(torch.tensor(s["preds"]), torch.tensor(s["targets"]), num_classes)
            for s in subjects
        ]
        accs = [a for a in accs if a == a]
        return float(np.mean(accs)) if accs else float("nan")
    preds = torch.tensor([p for s in subjects for p in s["preds"]])
    targets = torch.tensor([t for s in subjects for t in s["targets"]])
    return float(getattr(metrics.scores(preds, targets, num_classes), metric))


#: runs cells elsewhere: ``executor(config, cells)`` -> their results, in order
#: (:func:`ttaperso.study.ray_cells.ray_executor` runs them as Ray tasks)
CellExecutor = Callable[[StudyConfig, list[Cell]], list[dict[str, Any]]]


def compute_cell(config: StudyConfig, cell: Cell, res: _Resources | None = None) -> dict[str, Any]:
    """One cell's result (``seconds`` included), as the local run computes it."""
    t0 = time.perf_counter()
    result = _compute(cell, res if res is not None else _Resources(config))
    result["seconds"] = time.perf_counter() - t0
    return result


def run_study(
    config: StudyConfig,
    out: str | Path,
    *,
    progress: bool | None = None,
    cache: str | Path | None = None,
    on_cell: Callable[[Cell, dict[str, Any], bool], None] | None = None,
    executor: CellExecutor | None = None,
) -> StudyRun:
    """Run (or resume) ``config``; each finished cell's result is written to the cache.

    Args:
        config: the validated study.
        out: output folder (created).
        progress: show a tqdm bar (default: only when stderr is a terminal).
        cache: folder of the cell results (default ``<out>/cells``).
        on_cell: called after every cell as ``on_cell(cell, result, computed)``
            (``computed`` False when the result came from the cache).
        executor: compute the missing cells elsewhere, many at once (``ttaperso study
            --ray``): first every dev cell, then, after the selections, every eval cell.
            Results are cached and reported exactly as a local run's.

    Returns the :class:`StudyRun` (cells with results, hyperparameter selections, how many
    cells were computed and loaded, wall time); :func:`ttaperso.study.write_report` turns
    it into the report.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    out = Path(out)
    cache = Path(cache) if cache is not None else out / "cells"
    cache.mkdir(parents=True, exist_ok=True)
    res = _Resources(config)
    run = StudyRun(config=config, out=out)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(desc=f"study {config.name}", unit="cell", disable=not show)
    #: results computed by the executor, by cell key (refusals are not cached on disk)
    remote: dict[str, dict[str, Any]] = {}

    def locate(cell: Cell) -> tuple[str, Path, dict[str, Any], dict[str, Any] | None]:
        """(key, cache file, payload, cached result or None) of a cell."""
        payload = _cell_payload(cell, res)
        key = hashlib.sha256(_canonical(payload).encode()).hexdigest()
        path = cache / f"{key[:24]}.json"
        if path.exists():
            try:
                stored = json.loads(path.read_text())
                if stored.get("key") == key:
                    return key, path, payload, stored["result"]
            except (OSError, ValueError, KeyError):
                log.warning("unreadable cell file %s: recomputing", path)
        return key, path, payload, None

    def store(
        cell: Cell, key: str, path: Path, payload: dict[str, Any], result: dict[str, Any]
    ) -> None:
        if result["status"] == "ok":  # refusals are cheap to redo and may be fixed
            record = {"key": key, "cell": payload, "result": result}
            atomic_write_bytes(path, json.dumps(record).encode())
        log.info("%s: %s (%.1fs)", cell.describe(), result["status"], result["seconds"])

    def get(cell: Cell) -> dict[str, Any]:
        key, path, payload, result = locate(cell)
        if key in remote:  # computed by the executor in this run (and cached by it)
            result = remote[key]
        computed = result is None or key in remote
        if result is None:
            result = compute_cell(config, cell, res)
            store(cell, key, path, payload, result)
        if computed:
            run.computed += 1
        else:
            run.loaded += 1
            log.debug("%s: loaded from cache", cell.describe())
        bar.update(1)
        run.cells.append((cell, result))
        if on_cell is not None:
            on_cell(cell, result, computed)
        return result

    def peek(cell: Cell) -> dict[str, Any]:
        """A prefetched or cached result, recorded nowhere (the executor's planning pass)."""
        key, _, _, result = locate(cell)
        return result if result is not None else remote[key]

    def prefetch(cells: list[Cell]) -> None:
        """Compute every missing cell of ``cells`` with the executor; cache the results."""
        assert executor is not None
        todo: dict[str, tuple[Cell, Path, dict[str, Any]]] = {}
        for cell in cells:
            key, path, payload, result = locate(cell)
            if result is None and key not in remote:
                todo.setdefault(key, (cell, path, payload))
        if not todo:
            return
        log.info("computing %d cell(s) with %s", len(todo), getattr(executor, "name", "executor"))
        results = executor(config, [cell for cell, _, _ in todo.values()])
        for (key, (cell, path, payload)), result in zip(todo.items(), results, strict=True):
            remote[key] = result
            store(cell, key, path, payload, result)

    def walk(
        dev: Callable[[Cell], dict[str, Any]], evaluate: Callable[[Cell], Any]
    ) -> list[dict[str, Any]]:
        """Visit the cells in the local run's order; return the selections."""
        selections = []
        for model_name in config.models:
            run.label_names[model_name] = res.label_names(model_name)
            num_classes = len(run.label_names[model_name])
            for protocol in config.protocols:
                for strategy in config.strategies:
                    points = config.grid_points(strategy)
                    chosen = points[0]
                    selection: dict[str, Any] = {
                        "model": model_name,
                        "protocol": protocol,
                        "strategy": strategy,
                        "dev": config.dev,
                        "metric": config.select_metric,
                        "candidates": [],
                    }
                    if len(points) > 1:
                        best = -float("inf")
                        for options in points:
                            values = []
                            for seed in config.seeds:
                                cell = Cell(
                                    "dev", model_name, config.dev, protocol, strategy, options, seed
                                )
                                result = dev(cell)
                                if result["status"] == "ok":
                                    values.append(_score(result, config.select_metric, num_classes))
                            value = float(np.mean(values)) if values else float("nan")
                            selection["candidates"].append({"options": options, "score": value})
                            if value > best:  # NaN never wins
                                best, chosen = value, options
                    selection["selected"] = chosen
                    selections.append(selection)
                    for dataset in config.eval:
                        for seed in config.seeds:
                            evaluate(
                                Cell("eval", model_name, dataset, protocol, strategy, chosen, seed)
                            )
        return selections

    try:
        if executor is not None:
            dev_cells: list[Cell] = []

            def plan(cell: Cell) -> dict[str, Any]:
                dev_cells.append(cell)
                return {"status": "planned"}  # no score yet: the plan needs only the cells

            walk(plan, lambda c: None)
            prefetch(dev_cells)
            eval_cells: list[Cell] = []
            walk(peek, eval_cells.append)
            prefetch(eval_cells)
        run.selections = walk(get, get)
    finally:
        bar.close()
        run.wall_s = time.perf_counter() - start
    log.info(
        "study %s: %d cells computed, %d loaded from the cache, %.1fs",
        config.name,
        run.computed,
        run.loaded,
        run.wall_s,
    )
    return run
