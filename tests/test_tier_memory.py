"""The memory tier's store: byte bound, S3-FIFO, expiry, resize, and what an item really costs."""

from __future__ import annotations

import bisect
import os
import random
import tracemalloc

import pytest

from mproxy.backends.base import Item
from mproxy.backends.tiered.memory import (
    ENTRY_OVERHEAD,
    GhostFilter,
    LruTier,
    MemoryTier,
    entry_size,
)

NEVER = float("inf")
#: the ghost filter of a small tier
GHOST = MemoryTier(1000)._ghost.nbytes


def item(value: bytes = b"v", flags: int = 0, cas: int = 1) -> Item:
    return Item(value, flags, cas)


def test_get_put_drop_and_counters() -> None:
    tier = MemoryTier(1 << 20)
    assert tier.get(b"k", 1.0) is None
    assert tier.put(b"k", item(b"value", 3, 7), NEVER)
    assert tier.get(b"k", 1.0) == Item(b"value", 3, 7)
    assert (tier.hits, tier.misses, tier.items) == (1, 1, 1)
    assert tier.used_bytes == entry_size(b"k", 5) + tier._ghost.nbytes
    assert tier.drop(b"k") and not tier.drop(b"k")
    assert tier.items == 0 and tier.evictions == 0  # a drop is not an eviction


def test_expired_items_are_never_returned() -> None:
    tier = MemoryTier(1 << 20)
    tier.put(b"k", item(), 10.0)
    assert tier.get(b"k", 9.999) is not None
    assert tier.get(b"k", 10.0) is None
    assert b"k" not in tier and tier.items == 0


def test_replacing_keeps_the_count_right() -> None:
    tier = MemoryTier(1 << 20)
    tier.put(b"k", item(b"a" * 100), NEVER)
    tier.put(b"k", item(b"b" * 10), NEVER)
    assert tier.items == 1 and tier.get(b"k", 0.0) == item(b"b" * 10)
    tier.clear()
    assert tier.items == 0 and tier.used_bytes == tier._ghost.nbytes


def test_never_holds_more_than_its_budget() -> None:
    budget = 200_000
    tier = MemoryTier(budget)
    rng = random.Random(1)
    for i in range(20_000):
        tier.put(b"key%d" % rng.randrange(5000), item(os.urandom(rng.randrange(0, 300))), NEVER, 1.0)
        if i % 3 == 0:
            tier.get(b"key%d" % rng.randrange(5000), 1.0)
        assert tier.used_bytes <= budget
    assert tier.evictions > 0


def test_an_item_larger_than_the_small_queue_is_not_kept() -> None:
    tier = MemoryTier(100_000)
    tier.put(b"k", item(b"small"), NEVER)
    assert not tier.put(b"k", item(b"x" * 20_000), NEVER)  # over 10 % of the budget
    assert b"k" not in tier  # and the old value is not left behind


def test_s3_fifo_keeps_what_is_read_and_lets_one_hit_wonders_go() -> None:
    size = entry_size(b"hot00", 10)
    tier = MemoryTier(size * 40 + GHOST)
    hot = [b"hot%02d" % i for i in range(10)]
    for key in hot:
        tier.put(key, item(b"v" * 10), NEVER)
        tier.get(key, 0.0)
    for i in range(1000):  # a scan of keys read once
        tier.put(b"one%02d" % (i % 100), item(b"v" * 10), NEVER)
        for key in hot[: 1 + i % 10]:
            tier.get(key, 0.0)
    assert all(key in tier for key in hot)
    lru = LruTier(size * 40 + GHOST)
    assert lru.policy == "lru" and tier.policy == "s3-fifo"


def test_a_key_that_left_recently_comes_back_to_the_main_queue() -> None:
    size = entry_size(b"k000", 1)
    tier = MemoryTier(size * 20 + GHOST)
    for i in range(30):
        tier.put(b"k%03d" % i, item(), NEVER)
    assert b"k000" not in tier and tier.seen(b"k000")  # evicted from the small queue: in the ghost filter
    tier.put(b"k000", item(), NEVER)
    assert b"k000" in tier._main
    assert not tier.seen(b"never-seen")
    tier.remember(b"never-seen")
    assert tier.seen(b"never-seen")


def test_resize_evicts_down_at_once() -> None:
    tier = MemoryTier(1 << 20)
    for i in range(1000):
        tier.put(b"k%04d" % i, item(b"x" * 100), NEVER)
    tier.resize(100_000)
    assert tier.used_bytes <= 100_000 and tier.max_bytes == 100_000
    assert 0 < tier.items < 1000 and tier.evictions == 1000 - tier.items
    with pytest.raises(ValueError):
        tier.resize(0)


def test_ghost_filter_rotates_and_stays_small() -> None:
    ghost = GhostFilter(1000)
    assert ghost.nbytes <= 4 * 1000
    for i in range(1000):
        ghost.add(b"a%d" % i)
    assert all(b"a%d" % i in ghost for i in range(1000))  # now the previous generation
    for i in range(1000):
        ghost.add(b"b%d" % i)
    assert sum(b"a%d" % i in ghost for i in range(1000)) < 100  # two generations later: gone (false positives aside)
    false = sum(b"c%d" % i in ghost for i in range(10_000))
    assert false < 600  # about 2 % at 8 bits and 3 probes per key


def test_bytes_counts_what_the_items_really_take() -> None:
    """ENTRY_OVERHEAD is what an item costs in this process (tracemalloc), worst case
    included: every item moved from the small queue to the main one (the small queue's
    table keeps its size)."""
    n = 20_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tier = MemoryTier(1 << 30)
        for i in range(n):
            tier.put(b"key:%08d" % i, Item(os.urandom(50), 5, 2**62 + i), 1e9 + i)
        for i in range(0, n, 2):
            tier.get(b"key:%08d" % i, 1.0)
        tier.resize(tier.used_bytes - 1)
        real = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert real <= tier.used_bytes, (real, tier.used_bytes, ENTRY_OVERHEAD)
    assert real > 0.8 * tier.used_bytes  # and not wildly above it either


def _zipf(n: int, seed: int) -> list[int]:
    weights = [1.0 / (i + 1) for i in range(n)]
    total = sum(weights)
    cdf, acc = [], 0.0
    for w in weights:
        acc += w / total
        cdf.append(acc)
    rng = random.Random(seed)
    return [min(bisect.bisect_left(cdf, rng.random()), n - 1) for _ in range(60_000)]


def test_s3_fifo_beats_lru_on_a_zipf_load() -> None:
    """The bench's read-heavy load in miniature: zipf 1.0 over 4,000 keys, a tier of a
    quarter of them, 1 set : 20 gets, a miss filled. scripts/tier_hit_ratio.py has the
    full-size figures."""
    keys = 4000
    size = entry_size(b"key:0000", 64)

    def run(tier: MemoryTier) -> float:
        for i in range(keys):
            tier.put(b"key:%04d" % i, item(b"v" * 64), NEVER, 1.0)
        hits = gets = 0
        rng = random.Random(7)
        for k in _zipf(keys, 3):
            key = b"key:%04d" % k
            if rng.randrange(21) == 0:
                tier.put(key, item(b"v" * 64), NEVER, 1.0)
                continue
            gets += 1
            if tier.get(key, 1.0) is not None:
                hits += 1
            else:
                tier.put(key, item(b"v" * 64), NEVER, 1.0)
        return hits / gets

    budget = size * keys // 4
    s3 = run(MemoryTier(budget + GhostFilter(int(budget / 256)).nbytes))
    lru = run(LruTier(budget + GhostFilter(int(budget / 256)).nbytes))
    assert s3 > lru + 0.01, (s3, lru)
