"""Strategy registry: ``list_strategies()``, ``register_strategy``, ``make_config``.

A strategy is a config dataclass (subclass of :class:`~ttaperso.config.StrategyConfig`,
with a ``strategy_name``) plus a :class:`~ttaperso.strategies.base.Strategy` subclass.
"""

from __future__ import annotations

from typing import Any

from ..config import StrategyConfig
from ..errors import ConfigError
from .base import StepResult, Strategy
from .clip_autt import ClipAuttConfig, ClipAuttStrategy
from .eata import EATAConfig, EATAStrategy
from .fisher import FisherConfig, FisherStrategy
from .norm import NormConfig, NormStrategy
from .sar import SARConfig, SARStrategy
from .shot import SHOTConfig, SHOTStrategy
from .source import SourceConfig, SourceStrategy
from .t3a import T3AConfig, T3AStrategy
from .tent import TentConfig, TentStrategy
from .tta_cap import TTACaPConfig, TTACaPStrategy

__all__ = [
    "Strategy",
    "StepResult",
    "register_strategy",
    "list_strategies",
    "get_config_class",
    "make_config",
    "SourceConfig",
    "NormConfig",
    "TentConfig",
    "SARConfig",
    "ClipAuttConfig",
    "FisherConfig",
    "EATAConfig",
    "T3AConfig",
    "SHOTConfig",
    "TTACaPConfig",
]

_REGISTRY: dict[str, type[Strategy]] = {}


def register_strategy(strategy_cls: type[Strategy]) -> type[Strategy]:
    """Register a strategy class under its config's ``strategy_name`` (usable as a decorator)."""
    name = strategy_cls.config_class.strategy_name
    if not name:
        raise ConfigError(f"{strategy_cls.config_class.__name__} has no `strategy_name`")
    if name in _REGISTRY and _REGISTRY[name] is not strategy_cls:
        raise ConfigError(f"A strategy named {name!r} is already registered")
    _REGISTRY[name] = strategy_cls
    return strategy_cls


def list_strategies() -> list[str]:
    """Names of the registered strategies, sorted."""
    return sorted(_REGISTRY)


def _lookup(name: str) -> type[Strategy]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(f"Unknown strategy {name!r}; available: {', '.join(list_strategies())}")
    return _REGISTRY[name]


def get_config_class(name: str) -> type[StrategyConfig]:
    """The config dataclass of a registered strategy."""
    return _lookup(name).config_class


def make_config(strategy: str | StrategyConfig, **overrides: Any) -> StrategyConfig:
    """A validated config from a strategy name or config object plus overrides."""
    if isinstance(strategy, StrategyConfig):
        _lookup(strategy.strategy_name)
        return strategy.replace(**overrides) if overrides else strategy
    config_cls = get_config_class(strategy)
    config_cls._reject_unknown(overrides.keys())
    return config_cls(**overrides)


def build_strategy(config: StrategyConfig, runtime: Any, source: Any = None) -> Strategy:
    """Instantiate the registered strategy for ``config`` on a model runtime.

    ``source`` is a validated :class:`~ttaperso.source_data.SourceData` or None.
    """
    return _lookup(config.strategy_name)(config, runtime, source)


for _cls in (SourceStrategy, NormStrategy, TentStrategy, SARStrategy):
    register_strategy(_cls)
register_strategy(TTACaPStrategy)
for _cls in (FisherStrategy, EATAStrategy, T3AStrategy, SHOTStrategy):
    register_strategy(_cls)
register_strategy(ClipAuttStrategy)
