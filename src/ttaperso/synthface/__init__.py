"""SynthFace: procedural expressive face videos, deterministic from a seed, fast on CPU.

Grayscale faces rendered from identity parameters (face shape, feature placement, skin
tone, hair, glasses) and FACS Action-Unit intensities; the basic expressions are AU
prototypes played as onset -> apex -> offset clips with blinks. Subjects carry
idiosyncrasies (a resting face that looks sad or angry, weak or exaggerated expressions,
asymmetric expressions) and target subjects' sessions carry capture shifts (lighting
direction and level, gamma, contrast, noise, blur, pose, occluders). Per-frame labels (FER2013
order) and AU intensities are known.

    sf = SynthFace(seed=0)
    people = sf.sample_subjects(4, split="target")
    stream = sf.subject_stream(people[0], sessions=2)   # a ttaperso.streams.SubjectStream
    stream.images        # (T, 1, 64, 64) float32 in [0, 1]
    stream.labels        # (T,) indices into EXPRESSIONS
    stream.extras["au"]  # (T, len(AU_IDS)) intensities in [0, 1]

Everything is a pure function of the seed, the subject and the arguments: each subject
and session draws from its own ``numpy`` / ``torch`` generator, never the global ones.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from ..streams.types import SubjectStream
from .facs import AU_IDS, AU_NAMES, EXPRESSIONS, NEUTRAL, PROTOTYPES, au_index, prototype
from .identity import RESTING_FACES, SPLITS, Identity, sample_identity
from .render import NOMINAL_CAPTURE, OCCLUSIONS, Capture, render_frames
from .video import LABEL_THRESHOLD, Session, blink_track, head_motion, plan_clip, sample_session

__all__ = [
    "SynthFace",
    "Identity",
    "Session",
    "Capture",
    "NOMINAL_CAPTURE",
    "OCCLUSIONS",
    "AU_IDS",
    "AU_NAMES",
    "EXPRESSIONS",
    "NEUTRAL",
    "PROTOTYPES",
    "RESTING_FACES",
    "SPLITS",
    "LABEL_THRESHOLD",
    "GENERATOR_VERSION",
    "au_index",
    "prototype",
    "render_frames",
]

#: Changes whenever the same seed would give different frames (part of cache keys).
GENERATOR_VERSION = "synthface-1"

_ORDERS = ("natural", "shuffled")


def _key(text: str) -> int:
    return zlib.crc32(text.encode())


class SynthFace:
    """A seeded population of synthetic subjects and their videos.

    Args:
        seed: the population's seed: the same seed gives the same subjects and frames.
        size: frame side in pixels (64 by default, the fer mini-XCEPTION's input).
    """

    def __init__(self, seed: int = 0, size: int = 64) -> None:
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"Expected argument `seed` to be an int >= 0 but got {seed!r}")
        if not isinstance(size, int) or size < 16:
            raise ValueError(f"Expected argument `size` to be an int >= 16 but got {size!r}")
        self.seed = seed
        self.size = size

    def sample_subjects(self, n: int, split: str = "source", start: int = 0) -> list[Identity]:
        """Subjects ``start .. start + n - 1`` of population ``split`` (``source``/``target``).

        Source and target populations are disjoint (different ids and random streams);
        subject ``i`` of a split is the same whatever ``n`` and ``start``.
        """
        if split not in SPLITS:
            raise ValueError(f"Expected argument `split` in {SPLITS} but got {split!r}")
        if not isinstance(n, int) or n < 0 or not isinstance(start, int) or start < 0:
            raise ValueError(f"Expected ints n >= 0 and start >= 0 but got {n!r} and {start!r}")
        out = []
        for i in range(start, start + n):
            rng = np.random.default_rng([self.seed, _key(split), i])
            out.append(sample_identity(rng, split, f"{split}-{i:03d}"))
        return out

    def sessions(self, identity: Identity, n: int, shifted: bool | None = None) -> list[Session]:
        """The first ``n`` sessions of ``identity`` (shifted captures by default for targets)."""
        shifted = identity.split == "target" if shifted is None else shifted
        return [
            sample_session(
                np.random.default_rng([self.seed, _key(identity.id), 17, k, int(shifted)]),
                f"{identity.id}/session-{k}",
                shifted,
            )
            for k in range(n)
        ]

    def subject_stream(
        self,
        identity: Identity,
        sessions: int = 2,
        expressions: Sequence[str] | None = None,
        *,
        repeats: int = 1,
        frames_per_clip: tuple[int, int] = (24, 48),
        order: str = "natural",
        shifted: bool | None = None,
    ) -> SubjectStream:
        """A video stream of ``identity``: ``sessions`` recordings of expression clips.

        Args:
            identity: the subject (from :meth:`sample_subjects`).
            sessions: number of recording sessions.
            expressions: expressions each session shows, one clip each per repeat, in a
                random order per session (default: all of :data:`EXPRESSIONS`).
            repeats: clips of each expression per session.
            frames_per_clip: inclusive range of clip lengths, in frames.
            order: ``"natural"`` (sessions and clips in recording order) or ``"shuffled"``
                (frames permuted: no temporal structure).
            shifted: give the sessions capture shifts (default: for target subjects only).

        Returns:
            A :class:`~ttaperso.streams.SubjectStream` with ``images (T, 1, S, S)`` float32 in
            ``[0, 1]``, FER2013-order labels, ``sequences`` = session ids and ``extras``
            ``"au"`` ``(T, len(AU_IDS))``, ``"envelope"`` ``(T,)`` and ``"pose"`` ``(T, 5)``.
        """
        expressions = tuple(EXPRESSIONS if expressions is None else expressions)
        bad = [e for e in expressions if e not in EXPRESSIONS]
        if bad or not expressions:
            raise ValueError(f"Expected `expressions` from {EXPRESSIONS} but got {expressions!r}")
        lo, hi = frames_per_clip
        if not (isinstance(lo, int) and isinstance(hi, int) and 4 <= lo <= hi):
            raise ValueError(
                f"Expected `frames_per_clip` (lo, hi) with 4 <= lo <= hi but got {frames_per_clip!r}"
            )
        if (
            not isinstance(sessions, int)
            or sessions < 1
            or not isinstance(repeats, int)
            or repeats < 1
        ):
            raise ValueError(
                f"Expected `sessions` and `repeats` >= 1 but got {sessions!r} and {repeats!r}"
            )
        if order not in _ORDERS:
            raise ValueError(f"Expected argument `order` in {_ORDERS} but got {order!r}")

        images, labels, aus, envs, poses, seqs, sources = [], [], [], [], [], [], []
        for k, session in enumerate(self.sessions(identity, sessions, shifted)):
            rng = np.random.default_rng([self.seed, _key(identity.id), 23, k])
            playlist = [e for e in expressions for _ in range(repeats)]
            playlist = [playlist[i] for i in rng.permutation(len(playlist))]
            clips = [plan_clip(rng, identity, e, int(rng.integers(lo, hi + 1))) for e in playlist]
            au = np.concatenate([c.au for c in clips])
            au[:, au_index(45)] = blink_track(rng, len(au), identity.blink_every)
            pose = head_motion(rng, session.pose, len(au), session.shifted)
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            images.append(
                render_frames(identity, au, pose, session.capture, size=self.size, generator=gen)
            )
            labels.append(np.concatenate([c.labels for c in clips]))
            aus.append(au)
            envs.append(np.concatenate([c.envelope for c in clips]))
            poses.append(pose)
            seqs += [session.id] * len(au)
            frame = 0
            for c, clip in enumerate(clips):
                for t in range(len(clip.labels)):
                    sources.append(
                        f"synthface:{self.seed}:{session.id}:clip-{c}-{clip.expression}:{frame + t}"
                    )
                frame += len(clip.labels)
        stream = SubjectStream(
            subject=identity.id,
            images=torch.cat(images),
            labels=torch.from_numpy(np.concatenate(labels)),
            label_names=EXPRESSIONS,
            sequences=tuple(seqs),
            sources=tuple(sources),
            extras={
                "au": torch.from_numpy(np.concatenate(aus)),
                "envelope": torch.from_numpy(np.concatenate(envs)),
                "pose": torch.from_numpy(np.concatenate(poses)),
            },
        )
        if order == "shuffled":
            perm = np.random.default_rng([self.seed, _key(identity.id), 29]).permutation(
                len(stream)
            )
            stream = stream.select(torch.from_numpy(perm))
        return stream
