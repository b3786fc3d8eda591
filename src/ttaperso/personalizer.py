"""The Personalizer: one frozen model, one small adapted state per subject."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__
from .audit import AuditLog
from .calibration import DEFAULT_MARGIN, neutral_logit_offset
from .config import StrategyConfig
from .errors import ConfigError, InputError, StateFileError
from .models import as_fer_model
from .runtime import ForwardOutput, ModelRuntime
from .source_data import SourceData
from .state import PackedState, SubjectState
from .store import (
    FORMAT_NAME,
    FORMAT_VERSION,
    FolderStore,
    StateStore,
    StateVersion,
    state_digest,
)
from .strategies import build_strategy, get_config_class, make_config
from .strategies.base import CALIBRATION_OFFSET, StepResult
from .validation import (
    MAX_FRAMES_PER_CALL,
    MAX_VALUES_PER_CALL,
    validate_frames,
    validate_subject,
)

__all__ = ["Personalizer", "Prediction"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """What :meth:`Personalizer.predict` returns for a batch of ``N`` frames.

    Attributes:
        subject: the subject id.
        logits: ``(N, C)`` logits of the subject's model (before output smoothing).
        probs: ``(N, C)`` class probabilities (smoothed over the subject's recent frames
            when the strategy's ``smoothing`` > 1).
        labels: ``(N,)`` predicted class indices (argmax of ``probs``).
        updated: ``(N,)`` bool, True where the frame passed the gates and went into the
            subject's state (statistics, accumulated gradients, or SAR's pending buffer,
            whose own reliability filter may still leave it out of the SAM step).
        class_names: the model's class labels.
    """

    subject: str
    logits: Tensor
    probs: Tensor
    labels: Tensor
    updated: Tensor
    class_names: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        """Predicted class names, one per frame."""
        return [self.class_names[i] for i in self.labels.tolist()]


def _as_store(target: str | Path | StateStore) -> StateStore:
    if isinstance(target, (str, Path)):
        return FolderStore(target)
    if isinstance(target, StateStore):
        return target
    raise InputError(f"Expected a folder path or a StateStore but got {type(target).__name__}")


class Personalizer:
    """Personalize one frozen FER model to many subjects at inference time, without labels.

    Args:
        model: a :class:`~ttaperso.model.FERModel` (from :func:`ttaperso.load_model` or an
            adapter) or a plain ``nn.Module`` classifier together with ``labels`` and
            ``input_shape`` (and ``head`` for strategies that need features).
        strategy: a registered strategy name (see :func:`ttaperso.list_strategies`) or a
            config object such as ``TentConfig(lr=1e-4)``.
        labels, input_shape, head, input_range: describe a plain ``nn.Module``.
        audit: an :class:`~ttaperso.audit.AuditLog` (or its folder) that records, per
            subject, saves with state digests, loads, resets, guard recoveries,
            calibrations and rollbacks in a hash-chained log.
        source: a :class:`~ttaperso.source_data.SourceData` sample of the model's source
            domain, for strategies that need one (``eata``'s Fisher anchor, ``tta_cap``'s
            source prototypes); ignored by strategies that do not.
        **options: overrides of the strategy's config keys (``lr=1e-4``, ...).

    The model is copied once and frozen; the caller's model is never modified. Each
    subject owns only the tensors its strategy changes; all subjects share the copy.
    Methods are thread-safe (one lock per Personalizer).
    """

    def __init__(
        self,
        model: nn.Module,
        strategy: str | StrategyConfig = "tent",
        *,
        labels: Sequence[str] | None = None,
        input_shape: tuple[int, int | None, int | None] | None = None,
        head: str | None = None,
        input_range: tuple[float, float] | None = None,
        source: SourceData | None = None,
        audit: AuditLog | str | Path | None = None,
        **options: Any,
    ) -> None:
        config = make_config(strategy, **options)
        fer_model = as_fer_model(
            model, labels=labels, input_shape=input_shape, head=head, input_range=input_range
        )
        if source is not None and not isinstance(source, SourceData):
            raise InputError(
                f"Expected argument `source` to be a SourceData but got {type(source).__name__}"
            )
        self._runtime = ModelRuntime(fer_model)
        checked = (
            None
            if source is None
            else source.checked_for(
                self._runtime.module, dtype=self._runtime.dtype, device=self._runtime.device
            )
        )
        self._strategy = build_strategy(config, self._runtime, checked)
        #: live states: SubjectState after a step, PackedState at rest (loaded, saved)
        self._states: dict[str, SubjectState | PackedState] = {}
        self._lock = self._runtime.lock
        self._audit = _as_audit(audit)
        #: frames / updated frames / guard trips per subject since its last audited save
        self._activity: dict[str, dict[str, int]] = {}

    # ------------------------------------------------------------ properties
    @property
    def config(self) -> StrategyConfig:
        """The strategy's config."""
        return self._strategy.config

    @property
    def strategy_name(self) -> str:
        """Registered name of the strategy (``"tent"``, ...)."""
        return self._strategy.config.strategy_name

    @property
    def labels(self) -> tuple[str, ...]:
        """Class names, in logit order."""
        return self._runtime.labels

    @property
    def model(self) -> nn.Module:
        """The Personalizer's private frozen copy of the model (read-only by convention)."""
        return self._runtime.module

    @property
    def model_digest(self) -> str:
        """SHA-256 of the base model's weights; saved states are bound to it."""
        return self._runtime.source_digest

    @property
    def subjects(self) -> tuple[str, ...]:
        """Ids of the subjects that have a state, in order of first appearance."""
        with self._lock:
            return tuple(self._states)

    # ----------------------------------------------------------------- core
    def predict(self, frames: Tensor, subject: str) -> Prediction:
        """Predict ``frames`` (``(N, C, H, W)``, preprocessed) for ``subject`` and adapt its state.

        ``N`` may be 1: strategies that need a batch accumulate frames in the subject's
        state. The returned predictions are made before this call's update. Invalid
        input raises :class:`~ttaperso.errors.InputError` and changes no state.
        """
        subject = validate_subject(subject)
        x = self._validated(frames)
        with self._lock:
            return self._advance(subject, x, None)

    def predict_many(self, frames: Mapping[str, Tensor]) -> dict[str, Prediction]:
        """Predict and adapt several subjects in one call: ``{subject: frames}`` in, same keys out.

        Equivalent to ``predict(frames[s], s)`` for each subject in the mapping's order
        (same predictions and states, up to float rounding of a batched forward). Every
        subject id and batch is validated, and every subject's forward checked for
        non-finite values, before any state changes: one bad entry raises and changes no
        subject. What is batched depends on the strategy:

        * model forward the same for every subject (``source``, ``t3a``, ``tta_cap``:
          ``Strategy.shares_model_forward``): the frozen model runs once over all frames,
          only the per-subject head separately;
        * per-subject BN statistics without gradients in the prediction (``norm``,
          ``sar``: ``Strategy.batches_subjects``): one forward in which each subject's
          frames are normalised with its own statistics mixture;
        * the others (gradients through the prediction): one forward per subject, all
          under one lock acquisition.
        """
        if not isinstance(frames, Mapping):
            raise InputError(
                "Expected argument `frames` to be a mapping {subject: frames} but got "
                f"{type(frames).__name__}"
            )
        if not frames:
            raise InputError("Expected argument `frames` to hold at least one subject")
        batches: dict[str, Tensor] = {}
        for subject, batch in frames.items():
            key = validate_subject(subject)
            if key in batches:
                raise InputError(f"Subject id {subject!r} appears twice")
            try:
                batches[key] = self._validated(batch)
            except InputError as exc:
                raise InputError(f"subject {subject!r}: {exc}") from exc
        strategy = self._strategy
        with self._lock:
            if strategy.shares_model_forward:
                shared = self._shared_forward(batches)
                return {key: self._advance(key, x, shared[key]) for key, x in batches.items()}
            working = {key: self._working(key) for key in batches}
            if strategy.batches_subjects:
                outputs = self._batched_forwards(batches, working)
            else:
                outputs = {key: strategy.forward(working[key], x) for key, x in batches.items()}
            # Every subject's forward is checked before any state changes: a frame that
            # makes the model overflow refuses the whole call, as validation errors do.
            _check_finite_outputs(outputs.values())
            return {
                key: self._commit(key, working[key], strategy.finish(working[key], x, outputs[key]))
                for key, x in batches.items()
            }

    def _validated(self, frames: object) -> Tensor:
        return validate_frames(
            frames, self._runtime.module, dtype=self._runtime.dtype, device=self._runtime.device
        )

    @staticmethod
    def _chunks(batches: dict[str, Tensor]) -> list[list[str]]:
        """Subjects grouped so that one forward per group stays within the per-call limits."""
        groups: list[list[str]] = [[]]
        frames = values = 0
        shape: tuple[int, ...] | None = None
        for key, x in batches.items():
            # A chunk holds frames of one shape (models with free H/W may get several)
            # within the per-call limits that a single predict call enforces.
            fits = (
                frames + x.shape[0] <= MAX_FRAMES_PER_CALL
                and values + x.numel() <= MAX_VALUES_PER_CALL
                and (shape is None or tuple(x.shape[1:]) == shape)
            )
            if not fits:
                groups.append([])
                frames = values = 0
            groups[-1].append(key)
            frames, values, shape = frames + x.shape[0], values + x.numel(), tuple(x.shape[1:])
        return groups

    def _batched_forwards(
        self, batches: dict[str, Tensor], working: dict[str, SubjectState]
    ) -> dict[str, ForwardOutput]:
        """Subject-specific forwards of several subjects, one pass per chunk (``norm``)."""
        outputs: dict[str, ForwardOutput] = {}
        for group in self._chunks(batches):
            outs = self._strategy.batched_model_forward(
                [working[k] for k in group], [batches[k] for k in group]
            )
            outputs.update(zip(group, outs, strict=True))
        return outputs

    def _shared_forward(self, batches: dict[str, Tensor]) -> dict[str, ForwardOutput]:
        """One model forward over every subject's frames (in chunks the input limits allow)."""
        outputs: dict[str, ForwardOutput] = {}
        for group in self._chunks(batches):
            out = self._strategy.shared_forward(torch.cat([batches[k] for k in group]))
            _check_finite_outputs([out])
            start = 0
            for key in group:
                n = batches[key].shape[0]
                outputs[key] = ForwardOutput(
                    logits=out.logits[start : start + n],
                    features=None if out.features is None else out.features[start : start + n],
                    leaves={},
                    moments=None,
                )
                start += n
        return outputs

    def _advance(self, subject: str, x: Tensor, shared: ForwardOutput | None) -> Prediction:
        """Step one subject (caller holds the lock); ``shared``: its slice of a shared forward."""
        working = self._working(subject)
        if shared is None:
            result = self._strategy.step(working, x)
        else:
            result = self._strategy.step_from_shared(working, x, shared)
        return self._commit(subject, working, result)

    def _working(self, subject: str) -> SubjectState:
        """The state a step of ``subject`` works on (caller holds the lock)."""
        state = self._states.get(subject)
        if state is None:
            return self._strategy.initial_state()
        if isinstance(state, PackedState):  # at rest: a step needs separate tensors
            return state.unpacked()
        return state

    def _commit(self, subject: str, working: SubjectState, result: StepResult) -> Prediction:
        """Record a finished step of ``subject`` and keep its state (caller holds the lock)."""
        self._record_step(subject, result.updated)
        if self.config.episodic:
            working = self._strategy.initial_state()
        self._states[subject] = working
        return Prediction(
            subject=subject,
            logits=result.logits,
            probs=result.probs,
            labels=result.labels,
            updated=result.updated,
            class_names=self.labels,
        )

    @torch.no_grad()
    def predict_frozen(self, frames: Tensor) -> Tensor:
        """Logits of the unadapted model (no subject, nothing stored)."""
        return self._runtime.forward({}, self._validated(frames)).logits

    def reset(self, subject: str | None = None) -> None:
        """Forget one subject's adaptation (or every subject's when ``subject`` is None)."""
        with self._lock:
            if subject is None:
                for known in list(self._states):
                    self._audit_event(known, "reset", {"cause": "user"})
                self._states.clear()
                return
            validate_subject(subject)
            if subject not in self._states:
                raise InputError(
                    f"Unknown subject {subject!r}; known subjects: {list(self._states)[:20]}"
                )
            del self._states[subject]
            self._audit_event(subject, "reset", {"cause": "user"})

    def state_dict(self, subject: str) -> dict[str, Tensor]:
        """A copy of the subject's state tensors under their on-disk keys."""
        with self._lock:
            if subject not in self._states:
                raise InputError(f"Unknown subject {subject!r}")
            return {k: v.detach().clone() for k, v in self._states[subject].flat().items()}

    def state_nbytes(self, subject: str | None = None) -> int:
        """Bytes held by one subject's state (or by a fresh subject's when None)."""
        with self._lock:
            if subject is None:
                return self._strategy.initial_state().nbytes()
            if subject not in self._states:
                raise InputError(f"Unknown subject {subject!r}")
            return self._states[subject].nbytes()

    # ---------------------------------------------------------- persistence
    def _metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "ttaperso_version": __version__,
            "strategy": self.strategy_name,
            "config": self.config.to_dict(),
            "model_digest": self.model_digest,
            "model_name": self._runtime.module.model_name,
        }

    def save(
        self, target: str | Path | StateStore, subjects: Iterable[str] | None = None
    ) -> list[str]:
        """Write subject states (all, or the ones named) to a folder or store; return their ids.

        Each subject's file is replaced atomically; a crash leaves the previous file intact.
        """
        store = _as_store(target)
        with self._lock:
            names = list(self._states) if subjects is None else list(subjects)
            unknown = [s for s in names if s not in self._states]
            if unknown:
                raise InputError(
                    f"Unknown subject(s) {unknown[:10]}; known: {list(self._states)[:20]}"
                )
            snapshot: dict[str, PackedState] = {}
            for name in names:
                # The saved copy also becomes the live state: packed while the subject is at
                # rest. Packed states are never changed in place (a step unpacks a copy), so
                # the snapshot being written outside the lock cannot change.
                live = self._states[name]
                packed = live if isinstance(live, PackedState) else live.packed()
                self._states[name] = packed
                snapshot[name] = packed
        metadata = self._metadata()
        for subject, state in snapshot.items():
            kept = store.write(subject, state.flat(), metadata)
            if self._audit is not None:
                self._audit_save(subject, state, kept, store)
        return names

    def load(
        self, target: str | Path | StateStore, subjects: Iterable[str] | None = None
    ) -> list[str]:
        """Load subject states (all in the store, or the ones named); return their ids.

        Every file is checked first (format, base-model digest, strategy, tensor layout);
        if any is refused, :class:`~ttaperso.errors.StateFileError` is raised and no
        subject changes. Loaded subjects replace in-memory ones with the same id.
        """
        store = _as_store(target)
        if subjects is None:
            if not isinstance(store, FolderStore):
                entries = {s: store.read(s) for s in store.subjects()}
            else:
                entries = store.read_all()
        else:
            entries = {validate_subject(s): store.read(s) for s in subjects}
        loaded: dict[str, PackedState] = {}
        for subject, (tensors, metadata) in entries.items():
            loaded[subject] = self._check_loaded(subject, tensors, metadata, store)
        with self._lock:
            self._states.update(loaded)
            for subject, state in loaded.items():
                self._audit_event(
                    subject, "load", {"store": repr(store), "state_digest": _digest(state)}
                )
        return list(loaded)

    def _check_loaded(
        self, subject: str, tensors: dict[str, Tensor], metadata: dict[str, Any], store: StateStore
    ) -> PackedState:
        where = f"{store!r} subject {subject!r}"
        digest = metadata.get("model_digest")
        if digest != self.model_digest:
            raise StateFileError(
                f"{where}: state was made for another model (digest {str(digest)[:12]}..., "
                f"model {metadata.get('model_name')!r}); this Personalizer's model is "
                f"{self.model_digest[:12]}... ({self._runtime.module.model_name!r})"
            )
        if metadata.get("strategy") != self.strategy_name:
            raise StateFileError(
                f"{where}: state was made by strategy {metadata.get('strategy')!r}, "
                f"this Personalizer runs {self.strategy_name!r}"
            )
        try:
            saved_config = get_config_class(self.strategy_name).from_dict(
                metadata.get("config", {})
            )
        except Exception as exc:  # noqa: BLE001 - any malformed config is a bad file
            raise StateFileError(f"{where}: unreadable strategy config ({exc})") from exc
        if saved_config != self.config:
            log.warning(
                "%s: saved with config %s, continuing with %s",
                where,
                json.dumps(saved_config.to_dict()),
                json.dumps(self.config.to_dict()),
            )
        try:
            state = SubjectState.from_flat(tensors)
        except KeyError as exc:
            raise StateFileError(f"{where}: unexpected tensor key {exc}") from exc
        self._strategy.check_state(state, where)
        device = self._runtime.device
        # Packed on the model's device: one allocation per dtype instead of one per tensor.
        return SubjectState(
            **{
                group: {k: v.to(device) for k, v in getattr(state, group).items()}
                for group in ("params", "buffers", "optim", "memory")
            }
        ).packed()

    # ------------------------------------------------- reliability (issue 9)
    def calibrate(
        self,
        subject: str,
        neutral_frames: Tensor,
        *,
        neutral_label: str | None = "neutral",
        margin: float = DEFAULT_MARGIN,
    ) -> None:
        """Initialise ``subject`` from a short neutral recording (resting face).

        Starts from the subject's current state (a fresh one for a new subject) and
        applies, see :mod:`ttaperso.calibration`:

        1. the strategy's statistics calibration where it has one (BN statistics for
           ``norm``/``tent``/``sar``/``eata``/``fisher``/``shot``);
        2. a logit offset that makes the recording read ``neutral_label`` (matched to the
           model's labels case-insensitively) on average by ``margin`` logits, lowering
           only the classes the resting face resembles. ``neutral_label=None`` skips it;
           a model without that label skips it too when the strategy has step 1.

        Raises ConfigError when neither step applies or ``neutral_label`` names no label,
        InputError for bad frames; on error nothing changes.
        """
        subject = validate_subject(subject)
        x = self._validated(neutral_frames)
        neutral = self._neutral_index(neutral_label)
        if neutral is None and not self._strategy.calibrates_statistics:
            raise ConfigError(
                f"Strategy {self.strategy_name!r} does not support neutral-baseline calibration "
                f"of statistics, and no logit offset was asked for (the model's labels "
                f"{list(self.labels)} have no {neutral_label!r}; pass neutral_label=...)"
            )
        with self._lock:
            state = self._states.get(subject)
            working = (state if state is not None else self._strategy.initial_state()).unpacked()
            if self._strategy.calibrates_statistics:
                self._strategy.calibrate(working, x)
            record: dict[str, Any] = {"frames": int(x.shape[0])}
            if neutral is not None:
                with torch.no_grad():
                    logits = self._strategy.forward(working, x).logits.detach()
                if not bool(torch.isfinite(logits).all()):
                    raise InputError(
                        "The model produced non-finite logits for the neutral frames; the "
                        "subject's state was not changed"
                    )
                offset = neutral_logit_offset(logits, neutral, margin)
                working.memory[CALIBRATION_OFFSET] = offset.to(self._runtime.dtype)
                record.update(neutral_label=self.labels[neutral], logit_offset=offset.tolist())
            self._states[subject] = working
            self._audit_event(subject, "calibrate", {**record, "state_digest": _digest(working)})

    def _neutral_index(self, neutral_label: str | None) -> int | None:
        """Index of ``neutral_label`` among the model's labels (None: no offset wanted/possible)."""
        if neutral_label is None:
            return None
        if not isinstance(neutral_label, str):
            raise ConfigError(
                f"Expected argument `neutral_label` to be a str or None but got "
                f"{type(neutral_label).__name__}"
            )
        lowered = [label.lower() for label in self.labels]
        if neutral_label.lower() in lowered:
            return lowered.index(neutral_label.lower())
        if neutral_label != "neutral":  # an explicit label that does not exist is an error
            raise ConfigError(
                f"neutral_label {neutral_label!r} is not one of the model's labels "
                f"{list(self.labels)}"
            )
        return None

    def versions(self, target: str | Path | StateStore, subject: str) -> list[StateVersion]:
        """Kept versions of ``subject`` in a versioned :class:`FolderStore`, oldest first."""
        store = _as_store(target)
        if not isinstance(store, FolderStore):
            raise InputError(f"Expected a FolderStore for versions but got {store!r}")
        return store.versions(validate_subject(subject))

    def rollback(self, target: str | Path | StateStore, subject: str, version: int) -> None:
        """Make ``version`` of ``subject`` current again, in the store and in memory.

        The version is checked like any loaded state first; the rollback is written as a
        new version (history is kept) and recorded in the audit log.
        """
        store = _as_store(target)
        if not isinstance(store, FolderStore):
            raise InputError(f"Expected a FolderStore for rollback but got {store!r}")
        subject = validate_subject(subject)
        tensors, metadata = store.read_version(subject, version)
        state = self._check_loaded(subject, tensors, metadata, store)
        kept = store.rollback(subject, version)
        with self._lock:
            self._states[subject] = state
            self._audit_event(
                subject,
                "rollback",
                {
                    "to_version": version,
                    "new_version": None if kept is None else kept.version,
                    "state_digest": _digest(state),
                },
            )

    def _record_step(self, subject: str, updated: Tensor) -> None:
        """Count frames and updates; write a guard recovery to the audit log (under the lock)."""
        event = self._strategy.last_guard_event
        if event is not None:
            log.info(
                "%s: collapse guard recovered to %s (%s)",
                subject,
                event.recovered_to,
                ", ".join(event.causes),
            )
        if self._audit is None:
            return
        activity = self._activity.setdefault(subject, {"frames": 0, "updated": 0, "trips": 0})
        activity["frames"] += int(updated.numel())
        activity["updated"] += int(updated.sum())
        if event is not None:
            activity["trips"] += 1
            self._audit_event(
                subject,
                "guard",
                {
                    "causes": list(event.causes),
                    "frame": event.frame,
                    "recovered_to": event.recovered_to,
                    "signals": event.signals,
                },
            )

    def _audit_event(self, subject: str, event: str, data: dict[str, Any]) -> None:
        if self._audit is None:
            return
        context = {
            "strategy": self.strategy_name,
            "config": self.config.to_dict(),
            "model_digest": self.model_digest,
            "ttaperso_version": __version__,
        }
        self._audit.append(subject, event, {**data, **context})

    def _audit_save(
        self, subject: str, state: SubjectState | PackedState, kept: Any, store: StateStore
    ) -> None:
        with self._lock:
            activity = self._activity.pop(subject, {"frames": 0, "updated": 0, "trips": 0})
        self._audit_event(
            subject,
            "save",
            {
                "store": repr(store),
                "state_digest": _digest(state),
                "version": getattr(kept, "version", None),
                "since_last_save": activity,
            },
        )


def _check_finite_outputs(outputs: Iterable[ForwardOutput]) -> None:
    """Refuse (changing nothing) when any logits, features or BN moments are not finite."""
    checked: list[Tensor] = []
    for out in outputs:
        checked.append(out.logits.detach().reshape(-1))
        if out.features is not None:
            checked.append(out.features.detach().reshape(-1))
        for m, sq in (out.moments or {}).values():
            checked += [m.reshape(-1), sq.reshape(-1)]
    if checked and not bool(torch.isfinite(torch.cat(checked)).all()):
        raise InputError(
            "The model produced non-finite logits, features or activation statistics for these "
            "frames (extreme input values?); no subject's state was changed"
        )


def _digest(state: SubjectState | PackedState) -> str:
    return state_digest(state.flat())


def _as_audit(audit: AuditLog | str | Path | None) -> AuditLog | None:
    if audit is None or isinstance(audit, AuditLog):
        return audit
    if isinstance(audit, (str, Path)):
        return AuditLog(audit)
    raise InputError(
        f"Expected argument `audit` to be an AuditLog, a folder path or None but got "
        f"{type(audit).__name__}"
    )
