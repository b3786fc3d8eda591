"""Where subject states live: a store interface and the default local folder store.

One file per subject: a safetensors file (tensors only: loading it cannot run code) whose
header metadata carries the JSON description (strategy, config, base-model digest, format
version, subject id). A single file per subject means the tensors and their description
are replaced together, atomically.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors
from torch import Tensor

from .errors import StateFileError
from .io import atomic_write_bytes

__all__ = ["StateStore", "FolderStore", "FORMAT_NAME", "FORMAT_VERSION", "subject_filename"]

FORMAT_NAME = "ttaperso.subject-state"
FORMAT_VERSION = 1
_META_KEY = "ttaperso"
_SUFFIX = ".safetensors"
#: refuse state files above this size before reading them (a subject state is KiB to MiB)
MAX_STATE_FILE_BYTES = 512 * 1024 * 1024


@runtime_checkable
class StateStore(Protocol):
    """Persistence of subject states (implement it to keep states elsewhere)."""

    def write(self, subject: str, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> None:
        """Store one subject's tensors and JSON-safe metadata, atomically."""

    def read(self, subject: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Return the tensors and metadata stored for ``subject``."""

    def subjects(self) -> list[str]:
        """Ids of the stored subjects."""


def subject_filename(subject: str) -> str:
    """A safe file name for a subject id: a slug plus a hash of the exact id.

    The slug keeps only ``[A-Za-z0-9_-]`` (no separators, no ``..``, bounded length) so an
    id can never address a path outside the folder; the hash keeps ids that slug alike
    apart.
    """
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", subject)[:48].strip("_") or "subject"
    digest = hashlib.sha256(subject.encode("utf-8")).hexdigest()[:16]
    return f"{slug}-{digest}{_SUFFIX}"


class FolderStore:
    """Subject states as safetensors files in one local folder (created on first write)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"FolderStore({str(self.path)!r})"

    def write(self, subject: str, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        header = {_META_KEY: json.dumps({**metadata, "subject": subject}, sort_keys=True)}
        data = save_safetensors(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, header
        )
        atomic_write_bytes(self.path / subject_filename(subject), data)

    def _read_file(self, file: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
        try:
            size = file.stat().st_size
            if size > MAX_STATE_FILE_BYTES:
                raise StateFileError(f"{file}: {size} bytes is larger than any subject state")
            # One handle for header and tensors: a concurrent atomic replace cannot mix files.
            with safe_open(file, framework="pt") as handle:
                header = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            if isinstance(exc, StateFileError):
                raise
            raise StateFileError(f"{file}: not a readable ttaperso state file ({exc})") from exc
        if _META_KEY not in header:
            raise StateFileError(
                f"{file}: safetensors file without ttaperso metadata (foreign file)"
            )
        try:
            metadata = json.loads(header[_META_KEY])
        except json.JSONDecodeError as exc:
            raise StateFileError(f"{file}: corrupt ttaperso metadata ({exc})") from exc
        if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
            raise StateFileError(f"{file}: not a ttaperso subject state (format {metadata!r:.80})")
        if metadata.get("version") != FORMAT_VERSION:
            raise StateFileError(
                f"{file}: state format version {metadata.get('version')!r}, this ttaperso reads {FORMAT_VERSION}"
            )
        return tensors, metadata

    def _files(self) -> list[Path]:
        if not self.path.is_dir():
            raise StateFileError(f"{self.path}: no such state folder")
        return sorted(p for p in self.path.iterdir() if p.suffix == _SUFFIX and p.is_file())

    def read(self, subject: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        file = self.path / subject_filename(subject)
        if not file.is_file():
            raise StateFileError(f"{self.path}: no state for subject {subject!r}")
        tensors, metadata = self._read_file(file)
        if metadata.get("subject") != subject:
            raise StateFileError(
                f"{file}: holds subject {metadata.get('subject')!r}, not {subject!r}"
            )
        return tensors, metadata

    def read_all(self) -> dict[str, tuple[dict[str, Tensor], dict[str, Any]]]:
        """Every state in the folder by subject id (any unreadable file raises)."""
        out: dict[str, tuple[dict[str, Tensor], dict[str, Any]]] = {}
        for file in self._files():
            tensors, metadata = self._read_file(file)
            subject = metadata.get("subject")
            if not isinstance(subject, str) or file.name != subject_filename(subject):
                raise StateFileError(f"{file}: file name does not match its subject id {subject!r}")
            out[subject] = (tensors, metadata)
        return out

    def subjects(self) -> list[str]:
        return list(self.read_all())
