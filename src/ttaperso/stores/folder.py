"""The default store: subject states as safetensors files in one local folder.

One file per subject: a safetensors file (tensors only: loading it cannot run code) whose
header metadata carries the JSON description (strategy, config, base-model digest, format
version, subject id). A single file per subject means the tensors and their description
are replaced together, atomically.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import InputError, StateFileError
from ..io import atomic_write_bytes
from .base import StateVersion, state_digest
from .codec import decode_state, encode_state

__all__ = ["FolderStore", "MAX_STATE_FILE_BYTES", "subject_filename"]

_SUFFIX = ".safetensors"
_VERSIONS_DIR = ".versions"
#: refuse state files above this size before reading them (a subject state is KiB to MiB)
MAX_STATE_FILE_BYTES = 512 * 1024 * 1024


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
    """Subject states as safetensors files in one local folder (created on first write).

    Args:
        path: the folder.
        keep_versions: how many past versions to keep per subject for
            :meth:`rollback` (0: only the current file, the historical behaviour).
    """

    def __init__(self, path: str | Path, keep_versions: int = 0) -> None:
        if (
            isinstance(keep_versions, bool)
            or not isinstance(keep_versions, int)
            or keep_versions < 0
        ):
            raise InputError(
                f"Expected argument `keep_versions` to be an int >= 0 but got {keep_versions!r}"
            )
        self.path = Path(path)
        self.keep_versions = keep_versions

    def __repr__(self) -> str:
        return f"FolderStore({str(self.path)!r})"

    def _version_dir(self, subject: str) -> Path:
        return self.path / _VERSIONS_DIR / subject_filename(subject)[: -len(_SUFFIX)]

    def _version_numbers(self, subject: str) -> list[int]:
        folder = self._version_dir(subject)
        if not folder.is_dir():
            return []
        return sorted(
            int(p.stem) for p in folder.iterdir() if p.suffix == _SUFFIX and p.stem.isdigit()
        )

    def write(
        self, subject: str, tensors: dict[str, Tensor], metadata: dict[str, Any]
    ) -> StateVersion | None:
        """Write one subject's state atomically; return the version kept (None without versions).

        With versions, the version file is written first and the current file second, so a
        crash at any point leaves the current file complete (old or new) and every version
        file complete.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        kept: StateVersion | None = None
        if self.keep_versions:
            numbers = self._version_numbers(subject)
            number = (numbers[-1] + 1) if numbers else 1
            data, digest = encode_state(tensors, metadata, subject, number)
            folder = self._version_dir(subject)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{number:010d}{_SUFFIX}"
            atomic_write_bytes(path, data)
            kept = StateVersion(number, digest, time.time(), path)
        else:
            data, _ = encode_state(tensors, metadata, subject, None)
        atomic_write_bytes(self.path / subject_filename(subject), data)
        if self.keep_versions:
            for old in self._version_numbers(subject)[: -self.keep_versions]:
                (self._version_dir(subject) / f"{old:010d}{_SUFFIX}").unlink(missing_ok=True)
        return kept

    def versions(self, subject: str) -> list[StateVersion]:
        """The kept versions of ``subject``, oldest first (each file is checked)."""
        out = []
        for number in self._version_numbers(subject):
            path = self._version_dir(subject) / f"{number:010d}{_SUFFIX}"
            _, _, digest = self._read_checked(path)
            out.append(StateVersion(number, digest or "", path.stat().st_mtime, path))
        return out

    def read_version(self, subject: str, version: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and metadata of one kept version of ``subject``."""
        if version not in self._version_numbers(subject):
            raise StateFileError(
                f"{self.path}: no version {version!r} of subject {subject!r}; kept versions: "
                f"{self._version_numbers(subject)}"
            )
        path = self._version_dir(subject) / f"{version:010d}{_SUFFIX}"
        tensors, metadata, _ = self._read_checked(path)
        if metadata.get("subject") != subject:
            raise StateFileError(
                f"{path}: holds subject {metadata.get('subject')!r}, not {subject!r}"
            )
        return tensors, metadata

    def rollback(self, subject: str, version: int) -> StateVersion | None:
        """Make an earlier version current again (recorded as a new version: history is kept)."""
        tensors, metadata = self.read_version(subject, version)
        metadata = {k: v for k, v in metadata.items() if k != "subject"}
        return self.write(subject, tensors, {**metadata, "rolled_back_from": version})

    def digest(self, subject: str) -> str:
        """Digest of the tensors of ``subject``'s current file (see :func:`state_digest`)."""
        file = self.path / subject_filename(subject)
        if not file.is_file():
            raise StateFileError(f"{self.path}: no state for subject {subject!r}")
        tensors, _, digest = self._read_checked(file)
        return digest or state_digest(tensors)

    def _read_file(self, file: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, metadata, _ = self._read_checked(file)
        return tensors, metadata

    def _read_checked(self, file: Path) -> tuple[dict[str, Tensor], dict[str, Any], str | None]:
        """Tensors, JSON metadata and stored digest of one file (digest checked when present)."""
        try:
            size = file.stat().st_size
            if size > MAX_STATE_FILE_BYTES:
                raise StateFileError(f"{file}: {size} bytes is larger than any subject state")
            # One read: a concurrent atomic replace cannot mix two files' header and tensors.
            data = file.read_bytes()
        except OSError as exc:
            raise StateFileError(f"{file}: not a readable ttaperso state file ({exc})") from exc
        decoded = decode_state(data, str(file))
        return decoded.tensors, decoded.metadata, decoded.digest

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
