"""A Personalizer bound to a store: what one server process or one Ray replica runs.

:class:`SubjectService` keeps, per subject, the store version its in-memory state came
from, and makes every request follow these rules (docs/serving.md, "Consistency"):

* **Fresh before use.** Before a subject's state is used, its in-memory version is
  compared with the store's (one cheap read on stores that have ``current_version``, such
  as :class:`~ttaperso.stores.redis.RedisStore`); a subject another replica has written
  since is reloaded from the store, one erased elsewhere is dropped. A store without
  ``current_version`` (a local folder) is taken to have this process as its only writer.
* **Write-through saves** (the default policy): a request that ran a step (predict,
  predict_many, calibrate, reset, rollback) saves the subject before it answers, with
  ``expected_version`` = the version it computed from. An answer is therefore
  acknowledged only once its state is stored, and a replica that computed from a stale
  state gets :class:`~ttaperso.errors.StaleStateError` instead of overwriting newer state:
  it drops its copy, reloads and recomputes (up to 3 attempts), so no answer is ever
  computed from a stale version. ``save_every=S`` (one process only) saves changed
  subjects every S seconds and on :meth:`close` instead: faster, but an answer may be
  acknowledged up to S seconds before it is stored.
* **Any failure drops the subject's copy.** After a failed save the in-memory state may
  hold a step the store does not: the copy is discarded and reloaded on next use.

Requests for one subject are serialised by a per-subject lock (striped); different
subjects run concurrently, the model itself under the Personalizer's lock.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from ..audit import AuditLog, verify_file
from ..errors import InputError, StaleStateError, StateFileError, TTAPersoError
from ..model import FERModel
from ..personalizer import Personalizer, Prediction
from ..stores import FolderStore, StateStore, StateVersion, VersionedStateStore
from ..stores.codec import decode_state, encode_state
from ..validation import validate_subject

__all__ = [
    "NotEnabledError",
    "ServiceSpec",
    "SubjectService",
    "UnknownSubjectError",
    "build_store",
]

log = logging.getLogger("ttaperso.serve")

#: attempts of a step whose save found a newer version in the store
MAX_ATTEMPTS = 3
_STRIPES = 256


class UnknownSubjectError(TTAPersoError, LookupError):
    """The subject (or the version asked for) has no state in the store (HTTP 404)."""


class NotEnabledError(TTAPersoError, LookupError):
    """The feature asked for is not enabled on this server (HTTP 404)."""


@dataclass(frozen=True)
class ServiceSpec:
    """Everything a process needs to build its :class:`SubjectService` (picklable for Ray).

    Attributes:
        model: a :func:`ttaperso.list_models` name, ``tiny``, or ``package.module:function``.
        strategy: registered strategy name.
        options: strategy config overrides.
        store: a folder path (:class:`FolderStore`) or a ``redis://`` URL (:class:`RedisStore`).
        keep_versions: versions kept per subject (rollback).
        namespace: key prefix in Redis.
        audit: folder of the hash-chained audit logs (None: no audit).
        save_every: 0 = save before answering (write-through); S > 0 = every S seconds.
        threads: torch intra-op threads of the process.
    """

    model: str = "fer-mini-xception"
    strategy: str = "tent"
    options: dict[str, Any] = field(default_factory=dict)
    store: str = "states"
    keep_versions: int = 8
    namespace: str = "ttaperso"
    audit: str | None = None
    save_every: float = 0.0
    threads: int = 1


def build_store(spec: ServiceSpec) -> VersionedStateStore:
    """The store a spec names: a ``redis://``/``rediss://`` URL or a folder."""
    if spec.store.startswith(("redis://", "rediss://", "unix://")):
        from ..stores.redis import RedisStore

        return RedisStore(spec.store, namespace=spec.namespace, keep_versions=spec.keep_versions)
    return FolderStore(spec.store, keep_versions=spec.keep_versions)


class _TrackingStore:
    """The service's view of its store, handed to ``Personalizer.save/load``.

    Records the version of every state read and written, and makes every write a
    compare-and-set against the version the *service* holds for the subject. That is the
    Personalizer's own expectation in every ordinary case; it differs only when the
    service dropped a copy the Personalizer still tracks (a subject erased or moved
    elsewhere), where the service's number (what it reloaded) is the right one.
    """

    def __init__(self, inner: VersionedStateStore, expected: Callable[[str], int]) -> None:
        self.inner = inner
        self._expected = expected
        self.last_read: dict[str, int | None] = {}
        self.last_written: dict[str, StateVersion] = {}

    def __repr__(self) -> str:
        return repr(self.inner)  # the Personalizer tracks versions per repr(store)

    def write(
        self,
        subject: str,
        tensors: dict[str, Tensor],
        metadata: dict[str, Any],
        *,
        expected_version: int | None = None,
    ) -> StateVersion:
        kept = self.inner.write(
            subject, tensors, metadata, expected_version=self._expected(subject)
        )
        self.last_written[subject] = kept
        return kept

    def read(self, subject: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors, metadata = self.inner.read(subject)
        version = metadata.get("state_version")
        self.last_read[subject] = int(version) if isinstance(version, int) else None
        return tensors, metadata

    def subjects(self) -> list[str]:
        return self.inner.subjects()


def _prediction_payload(pred: Prediction) -> dict[str, Any]:
    return {
        "labels": pred.labels.tolist(),
        "names": pred.names,
        "probs": pred.probs.float().tolist(),
        "logits": pred.logits.float().tolist(),
        "updated": pred.updated.tolist(),
        "class_names": list(pred.class_names),
    }


class SubjectService:
    """Personalize subjects against a shared store (see the module docstring for the rules).

    Args:
        personalizer: the Personalizer (its model and strategy).
        store: where states live (:class:`FolderStore`, :class:`RedisStore`, any store).
        audit: the Personalizer's audit log, also read by :meth:`audit_trail` (None: off).
        save_every: 0 = write-through (save before answering); S > 0 = save changed
            subjects every S seconds and on :meth:`close`.

    Methods return JSON-safe dicts (what the HTTP API answers).
    """

    def __init__(
        self,
        personalizer: Personalizer,
        store: VersionedStateStore,
        *,
        audit: AuditLog | None = None,
        save_every: float = 0.0,
    ) -> None:
        if not isinstance(save_every, (int, float)) or save_every < 0:
            raise InputError(f"Expected argument `save_every` to be >= 0 but got {save_every!r}")
        self.personalizer = personalizer
        self.store = store
        self.audit = audit
        self.save_every = float(save_every)
        self._tracker = _TrackingStore(store, lambda s: self._versions.get(s, 0))
        #: the tracker as the Personalizer sees it (a StateStore)
        self._tracked: StateStore = self._tracker
        #: store version of each subject's in-memory state (absent: not loaded / dropped)
        self._versions: dict[str, int] = {}
        self._dirty: set[str] = set()
        #: whether the last _fresh of a subject loaded it (the answer's `loaded` fact)
        self._loaded: dict[str, bool] = {}
        #: digest of the state each subject's last write-through save stored
        self._digests: dict[str, str | None] = {}
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._state_lock = threading.Lock()
        self._has_guard = personalizer.config.guard is not None
        self._closed = threading.Event()
        self._flusher: threading.Thread | None = None
        if self.save_every > 0:
            self._flusher = threading.Thread(
                target=self._flush_loop, name="ttaperso-flush", daemon=True
            )
            self._flusher.start()

    @classmethod
    def from_spec(cls, spec: ServiceSpec, model: FERModel | None = None) -> SubjectService:
        """Build the model (unless given), Personalizer, store and audit log of a spec."""
        from .models import resolve_model

        torch.set_num_threads(max(1, spec.threads))
        audit = AuditLog(spec.audit) if spec.audit else None
        model = model if model is not None else resolve_model(spec.model)
        p = Personalizer(model, spec.strategy, audit=audit, **spec.options)
        return cls(p, build_store(spec), audit=audit, save_every=spec.save_every)

    # ------------------------------------------------------------ helpers
    @property
    def labels(self) -> tuple[str, ...]:
        """Class names, in logit order."""
        return self.personalizer.labels

    @contextmanager
    def _locked(self, subjects: list[str]) -> Iterator[None]:
        """Hold the stripes of ``subjects`` (in index order: no deadlock between requests)."""
        indexes = sorted(
            {int(hashlib.sha1(s.encode()).hexdigest()[:8], 16) % _STRIPES for s in subjects}
        )
        with ExitStack() as stack:
            for i in indexes:
                stack.enter_context(self._stripes[i])
            yield

    def _current(self, subject: str) -> StateVersion | None:
        """The store's current version of ``subject`` (None: absent)."""
        if isinstance(self.store, FolderStore) and not self.store.path.is_dir():
            return None  # nothing saved yet
        return cast(Any, self.store).current(subject)

    def _store_version(self, subject: str) -> int | None:
        """The store's current version (None: the store cannot tell cheaply)."""
        current = getattr(self.store, "current_version", None)
        return None if current is None else int(current(subject))

    def _fresh(self, subject: str) -> int:
        """Make the in-memory state of ``subject`` the store's current one; return its version.

        Sets ``self._loaded[subject]`` to whether this call had to (re)load it.
        """
        known = self._versions.get(subject)
        current = self._store_version(subject)
        if known is not None and (current is None or current == known):
            self._loaded[subject] = False
            return known
        self._loaded[subject] = True
        absent = current == 0 if current is not None else self._current(subject) is None
        p = self.personalizer
        if absent:
            if subject in p.subjects:  # erased or reset elsewhere, or a dropped copy
                p.reset(subject)
            self._versions[subject] = 0
            return 0
        p.load(self._tracked, [subject])
        version = self._tracker.last_read.get(subject)
        if version is None:
            raise StateFileError(f"{self.store!r} subject {subject!r}: read without a version")
        self._versions[subject] = version
        return version

    def _versions_of(self, subject: str) -> list[StateVersion]:
        if isinstance(self.store, FolderStore) and not self.store.path.is_dir():
            return []
        return list(self.store.versions(subject))

    def _drop(self, subject: str) -> None:
        """Forget the in-memory version: the next use reloads from the store."""
        self._versions.pop(subject, None)
        self._dirty.discard(subject)

    def _persist(self, subject: str, based_on: int) -> int | None:
        """Save ``subject`` now (write-through) or mark it for the next flush.

        Returns the stored version (None: pending); ``self._digests[subject]`` gets its digest.
        """
        if self.save_every > 0:
            self._dirty.add(subject)
            self._digests.pop(subject, None)
            return None
        self.personalizer.save(self._tracked, [subject])
        kept = self._tracker.last_written[subject]
        self._versions[subject] = kept.version
        self._digests[subject] = kept.digest
        return kept.version

    def _trips(self, subject: str) -> int:
        if not self._has_guard or subject not in self.personalizer.subjects:
            return 0
        guard = self.personalizer.inspect(subject).details.get("guard", {})
        return int(guard.get("trips", 0))

    def _step(
        self, subject: str, run: Callable[[], Prediction | None]
    ) -> tuple[Prediction | None, dict[str, Any]]:
        """Fresh -> run -> save, retried on a stale save; the caller holds the subject's lock."""
        reloads = 0
        for attempt in range(MAX_ATTEMPTS):
            based_on = self._fresh(subject)
            trips = self._trips(subject)
            pred = run()  # InputError etc.: nothing changed, propagate
            try:
                version = self._persist(subject, based_on)
            except StaleStateError:
                self._drop(subject)
                reloads += 1
                log.info("%s: stale save (attempt %d): reloading", subject, attempt + 1)
                continue
            except BaseException:
                self._drop(subject)
                raise
            facts = {
                "version": version,
                "based_on": based_on,
                "state_digest": self._digests.get(subject),
                "loaded": self._loaded.get(subject, False),
                "reloads": reloads,
                "guard_trips": self._trips(subject) - trips,
            }
            return pred, facts
        raise StaleStateError(
            f"subject {subject!r}: the store kept changing under {MAX_ATTEMPTS} attempts "
            "(another replica is writing this subject); nothing was acknowledged"
        )

    @staticmethod
    def _answer(subject: str, pred: Prediction, facts: dict[str, Any]) -> dict[str, Any]:
        return {
            "subject": subject,
            **_prediction_payload(pred),
            **facts,
            "frames": int(pred.updated.numel()),
            "adapted_frames": int(pred.updated.sum()),
        }

    # ------------------------------------------------------------ requests
    def predict(self, subject: str, frames: Tensor) -> dict[str, Any]:
        """Predict and adapt ``subject`` on preprocessed ``frames`` (N, C, H, W)."""
        subject = validate_subject(subject)
        with self._locked([subject]):
            pred, facts = self._step(subject, lambda: self.personalizer.predict(frames, subject))
        assert pred is not None
        return self._answer(subject, pred, facts)

    def predict_many(self, frames: Mapping[str, Tensor]) -> dict[str, dict[str, Any]]:
        """Several subjects in one call: one batched ``Personalizer.predict_many``.

        All-or-nothing on input (every id and batch checked before any state changes).
        A subject whose save finds a newer version is recomputed alone from the fresh state.
        """
        if not isinstance(frames, Mapping) or not frames:
            raise InputError("Expected a non-empty mapping {subject: frames}")
        subjects = [validate_subject(s) for s in frames]
        out: dict[str, dict[str, Any]] = {}
        with self._locked(subjects):
            based = {s: self._fresh(s) for s in subjects}
            trips = {s: self._trips(s) for s in subjects}
            preds = self.personalizer.predict_many(dict(frames))
            for s in subjects:
                try:
                    version = self._persist(s, based[s])
                except StaleStateError:
                    self._drop(s)

                    def again(s: str = s) -> Prediction:
                        return self.personalizer.predict(frames[s], s)

                    pred, facts = self._step(s, again)
                    assert pred is not None
                    out[s] = self._answer(s, pred, {**facts, "reloads": facts["reloads"] + 1})
                    continue
                except BaseException:
                    for t in subjects:
                        if t not in out:
                            self._drop(t)
                    raise
                facts = {
                    "version": version,
                    "based_on": based[s],
                    "state_digest": self._digests.get(s),
                    "loaded": self._loaded.get(s, False),
                    "reloads": 0,
                    "guard_trips": self._trips(s) - trips[s],
                }
                out[s] = self._answer(s, preds[s], facts)
        return out

    def calibrate(
        self,
        subject: str,
        frames: Tensor,
        *,
        neutral_label: str | None = "neutral",
        margin: float | None = None,
    ) -> dict[str, Any]:
        """Neutral-baseline calibration of ``subject`` (see ``Personalizer.calibrate``)."""
        subject = validate_subject(subject)
        kwargs: dict[str, Any] = {"neutral_label": neutral_label}
        if margin is not None:
            kwargs["margin"] = margin

        def run() -> None:
            self.personalizer.calibrate(subject, frames, **kwargs)

        with self._locked([subject]):
            _, facts = self._step(subject, run)
        return {"subject": subject, **facts}

    def reset(self, subject: str) -> dict[str, Any]:
        """Forget ``subject``'s adaptation: a fresh state, stored as a new version."""
        subject = validate_subject(subject)
        p = self.personalizer
        with self._locked([subject]):
            for _ in range(MAX_ATTEMPTS):
                based_on = self._fresh(subject)
                if based_on == 0:
                    raise UnknownSubjectError(f"No state for subject {subject!r}")
                if subject in p.subjects:
                    p.reset(subject)
                fresh = p.strategy.initial_state().flat()
                try:
                    kept = self._tracker.write(
                        subject, fresh, {**p.state_metadata(), "reset": True}
                    )
                except StaleStateError:
                    self._drop(subject)
                    continue
                except BaseException:
                    self._drop(subject)
                    raise
                self._drop(subject)
                self._fresh(subject)  # load the stored fresh state (audited)
                return {"subject": subject, "version": kept.version, "based_on": based_on}
        raise StaleStateError(f"subject {subject!r}: the store kept changing; not reset")

    def versions(self, subject: str) -> dict[str, Any]:
        """Kept versions of ``subject`` (oldest first) and the current version."""
        subject = validate_subject(subject)
        with self._locked([subject]):
            now = self._current(subject)
            kept = self._versions_of(subject)
        current = 0 if now is None else now.version
        if not current:
            raise UnknownSubjectError(f"No state for subject {subject!r}")
        return {
            "subject": subject,
            "current": current,
            "versions": [
                {"version": v.version, "digest": v.digest, "saved_at": v.saved_at} for v in kept
            ],
        }

    def rollback(self, subject: str, version: int) -> dict[str, Any]:
        """Make kept ``version`` current again (a new version; checked against the model)."""
        subject = validate_subject(subject)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InputError(f"Expected argument `version` to be an int >= 1 but got {version!r}")
        p = self.personalizer
        with self._locked([subject]):
            based_on = self._fresh(subject)
            kept = [v.version for v in self._versions_of(subject)]
            if version not in kept:
                raise UnknownSubjectError(
                    f"No version {version} of subject {subject!r}; kept versions: {kept}"
                )
            _, metadata = self.store.read_version(subject, version)
            ours = p.state_metadata()
            for key in ("model_digest", "strategy"):
                if metadata.get(key) != ours[key]:
                    raise StateFileError(
                        f"subject {subject!r} version {version}: made with {key} "
                        f"{str(metadata.get(key))[:16]!r}, this server runs {str(ours[key])[:16]!r}"
                    )
            try:
                new = self.store.rollback(subject, version, expected_version=based_on)
            finally:
                self._drop(subject)
            self._fresh(subject)
            if self.audit is not None:
                self.audit.append(
                    subject,
                    "rollback",
                    {
                        "to_version": version,
                        "new_version": new.version,
                        "store": repr(self.store),
                        **{k: ours[k] for k in ("strategy", "model_digest")},
                    },
                )
        return {
            "subject": subject,
            "version": new.version,
            "rolled_back_to": version,
            "based_on": based_on,
        }

    def export(self, subject: str) -> tuple[bytes, int, str]:
        """The current state file of ``subject``: (bytes, version, digest)."""
        subject = validate_subject(subject)
        read_bytes = getattr(self.store, "read_bytes", None)
        try:
            if read_bytes is not None:  # RedisStore: the stored bytes, checked
                data, version = read_bytes(subject)
            else:
                current = self._current(subject)
                if current is None:
                    raise UnknownSubjectError(f"No state for subject {subject!r}")
                if current.path is not None:  # FolderStore: the file itself
                    data = current.path.read_bytes()
                    version = current.version
                else:  # any other store: the same bytes, encoded again
                    tensors, metadata = self.store.read(subject)
                    version = int(metadata["state_version"])
                    data, _ = encode_state(tensors, metadata, subject, version)
        except StateFileError as exc:
            if "no state for subject" in str(exc):
                raise UnknownSubjectError(f"No state for subject {subject!r}") from exc
            raise
        decoded = decode_state(data, f"export of {subject!r}")
        if decoded.metadata.get("subject") != subject or decoded.version != version:
            raise StateFileError(
                f"export of {subject!r}: the state changed while it was read; try again"
            )
        return data, int(version), decoded.digest

    def delete(self, subject: str) -> dict[str, Any]:
        """Erase ``subject``: its current state and every kept version (right to erasure)."""
        subject = validate_subject(subject)
        p = self.personalizer
        with self._locked([subject]):
            if self._current(subject) is None:
                raise UnknownSubjectError(f"No state for subject {subject!r}")
            erased = [v.version for v in self._versions_of(subject)]
            # Unconditional: erasure removes whatever is stored, even a version written by
            # another replica a moment ago.
            self.store.delete(subject)
            self._drop(subject)
            if subject in p.subjects:
                p.reset(subject)
            self._versions[subject] = 0
            if self.audit is not None:
                self.audit.append(
                    subject, "delete", {"erased_versions": erased, "store": repr(self.store)}
                )
        return {"subject": subject, "erased_versions": erased, "deleted": True}

    def audit_trail(self, subject: str) -> dict[str, Any]:
        """The subject's audit records and the verification of their hash chain."""
        subject = validate_subject(subject)
        if self.audit is None:
            raise NotEnabledError("No audit log on this server (start it with --audit DIR)")
        path: Path = self.audit.path(subject)
        if not path.exists():
            raise UnknownSubjectError(f"No audit records for subject {subject!r}")
        report = verify_file(path)
        return {
            "subject": subject,
            "records": list(self.audit.records(subject)),
            "ok": report.ok,
            "errors": report.errors,
            "last_hash": report.last_hash,
        }

    def subjects(self) -> list[str]:
        """Ids of the subjects with a stored state."""
        if isinstance(self.store, FolderStore) and not self.store.path.is_dir():
            return []  # nothing saved yet
        return sorted(self.store.subjects())

    def health(self) -> dict[str, Any]:
        """Liveness and whether the store answers."""
        ping = getattr(self.store, "ping", None)
        return {"ok": True, "store": bool(ping()) if ping is not None else True}

    # ------------------------------------------------------------ lifecycle
    def evict(self, subject: str) -> None:
        """Drop ``subject``'s in-memory copy (its state is in the store: nothing is lost)."""
        with self._locked([subject]):
            if subject in self._dirty:
                self._flush_one(subject)
            self._versions.pop(subject, None)
            if subject in self.personalizer.subjects:
                if self.audit is not None:
                    self.audit.append(subject, "evict", {"reason": "replica cache (LRU)"})
                self.personalizer.reset(subject)

    def _flush_one(self, subject: str) -> None:
        try:
            self.personalizer.save(self._tracked, [subject])
        except BaseException:
            self._drop(subject)
            raise
        self._versions[subject] = self._tracker.last_written[subject].version
        self._dirty.discard(subject)

    def flush(self) -> int:
        """Save every subject changed since its last save; return how many were saved."""
        saved = 0
        for subject in sorted(self._dirty):
            with self._locked([subject]):
                if subject in self._dirty:
                    try:
                        self._flush_one(subject)
                        saved += 1
                    except TTAPersoError as exc:
                        log.error("%s: periodic save failed: %s", subject, exc)
        return saved

    def _flush_loop(self) -> None:
        while not self._closed.wait(self.save_every):
            started = time.perf_counter()
            n = self.flush()
            if n:
                log.debug("saved %d subject(s) in %.3f s", n, time.perf_counter() - started)

    def close(self) -> None:
        """Save what is pending (write-behind policy) and stop the flusher."""
        self._closed.set()
        if self._flusher is not None:
            self._flusher.join(timeout=30)
        self.flush()
        close = getattr(self.store, "close", None)
        if close is not None:
            close()
