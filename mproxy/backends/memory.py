"""In-process store with memcached 1.6 semantics.

The ``backend = "memory"`` of a ``[[cache]]``, and the test double for
everything above the backend layer. Behaviour was checked against a real
memcached 1.6.18 (see ``tests/test_backend_memory.py``):

* expiry follows :func:`base.ttl_seconds`; an exptime already in the past
  makes the write invisible but still removes the previous value;
* every modification (set/add/replace/cas/append/prepend/incr/decr) takes a
  new CAS unique from a per-store counter; touch and gat keep it;
* incr/decr parse the value as memcached's ``safe_strtoull`` does and, when
  the new number is not longer than the old value, rewrite it in place padded
  with trailing spaces (``"100"`` decr 1 -> ``"99 "``);
* a too-large ``set`` raises :class:`base.ValueTooLarge` *and* drops the old
  value; an append/prepend whose result would be too large is NOT_STORED;
* ``flush_all N`` invalidates, N seconds from now, every item written before
  that moment (including items written after the command was issued);
* an expired or flushed item stays held (``curr_items``, ``bytes``) until a
  command looks its key up, which reclaims it and counts it in
  ``get_expired`` / ``get_flushed`` (memcached counts every lookup that finds
  one, whatever the command), or until it leaves as least recently used;
* items are sized as memcached sizes them (:data:`ITEM_OVERHEAD`) and the
  least recently used are evicted to stay within ``max_bytes`` (``evictions``
  counts the live ones, as memcached does); ``resize`` (``cache_memlimit``)
  changes ``max_bytes`` and evicts down to it at once;
* the meta operations keep memcached's item state (``items.c``): a read or
  touch marks the item fetched and moves its access time when that is over
  :data:`UPDATE_INTERVAL` old; ``meta_delete`` with invalidate marks it stale
  with a new CAS unique; the first reader of a stale item, a vivified one or
  one inside its recache window wins the right to recache it (the token is
  then sent, and the others see it); an item stored by a meta set with a
  base64 key keeps that mark until a store replaces it.

Unlike memcached, nothing reclaims expired items in the background (its LRU
crawler) or while allocating (memcached frees expired items it finds at the
tail of the LRU): a memcached under those threads reports lower
``get_expired`` / ``get_flushed`` for the same commands.

Concurrency: mproxy runs this under gevent, and no method yields (no I/O,
no locks, no greenlet switches), so each call is atomic with respect to other
greenlets. It is not safe to share between OS threads.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Callable, Protocol, Sequence

from mproxy.backends.base import (
    COUNTER_MAX,
    FlushDisabled,
    Item,
    MetaArith,
    MetaArithResult,
    MetaDelete,
    MetaGet,
    MetaItem,
    MetaStatus,
    MetaStore,
    NonNumericValue,
    StoreResult,
    ValueTooLarge,
    ttl_seconds,
)
from mproxy.backends.counters import apply_delta
from mproxy.protocol.commands import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_ITEM_SIZE,
    FLAGS_OVERHEAD,
    ITEM_OVERHEAD,
    StoreMode,
    item_size,
    slab_class,
)



#: ``expires_at`` of an item that never expires, and ``_flush_at`` when no
#: delayed flush is pending.
_NEVER = math.inf

#: The states of a held entry (:meth:`MemoryBackend._state`).
_LIVE, _EXPIRED, _FLUSHED = range(3)

#: memcached ``ITEM_UPDATE_INTERVAL``: an access moves an item's access time (and,
#: in memcached, its LRU position) only when that time is older than this.
UPDATE_INTERVAL = 60.0

#: A stored entry, a list (updated in place): the item handed to callers, its
#: absolute expiry time (:data:`_NEVER` if none), its size as counted against
#: ``max_bytes``, its last access time, and memcached's item bits below.
_Entry = list  # [Item, float, int, float, int]
_ITEM, _EXP, _SIZE, _TIME, _BITS = range(5)
#: memcached ``ITEM_FETCHED``: read since stored
FETCHED = 1
#: ``ITEM_STALE``: invalidated by a meta delete, served until recached
STALE = 2
#: ``ITEM_TOKEN_SENT``: a client won the right to recache it
TOKEN_SENT = 4
#: ``ITEM_KEY_BINARY``: stored by a meta set with a base64 key
KEY_BINARY = 8


class MemoryBackend:
    """A bounded LRU store implementing :class:`base.Backend`.

    ``max_bytes`` bounds the sum of :func:`item_size` over stored items;
    ``max_item_size`` bounds one item (memcached ``-I``). ``clock`` returns
    Unix time in seconds (injected by tests). ``default_ttl`` is the lifetime
    in seconds given to items stored or touched with exptime 0 (None: they
    never expire, as in memcached). ``allow_flush=False`` makes ``flush_all``
    raise :class:`base.FlushDisabled` (memcached ``-F``).

    Expired and flushed items are dropped when next looked up (and counted,
    see :meth:`stats`) or when they leave as least recently used; gets,
    touches, stores and counter updates make an item the most recently used.
    """

    kind = "memory"
    #: no call yields (see the module docstring): dispatch runs commands inline
    blocking = False
    #: an in-process read costs the same per key however many come at once: this
    #: only bounds how many pipelined gets dispatch groups into one call
    max_batch_keys = 100

    def __init__(
        self,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_item_size: int = DEFAULT_MAX_ITEM_SIZE,
        clock: Callable[[], float] = time.time,
        allow_flush: bool = True,
        default_ttl: float | None = None,
    ) -> None:
        if max_item_size <= ITEM_OVERHEAD:
            raise ValueError(f"max_item_size must be above {ITEM_OVERHEAD}, got {max_item_size}")
        if max_bytes < max_item_size:
            raise ValueError(
                f"max_bytes ({max_bytes}) must be at least max_item_size ({max_item_size})"
            )
        if default_ttl is not None and default_ttl <= 0:
            raise ValueError(f"default_ttl must be positive or None, got {default_ttl}")
        self._max_bytes = max_bytes
        self._max_item_size = max_item_size
        self._clock = clock
        self._allow_flush = allow_flush
        self._default_ttl = default_ttl
        self._data: OrderedDict[bytes, _Entry] = OrderedDict()
        self._bytes = 0
        self._cas = 0
        self._flush_at = _NEVER
        #: items whose CAS unique is at most this one were invalidated by flush_all
        self._flushed_cas = 0
        #: live items removed to make room (memcached's ``evictions`` stat)
        self.evictions = 0
        #: lookups that found their item expired / invalidated by flush_all
        self.get_expired = 0
        self.get_flushed = 0

    @property
    def curr_items(self) -> int:
        """Items held, including expired ones not yet reclaimed."""
        return len(self._data)

    @property
    def bytes_used(self) -> int:
        """Sum of :func:`item_size` over the items held."""
        return self._bytes

    def stats(self) -> dict[str, int]:
        """memcached's ``curr_items``, ``bytes``, ``limit_maxbytes``, ``evictions``,
        ``get_expired`` and ``get_flushed``, since this store was made."""
        return {
            "curr_items": len(self._data),
            "bytes": self._bytes,
            "limit_maxbytes": self._max_bytes,
            "evictions": self.evictions,
            "get_expired": self.get_expired,
            "get_flushed": self.get_flushed,
        }

    # -- Backend ---------------------------------------------------------

    def get_many(self, keys: Sequence[bytes], with_cas: bool = False) -> dict[bytes, Item]:
        # uniques are kept with every item here: with_cas costs nothing
        now = self._clock()  # _now, inlined (the hottest call: one frame less per get)
        if now >= self._flush_at:
            self._flush()
        data = self._data
        flushed_cas = self._flushed_cas
        found: dict[bytes, Item] = {}
        stale_time = now - UPDATE_INTERVAL
        for key in keys:
            entry = data.get(key)
            if entry is None:
                continue
            item = entry[0]
            if entry[1] <= now or item.cas <= flushed_cas:
                self._reclaim(key, entry, now)
                continue
            data.move_to_end(key)
            found[key] = item
            if not entry[4] & 1:  # FETCHED (memcached's do_item_bump)
                entry[4] |= 1
            if entry[3] < stale_time:
                entry[3] = now
        return found

    def touch_many(self, keys: Sequence[bytes], exptime: int, with_cas: bool = False) -> dict[bytes, Item]:
        """gat/gats. With an exptime in the past the item is still returned
        once, then gone (as memcached does)."""
        now = self._now()
        expires_at = self._expires_at(exptime, now)
        found: dict[bytes, Item] = {}
        for key in keys:
            entry = self._live(key, now)
            if entry is not None:
                self._retime(key, entry, expires_at, now)
                self._bump(entry, now)
                found[key] = entry[0]
        return found

    def store(
        self,
        mode: StoreMode,
        key: bytes,
        value: bytes,
        flags: int,
        exptime: int,
        cas_unique: int = 0,
    ) -> StoreResult:
        return self._store(mode, key, value, flags, exptime, cas_unique)

    def delete(self, key: bytes) -> bool:
        entry = self._live(key, self._now())
        if entry is None:
            return False
        self._unlink(key, entry)
        return True

    def incr_decr(self, key: bytes, delta: int, incr: bool) -> int | None:
        if not 0 <= delta <= COUNTER_MAX:
            raise ValueError(f"delta must be a u64, got {delta}")
        now = self._now()
        entry = self._live(key, now)
        if entry is None:
            return None
        return self._apply(key, entry, delta, incr, now)[0]

    def touch(self, key: bytes, exptime: int) -> bool:
        now = self._now()
        entry = self._live(key, now)
        if entry is None:
            return False
        self._retime(key, entry, self._expires_at(exptime, now), now)
        self._bump(entry, now)
        return True

    @property
    def allow_flush(self) -> bool:
        """False when ``flush_all`` is refused (``allow_flush = false``, memcached ``-F``)."""
        return self._allow_flush

    def flush_all(self, delay: int = 0) -> None:
        """Invalidate everything now, or at ``delay`` seconds from now (an
        absolute Unix time above 30 days). A later flush_all replaces a
        pending delayed one, as in memcached."""
        if not self._allow_flush:
            raise FlushDisabled("flush_all is disabled for this cache")
        now = self._now()
        seconds = ttl_seconds(delay, now)
        if seconds is None or seconds <= 0:
            self._flush()
        else:
            self._flush_at = now + seconds

    def close(self) -> None:
        """Drop every item. Idempotent."""
        self._clear()

    def remaining_ttl(self, keys: Sequence[bytes]) -> dict[bytes, float | None]:
        """Seconds left for each live key (None: no expiry), changing nothing: no LRU
        bump, no reclaim (a lookup a client did not make is not counted)."""
        now = self._clock()
        out: dict[bytes, float | None] = {}
        for key in keys:
            entry = self._data.get(key)
            if entry is None or now >= self._flush_at or self._state(entry, now) != _LIVE:
                continue
            out[key] = None if entry[_EXP] == _NEVER else entry[_EXP] - now
        return out

    def resize(self, max_bytes: int) -> bool:
        """``cache_memlimit``: the new byte budget, least recently used items evicted
        down to it at once. False (nothing changed) below ``max_item_size``."""
        if max_bytes < self._max_item_size:
            return False
        self._max_bytes = max_bytes
        self._evict(self._now())
        return True

    # -- meta commands (memcached 1.6.18's proto_text.c and items.c) ----------------

    def stored_cas(self, value: bytes, flags: int) -> int:
        """Not known from the value: the item's unique is a counter (read it back)."""
        return 0

    def meta_get(self, key: bytes, request: MetaGet) -> MetaItem | None:
        now = self._now()
        entry = self._live(key, now)
        created = False
        if entry is None:
            if request.vivify is None:
                return None
            # an empty item of flags 0 (memcached: item_alloc then do_item_link)
            self._cas += 1
            entry = [Item(b"", 0, self._cas), _NEVER, item_size(key, 0, 0), now, 0]
            self._link(key, entry, None, now)
            created = True
        bits = entry[4]
        ttl = self._remaining(entry, now)
        if created:
            entry[1] = self._expires_at(request.vivify, now)  # type: ignore[arg-type]
        if request.touch is not None:
            entry[1] = self._expires_at(request.touch, now)
        token_sent = bool(bits & TOKEN_SENT)
        won = created
        if request.recache is not None and not token_sent and not created:
            threshold = ttl_seconds(request.recache, now)
            won = threshold is not None and threshold > 0 and entry[1] != _NEVER and entry[1] < now + threshold
        if bits & STALE and not token_sent:
            won = True
        if won:
            entry[4] |= TOKEN_SENT
        result = MetaItem(
            value=entry[0].value,
            flags=entry[0].flags,
            cas=entry[0].cas,
            ttl=ttl,
            new_ttl=self._remaining(entry, now),
            hit_before=bool(bits & FETCHED),
            last_access=int(now - entry[3]),
            stale=bool(bits & STALE),
            won=won,
            token_sent=token_sent,
            created=created,
            binary_key=bool(bits & KEY_BINARY),
            size=entry[2],
            slab_class=slab_class(entry[2]),
        )
        if not request.no_bump:
            self._data.move_to_end(key)
            self._bump(entry, now)
        return result

    def meta_store(self, key: bytes, value: bytes, request: MetaStore) -> tuple[StoreResult, int]:
        result = self._store(
            request.mode, key, value, request.flags, request.exptime,
            request.compare_cas or 0, request.invalidate, request.binary_key,
        )
        return result, self._cas if result is StoreResult.STORED else 0

    def meta_delete(self, key: bytes, request: MetaDelete) -> MetaStatus:
        now = self._now()
        entry = self._live(key, now)
        if entry is None:
            return MetaStatus.NOT_FOUND
        item = entry[0]
        if request.compare_cas is not None and item.cas != request.compare_cas:
            return MetaStatus.EXISTS
        if not request.invalidate:
            self._unlink(key, entry)
            return MetaStatus.DONE
        if request.touch is not None:
            entry[1] = self._expires_at(request.touch, now)
        entry[4] = (entry[4] | STALE) & ~TOKEN_SENT
        self._cas += 1
        entry[0] = Item(item.value, item.flags, self._cas)
        return MetaStatus.DONE

    def meta_arith(self, key: bytes, request: MetaArith) -> MetaArithResult:
        if not 0 <= request.delta <= COUNTER_MAX:
            raise ValueError(f"delta must be a u64, got {request.delta}")
        now = self._now()
        entry = self._live(key, now)
        if entry is None:
            if request.vivify is None:
                return MetaArithResult(MetaStatus.NOT_FOUND)
            value = b"%d" % request.initial
            self._cas += 1
            entry = [Item(value, 0, self._cas), _NEVER, item_size(key, len(value), 0), now, 0]
            self._link(key, entry, None, now)
            entry[1] = self._expires_at(request.vivify if request.touch is None else request.touch, now)
            return MetaArithResult(
                MetaStatus.DONE, request.initial, entry[0].cas, -1, self._remaining(entry, now), created=True
            )
        item = entry[0]
        if not item.value:
            raise NonNumericValue("cannot increment or decrement non-numeric value")
        if request.compare_cas and item.cas != request.compare_cas:
            return MetaArithResult(MetaStatus.EXISTS)
        ttl = self._remaining(entry, now)
        number, new = self._apply(key, entry, request.delta, request.incr, now)
        new_ttl = ttl
        if request.touch is not None:
            expires_at = self._expires_at(request.touch, now)
            new_ttl = self._remaining([None, expires_at], now)
            if new is entry:
                entry[1] = expires_at
            # else memcached 1.6.18 sets T on the item it replaced (and reports it):
            # the new item, holding a longer number, keeps the old TTL
        return MetaArithResult(MetaStatus.DONE, number, new[0].cas, ttl, new_ttl)

    # -- internals -------------------------------------------------------

    def _now(self) -> float:
        """The clock, after applying a delayed flush that has come due.

        Every operation calls this first, so when the flush time passes the
        first operation after it finds only items written before that time:
        all of them are invalid, and flushing then is exact.
        """
        now = self._clock()
        if now >= self._flush_at:
            self._flush()
        return now

    def _flush(self) -> None:
        """Invalidate every item held: each is reclaimed when next looked up or evicted."""
        self._flushed_cas = self._cas
        self._flush_at = _NEVER

    def _expires_at(self, exptime: int, now: float) -> float:
        seconds = ttl_seconds(exptime, now)
        if seconds is None:
            seconds = self._default_ttl
            if seconds is None:
                return _NEVER
        return now + seconds

    def _state(self, entry: _Entry, now: float) -> int:
        """Whether ``entry`` is live, invalidated by flush_all (checked first, as
        memcached does) or expired."""
        if entry[0].cas <= self._flushed_cas:
            return _FLUSHED
        if entry[1] <= now:
            return _EXPIRED
        return _LIVE

    def _live(self, key: bytes, now: float) -> _Entry | None:
        """The key's entry if present and live; an expired or flushed one is reclaimed."""
        entry = self._data.get(key)
        if entry is not None and self._state(entry, now) != _LIVE:
            self._reclaim(key, entry, now)
            return None
        return entry

    def _reclaim(self, key: bytes, entry: _Entry, now: float) -> None:
        """Drop a dead entry a lookup found, counting it as memcached does."""
        if self._state(entry, now) == _FLUSHED:
            self.get_flushed += 1
        else:
            self.get_expired += 1
        self._unlink(key, entry)

    def _retime(self, key: bytes, entry: _Entry, expires_at: float, now: float) -> None:
        """Give a live entry a new expiry (touch/gat: CAS unchanged). One in the
        past stays held, expired, until the next lookup (memcached's way)."""
        entry[1] = expires_at
        self._data.move_to_end(key)

    @staticmethod
    def _bump(entry: _Entry, now: float) -> None:
        """memcached's ``do_item_bump``: fetched, and the access time if older than
        :data:`UPDATE_INTERVAL`."""
        entry[4] |= FETCHED
        if entry[3] < now - UPDATE_INTERVAL:
            entry[3] = now

    @staticmethod
    def _remaining(entry: _Entry, now: float) -> int:
        """Whole seconds left (rounded up, as memcached's second clock shows a
        fresh TTL), -1 for no expiry; wraps as a u32 when already past."""
        if entry[1] == _NEVER:
            return -1
        return math.ceil(entry[1] - now) & 0xFFFFFFFF

    def _store(
        self,
        mode: StoreMode,
        key: bytes,
        value: bytes,
        flags: int,
        exptime: int,
        cas_unique: int = 0,
        invalidate: bool = False,
        binary_key: bool = False,
    ) -> StoreResult:
        """memcached's ``do_store_item``. A stored item takes the next CAS unique
        (``self._cas`` after the call)."""
        now = self._now()
        size = len(key) + len(value) + (ITEM_OVERHEAD + FLAGS_OVERHEAD if flags else ITEM_OVERHEAD)  # item_size
        if size > self._max_item_size:
            # memcached: "Avoid stale data persisting in cache because we failed alloc."
            if mode is StoreMode.SET:
                self.delete(key)
            raise ValueTooLarge(
                f"item of {size} bytes exceeds the {self._max_item_size}-byte item size"
            )
        data = self._data
        old = data.get(key)
        if old is not None and (old[0].cas <= self._flushed_cas or old[1] <= now):  # not live: _live's rule
            self._reclaim(key, old, now)
            old = None
        bits = KEY_BINARY if binary_key else 0
        # exptime 0 without a default TTL never expires (most sets): no ttl_seconds call
        if old is None:
            if mode is StoreMode.CAS:
                return StoreResult.NOT_FOUND
            if mode is not StoreMode.SET and mode is not StoreMode.ADD:
                return StoreResult.NOT_STORED
            expires_at = _NEVER if exptime == 0 and self._default_ttl is None else self._expires_at(exptime, now)
        elif mode is StoreMode.SET or mode is StoreMode.REPLACE:
            expires_at = _NEVER if exptime == 0 and self._default_ttl is None else self._expires_at(exptime, now)
        elif mode is StoreMode.ADD:
            data.move_to_end(key)
            if old[3] < now - UPDATE_INTERVAL:  # memcached's do_item_update
                old[3] = now
            return StoreResult.NOT_STORED
        elif mode is StoreMode.CAS:
            old_cas = old[0].cas
            if cas_unique and old_cas == cas_unique:
                expires_at = self._expires_at(exptime, now)
            elif invalidate and cas_unique and cas_unique < old_cas:
                # a stale write: keeps the expiry, marked stale (and the recache token)
                expires_at = old[1]
                bits |= STALE | (old[4] & TOKEN_SENT)
            else:
                return StoreResult.EXISTS
        else:  # APPEND / PREPEND keep the old flags and expiry
            item = old[0]
            if cas_unique and item.cas != cas_unique:
                return StoreResult.EXISTS
            value = item.value + value if mode is StoreMode.APPEND else value + item.value
            flags = item.flags
            expires_at = old[1]
            bits = 0
            size = item_size(key, len(value), flags)
            if size > self._max_item_size:
                return StoreResult.NOT_STORED
        self._cas += 1
        if expires_at <= now:
            # Stored already expired: nothing visible, but the old value is gone.
            if old is not None:
                self._unlink(key, old)
            return StoreResult.STORED
        self._link(key, [Item(value, flags, self._cas), expires_at, size, now, bits], old, now)
        return StoreResult.STORED

    def _apply(self, key: bytes, entry: _Entry, delta: int, incr: bool, now: float) -> tuple[int, _Entry]:
        """memcached's ``do_add_delta`` on a live entry: the new number and the entry
        now holding it (the same one, rewritten in place, when its digits fit)."""
        item = entry[0]
        number, value = apply_delta(item.value, delta, incr)
        self._cas += 1
        if len(value) == len(item.value):  # in place: bits kept, access time bumped
            entry[0] = Item(value, item.flags, self._cas)
            self._data.move_to_end(key)
            if entry[3] < now - UPDATE_INTERVAL:
                entry[3] = now
            return number, entry
        new = [Item(value, item.flags, self._cas), entry[1], item_size(key, len(value), item.flags), now, 0]
        self._link(key, new, entry, now)
        return number, new

    def _link(self, key: bytes, entry: _Entry, old: _Entry | None, now: float) -> None:
        """Store ``entry`` as most recently used, replacing ``old`` (the
        key's current live entry, or None), then evict to fit the budget."""
        data = self._data
        data[key] = entry
        if old is not None:
            self._bytes += entry[2] - old[2]
            data.move_to_end(key)
        else:
            self._bytes += entry[2]
        # The new entry is last and at most max_item_size <= max_bytes, so it
        # survives (a counter may outgrow it by a few bytes, never in practice).
        if self._bytes > self._max_bytes:
            self._evict(now)

    def _evict(self, now: float) -> None:
        """Remove least recently used items until the budget holds them."""
        data = self._data
        while self._bytes > self._max_bytes:
            _, evicted = data.popitem(last=False)
            self._bytes -= evicted[2]
            if self._state(evicted, now) == _LIVE:
                self.evictions += 1

    def _unlink(self, key: bytes, entry: _Entry) -> None:
        del self._data[key]
        self._bytes -= entry[2]

    def _clear(self) -> None:
        self._data.clear()
        self._bytes = 0
        self._flush_at = _NEVER


class _CacheSettings(Protocol):
    """What :func:`from_config` reads from a ``[[cache]]`` section."""

    memory_cache_bytes: int
    allow_flush: bool


class _ProxySettings(Protocol):
    max_item_size: int


class _Settings(Protocol):
    """What :func:`from_config` reads from the whole configuration."""

    @property
    def proxy(self) -> _ProxySettings: ...


def from_config(cache: _CacheSettings, config: _Settings) -> MemoryBackend:
    """The memory backend of a ``[[cache]]``: ``memory_cache_bytes`` (0 means
    memcached's 64 MiB), ``allow_flush``, and the proxy's ``max_item_size``."""
    return MemoryBackend(
        max_bytes=cache.memory_cache_bytes or DEFAULT_MAX_BYTES,
        max_item_size=config.proxy.max_item_size,
        allow_flush=cache.allow_flush,
    )
