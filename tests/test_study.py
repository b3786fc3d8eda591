"""Study runner: config validation, dev-set selection, resumable cell cache, report."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import HEAD, INPUT_SHAPE, LABELS, build_model

from ttaperso.errors import ConfigError
from ttaperso.models import as_fer_model
from ttaperso.streams import SubjectStream
from ttaperso.study import (
    load_study_config,
    parse_study_config,
    register_dataset_kind,
    register_model_kind,
    run_study,
    write_report,
)


def _tiny_streams(spec: Mapping[str, Any]) -> list[SubjectStream]:
    """Shifted noise 'faces' in [0, 1]: per subject a brightness/contrast offset, 2 videos."""
    n, subjects, seed = int(spec.get("frames", 12)), int(spec.get("subjects", 3)), spec["seed"]
    streams = []
    for i in range(subjects):
        g = torch.Generator().manual_seed(1000 * seed + i)
        images = (0.5 + 0.15 * torch.randn((n, *INPUT_SHAPE), generator=g) * (1 + 0.3 * i)).clamp(
            0, 1
        )
        labels = torch.arange(n) % len(LABELS)
        labels[-1] = -1  # one unlabelled frame
        streams.append(
            SubjectStream(
                subject=f"s{i}",
                images=images,
                labels=labels,
                label_names=LABELS,
                sequences=tuple("v0" if t < n // 2 else "v1" for t in range(n)),
                sources=tuple(f"tiny:{i}:{t}" for t in range(n)),
            )
        )
    return streams


register_dataset_kind("tiny-test", _tiny_streams)
register_model_kind(
    "tiny-test",
    lambda spec: as_fer_model(
        build_model(seed=0), labels=LABELS, input_shape=INPUT_SHAPE, head=HEAD, input_range=(0, 1)
    ),
)

STUDY = """
name = "tiny"
seeds = [0, 1]
strategies = ["norm", "tent"]
dev = "devset"
eval = ["evalset"]
select_metric = "accuracy"

[models.tiny]
kind = "tiny-test"
source = "srcset"

[datasets.devset]
kind = "tiny-test"
seed = 1
[datasets.evalset]
kind = "tiny-test"
seed = 2
subjects = 4
[datasets.srcset]
kind = "tiny-test"
seed = 3

[protocols.natural]
order = "natural"
batch_size = 4

[fixed.tent]
gates = []
update_every = 4
[grid.tent]
lr = [1e-3, 1e-2]
[fixed.norm]
gates = []
"""


def _config(tmp_path: Path, overrides: list[str] | None = None):
    path = tmp_path / "tiny.toml"
    path.write_text(STUDY)
    return load_study_config(path, overrides or [])


def test_config_validation_and_overrides(tmp_path: Path) -> None:
    config = _config(tmp_path, ["seeds=[3]", "grid.tent.lr=[0.1, 0.2, 0.3]", "dev=devset"])
    assert config.seeds == (3,)
    assert config.strategies[0] == "source"  # the frozen baseline is always there
    assert [p["lr"] for p in config.grid_points("tent")] == [0.1, 0.2, 0.3]
    assert config.grid_points("tent")[0]["update_every"] == 4
    raw = config.to_dict()
    with pytest.raises(ConfigError, match="no tuning on test data"):
        parse_study_config({**raw, "dev": "evalset"})
    with pytest.raises(ConfigError, match="Unknown strategies"):
        parse_study_config({**raw, "strategies": ["nope"]})
    with pytest.raises(ConfigError, match=r"unknown options \['lrr'\]"):
        parse_study_config({**raw, "grid": {"tent": {"lrr": [1]}}})
    with pytest.raises(ConfigError, match="names no `dev` set"):
        parse_study_config({**raw, "dev": ""})
    with pytest.raises(ConfigError, match="Unknown study keys"):
        parse_study_config({**raw, "sedes": [1]})


def test_selection_on_dev_then_frozen_for_eval(tmp_path: Path) -> None:
    run = run_study(_config(tmp_path), tmp_path / "out", progress=False)
    dev_cells = [c for c, _ in run.cells if c.phase == "dev"]
    eval_cells = [c for c, _ in run.cells if c.phase == "eval"]
    assert {c.dataset for c in dev_cells} == {"devset"} and {c.strategy for c in dev_cells} == {
        "tent"
    }
    assert {c.dataset for c in eval_cells} == {"evalset"}
    (tent_sel,) = [s for s in run.selections if s["strategy"] == "tent"]
    scores = [c["score"] for c in tent_sel["candidates"]]
    best = tent_sel["candidates"][scores.index(max(scores))]["options"]
    assert tent_sel["selected"] == best
    assert {c.options["lr"] for c in eval_cells if c.strategy == "tent"} == {best["lr"]}
    # 2 grid points x 2 seeds on dev + 3 strategies x 2 seeds on eval
    assert run.computed == 4 + 6 and run.loaded == 0


def test_interrupted_study_resumes_without_recomputing(tmp_path: Path) -> None:
    config = _config(tmp_path)
    computed: list[str] = []

    def interrupt_after_three(cell, result, was_computed) -> None:
        if was_computed:
            computed.append(cell.describe())
        if len(computed) == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C after 3 cells

    with pytest.raises(KeyboardInterrupt):
        run_study(config, tmp_path / "out", progress=False, on_cell=interrupt_after_three)
    assert len(list((tmp_path / "out" / "cells").glob("*.json"))) == 3
    first = list(computed)
    recomputed: list[str] = []
    run = run_study(
        config,
        tmp_path / "out",
        progress=False,
        on_cell=lambda c, r, was: recomputed.append(c.describe()) if was else None,
    )
    assert run.loaded == 3 and run.computed == 10 - 3
    assert not set(first) & set(recomputed)  # no finished cell computed twice
    again = run_study(config, tmp_path / "out", progress=False)
    assert again.computed == 0 and again.loaded == 10
    # cached results are the computed ones
    assert [r for _, r in again.cells] == [r for _, r in run.cells]
    # a changed option is a new cell; the others stay cached
    changed = run_study(_config(tmp_path, ["fixed.norm.source_prior=4.0"]), tmp_path / "out")
    assert changed.computed == 2 and changed.loaded == 8


def test_report_files_and_figures(tmp_path: Path) -> None:
    run = run_study(_config(tmp_path), tmp_path / "out", progress=False)
    report = write_report(run, command="ttaperso study tiny.toml")
    text = report.read_text()
    assert "Regenerate: `ttaperso study tiny.toml`" in text
    assert "Selected on the dev set `devset`" in text
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    (table,) = results["tables"]
    rows = table["strategies"]
    assert set(rows) == {"source", "norm", "tent"}
    assert rows["source"]["gain"] == 0.0 and rows["source"]["share_harmed"] == 0.0
    assert rows["source"]["admission_rate"] == 0.0
    assert rows["norm"]["admission_rate"] == 1.0  # no gates: every frame updates
    # 4 subjects x 2 videos, one video-level figure per strategy
    assert rows["norm"]["videos"] == 8 and 0.0 <= rows["norm"]["video_accuracy"] <= 1.0
    # figures recomputed from the raw cell: pooled accuracy of norm over seeds
    accs = []
    for cell, result in run.cells:
        if cell.phase == "eval" and cell.strategy == "norm":
            pairs = [
                (p, t)
                for s in result["subjects"].values()
                for p, t in zip(s["preds"], s["targets"], strict=True)
                if t >= 0
            ]
            accs.append(sum(p == t for p, t in pairs) / len(pairs))
    assert rows["norm"]["accuracy"] == pytest.approx(sum(accs) / len(accs))
    # the cost ratio comes from each cell's own frozen timing, not from another cell
    speeds = [
        r["seconds_frozen"] / r["seconds_in_protocol"]
        for c, r in run.cells
        if c.phase == "eval" and c.strategy == "norm"
    ]
    assert rows["norm"]["speed_vs_frozen"] == pytest.approx(sum(speeds) / len(speeds))
    for name in ("per_subject", "stream", "confusion"):
        png = tmp_path / "out" / f"{name}_tiny_evalset_natural.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png.name})" in text


def test_strategy_that_cannot_build_is_reported_not_applicable(tmp_path: Path) -> None:
    # a config the strategy refuses (negative learning rate): n/a with the reason, the
    # study goes on, the refusal is not cached (it is cheap to redo and may be fixed)
    config = _config(tmp_path, ["grid={}", "dev=''", "fixed.tent.lr=-1.0"])
    run = run_study(config, tmp_path / "out", progress=False)
    tent = [r for c, r in run.cells if c.strategy == "tent"]
    assert tent and all(r["status"] == "n/a" and "lr" in r["reason"] for r in tent)
    assert all(r["status"] == "ok" for c, r in run.cells if c.strategy != "tent")
    report = write_report(run).read_text()
    assert "| tent | n/a:" in report
    assert run_study(config, tmp_path / "out", progress=False).computed == len(tent)


def test_required_source_sample_missing_is_not_applicable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A strategy that requires a source sample, in a study without one: n/a with the reason.

    No shipped strategy requires one today (eata and tta_cap take it optionally), so the
    test registers its own for the duration of the test.
    """
    from dataclasses import dataclass

    from ttaperso.config import StrategyConfig
    from ttaperso.strategies.base import Strategy
    from ttaperso.strategies.registry import _REGISTRY

    @dataclass(frozen=True)
    class NeedsSourceConfig(StrategyConfig):
        strategy_name = "needs_source"

    class NeedsSource(Strategy):
        config_class = NeedsSourceConfig
        uses_source = "required"

    monkeypatch.setitem(_REGISTRY, "needs_source", NeedsSource)
    config = _config(
        tmp_path,
        ["models.tiny.source=''", "grid={}", "dev=''", "strategies=['source', 'needs_source']"],
    )
    run = run_study(config, tmp_path / "out", progress=False)
    refused = [r for c, r in run.cells if c.strategy == "needs_source"]
    assert refused and all(r["status"] == "n/a" and "source" in r["reason"] for r in refused)
    assert all(r["status"] == "ok" for c, r in run.cells if c.strategy == "source")


def test_cli_study_runs_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ttaperso.cli import main

    config = tmp_path / "tiny.toml"
    config.write_text(STUDY)
    out = tmp_path / "cli"
    args = ["study", str(config), "strategies=['norm']", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    assert (out / "report.md").is_file() and (out / "results.json").is_file()
    first = json.loads((out / "results.json").read_text())
    assert first["cells_computed"] == 4 and first["cells_loaded"] == 0
    assert "strategies=" in first["command"]  # the command that regenerates it
    assert main(args) == 0
    second = json.loads((out / "results.json").read_text())
    assert second["cells_computed"] == 0 and second["cells_loaded"] == 4
    assert second["tables"] == first["tables"]
    assert main(["study", str(config), "seeds=oops", "--out", str(out)]) == 1
    assert "seeds" in capsys.readouterr().err
    assert main(["study", "--help"]) == 0
    assert "strategies: " in capsys.readouterr().out


def test_synthface_dataset_kind_clip_videos() -> None:
    pytest.importorskip("ttaperso.synthface")
    from ttaperso.study import load_dataset

    spec = {"kind": "synthface", "subjects": 1, "sessions": 1, "frames_per_clip": [4, 6]}
    (by_session,) = load_dataset("s", spec)
    (by_clip,) = load_dataset("s", {**spec, "video": "clip"})
    assert len(set(by_session.sequences)) == 1
    assert len(set(by_clip.sequences)) == 7  # one clip per expression
    assert torch.equal(by_session.images, by_clip.images)
    with pytest.raises(ConfigError, match="unknown keys"):
        load_dataset("s", {**spec, "subject": 2})
