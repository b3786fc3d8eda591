"""Load, fault and security figures of `ttaperso serve` (issue 19), on loopback only.

    python experiments/serve_load.py                 # every part, ~10-15 min on 2 cores
    python experiments/serve_load.py --part load     # one part: load | faults | security | resume
    python experiments/serve_load.py --model tiny --subjects 100 --rounds 1   # a quick run

Starts its own redis-server (append-only, fsync always) and, through `ttaperso serve
--ray`, a local Ray cluster with 2 replicas and the HTTP front, all on 127.0.0.1; every
loop is bounded in count and time and everything is stopped at the end.

* load: ``--subjects`` subjects (1,000), interleaved from ``--clients`` concurrent clients
  (8), ``--rounds`` requests of ``--batch`` SynthFace frames (8) per subject, as .npy
  uploads, through 2 replicas; the same (subject, frames) sequence through one in-process
  Personalizer (one thread) gives the baseline. Prints throughput, the ratio, p50/p99
  latency, the share of requests served by a replica that already held the subject, and
  the machine's load average before and during the run.
* faults: the same kind of stream while a replica is SIGKILLed ``--kills`` times (20) and
  redis-server is SIGKILLed and restarted ``--redis-restarts`` times (5); clients resend
  a request that got no answer (503 / connection error). Checks every acknowledged answer:
  its version and digest are in the store (lost = 0), it was computed from the version
  right before the one it wrote (stale = 0), every final state decodes and loads (corrupt
  = 0).
* security: every endpoint but /health without a token, with a wrong one, and with
  another subject's token (401 expected); hostile payloads (corrupt/truncated PNGs,
  decompression bombs, pickled/int64/NaN/out-of-range/lying .npy, oversized bodies,
  random bytes) -> 4xx with the target subject's stored state unchanged.
* resume: the embedded default (`ttaperso serve --states DIR`, no Ray, no Redis) is
  stopped and restarted; every subject must resume from its stored version.

Results: experiments/results/serve_load.json and .md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on 127.0.0.1 only

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

import ttaperso  # noqa: E402
from ttaperso.client import APIError, Client, UnavailableError  # noqa: E402
from ttaperso.serve.auth import subject_token  # noqa: E402
from ttaperso.serve.local import RedisServer, free_port  # noqa: E402
from ttaperso.serve.models import resolve_model  # noqa: E402
from ttaperso.stores import StateStore  # noqa: E402
from ttaperso.stores.redis import RedisStore  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TOKEN = "serve-load-" + os.urandom(12).hex()


# --------------------------------------------------------------------------- frames
def frame_pool(people: int, size: int) -> list[np.ndarray]:
    """SynthFace target people's frames as uint8 (T, size, size) arrays, one per person."""
    from ttaperso.synthface import SynthFace

    sf = SynthFace(seed=0)
    pool = []
    for person in sf.sample_subjects(people, split="target"):
        images = sf.subject_stream(person, sessions=1).images  # (T, 1, 64, 64) in [0, 1]
        if images.shape[-1] != size:
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear")
        pool.append((images[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    return pool


def schedule(
    subjects: int, rounds: int, batch: int, pool: list[np.ndarray]
) -> list[list[tuple[str, np.ndarray]]]:
    """Per round, every subject's next ``batch`` frames (subject i plays pool person i % P)."""
    out = []
    for r in range(rounds):
        step = []
        for i in range(subjects):
            frames = pool[i % len(pool)]
            start = (r * batch + 7 * i) % (len(frames) - batch)
            step.append((f"subject-{i:04d}", frames[start : start + batch]))
        out.append(step)
    return out


# ------------------------------------------------------------------------- servers
def start_front(
    args: argparse.Namespace, store_url: str, port: int, *extra: str
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "ttaperso.cli", "-q", "serve", "--model", args.model,
        "--strategy", args.strategy, "--port", str(port), "--max-frames", "64",
        *extra,
    ]  # fmt: skip
    if store_url:
        cmd += ["--store", store_url, "--ray", "--replicas", "2", "--keep-versions", "1000"]
    env = {**os.environ, "TTAPERSO_TOKEN": TOKEN}
    log = open(Path(tempfile.gettempdir()) / f"ttaperso-serve-{port}.log", "wb")  # noqa: SIM115
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ttaperso serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError("the server did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def warm_up(url: str, schedule_: list[list[tuple[str, np.ndarray]]]) -> None:
    """Until both replicas answer (model loaded, routes known); on throwaway subjects."""
    with Client(url, TOKEN, timeout=120) as c:
        seen: set[int] = set()
        frames = schedule_[0][0][1]
        made = []
        for k in range(200):
            try:
                seen.add(int(c.predict(f"warmup-{k}", array=frames)["replica"]))
                made.append(f"warmup-{k}")
            except UnavailableError:
                time.sleep(0.5)
            if len(seen) >= 2 and k >= 16:
                break
        for subject in made:
            c.delete(subject)


# ---------------------------------------------------------------------------- load
def baseline(args: argparse.Namespace, sched: list[list[tuple[str, np.ndarray]]]) -> dict[str, Any]:
    """The same requests through one in-process Personalizer (frames prepared outside)."""
    torch.set_num_threads(1)
    model = resolve_model(args.model)
    p = ttaperso.Personalizer(model, args.strategy)
    calls = [
        (s, model.prepare(torch.from_numpy(f).float().div(255).unsqueeze(1)))
        for r in sched
        for s, f in r
    ]
    started = time.perf_counter()
    adapted = frames = 0
    for subject, x in calls:
        out = p.predict(x, subject)
        adapted += int(out.updated.sum())
        frames += x.shape[0]
    wall = time.perf_counter() - started
    return {
        "frames": frames,
        "seconds": wall,
        "frames_per_s": frames / wall,
        "adapted_frames": adapted,
    }


def drive(
    url: str,
    sched: list[list[tuple[str, np.ndarray]]],
    clients: int,
    deadline: float,
    on_answer: Callable[[str, dict[str, Any]], None] | None = None,
    retry: bool = False,
    until: threading.Event | None = None,
) -> dict[str, Any]:
    """``clients`` threads; client k owns subjects k, k + clients, ...; rounds in order.

    With ``until``, the rounds repeat until that event is set (or the deadline passes).
    """
    latencies: list[float] = []
    answers: list[dict[str, Any]] = []
    errors: list[str] = []
    retried = [0]
    lock = threading.Lock()

    def loop(k: int) -> None:
        with Client(url, TOKEN, timeout=120) as c:
            steps = sched if until is None else _cycle(sched, until)
            for step in steps:
                for subject, frames in step[k::clients]:
                    for _attempt in range(200):
                        if time.monotonic() > deadline:
                            return
                        t0 = time.perf_counter()
                        try:
                            out = c.predict(subject, array=frames)
                        except (UnavailableError, httpx.TransportError) as exc:
                            if not retry:
                                with lock:
                                    errors.append(f"{subject}: {exc}")
                                break
                            with lock:
                                retried[0] += 1
                            time.sleep(0.2)  # not acknowledged: send it again
                            continue
                        except APIError as exc:
                            with lock:
                                errors.append(f"{subject}: {exc}")
                            break
                        dt = time.perf_counter() - t0
                        with lock:
                            latencies.append(dt)
                            answers.append(out)
                        if on_answer is not None:
                            on_answer(subject, out)
                        break

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    frames = sum(len(a["labels"]) for a in answers)
    lat = sorted(latencies)
    first: set[str] = set()
    repeats = hot_repeats = 0
    for a in answers:  # a subject's first request can never find it hot
        if a["subject"] in first:
            repeats += 1
            hot_repeats += not a.get("loaded", True)
        first.add(a["subject"])
    return {
        "requests": len(answers),
        "frames": frames,
        "seconds": wall,
        "frames_per_s": frames / wall if wall else 0.0,
        "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        "mean_ms": 1000 * statistics.fmean(lat) if lat else None,
        "adapted_frames": sum(sum(a["updated"]) for a in answers),
        "hot_share": sum(not a.get("loaded", True) for a in answers) / max(1, len(answers)),
        "hot_share_after_first": hot_repeats / max(1, repeats),
        "stale_reloads": sum(a.get("reloads", 0) for a in answers),
        "replicas": sorted({a.get("replica") for a in answers if a.get("replica")}),
        "errors": errors[:10],
        "error_count": len(errors),
        "retried": retried[0],
        "answers": answers,
    }


def _cycle(sched: list[Any], until: threading.Event) -> Any:
    while True:
        for step in sched:
            if until.is_set():
                return
            yield step


def part_load(args: argparse.Namespace, pool: list[np.ndarray], work: Path) -> dict[str, Any]:
    sched = schedule(args.subjects, args.rounds, args.batch, pool)
    load_before = os.getloadavg()
    base = baseline(args, sched)
    print(
        f"baseline in-process: {base['frames_per_s']:.1f} frames/s ({base['seconds']:.1f} s)",
        flush=True,
    )
    with RedisServer(work / "redis-load") as redis:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_front(args, redis.url, port)
        try:
            wait_ready(url, proc)
            warm_up(url, sched)
            sampler = LoadSampler()
            served = drive(url, sched, args.clients, time.monotonic() + args.part_budget)
            sampler.stop()
        finally:
            stop(proc)
    served.pop("answers")
    ratio = served["frames_per_s"] / base["frames_per_s"]
    print(
        f"served: {served['frames_per_s']:.1f} frames/s = {ratio:.2f}x in-process; p50 "
        f"{served['p50_ms']:.0f} ms, p99 {served['p99_ms']:.0f} ms; hot after a subject's first "
        f"request {served['hot_share_after_first']:.3f}",
        flush=True,
    )
    return {
        "subjects": args.subjects,
        "clients": args.clients,
        "rounds": args.rounds,
        "batch": args.batch,
        "baseline": base,
        "served": served,
        "ratio": ratio,
        "loadavg_before": load_before,
        "loadavg_during": sampler.samples,
        "cpus": os.cpu_count(),
    }


class LoadSampler:
    """The 1-minute load average every 5 s while a part runs."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(5.0):
            self.samples.append(round(os.getloadavg()[0], 2))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# -------------------------------------------------------------------------- faults
def part_faults(args: argparse.Namespace, pool: list[np.ndarray], work: Path) -> dict[str, Any]:
    subjects = args.fault_subjects
    sched = schedule(subjects, args.fault_rounds, args.batch, pool)
    acks: dict[str, list[dict[str, Any]]] = {}
    lock = threading.Lock()
    replicas_seen: list[int] = []

    def record(subject: str, out: dict[str, Any]) -> None:
        with lock:
            acks.setdefault(subject, []).append(
                {k: out[k] for k in ("version", "based_on", "state_digest", "replica")}
            )
            replicas_seen.append(int(out["replica"]))

    kills: list[dict[str, Any]] = []
    restarts: list[float] = []
    with RedisServer(work / "redis-faults") as redis:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_front(args, redis.url, port)
        try:
            wait_ready(url, proc)
            warm_up(url, sched)
            deadline = time.monotonic() + args.part_budget
            done = threading.Event()
            faults_over = threading.Event()
            result: dict[str, Any] = {}

            def run() -> None:
                result.update(
                    drive(url, sched, args.clients, deadline, record, retry=True, until=faults_over)
                )
                done.set()

            driver = threading.Thread(target=run)
            driver.start()
            rng = random.Random(0)
            plan = ["kill"] * args.kills + ["redis"] * args.redis_restarts
            rng.shuffle(plan)
            for action in plan:
                if done.wait(args.fault_every):
                    break
                if action == "kill":
                    alive = replica_pids(proc.pid)
                    if not alive:
                        continue
                    victim = rng.choice(alive)
                    os.kill(victim, signal.SIGKILL)
                    kills.append({"pid": victim, "at_answers": len(replicas_seen)})
                else:
                    t0 = time.perf_counter()
                    redis.restart(hard=True)
                    restarts.append(time.perf_counter() - t0)
            done.wait(10.0)  # the stream goes on past the last fault: answers after failover
            faults_over.set()
            driver.join(timeout=args.part_budget + 120)
        finally:
            stop(proc)
        check = verify(redis.url, acks, args)
    result.pop("answers", None)
    out = {
        "subjects": subjects,
        "requests_acknowledged": sum(len(v) for v in acks.values()),
        "replica_kills": len(kills),
        "redis_restarts": len(restarts),
        "redis_restart_seconds": restarts,
        "retried_requests": result.get("retried"),
        "stale_reloads": result.get("stale_reloads"),
        "hot_share_after_first": result.get("hot_share_after_first"),
        "errors": result.get("error_count"),
        **check,
        "p50_ms": result.get("p50_ms"),
        "p99_ms": result.get("p99_ms"),
        "seconds": result.get("seconds"),
    }
    print(
        f"faults: {len(kills)} replica kills, {len(restarts)} redis restarts, "
        f"{out['requests_acknowledged']} acks: lost {check['lost']}, stale {check['stale']}, "
        f"corrupt {check['corrupt']}",
        flush=True,
    )
    return out


def replica_pids(root: int) -> list[int]:
    """Live Ray Serve replica processes descended from ``root`` (our own server only)."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z":  # a zombie is already dead
            continue
        parents[int(entry.name)] = int(fields[1])
        names[int(entry.name)] = cmdline
    out = []
    for pid, cmdline in names.items():
        if "ServeReplica:ttaperso" not in cmdline:
            continue
        ancestor = parents.get(pid, 0)
        while ancestor not in (0, 1, root):
            ancestor = parents.get(ancestor, 0)
        if ancestor == root:
            out.append(pid)
    return sorted(out)


def verify(
    redis_url: str, acks: dict[str, list[dict[str, Any]]], args: argparse.Namespace
) -> dict[str, Any]:
    """Every acknowledged answer against the store (redis restarted from its AOF)."""
    store = RedisStore(redis_url, keep_versions=1000)
    lost = stale = corrupt = 0
    p = ttaperso.Personalizer(resolve_model(args.model), args.strategy)
    for subject, items in acks.items():
        kept = {v.version: v.digest for v in store.versions(subject)}
        previous = 0
        for a in items:
            if kept.get(a["version"]) != a["state_digest"]:
                lost += 1
            # computed from the version right before the one it wrote, and never from an
            # older version than the last one this subject's client was answered with
            if a["based_on"] != a["version"] - 1 or a["based_on"] < previous:
                stale += 1
            previous = a["version"]
        try:
            p.load(cast(StateStore, store), [subject])
        except ttaperso.TTAPersoError:
            corrupt += 1
    return {"lost": lost, "stale": stale, "corrupt": corrupt, "subjects_checked": len(acks)}


# ------------------------------------------------------------------------ security
def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def hostile_payloads(
    frames: np.ndarray,
) -> list[tuple[str, list[tuple[str, tuple[str, bytes, str]]]]]:
    good = _png(frames[0])
    bomb = io.BytesIO()
    Image.new("1", (30000, 30000)).save(bomb, format="PNG")
    rng = np.random.default_rng(0)
    lying = _npy(np.zeros((1, 8, 8), np.uint8)).replace(b"(1, 8, 8)", b"(9, 99999, 99999)"[:9])
    cases = [
        ("corrupt png", [("frames", ("a.png", b"\x89PNG\r\n\x1a\n" + bytes(200), "image/png"))]),
        ("truncated png", [("frames", ("a.png", good[: len(good) // 2], "image/png"))]),
        (
            "bit-flipped png",
            [("frames", ("a.png", good[:40] + bytes([good[40] ^ 0xFF]) + good[41:], "image/png"))],
        ),
        ("decompression bomb", [("frames", ("bomb.png", bomb.getvalue(), "image/png"))]),
        ("gif", [("frames", ("a.gif", b"GIF89a" + bytes(64), "image/gif"))]),
        ("pickled npy", [("array", ("a.npy", _npy(np.array([{}], dtype=object), True), "x"))]),
        ("int64 npy", [("array", ("a.npy", _npy(np.zeros((2, 8, 8), np.int64)), "x"))]),
        ("complex npy", [("array", ("a.npy", _npy(np.zeros((2, 8, 8), np.complex64)), "x"))]),
        ("nan npy", [("array", ("a.npy", _npy(np.full((2, 8, 8), np.nan, np.float32)), "x"))]),
        ("inf npy", [("array", ("a.npy", _npy(np.full((2, 8, 8), np.inf, np.float32)), "x"))]),
        (
            "out of range npy",
            [("array", ("a.npy", _npy(np.full((2, 8, 8), 7.0, np.float32)), "x"))],
        ),
        ("5-channel npy", [("array", ("a.npy", _npy(np.zeros((2, 8, 8, 5), np.uint8)), "x"))]),
        ("lying npy header", [("array", ("a.npy", lying, "x"))]),
        ("too many frames", [("frames", (f"{i}.png", good, "image/png")) for i in range(65)]),
        (
            "frames and array",
            [("frames", ("a.png", good, "image/png")), ("array", ("a.npy", _npy(frames[:1]), "x"))],
        ),
        ("empty", [("frames", ("a.png", b"", "image/png"))]),
    ]
    for k in range(20):
        cases.append(
            (
                f"random bytes {k}",
                [("frames", ("r.png", rng.bytes(int(rng.integers(1, 5000))), "image/png"))],
            )
        )
        cases.append(
            (
                f"random npy {k}",
                [("array", ("r.npy", b"\x93NUMPY" + rng.bytes(int(rng.integers(1, 500))), "x"))],
            )
        )
    return cases


def part_security(args: argparse.Namespace, pool: list[np.ndarray], work: Path) -> dict[str, Any]:
    frames = pool[0][: args.batch]
    with RedisServer(work / "redis-sec") as redis:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_front(args, redis.url, port)
        try:
            wait_ready(url, proc)
            with Client(url, TOKEN) as c:
                for s in ("alice", "bob"):
                    for _ in range(200):
                        try:
                            c.predict(s, array=frames)
                            break
                        except UnavailableError:
                            time.sleep(0.5)
                exported = {s: c.export(s) for s in ("alice", "bob")}
                spec = httpx.get(f"{url}/openapi.json").json()
                unauth = 0
                probes = 0
                for path, methods in spec["paths"].items():
                    if path == "/health":
                        continue
                    target = url + path.replace("{subject}", "bob")
                    for method in methods:
                        for header in ({}, {"Authorization": "Bearer nope-nope-nope-nope"},
                                       {"Authorization": "Bearer " + subject_token(TOKEN, "alice")}):  # fmt: skip
                            r = httpx.request(
                                method.upper(),
                                target,
                                headers=header,
                                params={"version": 1},
                                timeout=60,
                            )
                            probes += 1
                            unauth += r.status_code != 401
                auth = {"Authorization": f"Bearer {TOKEN}"}
                non_4xx: list[str] = []
                for name, files in hostile_payloads(frames):
                    r = httpx.post(
                        f"{url}/v1/subjects/alice/predict", files=files, headers=auth, timeout=60
                    )
                    if not 400 <= r.status_code < 500:
                        non_4xx.append(f"{name}: {r.status_code}")
                big = httpx.post(
                    f"{url}/v1/subjects/alice/predict",
                    content=b"x" * (17 * 1024 * 1024),
                    headers=auth,
                    timeout=60,
                )
                if big.status_code != 413:
                    non_4xx.append(f"oversized body: {big.status_code}")
                changed = [s for s in ("alice", "bob") if c.export(s) != exported[s]]
                hostile_count = len(hostile_payloads(frames)) + 1
        finally:
            stop(proc)
    out = {
        "unauthorised_probes": probes,
        "probes_not_refused": unauth,
        "hostile_payloads": hostile_count,
        "hostile_not_4xx": non_4xx,
        "states_changed_by_refused_requests": changed,
    }
    print(
        f"security: {probes} probes without/with wrong/other subject's token, {unauth} not 401; "
        f"{hostile_count} hostile payloads, {len(non_4xx)} not 4xx; states changed: {changed}",
        flush=True,
    )
    return out


# -------------------------------------------------------------------------- resume
def part_resume(args: argparse.Namespace, pool: list[np.ndarray], work: Path) -> dict[str, Any]:
    states = work / "embedded-states"
    sched = schedule(args.resume_subjects, 2, args.batch, pool)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first: dict[str, int] = {}
    proc = start_front(args, "", port, "--states", str(states))
    try:
        wait_ready(url, proc)
        with Client(url, TOKEN) as c:
            for subject, frames in sched[0]:
                first[subject] = c.predict(subject, array=frames)["version"]
    finally:
        stop(proc)
    proc = start_front(args, "", port, "--states", str(states))
    resumed = 0
    try:
        wait_ready(url, proc)
        with Client(url, TOKEN) as c:
            listed = set(c.subjects())
            for subject, frames in sched[1]:
                out = c.predict(subject, array=frames)
                resumed += out["based_on"] == first[subject] and out["loaded"]
    finally:
        stop(proc)
    out = {
        "subjects": len(first),
        "resumed": resumed,
        "listed_after_restart": len(listed & set(first)),
    }
    print(f"resume: {resumed}/{len(first)} subjects resumed from their stored version", flush=True)
    return out


# ---------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--part", choices=["all", "load", "faults", "security", "resume"], default="all"
    )
    parser.add_argument("--model", default="fer-mini-xception")
    parser.add_argument("--strategy", default="tent")
    parser.add_argument("--subjects", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--fault-subjects", type=int, default=64)
    parser.add_argument("--fault-rounds", type=int, default=40)
    parser.add_argument("--fault-every", type=float, default=3.0, help="seconds between faults")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--redis-restarts", type=int, default=5)
    parser.add_argument("--resume-subjects", type=int, default=50)
    parser.add_argument("--part-budget", type=float, default=420.0, help="seconds per part")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = int(resolve_model(args.model).input_shape[1] or 64)
    pool = frame_pool(16, max(size, 24))
    results: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "model": args.model,
        "strategy": args.strategy,
    }
    parts = ["load", "faults", "security", "resume"] if args.part == "all" else [args.part]
    with tempfile.TemporaryDirectory(prefix="ttaperso-serve-load-") as tmp:
        for part in parts:
            t0 = time.perf_counter()
            results[part] = globals()[f"part_{part}"](args, pool, Path(tmp))
            results[part]["part_seconds"] = time.perf_counter() - t0
    RESULTS.mkdir(exist_ok=True)
    name = f"serve_load{'_' + args.tag if args.tag else ''}"
    previous = RESULTS / f"{name}.json"
    if args.part != "all" and previous.exists():  # one part re-run: keep the others
        merged = json.loads(previous.read_text())
        merged.setdefault("commands", {})[args.part] = results.pop("command")
        merged.update(results)
        results = merged
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2, default=str))
    (RESULTS / f"{name}.md").write_text(report(results))
    print(f"wrote {RESULTS / name}.json and .md")


def report(r: dict[str, Any]) -> str:
    lines = [f"# serve_load ({r['model']}, {r['strategy']})", "", f"`{r['command']}`", ""]
    for part, command in r.get("commands", {}).items():
        lines += [f"{part} re-run: `{command}`", ""]
    if "load" in r:
        ld, s, b = r["load"], r["load"]["served"], r["load"]["baseline"]
        lines += [
            "## Load",
            f"{ld['subjects']} subjects interleaved, {ld['clients']} clients, {ld['rounds']} "
            f"requests of {ld['batch']} frames per subject, 2 replicas ({ld['cpus']} CPUs; "
            f"load average before {ld['loadavg_before'][0]:.2f}, during {ld['loadavg_during']})",
            "",
            "| | frames/s | p50 ms | p99 ms |",
            "|---|---|---|---|",
            f"| in-process Personalizer (1 thread) | {b['frames_per_s']:.1f} | | |",
            f"| served (HTTP + 2 Ray replicas + Redis) | {s['frames_per_s']:.1f} | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} |",
            "",
            f"ratio {ld['ratio']:.2f}; adapted frames {s['adapted_frames']} of {s['frames']} "
            f"(in-process {b['adapted_frames']}); requests after a subject's first served by the "
            f"replica that held it {s['hot_share_after_first']:.3f}; "
            f"errors {s['error_count']}",
            "",
        ]
    if "faults" in r:
        f = r["faults"]
        lines += [
            "## Faults",
            f"{f['replica_kills']} replica SIGKILLs, {f['redis_restarts']} redis SIGKILL+restarts, "
            f"{f['requests_acknowledged']} acknowledged requests ({f['retried_requests']} resent): "
            f"lost {f['lost']}, stale {f['stale']}, corrupt {f['corrupt']}",
            "",
        ]
    if "security" in r:
        s = r["security"]
        lines += [
            "## Security",
            f"{s['unauthorised_probes']} probes without a token, with a wrong one or another "
            f"subject's: {s['probes_not_refused']} not refused; {s['hostile_payloads']} hostile "
            f"payloads: {len(s['hostile_not_4xx'])} not 4xx; states changed: "
            f"{s['states_changed_by_refused_requests']}",
            "",
        ]
    if "resume" in r:
        s = r["resume"]
        lines += ["## Embedded restart", f"{s['resumed']}/{s['subjects']} subjects resumed", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
