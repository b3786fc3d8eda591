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
    "state_digest",
]

FORMAT_NAME = "ttaperso.subject-state"
FORMAT_VERSION = 1


@runtime_checkable
class StateStore(Protocol):
    """Persistence of subject states (implement it to keep states elsewhere)."""

    def write(
        self, subject: str, tensors: dict[str, Tensor], metadata: dict[str, Any]
    ) -> StateVersion | None:
        """Store one subject's tensors and JSON-safe metadata, atomically; the version kept."""

    def read(self, subject: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Return the tensors and metadata stored for ``subject``."""

    def subjects(self) -> list[str]:
        """Ids of the stored subjects."""


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
    """One kept version of a subject's state (see ``FolderStore(keep_versions=...)``)."""

    version: int
    digest: str
    saved_at: float
    #: where the version lives, for stores that keep files (None elsewhere)
    path: Path | None = None
