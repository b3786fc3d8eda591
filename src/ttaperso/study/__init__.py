"""Cross-dataset shift studies: config -> resumable cells -> report (``ttaperso study``).

config = load_study_config("experiments/studies/jaffe.toml", ["seeds=[0,1]"])
run = run_study(config, "experiments/results/study_jaffe")
write_report(run, command="ttaperso study experiments/studies/jaffe.toml")
"""

from __future__ import annotations

from .config import StudyConfig, apply_overrides, load_study_config, parse_study_config
from .report import aggregate, write_report
from .runner import CACHE_VERSION, Cell, StudyRun, feed_streams, run_study
from .sources import (
    dataset_kinds,
    load_dataset,
    model_kinds,
    register_dataset_kind,
    register_model_kind,
)

__all__ = [
    "CACHE_VERSION",
    "Cell",
    "StudyConfig",
    "StudyRun",
    "aggregate",
    "apply_overrides",
    "dataset_kinds",
    "feed_streams",
    "load_dataset",
    "load_study_config",
    "model_kinds",
    "parse_study_config",
    "register_dataset_kind",
    "register_model_kind",
    "run_study",
    "write_report",
]
