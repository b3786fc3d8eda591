"""One subject state as bytes: a safetensors blob whose header carries the description.

Every store (a folder, Redis, ...) keeps a state as the same bytes, so the same checks run
wherever it comes from: tensors only (decoding cannot run code), the JSON description under
the header key ``ttaperso``, the tensors' digest (:func:`~ttaperso.stores.base.state_digest`)
and the store's version number beside it (kept out of the JSON so metadata round-trips as
given), and a digest over those three, so an edited description or version is refused too.

Format version 2 (this one) requires all four keys. Format version 1 files (the digest was
optional there, so an edited file without it loaded) are refused by name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from ..errors import InputError, StateFileError
from .base import FORMAT_NAME, FORMAT_VERSION, state_digest

__all__ = [
    "DIGEST_KEY",
    "HEADER_DIGEST_KEY",
    "MAX_HEADER_BYTES",
    "META_KEY",
    "VERSION_KEY",
    "DecodedState",
    "StateHeader",
    "decode_header",
    "decode_state",
    "encode_state",
]

META_KEY = "ttaperso"
DIGEST_KEY = "ttaperso.state_digest"
VERSION_KEY = "ttaperso.state_version"
HEADER_DIGEST_KEY = "ttaperso.header_digest"
#: a safetensors header longer than this is not a subject state's (guards the JSON parse)
MAX_HEADER_BYTES = 16 * 1024 * 1024
#: metadata keys a store adds on read; never stored in the JSON description
_READ_ONLY_KEYS = ("subject", "state_version")


@dataclass(frozen=True)
class StateHeader:
    """What a state's header says: its subject, store version and tensor digest."""

    subject: str
    version: int
    digest: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class DecodedState:
    """What :func:`decode_state` read: tensors, JSON metadata, stored digest and version."""

    tensors: dict[str, Tensor]
    metadata: dict[str, Any]
    digest: str
    version: int


def _owned(tensor: Tensor) -> Tensor:
    """A CPU tensor that owns its storage (packed states hold views into one buffer)."""
    t = tensor.detach().cpu().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()  # serialisers may refuse or duplicate tensors that share a buffer
    return t


def _header_digest(meta_json: str, digest: str, version: str) -> str:
    text = f"{FORMAT_NAME}\n{meta_json}\n{digest}\n{version}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def encode_state(
    tensors: dict[str, Tensor], metadata: dict[str, Any], subject: str, version: int
) -> tuple[bytes, str]:
    """The bytes of one state (``subject`` and store ``version`` recorded) and its digest.

    ``metadata`` must name this format and format version (what
    ``Personalizer.state_metadata()`` returns; anything else raises InputError: a store
    never writes what it cannot read back). Keys a store adds on read (``subject``,
    ``state_version``) are not stored.
    """
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise StateFileError(f"Expected a store version >= 1 but got {version!r}")
    if metadata.get("format") != FORMAT_NAME or metadata.get("version") != FORMAT_VERSION:
        # A store must never write what it cannot read back.
        raise InputError(
            f"Expected state metadata with format {FORMAT_NAME!r} and version "
            f"{FORMAT_VERSION} (Personalizer.state_metadata()) but got format "
            f"{metadata.get('format')!r} version {metadata.get('version')!r}"
        )
    flat = {k: _owned(v) for k, v in tensors.items()}
    digest = state_digest(flat)
    description = {k: v for k, v in metadata.items() if k not in _READ_ONLY_KEYS}
    meta_json = json.dumps({**description, "subject": subject}, sort_keys=True)
    header = {
        META_KEY: meta_json,
        DIGEST_KEY: digest,
        VERSION_KEY: str(version),
        HEADER_DIGEST_KEY: _header_digest(meta_json, digest, str(version)),
    }
    return save_safetensors(flat, header), digest


def _header(data: bytes, where: str) -> dict[str, str]:
    if len(data) < 8:
        raise StateFileError(f"{where}: not a readable ttaperso state file ({len(data)} bytes)")
    size = int.from_bytes(data[:8], "little")
    if size > min(MAX_HEADER_BYTES, len(data) - 8):
        raise StateFileError(f"{where}: not a readable ttaperso state file (bad header length)")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateFileError(f"{where}: not a readable ttaperso state file ({exc})") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _checked_header(header: dict[str, str], where: str) -> StateHeader:
    """Format, format version, required keys and the header digest of one state."""
    if META_KEY not in header:
        raise StateFileError(f"{where}: safetensors file without ttaperso metadata (foreign file)")
    try:
        metadata = json.loads(header[META_KEY])
    except json.JSONDecodeError as exc:
        raise StateFileError(f"{where}: corrupt ttaperso metadata ({exc})") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise StateFileError(f"{where}: not a ttaperso subject state (format {metadata!r:.80})")
    format_version = metadata.get("version")
    if format_version == 1:
        raise StateFileError(
            f"{where}: format version 1 files are not read (their tensor digest was optional, "
            f"so an edited file could pass); this ttaperso reads and writes format version "
            f"{FORMAT_VERSION}: reset the subject and save it again"
        )
    if format_version != FORMAT_VERSION:
        raise StateFileError(
            f"{where}: state format version {format_version!r}, this ttaperso reads "
            f"{FORMAT_VERSION}"
        )
    missing = [k for k in (DIGEST_KEY, VERSION_KEY, HEADER_DIGEST_KEY) if k not in header]
    if missing:
        raise StateFileError(
            f"{where}: header lacks {missing} (required in format version {FORMAT_VERSION}); "
            "the file was edited or not written by ttaperso"
        )
    digest, raw_version = header[DIGEST_KEY], header[VERSION_KEY]
    if header[HEADER_DIGEST_KEY] != _header_digest(header[META_KEY], digest, raw_version):
        raise StateFileError(
            f"{where}: header was edited (description, digest or version do not match its "
            "header digest)"
        )
    if not raw_version.isdigit() or int(raw_version) < 1:
        raise StateFileError(f"{where}: store version {raw_version!r} is not an int >= 1")
    subject = metadata.get("subject")
    if not isinstance(subject, str):
        raise StateFileError(f"{where}: stored subject id {subject!r} is not a string")
    return StateHeader(subject, int(raw_version), digest, metadata)


def decode_header(data: bytes, where: str) -> StateHeader:
    """Check a state's header only (``data`` may stop after it: see ``fs.read_prefix``)."""
    return _checked_header(_header(data, where), where)


def decode_state(data: bytes, where: str) -> DecodedState:
    """Decode and check the bytes of one state; ``where`` names it in every error.

    Raises :class:`~ttaperso.errors.StateFileError` for unreadable bytes, a foreign
    safetensors file, another format or format version, a missing or edited header entry,
    or tensors that do not match the stored digest.
    """
    header = _header(data, where)
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise StateFileError(f"{where}: not a readable ttaperso state file ({exc})") from exc
    checked = _checked_header(header, where)
    if checked.digest != state_digest(tensors):
        raise StateFileError(f"{where}: tensors do not match the digest in the file's header")
    # Views of `data` would pin the whole blob; the tensors are small, own them.
    return DecodedState(
        {k: v.clone() if not v.is_contiguous() else v for k, v in tensors.items()},
        checked.metadata,
        checked.digest,
        checked.version,
    )
