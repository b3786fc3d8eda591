"""The benchmark runs end to end in a tiny configuration (no timing assertions)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import ttaperso
from ttaperso.bench import BenchOptions, evaluate_goals, run_bench, write_results
from ttaperso.bench.memory import _child, resident_bytes
from ttaperso.bench.reference_tent import ReferenceTent
from ttaperso.bench.timing import interleaved_ratios
from ttaperso.cli import main


@pytest.fixture(scope="module")
def quick_result() -> dict:
    opts = BenchOptions.quick_options()
    opts.memory_strategies = []  # the subprocess part is tested in-process below
    return run_bench(opts, log=lambda line: None)


def test_every_registered_strategy_gets_a_row(quick_result: dict) -> None:
    rows = quick_result["throughput"]
    for batch in (1, 4):
        variants = {r["variant"] for r in rows if r["batch"] == batch}
        assert set(ttaperso.list_strategies()) <= variants
    for row in rows:
        if "na" in row:
            assert row["na"]  # a reason, not an empty string
            continue
        assert row["speed"] > 0 and math.isfinite(row["speed"])
        assert row["rounds"] == 2
        assert 0.0 <= row["admitted"] <= 1.0
    by_variant = {(r["variant"], r["batch"]): r for r in rows}
    assert by_variant[("source", 1)]["admitted"] == 0.0
    assert by_variant[("norm", 4)]["admitted"] == 1.0  # norm has no default gate


def test_state_sizes_match_the_personalizer(quick_result: dict) -> None:
    sizes = {r["strategy"]: r for r in quick_result["state_sizes"]}
    # norm on the tiny model: running mean and var of 8 + 16 channels, float32, + a float64 count
    assert sizes["norm"]["adapted_memory_bytes"] == 2 * (8 + 16) * 4 + 8
    assert sizes["source"]["adapted_memory_bytes"] == 0
    # tent fully adapted holds at least parameters, statistics and two Adam moments
    assert sizes["tent"]["adapted_memory_bytes"] >= 4 * 2 * (8 + 16) * 4
    assert sizes["tent"]["adapted_disk_bytes"] > sizes["tent"]["adapted_memory_bytes"]


def test_switching_and_interleaving_rows(quick_result: dict) -> None:
    for row in quick_result["switching"] + quick_result["interleaved"]:
        assert row["strategy"] in ("norm", "tent") and "na" not in row
    assert all(math.isfinite(r["switch_ms"]) for r in quick_result["switching"])
    assert all(r["relative_throughput"] > 0 for r in quick_result["interleaved"])


def test_several_subjects_per_call_rows(quick_result: dict) -> None:
    rows = {r["strategy"]: r for r in quick_result["many_subjects"]}
    assert rows["source"]["shares_model_forward"] and not rows["norm"]["shares_model_forward"]
    for row in rows.values():
        if "na" not in row:
            assert row["many_speed"] > 0 and row["loop_speed"] > 0 and row["subjects"] == 4


def test_reports_are_written(quick_result: dict, tmp_path) -> None:  # type: ignore[no-untyped-def]
    paths = write_results(quick_result, tmp_path, command="pytest")
    md = paths[0].read_text()
    data = json.loads(paths[1].read_text())
    assert "## Throughput relative to the frozen model" in md and "`pytest`" in md
    assert "## Several subjects per call" in md
    assert data["command"] == "pytest" and data["throughput"]
    goals = evaluate_goals(quick_result)
    assert all({"goal", "measured", "met"} <= g.keys() for g in goals)


def test_memory_child_in_process() -> None:
    result = _child("tiny", "tent", [5, 20])
    assert "error" not in result
    assert result["subjects"] == 20
    assert set(result["rss_added"]) == {"5", "20"}
    assert result["state_disk_bytes"] > result["state_memory_bytes"] > 0
    if resident_bytes() is not None:
        assert result["rss_added"]["20"] is not None


def test_reference_tent_adapts_its_own_copy_only() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.LazyLinear(3),
    )
    net(torch.rand(2, 1, 8, 8))
    net.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ref = ReferenceTent(net)
    x = torch.rand(4, 1, 8, 8)
    first = ref.forward_and_adapt(x)
    second = ref.forward_and_adapt(x)
    assert not torch.equal(first, second)  # one step per batch moved the affine parameters
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert net.training is False


def test_interleaved_ratios_counts_rounds() -> None:
    calls = {"base": 0, "a": 0}

    def base() -> None:
        calls["base"] += 1

    def a() -> None:
        calls["a"] += 1

    stats = interleaved_ratios(base, {"a": a}, min_rounds=3, max_rounds=3, budget_s=0.0)
    assert calls == {"base": 3, "a": 3} and len(stats["a"].ratios) == 3


def test_cli_rejects_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--models", "nope"]) == 1
    assert "Unknown benchmark model" in capsys.readouterr().err
    assert main(["bench", "--quick", "--strategies", "nope"]) == 1
    assert main(["bench", "--batches", "0"]) == 2
