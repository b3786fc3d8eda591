"""Attack round against the reliability promises (docs/reliability.md), as a tester runs it.

Reruns the attacks of issue 17 against the installed ttaperso on a tiny CPU model and
counts, per attack, the trials run, the faults injected or bad inputs tried, and the
outcomes: **lost** (an acknowledged write or state gone or corrupt), **accepted** (a
hostile file, input or write taken silently), **unexpected** (a raw error instead of a
clear ttaperso one), against **refused** (a clear ttaperso error and nothing changed):

* ``kill``: SIGKILL a process saving 6 subjects (versions kept) at a random moment, then
  check every current and version file, load the folder, save it again (the next open for
  writing) and count the temp files left;
* ``audit-processes``: several processes append to one subject's audit log;
* ``audit-verify``: logs emptied, deleted, cut mid-line, edited, reordered; an empty folder;
  a state saved behind the log's back: ``ttaperso audit verify --states`` must exit 1;
* ``state-files``: edited state files (digest removed, header edited, impossible values
  with recomputed digests, hostile configs, pickles, truncations): ``load`` must refuse;
* ``symlinks``: links planted inside a state or audit folder: nothing followed;
* ``stale-writers``: two Personalizers / two processes holding one subject; two writers
  counting versions; an audited stale overwrite must fail ``audit verify --states``;
* ``collisions``: ids that share a file name under a 4-bit hash must not replace each other;
* ``ids``: odd but valid ids round-trip, hostile ids are refused;
* ``inputs``: frames on the ``meta`` device; calibration and first predictions inside
  ``torch.inference_mode()`` must not poison later calls.

    python experiments/attack.py            # the full round (about 3-4 min on 2 busy cores)
    python experiments/attack.py --quick    # fewer trials (about 40 s)
    python experiments/attack.py --only kill audit-processes

Prints a table and writes ``experiments/results/attack.{json,md}`` (``--quick``:
``attack_quick.*``). Exit code 1 when anything was lost, accepted or unexpected.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import random
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

import ttaperso
import ttaperso.stores.folder as folder_module
from ttaperso.audit import AuditLog, verify
from ttaperso.cli import main as cli_main
from ttaperso.errors import InputError, StaleStateError, StateFileError, TTAPersoError
from ttaperso.stores import FolderStore, state_digest, subject_filename

#: edits a saved state of subject "A" in a folder
Tamper = Callable[[Path, ttaperso.Personalizer], object]
RESULTS = Path(__file__).resolve().parent / "results"
INPUT_SHAPE = (1, 16, 16)
LABELS = ("anger", "happy", "neutral", "sad")
KILL_SUBJECTS = [f"patient-{i:02d}" for i in range(4)] + ["../../etc/passwd", "a/b"]
ODD_IDS = [
    "a/b", "../../etc/passwd", "..", ".", "/abs/path", "C:\\x\\y", "ü/../ß", "李雷", "🙂",
    "x" * 256, " leading space", "trailing space ", "tab\u00a0nbsp", "semi;colon", "quote'\"",
    "p:1", "p,1", "p_1", "P_1", "%2e%2e", "$HOME", "`id`", "*?[]", "CON", "nul.txt", "a..b",
]  # fmt: skip
HOSTILE_IDS: list[Any] = [
    "",
    "x" * 257,
    "nul\x00byte",
    "line\nbreak",
    "\x1b[31m",
    b"bytes",
    17,
    None,
]


# =================================================================== the tiny model
def build_model(seed: int = 0) -> nn.Sequential:
    """The test suite's tiny conv classifier (1x16x16 -> 4 logits), BN fitted on noise."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, len(LABELS)),
    )  # fmt: skip
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        model.train()
        for i in range(8):
            model(frames(16, seed=1000 * seed + i, shift=0.0, scale=1.0))
    return model.eval()


def frames(n: int, seed: int = 0, shift: float = 0.7, scale: float = 1.5) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, *INPUT_SHAPE), generator=generator) * scale + shift


OVERRIDES: dict[str, dict[str, Any]] = {
    "norm": {"gates": ()},
    "tent": {"gates": (), "update_every": 4, "lr": 1e-2},
    "t3a": {"gates": (), "filter_k": 3},
    "tta_cap": {"gates": (), "positive_entropy": 0.995, "negative_entropy": 1.0,
                "calibration_frames": 2},
}  # fmt: skip


def personalizer(strategy: str = "tent", **kw: Any) -> ttaperso.Personalizer:
    options = {**OVERRIDES.get(strategy, {}), **kw}
    if strategy == "tta_cap":
        n = 48
        options["source"] = ttaperso.SourceData(
            frames(n, seed=7, shift=0.0, scale=1.0),
            labels=torch.arange(n) % len(LABELS),
            subjects=[f"src{i % 4}" for i in range(n)],
        )
    return ttaperso.Personalizer(
        build_model(), strategy, labels=LABELS, input_shape=INPUT_SHAPE, head="8", **options
    )


def adapted(strategy: str = "tent", subject: str = "A", **kw: Any) -> ttaperso.Personalizer:
    p = personalizer(strategy, **kw)
    for i in range(3):
        p.predict(frames(4, seed=i), subject)
    return p


# ======================================================================= tallies
@dataclass
class Tally:
    """Counts of one attack."""

    attack: str
    trials: int = 0
    #: faults injected (kills, concurrent writers) or bad inputs tried (files, ids, frames)
    faults: int = 0
    refused: int = 0
    lost: int = 0
    accepted: int = 0
    unexpected: int = 0
    #: temp files of killed writers still there after the next save (kill attack)
    temp_left: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def bad(self, kind: str, what: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.notes) < 12:
            self.notes.append(f"{kind}: {what}")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def cli(*args: str) -> int:
    with quiet():
        return cli_main(list(args))


def attempt(
    tally: Tally,
    what: str,
    call: Callable[[], object],
    refusal: type[BaseException] = TTAPersoError,
) -> bool:
    """Run one hostile call: True when refused with ``refusal``; counts the outcome."""
    tally.faults += 1
    try:
        call()
    except refusal:
        tally.refused += 1
        return True
    except Exception as exc:  # noqa: BLE001 - counting is the point
        tally.bad("unexpected", f"{what}: {type(exc).__name__}: {str(exc)[:80]}")
        return False
    tally.bad("accepted", what)
    return False


# ========================================================================= kill
def _saving_child(folder: str, journal: str, seed: int) -> None:
    torch.set_num_threads(1)
    p = personalizer("tent")
    store = FolderStore(folder, keep_versions=2)
    if any(Path(folder).glob("*.safetensors")):
        try:
            p.load(store)
        except StateFileError:
            os._exit(3)
    rng = random.Random(seed)
    with open(journal, "a", encoding="utf-8") as handle:
        for round_ in range(10_000):
            for subject in KILL_SUBJECTS:
                p.predict(frames(2, seed=rng.randrange(10**6)), subject)
            digests = {s: state_digest(p.state_dict(s)) for s in KILL_SUBJECTS}
            handle.write(json.dumps({"seed": seed, "round": round_, "digests": digests}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            p.save(store)
    os._exit(0)


def _temp_files(folder: Path) -> int:
    return sum(1 for f in folder.rglob("*") if f.name.endswith(".tmp"))


def attack_kill(work: Path, trials: int) -> Tally:
    tally = Tally("kill")
    folder, journal = work / "states", work / "journal.jsonl"
    context = multiprocessing.get_context("fork")
    warm = personalizer("tent")  # the first Adam step imports torch modules lazily (seconds)
    for i in range(4):
        warm.predict(frames(2, seed=i), "warm")
    rng = random.Random(0)
    left_by_kills = 0
    for trial in range(trials):
        child = context.Process(target=_saving_child, args=(str(folder), str(journal), trial))
        child.start()
        time.sleep(rng.uniform(0.1, 1.5))
        if child.pid is not None:
            os.kill(child.pid, signal.SIGKILL)
        child.join(20)
        tally.trials += 1
        tally.faults += 1
        if child.exitcode != -signal.SIGKILL:
            tally.bad("unexpected", f"trial {trial}: child exit {child.exitcode}")
            continue
        written: dict[str, set[str]] = {s: set() for s in KILL_SUBJECTS}
        intents = dict.fromkeys(KILL_SUBJECTS, 0)
        for line in journal.read_text().splitlines() if journal.exists() else []:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # the kill tore the journal's last line
            for s, d in entry["digests"].items():
                written[s].add(d)
                intents[s] += 1
        store = FolderStore(folder, keep_versions=2)
        for s in KILL_SUBJECTS:
            if not (folder / subject_filename(s)).exists():
                if intents[s] >= 2:
                    tally.bad("lost", f"trial {trial}: {s} has no file")
                continue
            try:
                digest = store.digest(s)
                versions = store.versions(s)
            except StateFileError as exc:
                tally.bad("lost", f"trial {trial}: {s} unreadable ({str(exc)[:60]})")
                continue
            if digest not in written[s] or any(v.digest not in written[s] for v in versions):
                tally.bad("lost", f"trial {trial}: {s} holds a state never written")
        if not folder.is_dir():
            continue
        left_by_kills += _temp_files(folder)
        try:
            p = personalizer("tent")
            p.load(store)
            p.save(store)  # the next open for writing: dead writers' temp files go
        except TTAPersoError as exc:
            tally.bad("unexpected", f"trial {trial}: reopen failed: {str(exc)[:80]}")
        leftover = _temp_files(folder)
        if leftover:
            tally.temp_left += leftover
            if len(tally.notes) < 12:
                tally.notes.append(
                    f"trial {trial}: {leftover} temp file(s) left after the next save"
                )
    tally.refused = tally.trials - tally.lost - tally.unexpected
    tally.notes.insert(0, f"temp files present right after the kills: {left_by_kills}")
    return tally


# ============================================================== audit, processes
def _appending_child(folder: str, writer: int, appends: int, results: Any) -> None:
    log = AuditLog(folder)
    done = 0
    error = None
    for k in range(appends):
        try:
            log.append("A", "test", {"writer": writer, "k": k})
            done += 1
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            error = f"{type(exc).__name__}: {str(exc)[:80]}"
            break
    results.put((writer, done, error))


def attack_audit_processes(work: Path, writers: int, appends: int, rounds: int) -> Tally:
    tally = Tally("audit-processes")
    context = multiprocessing.get_context("fork")
    for r in range(rounds):
        folder = work / f"audit{r}"
        results = context.Queue()
        children = [
            context.Process(target=_appending_child, args=(str(folder), w, appends, results))
            for w in range(writers)
        ]
        for child in children:
            child.start()
        got = [results.get(timeout=600) for _ in children]
        for child in children:
            child.join(30)
        tally.trials += 1
        tally.faults += writers * appends
        acked = {(w, k) for w, done, _ in got for k in range(done)}
        found = {(rec["data"]["writer"], rec["data"]["k"]) for rec in AuditLog(folder).records("A")}
        for w, _, error in got:
            if error:
                tally.bad("unexpected", f"round {r} writer {w}: {error}")
        lost = len(acked - found)
        if lost:
            tally.lost += lost
            tally.notes.append(f"round {r}: {lost} acknowledged appends lost")
        (report,) = verify(folder)
        nul = AuditLog(folder).path("A").read_bytes().count(b"\0")
        if not report.ok or nul:
            tally.bad("lost", f"round {r}: verify failed ({report.errors[:1]}), {nul} NUL bytes")
        tally.refused += len(acked & found)
    return tally


# ================================================================= audit verify
def _audited(work: Path) -> tuple[Path, Path]:
    audit, states = work / "audit", work / "states"
    p = adapted("norm", audit=audit)
    p.predict(frames(4, seed=5), "B")
    p.save(states)
    p.predict(frames(4, seed=6), "A")
    p.save(states)
    return audit, states


def attack_audit_verify(work: Path) -> Tally:
    tally = Tally("audit-verify")
    base = work / "base"
    base.mkdir()
    audit, states = _audited(base)
    if cli("audit", "verify", str(audit), "--states", str(states)) != 0:
        tally.bad("unexpected", "an intact folder fails verify")

    def lines(path: Path) -> list[bytes]:
        return path.read_bytes().splitlines(keepends=True)

    def unaudited_save(a: Path, s: Path) -> None:
        q = adapted("norm", subject="A")
        FolderStore(s).write("A", q.state_dict("A"), q.state_metadata())

    log_a = AuditLog(audit).path("A").name
    cases: dict[str, Callable[[Path, Path], object]] = {
        "log emptied": lambda a, s: (a / log_a).write_bytes(b""),
        "log deleted": lambda a, s: (a / log_a).unlink(),
        "log cut mid-line": lambda a, s: (a / log_a).write_bytes((a / log_a).read_bytes()[:-40]),
        "last record removed": lambda a, s: (a / log_a).write_bytes(
            b"".join(lines(a / log_a)[:-1])
        ),
        "record edited": lambda a, s: (a / log_a).write_bytes(
            (a / log_a).read_bytes().replace(b'"frames":', b'"frames":9', 1)
        ),
        "middle record deleted": lambda a, s: (a / log_a).write_bytes(
            b"".join(lines(a / log_a)[:1] + lines(a / log_a)[2:])
        ),
        "records swapped": lambda a, s: (a / log_a).write_bytes(
            b"".join([lines(a / log_a)[1], lines(a / log_a)[0], *lines(a / log_a)[2:]])
        ),
        "garbage line": lambda a, s: (a / log_a).write_bytes(
            b"".join([*lines(a / log_a)[:1], b"not json\n", *lines(a / log_a)[1:]])
        ),
        "NUL block appended": lambda a, s: (a / log_a).write_bytes(
            (a / log_a).read_bytes() + b"\0" * 504 + b"\n"
        ),
        "state saved without the log": unaudited_save,
        "state file replaced by B's": lambda a, s: shutil.copy(
            s / subject_filename("B"), s / subject_filename("A")
        ),
    }
    for name, tamper in cases.items():
        copy = work / re.sub(r"\W+", "_", name)
        shutil.copytree(base, copy)
        tamper(copy / "audit", copy / "states")
        tally.trials += 1
        tally.faults += 1
        code = cli("audit", "verify", str(copy / "audit"), "--states", str(copy / "states"))
        if code == 0:
            # "last record removed" is undetectable from the file alone unless a state
            # (or the printed last hash) pins the tail; here the states pin it.
            tally.bad("accepted", name)
        else:
            tally.refused += 1
    empty = work / "empty"
    empty.mkdir()
    tally.trials += 1
    tally.faults += 1
    if cli("audit", "verify", str(empty)) == 0:
        tally.bad("accepted", "an empty folder verifies")
    else:
        tally.refused += 1
    return tally


# ================================================================== state files
def _edit_header(file: Path, edit: Callable[[dict[str, str], dict[str, Tensor]], object]) -> None:
    with safe_open(str(file), framework="pt") as handle:
        header = dict(handle.metadata() or {})
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    edit(header, tensors)
    save_file(tensors, str(file), metadata=header)


def _reencode(
    folder: Path, p: ttaperso.Personalizer, change: Callable[[dict[str, Tensor]], None]
) -> None:
    """Rewrite "A" with edited tensors and fresh digests: only the values are wrong."""
    tensors = p.state_dict("A")
    change(tensors)
    FolderStore(folder).write("A", tensors, p.state_metadata())


def _set(end: str, value: Any) -> Callable[[dict[str, Tensor]], None]:
    def change(tensors: dict[str, Tensor]) -> None:
        key = next(k for k in tensors if k.endswith(end))
        tensors[key] = torch.full_like(tensors[key], value)

    return change


def _config(**changes: Any) -> Callable[[Path, ttaperso.Personalizer], None]:
    def apply(folder: Path, p: ttaperso.Personalizer) -> None:
        metadata = p.state_metadata()
        metadata["config"] = {**metadata["config"], **changes}
        FolderStore(folder).write("A", p.state_dict("A"), metadata)

    return apply


def attack_state_files(work: Path) -> Tally:
    tally = Tally("state-files")
    file_name = subject_filename("A")

    def digest_bypass(folder: Path, p: ttaperso.Personalizer) -> None:
        def edit(header: dict[str, str], tensors: dict[str, Tensor]) -> None:
            key = next(k for k in tensors if k.endswith("running_mean"))
            tensors[key] = tensors[key] + 1.0
            header.pop("ttaperso.state_digest", None)

        _edit_header(folder / file_name, edit)

    def drop(key: str) -> Callable[[Path, ttaperso.Personalizer], None]:
        return lambda folder, p: _edit_header(folder / file_name, lambda h, t: h.pop(key, None))

    def pickle_file(folder: Path, p: ttaperso.Personalizer) -> None:
        (folder / file_name).write_bytes(pickle.dumps({"weights": [1, 2, 3]}))

    def truncate(folder: Path, p: ttaperso.Personalizer) -> None:
        data = (folder / file_name).read_bytes()
        (folder / file_name).write_bytes(data[: len(data) // 2])

    def random_bytes(folder: Path, p: ttaperso.Personalizer) -> None:
        (folder / file_name).write_bytes(random.Random(0).randbytes(4096))

    def foreign(folder: Path, p: ttaperso.Personalizer) -> None:
        save_file({"x": torch.zeros(2)}, str(folder / file_name))

    def renamed(folder: Path, p: ttaperso.Personalizer) -> None:
        q = adapted("tent", subject="B")
        q.save(folder)
        os.replace(folder / subject_filename("B"), folder / file_name)

    tent_cases: dict[str, Tamper] = {
        "tensor edited, digest key removed": digest_bypass,
        "store version key removed": drop("ttaperso.state_version"),
        "version edited": lambda f, p: _edit_header(
            f / file_name, lambda h, t: h.update({"ttaperso.state_version": "99"})
        ),
        "running_var = -1": lambda f, p: _reencode(f, p, _set("running_var", -1.0)),
        "running_var = 0": lambda f, p: _reencode(f, p, _set("running_var", 0.0)),
        "BN weight = 1e30": lambda f, p: _reencode(f, p, _set("1.weight", 1e30)),
        "BN bias = -1e30": lambda f, p: _reencode(f, p, _set("4.bias", -1e30)),
        "running_mean = NaN": lambda f, p: _reencode(f, p, _set("running_mean", float("nan"))),
        "Adam exp_avg_sq < 0": lambda f, p: _reencode(f, p, _set("exp_avg_sq", -1.0)),
        "Adam step < 0": lambda f, p: _reencode(f, p, _set("weight/step", -3.0)),
        "norm.count < 0": lambda f, p: _reencode(f, p, _set("norm.count", -5.0)),
        "config lr = 1e9": _config(lr=1e9),
        "config lr = -1": _config(lr=-1.0),
        "config unknown key": _config(bogus=1),
        "config smoothing = 0": _config(smoothing=0),
        "pickle payload": pickle_file,
        "truncated to half": truncate,
        "random bytes": random_bytes,
        "foreign safetensors": foreign,
        "another subject's file renamed": renamed,
    }
    t3a_cases: dict[str, Tamper] = {
        "t3a label = 9": lambda f, p: _reencode(f, p, _set("t3a.labels", 9)),
        "t3a entropy < 0": lambda f, p: _reencode(f, p, _set("t3a.entropy", -1.0)),
    }
    guard = ttaperso.CollapseGuard(window=8, min_frames=4)
    guard_cases: dict[str, Tamper] = {
        "guard.pos beyond its window": lambda f, p: _reencode(f, p, _set("guard.pos", 99)),
        "guard.trips < 0": lambda f, p: _reencode(f, p, _set("guard.trips", -1)),
        "guard probabilities > 1": lambda f, p: _reencode(f, p, _set("guard.adapted", 5.0)),
    }
    groups: list[
        tuple[str, dict[str, Callable[[Path, ttaperso.Personalizer], object]], dict[str, Any]]
    ] = [
        ("tent", tent_cases, {}),
        ("t3a", t3a_cases, {}),
        ("tent", guard_cases, {"guard": guard}),
    ]
    for strategy, cases, kw in groups:
        source = adapted(strategy, **kw)
        for name, tamper in cases.items():
            folder = work / re.sub(r"\W+", "_", f"{strategy}_{name}")
            source.save(folder)
            tamper(folder, source)
            tally.trials += 1
            victim = personalizer(strategy, **kw)
            if attempt(tally, name, partial(victim.load, folder), StateFileError):
                if victim.subjects:
                    tally.bad("accepted", f"{name}: refused but a subject was loaded")
    return tally


# ===================================================================== symlinks
def attack_symlinks(work: Path) -> Tally:
    tally = Tally("symlinks")
    p = adapted("norm")
    outside = work / "outside"
    outside.mkdir()
    p.save(outside)
    precious = work / "precious.txt"
    precious.write_text("do not touch\n")

    def untouched() -> bool:
        return precious.read_text() == "do not touch\n" and sorted(
            f.name for f in outside.iterdir()
        ) == [subject_filename("A")]

    def link_version_folder(folder: Path) -> None:
        (folder / ".versions").mkdir()
        (folder / ".versions" / subject_filename("A")[: -len(".safetensors")]).symlink_to(outside)

    cases: list[tuple[str, Callable[[Path], object], Callable[[Path], object]]] = [
        (
            "state file linking outside (load)",
            lambda f: (f / subject_filename("A")).symlink_to(outside / subject_filename("A")),
            lambda f: personalizer("norm").load(f),
        ),
        (
            "state file linking outside (read one)",
            lambda f: (f / subject_filename("A")).symlink_to(outside / subject_filename("A")),
            lambda f: FolderStore(f).read("A"),
        ),
        (
            ".versions linking outside (save)",
            lambda f: (f / ".versions").symlink_to(outside),
            lambda f: p.save(FolderStore(f, keep_versions=3)),
        ),
        (
            "version folder linking outside (save)",
            link_version_folder,
            lambda f: p.save(FolderStore(f, keep_versions=3)),
        ),
        (
            "lock file linking outside (save)",
            lambda f: (f / f".{subject_filename('A')[:-12]}.lock").symlink_to(precious),
            lambda f: p.save(FolderStore(f)),
        ),
        (
            "audit log linking outside (append)",
            lambda f: AuditLog(f).path("A").symlink_to(precious),
            lambda f: AuditLog(f).append("A", "x", {}),
        ),
    ]
    for name, plant, call in cases:
        folder = work / re.sub(r"\W+", "_", name)
        folder.mkdir()
        plant(folder)
        tally.trials += 1
        attempt(tally, name, partial(call, folder), TTAPersoError)
        if not untouched():
            tally.bad("lost", f"{name}: a file outside the folder changed")
            precious.write_text("do not touch\n")
            for extra in outside.iterdir():
                if extra.name != subject_filename("A"):
                    shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
    return tally


# ================================================================ stale writers
def _stale_child(folder: str, ready: Any, go: Any, results: Any) -> None:
    torch.set_num_threads(1)
    p = personalizer("norm")
    p.load(folder)
    ready.set()
    go.wait(60)
    p.predict(frames(2, seed=77), "A")
    try:
        p.save(folder)
        results.put("saved")
    except StaleStateError:
        results.put("refused")
    except Exception as exc:  # noqa: BLE001 - reported
        results.put(f"{type(exc).__name__}: {exc}")


def _counting_child(folder: str, writer: int, writes: int, results: Any) -> None:
    p = personalizer("norm")
    p.predict(frames(2, seed=writer), "A")
    tensors, metadata = p.state_dict("A"), p.state_metadata()
    store = FolderStore(folder, keep_versions=1000)
    for k in range(writes):
        tensors["memory/norm.count"] = torch.tensor(float(1000 * writer + k), dtype=torch.float64)
        results.put(store.write("A", tensors, metadata).version)


class _UnconditionalStore:
    """A store without compare-and-set (a writer from before the contract)."""

    def __init__(self, path: Path) -> None:
        self.inner = FolderStore(path)

    def __repr__(self) -> str:
        return repr(self.inner)

    def write(self, subject: str, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> Any:
        return self.inner.write(subject, tensors, metadata)

    def read(self, subject: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return self.inner.read(subject)

    def subjects(self) -> list[str]:
        return self.inner.subjects()


def attack_stale_writers(work: Path, pairs: int, processes: int, writes: int) -> Tally:
    tally = Tally("stale-writers")
    for trial in range(pairs):  # two Personalizers, one process
        folder = work / f"pair{trial}"
        adapted("norm").save(folder)
        old, new = personalizer("norm"), personalizer("norm")
        old.load(folder)
        new.load(folder)
        new.predict(frames(2, seed=100 + trial), "A")
        new.save(folder)
        old.predict(frames(2, seed=200 + trial), "A")
        tally.trials += 1
        if attempt(tally, f"pair {trial}: stale save", partial(old.save, folder), StaleStateError):
            if FolderStore(folder).digest("A") != state_digest(new.state_dict("A")):
                tally.bad("lost", f"pair {trial}: the newer state was overwritten")
        elif FolderStore(folder).digest("A") != state_digest(new.state_dict("A")):
            tally.lost += 1
    context = multiprocessing.get_context("fork")
    for trial in range(processes):  # a second process holding an older state
        folder = work / f"process{trial}"
        p = adapted("norm")
        p.save(folder)
        ready, go, results = context.Event(), context.Event(), context.Queue()
        child = context.Process(target=_stale_child, args=(str(folder), ready, go, results))
        child.start()
        ready.wait(60)
        p.predict(frames(2, seed=300 + trial), "A")
        p.save(folder)
        go.set()
        outcome = results.get(timeout=60)
        child.join(30)
        tally.trials += 1
        tally.faults += 1
        if outcome == "refused":
            tally.refused += 1
        elif outcome == "saved":
            tally.bad("accepted", f"process {trial}: the stale process overwrote the newer state")
            tally.lost += 1
        else:
            tally.bad("unexpected", f"process {trial}: {outcome}")
    folder = work / "counting"  # two writers, every version number kept
    results = context.Queue()
    children = [
        context.Process(target=_counting_child, args=(str(folder), w, writes, results))
        for w in range(2)
    ]
    for child in children:
        child.start()
    versions = [results.get(timeout=120) for _ in range(2 * writes)]
    for child in children:
        child.join(30)
    tally.trials += 1
    tally.faults += 2 * writes
    missing = 2 * writes - len(set(versions))
    kept = {v.version for v in FolderStore(folder).versions("A")}
    if missing or kept != set(range(1, 2 * writes + 1)):
        tally.lost += max(missing, 2 * writes - len(kept))
        tally.notes.append(
            f"two writers x {writes}: {len(set(versions))} distinct versions, {len(kept)} kept"
        )
    else:
        tally.refused += 1
    folder, audit = work / "audited", work / "audited_log"  # audited stale overwrite
    store: Any = _UnconditionalStore(folder)
    adapted("norm", audit=audit).save(store)
    b, c = personalizer("norm", audit=audit), personalizer("norm", audit=audit)
    b.load(store)
    c.load(store)
    b.predict(frames(2, seed=1), "A")
    b.save(store)
    c.predict(frames(2, seed=2), "A")
    c.save(store)  # unconditional: overwrites b's newer state; verify must notice
    tally.trials += 1
    tally.faults += 1
    if cli("audit", "verify", str(audit), "--states", str(folder)) == 0:
        tally.bad("accepted", "audited stale overwrite passes audit verify --states")
    else:
        tally.refused += 1
    return tally


# =================================================================== collisions
def attack_collisions(work: Path, pairs: int) -> Tally:
    tally = Tally("collisions")
    original = folder_module.subject_filename

    def four_bits(subject: str) -> str:
        slug = re.sub(r"[^A-Za-z0-9_-]+", "_", subject)[:48].strip("_") or "subject"
        return f"{slug}-{hashlib.sha256(subject.encode()).hexdigest()[:1]}.safetensors"

    found: list[tuple[str, str]] = []
    i = 0
    while len(found) < pairs:
        a, b = f"p:{i}", f"p,{i}"
        if four_bits(a) == four_bits(b):
            found.append((a, b))
        i += 1
    folder_module.subject_filename = four_bits  # type: ignore[assignment]
    try:
        for n, (a, b) in enumerate(found):
            folder = work / f"pair{n}"
            p = adapted("norm", subject=a)
            p.save(folder)
            before = (folder / four_bits(a)).read_bytes()
            q = adapted("norm", subject=b)
            tally.trials += 1
            attempt(tally, f"save {b!r} over {a!r}", partial(q.save, folder), StateFileError)
            if (folder / four_bits(a)).read_bytes() != before:
                tally.bad("lost", f"{a!r} replaced by {b!r}")
            attempt(
                tally,
                f"load {b!r} from {a!r}'s file",
                partial(personalizer("norm").load, folder, [b]),
                StateFileError,
            )
    finally:
        folder_module.subject_filename = original  # type: ignore[assignment]
    return tally


# ========================================================================== ids
def attack_ids(work: Path) -> Tally:
    tally = Tally("ids")
    p = personalizer("norm")
    for subject in ODD_IDS:
        p.predict(frames(2, seed=len(subject)), subject)
    p.save(work / "states")
    q = personalizer("norm")
    q.load(work / "states")
    for subject in ODD_IDS:
        tally.trials += 1
        if subject not in q.subjects or state_digest(q.state_dict(subject)) != state_digest(
            p.state_dict(subject)
        ):
            tally.bad("lost", f"{subject[:20]!r} did not round-trip")
    files = [f for f in (work / "states").rglob("*") if f.is_file()]
    if any(f.parent != work / "states" for f in files):
        tally.bad("lost", "a file was written outside the folder")
    for subject in HOSTILE_IDS:
        for name, call in (
            ("predict", lambda s=subject: q.predict(frames(2), s)),
            ("calibrate", lambda s=subject: q.calibrate(s, frames(2))),
            ("load", lambda s=subject: q.load(work / "states", [s])),
        ):
            tally.trials += 1
            attempt(tally, f"{name}({str(subject)[:12]!r})", call, InputError)
    return tally


# ======================================================================= inputs
def attack_inputs(work: Path) -> Tally:
    tally = Tally("inputs")
    meta = torch.empty(2, *INPUT_SHAPE, device="meta")
    for strategy in ("norm", "tent", "tta_cap"):
        p = personalizer(strategy)
        p.predict(frames(2), "A")
        before = state_digest(p.state_dict("A"))
        for name, call in (
            ("predict", lambda p=p: p.predict(meta, "A")),
            ("predict new subject", lambda p=p: p.predict(meta, "new")),
            ("calibrate", lambda p=p: p.calibrate("A", meta)),
            ("predict_many", lambda p=p: p.predict_many({"A": meta})),
        ):
            tally.trials += 1
            attempt(tally, f"{strategy} {name} on meta", call, InputError)
        if state_digest(p.state_dict("A")) != before or p.subjects != ("A",):
            tally.bad("lost", f"{strategy}: a refused meta call changed a state")
        for name, poison in (
            ("calibrate under inference_mode", lambda p=p: p.calibrate("B", frames(4))),
            ("first predict under inference_mode", lambda p=p: p.predict(frames(2), "C")),
        ):
            tally.trials += 1
            tally.faults += 1
            subject = "B" if name.startswith("calibrate") else "C"
            try:
                with torch.inference_mode():
                    poison()
                p.predict(frames(2, seed=9), subject)  # a normal call afterwards
                tally.refused += 1  # nothing poisoned (the call itself is allowed)
            except TTAPersoError:
                tally.refused += 1  # refused cleanly
            except Exception as exc:  # noqa: BLE001
                tally.bad("unexpected", f"{strategy} {name}: {type(exc).__name__}: {str(exc)[:60]}")
    return tally


# ========================================================================= main
def run(only: list[str] | None, quick: bool) -> list[Tally]:
    scale = {
        "kill_trials": 8 if quick else 70,
        "writers": 4,
        "appends": 100 if quick else 1000,
        "append_rounds": 1 if quick else 2,
        "pairs": 3 if quick else 10,
        "processes": 2 if quick else 5,
        "writes": 15,
        "collisions": 4 if quick else 16,
    }
    attacks: dict[str, Callable[[Path], Tally]] = {
        "kill": lambda w: attack_kill(w, scale["kill_trials"]),
        "audit-processes": lambda w: attack_audit_processes(
            w, scale["writers"], scale["appends"], scale["append_rounds"]
        ),
        "audit-verify": attack_audit_verify,
        "state-files": attack_state_files,
        "symlinks": attack_symlinks,
        "stale-writers": lambda w: attack_stale_writers(
            w, scale["pairs"], scale["processes"], scale["writes"]
        ),
        "collisions": lambda w: attack_collisions(w, scale["collisions"]),
        "ids": attack_ids,
        "inputs": attack_inputs,
    }
    unknown = sorted(set(only or []) - set(attacks))
    if unknown:
        raise SystemExit(f"unknown attack(s) {unknown}; known: {', '.join(attacks)}")
    out = []
    for name, attack in attacks.items():
        if only and name not in only:
            continue
        with tempfile.TemporaryDirectory(prefix=f"attack-{name}-") as tmp:
            start = time.perf_counter()
            tally = attack(Path(tmp))
            tally.seconds = round(time.perf_counter() - start, 1)
        print(
            f"{name:16} trials {tally.trials:5}  faults/bad inputs {tally.faults:5}  "
            f"lost {tally.lost}  accepted {tally.accepted}  unexpected {tally.unexpected}  "
            f"temp files left {tally.temp_left}  ({tally.seconds} s)",
            flush=True,
        )
        for note in tally.notes:
            print(f"    {note}")
        out.append(tally)
    return out


def write_results(tallies: list[Tally], path: Path, command: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    totals = {
        k: sum(getattr(t, k) for t in tallies)
        for k in ("trials", "faults", "refused", "lost", "accepted", "unexpected", "temp_left")
    }
    payload = {
        "command": command,
        "ttaperso": ttaperso.__version__,
        "attacks": [asdict(t) for t in tallies],
        "totals": totals,
    }
    path.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    rows = [
        "| attack | trials | faults injected / bad inputs | lost | silently accepted | "
        "unexpected errors | temp files left |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in tallies:
        rows.append(
            f"| {t.attack} | {t.trials} | {t.faults} | {t.lost} | {t.accepted} | "
            f"{t.unexpected} | {t.temp_left} |"
        )
    rows.append(
        f"| **total** | {totals['trials']} | {totals['faults']} | {totals['lost']} | "
        f"{totals['accepted']} | {totals['unexpected']} | {totals['temp_left']} |"
    )
    notes = [f"- {t.attack}: {n}" for t in tallies for n in t.notes]
    text = f"# Attack round\n\n`{command}`\n\n" + "\n".join(rows) + "\n"
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    path.with_suffix(".md").write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials (about 40 s)")
    parser.add_argument("--only", nargs="+", metavar="ATTACK", help="run only these attacks")
    parser.add_argument(
        "--out", type=Path, help="results file stem (default: experiments/results/attack)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    tallies = run(args.only, args.quick)
    command = "python experiments/attack.py" + (" --quick" if args.quick else "")
    if args.only:
        command += " --only " + " ".join(args.only)
    out = args.out or RESULTS / ("attack_quick" if args.quick else "attack")
    write_results(tallies, out, command)
    failed = sum(t.lost + t.accepted + t.unexpected + t.temp_left for t in tallies)
    print(
        f"{'FAILED' if failed else 'ok'}: {failed} lost/accepted/unexpected/left over; "
        f"results in {out}.md"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
