"""The one cache folder for downloaded and converted weights (every adapter and the demo).

Where: ``$TTAPERSO_CACHE`` when set, else ``$XDG_CACHE_HOME/ttaperso`` when that is set,
else ``~/.cache/ttaperso``. Adapters keep their files at the top of it (named after the
package version and the source file's hash, so different sources never collide); the demo
keeps its trained weights in the ``demo`` subfolder. Cached weights are safetensors files:
reading them cannot run code.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

from .errors import ModelInterfaceError
from .io import atomic_write_bytes

__all__ = ["cache_root", "ensure_cache_dir", "load_cached_weights", "save_cached_weights"]


def cache_root() -> Path:
    """The cache folder (not created): ``$TTAPERSO_CACHE``, ``$XDG_CACHE_HOME/ttaperso``,
    or ``~/.cache/ttaperso``."""
    own = os.environ.get("TTAPERSO_CACHE")
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "ttaperso"


def ensure_cache_dir(cache_dir: str | os.PathLike[str] | None = None, *parts: str) -> Path:
    """``cache_dir`` (default :func:`cache_root`) joined with ``parts``, created.

    Raises :class:`~ttaperso.errors.ModelInterfaceError` naming the folder when it cannot
    be created.
    """
    base = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    path = base.joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelInterfaceError(
            f"Cannot create the weights cache folder {str(path)!r}: {exc}. "
            "Pass another cache_dir or set TTAPERSO_CACHE."
        ) from exc
    return path


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


def save_cached_weights(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write converted weights atomically (a crash never leaves a half-written cache file)."""
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors, metadata=metadata))
