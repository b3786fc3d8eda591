"""Ray Serve scale-out: 2 replicas on a local Ray cluster, a real redis-server, HTTP front.

Everything on loopback, started and stopped by this module. Checks: routing by subject,
answers computed from the newest stored version (also after another writer and after a
replica is SIGKILLed mid-stream), no acknowledged update lost, predict_many fan-out.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ttaperso.serve.ray_backend import loopback_ray_env

loopback_ray_env()  # before Ray is imported: loopback only, no usage statistics

pytest.importorskip("fastapi", reason="the HTTP API needs the serve extra")
pytest.importorskip("redis", reason="RedisStore needs the serve extra")
pytest.importorskip("ray.serve", reason="Ray Serve needs the serve extra (ray[serve])")

import ttaperso  # noqa: E402
from ttaperso.client import Client, UnavailableError  # noqa: E402
from ttaperso.serve.app import create_app  # noqa: E402
from ttaperso.serve.local import RedisServer, ServerThread, redis_server_binary  # noqa: E402
from ttaperso.serve.models import tiny_model  # noqa: E402
from ttaperso.serve.ray_backend import RayBackend  # noqa: E402
from ttaperso.serve.service import ServiceSpec  # noqa: E402
from ttaperso.stores.redis import RedisStore  # noqa: E402

pytestmark = pytest.mark.skipif(
    redis_server_binary() is None,
    reason="redis-server not installed (apt-get install redis-server; .ci/run installs it)",
)

TOKEN = "ray-test-token-0123456789"
OPTIONS = {"gates": [], "update_every": 2, "lr": 1e-2}


def faces(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 20, 20), dtype=np.uint8)


@dataclass
class Cluster:
    url: str
    store: RedisStore
    backend: RayBackend


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder: Path = tmp_path_factory.mktemp("ray-redis")
    with RedisServer(folder) as redis_server:
        spec = ServiceSpec(
            model="tiny", strategy="tent", options=OPTIONS, store=redis_server.url,
            keep_versions=1000, namespace="raytest",
        )  # fmt: skip
        backend = RayBackend.start(spec, replicas=2, replica_cpus=1, num_cpus=2)
        app = create_app(backend, tiny_model(), TOKEN, close_backend=False)
        store = RedisStore(redis_server.url, namespace="raytest", keep_versions=1000)
        try:
            with ServerThread(app) as url:
                yield Cluster(url, store, backend)
        finally:
            backend.close()


RETRIED: list[str] = []


def _predict_retrying(c: Client, subject: str, seed: int, tries: int = 40) -> dict[str, object]:
    for _ in range(tries):
        try:
            return c.predict(subject, array=faces(2, seed))
        except UnavailableError:
            RETRIED.append(subject)
            time.sleep(0.25)  # a replica died: not acknowledged, send it again
    raise AssertionError(f"{subject}: no replica answered")


def test_subjects_are_served_from_their_newest_version(cluster: Cluster) -> None:
    with Client(cluster.url, TOKEN) as c:
        replicas: dict[str, set[int]] = {}
        for step in range(4):
            for k in range(6):
                out = c.predict(f"r{k}", array=faces(2, 10 * k + step))
                assert out["based_on"] == step and out["version"] == step + 1
                replicas.setdefault(f"r{k}", set()).add(int(out["replica"]))
        assert cluster.store.current_version("r0") == 4
        assert len(set().union(*replicas.values())) == 2  # both replicas serve
        # Another writer (an operator's rollback, another deployment) moves r0 on: the next
        # answer must be computed from that version, whichever replica holds r0.
        new = cluster.store.rollback("r0", 1, expected_version=4)
        out = c.predict("r0", array=faces(2, 99))
        assert out["based_on"] == new.version == 5 and out["version"] == 6
        out = c.predict_many({"r1": faces(1, 1), "r2": faces(3, 2), "fresh": faces(2, 3)})
        assert {s: a["version"] for s, a in out.items()} == {"r1": 5, "r2": 5, "fresh": 1}
        with pytest.raises(ttaperso.InputError, match=r"dtype"):
            c.predict("r1", array=np.zeros((1, 8, 8), np.int64))
        c.delete("r3")
        assert "r3" not in c.subjects()
        assert c.predict("r3", array=faces(1, 5))["based_on"] == 0  # erased: a fresh state


def test_a_replica_killed_mid_stream_loses_no_acknowledged_update(cluster: Cluster) -> None:
    subjects = [f"k{i}" for i in range(8)]
    acks: dict[str, list[dict[str, object]]] = {s: [] for s in subjects}
    pids: set[int] = set()
    order: list[int] = []  # the replica of every answer, in the order they came
    stop = threading.Event()

    def client_loop(part: list[str], seed: int) -> None:
        with Client(cluster.url, TOKEN) as c:
            step = 0
            while not stop.is_set() and step < 30:
                for s in part:
                    out = _predict_retrying(c, s, seed + step)
                    acks[s].append(out)
                    pids.add(int(out["replica"]))  # type: ignore[call-overload]
                    order.append(int(out["replica"]))  # type: ignore[call-overload]
                step += 1

    threads = [
        threading.Thread(target=client_loop, args=(subjects[i::2], 1000 * i)) for i in range(2)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(pids) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    victim = sorted(pids)[0]
    time.sleep(0.3)
    os.kill(victim, signal.SIGKILL)  # mid-stream: requests are in flight
    killed_at = len(order)
    for t in threads:
        t.join(timeout=180)
    stop.set()
    assert not any(t.is_alive() for t in threads)
    after = order[killed_at + 4 :]  # answers in flight at the kill may still land
    assert after and victim not in after  # the dead replica answered nothing afterwards
    print(f"killed {victim} after {killed_at} answers; {len(RETRIED)} retried requests")
    for s in subjects:
        versions = [int(a["version"]) for a in acks[s]]  # type: ignore[call-overload]
        assert versions == sorted(versions) and len(set(versions)) == len(versions), s
        for a in acks[s]:
            # computed from the version right before the one it wrote: never from a stale one
            assert a["based_on"] == int(a["version"]) - 1, (s, a["based_on"], a["version"])  # type: ignore[call-overload]
        kept = {v.version: v.digest for v in cluster.store.versions(s)}
        for a in acks[s]:
            assert kept[int(a["version"])] == a["state_digest"], s  # type: ignore[call-overload]
        assert cluster.store.current_version(s) >= versions[-1]
        cluster.store.read(s)  # decodes and checks the digest: not corrupt
