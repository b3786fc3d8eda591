"""Where subject states live: the :class:`StateStore` interface and its implementations.

* :class:`FolderStore`: one local folder, one safetensors file per subject (the default:
  ``Personalizer.save("states/")``).
"""

from __future__ import annotations

from .base import FORMAT_NAME, FORMAT_VERSION, StateStore, StateVersion, state_digest
from .codec import DecodedState, decode_state, encode_state
from .folder import MAX_STATE_FILE_BYTES, FolderStore, subject_filename

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
    "state_digest",
    "subject_filename",
]
