"""Strategies: the registry, the built-ins, and everything a strategy author needs.

Write a strategy (``docs/write-a-strategy.md``)::

    from ttaperso.strategies import Strategy, StrategyConfig, SubjectState, register_strategy

A strategy is a config dataclass (a :class:`StrategyConfig` subclass with a
``strategy_name``) plus a :class:`Strategy` subclass registered with
:func:`register_strategy`; the base class documents its class variables and hooks.
Built-ins register themselves in their own modules. Config and class names are the
registry name in CapWords (``tta_cap`` -> ``TtaCapConfig``, ``TtaCapStrategy``).
"""

from __future__ import annotations

import warnings
from typing import Any

from ..config import StrategyConfig
from ..functional import normalized_entropy, softmax_entropy
from ..gates import PROTOTYPE_SCORES, Gate, GateBatch
from ..runtime import ForwardOutput, ModelRuntime
from ..source_data import SourceData
from ..state import SubjectState
from .base import CALIBRATION_OFFSET, OptimizerFactory, StepResult, Strategy, optimizer_step

# Built-ins, each registered where it is defined (importing the module registers it).
from .clip_autt import ClipAuttConfig, ClipAuttStrategy
from .eata import EataConfig, EataStrategy
from .fisher import FisherConfig, FisherStrategy
from .norm import GradientNormConfig, NormConfig, NormStrategy
from .registry import (
    build_strategy,
    get_config_class,
    get_strategy_class,
    list_strategies,
    make_config,
    register_strategy,
)
from .sar import SarConfig, SarStrategy
from .shot import ShotConfig, ShotStrategy
from .source import SourceConfig, SourceStrategy
from .t3a import T3aConfig, T3aStrategy
from .tent import TentConfig, TentStrategy
from .tta_cap import TtaCapConfig, TtaCapStrategy

__all__ = [
    # authoring surface
    "CALIBRATION_OFFSET",
    "PROTOTYPE_SCORES",
    "ForwardOutput",
    "Gate",
    "GateBatch",
    "GradientNormConfig",
    "ModelRuntime",
    "NormStrategy",
    "OptimizerFactory",
    "SourceData",
    "StepResult",
    "Strategy",
    "StrategyConfig",
    "SubjectState",
    "normalized_entropy",
    "optimizer_step",
    "softmax_entropy",
    # registry
    "build_strategy",
    "get_config_class",
    "get_strategy_class",
    "list_strategies",
    "make_config",
    "register_strategy",
    # built-ins
    "ClipAuttConfig",
    "ClipAuttStrategy",
    "EataConfig",
    "EataStrategy",
    "FisherConfig",
    "FisherStrategy",
    "NormConfig",
    "SarConfig",
    "SarStrategy",
    "ShotConfig",
    "ShotStrategy",
    "SourceConfig",
    "SourceStrategy",
    "T3aConfig",
    "T3aStrategy",
    "TentConfig",
    "TentStrategy",
    "TtaCapConfig",
    "TtaCapStrategy",
]

#: documented names before the CapWords naming (0.1): still importable, with a warning
DEPRECATED_NAMES: dict[str, str] = {"SARConfig": "SarConfig", "TTACaPConfig": "TtaCapConfig"}


def __getattr__(name: str) -> Any:
    if name in DEPRECATED_NAMES:
        new = DEPRECATED_NAMES[name]
        warnings.warn(
            f"ttaperso.strategies.{name} is deprecated; use {new}",
            DeprecationWarning,
            stacklevel=2,
        )
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
