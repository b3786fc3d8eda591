"""State files of a Personalizer: the metadata written with each state, the checks on load,
and the store versions it tracks for compare-and-set saves."""

from __future__ import annotations

import inspect
import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from .._version import __version__
from ..config import StrategyConfig
from ..errors import InputError, StateFileError
from ..runtime import ModelRuntime
from ..state import PackedState, SubjectState
from ..state_checks import check_state_values
from ..stores import FORMAT_NAME, FORMAT_VERSION, FolderStore, StateStore, state_digest
from ..strategies import Strategy, get_config_class

__all__ = [
    "LoadedState",
    "VersionBook",
    "as_store",
    "check_loaded",
    "config_changes",
    "digest_of",
    "is_versioned",
    "stale_hint",
    "state_metadata",
    "writes_conditionally",
]

log = logging.getLogger(__name__)

_VERSIONED_METHODS = ("versions", "read_version", "rollback")


def as_store(target: str | Path | StateStore) -> StateStore:
    """A folder path becomes a :class:`FolderStore`; a store passes through."""
    if isinstance(target, (str, Path)):
        return FolderStore(target)
    if isinstance(target, StateStore):
        return target
    raise InputError(f"Expected a folder path or a StateStore but got {type(target).__name__}")


def is_versioned(store: object) -> bool:
    """Whether ``store`` has the versioned methods (``versions``, ``read_version``, ``rollback``)."""
    return all(callable(getattr(store, name, None)) for name in _VERSIONED_METHODS)


def writes_conditionally(store: StateStore) -> bool:
    """Whether the store's ``write`` takes ``expected_version`` (the store contract)."""
    try:
        parameters = inspect.signature(store.write).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
    return any(p.name == "expected_version" or p.kind is p.VAR_KEYWORD for p in parameters)


class VersionBook:
    """The store version a Personalizer last loaded or saved, per store and subject.

    Stores are told apart by ``repr(store)`` (a folder's absolute path). A subject never
    loaded from or saved to a store is at version 0 there: saving it expects the store to
    hold none.
    """

    def __init__(self) -> None:
        self._versions: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def get(self, store: object, subject: str) -> int | None:
        """The tracked version, None when unknown."""
        with self._lock:
            return self._versions.get((repr(store), subject))

    def set(self, store: object, subject: str, version: int | None) -> None:
        """Remember ``version`` (None forgets)."""
        with self._lock:
            if version is None:
                self._versions.pop((repr(store), subject), None)
            else:
                self._versions[(repr(store), subject)] = version


def stale_hint(subject: str) -> str:
    """What to do about a refused (stale) save of ``subject``."""
    return (
        f"load the newer state (p.load(store, [{subject!r}])) and continue from it, or drop "
        f"this Personalizer's copy (p.reset({subject!r})); nothing was overwritten"
    )


def state_metadata(strategy: Strategy, runtime: ModelRuntime) -> dict[str, Any]:
    """What every saved state says about how it was made."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "ttaperso_version": __version__,
        "strategy": strategy.config.strategy_name,
        "config": strategy.config.to_dict(),
        "model_digest": runtime.source_digest,
        "model_name": runtime.module.model_name,
    }


def digest_of(state: SubjectState | PackedState) -> str:
    """The digest of a state's tensors (the one in its file and in the audit log)."""
    return state_digest(state.flat())


def config_changes(saved: StrategyConfig, current: StrategyConfig) -> dict[str, list[Any]]:
    """``{key: [saved value, current value]}`` for every config key that differs."""
    old, new = saved.to_dict(), current.to_dict()
    return {
        k: [old.get(k), new.get(k)]
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    }


@dataclass(frozen=True)
class LoadedState:
    """A state checked by :func:`check_loaded`: packed, with what the file said."""

    state: PackedState
    #: the store version read (None from a store that does not say)
    version: int | None
    #: config keys that differ from the Personalizer's ({} unless allowed to differ)
    config_changes: dict[str, list[Any]] = field(default_factory=dict)


def _saved_config(name: str, metadata: Mapping[str, Any], where: str) -> StrategyConfig:
    """The state's strategy config, validated exactly like constructor arguments."""
    data = metadata.get("config")
    if not isinstance(data, Mapping):
        raise StateFileError(f"{where}: no strategy config in the state (got {data!r:.60})")
    try:
        return get_config_class(name).from_dict(data)
    except Exception as exc:  # noqa: BLE001 - any malformed config is a bad file
        raise StateFileError(f"{where}: unreadable strategy config ({exc})") from exc


def check_loaded(
    strategy: Strategy,
    runtime: ModelRuntime,
    subject: str,
    tensors: dict[str, Tensor],
    metadata: dict[str, Any],
    store: StateStore,
    *,
    allow_config_change: bool = False,
    reference: Mapping[str, Tensor] | None = None,
) -> LoadedState:
    """A stored state checked against this model and strategy, packed on the model's device.

    Raises :class:`~ttaperso.errors.StateFileError` naming the store and subject when the
    state was made for another model or strategy, its config is invalid or (unless
    ``allow_config_change``) differs from the strategy's, its tensors do not fit the
    strategy (keys, shapes, dtypes) or hold impossible values
    (:func:`~ttaperso.state_checks.check_state_values`; ``reference`` = the strategy's
    initial state, computed when not given).
    """
    where = f"{store!r} subject {subject!r}"
    name = strategy.config.strategy_name
    digest = metadata.get("model_digest")
    if digest != runtime.source_digest:
        raise StateFileError(
            f"{where}: state was made for another model (digest {str(digest)[:12]}..., "
            f"model {metadata.get('model_name')!r}); this Personalizer's model is "
            f"{runtime.source_digest[:12]}... ({runtime.module.model_name!r})"
        )
    if metadata.get("strategy") != name:
        raise StateFileError(
            f"{where}: state was made by strategy {metadata.get('strategy')!r}, "
            f"this Personalizer runs {name!r}"
        )
    saved_config = _saved_config(name, metadata, where)
    changes = config_changes(saved_config, strategy.config)
    if changes and not allow_config_change:
        listed = "; ".join(
            f"{k}: saved {json.dumps(old)}, this Personalizer {json.dumps(new)}"
            for k, (old, new) in changes.items()
        )
        raise StateFileError(
            f"{where}: state was saved with another {name} config ({listed}). Load it into a "
            "Personalizer made with the saved config, or pass allow_config_change=True to "
            "continue it under this Personalizer's config (recorded in the audit log)"
        )
    if changes:
        log.warning("%s: saved with config %s, continuing with %s", where, changes, name)
    try:
        state = SubjectState.from_flat(tensors)
    except KeyError as exc:
        raise StateFileError(f"{where}: unexpected tensor key {exc}") from exc
    strategy.check_state(state, where)
    if reference is None:
        reference = strategy.initial_state().flat()
    check_state_values(tensors, where=where, num_classes=len(runtime.labels), reference=reference)
    raw_version = metadata.get("state_version")
    version = (
        raw_version if isinstance(raw_version, int) and not isinstance(raw_version, bool) else None
    )
    device = runtime.device
    # Packed on the model's device: one allocation per dtype instead of one per tensor.
    packed = SubjectState(
        **{
            group: {k: v.to(device) for k, v in getattr(state, group).items()}
            for group in ("params", "buffers", "optim", "memory")
        }
    ).packed()
    return LoadedState(packed, version, changes)
