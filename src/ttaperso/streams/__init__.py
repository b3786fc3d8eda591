"""Subject streams: readers for image folders, datasets and videos, and study protocols.

Readers return :class:`SubjectStream` s of face crops in ``[0, 1]``; a model maps them to its
input with ``model.prepare``. Protocols order them for a study and :func:`run_protocol`
feeds them to a :class:`~ttaperso.Personalizer`. See ``docs/streams.md``.
"""

from __future__ import annotations

from .datasets import read_class_folders, read_jaffe, read_yale, source_data_from_stream
from .manifest import read_manifest
from .protocols import PROTOCOLS, Schedule, Step, list_protocols, make_schedule, run_protocol
from .sequences import read_sequence_folders
from .types import UNLABELLED, SubjectStream
from .video import iter_video, read_video

__all__ = [
    "PROTOCOLS",
    "Schedule",
    "Step",
    "SubjectStream",
    "UNLABELLED",
    "iter_video",
    "list_protocols",
    "make_schedule",
    "read_class_folders",
    "read_jaffe",
    "read_manifest",
    "read_sequence_folders",
    "read_video",
    "read_yale",
    "run_protocol",
    "source_data_from_stream",
]
