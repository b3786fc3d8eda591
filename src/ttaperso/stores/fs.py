"""File operations inside a store folder: no symbolic link followed, per-name OS locks.

Everything under a store folder (state files, ``.versions`` folders, lock files, audit
logs) is opened relative to an open folder descriptor with ``O_NOFOLLOW``, so a link
planted inside the folder can neither redirect a read nor receive a write: it is refused
with :class:`~ttaperso.errors.StateFileError`. The folder the user names itself may be a
link (that is the user's choice, not something found inside).

Locks are ``flock`` locks on a lock file per name (one per subject), which exclude other
processes and other threads alike (each lock opens its own file description). The holder
removes the lock file before releasing it; a waiter that then finds the path gone or
replaced retries, so no lock file is left behind and two writers can never hold "the
same" lock on two different files.

POSIX only (``fcntl``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import StateFileError

__all__ = [
    "TMP_SUFFIX",
    "atomic_write",
    "link_error",
    "list_dir",
    "locked",
    "open_dir",
    "open_subdir",
    "read_prefix",
    "read_regular",
    "remove",
]

TMP_SUFFIX = ".tmp"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def link_error(path: Path) -> StateFileError:
    """The error for a symbolic link found inside a store folder."""
    return StateFileError(
        f"{path}: is a symbolic link; ttaperso does not follow links inside a store folder "
        "(replace it with the real file or folder)"
    )


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def open_dir(path: Path, *, create: bool) -> int:
    """An open descriptor of the folder ``path`` (created with its parents when asked)."""
    if create:
        path.mkdir(parents=True, exist_ok=True)
    try:
        return os.open(path, _DIR_FLAGS)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise StateFileError(f"{path}: no such state folder") from exc


def open_subdir(dir_fd: int, name: str, where: Path, *, create: bool) -> int | None:
    """Descriptor of the folder ``name`` inside ``dir_fd`` (None when absent and not created).

    ``where`` is the folder's full path, for messages. A link is refused.
    """
    for _ in range(2):
        try:
            return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
        except FileNotFoundError:
            if not create:
                return None
            try:
                os.mkdir(name, 0o755, dir_fd=dir_fd)
            except FileExistsError:
                pass  # made by a concurrent writer: open it
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                if _is_link(dir_fd, name):
                    raise link_error(where) from exc
                raise StateFileError(f"{where}: is not a folder") from exc
            raise StateFileError(f"{where}: cannot be opened ({exc})") from exc
    raise StateFileError(f"{where}: cannot be created")  # pragma: no cover - mkdir raced twice


def _open_regular(dir_fd: int, name: str, where: Path) -> int | None:
    """Descriptor of the regular file ``name`` (None when absent); links and others refused."""
    try:
        # O_NONBLOCK: a FIFO planted under the file's name must not block the open.
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP or _is_link(dir_fd, name):
            raise link_error(where) from exc
        raise StateFileError(f"{where}: not a readable ttaperso state file ({exc})") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StateFileError(f"{where}: is not a regular file")
    return fd


def _read_exactly(fd: int, size: int) -> bytes:
    chunks = []
    while size > 0:
        chunk = os.read(fd, min(size, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_regular(dir_fd: int, name: str, where: Path, *, max_bytes: int) -> bytes | None:
    """The whole content of a regular file in one read (None when absent)."""
    fd = _open_regular(dir_fd, name, where)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise StateFileError(f"{where}: {size} bytes is larger than any subject state")
        return _read_exactly(fd, size + 1)  # +1: notice a file that grew meanwhile
    finally:
        os.close(fd)


def read_prefix(dir_fd: int, name: str, where: Path, *, header_limit: int) -> bytes | None:
    """The 8-byte length and the header of a safetensors file, without its tensors."""
    fd = _open_regular(dir_fd, name, where)
    if fd is None:
        return None
    try:
        head = _read_exactly(fd, 8)
        if len(head) < 8:
            return head
        size = int.from_bytes(head, "little")
        return head + _read_exactly(fd, min(size, header_limit))
    finally:
        os.close(fd)


def list_dir(dir_fd: int) -> list[os.DirEntry[str]]:
    """Entries of an open folder (``os.scandir`` duplicates the descriptor)."""
    with os.scandir(dir_fd) as entries:
        return list(entries)


def remove(dir_fd: int, name: str) -> None:
    """Remove ``name`` (never follows a link: a link is removed itself); absent is fine."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def atomic_write(dir_fd: int, name: str, data: bytes) -> None:
    """Replace ``name`` with ``data``: readers see the old file or the new one, never half.

    Temp file ``.<name>.<random>.tmp`` created exclusively (never through a link), fsync,
    rename over ``name`` (a link at ``name`` is replaced, not written through), fsync of
    the folder so the rename survives a power cut.
    """
    tmp = f".{name}.{secrets.token_hex(6)}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        remove(dir_fd, tmp)
        raise
    os.fsync(dir_fd)


@contextmanager
def locked(dir_fd: int, name: str, where: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold the exclusive lock ``name`` in the folder; yields False if not blocking and busy.

    ``where`` is the lock file's full path, for messages. The lock file is removed before
    the lock is released (see the module docstring).
    """
    while True:
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise link_error(where) from exc
            raise StateFileError(f"{where}: cannot be opened ({exc})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        except BaseException:
            os.close(fd)
            raise
        try:
            on_disk = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            on_disk = None
        held = os.fstat(fd)
        if on_disk is not None and (on_disk.st_ino, on_disk.st_dev) == (held.st_ino, held.st_dev):
            break
        os.close(fd)  # the previous holder removed (or replaced) the file: lock the new one
    try:
        yield True
    finally:
        try:
            remove(dir_fd, name)
        finally:
            os.close(fd)
