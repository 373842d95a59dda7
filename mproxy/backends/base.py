"""The one narrow interface every backend implements, with memcached semantics.

Backends know nothing of the wire format or of servers: keys and values are
``bytes``, flags are ``int`` (0..2**32-1), ``exptime`` is memcached's raw
value (see :func:`ttl_seconds`). Failures of the storage behind a backend
raise :class:`BackendError`; ``dispatch`` turns them into ``SERVER_ERROR``.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

from mproxy.protocol.commands import StoreMode

#: memcached: an exptime above 30 days is an absolute Unix time.
REALTIME_MAXDELTA = 60 * 60 * 24 * 30

#: Largest value of an incr/decr counter (memcached counters are u64).
COUNTER_MAX = 2**64 - 1


@dataclass(frozen=True, slots=True)
class Item:
    """One cached item as a client sees it."""

    value: bytes
    flags: int
    cas: int = 0


class StoreResult(enum.Enum):
    STORED = b"STORED"
    NOT_STORED = b"NOT_STORED"
    EXISTS = b"EXISTS"
    NOT_FOUND = b"NOT_FOUND"


class BackendError(Exception):
    """The store behind a backend failed.

    ``code`` is a short machine word (``timeout``, ``unavailable``,
    ``limit_exceeded``, ``authentication``, ``not_found``, ``internal``, ...)
    used in stats; ``str(err)`` is the human reason put after
    ``SERVER_ERROR`` on the wire (one line, never a value or a key's secret).
    """

    def __init__(self, code: str, message: str = "") -> None:
        self.code = code
        self.message = message or code.replace("_", " ")
        super().__init__(self.message)


class NonNumericValue(Exception):
    """incr/decr on a value that is not a decimal u64 (memcached's CLIENT_ERROR)."""


class ValueTooLarge(Exception):
    """The item does not fit the backend (``SERVER_ERROR object too large for cache``)."""


class FlushDisabled(Exception):
    """flush_all refused by configuration (memcached ``-F``)."""


def ttl_seconds(exptime: int, now: float | None = None) -> float | None:
    """memcached's exptime rule, as seconds from now.

    ``0`` -> ``None`` (no expiry of its own; a backend may apply a default);
    negative -> a value ``<= 0`` (already expired); up to 30 days ->
    relative seconds; above 30 days -> an absolute Unix time, so the result is
    that time minus ``now`` (``<= 0`` when it is in the past).
    """
    if exptime == 0:
        return None
    if exptime < 0:
        return -1.0
    if exptime > REALTIME_MAXDELTA:
        if now is None:
            now = time.time()
        return exptime - now
    return float(exptime)


class Backend(Protocol):
    """What ``dispatch`` needs from a store. All methods are blocking calls;
    under gevent they must yield rather than block the hub."""

    #: short name for stats and logs ("memory", "momento", ...)
    kind: str
    #: most keys one ``get_many`` call should carry: dispatch groups pipelined
    #: gets up to this many keys into one read (more still work, in one call)
    max_batch_keys: int

    def get_many(self, keys: Sequence[bytes], with_cas: bool = False) -> dict[bytes, Item]:
        """Items for the keys that are present. Duplicate keys allowed.
        ``Item.cas`` is filled when ``with_cas`` (gets); otherwise a backend
        may leave it 0 where computing it costs (get ignores it)."""

    def touch_many(self, keys: Sequence[bytes], exptime: int, with_cas: bool = False) -> dict[bytes, Item]:
        """gat/gats: set each present key's expiry, then return it as get_many does."""

    def store(
        self,
        mode: StoreMode,
        key: bytes,
        value: bytes,
        flags: int,
        exptime: int,
        cas_unique: int = 0,
    ) -> StoreResult:
        """set/add/replace/append/prepend/cas. Raises ValueTooLarge when the item
        does not fit (dispatch then removes the old value of a set: not a backend's job)."""

    def delete(self, key: bytes) -> bool:
        """True if the key was there (DELETED), False if not (NOT_FOUND)."""

    def incr_decr(self, key: bytes, delta: int, incr: bool) -> int | None:
        """New value, or None if the key is missing. incr wraps at 2**64,
        decr floors at 0. Raises NonNumericValue."""

    def touch(self, key: bytes, exptime: int) -> bool:
        """True if the key was there (TOUCHED)."""

    def flush_all(self, delay: int = 0) -> None:
        """Invalidate every item now, or ``delay`` seconds from now. Raises FlushDisabled."""

    def stats(self) -> dict[str, int]:
        """Figures the store keeps itself, under memcached's stat names (``curr_items``,
        ``bytes``, ``limit_maxbytes``, ``evictions``, ``get_expired``, ``get_flushed``):
        only those it knows for certain, so a remote store may return ``{}``."""

    def close(self) -> None:
        """Release connections and threads. Idempotent."""

