"""RedisStore against a real redis-server on loopback (started and stopped by these tests).

The store contract of stores/base.py: versions (0 absent, +1 per write, never reused),
compare-and-set writes, subject checks, versions/rollback, delete; plus Redis specifics
(hashed keys, durability across a SIGKILL with appendfsync always, unreachable server).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import ttaperso
from ttaperso.errors import StaleStateError, StateFileError
from ttaperso.stores import FORMAT_NAME, FORMAT_VERSION
from ttaperso.stores.codec import decode_state

pytest.importorskip("redis", reason="RedisStore needs the redis package (the serve extra)")
from conftest import HEAD, INPUT_SHAPE, LABELS, build_model, target_frames  # noqa: E402

from ttaperso.serve.local import RedisServer, redis_server_binary  # noqa: E402
from ttaperso.stores.redis import RedisStore, StoreUnavailableError, subject_key  # noqa: E402

pytestmark = pytest.mark.skipif(
    redis_server_binary() is None,
    reason="redis-server not installed (apt-get install redis-server; .ci/run installs it)",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as srv:
        yield srv


@pytest.fixture
def store(server: RedisServer) -> Iterator[RedisStore]:
    s = RedisStore(server.url, namespace=f"t{uuid.uuid4().hex[:8]}", keep_versions=3)
    yield s
    s.close()


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"params/w": torch.randn(4, 3, generator=g), "memory/n": torch.tensor([seed])}


META = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "strategy": "norm", "note": "x"}


def test_versions_start_at_one_and_increase(store: RedisStore) -> None:
    assert store.current_version("a") == 0
    v1 = store.write("a", _state(1), META)
    v2 = store.write("a", _state(2), META)
    assert (v1.version, v2.version) == (1, 2)
    assert v1.digest != v2.digest
    tensors, meta = store.read("a")
    assert meta["state_version"] == 2 and meta["note"] == "x" and meta["subject"] == "a"
    assert torch.equal(tensors["params/w"], _state(2)["params/w"])
    assert store.subjects() == ["a"]
    assert store.current_version("a") == 2


def test_stale_write_is_refused_and_writes_nothing(store: RedisStore) -> None:
    store.write("a", _state(1), META, expected_version=0)
    with pytest.raises(StaleStateError, match=r"stored version 1, the writer's expected version 0"):
        store.write("a", _state(2), META, expected_version=0)
    with pytest.raises(StaleStateError, match=r"stored version 1, the writer's expected version 7"):
        store.write("a", _state(2), META, expected_version=7)
    tensors, meta = store.read("a")
    assert meta["state_version"] == 1 and torch.equal(tensors["memory/n"], torch.tensor([1]))
    assert store.write("a", _state(3), META, expected_version=1).version == 2


def test_concurrent_compare_and_set_has_one_winner_per_version(server: RedisServer) -> None:
    namespace = f"t{uuid.uuid4().hex[:8]}"
    wins: list[tuple[int, int]] = []
    stale = 0
    lock = threading.Lock()

    def writer(k: int) -> None:
        nonlocal stale
        s = RedisStore(server.url, namespace=namespace)
        for i in range(15):
            seen = s.current_version("s")
            try:
                v = s.write("s", _state(100 * k + i), META, expected_version=seen)
            except StaleStateError:
                with lock:
                    stale += 1
                continue
            with lock:
                wins.append((v.version, seen))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    versions = sorted(v for v, _ in wins)
    assert versions == list(range(1, len(wins) + 1))  # no number lost, none reused
    assert all(v == seen + 1 for v, seen in wins)  # each winner wrote on what it had read
    assert len(wins) + stale == 90


def test_unconditional_writers_never_reuse_numbers(server: RedisServer) -> None:
    namespace = f"t{uuid.uuid4().hex[:8]}"
    got: list[int] = []
    lock = threading.Lock()

    def writer(k: int) -> None:
        s = RedisStore(server.url, namespace=namespace)
        for i in range(10):
            v = s.write("s", _state(k * 10 + i), META)
            with lock:
                got.append(v.version)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 51))


@pytest.mark.parametrize("subject", ["../../etc/passwd", "a:{b}:meta", "ünïcode 💡", "x" * 256])
def test_keys_hold_only_the_hash_of_an_id(store: RedisStore, subject: str) -> None:
    store.write(subject, _state(1), META)
    keys = [k.decode() for k in store.client.keys(f"{store.namespace}:*")]
    assert keys and all(subject not in k for k in keys)
    assert any(subject_key(subject) in k for k in keys)
    assert store.read(subject)[1]["subject"] == subject
    assert store.subjects() == [subject]


def test_another_subjects_bytes_are_refused(store: RedisStore) -> None:
    store.write("alice", _state(1), META)
    store.write("bob", _state(2), META)
    alice = f"{store.namespace}:{{{subject_key('alice')}}}:v:1"
    bob = f"{store.namespace}:{{{subject_key('bob')}}}:v:1"
    store.client.set(bob, store.client.get(alice))  # a collision / a copied value
    with pytest.raises(StateFileError, match=r"holds subject 'alice', not 'bob'"):
        store.read("bob")
    with pytest.raises(StateFileError, match=r"holds subject 'alice', not 'bob'"):
        store.read_version("bob", 1)


def test_corrupt_bytes_are_refused(store: RedisStore) -> None:
    store.write("a", _state(1), META)
    key = f"{store.namespace}:{{{subject_key('a')}}}:v:1"
    data = bytearray(store.client.get(key))
    data[-3] ^= 0xFF  # inside the tensor bytes: the digest no longer matches
    store.client.set(key, bytes(data))
    with pytest.raises(StateFileError, match="digest"):
        store.read("a")
    store.client.set(key, b"not a state")
    with pytest.raises(StateFileError, match="not a readable"):
        store.read("a")


def test_versions_rollback_and_pruning(store: RedisStore) -> None:
    digests = [store.write("a", _state(i), META).digest for i in range(5)]
    kept = store.versions("a")
    assert [v.version for v in kept] == [3, 4, 5]  # keep_versions=3, the current included
    assert store.current("a") == kept[-1]
    assert [v.digest for v in kept] == digests[2:]
    with pytest.raises(StateFileError, match=r"no version 1 .* kept versions: \[3, 4, 5\]"):
        store.read_version("a", 1)
    tensors, meta = store.read_version("a", 3)
    assert meta["state_version"] == 3 and torch.equal(tensors["memory/n"], torch.tensor([2]))
    with pytest.raises(StaleStateError):
        store.rollback("a", 3, expected_version=4)
    new = store.rollback("a", 3, expected_version=5)
    assert new.version == 6 and new.digest == digests[2]
    assert store.read("a")[1]["rolled_back_from"] == 3
    assert [v.version for v in store.versions("a")] == [4, 5, 6]


def test_delete_erases_everything(store: RedisStore) -> None:
    for i in range(3):
        store.write("a", _state(i), META)
    store.write("b", _state(9), META)
    with pytest.raises(StaleStateError):
        store.delete("a", expected_version=2)
    store.delete("a", expected_version=3)
    assert store.current_version("a") == 0 and store.versions("a") == []
    assert store.current("a") is None and store.subjects() == ["b"]
    with pytest.raises(StateFileError, match="no state for subject 'a'"):
        store.read("a")
    with pytest.raises(StateFileError, match="no state for subject 'a'"):
        store.delete("a")
    base = f"{store.namespace}:{{{subject_key('a')}}}"
    assert store.client.keys(f"{base}*") == []  # nothing of the subject is left
    with pytest.raises(StaleStateError):  # a writer holding version 3 is refused
        store.write("a", _state(5), META, expected_version=3)
    assert store.write("a", _state(5), META, expected_version=0).version == 1


def test_a_collision_never_overwrites(store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import ttaperso.stores.redis as redis_module

    store.write("p:1", _state(1), META)
    monkeypatch.setattr(redis_module, "subject_key", lambda s: subject_key("p:1"))
    with pytest.raises(StateFileError, match=r"holds subject 'p:1', not 'p,1'"):
        store.write("p,1", _state(2), META)
    monkeypatch.undo()
    assert torch.equal(store.read("p:1")[0]["memory/n"], torch.tensor([1]))


def test_export_bytes_are_a_state_file(store: RedisStore) -> None:
    v = store.write("a", _state(1), META)
    data, version = store.read_bytes("a")
    decoded = decode_state(data, "export")
    assert version == 1 and decoded.digest == v.digest and decoded.version == 1


def test_personalizer_saves_and_loads_through_redis(store: RedisStore) -> None:
    def make(seed: int = 0) -> ttaperso.Personalizer:
        return ttaperso.Personalizer(
            build_model(seed), "norm", labels=LABELS, input_shape=INPUT_SHAPE, head=HEAD, gates=()
        )

    p = make()
    x = target_frames(8)
    p.predict(x, "s1")
    p.predict(x, "s2")
    assert sorted(p.save(store)) == ["s1", "s2"]
    q = make()
    assert sorted(q.load(store)) == ["s1", "s2"]
    assert torch.allclose(q.predict(x, "s1").logits, p.predict(x, "s1").logits)
    with pytest.raises(StateFileError, match="another model"):
        make(seed=1).load(store, ["s1"])


def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "r") as srv:
        s = RedisStore(srv.url, namespace="dur")
        written = [s.write("a", _state(i), META).digest for i in range(20)]
        srv.restart(hard=True)  # SIGKILL: only the fsync'd append-only file survives
        s2 = RedisStore(srv.url, namespace="dur")
        assert s2.current_version("a") == 20
        assert s2.digest("a") == written[-1]
        srv.kill()
        with pytest.raises(StoreUnavailableError, match="failed"):
            RedisStore(srv.url, namespace="dur", socket_connect_timeout=0.5).current_version("a")


def test_bad_arguments(store: RedisStore) -> None:
    with pytest.raises(ttaperso.InputError, match="expected_version"):
        store.write("a", _state(1), META, expected_version=-1)
    with pytest.raises(ttaperso.InputError, match="keep_versions"):
        RedisStore(keep_versions=-1)
    with pytest.raises(ttaperso.InputError, match="namespace"):
        RedisStore(namespace="a{b}")
    assert "redis://" not in repr(store)
