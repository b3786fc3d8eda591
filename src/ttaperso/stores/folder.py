"""The default store: subject states as safetensors files in one local folder.

One file per subject (``<slug>-<hash>.safetensors``): a safetensors file (tensors only:
loading it cannot run code) whose header carries the JSON description (strategy, config,
base-model digest, format version, subject id), the store version and digests (see
:mod:`ttaperso.stores.codec`). A single file per subject means the tensors and their
description are replaced together, atomically.

Several processes may share a folder: every write, rollback and delete of a subject holds
that subject's OS lock (``.<slug>-<hash>.lock``, see :mod:`ttaperso.stores.fs`), reads the
current version under it and writes current + 1, so version numbers are never lost and a
compare-and-set (``expected_version``) cannot be won by two writers. Nothing under the
folder is reached through a symbolic link.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import InputError, StaleStateError, StateFileError
from . import fs
from .base import StateVersion
from .codec import MAX_HEADER_BYTES, StateHeader, decode_header, decode_state, encode_state

__all__ = ["FolderStore", "MAX_STATE_FILE_BYTES", "StoredFile", "subject_filename"]

_SUFFIX = ".safetensors"
_VERSIONS_DIR = ".versions"
_LOCK_SUFFIX = ".lock"
#: refuse state files above this size before reading them (a subject state is KiB to MiB)
MAX_STATE_FILE_BYTES = 512 * 1024 * 1024
_VERSION_FILE = re.compile(r"[0-9]{10}" + re.escape(_SUFFIX))


def _id_hash(subject: str) -> str:
    """16 hex digits (64 bits) of the id's SHA-256: keeps ids that slug alike apart."""
    return hashlib.sha256(subject.encode("utf-8")).hexdigest()[:16]


def subject_filename(subject: str) -> str:
    """A safe file name for a subject id: a slug plus a hash of the exact id.

    The slug keeps only ``[A-Za-z0-9_-]`` (no separators, no ``..``, bounded length) so an
    id can never address a path outside the folder; the hash keeps ids that slug alike
    apart, and the id stored in the file is checked on every read and before every
    overwrite, so even a hash collision never mixes two subjects.
    """
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", subject)[:48].strip("_") or "subject"
    return f"{slug}-{_id_hash(subject)}{_SUFFIX}"


def _version_name(number: int) -> str:
    return f"{number:010d}{_SUFFIX}"


def _check_version_arg(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"Expected argument `{name}` to be an int >= {minimum} but got {value!r}")


@dataclass(frozen=True)
class StoredFile:
    """One current-state file of a folder, as :meth:`FolderStore.survey` found it."""

    name: str
    subject: str | None
    current: StateVersion | None
    #: why the file is unusable (unreadable, a link, misnamed, ...), None when it is fine
    error: str | None = None


class FolderStore:
    """Subject states as safetensors files in one local folder (created on first write).

    Args:
        path: the folder.
        keep_versions: how many versions (the current one included) to keep per subject
            under ``.versions/`` for :meth:`rollback`; 0 keeps no version files (only the
            current file, the historical layout). Version numbers are counted either way.

    Temp files left by a writer that was killed are removed the next time a store
    opened on the folder writes (only those no live writer holds the lock for).
    """

    def __init__(self, path: str | Path, keep_versions: int = 0) -> None:
        _check_version_arg("keep_versions", keep_versions, minimum=0)
        self.path = Path(path)
        self.keep_versions = keep_versions
        self._swept = False

    def __repr__(self) -> str:
        return f"FolderStore({str(self.path.absolute())!r})"

    # ------------------------------------------------------------ descriptors
    @contextmanager
    def _root(self, *, create: bool = False) -> Iterator[int]:
        fd = fs.open_dir(self.path, create=create)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def _version_dir(self, root: int, subject: str, *, create: bool) -> Iterator[int | None]:
        """Descriptor of ``.versions/<slug>-<hash>`` (None when absent and not created)."""
        stem = subject_filename(subject)[: -len(_SUFFIX)]
        top = fs.open_subdir(root, _VERSIONS_DIR, self.path / _VERSIONS_DIR, create=create)
        if top is None:
            yield None
            return
        try:
            fd = fs.open_subdir(top, stem, self.path / _VERSIONS_DIR / stem, create=create)
        finally:
            os.close(top)
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    @contextmanager
    def _subject_lock(self, root: int, subject: str) -> Iterator[None]:
        name = f".{subject_filename(subject)[: -len(_SUFFIX)]}{_LOCK_SUFFIX}"
        with fs.locked(root, name, self.path / name):
            yield

    # ---------------------------------------------------------------- headers
    def _header(self, root: int, name: str, where: Path) -> StateHeader | None:
        data = fs.read_prefix(root, name, where, header_limit=MAX_HEADER_BYTES)
        return None if data is None else decode_header(data, str(where))

    def _current(self, root: int, subject: str) -> StateHeader | None:
        """Header of ``subject``'s current file (None when absent); the stored id checked."""
        name = subject_filename(subject)
        header = self._header(root, name, self.path / name)
        if header is not None and header.subject != subject:
            raise StateFileError(
                f"{self.path / name}: holds subject {header.subject!r}, not {subject!r} (two "
                "ids share a file name); refused, nothing was read or written"
            )
        return header

    @staticmethod
    def _numbers(vdir: int | None) -> list[int]:
        if vdir is None:
            return []
        return sorted(
            int(e.name[: -len(_SUFFIX)])
            for e in fs.list_dir(vdir)
            if _VERSION_FILE.fullmatch(e.name) and not e.is_symlink()
        )

    # ------------------------------------------------------------------ write
    def write(
        self,
        subject: str,
        tensors: dict[str, Tensor],
        metadata: dict[str, Any],
        *,
        expected_version: int | None = None,
    ) -> StateVersion:
        """Write ``subject``'s state atomically as version current + 1; return that version.

        With ``expected_version`` (compare-and-set) the write is refused with
        :class:`~ttaperso.errors.StaleStateError` when the stored version differs. With
        versions kept, the version file is written first and the current file second, so
        a crash at any point leaves the current file complete (old or new) and every
        version file complete.
        """
        if expected_version is not None:
            _check_version_arg("expected_version", expected_version, minimum=0)
        with self._root(create=True) as root:
            self._sweep(root)
            with self._subject_lock(root, subject):
                return self._write_locked(root, subject, tensors, metadata, expected_version)

    def _stale(self, subject: str, expected: int, current: int) -> StaleStateError:
        return StaleStateError(
            f"{self!r}: subject {subject!r} is at version {current}, the writer expected "
            f"version {expected}; nothing was written"
        )

    def _write_locked(
        self,
        root: int,
        subject: str,
        tensors: dict[str, Tensor],
        metadata: dict[str, Any],
        expected: int | None,
    ) -> StateVersion:
        header = self._current(root, subject)
        current = 0 if header is None else header.version
        if expected is not None and expected != current:
            raise self._stale(subject, expected, current)
        name = subject_filename(subject)
        with self._version_dir(root, subject, create=self.keep_versions > 0) as vdir:
            # Version files above the current one were never current: a crash between the
            # two renames leaves at most one (current + 1, overwritten now). More means
            # the current file was removed by hand: number on after them, reuse nothing.
            ahead = [n for n in self._numbers(vdir) if n > current]
            number = current + 1 if ahead in ([], [current + 1]) else ahead[-1] + 1
            data, digest = encode_state(tensors, metadata, subject, number)
            if vdir is not None:
                self._remove_temps(vdir, prefix="")
                if self.keep_versions:
                    fs.atomic_write(vdir, _version_name(number), data)
                else:
                    fs.remove(vdir, _version_name(number))
            # (This subject's dead temp files in the folder itself go in the sweep: listing a
            # folder of 10,000 states on every write would make saving all of them quadratic.)
            fs.atomic_write(root, name, data)
            if vdir is not None and self.keep_versions:
                kept = [n for n in self._numbers(vdir) if n <= number]
                for old in kept[: -self.keep_versions]:
                    fs.remove(vdir, _version_name(old))
        where = self.path / name
        if self.keep_versions:
            where = self.path / _VERSIONS_DIR / name[: -len(_SUFFIX)] / _version_name(number)
        return StateVersion(number, digest, time.time(), where)

    @staticmethod
    def _remove_temps(dir_fd: int, *, prefix: str) -> None:
        """Remove temp files starting with ``prefix`` (the caller holds their writer's lock)."""
        for entry in fs.list_dir(dir_fd):
            name = entry.name
            if name.startswith(".") and name.startswith(prefix) and name.endswith(fs.TMP_SUFFIX):
                if entry.is_file(follow_symlinks=False):
                    fs.remove(dir_fd, name)

    def _sweep(self, root: int) -> None:
        """Once per store object: remove temp and lock files of writers that died.

        A subject's temp files exist only while its writer holds the subject's lock, so a
        temp file whose lock is free belongs to a writer that was killed.
        """
        if self._swept:
            return
        self._swept = True
        for entry in fs.list_dir(root):
            name = entry.name
            if not name.startswith(".") or not entry.is_file(follow_symlinks=False):
                continue
            if name.endswith(fs.TMP_SUFFIX) and _SUFFIX + "." in name:
                stem = name[1:].split(_SUFFIX + ".", 1)[0]
            elif name.endswith(_LOCK_SUFFIX):
                stem = name[1 : -len(_LOCK_SUFFIX)]
            else:
                continue
            lock = f".{stem}{_LOCK_SUFFIX}"
            with fs.locked(root, lock, self.path / lock, blocking=False) as free:
                if free and name != lock:
                    fs.remove(root, name)  # the lock file itself goes when released

    # ------------------------------------------------------------------- read
    def _decode(self, root: int, name: str, where: Path) -> Any:
        data = fs.read_regular(root, name, where, max_bytes=MAX_STATE_FILE_BYTES)
        return None if data is None else decode_state(data, str(where))

    def _read_current(self, root: int, subject: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        name = subject_filename(subject)
        decoded = self._decode(root, name, self.path / name)
        if decoded is None:
            raise StateFileError(f"{self.path}: no state for subject {subject!r}")
        if decoded.metadata.get("subject") != subject:
            raise StateFileError(
                f"{self.path / name}: holds subject {decoded.metadata.get('subject')!r}, not "
                f"{subject!r} (two ids share a file name); refused"
            )
        return decoded.tensors, {**decoded.metadata, "state_version": decoded.version}

    def read(self, subject: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and metadata of ``subject``'s current state (``metadata["state_version"]``)."""
        with self._root() as root:
            return self._read_current(root, subject)

    def current(self, subject: str) -> StateVersion | None:
        """The current version of ``subject`` from its header (None when absent)."""
        with self._root() as root:
            header = self._current(root, subject)
            if header is None:
                return None
            name = subject_filename(subject)
            mtime = os.stat(name, dir_fd=root, follow_symlinks=False).st_mtime
        return StateVersion(header.version, header.digest, mtime, self.path / name)

    def digest(self, subject: str) -> str:
        """Digest of the tensors of ``subject``'s current file (checked against the tensors)."""
        with self._root() as root:
            name = subject_filename(subject)
            decoded = self._decode(root, name, self.path / name)
        if decoded is None:
            raise StateFileError(f"{self.path}: no state for subject {subject!r}")
        return str(decoded.digest)

    def _state_files(self, root: int) -> list[os.DirEntry[str]]:
        return sorted(
            (
                e
                for e in fs.list_dir(root)
                if e.name.endswith(_SUFFIX) and not e.name.startswith(".")
            ),
            key=lambda e: e.name,
        )

    def read_all(self) -> dict[str, tuple[dict[str, Tensor], dict[str, Any]]]:
        """Every state in the folder by subject id (any unreadable file raises)."""
        out: dict[str, tuple[dict[str, Tensor], dict[str, Any]]] = {}
        with self._root() as root:
            for entry in self._state_files(root):
                where = self.path / entry.name
                decoded = self._decode(root, entry.name, where)
                if decoded is None:
                    continue  # removed meanwhile
                subject = decoded.metadata.get("subject")
                if entry.name != subject_filename(subject):
                    raise StateFileError(
                        f"{where}: file name does not match its subject id {subject!r}"
                    )
                out[subject] = (
                    decoded.tensors,
                    {**decoded.metadata, "state_version": decoded.version},
                )
        return out

    def subjects(self) -> list[str]:
        """Ids of the stored subjects (from the files' headers; a bad file raises)."""
        out = []
        with self._root() as root:
            for entry in self._state_files(root):
                where = self.path / entry.name
                header = self._header(root, entry.name, where)
                if header is None:
                    continue
                if entry.name != subject_filename(header.subject):
                    raise StateFileError(
                        f"{where}: file name does not match its subject id {header.subject!r}"
                    )
                out.append(header.subject)
        return out

    def survey(self) -> list[StoredFile]:
        """Every current-state file, fully checked, with what is wrong with it (for audits)."""
        out = []
        with self._root() as root:
            for entry in self._state_files(root):
                where = self.path / entry.name
                try:
                    decoded = self._decode(root, entry.name, where)
                    if decoded is None:
                        continue
                    subject = decoded.metadata["subject"]
                    mtime = entry.stat(follow_symlinks=False).st_mtime
                    version = StateVersion(decoded.version, decoded.digest, mtime, where)
                    if entry.name != subject_filename(subject):
                        out.append(
                            StoredFile(
                                entry.name,
                                subject,
                                version,
                                f"file name does not match its subject id {subject!r}",
                            )
                        )
                        continue
                    out.append(StoredFile(entry.name, subject, version))
                except StateFileError as exc:
                    out.append(StoredFile(entry.name, None, None, str(exc)))
        return out

    # --------------------------------------------------------------- versions
    def versions(self, subject: str) -> list[StateVersion]:
        """The kept versions of ``subject``, oldest first, the current one last (each checked).

        Without version files (``keep_versions=0``) that is the current state alone.
        """
        out = []
        with self._root() as root:
            header = self._current(root, subject)
            if header is None:
                return []
            with self._version_dir(root, subject, create=False) as vdir:
                for number in self._numbers(vdir):
                    if number > header.version or vdir is None:
                        continue
                    name = _version_name(number)
                    where = (
                        self.path
                        / _VERSIONS_DIR
                        / subject_filename(subject)[: -len(_SUFFIX)]
                        / name
                    )
                    decoded = self._decode(vdir, name, where)
                    if decoded is None:
                        continue
                    mtime = os.stat(name, dir_fd=vdir, follow_symlinks=False).st_mtime
                    out.append(StateVersion(number, decoded.digest, mtime, where))
            if not out or out[-1].version != header.version:
                name = subject_filename(subject)
                mtime = os.stat(name, dir_fd=root, follow_symlinks=False).st_mtime
                out.append(StateVersion(header.version, header.digest, mtime, self.path / name))
        return out

    def _read_version(
        self, root: int, subject: str, version: int
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        _check_version_arg("version", version, minimum=1)
        header = self._current(root, subject)
        current = 0 if header is None else header.version
        with self._version_dir(root, subject, create=False) as vdir:
            numbers = [n for n in self._numbers(vdir) if n <= current]
            if vdir is not None and version in numbers:
                name = _version_name(version)
                stem = subject_filename(subject)[: -len(_SUFFIX)]
                where = self.path / _VERSIONS_DIR / stem / name
                decoded = self._decode(vdir, name, where)
                if decoded is not None:
                    if decoded.metadata.get("subject") != subject or decoded.version != version:
                        raise StateFileError(
                            f"{where}: holds subject {decoded.metadata.get('subject')!r} "
                            f"version {decoded.version}, not {subject!r} version {version}"
                        )
                    return decoded.tensors, {**decoded.metadata, "state_version": version}
        if version == current:
            return self._read_current(root, subject)
        kept = sorted(set(numbers) | ({current} if current else set()))
        raise StateFileError(
            f"{self.path}: no version {version!r} of subject {subject!r}; kept versions: {kept}"
        )

    def read_version(self, subject: str, version: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and metadata of one kept version of ``subject``."""
        with self._root() as root:
            return self._read_version(root, subject, version)

    def rollback(
        self, subject: str, version: int, *, expected_version: int | None = None
    ) -> StateVersion:
        """Make an earlier version current again (written as a new version: history is kept)."""
        if expected_version is not None:
            _check_version_arg("expected_version", expected_version, minimum=0)
        with self._root() as root:
            self._sweep(root)
            with self._subject_lock(root, subject):
                tensors, metadata = self._read_version(root, subject, version)
                metadata = {**metadata, "rolled_back_from": version}
                return self._write_locked(root, subject, tensors, metadata, expected_version)

    def delete(self, subject: str, *, expected_version: int | None = None) -> None:
        """Remove ``subject``'s current state and every kept version (right to erasure).

        Version files go first, the current file last, so a crash midway leaves a
        readable subject (with less history) that a second ``delete`` removes.
        """
        if expected_version is not None:
            _check_version_arg("expected_version", expected_version, minimum=0)
        with self._root() as root, self._subject_lock(root, subject):
            header = self._current(root, subject)
            current = 0 if header is None else header.version
            if expected_version is not None and expected_version != current:
                raise self._stale(subject, expected_version, current)
            with self._version_dir(root, subject, create=False) as vdir:
                if vdir is None and header is None:
                    raise StateFileError(f"{self.path}: no state for subject {subject!r}")
                if vdir is not None:
                    for entry in fs.list_dir(vdir):
                        fs.remove(vdir, entry.name)
                    os.fsync(vdir)
            if vdir is not None:
                top = fs.open_subdir(root, _VERSIONS_DIR, self.path / _VERSIONS_DIR, create=False)
                if top is not None:
                    try:
                        os.rmdir(subject_filename(subject)[: -len(_SUFFIX)], dir_fd=top)
                        os.fsync(top)
                    except OSError:
                        pass  # not empty (a subfolder someone made): the files are gone
                    finally:
                        os.close(top)
            name = subject_filename(subject)
            self._remove_temps(root, prefix=f".{name}.")
            fs.remove(root, name)
            os.fsync(root)
