"""Curated Facial Action Coding System (FACS) Action Units, written out in plain words.

Each entry is ONE Action Unit: its FACS number, its FACS name, and a short description of the
visible change in everyday words (the text CLIP reads). The descriptions are ours, written
from the FACS definitions (Ekman, Friesen & Hager 2002); the released CLIP-AUTT list had a
missing comma that silently merged two prompts, so this list is a tuple of records that the
tests check for duplicates and merged entries.

The list covers every AU used in the prototypes of the basic expressions (happiness 6+12,
sadness 1+4+15, surprise 1+2+5+26, fear 1+2+4+5+7+20+26, anger 4+5+7+23, disgust 9+15+16,
contempt 12+14 unilateral) plus the common lower-face, eye and head-free AUs.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ActionUnit", "ACTION_UNITS", "au_by_id", "BASIC_EXPRESSION_AUS"]


@dataclass(frozen=True)
class ActionUnit:
    """One FACS Action Unit.

    Attributes:
        au: FACS number.
        name: FACS name (e.g. "Inner Brow Raiser").
        description: the visible change in plain words, used as the text prompt.
    """

    au: int
    name: str
    description: str


ACTION_UNITS: tuple[ActionUnit, ...] = (
    ActionUnit(1, "Inner Brow Raiser", "inner ends of the eyebrows raised"),
    ActionUnit(2, "Outer Brow Raiser", "outer ends of the eyebrows raised"),
    ActionUnit(4, "Brow Lowerer", "eyebrows lowered and drawn together"),
    ActionUnit(5, "Upper Lid Raiser", "upper eyelids raised showing more of the eyes"),
    ActionUnit(6, "Cheek Raiser", "cheeks lifted with crow's feet at the eye corners"),
    ActionUnit(7, "Lid Tightener", "eyelids tightened and narrowed"),
    ActionUnit(9, "Nose Wrinkler", "nose wrinkled"),
    ActionUnit(10, "Upper Lip Raiser", "upper lip raised"),
    ActionUnit(11, "Nasolabial Deepener", "furrow between nose and mouth deepened"),
    ActionUnit(12, "Lip Corner Puller", "corners of the mouth pulled up"),
    ActionUnit(13, "Sharp Lip Puller", "cheeks puffed up under sharply raised lip corners"),
    ActionUnit(14, "Dimpler", "dimples formed beside tightened mouth corners"),
    ActionUnit(15, "Lip Corner Depressor", "corners of the mouth pulled down"),
    ActionUnit(16, "Lower Lip Depressor", "lower lip pulled down"),
    ActionUnit(17, "Chin Raiser", "chin pushed upward wrinkling the chin"),
    ActionUnit(18, "Lip Pucker", "lips puckered forward"),
    ActionUnit(20, "Lip Stretcher", "lips stretched sideways"),
    ActionUnit(22, "Lip Funneler", "lips funneled outward"),
    ActionUnit(23, "Lip Tightener", "lips tightened and thinned"),
    ActionUnit(24, "Lip Pressor", "lips pressed firmly together"),
    ActionUnit(25, "Lips Part", "lips parted"),
    ActionUnit(26, "Jaw Drop", "jaw dropped open"),
    ActionUnit(27, "Mouth Stretch", "mouth stretched wide open"),
    ActionUnit(28, "Lip Suck", "lips sucked in over the teeth"),
    ActionUnit(38, "Nostril Dilator", "nostrils flared"),
    ActionUnit(41, "Lid Droop", "upper eyelids drooping"),
    ActionUnit(43, "Eyes Closed", "eyes closed"),
    ActionUnit(44, "Squint", "eyes squinting"),
    ActionUnit(45, "Blink", "eyes blinking"),
)

#: prototype AUs of the basic expressions (EMFACS-style), for documentation and tests
BASIC_EXPRESSION_AUS: dict[str, tuple[int, ...]] = {
    "happy": (6, 12),
    "sad": (1, 4, 15),
    "surprise": (1, 2, 5, 26),
    "fear": (1, 2, 4, 5, 7, 20, 26),
    "angry": (4, 5, 7, 23),
    "disgust": (9, 15, 16),
    "contempt": (12, 14),
}


def au_by_id(au: int) -> ActionUnit:
    """The entry of FACS number ``au`` (``KeyError`` naming the known numbers)."""
    for entry in ACTION_UNITS:
        if entry.au == au:
            return entry
    raise KeyError(f"No Action Unit {au!r} in the list; known: {[e.au for e in ACTION_UNITS]}")
