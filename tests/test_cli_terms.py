"""Command-line errors speak in command-line terms: options and config keys, no tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import ttaperso
from ttaperso.cli import COMMANDS, _in_cli_terms, build_parser, main


def test_study_names_the_config_key_and_override_for_a_missing_dataset_folder(
    tmp_path: Path,
) -> None:
    from ttaperso.study.sources import load_dataset

    with pytest.raises(ttaperso.InputError) as info:
        load_dataset("jaffe", {"kind": "jaffe", "root": str(tmp_path / "nope")})
    message = str(info.value)
    assert "[datasets.jaffe]" in message and "datasets.jaffe.root=PATH" in message
    assert "TTAPERSO_DATA" in message


def test_python_argument_names_become_options() -> None:
    options = {"seed": "--seed", "calibrate_neutral": "--calibrate-neutral"}
    text = "Expected argument `seed` to be an int >= 0; `calibrate_neutral` too"
    assert (
        _in_cli_terms(text, options) == "Expected --seed to be an int >= 0; --calibrate-neutral too"
    )


def test_a_subcommand_from_another_module_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The hook other engineers use for `serve`: append "module:function" to COMMANDS."""
    module = type(sys)("ttaperso_test_plugin")

    def add_parser(sub: object) -> None:
        parser = sub.add_parser("hello", help="say hello")  # type: ignore[attr-defined]
        parser.add_argument("--name", default="world")
        parser.set_defaults(handler=lambda args, argv: print(f"hello {args.name}") or 3)

    module.add_parser = add_parser  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ttaperso_test_plugin", module)
    monkeypatch.setattr("ttaperso.cli.COMMANDS", [*COMMANDS, "ttaperso_test_plugin:add_parser"])
    assert "hello" in build_parser().format_help()
    assert main(["hello", "--name", "ttaperso"]) == 3
    assert capsys.readouterr().out == "hello ttaperso\n"


def test_python_m_ttaperso_runs_the_cli() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ttaperso", "demo", "--seed", "-1"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "--seed: expected an integer >= 0, got '-1'" in proc.stderr
    assert "Traceback" not in proc.stderr
