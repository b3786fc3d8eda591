"""State files of a Personalizer: the metadata written with each state and the checks on load."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import Tensor

from .._version import __version__
from ..errors import InputError, StateFileError
from ..runtime import ModelRuntime
from ..state import PackedState, SubjectState
from ..stores import FORMAT_NAME, FORMAT_VERSION, FolderStore, StateStore, state_digest
from ..strategies import Strategy, get_config_class

__all__ = ["as_store", "check_loaded", "digest_of", "state_metadata"]

log = logging.getLogger(__name__)


def as_store(target: str | Path | StateStore) -> StateStore:
    """A folder path becomes a :class:`FolderStore`; a store passes through."""
    if isinstance(target, (str, Path)):
        return FolderStore(target)
    if isinstance(target, StateStore):
        return target
    raise InputError(f"Expected a folder path or a StateStore but got {type(target).__name__}")


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


def check_loaded(
    strategy: Strategy,
    runtime: ModelRuntime,
    subject: str,
    tensors: dict[str, Tensor],
    metadata: dict[str, Any],
    store: StateStore,
) -> PackedState:
    """A stored state checked against this model and strategy, packed on the model's device.

    Raises :class:`~ttaperso.errors.StateFileError` naming the store and subject when the
    state was made for another model or strategy, its config is unreadable, or its
    tensors do not fit the strategy (keys, shapes, dtypes, finiteness).
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
    try:
        saved_config = get_config_class(name).from_dict(metadata.get("config", {}))
    except Exception as exc:  # noqa: BLE001 - any malformed config is a bad file
        raise StateFileError(f"{where}: unreadable strategy config ({exc})") from exc
    if saved_config != strategy.config:
        log.warning(
            "%s: saved with config %s, continuing with %s",
            where,
            json.dumps(saved_config.to_dict()),
            json.dumps(strategy.config.to_dict()),
        )
    try:
        state = SubjectState.from_flat(tensors)
    except KeyError as exc:
        raise StateFileError(f"{where}: unexpected tensor key {exc}") from exc
    strategy.check_state(state, where)
    device = runtime.device
    # Packed on the model's device: one allocation per dtype instead of one per tensor.
    return SubjectState(
        **{
            group: {k: v.to(device) for k, v in getattr(state, group).items()}
            for group in ("params", "buffers", "optim", "memory")
        }
    ).packed()
