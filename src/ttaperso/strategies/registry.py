"""The strategy registry: ``register_strategy``, ``list_strategies``, ``make_config``.

A strategy is a config dataclass (a :class:`~ttaperso.config.StrategyConfig` subclass with
a ``strategy_name``) plus a :class:`~ttaperso.strategies.base.Strategy` subclass whose
``config_class`` is that dataclass. Built-ins register themselves where they are defined
(``@register_strategy`` above the class); so can yours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from ..config import StrategyConfig
from ..errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from ..runtime import ModelRuntime
    from ..source_data import SourceData
    from .base import Strategy

__all__ = [
    "build_strategy",
    "get_config_class",
    "get_strategy_class",
    "list_strategies",
    "make_config",
    "register_strategy",
]

S = TypeVar("S", bound="type[Strategy]")

_REGISTRY: dict[str, type[Strategy]] = {}


def register_strategy(strategy_cls: S) -> S:
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


def get_strategy_class(name: str) -> type[Strategy]:
    """The registered strategy class called ``name`` (ConfigError listing the names if none)."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(f"Unknown strategy {name!r}; available: {', '.join(list_strategies())}")
    return _REGISTRY[name]


def get_config_class(name: str) -> type[StrategyConfig]:
    """The config dataclass of a registered strategy."""
    return get_strategy_class(name).config_class


def make_config(strategy: str | StrategyConfig, **overrides: Any) -> StrategyConfig:
    """A validated config from a strategy name or config object plus overrides."""
    if isinstance(strategy, StrategyConfig):
        get_strategy_class(strategy.strategy_name)
        return strategy.replace(**overrides) if overrides else strategy
    config_cls = get_config_class(strategy)
    config_cls._reject_unknown(overrides.keys())
    return config_cls(**overrides)


def build_strategy(
    config: StrategyConfig, runtime: ModelRuntime, source: SourceData | None = None
) -> Strategy:
    """Instantiate the registered strategy for ``config`` on a model runtime.

    ``source`` is a validated :class:`~ttaperso.source_data.SourceData` or None.
    """
    return get_strategy_class(config.strategy_name)(config, runtime, source)
