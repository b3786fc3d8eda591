"""The HTTP API on a real uvicorn server on loopback, one process, FolderStore (the default).

Covers: auth on every endpoint, subject tokens, predictions equal to the Python API's,
every subject endpoint, hostile payloads (4xx and no state change), metrics, and a
restart of the `ttaperso serve` command resuming every subject.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the HTTP API needs the serve extra")
pytest.importorskip("httpx", reason="the client needs the serve extra")
import httpx  # noqa: E402
from PIL import Image  # noqa: E402

import ttaperso  # noqa: E402
from ttaperso.client import Client, NotFoundError  # noqa: E402
from ttaperso.serve.app import create_app  # noqa: E402
from ttaperso.serve.auth import subject_token  # noqa: E402
from ttaperso.serve.decode import Limits  # noqa: E402
from ttaperso.serve.local import ServerThread, free_port  # noqa: E402
from ttaperso.serve.models import tiny_model  # noqa: E402
from ttaperso.serve.service import SubjectService  # noqa: E402
from ttaperso.stores.codec import decode_state  # noqa: E402

TOKEN = "test-token-0123456789abcdef"
OPTIONS = {"gates": (), "update_every": 2, "lr": 1e-2}


def faces(n: int, seed: int, size: int = 24) -> np.ndarray:
    """``n`` gray face-crop-like uint8 images (H, W), seeded."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@dataclass
class Served:
    url: str
    client: Client
    service: SubjectService
    states: Path


def make_personalizer(audit: Path | None = None) -> ttaperso.Personalizer:
    return ttaperso.Personalizer(tiny_model(), "tent", audit=audit, **OPTIONS)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    audit = ttaperso.AuditLog(tmp_path / "audit")
    p = ttaperso.Personalizer(tiny_model(), "tent", audit=audit, **OPTIONS)
    store = ttaperso.FolderStore(tmp_path / "states", keep_versions=5)
    service = SubjectService(p, store, audit=audit)
    limits = Limits(max_request_bytes=2_000_000, max_frames=16, max_image_pixels=512 * 512)
    app = create_app(service, p.model, TOKEN, limits=limits)
    with ServerThread(app) as url, Client(url, TOKEN) as client:
        yield Served(url, client, service, tmp_path / "states")
    service.close()


def test_health_is_the_only_open_endpoint(served: Served) -> None:
    assert httpx.get(f"{served.url}/health").json() == {"status": "ok"}
    spec = httpx.get(f"{served.url}/openapi.json").json()
    checked = 0
    for path, methods in spec["paths"].items():
        if path == "/health":
            continue
        url = served.url + path.replace("{subject}", "alice")
        for method in methods:
            for headers in (
                {},
                {"Authorization": "Bearer wrong-token-xxxxxxxxxxxx"},
                {"Authorization": TOKEN},
                {"Authorization": "Basic " + TOKEN},
            ):
                r = httpx.request(method.upper(), url, headers=headers, params={"version": 1})
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
                checked += 1
    assert checked >= 4 * 11
    assert served.service.subjects() == []  # nothing was created by refused calls


def test_predict_matches_the_python_api(served: Served) -> None:
    images = faces(4, seed=1)
    reference = make_personalizer()
    x = reference.model.prepare(torch.from_numpy(images).float().div(255).unsqueeze(1))
    first = reference.predict(x[:2], "alice")
    second = reference.predict(x[2:], "alice")

    a = served.client.predict("alice", images=[png(i) for i in images[:2]])
    b = served.client.predict("alice", array=images[2:])
    for got, want in ((a, first), (b, second)):
        assert torch.allclose(torch.tensor(got["logits"]), want.logits, atol=1e-5)
        assert got["labels"] == want.labels.tolist()
        assert got["names"] == want.names
        assert got["updated"] == want.updated.tolist()
        assert got["class_names"] == list(want.class_names)
    assert (a["version"], a["based_on"], b["version"], b["based_on"]) == (1, 0, 2, 1)
    assert torch.allclose(torch.tensor(a["probs"]).sum(1), torch.ones(2), atol=1e-5)
    floats = served.client.predict("bob", array=images[:2].astype(np.float32) / 255.0)
    assert torch.allclose(torch.tensor(floats["logits"]), first.logits, atol=1e-4)


def test_predict_many(served: Served) -> None:
    out = served.client.predict_many({"a": [png(i) for i in faces(2, 3)], "b": faces(3, 4)})
    assert sorted(out) == ["a", "b"]
    assert len(out["a"]["labels"]) == 2 and len(out["b"]["labels"]) == 3
    assert out["a"]["version"] == 1 and out["b"]["version"] == 1
    with pytest.raises(ttaperso.InputError, match=r"subject 'c'.*not a readable PNG"):
        served.client.predict_many({"a": faces(2, 3), "c": [b"garbage"]})
    assert served.client.versions("a")["current"] == 1  # all-or-nothing: a unchanged


def _snapshot(served: Served) -> dict[str, object]:
    out: dict[str, object] = {}
    for subject in served.service.subjects():
        out[subject] = served.client.export(subject)
    return out


def _bomb() -> bytes:
    # 20000 x 20000 one-bit pixels compress to ~50 KB; decoded they would be 400 M pixels.
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    return buffer.getvalue()


def _huge_npy_header() -> bytes:
    header = npy(np.zeros((1, 8, 8), np.uint8))
    return header.replace(b"(1, 8, 8)", b"(9, 99999, 99999)".ljust(9))  # shape lies


def _pickled_npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)  # a pickle inside
    return buffer.getvalue()


HOSTILE: list[tuple[str, dict[str, object], int, str]] = [
    ("corrupt png", {"frames": [b"\x89PNG\r\n\x1a\n" + b"\0" * 64]}, 400, "not a readable"),
    ("truncated png", {"frames": [png(faces(1, 0)[0])[:60]]}, 400, "corrupt or truncated"),
    ("gif", {"frames": [b"GIF89a" + b"\0" * 32]}, 400, "not a readable PNG or JPEG"),
    ("bomb", {"frames": [_bomb()]}, 413, "pixels"),
    ("too many frames", {"frames": [png(faces(1, 0)[0])] * 17}, 413, "at most 16 frames"),
    ("empty frame", {"frames": [b""]}, 400, "empty"),
    ("pickle npy", {"array": _pickled_npy()}, 400, "dtype"),
    ("int64 npy", {"array": npy(np.zeros((1, 8, 8), np.int64))}, 400, "dtype uint8, float16"),
    ("nan npy", {"array": npy(np.full((1, 8, 8), np.nan, np.float32))}, 400, "NaN"),
    ("range npy", {"array": npy(np.full((1, 8, 8), 3.0, np.float32))}, 400, r"in \[0, 1\]"),
    ("shape npy", {"array": npy(np.zeros((1, 8, 8, 5), np.uint8))}, 400, "shape"),
    ("lying npy", {"array": _huge_npy_header()}, 413, "frames|pixels"),
    ("not npy", {"array": b"hello"}, 400, "not a .npy"),
    (
        "broken npy header",
        {"array": npy(faces(1, 0)).replace(b"(1, 24, 24)", b"(1, 24, 24"[:9])},
        400,
        "not a .npy",
    ),
    ("both", {"frames": [png(faces(1, 0)[0])], "array": npy(faces(1, 0))}, 400, "either"),
    ("nothing", {}, 400, "at least one frame"),
]


@pytest.mark.parametrize("name,parts,status,message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_payloads_are_refused_and_change_nothing(
    served: Served, name: str, parts: dict[str, object], status: int, message: str
) -> None:
    served.client.predict("alice", array=faces(2, 0))
    before = _snapshot(served)
    files = [
        (field, (f"f{i}", data, "application/octet-stream"))
        for field, values in parts.items()
        for i, data in enumerate(values if isinstance(values, list) else [values])
    ]
    r = httpx.post(
        f"{served.url}/v1/subjects/alice/predict",
        files=files or None,
        headers={"Authorization": f"Bearer {TOKEN}"},
        data={} if files else {"x": "1"},
    )
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"}
    import re

    assert re.search(message, body["detail"]), body
    assert _snapshot(served) == before


def test_size_limits_and_bad_ids(served: Served) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.post(f"{served.url}/v1/subjects/a/predict", content=b"x" * 2_000_001, headers=auth)
    assert r.status_code == 413 and "limit of 2000000 bytes" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
        for _ in range(40):
            yield b"y" * 100_000

    r = httpx.post(f"{served.url}/v1/subjects/a/predict", content=chunks(), headers=auth)
    assert r.status_code == 413
    r = httpx.post(
        f"{served.url}/v1/subjects/a%00b/predict", files={"array": npy(faces(1, 0))}, headers=auth
    )
    assert r.status_code == 400 and "control characters" in r.json()["detail"]
    with pytest.raises(ttaperso.InputError, match="1 to 256 characters"):
        served.client.predict("x" * 300, array=faces(1, 0))
    assert served.service.subjects() == []


def test_subject_tokens_cannot_reach_other_subjects(served: Served) -> None:
    served.client.predict("alice", array=faces(2, 0))
    served.client.predict("bob", array=faces(2, 1))
    before = _snapshot(served)
    alice = Client(served.url, subject_token(TOKEN, "alice"))
    assert alice.predict("alice", array=faces(2, 2))["version"] == 2
    assert alice.versions("alice")["current"] == 2
    after_alice = _snapshot(served)
    assert after_alice["bob"] == before["bob"]
    calls = [
        lambda: alice.predict("bob", array=faces(2, 2)),
        lambda: alice.calibrate("bob", array=faces(2, 2)),
        lambda: alice.reset("bob"),
        lambda: alice.versions("bob"),
        lambda: alice.rollback("bob", 1),
        lambda: alice.export("bob"),
        lambda: alice.delete("bob"),
        lambda: alice.audit("bob"),
        lambda: alice.predict_many({"alice": faces(1, 0), "bob": faces(1, 0)}),
        lambda: alice.subjects(),
        lambda: alice.metrics(),
        lambda: alice.info(),
    ]
    for call in calls:
        with pytest.raises(ttaperso.client.APIError) as info:
            call()
        assert info.value.status == 401
    # Ids that look like paths are just ids: they reach their own state, never another's.
    for tricky in ("../bob", "bob/..", "./bob", "bob%2F", "BOB", "bob "):
        served.client.predict(tricky, array=faces(1, 3))
    assert _snapshot(served)["bob"] == before["bob"]
    assert {"../bob", "bob/..", "BOB", "bob "} <= set(served.service.subjects())
    alice.close()


def test_versions_rollback_export_delete_audit(served: Served) -> None:
    c = served.client
    for seed in range(3):
        c.predict("p/017", array=faces(2, seed))  # an id with a slash
    v = c.versions("p/017")
    assert v["current"] == 3 and [x["version"] for x in v["versions"]] == [1, 2, 3]
    exported = c.export("p/017")
    assert decode_state(exported, "export").digest == v["versions"][-1]["digest"]
    assert decode_state(exported, "export").metadata["subject"] == "p/017"
    out = c.rollback("p/017", 1)
    assert out["version"] == 4 and out["rolled_back_to"] == 1
    assert decode_state(c.export("p/017"), "x").digest == v["versions"][0]["digest"]
    with pytest.raises(NotFoundError, match=r"No version 9 .* kept versions: \[1, 2, 3, 4\]"):
        c.rollback("p/017", 9)
    reset = c.reset("p/017")
    assert reset["version"] == 5
    fresh = served.service.personalizer.strategy.initial_state().flat()
    state = decode_state(c.export("p/017"), "x").tensors
    assert all(torch.equal(state[k], fresh[k]) for k in fresh)
    trail = c.audit("p/017")
    assert trail["ok"] and trail["errors"] == []
    events = [r["event"] for r in trail["records"]]
    assert events.count("save") == 3 and "rollback" in events and "reset" in events
    erased = c.delete("p/017")
    assert erased["erased_versions"] == [1, 2, 3, 4, 5]
    for call in (lambda: c.versions("p/017"), lambda: c.export("p/017"), lambda: c.delete("p/017")):
        with pytest.raises(NotFoundError):
            call()
    assert "p/017" not in c.subjects()
    assert not list(served.states.rglob("*.safetensors"))
    assert c.audit("p/017")["records"][-1]["event"] == "delete"


def test_errors_carry_the_python_api_messages(served: Served) -> None:
    p = make_personalizer()
    x = p.model.prepare(torch.rand(2, 1, 16, 16))
    with pytest.raises(ttaperso.ConfigError) as direct:
        p.calibrate("alice", x, neutral_label="bogus")
    with pytest.raises(ttaperso.ConfigError) as served_error:
        served.client.calibrate("alice", array=faces(2, 0), neutral_label="bogus")
    assert str(served_error.value) == str(direct.value)
    assert served_error.value.status == 400  # type: ignore[attr-defined]
    assert served.client.calibrate("alice", array=faces(4, 0))["version"] == 1


def test_metrics_count_requests_and_adaptation(served: Served) -> None:
    for seed in range(3):
        served.client.predict("alice", array=faces(2, seed))
    with pytest.raises(ttaperso.InputError):
        served.client.predict("alice", array=np.zeros((1, 8, 8), np.int64))
    text = served.client.metrics()
    assert (
        'ttaperso_requests_total{endpoint="/v1/subjects/{subject:path}/predict",method="POST",status="200"} 3.0'
        in text
    )
    assert 'status="400"} 1.0' in text
    assert "ttaperso_frames_total 6.0" in text
    adapted = float(text.split("\nttaperso_adapted_frames_total ")[1].split()[0])
    assert adapted == 6.0  # no gates: every frame adapts
    assert "ttaperso_request_seconds_bucket" in text and "ttaperso_guard_trips_total" in text


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ttaperso serve exited: {proc.stderr.read().decode()[-3000:]}")  # type: ignore[union-attr]
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise TimeoutError("ttaperso serve did not start")


def _serve(states: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TTAPERSO_TOKEN": TOKEN}
    args = [sys.executable, "-m", "ttaperso.cli", "serve", "--model", "tiny", "--states",
            str(states), "--port", str(port), "--strategy", "tent", "--options",
            '{"gates": [], "update_every": 2, "lr": 0.01}', *extra]  # fmt: skip
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("policy", [(), ("--save-every", "30")], ids=["write-through", "every-30s"])
def test_embedded_server_resumes_every_subject_after_restart(
    tmp_path: Path, policy: tuple[str, ...]
) -> None:
    """`ttaperso serve --states DIR`, stopped (SIGTERM) and started again, resumes everyone."""
    subjects = [f"s{i}" for i in range(5)]
    reference = make_personalizer()
    first: dict[str, dict[str, object]] = {}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(tmp_path / "states", port, *policy)
    try:
        _wait_http(url, proc)
        with Client(url, TOKEN) as c:
            for i, s in enumerate(subjects):
                first[s] = c.predict(s, array=faces(2, i))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        assert code in (0, -signal.SIGTERM), proc.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
    proc = _serve(tmp_path / "states", port, *policy)
    try:
        _wait_http(url, proc)
        with Client(url, TOKEN) as c:
            for i, s in enumerate(subjects):
                images = np.concatenate([faces(2, i), faces(2, 100 + i)])
                x = reference.model.prepare(torch.from_numpy(images).float().div(255).unsqueeze(1))
                reference.predict(x[:2], s)
                want = reference.predict(x[2:], s)
                got = c.predict(s, array=faces(2, 100 + i))
                assert torch.allclose(torch.tensor(got["logits"]), want.logits, atol=1e-5), s
                if not policy:
                    assert got["based_on"] == first[s]["version"] == 1 and got["version"] == 2
            assert sorted(c.subjects()) == subjects
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_concurrent_requests_on_shared_subjects_serialise_per_subject(served: Served) -> None:
    """8 client threads on 4 subjects: every subject's answers form one chain of versions."""
    import threading

    answers: list[dict[str, object]] = []
    lock = threading.Lock()

    def work(k: int) -> None:
        with Client(served.url, TOKEN) as c:
            for i in range(6):
                out = c.predict(f"shared-{(k + i) % 4}", array=faces(2, 100 * k + i))
                with lock:
                    answers.append(out)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in range(4):
        mine = sorted(
            (a["version"], a["based_on"]) for a in answers if a["subject"] == f"shared-{s}"
        )
        assert [v for v, _ in mine] == list(range(1, len(mine) + 1))
        assert all(b == v - 1 for v, b in mine)
        assert served.client.versions(f"shared-{s}")["current"] == len(mine)


def test_guard_trips_reach_the_answer_and_the_metrics(tmp_path: Path) -> None:
    """A collapse guard set to trip on any divergence: its recoveries are counted."""
    guard = ttaperso.CollapseGuard(
        window=4, check_every=1, sample=1, min_frames=1, max_divergence=1e-9,
        signals=("divergence",), recover="source",
    )  # fmt: skip
    p = ttaperso.Personalizer(tiny_model(), "tent", guard=guard, **OPTIONS)
    service = SubjectService(p, ttaperso.FolderStore(tmp_path / "s", keep_versions=2))
    app = create_app(service, p.model, TOKEN)
    with ServerThread(app) as url, Client(url, TOKEN) as c:
        trips = sum(c.predict("g", array=faces(2, k))["guard_trips"] for k in range(4))
        text = c.metrics()
    assert trips >= 1
    assert f"\nttaperso_guard_trips_total {float(trips)}" in text
