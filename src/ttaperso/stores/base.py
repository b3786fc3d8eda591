"""The store interface every place that keeps subject states implements, and what they share.

A subject's state is a flat dict of tensors plus JSON-safe metadata (format, strategy,
config, base-model digest, subject id). A store keeps one current state per subject,
replaced atomically, and may keep earlier versions for rollback.
:class:`~ttaperso.stores.folder.FolderStore` (one local folder) is the default.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "StateStore",
    "StateVersion",
    "VersionedStateStore",
    "state_digest",
]

FORMAT_NAME = "ttaperso.subject-state"
#: 2: tensor digest, store version and header digest required (1: digest optional)
FORMAT_VERSION = 2


@runtime_checkable
class StateStore(Protocol):
    """Persistence of subject states: what ``Personalizer.save``/``load`` need.

    The contract (``FolderStore`` and the Redis store implement it, see
    :class:`VersionedStateStore` for the rest): versions are ints per subject, 0 = absent,
    the first write is 1 and every write is current + 1, never reused or lost with
    several writers. ``repr(store)`` identifies the store (the Personalizer tracks the
    versions it read or wrote per store and subject; audit records name the store by it).
    """

    def write(
        self,
        subject: str,
        tensors: dict[str, Tensor],
        metadata: dict[str, Any],
        *,
        expected_version: int | None = None,
    ) -> StateVersion:
        """Store a new current state of ``subject`` atomically as version current + 1.

        When ``expected_version`` is not None and differs from the stored current version
        (0 when absent), raise :class:`~ttaperso.errors.StaleStateError` naming both and
        write nothing (compare-and-set). The stored subject id is checked before anything
        is replaced: another subject's state is never overwritten.
        """

    def read(self, subject: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and metadata of ``subject``'s current state.

        ``metadata["state_version"]`` is the version read and ``metadata["subject"]`` the
        stored id, checked against ``subject`` (a mismatch is a StateFileError).
        """

    def subjects(self) -> list[str]:
        """Ids of the stored subjects."""


@runtime_checkable
class VersionedStateStore(StateStore, Protocol):
    """A store with history and erasure (what ``Personalizer.versions``/``rollback`` need)."""

    def delete(self, subject: str, *, expected_version: int | None = None) -> None:
        """Remove the current state and every kept version (unknown subject: StateFileError)."""

    def versions(self, subject: str) -> list[StateVersion]:
        """The kept versions of ``subject``, oldest first (the current one last)."""

    def read_version(self, subject: str, version: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and metadata of one kept version (``metadata["state_version"] == version``)."""

    def rollback(
        self, subject: str, version: int, *, expected_version: int | None = None
    ) -> StateVersion:
        """Write kept ``version`` again as a new current version (history is kept)."""


def state_digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over the sorted keys, dtypes, shapes and bytes of a flat state dict.

    The same state gives the same digest in memory, in its file, and in the audit log.
    """
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class StateVersion:
    """One version of a subject's state: its number, tensor digest and when it was saved."""

    version: int
    digest: str
    saved_at: float
    #: where the version lives, for stores that keep files (None elsewhere)
    path: Path | None = None
