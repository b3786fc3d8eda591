"""``experiments/attack.py`` (the issue-17 attack round) runs and finds nothing.

The full round (with the SIGKILL trials) is a command: ``python experiments/attack.py``;
here every other attack runs at its quick size, so the command cannot rot unnoticed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "attack.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ttaperso_attack_round", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_attack_round_finds_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    attack = _load()
    names = [
        "audit-processes",
        "audit-verify",
        "state-files",
        "symlinks",
        "stale-writers",
        "collisions",
        "ids",
        "inputs",
    ]
    tallies = attack.run(names, quick=True)
    assert [t.attack for t in tallies] == names
    for t in tallies:
        assert t.trials > 0 and t.faults > 0, t
        assert (t.lost, t.accepted, t.unexpected, t.temp_left) == (0, 0, 0, 0), t
    assert "lost 0  accepted 0" in capsys.readouterr().out
