"""Where the research face sets are, and their label codes (readers: :mod:`ttaperso.streams`).

The sets themselves are never part of the repository: code takes a root folder from the
caller, ``$TTAPERSO_DATA``, or ``../shared/data`` beside a source checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "CKPLUS_EMOTIONS",
    "JAFFE_EXPRESSIONS",
    "YALE_CONDITIONS",
    "YALE_EXPRESSION_CONDITIONS",
    "data_root",
]

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

#: Yale file-name conditions (``subject07.happy``) -> FER2013 label name, or ``None`` for a
#: condition that is not one of the FER2013 expressions (kept, unlabelled; see docs/streams.md)
YALE_CONDITIONS: dict[str, str | None] = {
    "happy": "happy",
    "sad": "sad",
    "surprised": "surprise",
    "normal": "neutral",
    "sleepy": None,
    "wink": None,
    "centerlight": None,
    "leftlight": None,
    "rightlight": None,
    "glasses": None,
    "noglasses": None,
}

#: the Yale conditions that are facial expressions (the rest are capture sessions)
YALE_EXPRESSION_CONDITIONS: tuple[str, ...] = (
    "happy",
    "normal",
    "sad",
    "sleepy",
    "surprised",
    "wink",
)

#: CK+ ``Emotion/<subject>/<sequence>/*_emotion.txt`` codes -> label names (FER2013 names
#: where they exist; CK+'s "contempt" has no FER2013 counterpart)
CKPLUS_EMOTIONS: dict[int, str] = {
    0: "neutral",
    1: "angry",
    2: "contempt",
    3: "disgust",
    4: "fear",
    5: "happy",
    6: "sad",
    7: "surprise",
}


def data_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``explicit``, else ``$TTAPERSO_DATA``, else ``<checkout>/../shared/data``."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("TTAPERSO_DATA")
    if env:
        return Path(env)
    # src/ttaperso/streams/data.py -> the checkout is parents[3], the shared folder beside it
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"
