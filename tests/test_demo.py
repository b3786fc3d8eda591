"""The embedded demo (`ttaperso demo`), its toy data and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ttaperso
from ttaperso import toyfaces
from ttaperso.cli import main


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One `ttaperso demo --quick` run with an empty cache, shared by the demo tests."""
    root = tmp_path_factory.mktemp("demo")
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TTAPERSO_CACHE", str(root / "cache"))
        code = main(["-q", "demo", "--quick", "--out", str(out), "--seed", "0"])
    # No wall-time assertion here: timings belong in benchmarks, not unit tests.
    return {"code": code, "out": out, "cache": root / "cache"}


def test_quick_demo_writes_results(quick_demo: dict, capsys: pytest.CaptureFixture[str]) -> None:
    assert quick_demo["code"] == 0
    out: Path = quick_demo["out"]
    assert (out / "demo_accuracy.png").stat().st_size > 1000
    results = json.loads((out / "demo_results.json").read_text())
    strategies = ttaperso.list_strategies()
    assert results["strategies"] == strategies
    for name in strategies:
        row = results["accuracy"][name]
        assert set(row) == set(results["subjects"])
        assert all(0.0 <= acc <= 1.0 for acc in row.values())
        assert 0.0 <= results["mean"][name] <= 1.0
    assert results["worst_change_vs_source"]["source"] == 0.0
    assert results["updated_fraction"]["source"] == 0.0
    # The frozen model learned the task: clearly above chance (0.25) on unseen source subjects.
    assert results["source_domain_accuracy"] > 0.6


def test_quick_demo_caches_weights_as_safetensors(quick_demo: dict) -> None:
    files = list((quick_demo["cache"] / "demo").iterdir())
    assert [f.suffix for f in files] == [".safetensors"]  # no temporary file left behind


def test_demo_reuses_cached_weights(
    quick_demo: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ttaperso import demo

    monkeypatch.setenv("TTAPERSO_CACHE", str(quick_demo["cache"]))

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached weights should have been used")

    monkeypatch.setattr(demo, "_train", no_training)
    first = json.loads((quick_demo["out"] / "demo_results.json").read_text())
    again = demo.run_demo(tmp_path, seed=0, quick=True)
    assert again["accuracy"] == first["accuracy"]  # deterministic given the seed


def test_demo_retrains_over_a_corrupt_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ttaperso import demo

    monkeypatch.setenv("TTAPERSO_CACHE", str(tmp_path))
    model = demo.ToyFERNet()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not a safetensors file")
    assert demo._load_weights(model, path) is False
    demo._save_weights(model, path, {"k": "v"})
    assert demo._load_weights(demo.ToyFERNet(), path) is True


def test_toyfaces_is_deterministic() -> None:
    subject = toyfaces.make_subject(3, 1, shifted=True)
    x1, y1 = toyfaces.make_stream(subject, 50, seed=3)
    x2, y2 = toyfaces.make_stream(toyfaces.make_subject(3, 1, shifted=True), 50, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = toyfaces.make_stream(subject, 50, seed=4)
    assert not torch.equal(x1, x3)
    assert x1.shape == (50, 1, 32, 32) and x1.dtype == torch.float32
    assert float(x1.min()) >= -1.0 and float(x1.max()) <= 1.0
    assert y1.dtype == torch.int64 and set(y1.tolist()) <= set(range(len(toyfaces.CLASSES)))


def test_toyfaces_streams_are_videos() -> None:
    frames, labels = toyfaces.make_stream(toyfaces.make_subject(0, 0, shifted=False), 200, seed=0)
    changes = int((labels[1:] != labels[:-1]).sum())
    assert 1 <= changes <= 200 // 16  # runs of one expression, at least 16 frames long
    # consecutive frames are close; frames of different subjects are not the same images
    assert float((frames[1:] - frames[:-1]).abs().mean()) < 0.2
    frames_b, _, subjects = toyfaces.make_dataset(0, 2, 20)
    assert frames_b.shape == (40, 1, 32, 32) and subjects[0].id != subjects[1].id


def test_toyfaces_rejects_empty_stream() -> None:
    with pytest.raises(ValueError, match="n_frames"):
        toyfaces.make_stream(toyfaces.make_subject(0, 0, shifted=False), 0, seed=0)


def test_cli_strategies_lists_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    for name in ttaperso.list_strategies():
        assert name in out
    assert "lr = " in out and "gates = " in out


def test_cli_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ttaperso.list_models():
        assert name in out


def test_cli_help_lists_strategies_and_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ttaperso.list_strategies() + ttaperso.list_models():
        assert name in out
    assert "demo" in out


@pytest.mark.parametrize("argv", [[], ["nope"], ["demo", "--seed", "x"]])
def test_cli_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_cli_library_error_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ttaperso import demo

    def fail(*args: object, **kwargs: object) -> None:
        raise ttaperso.ConfigError("Unknown strategy 'x'; available: norm")

    monkeypatch.setattr(demo, "run_demo", fail)
    assert main(["demo", "--quick"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "ttaperso: error: Unknown strategy 'x'; available: norm"
