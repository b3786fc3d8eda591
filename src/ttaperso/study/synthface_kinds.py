"""Study kinds for SynthFace: ``synthface`` datasets and the demo's ``synthface-demo`` model.

``[datasets.NAME] kind = "synthface"`` keys: ``seed`` (population), ``split``
(``"target"``: shifted sessions; ``"source"``), ``subjects``, ``start`` (first subject
index), ``sessions``, ``repeats``, ``frames_per_clip`` (``[lo, hi]``), ``size``, ``order``
(``"natural"``/``"shuffled"``, as generated) and ``video`` (``"session"``: sequence id =
recording session, the SynthFace default; ``"clip"``: sequence id = one expression clip,
so that the report's video accuracy is per clip, the unit TTA-CaP scores).

``[models.NAME] kind = "synthface-demo"`` is the small BatchNorm CNN of ``ttaperso demo``
trained on SynthFace *source* subjects (nominal capture), from the demo's weight cache
(trained there on first use): keys ``plan`` (``"full"``/``"quick"``) and ``seed``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from ..model import FERModel
from ..streams.types import SubjectStream

__all__ = ["load_synthface", "synthface_demo_model"]

log = logging.getLogger("ttaperso.study")

_DATASET_KEYS = {
    "seed",
    "split",
    "subjects",
    "start",
    "sessions",
    "repeats",
    "frames_per_clip",
    "size",
    "order",
    "video",
}


def _check(spec: Mapping[str, Any], allowed: set[str], where: str) -> dict[str, Any]:
    options = {k: v for k, v in spec.items() if k not in ("kind", "source")}
    bad = sorted(set(options) - allowed)
    if bad:
        raise ConfigError(f"{where}: unknown keys {bad}; valid: {sorted(allowed)}")
    return options


def load_synthface(spec: Mapping[str, Any]) -> list[SubjectStream]:
    """SynthFace subject streams for a ``[datasets.NAME]`` table (see module doc)."""
    from ..synthface import SynthFace

    o = _check(spec, _DATASET_KEYS, "synthface dataset")
    video = o.get("video", "session")
    if video not in ("session", "clip"):
        raise ConfigError(f"synthface dataset: `video` must be 'session' or 'clip', not {video!r}")
    sf = SynthFace(seed=int(o.get("seed", 0)), size=int(o.get("size", 32)))
    people = sf.sample_subjects(
        int(o.get("subjects", 6)), split=str(o.get("split", "target")), start=int(o.get("start", 0))
    )
    lo, hi = o.get("frames_per_clip", [24, 48])
    streams = []
    for person in people:
        stream = sf.subject_stream(
            person,
            sessions=int(o.get("sessions", 2)),
            repeats=int(o.get("repeats", 1)),
            frames_per_clip=(int(lo), int(hi)),
            order=str(o.get("order", "natural")),
        )
        if video == "clip":
            # sources read "synthface:<seed>:<session>:clip-<c>-<expression>:<frame>"
            clips = tuple(":".join(src.split(":")[2:4]) for src in stream.sources)
            stream = SubjectStream(
                stream.subject,
                stream.images,
                stream.labels,
                stream.label_names,
                clips,
                stream.sources,
                stream.extras,
            )
        streams.append(stream)
    return streams


def synthface_demo_model(spec: Mapping[str, Any]) -> FERModel:
    """The demo's SynthFace source CNN for a ``[models.NAME]`` table (trained once, cached).

    Keys: ``plan`` (a :data:`ttaperso.demo.PLANS` name, default ``"full"``) and ``seed``
    (default 0): the very model ``ttaperso demo`` personalizes.
    """
    from .. import demo

    o = _check(spec, {"plan", "seed"}, "synthface-demo model")
    plan = o.get("plan", "full")
    if plan not in demo.PLANS:
        raise ConfigError(
            f"synthface-demo model: unknown plan {plan!r}; available: {sorted(demo.PLANS)}"
        )
    net, _ = demo.source_model(demo.PLANS[plan], int(o.get("seed", 0)))
    return demo.as_fer_model(net)
