"""The disk tier: SQLite file, checksums, restarts, bounds, and a disk that blocks.

DiskStore is exercised on real files under tmp_path; DiskTier also with store
doubles whose calls block on an event or fail, to show the hub keeps serving
and nothing stale is read. The reads and writes run on gevent's thread pool:
these tests need no monkey-patching.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import gevent
import pytest

from mproxy.backends.base import ANSWERED_BY, Item
from mproxy.backends.memory import MemoryBackend
from mproxy.backends.tiered import TieredBackend
from mproxy.backends.tiered import disk as disk_module
from mproxy.backends.tiered.disk import DiskStore, DiskTier, open_tier, row_size
from mproxy.backends.tiered.memory import MemoryTier
from mproxy.protocol.commands import StoreMode

IDENTITY = "momento|c|embedded|flags=True|"
LATER = 4_000_000_000.0  # an expiry far ahead (Unix time)


def put_all(tier: DiskTier, items: dict[bytes, Item], expires: float = LATER) -> None:
    for key, item in items.items():
        tier.put(key, item, expires)
    flush(tier)


def flush(tier: DiskTier) -> None:
    """Wait for the write queue to drain (the drainer greenlet, on a thread)."""
    while tier._drainer is not None:
        tier._drainer.join()


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "tier" / "mproxy-c-w1.sqlite3")


def test_items_round_trip_and_expired_rows_are_never_served(path: str) -> None:
    tier = open_tier(path, 1 << 20, IDENTITY)
    put_all(tier, {b"a": Item(b"va", 3, 2**63 - 1), b"b": Item(b"", 0, 1)})
    tier.put(b"old", Item(b"v", 0, 1), time.time() - 1)
    flush(tier)
    assert tier.get_many([b"a", b"b", b"old", b"none"]) == {
        b"a": (Item(b"va", 3, 2**63 - 1), LATER),
        b"b": (Item(b"", 0, 1), LATER),
    }
    assert (tier.hits, tier.misses) == (2, 2)
    flush(tier)
    assert tier.items == 2  # the expired row was deleted when read
    assert tier.used_bytes == row_size(b"a", 2) + row_size(b"b", 0)
    tier.close()


def test_a_clean_restart_is_warm_and_serves_nothing_expired(path: str) -> None:
    tier = open_tier(path, 1 << 20, IDENTITY)
    put_all(tier, {b"a": Item(b"1", 0, 1)})
    soon = time.time() + 3600
    tier.put(b"b", Item(b"2", 0, 1), soon)
    flush(tier)
    tier.close()
    with sqlite3.connect(path) as conn:  # while mproxy was stopped, b's time ran out
        row = conn.execute("SELECT flags, cas FROM items WHERE key = ?", (b"b",)).fetchone()
        past = time.time() - 1
        conn.execute(
            "UPDATE items SET expires = ?, checksum = ? WHERE key = ?",
            (past, disk_module.checksum(b"b", b"2", row[0], row[1], past), b"b"),
        )
    again = open_tier(path, 1 << 20, IDENTITY)
    assert again.store.emptied == ""
    assert again.get_many([b"a", b"b"]) == {b"a": (Item(b"1", 0, 1), LATER)}
    assert again.items == 1
    again.close()


def test_a_file_not_closed_cleanly_or_of_another_cache_is_emptied(path: str) -> None:
    tier = open_tier(path, 1 << 20, IDENTITY)
    put_all(tier, {b"a": Item(b"1", 0, 1)})
    tier._writes.spawn(tier.store._close_connections).get()  # as a crash leaves it: no clean mark
    crashed = open_tier(path, 1 << 20, IDENTITY)
    assert "not closed cleanly" in crashed.store.emptied and crashed.items == 0
    put_all(crashed, {b"a": Item(b"1", 0, 1)})
    crashed.close()
    other = open_tier(path, 1 << 20, IDENTITY + "another")
    assert "another cache" in other.store.emptied and other.get_many([b"a"]) == {}
    other.close()


def test_a_corrupted_row_is_ignored_counted_and_deleted(path: str) -> None:
    tier = open_tier(path, 1 << 20, IDENTITY)
    put_all(tier, {b"a": Item(b"good value", 0, 1), b"b": Item(b"fine", 0, 1)})
    with sqlite3.connect(path) as conn:  # a bit flips on the disk
        conn.execute("UPDATE items SET value = ? WHERE key = ?", (b"good valuf", b"a"))
    assert tier.get_many([b"a", b"b"]) == {b"b": (Item(b"fine", 0, 1), LATER)}
    assert tier.corrupt == 1
    flush(tier)
    assert tier.items == 1
    tier.close()


def test_a_damaged_file_is_moved_aside(path: str) -> None:
    os.makedirs(os.path.dirname(path))
    Path(path).write_bytes(b"this is not a database" * 100)
    tier = open_tier(path, 1 << 20, IDENTITY)
    assert tier.store.emptied.startswith("damaged")
    assert any(".damaged-" in name for name in os.listdir(os.path.dirname(path)))
    put_all(tier, {b"a": Item(b"1", 0, 1)})
    assert tier.get_many([b"a"])
    tier.close()


def test_the_file_stays_within_its_budget(path: str) -> None:
    budget = 2 << 20
    tier = open_tier(path, budget, IDENTITY)
    value = os.urandom(1000)
    for i in range(10):
        put_all(tier, {b"key:%06d" % (i * 500 + j): Item(value, 0, 1) for j in range(500)})
        assert tier.used_bytes <= budget
    assert tier.evictions > 0 and tier.items < 5000
    assert tier.get_many([b"key:004999"]) and not tier.get_many([b"key:000000"])  # the oldest went first
    tier.close()
    size = sum(os.path.getsize(path + suffix) for suffix in ("", "-wal") if os.path.exists(path + suffix))
    assert size <= budget * 1.5 + 256 * 1024, size


class BlockingStore:
    """A DiskStore double: ``read_gate`` / ``write_gate`` hold reads / writes until set
    (threading events: the calls run on the tier's OS threads); ``fail`` makes writes raise."""

    def __init__(self) -> None:
        self.rows: dict[bytes, tuple[Item, float]] = {}
        self.read_gate = threading.Event()
        self.read_gate.set()
        self.write_gate = threading.Event()
        self.write_gate.set()
        self.fail: Exception | None = None
        self.items = self.used_bytes = self.evictions = 0
        self.max_bytes = 1 << 20
        self.emptied = ""
        self.applied: list[tuple[Any, ...]] = []

    def open(self) -> None:
        pass

    def get_many(self, keys: Sequence[bytes], now: float) -> tuple[dict[bytes, tuple[Item, float]], list[bytes], list[bytes]]:
        self.read_gate.wait()
        return {k: self.rows[k] for k in keys if k in self.rows}, [], []

    def apply(self, ops: Sequence[tuple[Any, ...]], now: float) -> None:
        self.write_gate.wait()
        if self.fail is not None:
            raise self.fail
        for op in ops:
            self.applied.append(op)
            if op[0] == "put":
                self.rows[op[1]] = (op[2], op[3])
            elif op[0] == "del":
                self.rows.pop(op[1], None)
            else:
                self.rows.clear()

    def resize(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def close(self, clean: bool) -> None:
        self.closed_clean = clean


def test_a_disk_that_blocks_does_not_stall_the_hub() -> None:
    store = BlockingStore()
    tier = DiskTier(store, read_timeout=0.05)  # type: ignore[arg-type]
    store.rows[b"k"] = (Item(b"v", 0, 1), LATER)
    assert tier.get_many([b"k"]) == {b"k": (Item(b"v", 0, 1), LATER)}
    store.read_gate.clear()  # the disk hangs
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.001)) for _ in range(10)])
    assert tier.get_many([b"k"]) == {}  # a miss after read_timeout, not a hang
    assert tier.timeouts == 1
    ticker.join()
    assert len(ticks) == 10  # the hub served others meanwhile
    for _ in range(disk_module.MAX_READS):
        tier.get_many([b"k"])
    assert tier._reading == disk_module.MAX_READS  # stuck reads are counted ...
    before = tier.timeouts
    assert tier.get_many([b"k"]) == {} and tier.timeouts == before + 1  # ... and past MAX_READS, a miss at once
    store.read_gate.set()
    gevent.sleep(0.01)
    while tier._reading:
        gevent.sleep(0.01)
    assert tier.get_many([b"k"]) == {b"k": (Item(b"v", 0, 1), LATER)}
    tier.close()


def test_writes_are_queued_bounded_and_deletes_never_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(disk_module, "MAX_PUTS", 10)
    monkeypatch.setattr(disk_module, "MAX_QUEUE", 30)
    store = BlockingStore()
    store.write_gate.clear()
    tier = DiskTier(store)  # type: ignore[arg-type]
    for i in range(20):
        tier.put(b"k%d" % i, Item(b"v", 0, 1), LATER)
    gevent.sleep(0)
    assert tier.dropped_writes > 0 and tier.queued <= 10
    assert not tier.readable(b"k5")  # queued: its row is not read meanwhile
    for i in range(40):
        tier.delete(b"d%d" % i)  # past MAX_QUEUE: the queue becomes "empty the file"
    assert tier._clearing and not tier.readable(b"anything")
    store.write_gate.set()
    flush(tier)
    assert store.applied[-1] == ("clear",) and tier.readable(b"anything")
    tier.close()


def test_a_failed_write_empties_the_file_and_a_failed_emptying_turns_the_tier_off() -> None:
    store = BlockingStore()
    tier = DiskTier(store)  # type: ignore[arg-type]
    store.rows[b"stale"] = (Item(b"v", 0, 1), LATER)
    store.fail = OSError("I/O error")
    tier.delete(b"stale")  # a delete that fails: the row may still be there
    gevent.sleep(0)
    flush(tier)
    assert tier.errors >= 2 and tier.broken  # the emptying failed too: off
    assert tier.get_many([b"stale"]) == {}
    store.fail = None
    tier.put(b"x", Item(b"v", 0, 1), LATER)
    assert tier.queued == 0  # nothing more is written to a broken tier
    tier.close()


def test_a_held_key_is_not_read_until_released() -> None:
    store = BlockingStore()
    tier = DiskTier(store)  # type: ignore[arg-type]
    store.rows[b"k"] = (Item(b"old", 0, 1), LATER)
    tier.hold(b"k")
    assert tier.get_many([b"k"]) == {}
    tier.release(b"k", (Item(b"new", 0, 2), LATER))
    flush(tier)
    assert tier.get_many([b"k"]) == {b"k": (Item(b"new", 0, 2), LATER)}
    tier.hold(b"k")
    tier.release(b"k", None)
    flush(tier)
    assert b"k" not in store.rows
    tier.close()
    assert store.closed_clean


# -- behind the memory tier -------------------------------------------------------------


def tiered(inner: MemoryBackend, path: str, **kwargs: Any) -> TieredBackend:
    return TieredBackend(
        inner, MemoryTier(1 << 20), disk=open_tier(path, 4 << 20, IDENTITY), second_miss=False, **kwargs
    )


def test_disk_hits_are_promoted_and_survive_a_restart(path: str) -> None:
    inner = MemoryBackend()
    tier = tiered(inner, path)
    tier.store(StoreMode.SET, b"k", b"v", 5, 0)
    flush(tier.disk)  # type: ignore[arg-type]
    tier.close()
    inner.store(StoreMode.SET, b"k", b"behind", 0, 0)  # not what the disk tier holds: shows who answered
    again = tiered(inner, path)  # a restart: an empty memory tier, the same file
    assert again.get_many([b"k"]) == {b"k": Item(b"v", 5, 1)}
    assert ANSWERED_BY.get() == "disk"
    assert again.get_many([b"k"]) == {b"k": Item(b"v", 5, 1)} and ANSWERED_BY.get() == "memory"  # promoted
    stats = again.stats()
    assert (stats["disk_cache_hits"], stats["memory_cache_hits"], stats["disk_cache_items"]) == (1, 1, 1)
    again.close()


def test_a_write_reaches_the_disk_tier_before_anyone_reads_it(path: str) -> None:
    inner = MemoryBackend()
    tier = tiered(inner, path)
    tier.store(StoreMode.SET, b"k", b"one", 0, 0)
    flush(tier.disk)  # type: ignore[arg-type]
    tier.store(StoreMode.APPEND, b"k", b"+", 0, 0)  # no copy kept: the disk row is deleted
    tier.memory.clear()
    assert tier.get_many([b"k"])[b"k"].value == b"one+"  # never the disk's "one"
    tier.apply_remote(("inv", (b"k",), 0.0))
    tier.store(StoreMode.SET, b"j", b"v", 0, 0)
    tier.flush_all(0)
    tier.memory.clear()
    assert tier.get_many([b"j"]) == {}
    tier.close()


def test_tier_ttls_bound_the_disk_copy(path: str) -> None:
    inner = MemoryBackend()
    tier = tiered(inner, path, memory_ttl=10.0, disk_ttl=100.0)
    before = time.time()
    tier.store(StoreMode.SET, b"k", b"v", 0, 0)
    flush(tier.disk)  # type: ignore[arg-type]
    row = tier.disk.get_many([b"k"])[b"k"]  # type: ignore[union-attr]
    assert before + 100 <= row[1] <= time.time() + 100
    tier.close()
