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
