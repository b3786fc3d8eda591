"""One subject state as bytes: a safetensors blob whose header carries the description.

Every store (a folder, Redis, ...) keeps a state as the same bytes, so the same checks run
wherever it comes from: tensors only (decoding cannot run code), the JSON description under
the header key ``ttaperso``, the tensors' digest (:func:`~ttaperso.stores.base.state_digest`)
and the store's version number beside it (kept out of the JSON so metadata round-trips as
given).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from ..errors import StateFileError
from .base import FORMAT_NAME, FORMAT_VERSION, state_digest

__all__ = ["DIGEST_KEY", "META_KEY", "VERSION_KEY", "DecodedState", "decode_state", "encode_state"]

META_KEY = "ttaperso"
DIGEST_KEY = "ttaperso.state_digest"
VERSION_KEY = "ttaperso.state_version"
#: a safetensors header longer than this is not a subject state's (guards the JSON parse)
_MAX_HEADER_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class DecodedState:
    """What :func:`decode_state` read: tensors, JSON metadata, stored digest and version."""

    tensors: dict[str, Tensor]
    metadata: dict[str, Any]
    digest: str | None
    version: int | None


def _owned(tensor: Tensor) -> Tensor:
    """A CPU tensor that owns its storage (packed states hold views into one buffer)."""
    t = tensor.detach().cpu().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()  # serialisers may refuse or duplicate tensors that share a buffer
    return t


def encode_state(
    tensors: dict[str, Tensor], metadata: dict[str, Any], subject: str, version: int | None
) -> tuple[bytes, str]:
    """The bytes of one state (``subject`` and ``version`` recorded) and its digest."""
    flat = {k: _owned(v) for k, v in tensors.items()}
    digest = state_digest(flat)
    header = {
        META_KEY: json.dumps({**metadata, "subject": subject}, sort_keys=True),
        DIGEST_KEY: digest,
    }
    if version is not None:
        header[VERSION_KEY] = str(version)
    return save_safetensors(flat, header), digest


def _header(data: bytes, where: str) -> dict[str, str]:
    if len(data) < 8:
        raise StateFileError(f"{where}: not a readable ttaperso state file ({len(data)} bytes)")
    size = int.from_bytes(data[:8], "little")
    if size > min(_MAX_HEADER_BYTES, len(data) - 8):
        raise StateFileError(f"{where}: not a readable ttaperso state file (bad header length)")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateFileError(f"{where}: not a readable ttaperso state file ({exc})") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def decode_state(data: bytes, where: str) -> DecodedState:
    """Decode and check the bytes of one state; ``where`` names it in every error.

    Raises :class:`~ttaperso.errors.StateFileError` for unreadable bytes, a foreign
    safetensors file, another format or format version, or tensors that do not match the
    stored digest.
    """
    header = _header(data, where)
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise StateFileError(f"{where}: not a readable ttaperso state file ({exc})") from exc
    if META_KEY not in header:
        raise StateFileError(f"{where}: safetensors file without ttaperso metadata (foreign file)")
    try:
        metadata = json.loads(header[META_KEY])
    except json.JSONDecodeError as exc:
        raise StateFileError(f"{where}: corrupt ttaperso metadata ({exc})") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise StateFileError(f"{where}: not a ttaperso subject state (format {metadata!r:.80})")
    if metadata.get("version") != FORMAT_VERSION:
        raise StateFileError(
            f"{where}: state format version {metadata.get('version')!r}, this ttaperso reads "
            f"{FORMAT_VERSION}"
        )
    stored = header.get(DIGEST_KEY)
    if stored is not None and stored != state_digest(tensors):
        raise StateFileError(f"{where}: tensors do not match the digest in the file's header")
    raw_version = header.get(VERSION_KEY)
    version = int(raw_version) if raw_version is not None and raw_version.isdigit() else None
    # Views of `data` would pin the whole blob; the tensors are small, own them.
    return DecodedState(
        {k: v.clone() if not v.is_contiguous() else v for k, v in tensors.items()},
        metadata,
        stored,
        version,
    )
