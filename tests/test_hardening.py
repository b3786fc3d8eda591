"""Issue 17: the audit trail, state files and the store under many writers and hostile files.

One section per finding of the attack round (items 1-6, 8 and 9; item 7, ``sar`` on long
correlated streams, is issue 15's). Each test reproduces the attack that used to succeed.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import queue
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    INPUT_SHAPE,
    LABELS,
    PersonalizerFactory,
    build_model,
    source_data,
    states_equal,
    target_frames,
)
from safetensors import safe_open
from safetensors.torch import save_file

import ttaperso
import ttaperso.stores.folder as folder_module
from ttaperso.audit import AuditLog, verify, verify_file, verify_states
from ttaperso.cli import main as cli_main
from ttaperso.errors import InputError, StaleStateError, StateFileError
from ttaperso.guards import CollapseGuard
from ttaperso.state_checks import check_state_values
from ttaperso.stores import (
    FORMAT_NAME,
    FORMAT_VERSION,
    FolderStore,
    StateVersion,
    state_digest,
    subject_filename,
)
from ttaperso.stores import fs as store_fs
from ttaperso.stores.codec import DIGEST_KEY, HEADER_DIGEST_KEY, META_KEY, VERSION_KEY

META = {"format": FORMAT_NAME, "version": FORMAT_VERSION}


def _adapted(
    factory: PersonalizerFactory, strategy: str = "tent", **kw: Any
) -> ttaperso.Personalizer:
    p = factory(strategy, **kw)
    for i in range(2):
        p.predict(target_frames(4, seed=i), "A")
    return p


def _edit_header(file: Path, edit: Any) -> None:
    """Rewrite a state file with its header metadata passed through ``edit`` (tensors kept)."""
    with safe_open(str(file), framework="pt") as handle:
        header = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    edit(header)
    save_file(tensors, str(file), metadata=header)


# ===================================================== 1. audit log, many processes
def _appending_child(folder: str, writer: int, appends: int, results: Any) -> None:
    log = AuditLog(folder)
    done = 0
    try:
        for k in range(appends):
            log.append("A", "test", {"writer": writer, "k": k})
            done += 1
        results.put((writer, done, None))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        results.put((writer, done, repr(exc)))


def run_append_race(folder: Path, writers: int, appends: int) -> dict[str, int]:
    """``writers`` processes append ``appends`` records each to one subject's log."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    children = [
        context.Process(target=_appending_child, args=(str(folder), w, appends, results))
        for w in range(writers)
    ]
    for child in children:
        child.start()
    got = [results.get(timeout=120) for _ in children]
    for child in children:
        child.join(30)
    acked = {(w, k) for w, done, _ in got for k in range(done)}
    records = list(AuditLog(folder).records("A"))
    found = {(r["data"]["writer"], r["data"]["k"]) for r in records}
    (report,) = verify(folder)
    return {
        "acked": len(acked),
        "records": len(records),
        "lost": len(acked - found),
        "errors": sum(err is not None for _, _, err in got),
        "verify_failed": int(not report.ok),
        "nul_bytes": AuditLog(folder).path("A").read_bytes().count(b"\0"),
    }


def test_audit_log_loses_nothing_under_several_processes(tmp_path: Path) -> None:
    counts = run_append_race(tmp_path / "audit", writers=4, appends=150)
    assert counts == {
        "acked": 600,
        "records": 600,
        "lost": 0,
        "errors": 0,
        "verify_failed": 0,
        "nul_bytes": 0,
    }


def test_a_damaged_audit_log_refuses_the_save_before_any_write(
    personalizer_factory: PersonalizerFactory, tmp_path: Path
) -> None:
    p = _adapted(personalizer_factory, audit=tmp_path / "audit")
    p.save(tmp_path / "states")
    log = AuditLog(tmp_path / "audit").path("A")
    log.write_bytes(log.read_bytes() + b"\0" * 504 + b"\n")  # the NUL block of the report
    p.predict(target_frames(4, seed=9), "A")
    before = (tmp_path / "states" / subject_filename("A")).read_bytes()
    with pytest.raises(StateFileError, match="last audit record unreadable.*audit verify"):
        p.save(tmp_path / "states")
    assert (tmp_path / "states" / subject_filename("A")).read_bytes() == before


# ================================================================ 2. audit verify
def _audited_folder(factory: PersonalizerFactory, tmp_path: Path) -> tuple[Path, Path]:
    p = _adapted(factory, audit=tmp_path / "audit")
    p.predict(target_frames(4, seed=3), "B")
    p.save(tmp_path / "states")
    p.save(tmp_path / "states")
    return tmp_path / "audit", tmp_path / "states"


@pytest.mark.parametrize("attack", ["emptied", "deleted", "cut_mid_line"])
def test_verify_fails_on_a_gutted_log(
    personalizer_factory: PersonalizerFactory,
    tmp_path: Path,
    attack: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    audit, states = _audited_folder(personalizer_factory, tmp_path)
    args = ["audit", "verify", str(audit), "--states", str(states)]
    assert cli_main(args) == 0
    log = AuditLog(audit).path("A")
    if attack == "emptied":
        log.write_bytes(b"")
    elif attack == "deleted":
        log.unlink()
    else:
        data = log.read_bytes()
        log.write_bytes(data[: len(data) - 40])  # the last record loses its end
    capsys.readouterr()
    assert cli_main(args) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "'B'" in out
    expected = {
        "emptied": "empty log",
        "deleted": "no audit records for this subject",
        "cut_mid_line": "last line is incomplete",
    }[attack]
    assert expected in out


def test_verify_exits_non_zero_with_nothing_to_verify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "audit").mkdir()
    assert cli_main(["audit", "verify", str(tmp_path / "audit")]) == 1
    err = capsys.readouterr().err
    assert "nothing to verify" in err and "--allow-empty" in err
    assert cli_main(["audit", "verify", str(tmp_path / "audit"), "--allow-empty"]) == 0
    assert cli_main(["audit", "verify", str(tmp_path / "missing")]) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_verify_states_api_checks_every_state(
    personalizer_factory: PersonalizerFactory, tmp_path: Path
) -> None:
    audit, states = _audited_folder(personalizer_factory, tmp_path)
    unaudited = _adapted(personalizer_factory)
    FolderStore(states).write("C", unaudited.state_dict("A"), unaudited.state_metadata())
    checks = {c.subject: c for c in verify_states(audit, states)}
    assert checks["A"].ok and checks["B"].ok and checks["A"].version == 2
    assert not checks["C"].ok and "no audit records" in checks["C"].errors[0]


# ======================================================= 3. state-file integrity
@pytest.mark.parametrize("key", [DIGEST_KEY, VERSION_KEY, HEADER_DIGEST_KEY])
def test_every_header_key_is_required(
    personalizer_factory: PersonalizerFactory, tmp_path: Path, key: str
) -> None:
    _adapted(personalizer_factory).save(tmp_path)
    _edit_header(tmp_path / subject_filename("A"), lambda h: h.pop(key))
    with pytest.raises(StateFileError, match=rf"header lacks \['{key}'\]"):
        personalizer_factory("tent").load(tmp_path)


def test_edited_tensor_with_its_digest_removed_is_refused(
    personalizer_factory: PersonalizerFactory, tmp_path: Path
) -> None:
    """The report's bypass: edit a tensor, drop the digest key; it used to load."""
    _adapted(personalizer_factory).save(tmp_path)
    file = tmp_path / subject_filename("A")
    with safe_open(str(file), framework="pt") as handle:
        header = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    key = next(k for k in tensors if k.endswith("running_mean"))
    tensors[key] = tensors[key] + 1.0
    del header[DIGEST_KEY]
    save_file(tensors, str(file), metadata=header)
    with pytest.raises(StateFileError, match="header lacks"):
        personalizer_factory("tent").load(tmp_path)


def test_edited_header_is_refused(
    personalizer_factory: PersonalizerFactory, tmp_path: Path
) -> None:
    _adapted(personalizer_factory).save(tmp_path)
    file = tmp_path / subject_filename("A")
    _edit_header(file, lambda h: h.update({VERSION_KEY: "41"}))
    with pytest.raises(StateFileError, match="header was edited"):
        FolderStore(tmp_path).read("A")


def test_format_version_1_is_refused_by_name(
    personalizer_factory: PersonalizerFactory, tmp_path: Path
) -> None:
    _adapted(personalizer_factory).save(tmp_path)

    def to_v1(header: dict[str, str]) -> None:
        meta = json.loads(header[META_KEY])
        meta["version"] = 1
        header[META_KEY] = json.dumps(meta, sort_keys=True)

    _edit_header(tmp_path / subject_filename("A"), to_v1)
    with pytest.raises(StateFileError, match="format version 1 files are not read"):
        personalizer_factory("tent").load(tmp_path)


def _with_tensor(p: ttaperso.Personalizer, key_end: str, value: Any) -> dict[str, torch.Tensor]:
    tensors = p.state_dict("A")
    key = next(k for k in tensors if k.endswith(key_end))
    tensors[key] = (
        torch.full_like(tensors[key], value) if not callable(value) else value(tensors[key])
    )
    return tensors


@pytest.mark.parametrize(
    ("strategy", "key_end", "value", "pattern"),
    [
        (
            "tent",
            "running_var",
            -1.0,
            r"running_var holds a variance of -1, expected variances > 0",
        ),
        ("tent", "running_var", 0.0, r"running_var holds a variance of 0"),
        ("tent", "1.weight", 1e30, r"params/network\.1\.weight holds values in \[1e\+30"),
        ("tent", "exp_avg_sq", -1e-3, r"exp_avg_sq holds a squared sum of -0\.001"),
        ("tent", "norm.count", -5.0, r"memory/norm\.count holds a count of -5"),
        ("tent", "running_mean", math.inf, r"running_mean holds (NaN|non-finite)"),
        ("t3a", "t3a.labels", 7, r"memory/t3a\.labels (holds class indices|outside)"),
        ("eata", "eata.mean_probs", 3.0, r"mean_probs holds probabilities"),
        ("eata", "eata.selected", -2, r"memory/eata\.selected holds a count of -2"),
    ],
)
def test_impossible_values_are_refused_naming_the_tensor(
    personalizer_factory: PersonalizerFactory,
    tmp_path: Path,
    strategy: str,
    key_end: str,
    value: Any,
    pattern: str,
) -> None:
    kw: dict[str, Any] = {"source": source_data()} if strategy == "eata" else {}
    p = _adapted(personalizer_factory, strategy, **kw)
    tensors = _with_tensor(p, key_end, value)
    # The attacker recomputes the digests (FolderStore.write does): only the values are wrong.
    FolderStore(tmp_path).write("A", tensors, p.state_metadata())
    q = personalizer_factory(strategy, **kw)
    with pytest.raises(StateFileError, match=pattern):
        q.load(tmp_path)
    assert q.subjects == ()


def test_guard_window_position_is_checked(
    personalizer_factory: PersonalizerFactory, tmp_path: Path
) -> None:
    guard = CollapseGuard(window=8, min_frames=4)
    p = _adapted(personalizer_factory, guard=guard)
    FolderStore(tmp_path).write("A", _with_tensor(p, "guard.pos", 8), p.state_metadata())
    with pytest.raises(
        StateFileError, match=r"memory/guard\.pos holds 8, expected a position in \[0, 7\]"
    ):
        personalizer_factory("tent", guard=guard).load(tmp_path)


def test_value_checks_accept_every_real_state(personalizer_factory: PersonalizerFactory) -> None:
    """No false refusals: every strategy's adapted and calibrated state passes."""
    for strategy in ttaperso.list_strategies():
        kw: dict[str, Any] = {"source": source_data()} if strategy in ("eata", "tta_cap") else {}
        try:
            p = personalizer_factory(strategy, guard=CollapseGuard(window=8, min_frames=4), **kw)
        except (ttaperso.ModelInterfaceError, ttaperso.ConfigError):
            continue  # a CLIP-only strategy
        for i in range(6):
            p.predict(target_frames(2, seed=i), "A")
        p.calibrate("A", target_frames(4))
        check_state_values(
            p.state_dict("A"),
            where=strategy,
            num_classes=len(LABELS),
            reference=p.strategy.initial_state().flat(),
        )


def test_value_bound_follows_the_source_model() -> None:
    reference = {"params/w": torch.tensor([5e4])}
    check_state_values(
        {"params/w": torch.tensor([4e7])}, where="x", num_classes=4, reference=reference
    )
    with pytest.raises(StateFileError, match=r"\|value\| <= 5e\+07"):
        check_state_values(
            {"params/w": torch.tensor([6e7])}, where="x", num_classes=4, reference=reference
        )


# --------------------------------------------------------------------- symlinks
def test_a_state_file_linking_outside_is_refused(
    personalizer_factory: PersonalizerFactory, tmp_path: Path
) -> None:
    p = _adapted(personalizer_factory)
    p.save(tmp_path / "outside")
    folder = tmp_path / "states"
    folder.mkdir()
    (folder / subject_filename("A")).symlink_to(tmp_path / "outside" / subject_filename("A"))
    q = personalizer_factory("tent")
    for call in (lambda: q.load(folder), lambda: q.load(folder, ["A"])):
        with pytest.raises(StateFileError, match="is a symbolic link; ttaperso does not follow"):
            call()
    with pytest.raises(StateFileError, match="symbolic link"):
        FolderStore(folder).write("A", p.state_dict("A"), p.state_metadata())
    assert q.subjects == ()


def test_a_linked_versions_folder_receives_no_write(
    personalizer_factory: PersonalizerFactory, tmp_path: Path
) -> None:
    p = _adapted(personalizer_factory)
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = tmp_path / "states"
    folder.mkdir()
    (folder / ".versions").symlink_to(outside)
    with pytest.raises(StateFileError, match=r"\.versions: is a symbolic link"):
        p.save(FolderStore(folder, keep_versions=3))
    assert list(outside.iterdir()) == []
    (folder / ".versions").unlink()
    (folder / ".versions").mkdir()
    stem = subject_filename("A")[: -len(".safetensors")]
    (folder / ".versions" / stem).symlink_to(outside)
    with pytest.raises(StateFileError, match="is a symbolic link"):
        p.save(FolderStore(folder, keep_versions=3))
    assert list(outside.iterdir()) == []
    assert not (folder / subject_filename("A")).exists()


def test_a_linked_audit_log_is_not_written_through(
    personalizer_factory: PersonalizerFactory, tmp_path: Path
) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("do not touch\n")
    audit = tmp_path / "audit"
    audit.mkdir()
    AuditLog(audit).path("A").symlink_to(target)
    p = personalizer_factory("tent", audit=audit)
    p.predict(target_frames(2), "A")
    with pytest.raises(StateFileError, match="is a symbolic link"):
        p.save(tmp_path / "states")
    assert not (tmp_path / "states" / subject_filename("A")).exists()  # refused before writing
    with pytest.raises(StateFileError, match="is a symbolic link"):
        AuditLog(audit).append("A", "x", {})
    assert target.read_text() == "do not touch\n"
    (report,) = verify(audit)
    assert not report.ok and "symbolic link" in report.errors[0]


def test_a_linked_lock_file_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "states"
    folder.mkdir()
    stem = subject_filename("A")[: -len(".safetensors")]
    (folder / f".{stem}.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StateFileError, match="symbolic link"):
        FolderStore(folder).write("A", {"memory/x": torch.zeros(1)}, META)
    assert not (tmp_path / "elsewhere").exists()


# ================================================================ 4. stale writers
def test_a_stale_personalizer_is_refused_and_changes_nothing(
    personalizer_factory: PersonalizerFactory, tmp_path: Path
) -> None:
    store = FolderStore(tmp_path, keep_versions=5)
    first = _adapted(personalizer_factory)
    first.save(store)
    old, new = personalizer_factory("tent"), personalizer_factory("tent")
    old.load(store)
    new.load(store)
    new.predict(target_frames(4, seed=5), "A")
    new.save(store)  # version 2
    old.predict(target_frames(4, seed=6), "A")
    old.predict(target_frames(4, seed=7), "B")
    held = old.state_dict("A")
    with pytest.raises(
        StaleStateError, match=r"Not saved: \['A'\].*version 2.*expected version 1"
    ) as info:
        old.save(store)
    assert "p.load(store, ['A'])" in str(info.value) and "p.reset('A')" in str(info.value)
    assert "Saved: ['B']" in str(info.value)  # the other subject was saved
    assert store.digest("A") == state_digest(new.state_dict("A"))  # the newer state stays
    assert states_equal(old.state_dict("A"), held)  # and the refused one in memory too
    with pytest.raises(StaleStateError):
        old.save(store, ["A"])  # still stale: nothing was forgotten
    old.load(store, ["A"])
    old.predict(target_frames(4, seed=8), "A")
    assert old.save(store, ["A"]) == ["A"]
    assert [v.version for v in store.versions("A")] == [1, 2, 3]


def test_a_fresh_personalizer_cannot_overwrite_a_stored_subject(
    personalizer_factory: PersonalizerFactory, tmp_path: Path
) -> None:
    _adapted(personalizer_factory).save(tmp_path)
    fresh = _adapted(personalizer_factory)
    with pytest.raises(StaleStateError, match="expected version 0"):
        fresh.save(tmp_path)
    fresh.reset("A")  # drops this copy: nothing left to save
    assert fresh.save(tmp_path) == []


def test_reset_then_save_replaces_the_loaded_state(
    personalizer_factory: PersonalizerFactory, tmp_path: Path
) -> None:
    _adapted(personalizer_factory).save(tmp_path)
    p = personalizer_factory("tent")
    p.load(tmp_path)
    p.reset("A")
    p.predict(target_frames(2), "A")
    assert p.save(tmp_path) == ["A"]  # a deliberate successor of the version it loaded
    assert FolderStore(tmp_path).current("A").version == 2


def _stale_child(folder: str, ready: Any, go: Any, results: Any) -> None:
    """Load the folder, wait while the parent saves a newer state, then save."""
    p = ttaperso.Personalizer(
        build_model(), "norm", labels=LABELS, input_shape=INPUT_SHAPE, gates=()
    )
    p.load(folder)
    ready.set()
    go.wait(30)
    p.predict(target_frames(2, seed=77), "A")
    try:
        p.save(folder)
        results.put("saved")
    except StaleStateError as exc:
        results.put(f"refused: {exc}")


def test_a_stale_process_is_refused(
    personalizer_factory: PersonalizerFactory, tmp_path: Path
) -> None:
    p = personalizer_factory("norm")
    p.predict(target_frames(2), "A")
    p.save(tmp_path)
    context = multiprocessing.get_context("fork")
    ready, go, results = context.Event(), context.Event(), context.Queue()
    child = context.Process(target=_stale_child, args=(str(tmp_path), ready, go, results))
    child.start()
    try:
        assert ready.wait(30)
        p.predict(target_frames(2, seed=5), "A")
        p.save(tmp_path)  # newer than what the child holds
        go.set()
        outcome = results.get(timeout=30)
    finally:
        child.join(30)
    assert outcome.startswith("refused: Not saved: ['A']")
    assert FolderStore(tmp_path).digest("A") == state_digest(p.state_dict("A"))


class _LegacyStore:
    """A store written before the contract: ``write`` has no ``expected_version``."""

    def __init__(self, path: Path) -> None:
        self.inner = FolderStore(path)

    def __repr__(self) -> str:
        return repr(self.inner)

    def write(
        self, subject: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]
    ) -> StateVersion:
        return self.inner.write(subject, tensors, metadata)

    def read(self, subject: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return self.inner.read(subject)

    def subjects(self) -> list[str]:
        return self.inner.subjects()


def test_verify_detects_an_audited_stale_writer(
    personalizer_factory: PersonalizerFactory, tmp_path: Path
) -> None:
    """Both writers audited, the store unconditional: the log itself shows the overwrite."""
    store = _LegacyStore(tmp_path / "states")
    audit = tmp_path / "audit"
    a = _adapted(personalizer_factory, audit=audit)
    a.save(store)
    b = personalizer_factory("tent", audit=audit)
    b.load(store)
    c = personalizer_factory("tent", audit=audit)
    c.load(store)
    b.predict(target_frames(2, seed=1), "A")
    b.save(store)  # version 2, from 1
    c.predict(target_frames(2, seed=2), "A")
    c.save(store)  # version 3, from 1: overwrote b's newer state
    (report,) = verify(audit)
    assert not report.ok
    assert "made from version 1, but the last recorded write" in report.errors[0]
    assert cli_main(["audit", "verify", str(audit), "--states", str(tmp_path / "states")]) == 1


def test_versions_are_counted_without_version_files(tmp_path: Path) -> None:
    store = FolderStore(tmp_path)  # keep_versions=0
    got = [store.write("A", {"memory/x": torch.tensor([float(i)])}, META) for i in range(3)]
    assert [v.version for v in got] == [1, 2, 3]
    assert [v.version for v in store.versions("A")] == [3]
    assert not (tmp_path / ".versions").exists()
    with pytest.raises(StaleStateError):
        store.write("A", {"memory/x": torch.zeros(1)}, {}, expected_version=2)


def _counting_child(folder: str, writer: int, writes: int, results: Any) -> None:
    store = FolderStore(folder)
    for k in range(writes):
        results.put(
            store.write("A", {"memory/x": torch.tensor([float(100 * writer + k)])}, META).version
        )


def test_two_processes_lose_no_version_without_version_files(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    children = [
        context.Process(target=_counting_child, args=(str(tmp_path), w, 15, results))
        for w in range(2)
    ]
    for child in children:
        child.start()
    versions = []
    try:
        for _ in range(30):
            versions.append(results.get(timeout=60))
    except queue.Empty:
        pass
    for child in children:
        child.join(30)
    assert sorted(versions) == list(range(1, 31))
    assert FolderStore(tmp_path).current("A").version == 30


# ==================================================================== 5. temp files
def test_leftover_temp_files_are_removed_on_the_next_write(tmp_path: Path) -> None:
    store = FolderStore(tmp_path, keep_versions=2)
    store.write("A", {"memory/x": torch.zeros(1)}, META)
    store.write("B", {"memory/x": torch.zeros(1)}, META)
    stem_a = subject_filename("A")[: -len(".safetensors")]
    stem_b = subject_filename("B")[: -len(".safetensors")]
    # What a writer killed between its temp file and its rename leaves behind.
    root_temp = tmp_path / f".{subject_filename('A')}.dead00.tmp"
    version_temp = tmp_path / ".versions" / stem_a / ".0000000003.safetensors.dead01.tmp"
    stale_lock = tmp_path / f".{stem_a}.lock"
    for leftover in (root_temp, version_temp, stale_lock):
        leftover.write_bytes(b"partial")
    live_temp = tmp_path / f".{subject_filename('B')}.live00.tmp"
    live_temp.write_bytes(b"being written")
    root = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # A live writer of B holds B's lock: its temp file must survive the sweep.
        with store_fs.locked(root, f".{stem_b}.lock", tmp_path / "lock") as held:
            assert held
            FolderStore(tmp_path, keep_versions=2).write("C", {"memory/x": torch.zeros(1)}, META)
            assert live_temp.exists()
    finally:
        os.close(root)
    assert not root_temp.exists() and not stale_lock.exists()
    assert version_temp.exists()  # A's version folder is cleaned when A is next written
    FolderStore(tmp_path, keep_versions=2).write("A", {"memory/x": torch.ones(1)}, META)
    assert not version_temp.exists()
    FolderStore(tmp_path).write("D", {"memory/x": torch.zeros(1)}, META)
    assert not live_temp.exists()  # its writer is gone now
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".lock"))]
    assert leftovers == []


# ============================================================ 6. id collisions
def test_colliding_ids_never_replace_each_other(
    personalizer_factory: PersonalizerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(folder_module, "_id_hash", lambda subject: "0")  # 4 bits -> 1 value
    assert subject_filename("p:1") == subject_filename("p,1")
    audit = tmp_path / "audit"
    p = personalizer_factory("norm", audit=audit)
    p.predict(target_frames(2), "p:1")
    p.save(tmp_path / "states")
    before = (tmp_path / "states" / subject_filename("p:1")).read_bytes()
    q = personalizer_factory("norm")
    q.predict(target_frames(2, seed=3), "p,1")
    with pytest.raises(StateFileError, match=r"holds subject 'p:1', not 'p,1'"):
        q.save(tmp_path / "states")
    assert (tmp_path / "states" / subject_filename("p,1")).read_bytes() == before
    with pytest.raises(StateFileError, match=r"holds subject 'p:1', not 'p,1'"):
        q.load(tmp_path / "states", ["p,1"])
    with pytest.raises(StateFileError, match=r"log of subject 'p:1', not 'p,1'"):
        AuditLog(audit).append("p,1", "x", {})


# ================================================================= 8. meta tensors
@pytest.mark.parametrize("strategy", ["norm", "tent", "tta_cap"])
def test_meta_device_frames_are_an_input_error(
    personalizer_factory: PersonalizerFactory, strategy: str
) -> None:
    kw: dict[str, Any] = {"source": source_data()} if strategy == "tta_cap" else {}
    p = personalizer_factory(strategy, **kw)
    p.predict(target_frames(2), "A")
    before = p.state_dict("A")
    meta = torch.empty(2, *INPUT_SHAPE, device="meta")
    for call in (
        lambda: p.predict(meta, "A"),
        lambda: p.predict(meta, "new"),
        lambda: p.calibrate("A", meta),
        lambda: p.predict_many({"A": meta}),
    ):
        with pytest.raises(InputError, match="'meta' device"):
            call()
    assert states_equal(p.state_dict("A"), before) and p.subjects == ("A",)


# ============================================================ 9. config in a file
def _with_config(folder: Path, **changes: Any) -> None:
    """Re-encode "A" with config changes (digests recomputed, as an attacker's codec would)."""
    tensors, metadata = FolderStore(folder).read("A")
    metadata = {**metadata, "config": {**metadata["config"], **changes}}
    FolderStore(folder).write("A", tensors, metadata)


def test_a_state_with_another_config_is_refused_by_default(
    personalizer_factory: PersonalizerFactory, tmp_path: Path
) -> None:
    p = _adapted(personalizer_factory)
    p.save(tmp_path)
    _with_config(tmp_path, lr=1e9)
    q = personalizer_factory("tent", audit=tmp_path / "audit")
    with pytest.raises(
        StateFileError,
        match=r"another tent config \(lr: saved 1000000000\.0, this Personalizer 0\.01\)",
    ):
        q.load(tmp_path)
    assert q.subjects == ()
    assert q.load(tmp_path, allow_config_change=True) == ["A"]
    assert q.config.lr == 0.01  # continues with the Personalizer's config
    (record,) = [r for r in AuditLog(tmp_path / "audit").records("A") if r["event"] == "load"]
    assert record["data"]["config_changed"] == {"lr": [1e9, 0.01]}


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"lr": -1.0}, r"unreadable strategy config .*`lr`"),
        ({"lr": "fast"}, r"unreadable strategy config .*`lr`"),
        ({"bogus": 1}, r"unreadable strategy config .*Unknown config key\(s\) \['bogus'\]"),
        ({"update_every": 0}, r"unreadable strategy config .*`update_every`"),
    ],
)
def test_an_invalid_config_in_a_file_is_refused_like_a_constructor_argument(
    personalizer_factory: PersonalizerFactory, tmp_path: Path, changes: dict[str, Any], pattern: str
) -> None:
    _adapted(personalizer_factory).save(tmp_path)
    _with_config(tmp_path, **changes)
    for allow in (False, True):
        with pytest.raises(StateFileError, match=pattern):
            personalizer_factory("tent").load(tmp_path, allow_config_change=allow)


def test_a_state_without_a_config_is_refused(
    personalizer_factory: PersonalizerFactory, tmp_path: Path
) -> None:
    p = _adapted(personalizer_factory)
    metadata = {k: v for k, v in p.state_metadata().items() if k != "config"}
    FolderStore(tmp_path).write("A", p.state_dict("A"), metadata)
    with pytest.raises(StateFileError, match="no strategy config"):
        personalizer_factory("tent").load(tmp_path)


def test_verify_file_accepts_old_records_without_versions(tmp_path: Path) -> None:
    """Logs written before issue 17 (no from_version) still verify."""
    log = AuditLog(tmp_path)
    log.append("A", "save", {"store": "FolderStore('/x')", "state_digest": "d1", "version": None})
    log.append("A", "save", {"store": "FolderStore('/x')", "state_digest": "d2", "version": None})
    assert verify_file(log.path("A")).ok
