"""The audit trail of one Personalizer: its events per subject, in a hash-chained log."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from ..audit import AuditLog
from ..errors import InputError
from ..guards import GuardEvent

__all__ = ["AuditTrail", "as_audit"]

log = logging.getLogger(__name__)


def as_audit(audit: AuditLog | str | Path | None) -> AuditLog | None:
    """An :class:`AuditLog` from a log, its folder, or None (no audit)."""
    if audit is None or isinstance(audit, AuditLog):
        return audit
    if isinstance(audit, (str, Path)):
        return AuditLog(audit)
    raise InputError(
        f"Expected argument `audit` to be an AuditLog, a folder path or None but got "
        f"{type(audit).__name__}"
    )


class AuditTrail:
    """Writes a Personalizer's events to its audit log (a no-op without one).

    Every record's data carries ``context()`` (strategy, config, base-model digest,
    version). Frames, updated frames and guard trips are counted per subject between two
    audited saves and written with the save. Callers hold the Personalizer's lock.
    """

    def __init__(self, log_: AuditLog | None, context: Callable[[], dict[str, Any]]) -> None:
        self.log = log_
        self._context = context
        #: frames / updated frames / guard trips per subject since its last audited save
        self._activity: dict[str, dict[str, int]] = {}

    def event(self, subject: str, event: str, data: dict[str, Any]) -> None:
        """Append one event for ``subject``."""
        if self.log is not None:
            self.log.append(subject, event, {**data, **self._context()})

    def step(self, subject: str, updated: Tensor, guard: GuardEvent | None) -> None:
        """Count one step's frames and updates; record a guard recovery."""
        if guard is not None:
            log.info(
                "%s: collapse guard recovered to %s (%s)",
                subject,
                guard.recovered_to,
                ", ".join(guard.causes),
            )
        if self.log is None:
            return
        activity = self._activity.setdefault(subject, {"frames": 0, "updated": 0, "trips": 0})
        activity["frames"] += int(updated.numel())
        activity["updated"] += int(updated.sum())
        if guard is not None:
            activity["trips"] += 1
            self.event(
                subject,
                "guard",
                {
                    "causes": list(guard.causes),
                    "frame": guard.frame,
                    "recovered_to": guard.recovered_to,
                    "signals": guard.signals,
                },
            )

    def saved(
        self,
        subject: str,
        digest: str,
        version: int | None,
        store: object,
        *,
        from_version: int | None = None,
    ) -> None:
        """Record a save (store version, the version it replaced) with the activity since
        the previous one."""
        activity = self._activity.pop(subject, {"frames": 0, "updated": 0, "trips": 0})
        self.event(
            subject,
            "save",
            {
                "store": repr(store),
                "state_digest": digest,
                "version": version,
                "from_version": from_version,
                "since_last_save": activity,
            },
        )
