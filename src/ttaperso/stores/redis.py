"""Subject states in Redis: a store that several processes or machines share.

Implements the store contract (``stores/base.py``) on `redis-py`_:

* the bytes of a state are :func:`~ttaperso.stores.codec.encode_state`'s (the same
  safetensors blob as a :class:`~ttaperso.stores.folder.FolderStore` file), so decoding runs
  the same format, digest and subject checks, and the Personalizer the same model checks;
* versions are integers per subject (0 = absent, the first write is 1, every write is the
  current + 1, none reused or lost with several writers; an erased subject starts again);
* every write is a compare-and-set in one Lua script (atomic on the server): with
  ``expected_version`` it refuses with :class:`~ttaperso.errors.StaleStateError` when the
  subject's current version differs, so a stale replica can never overwrite newer state;
* keys are built from a SHA-256 of the subject id, never from the id itself:
  ``<namespace>:{<hash>}:meta`` (hash: ``id``, ``current``, ``counter``),
  ``<namespace>:{<hash>}:v:<n>`` (the bytes of version ``n``), ``<namespace>:{<hash>}:vinfo``
  (hash ``n`` -> ``digest|saved_at``) and ``<namespace>:subjects`` (hash -> id); a write
  refuses a key that holds another id (a collision never overwrites). The braces
  are a Redis Cluster hash tag: all keys of one subject live in one slot, so the scripts
  touch one node.

Durability of an acknowledged write is Redis's: run the server with ``appendonly yes`` and
``appendfsync always`` (every write fsync'd before the reply) for "acknowledged = on
disk"; ``everysec`` loses at most about a second of writes on a power cut (not on a crash
of the Redis process). See docs/serving.md.

.. _redis-py: https://redis.readthedocs.io/
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ..errors import InputError, StaleStateError, StateFileError, TTAPersoError
from .base import StateVersion
from .codec import decode_state, encode_state

if TYPE_CHECKING:  # redis is an optional dependency (the ``serve`` extra)
    import redis

__all__ = ["RedisStore", "StoreUnavailableError", "subject_key"]

#: a subject state is KiB to MiB; refuse to decode anything larger
MAX_STATE_BYTES = 512 * 1024 * 1024

# KEYS: meta, vinfo, subjects.  ARGV: expected (-1: unconditional), assumed counter,
# subject id, hash, bytes, digest, saved_at, keep (versions kept, >= 1), version-key prefix.
# Returns {status, current, counter}: status 1 written (as counter + 1), 0 stale
# (current != expected), 2 the counter moved since the caller encoded (retry), 3 the key
# holds another subject (a hash collision: nothing is overwritten).
_WRITE = """
local current = tonumber(redis.call('HGET', KEYS[1], 'current') or '0')
local counter = tonumber(redis.call('HGET', KEYS[1], 'counter') or '0')
local owner = redis.call('HGET', KEYS[1], 'id')
if owner and owner ~= ARGV[3] then return {3, current, counter} end
local expected = tonumber(ARGV[1])
if expected >= 0 and current ~= expected then return {0, current, counter} end
if counter ~= tonumber(ARGV[2]) then return {2, current, counter} end
local n = counter + 1
redis.call('SET', ARGV[9] .. n, ARGV[5])
redis.call('HSET', KEYS[1], 'current', n, 'counter', n, 'id', ARGV[3])
redis.call('HSET', KEYS[2], n, ARGV[6] .. '|' .. ARGV[7])
redis.call('HSET', KEYS[3], ARGV[4], ARGV[3])
local keep = tonumber(ARGV[8])
for _, old in ipairs(redis.call('HKEYS', KEYS[2])) do
  if tonumber(old) <= n - keep then
    redis.call('DEL', ARGV[9] .. old)
    redis.call('HDEL', KEYS[2], old)
  end
end
return {1, n, n}
"""

# KEYS: meta.  ARGV: version-key prefix.  Returns {current, bytes} (current 0: absent).
_READ = """
local current = tonumber(redis.call('HGET', KEYS[1], 'current') or '0')
if current == 0 then return {0, false} end
return {current, redis.call('GET', ARGV[1] .. current)}
"""

# KEYS: meta, vinfo, subjects.  ARGV: expected (-1: unconditional), hash, version-key prefix.
# Returns {status, current}: 1 deleted, 0 stale, -1 no such subject.
_DELETE = """
local current = tonumber(redis.call('HGET', KEYS[1], 'current') or '0')
if current == 0 then return {-1, 0} end
local expected = tonumber(ARGV[1])
if expected >= 0 and current ~= expected then return {0, current} end
for _, old in ipairs(redis.call('HKEYS', KEYS[2])) do redis.call('DEL', ARGV[3] .. old) end
redis.call('DEL', ARGV[3] .. current, KEYS[2], KEYS[1])
redis.call('HDEL', KEYS[3], ARGV[2])
return {1, current}
"""


class StoreUnavailableError(TTAPersoError, ConnectionError):
    """The store could not be reached (Redis down, connection refused, timeout).

    Nothing is known to have been written; the caller may retry. A server answers 503.
    """


def subject_key(subject: str) -> str:
    """The hex SHA-256 of a subject id: the only form in which an id reaches a Redis key."""
    return hashlib.sha256(subject.encode("utf-8")).hexdigest()


def _check_subject(subject: object) -> str:
    if not isinstance(subject, str) or not subject:
        raise InputError(f"Expected a non-empty str subject id but got {subject!r:.80}")
    return subject


def _check_expected(expected: int | None) -> int:
    if expected is None:
        return -1
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 0:
        raise InputError(
            f"Expected argument `expected_version` to be None or an int >= 0 but got {expected!r}"
        )
    return expected


class RedisStore:
    """Subject states in one Redis database, with versions and compare-and-set writes.

    Args:
        url: a ``redis://host:port/db`` URL (``rediss://`` for TLS; a password in the URL
            or ``password=``). Ignored when ``client`` is given.
        namespace: prefix of every key (several deployments can share one database).
        keep_versions: versions kept per subject for :meth:`rollback`, the current one
            included (0 keeps the current state alone, like ``FolderStore``).
        client: an existing ``redis.Redis`` (bytes responses, ``decode_responses=False``).
        **options: passed to ``redis.Redis.from_url`` (``socket_timeout=``, ...).

    Every Redis failure (refused connection, timeout, a restarting server) raises
    :class:`StoreUnavailableError`; in that case the write may or may not have happened
    (read the version back). A :class:`~ttaperso.errors.StaleStateError` means nothing
    was written.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        namespace: str = "ttaperso",
        keep_versions: int = 8,
        client: redis.Redis | None = None,
        **options: Any,
    ) -> None:
        try:
            import redis as redis_module
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise InputError(
                "RedisStore needs the redis package: pip install 'ttaperso[serve]'"
            ) from exc
        if (
            isinstance(keep_versions, bool)
            or not isinstance(keep_versions, int)
            or keep_versions < 0
        ):
            raise InputError(
                f"Expected argument `keep_versions` to be an int >= 0 but got {keep_versions!r}"
            )
        if not isinstance(namespace, str) or not namespace or any(c in namespace for c in "{}"):
            raise InputError(
                f"Expected argument `namespace` to be a non-empty str without braces but got "
                f"{namespace!r}"
            )
        self._redis_errors: tuple[type[BaseException], ...] = (redis_module.RedisError, OSError)
        options.setdefault("socket_timeout", 10.0)
        options.setdefault("socket_connect_timeout", 5.0)
        self.client: redis.Redis = (
            client if client is not None else redis_module.Redis.from_url(url, **options)
        )
        self.url = url if client is None else repr(client)
        self.namespace = namespace
        self.keep_versions = keep_versions
        self._write = self.client.register_script(_WRITE)
        self._read = self.client.register_script(_READ)
        self._delete = self.client.register_script(_DELETE)

    def __repr__(self) -> str:
        # Never the URL itself: it may carry a password.
        return f"RedisStore(namespace={self.namespace!r})"

    # ---------------------------------------------------------------- keys
    def _keys(self, subject: str) -> tuple[str, str, str, str]:
        """(meta, vinfo, subjects, version-key prefix) of ``subject``."""
        base = f"{self.namespace}:{{{subject_key(subject)}}}"
        return f"{base}:meta", f"{base}:vinfo", f"{self.namespace}:subjects", f"{base}:v:"

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one Redis call; connection-level failures become StoreUnavailableError."""
        try:
            return fn(*args, **kwargs)
        except self._redis_errors as exc:
            raise StoreUnavailableError(
                f"{self!r}: {what} failed ({type(exc).__name__}: {exc})"
            ) from exc

    def _decode(
        self, data: bytes, subject: str, version: int
    ) -> tuple[dict[str, Tensor], dict[str, Any], str]:
        where = f"{self!r} subject {subject!r} version {version}"
        if len(data) > MAX_STATE_BYTES:
            raise StateFileError(f"{where}: {len(data)} bytes is larger than any subject state")
        decoded = decode_state(data, where)
        if decoded.metadata.get("subject") != subject:
            # A hash collision or a value copied between keys: never another subject's state.
            raise StateFileError(
                f"{where}: holds subject {decoded.metadata.get('subject')!r}, not {subject!r}"
            )
        if decoded.version != version:
            raise StateFileError(f"{where}: the bytes say version {decoded.version!r}")
        if not decoded.digest:
            raise StateFileError(f"{where}: no state digest in the header")
        return decoded.tensors, {**decoded.metadata, "state_version": version}, decoded.digest

    # ------------------------------------------------------------ contract
    def current(self, subject: str) -> StateVersion | None:
        """The current version of ``subject`` (None when absent), without reading its bytes."""
        version = self.current_version(subject)
        if not version:
            return None
        _, vinfo, _, _ = self._keys(subject)
        raw = self._call("reading the version", self.client.hget, vinfo, str(version))
        digest, _, saved = (raw or b"|0").decode().partition("|")
        return StateVersion(version, digest, float(saved or 0), None)

    def current_version(self, subject: str) -> int:
        """The subject's current version (0: absent): one cheap round trip, no decoding."""
        meta, _, _, _ = self._keys(_check_subject(subject))
        raw = self._call("reading the version", self.client.hget, meta, "current")
        return int(raw) if raw else 0

    def write(
        self,
        subject: str,
        tensors: dict[str, Tensor],
        metadata: dict[str, Any],
        *,
        expected_version: int | None = None,
    ) -> StateVersion:
        """Store a new current state as version current + 1, atomically; return it.

        With ``expected_version`` (0 for a subject the writer never loaded or saved), a
        subject whose current version differs raises :class:`StaleStateError` naming both
        versions and nothing is written.
        """
        subject = _check_subject(subject)
        expected = _check_expected(expected_version)
        meta, vinfo, subjects, prefix = self._keys(subject)
        body = {k: v for k, v in metadata.items() if k not in ("subject", "state_version")}
        while True:
            raw = self._call("reading the version", self.client.hmget, meta, ["current", "counter"])
            current, counter = (int(v) if v else 0 for v in raw)
            if expected >= 0 and current != expected:
                raise self._stale(subject, expected, current)
            number = counter + 1
            data, digest = encode_state(tensors, body, subject, number)
            saved_at = time.time()
            status, current, _ = self._call(
                "writing",
                self._write,
                keys=[meta, vinfo, subjects],
                args=[
                    expected,
                    counter,
                    subject,
                    subject_key(subject),
                    data,
                    digest,
                    repr(saved_at),
                    max(self.keep_versions, 1),
                    prefix,
                ],
            )
            if status == 1:
                return StateVersion(int(current), digest, saved_at, None)
            if status == 0:
                raise self._stale(subject, expected, int(current))
            if status == 3:
                owner = self._call("reading the owner", self.client.hget, meta, "id")
                raise StateFileError(
                    f"{self!r}: the key of subject {subject!r} holds subject "
                    f"{owner.decode(errors='replace')!r}, not {subject!r} (a hash collision); "
                    "nothing was written"
                )
            # status 2: another writer took the next number while we encoded; an
            # unconditional write encodes again with the new number.

    def _stale(self, subject: str, expected: int, current: int) -> StaleStateError:
        return StaleStateError(
            f"{self!r} subject {subject!r}: stored version {current}, the writer's expected "
            f"version {expected}; another writer saved this subject since (nothing was written)"
        )

    def read(self, subject: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and metadata of the current state; ``metadata["state_version"]`` is its version."""
        subject = _check_subject(subject)
        meta, _, _, prefix = self._keys(subject)
        current, data = self._call("reading", self._read, keys=[meta], args=[prefix])
        if not current or data is None:
            raise StateFileError(f"{self!r}: no state for subject {subject!r}")
        tensors, metadata, _ = self._decode(data, subject, int(current))
        return tensors, metadata

    def read_bytes(self, subject: str) -> tuple[bytes, int]:
        """The stored bytes of the current state (a state file, checked) and their version."""
        subject = _check_subject(subject)
        meta, _, _, prefix = self._keys(subject)
        current, data = self._call("reading", self._read, keys=[meta], args=[prefix])
        if not current or data is None:
            raise StateFileError(f"{self!r}: no state for subject {subject!r}")
        self._decode(data, subject, int(current))
        return bytes(data), int(current)

    def subjects(self) -> list[str]:
        """Ids of the subjects with a current state (sorted)."""
        raw = self._call("listing subjects", self.client.hvals, f"{self.namespace}:subjects")
        return sorted(v.decode("utf-8") for v in raw)

    def delete(self, subject: str, *, expected_version: int | None = None) -> None:
        """Erase the current state and every kept version (unknown subject: StateFileError).

        Nothing of the subject stays (as in FolderStore): a new state after the erasure
        starts again at version 1.
        """
        subject = _check_subject(subject)
        expected = _check_expected(expected_version)
        meta, vinfo, subjects, prefix = self._keys(subject)
        status, current = self._call(
            "deleting",
            self._delete,
            keys=[meta, vinfo, subjects],
            args=[expected, subject_key(subject), prefix],
        )
        if status == -1:
            raise StateFileError(f"{self!r}: no state for subject {subject!r}")
        if status == 0:
            raise self._stale(subject, expected, int(current))

    def _kept(self, subject: str) -> dict[int, tuple[str, float]]:
        _, vinfo, _, _ = self._keys(subject)
        raw = self._call("listing versions", self.client.hgetall, vinfo)
        out: dict[int, tuple[str, float]] = {}
        for number, info in raw.items():
            digest, _, saved = info.decode().partition("|")
            out[int(number)] = (digest, float(saved))
        return dict(sorted(out.items()))

    def versions(self, subject: str) -> list[StateVersion]:
        """The kept versions of ``subject``, oldest first, the current one last.

        With ``keep_versions=0`` that is the current state alone (as in FolderStore).
        """
        subject = _check_subject(subject)
        return [StateVersion(n, d, t, None) for n, (d, t) in self._kept(subject).items()]

    def read_version(self, subject: str, version: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and metadata of one kept version of ``subject``."""
        subject = _check_subject(subject)
        kept = [v.version for v in self.versions(subject)]
        if isinstance(version, bool) or not isinstance(version, int) or version not in kept:
            raise StateFileError(
                f"{self!r}: no version {version!r} of subject {subject!r}; kept versions: {kept}"
            )
        _, _, _, prefix = self._keys(subject)
        data = self._call("reading a version", self.client.get, f"{prefix}{version}")
        if data is None:  # pruned or erased between the listing and the read
            raise StateFileError(f"{self!r}: version {version} of subject {subject!r} is gone")
        tensors, metadata, _ = self._decode(data, subject, version)
        return tensors, metadata

    def rollback(
        self, subject: str, version: int, *, expected_version: int | None = None
    ) -> StateVersion:
        """Make an earlier version current again, written as a new version (history kept)."""
        tensors, metadata = self.read_version(subject, version)
        return self.write(
            subject,
            tensors,
            {**metadata, "rolled_back_from": version},
            expected_version=expected_version,
        )

    def digest(self, subject: str) -> str:
        """Digest of the tensors of ``subject``'s current state (checked against its bytes)."""
        subject = _check_subject(subject)
        meta, _, _, prefix = self._keys(subject)
        current, data = self._call("reading", self._read, keys=[meta], args=[prefix])
        if not current or data is None:
            raise StateFileError(f"{self!r}: no state for subject {subject!r}")
        return self._decode(data, subject, int(current))[2]

    def ping(self) -> bool:
        """True when the server answers (health checks)."""
        try:
            return bool(self.client.ping())
        except self._redis_errors:
            return False

    def close(self) -> None:
        """Close the connection pool."""
        self.client.close()
