"""Thread-safe in-memory store behind the local Momento-compatible server.

The store knows caches, keys, values and expiry; it knows nothing of gRPC.
Every operation takes the cache name first and raises :class:`CacheNotFoundError`
for an unknown cache. TTLs are in milliseconds, measured on an injectable
monotonic clock (seconds), so tests can move time without sleeping.

Expiry is lazy (an expired item is invisible and dropped when touched) plus a
per-cache min-heap of expiry times that is drained on every write, so memory
stays bounded by live items even when nobody reads the expired ones.
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

#: Largest and smallest values an Increment result may take (signed 64-bit).
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

#: Momento increments a value only if it is "a UTF-8 string representing a base
#: 10 integer" (client-sdk-rust, increment.rs); an optional sign is accepted.
_INTEGER_RE = re.compile(rb"[+-]?[0-9]+\Z")

#: Rebuild a cache's expiry heap once it holds this many stale entries more than
#: twice the number of live items (repeated overwrites of long-lived keys).
_HEAP_SLACK = 1024

Clock = Callable[[], float]
#: A condition on the current value of a key (``None`` when absent).
Condition = Callable[[bytes | None], bool]


class StoreError(Exception):
    """Base of every error the store raises."""


class CacheNotFoundError(StoreError):
    """The named cache does not exist."""

    def __init__(self, cache: str) -> None:
        super().__init__(f"cache not found: {cache}")
        self.cache = cache


class CacheExistsError(StoreError):
    """The named cache already exists."""

    def __init__(self, cache: str) -> None:
        super().__init__(f"cache already exists: {cache}")
        self.cache = cache


class NotAnIntegerError(StoreError):
    """Increment found a value that is not a base-10 integer (the value is not kept)."""

    def __init__(self) -> None:
        super().__init__("the stored value is not a base-10 signed 64-bit integer")


class IncrementOverflowError(StoreError):
    """Increment would leave the signed 64-bit range."""

    def __init__(self) -> None:
        super().__init__("the increment would overflow a signed 64-bit integer")


class TtlUpdate(enum.Enum):
    """How UpdateTtl changes an item's TTL."""

    INCREASE_TO = "increase_to"
    DECREASE_TO = "decrease_to"
    OVERWRITE_TO = "overwrite_to"


class TtlUpdateResult(enum.Enum):
    """Outcome of UpdateTtl, matching the proto's ``set``/``not_set``/``missing``."""

    SET = "set"
    NOT_SET = "not_set"
    MISSING = "missing"


def value_hash(value: bytes) -> bytes:
    """Content hash used by GetWithHash/SetIfHash: SHA-256, 32 bytes, stable across runs."""
    return hashlib.sha256(value).digest()


@dataclass(slots=True)
class _Entry:
    value: bytes
    expires_at: float


@dataclass(slots=True)
class _Cache:
    items: dict[bytes, _Entry] = field(default_factory=dict)
    heap: list[tuple[float, bytes]] = field(default_factory=list)


class Store:
    """Caches of byte keys to byte values with millisecond TTLs, guarded by one lock."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._caches: dict[str, _Cache] = {}

    # ---- caches -------------------------------------------------------------

    def create_cache(self, name: str) -> None:
        """Create an empty cache; raise :class:`CacheExistsError` if it exists."""
        with self._lock:
            if name in self._caches:
                raise CacheExistsError(name)
            self._caches[name] = _Cache()

    def delete_cache(self, name: str) -> None:
        """Delete a cache and its items."""
        with self._lock:
            if self._caches.pop(name, None) is None:
                raise CacheNotFoundError(name)

    def flush_cache(self, name: str) -> None:
        """Remove every item of a cache, keeping the cache."""
        with self._lock:
            self._cache(name)
            self._caches[name] = _Cache()

    def list_caches(self) -> list[str]:
        """Names of all caches, sorted."""
        with self._lock:
            return sorted(self._caches)

    # ---- reads --------------------------------------------------------------

    def get(self, cache: str, key: bytes) -> bytes | None:
        """The value of a live item, or ``None``."""
        return self.get_many(cache, (key,))[0]

    def get_many(self, cache: str, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values of several keys, in order, ``None`` for each miss; one consistent snapshot."""
        with self._lock:
            items = self._cache(cache).items
            now = self._clock()
            return [self._live(items, key, now) for key in keys]

    def get_with_hash(self, cache: str, key: bytes) -> tuple[bytes, bytes] | None:
        """``(value, value_hash(value))`` of a live item, or ``None``."""
        value = self.get(cache, key)
        return None if value is None else (value, value_hash(value))

    def keys_exist(self, cache: str, keys: Iterable[bytes]) -> list[bool]:
        """For each key, whether a live item exists."""
        with self._lock:
            items = self._cache(cache).items
            now = self._clock()
            return [self._live(items, key, now) is not None for key in keys]

    def remaining_ttl_ms(self, cache: str, key: bytes) -> int | None:
        """Milliseconds until a live item expires (at least 1), or ``None`` if missing."""
        with self._lock:
            items = self._cache(cache).items
            now = self._clock()
            if self._live(items, key, now) is None:
                return None
            return max(1, int((items[key].expires_at - now) * 1000))

    # ---- writes -------------------------------------------------------------

    def set(self, cache: str, key: bytes, value: bytes, ttl_ms: int) -> None:
        """Store a value unconditionally."""
        self.set_if(cache, key, value, ttl_ms, _always)

    def set_many(self, cache: str, items: Iterable[tuple[bytes, bytes, int]]) -> None:
        """Store several ``(key, value, ttl_ms)`` items atomically."""
        with self._lock:
            target = self._cache(cache)
            now = self._clock()
            for key, value, ttl_ms in items:
                self._put(target, key, value, ttl_ms, now)

    def set_if(self, cache: str, key: bytes, value: bytes, ttl_ms: int, condition: Condition) -> bool:
        """Store ``value`` if ``condition(current value or None)`` holds; return whether it did.

        The check and the write happen under one lock, so the condition sees
        exactly the value it replaces.
        """
        with self._lock:
            target = self._cache(cache)
            now = self._clock()
            if not condition(self._live(target.items, key, now)):
                return False
            self._put(target, key, value, ttl_ms, now)
            return True

    def delete(self, cache: str, key: bytes) -> None:
        """Remove a key; a missing key is not an error (Momento's Delete always succeeds)."""
        with self._lock:
            self._cache(cache).items.pop(key, None)

    def increment(self, cache: str, key: bytes, amount: int, ttl_ms: int) -> int:
        """Add ``amount`` to an integer value and return the result.

        A missing key is created with ``amount``. The TTL is reset to ``ttl_ms``
        on every call (the request always carries one; unverified against the
        real service). Raises :class:`NotAnIntegerError` or
        :class:`IncrementOverflowError`, leaving the item unchanged.
        """
        with self._lock:
            target = self._cache(cache)
            now = self._clock()
            current = self._live(target.items, key, now)
            if current is None:
                result = amount
            else:
                if not _INTEGER_RE.match(current):
                    raise NotAnIntegerError()
                base = int(current)
                if not INT64_MIN <= base <= INT64_MAX:
                    raise NotAnIntegerError()
                result = base + amount
            if not INT64_MIN <= result <= INT64_MAX:
                raise IncrementOverflowError()
            self._put(target, key, str(result).encode("ascii"), ttl_ms, now)
            return result

    def update_ttl(self, cache: str, key: bytes, mode: TtlUpdate, ttl_ms: int) -> TtlUpdateResult:
        """Change a live item's TTL to ``ttl_ms`` from now.

        ``INCREASE_TO`` applies only if the new expiry is later than the current
        one, ``DECREASE_TO`` only if it is earlier, ``OVERWRITE_TO`` always.
        """
        with self._lock:
            target = self._cache(cache)
            now = self._clock()
            if self._live(target.items, key, now) is None:
                return TtlUpdateResult.MISSING
            entry = target.items[key]
            new_expiry = now + ttl_ms / 1000.0
            if (mode is TtlUpdate.INCREASE_TO and new_expiry <= entry.expires_at) or (
                mode is TtlUpdate.DECREASE_TO and new_expiry >= entry.expires_at
            ):
                return TtlUpdateResult.NOT_SET
            self._put(target, key, entry.value, ttl_ms, now)
            return TtlUpdateResult.SET

    # ---- internals (caller holds the lock) ---------------------------------

    def _cache(self, name: str) -> _Cache:
        cache = self._caches.get(name)
        if cache is None:
            raise CacheNotFoundError(name)
        return cache

    @staticmethod
    def _live(items: dict[bytes, _Entry], key: bytes, now: float) -> bytes | None:
        entry = items.get(key)
        if entry is None:
            return None
        if entry.expires_at <= now:
            del items[key]
            return None
        return entry.value

    def _put(self, cache: _Cache, key: bytes, value: bytes, ttl_ms: int, now: float) -> None:
        expires_at = now + ttl_ms / 1000.0
        cache.items[key] = _Entry(value, expires_at)
        heapq.heappush(cache.heap, (expires_at, key))
        self._sweep(cache, now)

    @staticmethod
    def _sweep(cache: _Cache, now: float) -> None:
        heap, items = cache.heap, cache.items
        while heap and heap[0][0] <= now:
            expires_at, key = heapq.heappop(heap)
            entry = items.get(key)
            if entry is not None and entry.expires_at == expires_at:
                del items[key]
        if len(heap) > 2 * len(items) + _HEAP_SLACK:
            cache.heap = [(entry.expires_at, key) for key, entry in items.items()]
            heapq.heapify(cache.heap)


def _always(_current: bytes | None) -> bool:
    return True
