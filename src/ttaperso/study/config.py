"""Study configuration: a TOML file plus ``key=value`` overrides, validated into a StudyConfig.

Schema (every table optional unless marked)::

    name = "jaffe_all"                 # required: names the output folder and the report
    description = "..."
    seeds = [0]                        # stream-order / generator seeds
    strategies = "all"                 # or ["source", "norm", ...]; "source" (frozen) is
                                       # always added: every change is measured against it
    dev = "yale"                       # dataset used to select hyperparameters ("" = none)
    eval = ["jaffe"]                   # required: datasets the selected configs are scored on
    select_metric = "uar"              # accuracy | uar | macro_f1 | mean_subject_accuracy

    [models.fer]                       # required, one table per model
    kind = "registry"                  # load_model(name); see ttaperso.study.datasets
    name = "fer-mini-xception"
    source = "fer2013"                 # dataset giving strategies a SourceData sample

    [datasets.jaffe]                   # one table per dataset; `kind` picks the reader
    kind = "jaffe"

    [protocols.shuffled]               # required, one table per stream protocol
    order = "shuffled"                 # a ttaperso.streams.protocols name: natural,
                                       # shuffled (seeded per subject), independent,
                                       # label_correlated, continual, interleaved
    batch_size = 16

    [fixed.tent]                       # strategy options applied to every run of a strategy
    gates = []
    [grid.tent]                        # options searched on `dev` (cartesian product)
    lr = [1e-4, 1e-3]

TOML is read with the standard library's ``tomllib`` (``tomli`` on Python 3.10). An
override ``key.sub=value`` sets a (dotted) key; ``value`` is parsed as a TOML value
(``seeds=[0,1]``, ``grid.tent.lr=[1e-3]``) and taken as a plain string when it is not one
(``dev=jaffe``).
"""

from __future__ import annotations

import copy
import itertools
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "SELECT_METRICS",
    "ProtocolSpec",
    "StudyConfig",
    "apply_overrides",
    "load_study_config",
    "parse_study_config",
]

#: figures a grid point can be selected by (pooled over the dev set, mean over seeds)
SELECT_METRICS = ("accuracy", "uar", "macro_f1", "mean_subject_accuracy")
_TOP_KEYS = {
    "name",
    "description",
    "seeds",
    "strategies",
    "dev",
    "eval",
    "select_metric",
    "models",
    "datasets",
    "protocols",
    "fixed",
    "grid",
}


@dataclass(frozen=True)
class ProtocolSpec:
    """How a subject's stream is fed: frame order and frames per ``predict`` call."""

    name: str
    order: str = "natural"
    batch_size: int = 16

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (hashed into cell keys)."""
        return {"order": self.order, "batch_size": self.batch_size}


@dataclass(frozen=True)
class StudyConfig:
    """A validated study: models x strategies (grids) x datasets x protocols x seeds."""

    name: str
    eval: tuple[str, ...]
    models: dict[str, dict[str, Any]]
    datasets: dict[str, dict[str, Any]]
    protocols: dict[str, ProtocolSpec]
    strategies: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    dev: str = ""
    select_metric: str = "uar"
    fixed: dict[str, dict[str, Any]] = field(default_factory=dict)
    grid: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    def grid_points(self, strategy: str) -> list[dict[str, Any]]:
        """Every option combination of ``strategy`` (fixed options + one grid point each)."""
        grid = self.grid.get(strategy, {})
        keys = sorted(grid)
        points = []
        for values in itertools.product(*(grid[k] for k in keys)):
            points.append({**self.fixed.get(strategy, {}), **dict(zip(keys, values, strict=True))})
        return points or [dict(self.fixed.get(strategy, {}))]

    def to_dict(self) -> dict[str, Any]:
        """The resolved config (after overrides), JSON-safe."""
        return json.loads(json.dumps(self.raw))


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _table(raw: Mapping[str, Any], key: str, required: bool) -> dict[str, dict[str, Any]]:
    value = raw.get(key, {})
    _require(
        isinstance(value, Mapping) and all(isinstance(v, Mapping) for v in value.values()),
        f"Study key `{key}` must be a table of tables ([{key}.NAME]) but got {value!r}",
    )
    _require(not required or bool(value), f"Study needs at least one [{key}.NAME] table")
    return {str(k): dict(v) for k, v in value.items()}


def parse_study_config(raw: Mapping[str, Any]) -> StudyConfig:
    """Validate a study dict (as read from TOML); raise ConfigError naming the bad key."""
    from ..strategies import get_config_class, list_strategies

    unknown = sorted(set(raw) - _TOP_KEYS)
    _require(not unknown, f"Unknown study keys {unknown}; valid: {sorted(_TOP_KEYS)}")
    name: Any = raw.get("name")  # checked just below
    _require(
        isinstance(name, str) and name.replace("_", "").replace("-", "").isalnum(),
        f"Study key `name` must be a non-empty name of letters, digits, _ or - but got {name!r}",
    )
    seeds = raw.get("seeds", [0])
    _require(
        isinstance(seeds, list)
        and bool(seeds)
        and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds),
        f"Study key `seeds` must be a non-empty list of ints but got {seeds!r}",
    )
    models = _table(raw, "models", required=True)
    datasets = _table(raw, "datasets", required=True)
    for dname, spec in datasets.items():
        _require(isinstance(spec.get("kind"), str), f"[datasets.{dname}] needs a `kind`")
    for mname, spec in models.items():
        _require(isinstance(spec.get("kind"), str), f"[models.{mname}] needs a `kind`")
        source = spec.get("source", "")
        _require(
            source == "" or source in datasets,
            f"[models.{mname}] source {source!r} is not a dataset; datasets: {sorted(datasets)}",
        )
    protocols: dict[str, ProtocolSpec] = {}
    for pname, spec in _table(raw, "protocols", required=True).items():
        bad = sorted(set(spec) - {"order", "batch_size"})
        _require(not bad, f"[protocols.{pname}] unknown keys {bad}; valid: order, batch_size")
        order = spec.get("order", "natural")
        batch = spec.get("batch_size", 16)
        from ..streams.protocols import list_protocols

        _require(
            order in list_protocols(),
            f"[protocols.{pname}] order must be one of {list_protocols()} but got {order!r}",
        )
        _require(
            isinstance(batch, int) and not isinstance(batch, bool) and batch >= 1,
            f"[protocols.{pname}] batch_size must be a positive int but got {batch!r}",
        )
        protocols[pname] = ProtocolSpec(pname, order, batch)
    evals: Any = raw.get("eval")  # checked just below
    _require(
        isinstance(evals, list) and bool(evals) and all(e in datasets for e in evals),
        f"Study key `eval` must list dataset names from {sorted(datasets)} but got {evals!r}",
    )
    dev = raw.get("dev", "")
    _require(
        dev == "" or dev in datasets,
        f"Study key `dev` must be a dataset name from {sorted(datasets)} or '' but got {dev!r}",
    )
    _require(dev not in evals, f"The dev set {dev!r} is also an eval set: no tuning on test data")
    metric = raw.get("select_metric", "uar")
    _require(metric in SELECT_METRICS, f"`select_metric` must be one of {SELECT_METRICS}")
    available = list_strategies()
    wanted = raw.get("strategies", "all")
    if wanted == "all":
        strategies = list(available)
    else:
        _require(
            isinstance(wanted, list) and all(isinstance(s, str) for s in wanted),
            f"Study key `strategies` must be 'all' or a list of names but got {wanted!r}",
        )
        missing = [s for s in wanted if s not in available]
        _require(not missing, f"Unknown strategies {missing}; available: {available}")
        strategies = list(dict.fromkeys(wanted))
    if "source" not in strategies:
        strategies.insert(0, "source")  # the frozen baseline every change is measured against
    fixed = _table(raw, "fixed", required=False)
    grid = _table(raw, "grid", required=False)
    for section, tables in (("fixed", fixed), ("grid", grid)):
        for sname, options in tables.items():
            _require(sname in available, f"[{section}.{sname}]: unknown strategy {sname!r}")
            valid = get_config_class(sname).field_names()
            bad = sorted(set(options) - set(valid))
            _require(not bad, f"[{section}.{sname}] unknown options {bad}; valid: {valid}")
    for sname, options in grid.items():
        for key, values in options.items():
            _require(
                isinstance(values, list) and bool(values),
                f"[grid.{sname}] {key} must be a non-empty list of values but got {values!r}",
            )
        _require(
            dev != "" or all(len(v) == 1 for v in options.values()),
            f"[grid.{sname}] searches several values but the study names no `dev` set: "
            "hyperparameters are only selected on a development set",
        )
    return StudyConfig(
        name=name,
        description=str(raw.get("description", "")),
        eval=tuple(evals),
        models=models,
        datasets=datasets,
        protocols=protocols,
        strategies=tuple(strategies),
        seeds=tuple(seeds),
        dev=dev,
        select_metric=metric,
        fixed=fixed,
        grid={s: {k: list(v) for k, v in o.items()} for s, o in grid.items()},
        raw=copy.deepcopy(dict(raw)),
    )


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``raw`` with ``key.sub=value`` overrides applied (values parsed as TOML)."""
    out = copy.deepcopy(dict(raw))
    for item in overrides:
        key, sep, text = item.partition("=")
        _require(bool(sep) and bool(key), f"Expected an override KEY=VALUE but got {item!r}")
        parts = key.strip().split(".")
        node: dict[str, Any] = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            _require(
                isinstance(child, dict),
                f"Override {item!r}: {part!r} is a value, not a table",
            )
            node = child
        node[parts[-1]] = _parse_value(text.strip())
    return out


def load_study_config(path: str | Path, overrides: Sequence[str] = ()) -> StudyConfig:
    """Read a study TOML file, apply overrides, validate."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"Study config {str(path)!r} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Study config {str(path)!r} is not valid TOML: {exc}") from exc
    return parse_study_config(apply_overrides(raw, overrides))
