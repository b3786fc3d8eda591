"""The build configuration ships every subpackage (a non-editable install has no others)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")


def test_every_subpackage_is_listed_in_pyproject() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    found = {
        ".".join(("ttaperso", *init.parent.relative_to(REPO / "src" / "ttaperso").parts)).rstrip(
            "."
        )
        for init in (REPO / "src" / "ttaperso").rglob("__init__.py")
    }
    found.add("ttaperso.adapters")
    missing = sorted(found - listed)
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {missing}"


def test_adapters_are_a_symlink_in_a_plain_src_layout() -> None:
    """A plain src layout keeps `pip install -e .` a path entry that mypy and IDEs follow."""
    link = REPO / "src" / "ttaperso" / "adapters"
    assert link.is_symlink() and link.resolve() == (REPO / "adapters").resolve()
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["package-dir"] == {"": "src"}


def test_a_built_wheel_ships_the_adapters_and_the_video_package(tmp_path: Path) -> None:
    import subprocess

    pytest.importorskip("wheel", reason="building a wheel needs the `wheel` package (test extra)")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    import zipfile

    (wheel,) = tmp_path.glob("ttaperso-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("adapters/__init__.py", "adapters/fer_weights.py", "video/session.py",
                   "__main__.py", "pixels.py", "py.typed"):  # fmt: skip
        assert f"ttaperso/{module}" in names, module
    assert not any(n.startswith("adapters/") for n in names)  # no top-level `adapters`
