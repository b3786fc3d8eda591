"""Subject streams: readers for image folders, datasets and videos, and study protocols."""

from __future__ import annotations

from .types import UNLABELLED, SubjectStream

__all__ = ["SubjectStream", "UNLABELLED"]
