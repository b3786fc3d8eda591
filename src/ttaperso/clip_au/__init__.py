"""CLIP-AU: expression recognition from CLIP's similarity to Action-Unit descriptions.

* :mod:`.aus` the curated FACS Action-Unit descriptions;
* :mod:`.model` :class:`CLIPAUModel` (AU activations -> causal temporal head);
* :mod:`.train` training on labelled :class:`~ttaperso.streams.SubjectStream` s
  (``python -m ttaperso.clip_au.train --help``).

The test-time tuning of the AU prompts per subject is the ``clip_autt`` strategy.
"""

from __future__ import annotations

from .aus import ACTION_UNITS, BASIC_EXPRESSION_AUS, ActionUnit, au_by_id
from .model import DEFAULT_CONTEXT, CLIPAUModel, TemporalHead

__all__ = [
    "ACTION_UNITS",
    "BASIC_EXPRESSION_AUS",
    "ActionUnit",
    "au_by_id",
    "CLIPAUModel",
    "TemporalHead",
    "DEFAULT_CONTEXT",
    "tiny_clip_au",
]


def tiny_clip_au(
    labels: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"),
    *,
    image_size: int = 16,
    channels: int = 3,
    window: int = 4,
    hidden: int = 16,
    seed: int = 0,
) -> CLIPAUModel:
    """A tiny randomly initialised CLIP-AU model (tests, examples; about a second on a CPU)."""
    import torch

    from ttaperso.adapters.open_clip_fer import CLIPFER, tiny_clip_config

    clip = CLIPFER(
        None,
        labels=labels,
        config=tiny_clip_config(image_size=image_size),
        channels=channels,
        seed=seed,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return CLIPAUModel(clip, labels, window=window, hidden=hidden)
