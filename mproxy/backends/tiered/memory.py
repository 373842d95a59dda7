"""The memory tier's store: items bounded in bytes, evicted by S3-FIFO.

:class:`MemoryTier` holds :class:`~mproxy.backends.base.Item` s with an
absolute expiry (``time.monotonic`` seconds). Its byte count is what the
items really take in this process: key, value and :data:`ENTRY_OVERHEAD`
per item (the Python objects and the two dictionary slots an item costs,
measured by ``tests/test_tier_memory.py`` with ``tracemalloc``), plus the
ghost filter below. It never holds more than ``max_bytes``.

Eviction is S3-FIFO (Yang et al., "FIFO queues are all you need for cache
eviction", SOSP 2023): a small FIFO queue (:data:`SMALL_SHARE` of the bytes)
takes new items; an item read while there moves to the main FIFO queue when
it reaches the head of the small one, the others leave, their keys
remembered by a ghost filter; an item whose key is in the ghost filter goes
straight to the main queue; the main queue gives each item read since it
last passed the head another turn (a frequency of at most 3). One-hit
wonders leave quickly, hot items stay. :class:`LruTier` (least recently
used, the classic policy) has the same interface, for comparison:
``scripts/tier_hit_ratio.py`` replays a zipf load through both.

The ghost filter is two Bloom filters of fixed size, the older dropped when
the newer has seen half as many keys as the tier holds (a "rotating"
filter: it remembers about as many keys as the paper's ghost queue, whose
length is the main queue's), in about 2 bytes per key instead of a
dictionary's hundred, at the price of rare false positives (a new item then
starts in the main queue). The tiered backend also asks it whether a key
missed recently (:meth:`MemoryTier.seen`), to fill only keys read twice when
a fill costs a call (the "doorkeeper" of TinyLFU).

No method yields or does I/O: under gevent each call is atomic with respect
to other greenlets. Not thread-safe.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

from mproxy.backends.base import Item

#: Bytes an item costs besides its key and value: the entry list, the Item, the
#: float of its expiry, the bytes objects' headers and its dictionary slot
#: (CPython 3.11, 64-bit; checked by tests/test_tier_memory.py).
ENTRY_OVERHEAD = 440
#: Share of ``max_bytes`` for the small (probation) queue (the paper's 10 %).
SMALL_SHARE = 0.10
#: Largest item the tier takes, as a share of ``max_bytes``: an item that could not
#: sit in the small queue is not cached.
MAX_ITEM_SHARE = SMALL_SHARE
#: The frequency counter saturates here (the paper's 2 bits).
MAX_FREQ = 3
#: Keys the ghost filter has room for per generation, per byte of ``max_bytes`` (one
#: key per 256 bytes: more than the items that fit; a generation ends sooner, at half
#: the main queue's items).
GHOST_KEYS_PER_BYTE = 1 / 256
#: Least keys per ghost generation.
GHOST_MIN_KEYS = 64

_ITEM, _EXP, _SIZE, _FREQ = range(4)
#: An entry: [Item, expires_at (monotonic), size in bytes, frequency].
_Entry = list


def entry_size(key: bytes, value_length: int) -> int:
    """Bytes an item takes in the tier."""
    return len(key) + value_length + ENTRY_OVERHEAD


class GhostFilter:
    """Approximate set of recently seen keys, of fixed size (see the module doc)."""

    __slots__ = ("_bits", "_mask", "_current", "_previous", "_count", "capacity")

    def __init__(self, capacity: int) -> None:
        #: keys per generation
        self.capacity = max(1, capacity)
        bits = 1 << max(10, (8 * self.capacity - 1).bit_length())  # >= 8 bits per key
        self._bits = bits
        self._mask = bits - 1
        self._current = bytearray(bits // 8)
        self._previous = bytearray(bits // 8)
        self._count = 0

    @property
    def nbytes(self) -> int:
        """Bytes both generations take."""
        return 2 * (self._bits // 8)

    def _slots(self, key: bytes) -> tuple[int, int, int]:
        h = hash(key) & 0xFFFFFFFFFFFFFFFF
        mask = self._mask
        return h & mask, (h >> 21) & mask, (h >> 42) & mask

    def add(self, key: bytes, generation: int = 0) -> None:
        """Remember ``key``; the newer generation is full at ``generation`` keys (at most
        :attr:`capacity`; 0: at the capacity)."""
        a, b, c = self._slots(key)
        cur = self._current
        cur[a >> 3] |= 1 << (a & 7)
        cur[b >> 3] |= 1 << (b & 7)
        cur[c >> 3] |= 1 << (c & 7)
        self._count += 1
        if self._count >= (min(generation, self.capacity) if generation > 0 else self.capacity):
            self._previous = cur
            self._current = bytearray(len(cur))
            self._count = 0

    def __contains__(self, key: bytes) -> bool:
        a, b, c = self._slots(key)
        for bits in (self._current, self._previous):
            if bits[a >> 3] >> (a & 7) & 1 and bits[b >> 3] >> (b & 7) & 1 and bits[c >> 3] >> (c & 7) & 1:
                return True
        return False

    def clear(self) -> None:
        self._current = bytearray(len(self._current))
        self._previous = bytearray(len(self._previous))
        self._count = 0


def _ghost_for(max_bytes: int) -> GhostFilter:
    return GhostFilter(max(GHOST_MIN_KEYS, int(max_bytes * GHOST_KEYS_PER_BYTE)))


def budget_for(items_bytes: int) -> int:
    """The ``max_bytes`` whose items get ``items_bytes`` (the ghost filter on top)."""
    return items_bytes + _ghost_for(items_bytes).nbytes


class MemoryTier:
    """Items bounded in bytes, S3-FIFO (see the module doc).

    ``get`` counts ``hits`` and ``misses``; ``evictions`` counts live items
    removed to make room (expired ones found on the way are dropped uncounted).
    """

    #: the eviction policy's name (stats, bench)
    policy = "s3-fifo"

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self._small: OrderedDict[bytes, _Entry] = OrderedDict()
        self._main: OrderedDict[bytes, _Entry] = OrderedDict()
        self._small_bytes = 0
        self._items_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.max_bytes = max_bytes
        self._ghost = _ghost_for(max_bytes)

    # -- figures -----------------------------------------------------------

    @property
    def items(self) -> int:
        return len(self._small) + len(self._main)

    @property
    def used_bytes(self) -> int:
        """Bytes held: the items and the ghost filter."""
        return self._items_bytes + self._ghost.nbytes

    @property
    def max_item(self) -> int:
        """Largest item (:func:`entry_size`) the tier takes."""
        return int(self.max_bytes * MAX_ITEM_SHARE)

    def __len__(self) -> int:
        return self.items

    def __contains__(self, key: bytes) -> bool:
        return key in self._main or key in self._small

    def keys(self) -> Iterator[bytes]:
        yield from self._small
        yield from self._main

    # -- reads -------------------------------------------------------------

    def get(self, key: bytes, now: float) -> Item | None:
        """The key's item if held and not expired at ``now`` (a hit marks it used)."""
        entry = self._main.get(key)
        if entry is None:
            entry = self._small.get(key)
            if entry is None:
                self.misses += 1
                return None
        if entry[_EXP] <= now:
            self._remove(key)
            self.misses += 1
            return None
        if entry[_FREQ] < MAX_FREQ:
            entry[_FREQ] += 1
        self.hits += 1
        item: Item = entry[_ITEM]
        return item

    def expires_at(self, key: bytes) -> float | None:
        """The key's expiry if held (whether or not past), without marking it used."""
        entry = self._main.get(key) or self._small.get(key)
        return None if entry is None else float(entry[_EXP])

    def seen(self, key: bytes) -> bool:
        """Whether the key is in the ghost filter (left recently, or :meth:`remember` ed)."""
        return key in self._ghost

    def remember(self, key: bytes) -> None:
        """Put the key in the ghost filter (it missed, and was not filled)."""
        self._ghost.add(key, max(GHOST_MIN_KEYS, self.items // 2))

    # -- writes ------------------------------------------------------------

    def put(self, key: bytes, item: Item, expires_at: float, now: float = 0.0) -> bool:
        """Hold ``item`` until ``expires_at``, replacing the key's item; False (and the
        key's old item dropped) when it is larger than :attr:`max_item`. ``now``: items
        expired by then that eviction meets are not counted as evictions."""
        size = entry_size(key, len(item.value))
        entry = self._main.get(key)
        small = False
        if entry is None:
            entry = self._small.get(key)
            small = entry is not None
        if size > self.max_item:
            if entry is not None:
                self._remove(key)
            return False
        if entry is not None:  # in place: the queue position and frequency stay
            delta = size - entry[_SIZE]
            entry[_ITEM], entry[_EXP], entry[_SIZE] = item, expires_at, size
            self._items_bytes += delta
            if small:
                self._small_bytes += delta
        elif key in self._ghost:
            self._main[key] = [item, expires_at, size, 0]
            self._items_bytes += size
        else:
            self._small[key] = [item, expires_at, size, 0]
            self._items_bytes += size
            self._small_bytes += size
        if self.used_bytes > self.max_bytes:
            self._evict(now)
        return True

    def drop(self, key: bytes) -> bool:
        """Remove the key's item (an invalidation, not an eviction); True if held."""
        if key in self._main or key in self._small:
            self._remove(key)
            return True
        return False

    def clear(self) -> None:
        self._small.clear()
        self._main.clear()
        self._small_bytes = self._items_bytes = 0

    def resize(self, max_bytes: int) -> None:
        """A new budget; evicts down to it at once. The ghost filter is sized anew."""
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self._ghost = _ghost_for(max_bytes)
        for key in [k for k in self.keys() if entry_size(k, len(self._peek(k)[_ITEM].value)) > self.max_item]:
            self._remove(key)
        self._evict(0.0)

    # -- internals ---------------------------------------------------------

    def _peek(self, key: bytes) -> _Entry:
        entry = self._main.get(key)
        return entry if entry is not None else self._small[key]

    def _remove(self, key: bytes) -> None:
        entry = self._main.pop(key, None)
        if entry is None:
            entry = self._small.pop(key)
            self._small_bytes -= entry[_SIZE]
        self._items_bytes -= entry[_SIZE]

    def _evict(self, now: float) -> None:
        """S3-FIFO until the items and the ghost filter fit ``max_bytes``. An entry whose
        expiry is at or before ``now`` is dropped without counting as an eviction (``now``
        0: none is checked, as the monotonic clock of expiries is always positive)."""
        small, main = self._small, self._main
        small_limit = self.max_bytes * SMALL_SHARE
        limit = self.max_bytes - self._ghost.nbytes
        while self._items_bytes > limit and (small or main):
            if small and (self._small_bytes > small_limit or not main):
                key, entry = small.popitem(last=False)
                self._small_bytes -= entry[_SIZE]
                if entry[_FREQ] > 0:  # read while on probation: to the main queue
                    entry[_FREQ] = 0
                    main[key] = entry
                    continue
                self._items_bytes -= entry[_SIZE]
                self._ghost.add(key, max(GHOST_MIN_KEYS, self.items // 2))
                if entry[_EXP] > now:
                    self.evictions += 1
            else:
                key, entry = main.popitem(last=False)
                if entry[_FREQ] > 0:  # another turn
                    entry[_FREQ] -= 1
                    main[key] = entry
                    continue
                self._items_bytes -= entry[_SIZE]
                if entry[_EXP] > now:
                    self.evictions += 1


class LruTier(MemoryTier):
    """The same store, least recently used first out: the classic policy, for comparison."""

    policy = "lru"

    def get(self, key: bytes, now: float) -> Item | None:
        entry = self._main.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry[_EXP] <= now:
            self._remove(key)
            self.misses += 1
            return None
        self._main.move_to_end(key)
        self.hits += 1
        item: Item = entry[_ITEM]
        return item

    def put(self, key: bytes, item: Item, expires_at: float, now: float = 0.0) -> bool:
        size = entry_size(key, len(item.value))
        entry = self._main.pop(key, None)
        if entry is not None:
            self._items_bytes -= entry[_SIZE]
        if size > self.max_item:
            return False
        self._main[key] = [item, expires_at, size, 0]
        self._items_bytes += size
        self._evict(now)
        return True

    def _evict(self, now: float) -> None:
        limit = self.max_bytes - self._ghost.nbytes
        while self._items_bytes > limit and self._main:
            _, old = self._main.popitem(last=False)
            self._items_bytes -= old[_SIZE]
            if old[_EXP] > now:
                self.evictions += 1
