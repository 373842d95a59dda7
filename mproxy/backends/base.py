"""The one narrow interface every backend implements, with memcached semantics.

Backends know nothing of the wire format or of servers: keys and values are
``bytes``, flags are ``int`` (0..2**32-1), ``exptime`` is memcached's raw
value (see :func:`ttl_seconds`). Failures of the storage behind a backend
raise :class:`BackendError`; ``dispatch`` turns them into ``SERVER_ERROR``.
"""

from __future__ import annotations

import enum
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol, Sequence

from mproxy.protocol.commands import StoreMode, fast_init

#: memcached: an exptime above 30 days is an absolute Unix time.
REALTIME_MAXDELTA = 60 * 60 * 24 * 30

#: Largest value of an incr/decr counter (memcached counters are u64).
COUNTER_MAX = 2**64 - 1

#: Which tier answered the last backend call of the calling greenlet (``"memory"``,
#: ``"disk"`` or ``"backend"``), set by a backend with local tiers
#: (:mod:`mproxy.backends.tiered`) and read by dispatch for the audit log; ``""``
#: when nothing set it. Each greenlet has its own value (greenlet >= 1.0 gives every
#: greenlet its own context).
ANSWERED_BY: ContextVar[str] = ContextVar("mproxy_answered_by", default="")


@dataclass(frozen=True, slots=True)
class Item:
    """One cached item as a client sees it."""

    value: bytes
    flags: int
    cas: int = 0


fast_init(Item)  # one per store on the memory backend: made through its slots (see fast_init)


class StoreResult(enum.Enum):
    STORED = b"STORED"
    NOT_STORED = b"NOT_STORED"
    EXISTS = b"EXISTS"
    NOT_FOUND = b"NOT_FOUND"


class MetaStatus(enum.Enum):
    """Outcome of :meth:`Backend.meta_delete` and :meth:`Backend.meta_arith`."""

    DONE = "done"
    NOT_FOUND = "not_found"
    #: the item's CAS unique is not the one the request compared with
    EXISTS = "exists"


@dataclass(frozen=True, slots=True)
class MetaGet:
    """What a meta get asks besides the item (memcached's ``mg`` flags).

    Exptimes are memcached's raw values (:func:`ttl_seconds`). The ``with_*``
    fields say which metadata the caller will use, so that a backend fetches
    only those (and refuses, before doing anything, those it cannot serve)."""

    #: new exptime for a hit (``T``)
    touch: int | None = None
    #: on a miss, create an empty item with this exptime and make the caller the
    #: winner of the right to recache it (``N``)
    vivify: int | None = None
    #: win the right to recache when the remaining TTL is below this exptime (``R``)
    recache: int | None = None
    #: leave the item's LRU position, hit bit and access time alone (``u``)
    no_bump: bool = False
    with_ttl: bool = False
    #: hit-before bit and seconds since last access (``h``, ``l``)
    with_access: bool = False


@dataclass(frozen=True, slots=True)
class MetaItem:
    """An item as a meta command sees it. Metadata a backend does not keep is None."""

    value: bytes
    flags: int
    cas: int
    #: remaining seconds before the command (-1: never expires)
    ttl: int | None = None
    #: remaining seconds after the command's touch or vivify (as ``ttl`` if none)
    new_ttl: int | None = None
    #: fetched before this command
    hit_before: bool | None = None
    #: seconds since the item was last accessed, before this command
    last_access: int | None = None
    #: marked stale (md with invalidate), to be recached
    stale: bool = False
    #: this command won the right to recache (vivified, recache window, stale)
    won: bool = False
    #: another client won it already
    token_sent: bool = False
    #: the command created the item (vivify)
    created: bool = False
    #: stored by a meta set with a base64 key (memcached echoes its key base64);
    #: None: not known (the echo then follows the request)
    binary_key: bool | None = False
    #: bytes the item takes, as memcached counts them, and its slab class
    size: int | None = None
    slab_class: int | None = None


@dataclass(frozen=True, slots=True)
class MetaStore:
    """A meta set: ``mode`` as ``store``'s (CAS compares ``compare_cas``), plus:"""

    mode: StoreMode = StoreMode.SET
    flags: int = 0
    exptime: int = 0
    #: compare with the item's CAS unique (SET/REPLACE become CAS; APPEND/PREPEND
    #: compare unless 0; ADD ignores it)
    compare_cas: int | None = None
    #: with CAS: a unique lower than the item's still stores, marking the item stale
    invalidate: bool = False
    #: remember that the key came base64-encoded (see ``MetaItem.binary_key``)
    binary_key: bool = False
    #: the caller will use the CAS unique of the stored item
    with_cas: bool = False


@dataclass(frozen=True, slots=True)
class MetaDelete:
    """A meta delete: remove the item, or with ``invalidate`` keep it, marked stale,
    with a new CAS unique (and ``touch`` as its exptime when given)."""

    compare_cas: int | None = None
    invalidate: bool = False
    touch: int | None = None


@dataclass(frozen=True, slots=True)
class MetaArith:
    """A meta incr/decr."""

    incr: bool = True
    delta: int = 1
    #: 0: no check (memcached's rule for ``ma``)
    compare_cas: int = 0
    #: on a miss, create the item holding ``initial`` with this exptime
    vivify: int | None = None
    initial: int = 0
    #: new exptime on success
    touch: int | None = None
    with_ttl: bool = False
    with_cas: bool = False


@dataclass(frozen=True, slots=True)
class MetaArithResult:
    status: MetaStatus
    number: int = 0
    cas: int = 0
    ttl: int | None = None
    new_ttl: int | None = None
    created: bool = False


class MetaUnsupported(Exception):
    """A backend cannot serve what a meta request asks (dispatch answers as
    memcached does for a flag it does not know). ``str()`` says what and why."""


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
    #: whether calls wait on I/O (a remote store; they yield to other greenlets):
    #: dispatch then runs the commands of one read concurrently, in order per key.
    #: False: every call returns without yielding (an in-process store), and dispatch
    #: runs them inline, one after the other. A backend that does not say is taken as
    #: blocking.
    blocking: bool
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

    def stored_cas(self, value: bytes, flags: int) -> int:
        """The CAS unique a get will show for the item a set/add/replace/cas of
        ``value`` and ``flags`` just stored, when the backend knows it without a
        call (content uniques); 0 when it does not (the caller reads it back)."""

    def delete(self, key: bytes) -> bool:
        """True if the key was there (DELETED), False if not (NOT_FOUND)."""

    def incr_decr(self, key: bytes, delta: int, incr: bool) -> int | None:
        """New value, or None if the key is missing. incr wraps at 2**64,
        decr floors at 0. Raises NonNumericValue."""

    def touch(self, key: bytes, exptime: int) -> bool:
        """True if the key was there (TOUCHED)."""

    def flush_all(self, delay: int = 0) -> None:
        """Invalidate every item now, or ``delay`` seconds from now. Raises FlushDisabled."""

    # -- meta commands: each raises MetaUnsupported, before doing anything, for what
    # -- it cannot serve

    def meta_get(self, key: bytes, request: MetaGet) -> MetaItem | None:
        """The item (after the request's touch or vivify), or None on a miss."""

    def meta_store(self, key: bytes, value: bytes, request: MetaStore) -> tuple[StoreResult, int]:
        """Store as ``store`` does; also the new CAS unique when STORED (else 0).
        Raises ValueTooLarge (the caller then removes the key's item)."""

    def meta_delete(self, key: bytes, request: MetaDelete) -> MetaStatus:
        """Delete or invalidate."""

    def meta_arith(self, key: bytes, request: MetaArith) -> MetaArithResult:
        """incr/decr as ``incr_decr``, with CAS check, vivify and touch. Raises NonNumericValue."""

    def resize(self, max_bytes: int) -> bool:
        """Set the byte budget (``cache_memlimit``), evicting down to it; False
        when the backend has no budget of its own to set."""

    def remaining_ttl(self, keys: Sequence[bytes]) -> dict[bytes, float | None]:
        """Seconds each present key has left before it expires (None: it never does),
        without changing anything; absent keys are left out. What a local tier needs to
        keep a copy of an item it did not write no longer than the item lives
        (:mod:`mproxy.backends.tiered`). On Momento this is ItemGetTtl per key (one call
        each, made concurrently)."""

    def stats(self) -> dict[str, int]:
        """Figures the store keeps itself, under memcached's stat names (``curr_items``,
        ``bytes``, ``limit_maxbytes``, ``evictions``, ``get_expired``, ``get_flushed``):
        only those it knows for certain, so a remote store may return ``{}``."""

    def close(self) -> None:
        """Release connections and threads. Idempotent."""

