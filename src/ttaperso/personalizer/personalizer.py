"""The Personalizer class: predict and adapt per subject; save, load, calibrate, roll back."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._version import __version__
from ..audit import AuditLog
from ..calibration import DEFAULT_MARGIN
from ..config import StrategyConfig
from ..errors import ConfigError, InputError, StaleStateError
from ..models import as_fer_model
from ..runtime import ForwardOutput, ModelRuntime
from ..source_data import SourceData
from ..state import PackedState, SubjectState
from ..stores import FolderStore, StateStore, StateVersion
from ..strategies import StepResult, Strategy, build_strategy, make_config
from ..validation import validate_frames, validate_subject
from .batching import check_finite_outputs, chunk_subjects, split_output
from .clinic import calibrate_state, neutral_index
from .persistence import (
    VersionBook,
    as_store,
    check_loaded,
    digest_of,
    is_versioned,
    stale_hint,
    state_metadata,
    writes_conditionally,
)
from .prediction import Prediction
from .trail import AuditTrail, as_audit

__all__ = ["Personalizer", "SubjectInfo"]

#: the strategy ``Personalizer(model)`` runs when none is named (CLI, demo and Lightning
#: callback use the same one)
DEFAULT_STRATEGY = "tent"


@dataclass(frozen=True)
class SubjectInfo:
    """A read-only look at one subject (:meth:`Personalizer.inspect`).

    Attributes:
        subject: the id.
        at_rest: whether the state is kept packed (loaded, rolled back or just saved, and
            not stepped since; see :class:`~ttaperso.state.PackedState`).
        nbytes: bytes its state holds.
        tensors: copies of its state tensors under their on-disk keys.
        details: what the strategy reports about the state (per-gate admission counts,
            selected parameters, resets, ...), JSON-safe.
    """

    subject: str
    at_rest: bool
    nbytes: int
    tensors: dict[str, Tensor]
    details: dict[str, Any]


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
    Methods are thread-safe (one lock per Personalizer). Every call is all-or-nothing: a
    step works on a copy of the subject's state that replaces it only when the whole call
    succeeded, so a refused call (bad input, an error anywhere in the step) changes nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        strategy: str | StrategyConfig = DEFAULT_STRATEGY,
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
        # Built outside inference mode: the shared copy's tensors must be usable by autograd
        # and by in-place updates later, whatever context the Personalizer was made in.
        with torch.inference_mode(False):
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
        #: store versions last loaded/saved per (store, subject), for compare-and-set saves
        self._versions = VersionBook()
        self._store_lock = threading.RLock()
        self._trail = AuditTrail(as_audit(audit), self._audit_context)

    # ------------------------------------------------------------ properties
    @property
    def strategy(self) -> Strategy:
        """The strategy object (its config, declared capabilities and pure helpers).

        Shared by every subject: read it, do not mutate it; subject data lives in states.
        """
        return self._strategy

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
        self._check_context()
        with self._step_mode():
            x = self._validated(frames)
            with self._lock:
                working = self._working(subject)
                result = self._strategy.step(working, x)
                return self._commit({subject: (working, result)})[subject]

    def predict_many(self, frames: Mapping[str, Tensor]) -> dict[str, Prediction]:
        """Predict and adapt several subjects in one call: ``{subject: frames}`` in, same keys out.

        Equivalent to ``predict(frames[s], s)`` for each subject in the mapping's order
        (same predictions and states, up to float rounding of a batched forward). The call
        is all-or-nothing: every subject id and batch is validated, every forward checked
        for non-finite values and every step run on a copy before any state changes; one
        bad entry raises and changes no subject. What is batched depends on the strategy's
        declared capabilities:

        * ``shares_model_forward`` (``source``, ``t3a``, ``tta_cap``): the frozen model
          runs once over all frames, only the per-subject head separately;
        * ``batches_subjects`` (``norm``, ``sar``): one forward in which each subject's
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
        self._check_context()
        with self._step_mode():
            batches: dict[str, Tensor] = {}
            for subject, batch in frames.items():
                key = validate_subject(subject)
                if key in batches:
                    raise InputError(f"Subject id {subject!r} appears twice")
                try:
                    batches[key] = self._validated(batch)
                except InputError as exc:
                    raise InputError(f"subject {subject!r}: {exc}") from exc
            with self._lock:
                working = {key: self._working(key) for key in batches}
                outputs = self._forwards(batches, working)
                # Every subject's forward is checked before any step: a frame that makes
                # the model overflow refuses the whole call, as validation errors do.
                check_finite_outputs(outputs.values())
                steps = {
                    key: (working[key], self._strategy.finish(working[key], x, outputs[key]))
                    for key, x in batches.items()
                }
                return self._commit(steps)

    def _forwards(
        self, batches: dict[str, Tensor], working: dict[str, SubjectState]
    ) -> dict[str, ForwardOutput]:
        """Each subject's forward output, batched as the strategy's capabilities allow."""
        strategy = self._strategy
        outputs: dict[str, ForwardOutput] = {}
        if strategy.shares_model_forward:
            for group in chunk_subjects(batches):
                out = strategy.shared_forward(torch.cat([batches[k] for k in group]))
                for key, part in split_output(out, group, batches).items():
                    outputs[key] = strategy.head(working[key], batches[key], part)
        elif strategy.batches_subjects:
            for group in chunk_subjects(batches):
                outs = strategy.batched_model_forward(
                    [working[k] for k in group], [batches[k] for k in group]
                )
                outputs.update(zip(group, outs, strict=True))
        else:
            outputs = {key: strategy.forward(working[key], x) for key, x in batches.items()}
        return outputs

    def _check_context(self) -> None:
        """Refuse, before anything is touched, a context in which the strategy cannot adapt."""
        if torch.is_inference_mode_enabled() and self._strategy.needs_gradients:
            raise ConfigError(
                f"Strategy {self.strategy_name!r} adapts with gradients, which cannot be taken "
                "inside torch.inference_mode(); call predict outside it (or inside "
                "torch.inference_mode(False)), or use a gradient-free strategy such as 'norm'. "
                "In Lightning: Trainer(inference_mode=False). No state was changed."
            )

    @contextmanager
    def _step_mode(self) -> Iterator[None]:
        """Steps run outside inference mode so that states never hold inference tensors
        (which could not be updated in place or enter autograd in a later normal call)."""
        with torch.inference_mode(False):
            yield

    def _validated(self, frames: object) -> Tensor:
        x = validate_frames(
            frames, self._runtime.module, dtype=self._runtime.dtype, device=self._runtime.device
        )
        # A tensor made under inference mode can never be saved for backward nor mixed
        # into a state: take a normal copy (we are outside inference mode here).
        return x.clone() if x.is_inference() else x

    def _working(self, subject: str) -> SubjectState:
        """A copy of ``subject``'s state for one step (caller holds the lock).

        The live state is never handed to a step: the copy replaces it in :meth:`_commit`
        only after the whole call succeeded (a clone costs ~0.1 ms for a fer ``tent``
        state, < 0.5 % of a batch-16 step).
        """
        state = self._states.get(subject)
        if state is None:
            return self._strategy.initial_state()
        return state.unpacked()

    def _commit(self, steps: dict[str, tuple[SubjectState, StepResult]]) -> dict[str, Prediction]:
        """Make the working states live and record the steps (caller holds the lock)."""
        out: dict[str, Prediction] = {}
        for subject, (working, result) in steps.items():
            self._trail.step(subject, result.updated, result.guard_event)
            if self.config.episodic:
                working = self._strategy.initial_state()
            self._states[subject] = working
            out[subject] = Prediction(
                subject=subject,
                logits=result.logits,
                probs=result.probs,
                labels=result.labels,
                updated=result.updated,
                class_names=self.labels,
            )
        return out

    def predict_frozen(self, frames: Tensor) -> Tensor:
        """Logits of the unadapted model (no subject, nothing stored)."""
        with torch.no_grad():
            return self._runtime.forward({}, self._validated(frames)).logits

    def reset(self, subject: str | None = None) -> None:
        """Forget one subject's adaptation (or every subject's when ``subject`` is None)."""
        with self._lock:
            if subject is None:
                for known in list(self._states):
                    self._trail.event(known, "reset", {"cause": "user"})
                self._states.clear()
                return
            self._known(subject)
            del self._states[subject]
            self._trail.event(subject, "reset", {"cause": "user"})

    def _known(self, subject: str) -> SubjectState | PackedState:
        """The live state of a known subject (caller holds the lock)."""
        validate_subject(subject)
        state = self._states.get(subject)
        if state is None:
            raise InputError(
                f"Unknown subject {subject!r}; known subjects: {list(self._states)[:20]}"
            )
        return state

    def state_dict(self, subject: str) -> dict[str, Tensor]:
        """A copy of the subject's state tensors under their on-disk keys."""
        with self._lock:
            return {k: v.detach().clone() for k, v in self._known(subject).flat().items()}

    def state_nbytes(self, subject: str | None = None) -> int:
        """Bytes held by one subject's state (or by a fresh subject's when None)."""
        with self._lock:
            if subject is None:
                return self._strategy.initial_state().nbytes()
            return self._known(subject).nbytes()

    def inspect(self, subject: str) -> SubjectInfo:
        """A read-only look at one subject: its tensors (copies) and what the strategy reports."""
        with self._lock:
            live = self._known(subject)
            state = live.unpacked()
        return SubjectInfo(
            subject=subject,
            at_rest=live.is_packed,
            nbytes=state.nbytes(),
            tensors=state.flat(),
            details=self._strategy.describe(state),
        )

    # ---------------------------------------------------------- persistence
    def state_metadata(self) -> dict[str, Any]:
        """The metadata :meth:`save` writes with every state (format, strategy, config,
        base-model digest); a custom :class:`StateStore` stores it beside the tensors."""
        return state_metadata(self._strategy, self._runtime)

    def save(
        self, target: str | Path | StateStore, subjects: Iterable[str] | None = None
    ) -> list[str]:
        """Write subject states (all, or the ones named) to a folder or store; return their ids.

        Each subject's state is replaced atomically; a crash leaves the previous one intact.
        Every write is a compare-and-set on the store version this Personalizer last loaded
        or saved for the subject (0 for one it never loaded or saved there): when another
        writer saved the subject since, that subject is not written and its in-memory state
        is left as it was, the other subjects are saved, and
        :class:`~ttaperso.errors.StaleStateError` names the refused ones and what to do.
        """
        store = as_store(target)
        conditional = writes_conditionally(store)
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
        if self._trail.log is not None:
            for subject in snapshot:
                self._trail.log.check(subject)  # a damaged log refuses before any write
        metadata = state_metadata(self._strategy, self._runtime)
        refused: dict[str, StaleStateError] = {}
        with self._store_lock:  # one save/load/rollback of this Personalizer at a time
            for subject, state in snapshot.items():
                expected = self._versions.get(store, subject) or 0
                try:
                    if conditional:
                        kept = store.write(
                            subject, state.flat(), metadata, expected_version=expected
                        )
                    else:  # a store written before the contract: unconditional
                        kept = store.write(subject, state.flat(), metadata)
                except StaleStateError as exc:
                    refused[subject] = exc
                    continue
                version = kept.version if isinstance(kept, StateVersion) else None
                self._versions.set(store, subject, version)
                if self._trail.log is not None:
                    with self._lock:
                        self._trail.saved(
                            subject,
                            digest_of(state),
                            version,
                            store,
                            from_version=expected,
                        )
        if refused:
            details = "; ".join(f"{exc}" for exc in list(refused.values())[:5])
            raise StaleStateError(
                f"Not saved: {list(refused)[:10]}: another writer saved them since this "
                f"Personalizer last loaded or saved them ({details}). To go on: "
                f"{stale_hint(next(iter(refused)))}. Saved: {[s for s in names if s not in refused][:10]}"
            )
        return names

    def load(
        self,
        target: str | Path | StateStore,
        subjects: Iterable[str] | None = None,
        *,
        allow_config_change: bool = False,
    ) -> list[str]:
        """Load subject states (all in the store, or the ones named); return their ids.

        Every file is checked first (format, digests, base-model digest, strategy, config,
        tensor layout and value ranges); if any is refused,
        :class:`~ttaperso.errors.StateFileError` is raised and no subject changes. A state
        saved with another config of the strategy is refused unless
        ``allow_config_change=True``: it then continues under this Personalizer's config,
        and the audit log's ``load`` record lists the changed keys. Loaded subjects replace
        in-memory ones with the same id; the store version read is the one the next
        :meth:`save` expects to find.
        """
        store = as_store(target)
        if not isinstance(allow_config_change, bool):
            raise InputError(
                "Expected argument `allow_config_change` to be a bool but got "
                f"{allow_config_change!r}"
            )
        if subjects is None:
            if not isinstance(store, FolderStore):
                entries = {s: store.read(s) for s in store.subjects()}
            else:
                entries = store.read_all()
        else:
            entries = {validate_subject(s): store.read(s) for s in subjects}
        with torch.inference_mode(False):
            reference = self._strategy.initial_state().flat()
            loaded = {
                subject: check_loaded(
                    self._strategy,
                    self._runtime,
                    subject,
                    tensors,
                    metadata,
                    store,
                    allow_config_change=allow_config_change,
                    reference=reference,
                )
                for subject, (tensors, metadata) in entries.items()
            }
        with self._store_lock, self._lock:
            for subject, item in loaded.items():
                self._states[subject] = item.state
                self._versions.set(store, subject, item.version)
                record: dict[str, Any] = {
                    "store": repr(store),
                    "state_digest": digest_of(item.state),
                    "version": item.version,
                }
                if item.config_changes:
                    record["config_changed"] = item.config_changes
                self._trail.event(subject, "load", record)
        return list(loaded)

    # --------------------------------------------------------------- clinic
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
        InputError for bad frames; on error nothing changes. Works inside
        ``torch.inference_mode()`` too (calibration takes no gradient).
        """
        subject = validate_subject(subject)
        neutral = neutral_index(self.labels, neutral_label)
        if neutral is None and not self._strategy.calibrates_statistics:
            raise ConfigError(
                f"Strategy {self.strategy_name!r} does not support neutral-baseline calibration "
                f"of statistics, and no logit offset was asked for (the model's labels "
                f"{list(self.labels)} have no {neutral_label!r}; pass neutral_label=...)"
            )
        with self._step_mode():
            x = self._validated(neutral_frames)
            with self._lock:
                working = self._working(subject)
                record = calibrate_state(self._strategy, working, x, neutral, margin)
                self._states[subject] = working
                self._trail.event(
                    subject, "calibrate", {**record, "state_digest": digest_of(working)}
                )

    def versions(self, target: str | Path | StateStore, subject: str) -> list[StateVersion]:
        """Kept versions of ``subject`` in a versioned store, oldest first (current last)."""
        store = as_store(target)
        if not is_versioned(store):
            raise InputError(
                f"Expected a store with versions (versions/read_version/rollback, e.g. "
                f"FolderStore) but got {store!r}"
            )
        return store.versions(validate_subject(subject))  # type: ignore[attr-defined]

    def rollback(
        self,
        target: str | Path | StateStore,
        subject: str,
        version: int,
        *,
        allow_config_change: bool = False,
    ) -> StateVersion:
        """Make ``version`` of ``subject`` current again, in the store and in memory.

        The version is checked like any loaded state first; the rollback is written as a
        new version (history is kept), recorded in the audit log, and returned. When this
        Personalizer loaded or saved the subject in that store, the write is a
        compare-and-set on that version (a newer save by another writer refuses it with
        :class:`~ttaperso.errors.StaleStateError`); otherwise it is unconditional.
        """
        store = as_store(target)
        if not is_versioned(store):
            raise InputError(
                f"Expected a store with versions (versions/read_version/rollback, e.g. "
                f"FolderStore) but got {store!r}"
            )
        subject = validate_subject(subject)
        versioned: Any = store
        tensors, metadata = versioned.read_version(subject, version)
        with torch.inference_mode(False):
            item = check_loaded(
                self._strategy,
                self._runtime,
                subject,
                tensors,
                metadata,
                store,
                allow_config_change=allow_config_change,
            )
        with self._store_lock:
            expected = self._versions.get(store, subject)
            try:
                kept = versioned.rollback(subject, version, expected_version=expected)
            except StaleStateError as exc:
                raise StaleStateError(
                    f"{exc}. Subject {subject!r} was not rolled back: {stale_hint(subject)}"
                ) from exc
            new_version = kept.version if isinstance(kept, StateVersion) else None
            self._versions.set(store, subject, new_version)
            with self._lock:
                self._states[subject] = item.state
                record: dict[str, Any] = {
                    "store": repr(store),
                    "to_version": version,
                    "version": new_version,
                    "new_version": new_version,
                    "from_version": expected,
                    "state_digest": digest_of(item.state),
                }
                if item.config_changes:
                    record["config_changed"] = item.config_changes
                self._trail.event(subject, "rollback", record)
        return kept

    def _audit_context(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy_name,
            "config": self.config.to_dict(),
            "model_digest": self.model_digest,
            "ttaperso_version": __version__,
        }
