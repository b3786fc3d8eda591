"""Typed, validated strategy configs (one dataclass per strategy).

Every config: fields with types and defaults, validation in ``__post_init__`` (a bad value
raises :class:`~ttaperso.errors.ConfigError` naming it), ``to_dict``/``from_dict`` for JSON,
and ``replace(**overrides)``. Unknown keys are rejected with the list of valid ones.

Fields may also hold *components*: frozen objects with ``to_dict()`` and a ``from_spec``
classmethod that accepts the object itself or its dict (gates, the collapse guard, ...).
A field typed ``tuple[Component, ...]`` or ``Component | None`` is coerced through
``from_spec`` and written with ``to_dict``: configs need not know any component type.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, Protocol, TypeVar, runtime_checkable

from .errors import ConfigError
from .gates import Gate
from .guards import CollapseGuard

__all__ = ["ConfigComponent", "StrategyConfig"]

C = TypeVar("C", bound="StrategyConfig")


@runtime_checkable
class ConfigComponent(Protocol):
    """A config field's object that describes itself as JSON (a gate, a guard, ...)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description, inverse of the class's ``from_spec``."""
        ...


def _component_class(hint: Any) -> type | None:
    """The class of a component hint (``X``, ``X | None``), None when not a component."""
    candidates = [hint, *typing.get_args(hint)]
    for candidate in candidates:
        if isinstance(candidate, type) and callable(getattr(candidate, "from_spec", None)):
            return candidate
    return None


def _to_json(value: Any) -> Any:
    if isinstance(value, ConfigComponent):
        return value.to_dict()
    if isinstance(value, tuple):  # JSON has lists only (empty ones included)
        return [_to_json(v) for v in value]
    return value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def _coerce(owner: str, name: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against a field's type hint; return it (ints widen to float)."""
    origin = typing.get_origin(hint)
    where = f"`{name}` of {owner}"
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(
                f"Expected argument {where} to be one of {list(choices)} but got {value!r}"
            )
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"Expected argument {where} to be a bool but got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"Expected argument {where} to be an int but got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"Expected argument {where} to be a number but got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"Expected argument {where} to be finite but got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"Expected argument {where} to be a str but got {value!r}")
        return value
    if origin is tuple:
        item = _component_class(typing.get_args(hint)[0])
        if item is not None:
            if not isinstance(value, (list, tuple)):
                raise ConfigError(
                    f"Expected argument {where} to be a list of {item.__name__} but got {value!r}"
                )
            return tuple(item.from_spec(v) for v in value)  # type: ignore[attr-defined]
    component = _component_class(hint)
    if component is not None:
        if value is None and type(None) in typing.get_args(hint):
            return None
        return component.from_spec(value)  # type: ignore[attr-defined]
    raise ConfigError(
        f"Field {where} has an unsupported type {_type_name(hint)}"
    )  # pragma: no cover


@dataclass(frozen=True)
class StrategyConfig:
    """Options every strategy shares.

    Args:
        gates: temporal-consistency gates a frame must pass to update the state
            (:class:`~ttaperso.gates.TemporalGate`, :class:`~ttaperso.gates.EntropyGate`).
        smoothing: output smoothing window in frames (1 = off). Averages the returned
            probabilities over the subject's last ``smoothing`` frames.
        episodic: reset the subject to the source state after every ``predict`` call.
        guard: a :class:`~ttaperso.guards.CollapseGuard` (or a dict of its options) that
            watches the subject for collapse and recovers; None (default) = off.
    """

    strategy_name: ClassVar[str] = ""

    gates: tuple[Gate, ...] = field(default=())
    smoothing: int = 1
    episodic: bool = False
    guard: CollapseGuard | None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = _coerce(owner, f.name, hints[f.name], getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        if self.smoothing < 1:
            raise ConfigError(
                f"Expected argument `smoothing` of {owner} to be >= 1 (1 = off) but got {self.smoothing!r}"
            )
        self.validate()

    def validate(self) -> None:
        """Range checks of a subclass (types are already checked)."""

    def _check(self, name: str, ok: bool, expected: str) -> None:
        if not ok:
            raise ConfigError(
                f"Expected argument `{name}` of {type(self).__name__} to be {expected} "
                f"but got {getattr(self, name)!r}"
            )

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of the valid config keys."""
        return [f.name for f in fields(cls)]

    @classmethod
    def _reject_unknown(cls, keys: typing.Iterable[str]) -> None:
        unknown = sorted(set(keys) - set(cls.field_names()))
        if unknown:
            raise ConfigError(
                f"Unknown config key(s) {unknown} for strategy {cls.strategy_name!r}; "
                f"valid keys: {', '.join(cls.field_names())}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of the fields (gates as dicts)."""
        return {f.name: _to_json(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Build a config from :meth:`to_dict` output; unknown keys raise ConfigError."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"Expected a mapping of config keys but got {type(data).__name__}")
        cls._reject_unknown(data.keys())
        return cls(**dict(data))

    def replace(self: C, **overrides: Any) -> C:
        """A copy with some fields changed (validated; unknown keys raise ConfigError)."""
        self._reject_unknown(overrides.keys())
        return dataclasses.replace(self, **overrides)
