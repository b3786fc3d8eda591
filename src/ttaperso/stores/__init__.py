"""Where subject states live: the :class:`StateStore` interface and its implementations.

* :class:`FolderStore`: one local folder, one safetensors file per subject (the default:
  ``Personalizer.save("states/")``).

Every store follows one contract (:class:`StateStore`, :class:`VersionedStateStore`):
integer versions per subject, compare-and-set writes (``expected_version``), the stored
subject id checked, the same bytes (:mod:`ttaperso.stores.codec`).
"""

from __future__ import annotations

from .base import (
    FORMAT_NAME,
    FORMAT_VERSION,
    StateStore,
    StateVersion,
    VersionedStateStore,
    state_digest,
)
from .codec import DecodedState, decode_state, encode_state
from .folder import MAX_STATE_FILE_BYTES, FolderStore, StoredFile, subject_filename

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_STATE_FILE_BYTES",
    "DecodedState",
    "FolderStore",
    "decode_state",
    "encode_state",
    "StateStore",
    "StateVersion",
    "StoredFile",
    "VersionedStateStore",
    "state_digest",
    "subject_filename",
]
