"""``source``: the frozen model, no adaptation (the floor every strategy is compared to)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import StrategyConfig
from .base import Strategy
from .registry import register_strategy

__all__ = ["SourceConfig", "SourceStrategy"]


@dataclass(frozen=True)
class SourceConfig(StrategyConfig):
    """No options beyond the shared ones (output smoothing still applies)."""

    strategy_name = "source"


@register_strategy
class SourceStrategy(Strategy):
    """Predicts with the shared model as it is; never updates a subject."""

    config_class = SourceConfig
    shares_model_forward = True
