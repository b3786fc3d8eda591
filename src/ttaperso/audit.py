"""Append-only, hash-chained audit log of adaptation events, one JSONL file per subject.

A clinic must be able to show what happened to a patient's model and undo it. Each
subject's log ``<folder>/<slug>-<hash>.audit.jsonl`` holds one JSON record per line::

    {"seq": 3, "time": 1763900000.1, "subject": "patient-017", "event": "save",
     "data": {...}, "prev": "<hash of record 2>", "hash": "<sha256 of this record>"}

``hash`` is the SHA-256 of the record's canonical JSON without ``hash`` (sorted keys, no
spaces) and ``prev`` the previous record's hash (64 zeros for the first), so editing,
removing or reordering any record breaks the chain from there on: :func:`verify` finds it
(``ttaperso audit verify <folder>``). Deleting the *last* records cannot be detected from
the file alone: keep the last hash (printed by ``verify``) elsewhere to pin the tail.

Many processes may append to one log: every append holds an exclusive ``flock`` on the
log file while it reads the tail, repairs it and writes one line (``O_APPEND``, then
``fsync``). A crash mid-write can only leave a torn last line without its newline; it was
never acknowledged, so the next append (holding the lock, so no other writer is mid-line)
cuts it off and records how many bytes it cut (``repaired_tail_bytes``). :func:`verify`
reports a torn tail as a failure: it may also be a log cut by hand. Logs are never opened
through a symbolic link.

Events written by the :class:`~ttaperso.Personalizer` (``Personalizer(..., audit=folder)``):
``save`` (state digest, store version and the version it replaced, frames and updates
since the last save), ``load``, ``reset`` (cause), ``guard`` (collapse-guard recovery),
``calibrate`` and ``rollback``. Every record's ``data`` carries the strategy, its config
and the base-model digest.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError, StateFileError
from .stores import FolderStore, subject_filename
from .stores.fs import link_error

__all__ = [
    "AuditLog",
    "AuditReport",
    "GENESIS",
    "StateReport",
    "verify",
    "verify_file",
    "verify_states",
]

GENESIS = "0" * 64
_SUFFIX = ".audit.jsonl"
_WRITES = ("save", "rollback")
#: bytes read per step when looking for the last complete line from the end of a log
_TAIL_BLOCK = 64 * 1024


def _record_hash(record: Mapping[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _log_name(subject: str) -> str:
    return subject_filename(subject).replace(".safetensors", _SUFFIX)


def _open_log(path: Path, flags: int) -> int:
    """Open a log file without following a link; refuse anything but a regular file."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise link_error(path) from exc
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StateFileError(f"{path}: is not a regular file")
    return fd


def _last_line(fd: int, size: int) -> tuple[bytes | None, int]:
    """(the last complete line without its newline or None, byte length of complete lines)."""
    buf = b""
    pos = size
    while pos > 0:
        start = max(0, pos - _TAIL_BLOCK)
        buf = os.pread(fd, pos - start, start) + buf
        pos = start
        nl = buf.rfind(b"\n")
        if nl < 0:
            continue
        before = buf.rfind(b"\n", 0, nl)
        if before >= 0 or pos == 0:
            return buf[before + 1 : nl], pos + nl + 1
    return None, 0


def _write_data(record: Mapping[str, Any]) -> dict[str, Any]:
    data = record.get("data")
    return data if isinstance(data, dict) else {}


@dataclass
class AuditReport:
    """Result of verifying one subject's log."""

    path: Path
    records: int = 0
    subject: str | None = None
    last_hash: str = GENESIS
    torn_tail: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the chain is intact and complete (a torn tail is a failure)."""
        return not self.errors


def _check_history(report: AuditReport, number: int, record: Mapping[str, Any], last: dict) -> None:
    """Per store, every recorded write follows the previous one: no write missing."""
    data = _write_data(record)
    version = data.get("version", data.get("new_version"))
    store = data.get("store")
    if not isinstance(version, int) or not isinstance(store, str):
        return
    prev = last.get(store)
    origin = data.get("from_version")
    where = f"{report.path.name} line {number}"
    if prev is not None and isinstance(origin, int) and origin != prev:
        report.errors.append(
            f"{where}: {record.get('event')} of version {version} was made from version "
            f"{origin}, but the last recorded write to {store} is version {prev} (a stale "
            "writer, or a write not in this log)"
        )
    elif prev is not None and version != prev + 1:
        report.errors.append(
            f"{where}: {record.get('event')} of version {version} follows recorded version "
            f"{prev} of {store}: version(s) written without an audit record"
        )
    last[store] = version


def verify_file(path: str | Path) -> AuditReport:
    """Check one log: every line parses, hashes match, ``prev`` links, ``seq`` increase,
    the last line is complete, and the recorded writes of each store follow each other."""
    path = Path(path)
    report = AuditReport(path)
    try:
        fd = _open_log(path, os.O_RDONLY)
    except StateFileError as exc:
        report.errors.append(str(exc))
        return report
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # no append is half-written while we read
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        report.torn_tail = True
        torn = lines.pop()
        report.errors.append(
            f"{path.name}: last line is incomplete ({len(torn)} bytes without a newline): a "
            "write cut short by a crash, or a log cut by hand; the next append for this "
            "subject removes it"
        )
    prev = GENESIS
    last_write: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        where = f"{path.name} line {number}"
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            report.errors.append(f"{where}: not a JSON record ({exc})")
            break
        if not isinstance(record, dict) or not {"seq", "prev", "hash", "subject"} <= set(record):
            report.errors.append(f"{where}: not an audit record")
            break
        if record["hash"] != _record_hash(record):
            report.errors.append(f"{where}: hash mismatch (record edited)")
        if record["prev"] != prev:
            report.errors.append(f"{where}: chain broken (prev does not match line {number - 1})")
        if record["seq"] != number - 1:
            report.errors.append(f"{where}: seq {record['seq']!r}, expected {number - 1}")
        if report.subject is None:
            report.subject = record["subject"]
        elif record["subject"] != report.subject:
            report.errors.append(f"{where}: subject {record['subject']!r} in another's log")
        if record.get("event") in _WRITES:
            _check_history(report, number, record, last_write)
        prev = record["hash"]
        report.records = number
    report.last_hash = prev
    if report.subject is not None and path.name != _log_name(str(report.subject)):
        report.errors.append(f"{path.name}: file name does not match subject {report.subject!r}")
    if report.records == 0 and not report.errors:
        report.errors.append(
            f"{path.name}: empty log (no records): emptied by hand, or a crash before its "
            "first record was written"
        )
    return report


def _log_paths(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InputError(f"Expected an audit log folder but {str(folder)!r} is not a directory")
    return sorted(p for p in folder.iterdir() if p.name.endswith(_SUFFIX))


def verify(folder: str | Path) -> list[AuditReport]:
    """Verify every subject log in ``folder`` (sorted by file name; links are failures)."""
    return [verify_file(p) for p in _log_paths(Path(folder))]


@dataclass
class StateReport:
    """Result of checking one current state file against its subject's audit log."""

    file: str
    subject: str | None
    version: int | None = None
    digest: str | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the state is the last write its subject's log records."""
        return not self.errors


def verify_states(
    folder: str | Path, states: str | Path | FolderStore, reports: list[AuditReport] | None = None
) -> list[StateReport]:
    """Check every current state in ``states`` against its subject's log in ``folder``.

    A state fails when it is unreadable, has no log or a log without a recorded save, or
    is not the last save/rollback its log records (digest and version). ``reports``:
    the logs' reports when :func:`verify` already ran.
    """
    store = states if isinstance(states, FolderStore) else FolderStore(states)
    logs = verify(folder) if reports is None else reports
    by_subject = {r.subject: r for r in logs if r.subject is not None}
    out = []
    audit = AuditLog(folder)
    for stored in store.survey():
        report = StateReport(stored.name, stored.subject)
        out.append(report)
        if stored.error is not None or stored.current is None or stored.subject is None:
            report.errors.append(stored.error or "unreadable")
            continue
        report.version, report.digest = stored.current.version, stored.current.digest
        log = by_subject.get(stored.subject)
        if log is None:
            report.errors.append(
                "no audit records for this subject (saved without an audit log, or its log "
                "was emptied or deleted)"
            )
            continue
        writes = audit.saves(stored.subject)
        if not writes:
            report.errors.append("its audit log records no save of this state")
            continue
        data = _write_data(writes[-1])
        logged = data.get("state_digest")
        logged_version = data.get("version", data.get("new_version"))
        if logged != report.digest:
            report.errors.append(
                f"current state (version {report.version}, digest {report.digest[:16]}) is not "
                f"the last save in its log (digest {str(logged)[:16]}): written by a stale or "
                "unaudited writer, or replaced by hand"
            )
        elif isinstance(logged_version, int) and logged_version != report.version:
            report.errors.append(
                f"current state is version {report.version}, its log's last save is version "
                f"{logged_version}"
            )
        if not log.ok:
            report.errors.append("its audit log failed verification (see above)")
    return out


class AuditLog:
    """Per-subject hash-chained JSONL logs in one folder (created on first append)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AuditLog({str(self.folder)!r})"

    def path(self, subject: str) -> Path:
        """The log file of ``subject`` (slug + hash of the id: never outside the folder)."""
        return self.folder / _log_name(subject)

    def _tail(self, fd: int, subject: str) -> tuple[int, str, int]:
        """(next seq, last hash, byte length of the complete lines) of an open log."""
        path = self.path(subject)
        line, complete = _last_line(fd, os.fstat(fd).st_size)
        if line is None:
            return 0, GENESIS, 0
        try:
            last = json.loads(line.decode("utf-8"))
            seq, last_hash, owner = int(last["seq"]) + 1, str(last["hash"]), last["subject"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise StateFileError(
                f"{path}: last audit record unreadable ({exc}); run `ttaperso audit verify "
                f"{self.folder}` and move the damaged log aside"
            ) from exc
        if owner != subject:
            raise StateFileError(
                f"{path}: log of subject {owner!r}, not {subject!r} (two ids share a file "
                "name); refused"
            )
        return seq, last_hash, complete

    def check(self, subject: str) -> None:
        """Raise StateFileError now if an append for ``subject`` would fail on its log."""
        path = self.path(subject)
        try:
            fd = _open_log(path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._tail(fd, subject)
        finally:
            os.close(fd)

    def append(self, subject: str, event: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Append one event to ``subject``'s log (fsync'd before returning); return the record."""
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.path(subject)
            fd = _open_log(path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
            try:
                # Held from reading the tail to the fsync: no other writer (process or
                # thread) can append between, and none is mid-line when a tail is cut.
                fcntl.flock(fd, fcntl.LOCK_EX)
                seq, prev, complete = self._tail(fd, subject)
                record: dict[str, Any] = {
                    "seq": seq,
                    "time": time.time(),
                    "subject": subject,
                    "event": event,
                    "data": dict(data),
                    "prev": prev,
                }
                torn = os.fstat(fd).st_size - complete
                if torn:
                    record["repaired_tail_bytes"] = torn
                record["hash"] = _record_hash(record)
                line = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
                if torn:
                    os.ftruncate(fd, complete)  # a torn, never-acknowledged line
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            return record

    def records(self, subject: str) -> Iterator[dict[str, Any]]:
        """The complete records of ``subject``'s log, oldest first (not verified)."""
        path = self.path(subject)
        try:
            fd = _open_log(path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            data = os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)
        for raw in data.split(b"\n"):
            if raw:
                try:
                    yield json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    return  # torn tail

    def saves(self, subject: str) -> list[dict[str, Any]]:
        """The ``save`` (and ``rollback``) records of ``subject``: the states it went through."""
        return [r for r in self.records(subject) if r.get("event") in _WRITES]
