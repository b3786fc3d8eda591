"""The embedded demo (`ttaperso demo`) on SynthFace and the command line."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

import ttaperso
from ttaperso.cli import main


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One `ttaperso demo --quick` run with an empty cache, shared by the demo tests."""
    root = tmp_path_factory.mktemp("demo")
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TTAPERSO_CACHE", str(root / "cache"))
        capture = io.StringIO()
        with contextlib.redirect_stdout(capture):
            code = main(["-q", "demo", "--quick", "--out", str(out), "--seed", "0"])
    # No wall-time assertion here: timings belong in benchmarks, not unit tests.
    return {"code": code, "out": out, "cache": root / "cache", "stdout": capture.getvalue()}


def test_quick_demo_writes_results(quick_demo: dict, capsys: pytest.CaptureFixture[str]) -> None:
    assert quick_demo["code"] == 0
    out: Path = quick_demo["out"]
    assert (out / "demo_accuracy.png").stat().st_size > 1000
    results = json.loads((out / "demo_results.json").read_text())
    strategies = ttaperso.list_strategies()
    assert results["strategies"] == strategies
    for name in results["accuracy"]:
        row = results["accuracy"][name]
        assert set(row) == set(results["subjects"])
        assert all(0.0 <= acc <= 1.0 for acc in row.values())
        assert 0.0 <= results["mean"][name] <= 1.0
    assert results["worst_change_vs_source"]["source"] == 0.0
    assert results["updated_fraction"]["source"] == 0.0
    # The frozen model learned something: well above chance (1/7) on unseen source subjects.
    # The quick plan's model is weak, and its figure depends on how the machine rounds
    # floats (before float64 training: 0.30 / 0.317 / 0.357 with 1 or 2 threads, AVX-512 or
    # AVX2), so the bar is chance-based. The demo now trains in float64 on one thread on
    # 8-bit frames: identical on AVX2 and AVX-512 (test_training_ignores_the_thread_setting).
    # on another), so the bar is 1.5x chance, not a figure of one machine.
    assert results["source_domain_accuracy"] > 1.5 / 7


def test_quick_demo_table_has_a_row_per_subject_and_every_strategy(quick_demo: dict) -> None:
    results = json.loads((quick_demo["out"] / "demo_results.json").read_text())
    table = quick_demo["stdout"]
    lines = table.splitlines()
    for subject in results["subjects"]:
        assert sum(line.startswith(subject) for line in lines) == 1
    header = lines[0].split()
    for name in ttaperso.list_strategies():
        # a strategy either ran (a column) or is listed as not applicable, with the reason
        assert name in header or any(line.startswith(f"n/a  {name}:") for line in lines)
        assert (name in results["accuracy"]) != (name in results["unavailable"])
    assert f"{ttaperso.DEFAULT_STRATEGY} (1/call)" in results["accuracy"]


def test_quick_demo_caches_weights_as_safetensors(quick_demo: dict) -> None:
    files = list((quick_demo["cache"] / "demo").iterdir())
    assert [f.suffix for f in files] == [".safetensors"]  # no temporary file left behind


def test_demo_reuses_cached_weights(quick_demo: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from ttaperso import demo

    monkeypatch.setenv("TTAPERSO_CACHE", str(quick_demo["cache"]))

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached weights should have been used")

    monkeypatch.setattr(demo, "_train", no_training)
    net, path = demo.source_model(demo.PLANS["quick"], seed=0)
    first = json.loads((quick_demo["out"] / "demo_results.json").read_text())
    assert path == first["model_weights"]
    from safetensors.torch import load_file

    cached = load_file(path)
    assert all(torch.equal(v, cached[k]) for k, v in net.state_dict().items())
    # another seed is another model: not served from this cache entry
    assert demo._cache_key(demo.DemoNet(), demo.PLANS["quick"], 1) != Path(path).stem.split("-")[1]


def test_demo_retrains_over_a_corrupt_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ttaperso import demo

    monkeypatch.setenv("TTAPERSO_CACHE", str(tmp_path))
    model = demo.DemoNet()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not a safetensors file")
    assert demo._load_weights(model, path) is False
    demo._save_weights(model, path, {"k": "v"})
    assert demo._load_weights(demo.DemoNet(), path) is True


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


def test_demo_uar_matches_the_metrics_module() -> None:
    from ttaperso import demo, metrics

    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (200,), generator=gen)  # classes 5 and 6 absent
    pred = torch.where(
        torch.rand(200, generator=gen) < 0.6, target, torch.randint(0, 7, (200,), generator=gen)
    )
    assert demo._uar(pred, target, 7) == pytest.approx(metrics.uar(pred, target, 7))


def test_training_ignores_the_thread_setting_and_ends_in_float32() -> None:
    """One-thread float64 training: the caller's thread count cannot change the weights."""
    from ttaperso import demo

    gen = torch.Generator().manual_seed(0)
    frames = demo.quantize_8bit(torch.rand(96, 1, 32, 32, generator=gen)) * 2 - 1
    labels = torch.randint(0, 7, (96,), generator=gen)
    weights = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(0)
            net = demo.DemoNet()
            demo._train(net, frames, labels, epochs=1, seed=0)
            assert torch.get_num_threads() == n  # restored
            weights.append(net.state_dict())
    finally:
        torch.set_num_threads(threads)
    assert all(v.dtype != torch.float64 for v in weights[0].values())
    assert all(torch.equal(v, weights[1][k]) for k, v in weights[0].items())


def test_demo_seed_must_be_a_non_negative_int(capsys: pytest.CaptureFixture[str]) -> None:
    from ttaperso import demo

    with pytest.raises(ttaperso.ConfigError, match="seed"):
        demo.run_demo("unused", seed=-1)
    assert main(["demo", "--seed", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--seed: expected an integer >= 0, got '-1'" in err and "Traceback" not in err
