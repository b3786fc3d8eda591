"""``ttaperso study --ray``: the cells as Ray tasks on a local cluster (loopback, 2 CPUs).

Same cache files and the same report (timings aside) as the local run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ttaperso.serve.ray_backend import loopback_ray_env

loopback_ray_env()  # before Ray is imported: loopback only, no usage statistics
ray = pytest.importorskip("ray", reason="study --ray needs Ray (the serve extra)")

from test_study import _config  # noqa: E402  (registers the tiny-test kinds)

from ttaperso.study import run_study, write_report  # noqa: E402
from ttaperso.study.ray_cells import ray_executor  # noqa: E402

_TIMING = {"seconds", "seconds_in_protocol", "seconds_frozen"}


def _strip(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in _TIMING}


@pytest.fixture(scope="module")
def local_ray() -> Any:
    # The tiny-test kinds live in tests/test_study.py: the workers must import it too.
    tests = str(Path(__file__).resolve().parent)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": tests}},
    )
    yield
    ray.shutdown()


def test_ray_cells_match_the_local_run(tmp_path: Path, local_ray: Any) -> None:
    config = _config(tmp_path)
    local = run_study(config, tmp_path / "local", progress=False)
    remote = run_study(config, tmp_path / "ray", progress=False, executor=ray_executor())
    assert remote.computed == local.computed == len(local.cells) and remote.loaded == 0
    assert [c for c, _ in remote.cells] == [c for c, _ in local.cells]
    for (_, a), (_, b) in zip(local.cells, remote.cells, strict=True):
        assert _strip(a) == _strip(b)
    assert remote.selections == local.selections
    names = sorted(p.name for p in (tmp_path / "local" / "cells").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ray" / "cells").iterdir())
    write_report(local, command="local")
    write_report(remote, command="ray")
    a = json.loads((tmp_path / "local" / "results.json").read_text())
    b = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert a["selections"] == b["selections"]
    again = run_study(config, tmp_path / "ray", progress=False, executor=ray_executor())
    assert again.computed == 0 and again.loaded == len(local.cells)  # same cache, resumed
