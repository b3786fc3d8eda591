"""Where the research face sets are, and their label codes (readers come with issue 3).

The sets themselves are never part of the repository: code takes a root folder from the
caller, ``$TTAPERSO_DATA``, or ``../shared/data`` beside a source checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["JAFFE_EXPRESSIONS", "data_root"]

#: JAFFE file-name expression codes (``KA.AN1.39.tiff``) -> FER2013 label names
JAFFE_EXPRESSIONS: dict[str, str] = {
    "AN": "angry",
    "DI": "disgust",
    "FE": "fear",
    "HA": "happy",
    "NE": "neutral",
    "SA": "sad",
    "SU": "surprise",
}


def data_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``explicit``, else ``$TTAPERSO_DATA``, else ``<checkout>/../shared/data``."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("TTAPERSO_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"
