"""The store contract (``ttaperso.stores.base``), checked for every store implementation.

Every point of the contract is one test here, run over :data:`STORE_FACTORIES`: integer
versions (0 absent, first write 1, every write current + 1, none reused or lost with
several writers), compare-and-set writes (``expected_version``) that write nothing when
refused, the stored subject id checked on read and before overwrite, ``subjects`` and
``delete`` (erasure of every kept version), history (``versions`` / ``read_version`` /
``rollback`` as a new version), the returned :class:`StateVersion`, and two real
processes racing to save one subject.

To check another store, append a :class:`StoreFactory` to :data:`STORE_FACTORIES`; its
``make`` is called again inside each child process of the race tests (fork), so it must
build a fresh client there.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import states_equal

import ttaperso.stores.folder as folder_module
from ttaperso.errors import StaleStateError, StateFileError
from ttaperso.stores import (
    FORMAT_NAME,
    FORMAT_VERSION,
    FolderStore,
    StateStore,
    StateVersion,
    VersionedStateStore,
    state_digest,
)

SUBJECT = "patient/017 ü"  # a separator and a non-ASCII letter: ids are free text


@dataclass(frozen=True)
class StoreFactory:
    """How to make one kind of store over a scratch folder, and how to force a collision."""

    name: str
    #: a store over the scratch folder ``tmp_path`` (the same arguments give the same store)
    make: Callable[[Path], Any]
    #: make every subject id map to one storage slot (file name, key) for the test's duration
    collide: Callable[[pytest.MonkeyPatch], None]
    #: a reason to skip (a server not installed, ...) or None
    unavailable: Callable[[], str | None] = lambda: None


def _folder_store(tmp_path: Path) -> FolderStore:
    return FolderStore(tmp_path / "states", keep_versions=100)


def _folder_collide(monkeypatch: pytest.MonkeyPatch) -> None:
    # 4 bits of hash instead of 64: "p:1" and "p,1" (same slug "p_1") share a file name.
    monkeypatch.setattr(folder_module, "_id_hash", lambda subject: "0")


#: one redis-server for the module's Redis stores, started on first use (each test gets its
#: own key namespace), stopped at exit; child processes of the race tests reuse it
_REDIS: list[Any] = []


def _redis_unavailable() -> str | None:
    try:
        import redis  # noqa: F401

        from ttaperso.serve.local import redis_server_binary
    except ImportError:
        return "RedisStore needs the redis package (the serve extra)"
    if redis_server_binary() is None:
        return "redis-server not installed (apt-get install redis-server; .ci/run installs it)"
    return None


def _redis_store(tmp_path: Path) -> Any:
    import atexit
    import tempfile

    from ttaperso.serve.local import RedisServer
    from ttaperso.stores.redis import RedisStore

    if not _REDIS:
        server = RedisServer(tempfile.mkdtemp(prefix="ttaperso-contract-redis-")).start()
        atexit.register(server.stop)
        _REDIS.append(server)
    namespace = "c" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:12]
    return RedisStore(_REDIS[0].url, namespace=namespace, keep_versions=100)


def _redis_collide(monkeypatch: pytest.MonkeyPatch) -> None:
    import ttaperso.stores.redis as redis_module

    monkeypatch.setattr(redis_module, "subject_key", lambda subject: "0" * 64)


STORE_FACTORIES: list[StoreFactory] = [
    StoreFactory("folder", _folder_store, _folder_collide),
    StoreFactory("redis", _redis_store, _redis_collide, _redis_unavailable),
]


@pytest.fixture(params=STORE_FACTORIES, ids=lambda f: f.name)
def factory(request: pytest.FixtureRequest) -> StoreFactory:
    made: StoreFactory = request.param
    reason = made.unavailable()
    if reason:
        pytest.skip(reason)
    return made


@pytest.fixture
def store(factory: StoreFactory, tmp_path: Path) -> Any:
    return factory.make(tmp_path)


def _tensors(value: float) -> dict[str, torch.Tensor]:
    return {"memory/x": torch.arange(3.0) + value, "memory/e": torch.zeros(0, 2)}


METADATA = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "note": [1, "a"]}


# ------------------------------------------------------------------------ basics
def test_store_implements_the_protocols(store: Any) -> None:
    assert isinstance(store, StateStore)
    assert isinstance(store, VersionedStateStore)


def test_versions_start_at_one_and_count_every_write(store: Any) -> None:
    with pytest.raises(StateFileError):
        store.read(SUBJECT)
    written = [store.write(SUBJECT, _tensors(i), METADATA) for i in range(3)]
    assert [v.version for v in written] == [1, 2, 3]
    tensors, metadata = store.read(SUBJECT)
    assert states_equal(tensors, _tensors(2))
    assert metadata["state_version"] == 3
    assert metadata["subject"] == SUBJECT
    assert {k: metadata[k] for k in METADATA} == METADATA


def test_write_returns_a_state_version(store: Any) -> None:
    before = time.time()
    kept = store.write(SUBJECT, _tensors(1), METADATA)
    assert isinstance(kept, StateVersion)
    assert isinstance(kept.version, int) and kept.version == 1
    assert kept.digest == state_digest(_tensors(1))
    assert before - 1 <= kept.saved_at <= time.time() + 1
    assert kept.path is None or isinstance(kept.path, Path)


def test_metadata_keys_a_store_adds_are_not_stored(store: Any) -> None:
    store.write(SUBJECT, _tensors(1), {**METADATA, "state_version": 77, "subject": "other"})
    _, metadata = store.read(SUBJECT)
    assert metadata["state_version"] == 1 and metadata["subject"] == SUBJECT


# --------------------------------------------------------------- compare-and-set
def test_expected_version_is_a_compare_and_set(store: Any) -> None:
    assert store.write(SUBJECT, _tensors(1), METADATA, expected_version=0).version == 1
    with pytest.raises(StaleStateError, match=r"version 1.*expected version 0"):
        store.write(SUBJECT, _tensors(2), METADATA, expected_version=0)
    with pytest.raises(StaleStateError, match=r"version 1.*expected version 5"):
        store.write(SUBJECT, _tensors(2), METADATA, expected_version=5)
    tensors, metadata = store.read(SUBJECT)  # nothing was written
    assert states_equal(tensors, _tensors(1)) and metadata["state_version"] == 1
    assert [v.version for v in store.versions(SUBJECT)] == [1]
    assert store.write(SUBJECT, _tensors(2), METADATA, expected_version=1).version == 2
    assert store.write(SUBJECT, _tensors(3), METADATA, expected_version=None).version == 3
    assert isinstance(StaleStateError("x"), StateFileError)


def test_stored_subject_id_is_checked_on_read_and_before_overwrite(
    factory: StoreFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    factory.collide(monkeypatch)
    store = factory.make(tmp_path)
    store.write("p:1", _tensors(1), METADATA)
    with pytest.raises(StateFileError, match=r"holds subject 'p:1', not 'p,1'"):
        store.write("p,1", _tensors(2), METADATA)
    with pytest.raises(StateFileError, match=r"holds subject 'p:1', not 'p,1'"):
        store.read("p,1")
    tensors, metadata = store.read("p:1")  # untouched
    assert states_equal(tensors, _tensors(1)) and metadata["state_version"] == 1


# --------------------------------------------------------- subjects and erasure
def test_subjects_and_delete(store: Any) -> None:
    for subject in ("B", SUBJECT, "A"):
        store.write(subject, _tensors(1), METADATA)
        store.write(subject, _tensors(2), METADATA)
    assert sorted(store.subjects()) == sorted(["A", "B", SUBJECT])
    with pytest.raises(StaleStateError, match=r"version 2.*expected version 1"):
        store.delete(SUBJECT, expected_version=1)
    assert store.read(SUBJECT)[1]["state_version"] == 2  # a refused delete removes nothing
    store.delete(SUBJECT, expected_version=2)
    assert sorted(store.subjects()) == ["A", "B"]
    with pytest.raises(StateFileError, match="no state for subject"):
        store.read(SUBJECT)
    assert store.versions(SUBJECT) == []
    with pytest.raises(StateFileError):
        store.read_version(SUBJECT, 1)
    with pytest.raises(StateFileError, match="no state for subject"):
        store.delete(SUBJECT)
    assert store.write(SUBJECT, _tensors(3), METADATA, expected_version=0).version == 1
    store.delete("A")
    assert sorted(store.subjects()) == sorted(["B", SUBJECT])


# ---------------------------------------------------------------------- history
def test_versions_read_version_and_rollback(store: Any) -> None:
    digests = [store.write(SUBJECT, _tensors(i), METADATA).digest for i in range(4)]
    versions = store.versions(SUBJECT)
    assert [v.version for v in versions] == [1, 2, 3, 4]  # oldest first
    assert [v.digest for v in versions] == digests
    tensors, metadata = store.read_version(SUBJECT, 2)
    assert states_equal(tensors, _tensors(1)) and metadata["state_version"] == 2
    with pytest.raises(StateFileError, match="no version 99"):
        store.read_version(SUBJECT, 99)
    with pytest.raises(StaleStateError, match=r"version 4.*expected version 3"):
        store.rollback(SUBJECT, 2, expected_version=3)
    rolled = store.rollback(SUBJECT, 2, expected_version=4)
    assert rolled.version == 5 and rolled.digest == digests[1]  # a new version, same state
    tensors, metadata = store.read(SUBJECT)
    assert states_equal(tensors, _tensors(1)) and metadata["state_version"] == 5
    assert [v.version for v in store.versions(SUBJECT)] == [1, 2, 3, 4, 5]
    assert store.rollback(SUBJECT, 4).version == 6  # unconditional


# ------------------------------------------------------------ several processes
def _race_child(
    factory: StoreFactory,
    tmp_path: Path,
    writer: int,
    rounds: int,
    barrier: Any,
    results: Any,
) -> None:
    """Each round: read the version, wait for the other, compare-and-set write on it."""
    store = factory.make(tmp_path)
    for r in range(rounds):
        barrier.wait(30)
        expected = store.read(SUBJECT)[1]["state_version"]
        barrier.wait(30)  # both read the same version before either writes
        try:
            kept = store.write(
                SUBJECT, _tensors(100 * writer + r), METADATA, expected_version=expected
            )
            results.put(("won", r, writer, kept.version))
        except StaleStateError:
            results.put(("stale", r, writer, expected))
        barrier.wait(30)


def _count_child(
    factory: StoreFactory, tmp_path: Path, writer: int, writes: int, barrier: Any, results: Any
) -> None:
    """Unconditional writes as fast as possible; report each version and digest."""
    store = factory.make(tmp_path)
    barrier.wait(30)
    for k in range(writes):
        kept = store.write(SUBJECT, _tensors(1000 * writer + k), METADATA)
        results.put((kept.version, kept.digest))


def _run_children(target: Callable[..., None], args: tuple[Any, ...], expected: int) -> list[Any]:
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    results = context.Queue()
    children = [
        context.Process(target=target, args=(*args[:2], w, *args[2:], barrier, results))
        for w in range(2)
    ]
    for child in children:
        child.start()
    got = []
    try:
        for _ in range(expected):
            got.append(results.get(timeout=60))
    except queue.Empty:
        pass
    for child in children:
        child.join(30)
        if child.is_alive():
            child.kill()
    assert [c.exitcode for c in children] == [0, 0], got
    return got


def test_two_processes_racing_a_compare_and_set_never_both_win(
    factory: StoreFactory, tmp_path: Path
) -> None:
    rounds = 10
    factory.make(tmp_path).write(SUBJECT, _tensors(0), METADATA)
    got = _run_children(_race_child, (factory, tmp_path, rounds), 2 * rounds)
    assert len(got) == 2 * rounds
    for r in range(rounds):
        outcomes = sorted(o for o, rr, _, _ in got if rr == r)
        assert outcomes == ["stale", "won"], (r, got)
    won = sorted(v for o, _, _, v in got if o == "won")
    assert won == list(range(2, rounds + 2))
    assert factory.make(tmp_path).read(SUBJECT)[1]["state_version"] == rounds + 1


def test_two_processes_writing_lose_no_version_number(
    factory: StoreFactory, tmp_path: Path
) -> None:
    writes = 15
    got = _run_children(_count_child, (factory, tmp_path, writes), 2 * writes)
    versions = sorted(v for v, _ in got)
    assert versions == list(range(1, 2 * writes + 1))  # none lost, none reused
    store = factory.make(tmp_path)
    kept = {v.version: v.digest for v in store.versions(SUBJECT)}
    assert kept == dict(got)  # every version holds what its writer wrote
    assert store.read(SUBJECT)[1]["state_version"] == 2 * writes


def test_collision_hook_really_collides(
    factory: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The collision test above is meaningful only if the hook makes the ids collide."""
    factory.collide(monkeypatch)
    if factory.name == "folder":
        assert folder_module.subject_filename("p:1") == folder_module.subject_filename("p,1")
        assert hashlib.sha256(b"p:1").hexdigest()[:16] != hashlib.sha256(b"p,1").hexdigest()[:16]
