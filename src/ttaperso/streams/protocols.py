"""Stream protocols for studies: in which order, with which state, frames reach a model.

A protocol turns subject streams into a :class:`Schedule`: an ordered list of
:class:`Step` s, each "reset state ``key`` (optionally), then predict frames ``index`` of
stream ``stream`` as subject ``key``". :func:`run_protocol` feeds a schedule to a
:class:`~ttaperso.Personalizer` and returns, per subject, the predictions aligned with the
labels. Every protocol is deterministic given its ``seed``.

Protocols (all start every subject from the frozen model: its state is reset first):

* ``independent``: every session (sequence id) of every subject is its own stream from the
  frozen model (state key ``subject/session``); frames in stream order.
* ``shuffled``: one state per subject, the subject's frames in a random order (stills);
  the order is ``numpy.random.default_rng(seed).permutation(T)`` for each subject.
* ``natural``: one state per subject, frames in stream (temporal) order.
* ``label_correlated``: one state per subject, frames grouped into runs of one label (the
  order of the runs and the order inside a run random): the correlated stream on which
  batch-statistics TTA collapses. Unlabelled frames form one last run.
* ``continual``: one state per subject carried over its sessions, fed one session after
  the other in order of first appearance (the state is never reset between sessions).
* ``interleaved``: all subjects at once, round-robin, ``batch_size`` frames of one subject
  then the next (``batch_size=1``: frame by frame), each subject in stream order; the
  Personalizer must keep the states apart.

Frames are batched in chunks of ``batch_size`` that never span two sessions in
``independent`` / ``continual`` (a session boundary starts a new chunk).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, InputError
from .types import UNLABELLED, SubjectStream

if TYPE_CHECKING:
    from ..personalizer import Personalizer

__all__ = [
    "PROTOCOLS",
    "Schedule",
    "Step",
    "list_protocols",
    "make_schedule",
    "run_protocol",
]


@dataclass(frozen=True)
class Step:
    """One call of the Personalizer.

    Attributes:
        key: the Personalizer subject id (a subject, or ``subject/session``).
        stream: index of the stream in the list given to the protocol.
        index: ``(n,)`` frame indices into that stream, in feeding order.
        reset: reset ``key``'s state before this step (start from the frozen model).
    """

    key: str
    stream: int
    index: Tensor
    reset: bool = False


Schedule = list[Step]


def _chunks(
    key: str, stream: int, order: Sequence[int], batch_size: int, reset: bool
) -> list[Step]:
    steps = []
    for start in range(0, len(order), batch_size):
        index = torch.tensor(order[start : start + batch_size], dtype=torch.long)
        steps.append(Step(key, stream, index, reset=reset and start == 0))
    return steps


def _sessions(stream: SubjectStream) -> dict[str, list[int]]:
    """Session id -> frame indices, sessions in order of first appearance."""
    out: dict[str, list[int]] = {}
    for i, session in enumerate(stream.sequences):
        out.setdefault(session, []).append(i)
    return out


def independent(streams: Sequence[SubjectStream], batch_size: int, seed: int) -> Schedule:
    """Every session of every subject from the frozen model, in stream order."""
    steps: Schedule = []
    for s, stream in enumerate(streams):
        sessions = _sessions(stream)
        for session, order in sessions.items():
            key = stream.subject if len(sessions) == 1 else f"{stream.subject}/{session}"
            steps += _chunks(key, s, order, batch_size, reset=True)
    return steps


def shuffled(streams: Sequence[SubjectStream], batch_size: int, seed: int) -> Schedule:
    """One state per subject, frames in a seeded random order."""
    steps: Schedule = []
    for s, stream in enumerate(streams):
        order = np.random.default_rng(seed).permutation(len(stream)).tolist()
        steps += _chunks(stream.subject, s, order, batch_size, reset=True)
    return steps


def natural(streams: Sequence[SubjectStream], batch_size: int, seed: int) -> Schedule:
    """One state per subject, frames in stream order."""
    steps: Schedule = []
    for s, stream in enumerate(streams):
        steps += _chunks(stream.subject, s, list(range(len(stream))), batch_size, reset=True)
    return steps


def label_correlated(streams: Sequence[SubjectStream], batch_size: int, seed: int) -> Schedule:
    """One state per subject, frames in runs of one label (seeded run and frame order)."""
    steps: Schedule = []
    rng = np.random.default_rng(seed)
    for s, stream in enumerate(streams):
        labels = stream.labels.tolist()
        present = sorted({lab for lab in labels if lab != UNLABELLED})
        order: list[int] = []
        for lab in [present[i] for i in rng.permutation(len(present))] + [UNLABELLED]:
            run = [i for i, x in enumerate(labels) if x == lab]
            order += [run[i] for i in rng.permutation(len(run))]
        steps += _chunks(stream.subject, s, order, batch_size, reset=True)
    return steps


def continual(streams: Sequence[SubjectStream], batch_size: int, seed: int) -> Schedule:
    """One state per subject carried over its sessions, session after session."""
    steps: Schedule = []
    for s, stream in enumerate(streams):
        for i, order in enumerate(_sessions(stream).values()):
            steps += _chunks(stream.subject, s, order, batch_size, reset=i == 0)
    return steps


def interleaved(streams: Sequence[SubjectStream], batch_size: int, seed: int) -> Schedule:
    """All subjects round-robin, ``batch_size`` frames each turn, each in stream order."""
    queues = [
        _chunks(stream.subject, s, list(range(len(stream))), batch_size, reset=True)
        for s, stream in enumerate(streams)
    ]
    steps: Schedule = []
    for turn in range(max((len(q) for q in queues), default=0)):
        steps += [q[turn] for q in queues if turn < len(q)]
    return steps


#: protocol name -> schedule builder ``(streams, batch_size, seed) -> Schedule``
PROTOCOLS: dict[str, Callable[[Sequence[SubjectStream], int, int], Schedule]] = {
    "independent": independent,
    "shuffled": shuffled,
    "natural": natural,
    "label_correlated": label_correlated,
    "continual": continual,
    "interleaved": interleaved,
}


def list_protocols() -> list[str]:
    """Names accepted by :func:`make_schedule` and :func:`run_protocol`."""
    return list(PROTOCOLS)


def make_schedule(
    streams: Sequence[SubjectStream], protocol: str, *, batch_size: int = 16, seed: int = 0
) -> Schedule:
    """The ordered steps ``protocol`` makes of ``streams`` (see the module docstring)."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"Unknown protocol {protocol!r}; available: {', '.join(PROTOCOLS)}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(
            f"Expected argument `batch_size` to be a positive int but got {batch_size!r}"
        )
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"Expected argument `seed` to be an int but got {seed!r}")
    streams = list(streams)
    if not streams or not all(isinstance(s, SubjectStream) for s in streams):
        raise InputError("Expected a non-empty list of SubjectStream")
    seen: set[str] = set()
    for stream in streams:
        if stream.subject in seen:
            raise InputError(
                f"Two streams have the subject id {stream.subject!r}; give each subject one "
                "stream (sessions as its sequence ids)"
            )
        seen.add(stream.subject)
    return PROTOCOLS[protocol](streams, batch_size, seed)


def run_protocol(
    personalizer: Personalizer,
    streams: Sequence[SubjectStream],
    protocol: str,
    *,
    batch_size: int = 16,
    seed: int = 0,
    time_frozen: bool = False,
) -> dict[str, dict[str, Any]]:
    """Feed ``streams`` to ``personalizer`` as ``protocol`` says; collect every prediction.

    Frames go through the Personalizer model's ``prepare`` (images in [0, 1] -> model input)
    and labels are mapped onto the model's labels by name (a label the model lacks raises,
    naming the file) before anything is fed.

    Returns:
        ``{subject: {...}}`` with, in the order the frames were fed: ``logits`` ``(T, C)``,
        ``labels`` ``(T,)`` predicted class, ``targets`` ``(T,)`` true class in the model's
        label order (-1: unlabelled), ``updated`` ``(T,)`` bool, ``index`` ``(T,)`` frame
        index in the stream, ``sequences`` (per-frame session ids), ``keys`` (the state key
        each frame was predicted under), ``class_names``, and ``seconds_predict`` (time
        inside ``predict`` for this subject's frames). With ``time_frozen``, every batch is
        also run through the frozen model (``predict_frozen``) right after its ``predict``
        call and ``seconds_frozen`` holds that time: a cost ratio measured on the same
        frames, interleaved, so it does not depend on what else the machine was doing
        before or after (ratios between separate runs do).
    """
    model = personalizer.model  # the FERModel copy: it knows its own preprocessing
    mapped = [stream.relabel(personalizer.labels) for stream in streams]
    schedule = make_schedule(mapped, protocol, batch_size=batch_size, seed=seed)
    parts: dict[int, list[tuple[Step, Any]]] = {s: [] for s in range(len(mapped))}
    seconds_predict = [0.0] * len(mapped)
    seconds_frozen = [0.0] * len(mapped)
    with torch.no_grad():
        prepared = [model.prepare(stream.images) for stream in mapped]  # type: ignore[operator]
    for step in schedule:
        if step.reset and step.key in personalizer.subjects:
            personalizer.reset(step.key)
        batch = prepared[step.stream].index_select(0, step.index)
        start = time.perf_counter()
        out = personalizer.predict(batch, step.key)
        seconds_predict[step.stream] += time.perf_counter() - start
        if time_frozen:
            start = time.perf_counter()
            personalizer.predict_frozen(batch)
            seconds_frozen[step.stream] += time.perf_counter() - start
        parts[step.stream].append((step, out))
    results: dict[str, dict[str, Any]] = {}
    for s, stream in enumerate(mapped):
        steps = parts[s]
        index = torch.cat([step.index for step, _ in steps])
        results[stream.subject] = {
            "logits": torch.cat([out.logits for _, out in steps]),
            "labels": torch.cat([out.labels for _, out in steps]),
            "targets": stream.labels.index_select(0, index),
            "updated": torch.cat([out.updated for _, out in steps]),
            "index": index,
            "sequences": [stream.sequences[i] for i in index.tolist()],
            "keys": [step.key for step, _ in steps for _ in range(len(step.index))],
            "class_names": tuple(personalizer.labels),
            "seconds_predict": seconds_predict[s],
        }
        if time_frozen:
            results[stream.subject]["seconds_frozen"] = seconds_frozen[s]
    return results
