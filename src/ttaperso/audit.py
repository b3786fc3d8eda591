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

Appends are atomic in practice: one ``write`` of one line on a file opened with
``O_APPEND``, then ``fsync``. A crash mid-write can only leave a torn last line without its
newline; it was never acknowledged, so the next append cuts it off before writing (and
:func:`verify` reports it as a torn tail, not as tampering).

Events written by the :class:`~ttaperso.Personalizer` (``Personalizer(..., audit=folder)``):
``save`` (state digest, kept version, frames and updates since the last save), ``load``,
``reset`` (cause), ``guard`` (collapse-guard recovery: causes, signals, restored to),
``calibrate`` and ``rollback``. Every record's ``data`` carries the strategy, its config
and the base-model digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError, StateFileError
from .stores import subject_filename

__all__ = ["AuditLog", "AuditReport", "verify", "verify_file", "GENESIS"]

GENESIS = "0" * 64
_SUFFIX = ".audit.jsonl"


def _record_hash(record: Mapping[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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
        """True when the chain is intact (a torn, unacknowledged tail is not an error)."""
        return not self.errors


def verify_file(path: str | Path) -> AuditReport:
    """Check one log: every line parses, hashes match, ``prev`` links and ``seq`` increase."""
    path = Path(path)
    report = AuditReport(path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        report.torn_tail = True
        lines.pop()
    prev = GENESIS
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
        prev = record["hash"]
        report.records = number
    report.last_hash = prev
    if report.subject is not None and path.name != subject_filename(report.subject).replace(
        ".safetensors", _SUFFIX
    ):
        report.errors.append(f"{path.name}: file name does not match subject {report.subject!r}")
    return report


def verify(folder: str | Path) -> list[AuditReport]:
    """Verify every subject log in ``folder`` (sorted by file name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"Expected an audit log folder but {str(folder)!r} is not a directory")
    return [verify_file(p) for p in sorted(folder.glob(f"*{_SUFFIX}"))]


class AuditLog:
    """Per-subject hash-chained JSONL logs in one folder (created on first append)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AuditLog({str(self.folder)!r})"

    def path(self, subject: str) -> Path:
        """The log file of ``subject`` (slug + hash of the id: never outside the folder)."""
        return self.folder / subject_filename(subject).replace(".safetensors", _SUFFIX)

    def _tail(self, path: Path) -> tuple[int, str, int]:
        """(next seq, last hash, byte length of the complete lines) of a log file."""
        if not path.exists():
            return 0, GENESIS, 0
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1  # bytes after the last newline are a torn, unacked write
        if end == 0:
            return 0, GENESIS, 0
        start = data.rfind(b"\n", 0, end - 1) + 1
        try:
            last = json.loads(data[start : end - 1].decode("utf-8"))
            return int(last["seq"]) + 1, str(last["hash"]), end
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise StateFileError(f"{path}: last audit record unreadable ({exc})") from exc

    def append(self, subject: str, event: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Append one event to ``subject``'s log (fsync'd before returning); return the record."""
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.path(subject)
            seq, prev, complete = self._tail(path)
            record: dict[str, Any] = {
                "seq": seq,
                "time": time.time(),
                "subject": subject,
                "event": event,
                "data": dict(data),
                "prev": prev,
            }
            record["hash"] = _record_hash(record)
            line = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                if os.fstat(fd).st_size != complete:
                    os.ftruncate(fd, complete)  # drop a torn, never-acknowledged tail
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            return record

    def records(self, subject: str) -> Iterator[dict[str, Any]]:
        """The complete records of ``subject``'s log, oldest first (not verified)."""
        path = self.path(subject)
        if not path.exists():
            return
        for raw in path.read_bytes().split(b"\n"):
            if raw:
                try:
                    yield json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    return  # torn tail

    def saves(self, subject: str) -> list[dict[str, Any]]:
        """The ``save`` (and ``rollback``) records of ``subject``: the states it went through."""
        return [r for r in self.records(subject) if r.get("event") in ("save", "rollback")]
