"""The migration from legacy memcached servers, without sockets (docs/migration.md).

The memory backend plays both sides: Momento (``inner``) and, behind
:class:`MemoryLegacy`, the legacy servers. Backfills run when the test says
(``spawn`` collects them), so every interleaving here is chosen, not timed.
The key placement is checked against libmemcached's own test vectors.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from typing import Any, Callable, Sequence

import pytest

from mproxy import backends
from mproxy.backends.base import BackendError, Item, MetaDelete, MetaGet, NonNumericValue, StoreResult
from mproxy.backends.memory import MemoryBackend
from mproxy.backends.migrate import hashing
from mproxy.backends.migrate.backend import DUAL_WRITE, SHADOW, WARMUP, MigratingBackend, backfill_exptime
from mproxy.backends.migrate.legacy import LegacyClient, LegacyItem
from mproxy.backends.tiered import TieredBackend
from mproxy.backends.tiered.memory import MemoryTier
from mproxy.config import ConfigError, loads
from mproxy.protocol.commands import StoreMode
from mproxy.stats import Stats, sum_exports
from tests.servers import FakeClock

# -- key placement --------------------------------------------------------------------------

#: libmemcached's tests/fixtures/hashes.hpp: its inputs and what each hash gives them.
HASH_INPUTS = [b"apple", b"beat", b"carrot", b"daikon", b"The quick brown fox jumps over the lazy dog"]
ONE_AT_A_TIME = [2297466611, 3902465932, 469785835, 1937308741, 1369346549]
MD5 = [3195025439, 2556848621, 3724893440, 3332385401, 2642219166]
CRC = [10542, 22009, 14526, 19510, 16719]
FNV1A_64 = [1488911807, 2500855813, 1510099634, 1390325195, 3890508048]

#: libmemcached's test/fixtures/ketama.hpp (``memcached_ketama_compat``, weighted ketama over
#: 10.0.1.1-8:11211 with weights 600, 300, 200, 350, 1000, 800, 950, 100): key, its MD5
#: hash, the continuum point it lands on, the server.
KETAMA_WEIGHTS = [600, 300, 200, 350, 1000, 800, 950, 100]
KETAMA_CASES = [
    (b"SVa_]_V41)", 443691461, 445379617, "10.0.1.7"),
    (b"*/Z;?V(.\\8", 1422915503, 1428303028, "10.0.1.1"),
    (b"30C1*Z*S/_", 1473165754, 1480075959, "10.0.1.2"),
    (b"ERR:EC58G>", 2148406511, 2168579133, "10.0.1.7"),
    (b"1I=cTMNTKF", 2882686667, 2885206587, "10.0.1.5"),
    (b"P1[Ma3=K1/", 1989324036, 1994028240, "10.0.1.8"),
    (b"D[HE+cFXDK", 2117036136, 2117124014, "10.0.1.3"),
    (b"EM75N0+[X1", 1558531507, 1559308507, "10.0.1.4"),
    (b"6,cEI`F_P>", 3972869246, 3974773167, "10.0.1.6"),
    (b"[1ZXONX2]a", 4108881567, 4109865744, "10.0.1.4"),
    (b"VD6D0]ba_\\", 3842502950, 3842588691, "10.0.1.1"),
]


def test_hash_functions_match_libhashkit() -> None:
    assert [hashing.one_at_a_time(k) for k in HASH_INPUTS] == ONE_AT_A_TIME
    assert [hashing.md5_hash(k) for k in HASH_INPUTS] == MD5
    assert [hashing.crc32_python_memcached(k) for k in HASH_INPUTS] == CRC
    assert [hashing.fnv1a_64(k) for k in HASH_INPUTS] == FNV1A_64


def test_ketama_places_keys_as_libmemcached_weighted_ketama() -> None:
    servers = [hashing.Server(f"10.0.1.{i + 1}", 11211, w) for i, w in enumerate(KETAMA_WEIGHTS)]
    ring = hashing.Ring(servers, "ketama")
    points = [point for point, _ in hashing.ketama_points(servers)]
    for key, key_hash, point, host in KETAMA_CASES:
        assert hashing.md5_hash(key) == key_hash
        assert min(p for p in points if p >= key_hash) == point
        assert ring.server(key).host == host, key
    # VDEAAAAA hashes past the last point: it wraps around to the first
    assert hashing.md5_hash(b"VDEAAAAA") > points[-1]
    assert ring.index(b"VDEAAAAA") == hashing.ketama_points(servers)[0][1]


def test_ketama_point_names_leave_out_the_default_port_only() -> None:
    default = hashing.ketama_points([hashing.Server("a", 11211), hashing.Server("b", 11211)])
    other = hashing.ketama_points([hashing.Server("a", 11212), hashing.Server("b", 11211)])
    assert len(default) == len(other) == 320
    assert {p for p, o in default if o == 1} == {p for p, o in other if o == 1}  # b unchanged
    assert {p for p, o in default if o == 0}.isdisjoint({p for p, o in other if o == 0})


def test_modula_and_weights() -> None:
    servers = [hashing.Server("a", 1), hashing.Server("b", 2), hashing.Server("c", 3)]
    ring = hashing.Ring(servers, "modula")
    assert [ring.index(k) for k in HASH_INPUTS] == [h % 3 for h in ONE_AT_A_TIME]
    weighted = hashing.Ring([hashing.Server("a", 1, 2), hashing.Server("b", 2)], "modula_crc32")
    assert [weighted.index(k) for k in HASH_INPUTS] == [[0, 0, 1][h % 3] for h in CRC]
    fnv = hashing.Ring(servers, "ketama_fnv1a_64")
    assert fnv.index(b"apple") == hashing.Ring(servers, "ketama")._owners[
        next(i for i, v in enumerate(hashing.Ring(servers, "ketama")._values) if v >= FNV1A_64[0])
    ]


def test_parse_server() -> None:
    assert hashing.parse_server("10.0.0.1:11211") == hashing.Server("10.0.0.1", 11211, 1)
    assert hashing.parse_server("cache-1:11212:3") == hashing.Server("cache-1", 11212, 3)
    assert hashing.parse_server("[::1]:11211:2") == hashing.Server("::1", 11211, 2)
    for bad in ("host", "host:0", "host:1:0", "host:x", ":1", "[::1"):
        with pytest.raises(ValueError):
            hashing.parse_server(bad)


def test_backfill_exptime() -> None:
    assert backfill_exptime(None) == 0  # not known: the cache's default TTL
    assert backfill_exptime(-1) == 0  # never expires: the default TTL (Momento needs one)
    assert backfill_exptime(1) is None and backfill_exptime(0) is None  # expiring: not copied
    assert backfill_exptime(100) == 99  # the legacy clock ticks once a second


# -- test doubles ---------------------------------------------------------------------------


class MemoryLegacy:
    """The legacy servers, as a memory backend (TTL and CAS from its meta get)."""

    timeout = 1.0

    def __init__(self, clock: FakeClock, meta: bool = True) -> None:
        self.store_ = MemoryBackend(clock=clock)
        self.meta = meta
        self.fail = False
        self.calls: list[str] = []
        #: called before each get_many (a test's interleaving)
        self.before_get: Callable[[Sequence[bytes]], None] | None = None

    def _check(self, what: str) -> None:
        self.calls.append(what)
        if self.fail:
            raise BackendError("legacy_unavailable", "legacy 127.0.0.1:1: refused")

    def get_many(self, keys: Sequence[bytes], failed: list[bytes] | None = None) -> dict[bytes, LegacyItem]:
        self._check("get")
        if self.before_get is not None:
            self.before_get(keys)
        out = {}
        for key in dict.fromkeys(keys):
            item = self.store_.meta_get(key, MetaGet(with_ttl=True))
            if item is not None:
                out[key] = LegacyItem(item.value, item.flags, item.cas, item.ttl if self.meta else None)
        return out

    def delete(self, key: bytes) -> bool:
        self._check("delete")
        return self.store_.delete(key)

    def store(self, mode: StoreMode, key: bytes, value: bytes, flags: int, exptime: int, cas_unique: int = 0) -> StoreResult:
        self._check(mode.value)
        return self.store_.store(mode, key, value, flags, exptime, cas_unique)

    def incr_decr(self, key: bytes, delta: int, incr: bool) -> int | None:
        self._check("incr")
        return self.store_.incr_decr(key, delta, incr)

    def touch(self, key: bytes, exptime: int) -> bool:
        self._check("touch")
        return self.store_.touch(key, exptime)

    def flush_all(self, delay: int = 0) -> None:
        self._check("flush_all")
        self.store_.flush_all(delay)

    def close(self) -> None:
        pass


class FlakyInner(MemoryBackend):
    """Momento as a memory backend whose writes can be made to fail or to run a hook."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.fail_writes = False
        self.on_add: Callable[[bytes], None] | None = None

    def store(self, mode: StoreMode, key: bytes, value: bytes, flags: int, exptime: int, cas_unique: int = 0) -> StoreResult:
        if self.fail_writes:
            raise BackendError("unavailable", "momento unavailable")
        if mode is StoreMode.ADD and self.on_add is not None:
            hook, self.on_add = self.on_add, None
            hook(key)
        return super().store(mode, key, value, flags, exptime, cas_unique)


class Rig:
    def __init__(self, mode: str = WARMUP, meta: bool = True, **kw: Any) -> None:
        self.clock = FakeClock(1_000_000.0)
        self.inner = FlakyInner(self.clock)
        self.legacy = MemoryLegacy(self.clock, meta)
        self.spawned: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.backend = MigratingBackend(
            self.inner, self.legacy, mode, clock=self.clock, spawn=self.spawn, **kw
        )

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        self.spawned.append((fn, args))

    def run_spawned(self) -> None:
        while self.spawned:
            fn, args = self.spawned.pop(0)
            fn(*args)

    def old(self, key: bytes, value: bytes, flags: int = 0, exptime: int = 0) -> None:
        """An item the legacy fleet holds from before the migration."""
        assert self.legacy.store_.store(StoreMode.SET, key, value, flags, exptime) is StoreResult.STORED

    def momento(self, key: bytes) -> Item | None:
        return self.inner.get_many([key], True).get(key)


# -- warmup ---------------------------------------------------------------------------------


def test_warmup_answers_misses_from_legacy_then_momento_serves_them_with_flags_and_ttl() -> None:
    rig = Rig()
    rig.old(b"k", b"v1", flags=42, exptime=100)
    b = rig.backend
    assert b.get_many([b"k", b"nope"]) == {b"k": Item(b"v1", 42, 0)}
    assert (b.reads_momento, b.reads_legacy, b.read_misses) == (0, 1, 1)
    assert rig.momento(b"k") is None  # backfilled after the answer
    rig.run_spawned()
    assert rig.momento(b"k") is not None and rig.momento(b"k").flags == 42  # type: ignore[union-attr]
    ttl = rig.inner.remaining_ttl([b"k"])[b"k"]
    assert ttl is not None and ttl <= 99  # never longer than the legacy item's 100 s
    assert b.backfills == 1
    rig.legacy.calls.clear()
    again = b.get_many([b"k"])[b"k"]
    assert (again.value, again.flags) == (b"v1", 42)
    assert rig.legacy.calls == []  # Momento answered
    assert (b.reads_momento, b.reads_legacy) == (1, 1)


def test_a_legacy_item_that_never_expires_gets_the_default_ttl_and_one_without_meta_too() -> None:
    for meta in (True, False):
        rig = Rig(meta=meta)
        rig.old(b"k", b"v")
        rig.backend.get_many([b"k"])
        rig.run_spawned()
        assert rig.momento(b"k") is not None


def test_gets_backfills_before_the_answer_so_cas_compares_momentos_unique() -> None:
    rig = Rig()
    rig.old(b"k", b"v", flags=3)
    found = rig.backend.get_many([b"k"], with_cas=True)
    held = rig.momento(b"k")
    assert held is not None and found[b"k"] == held  # Momento's CAS unique
    assert rig.backend.store(StoreMode.CAS, b"k", b"w", 3, 0, held.cas) is StoreResult.STORED
    assert rig.legacy.store_.get_many([b"k"]) == {}  # the legacy copy is gone


def test_a_write_invalidates_the_legacy_copy_so_no_miss_brings_an_older_value_back() -> None:
    rig = Rig()
    rig.old(b"k", b"old")
    b = rig.backend
    assert b.store(StoreMode.SET, b"k", b"new", 0, 0) is StoreResult.STORED
    assert rig.legacy.store_.get_many([b"k"]) == {}
    assert b.invalidations == 1
    rig.inner.delete(b"k")  # Momento loses the item (eviction, expiry)
    assert b.get_many([b"k"]) == {}  # a miss, not "old"


def test_delete_deletes_both_and_answers_deleted_when_either_had_the_key() -> None:
    rig = Rig()
    rig.old(b"only-legacy", b"v")
    b = rig.backend
    assert b.delete(b"only-legacy") is True
    assert b.get_many([b"only-legacy"]) == {}
    assert b.delete(b"only-legacy") is False
    b.store(StoreMode.SET, b"only-momento", b"v", 0, 0)
    assert b.delete(b"only-momento") is True
    assert b.meta_delete(b"only-momento", MetaDelete()).name == "NOT_FOUND"


def test_a_backfill_read_before_a_delete_is_dropped() -> None:
    rig = Rig()
    rig.old(b"k", b"old")
    b = rig.backend
    assert b.get_many([b"k"]) == {b"k": Item(b"old", 0, 0)}  # backfill queued
    assert b.delete(b"k") is True
    rig.run_spawned()
    assert rig.momento(b"k") is None and b.get_many([b"k"]) == {}
    assert b.backfill_races == 1 and b.backfills == 0  # dequeued by the write


def test_many_writes_of_other_keys_do_not_drop_a_waiting_backfill() -> None:
    rig = Rig()
    rig.old(b"k", b"v")
    b = rig.backend
    b.get_many([b"k"])  # backfill waiting
    for i in range(10000):
        b.store(StoreMode.SET, b"other%d" % i, b"x", 0, 0)
    assert len(b._written) < 10000  # pruned
    b.delete(b"k2")
    assert b._fill_ok(b"k", 0)
    rig.run_spawned()
    assert b.backfills == 1 and b.backfill_races == 0
    b.store(StoreMode.SET, b"k", b"new", 0, 0)
    for i in range(10000):
        b.store(StoreMode.SET, b"more%d" % i, b"x", 0, 0)
    assert len(b._written) < 20000


def test_a_backfill_read_before_a_set_never_overwrites_it() -> None:
    rig = Rig()
    rig.old(b"k", b"old")
    b = rig.backend
    # the legacy read of a miss happens, then a set runs before the backfill's add
    b.get_many([b"k"])
    pending = dict(b._pending)
    b._pending.clear()  # taken off the queue: its add is about to start
    b.store(StoreMode.SET, b"k", b"new", 0, 0)
    b._backfill(pending)  # the backfill, had it been taken off the queue already
    assert rig.momento(b"k").value == b"new"  # type: ignore[union-attr]
    assert b.backfill_races == 1


def test_a_write_elsewhere_during_the_add_is_detected_and_the_backfill_undone() -> None:
    """Another proxy deletes the key (legacy first, then Momento) while this one's add is
    in flight: the add lands after that delete, the check sees the legacy item gone."""
    rig = Rig()
    rig.old(b"k", b"old")
    b = rig.backend

    def other_proxy_deletes(key: bytes) -> None:
        rig.legacy.store_.delete(key)
        rig.inner.delete(key)

    rig.inner.on_add = other_proxy_deletes
    b.get_many([b"k"])
    rig.run_spawned()
    assert rig.momento(b"k") is None
    assert (b.backfills, b.backfill_races, b.backfill_undone) == (0, 1, 1)


def test_the_undo_keeps_a_newer_value_written_elsewhere() -> None:
    rig = Rig()
    rig.old(b"k", b"old")
    b = rig.backend

    def other_proxy_sets_after_the_add(keys: Sequence[bytes]) -> None:
        if b._filling:  # the check after the add: the other write has landed meanwhile
            rig.legacy.store_.delete(b"k")
            MemoryBackend.store(rig.inner, StoreMode.SET, b"k", b"newer", 0, 0)

    b.get_many([b"k"])
    rig.legacy.before_get = other_proxy_sets_after_the_add
    rig.run_spawned()
    assert rig.momento(b"k").value == b"newer"  # type: ignore[union-attr]
    assert b.backfill_undone == 1


@pytest.mark.parametrize(
    "call, expected, momento_value",
    [
        (lambda b: b.incr_decr(b"n", 5, True), 15, b"15"),
        (lambda b: b.store(StoreMode.APPEND, b"n", b"x", 0, 0), StoreResult.STORED, b"10x"),
        (lambda b: b.store(StoreMode.ADD, b"n", b"x", 0, 0), StoreResult.NOT_STORED, b"10"),
        (lambda b: b.store(StoreMode.REPLACE, b"n", b"x", 7, 0), StoreResult.STORED, b"x"),
        (lambda b: b.touch(b"n", 50), True, b"10"),
    ],
)
def test_a_write_that_depends_on_the_item_takes_it_from_legacy_first(call: Any, expected: Any, momento_value: bytes) -> None:
    rig = Rig()
    rig.old(b"n", b"10", flags=7, exptime=100)
    assert call(rig.backend) == expected
    held = rig.momento(b"n")
    assert held is not None and held.value == momento_value and held.flags == 7
    assert rig.legacy.store_.get_many([b"n"]) == {}


def test_keys_known_gone_from_legacy_cost_no_more_legacy_requests() -> None:
    rig = Rig()
    rig.old(b"k", b"old")
    b = rig.backend
    b.store(StoreMode.SET, b"k", b"1", 0, 0)  # deletes the legacy copy
    rig.legacy.calls.clear()
    b.store(StoreMode.SET, b"k", b"2", 0, 0)
    b.incr_decr(b"k", 1, True)
    rig.inner.delete(b"k")  # Momento loses it
    assert b.get_many([b"k"]) == {}
    assert b.get_many([b"never"]) == {} and b.get_many([b"never"]) == {}
    assert rig.legacy.calls == ["get"]  # only the first read of "never"
    assert b.read_misses == 3


def test_legacy_failures_are_misses_on_reads_and_errors_on_writes() -> None:
    rig = Rig()
    rig.old(b"k", b"v")
    rig.legacy.fail = True
    b = rig.backend
    assert b.get_many([b"k"]) == {}
    assert b.legacy_errors == 1 and b.read_misses == 1
    assert not b._gone  # not known gone: it was not answered
    with pytest.raises(BackendError):
        b.store(StoreMode.SET, b"k", b"new", 0, 0)
    assert rig.momento(b"k") is None  # nothing written: the legacy copy could not be dropped


def test_flush_all_leaves_the_legacy_servers_unless_asked() -> None:
    rig = Rig()
    rig.old(b"k", b"v")
    rig.backend.store(StoreMode.SET, b"m", b"v", 0, 0)
    rig.backend.flush_all()
    assert rig.momento(b"m") is None
    assert rig.legacy.store_.get_many([b"k"]) != {}
    rig = Rig(flush_legacy=True)
    rig.old(b"k", b"v")
    rig.backend.flush_all()
    assert rig.legacy.store_.get_many([b"k"]) == {}


def test_meta_get_on_a_legacy_hit_backfills_and_answers_momentos_item() -> None:
    rig = Rig()
    rig.old(b"k", b"v", flags=9)
    item = rig.backend.meta_get(b"k", MetaGet())
    held = rig.momento(b"k")
    assert item is not None and held is not None and (item.value, item.flags, item.cas) == (b"v", 9, held.cas)


# -- dual_write and shadow ---------------------------------------------------------------------


def test_dual_write_reads_legacy_and_writes_both() -> None:
    rig = Rig(DUAL_WRITE)
    b = rig.backend
    assert b.store(StoreMode.SET, b"k", b"v", 5, 100) is StoreResult.STORED
    assert rig.momento(b"k").value == b"v"  # type: ignore[union-attr]
    found = b.get_many([b"k"], with_cas=True)
    legacy_cas = rig.legacy.store_.get_many([b"k"], True)[b"k"].cas
    assert found == {b"k": Item(b"v", 5, legacy_cas)}  # the legacy servers' CAS unique
    assert b.store(StoreMode.CAS, b"k", b"w", 5, 100, legacy_cas) is StoreResult.STORED
    assert rig.momento(b"k").value == b"w"  # type: ignore[union-attr]
    rig.old(b"c", b"1")
    rig.inner.store(StoreMode.SET, b"c", b"1", 0, 0)
    assert b.incr_decr(b"c", 2, True) == 3
    assert rig.momento(b"c") is None  # dropped: warmup copies it again
    assert b.delete(b"k") is True and rig.momento(b"k") is None
    assert b.reads_legacy == 1 and b.reads_momento == 0


def test_dual_write_counts_momento_failures_and_answers_the_legacy_result() -> None:
    rig = Rig(DUAL_WRITE)
    rig.inner.store(StoreMode.SET, b"k", b"stale", 0, 0)
    rig.inner.fail_writes = True
    assert rig.backend.store(StoreMode.SET, b"k", b"v", 0, 0) is StoreResult.STORED
    assert rig.backend.momento_write_errors == 1
    assert rig.momento(b"k") is None  # the stale copy was dropped
    with pytest.raises(NonNumericValue):
        rig.backend.incr_decr(b"k", 1, True)


def test_shadow_compares_a_sampled_share_with_momento() -> None:
    rig = Rig(SHADOW, shadow_rate=0.5)
    rolls = iter([0.1, 0.9, 0.1])
    rig.backend._sample = lambda: next(rolls)
    rig.old(b"same", b"v")
    rig.inner.store(StoreMode.SET, b"same", b"v", 0, 0)
    rig.old(b"differs", b"a")
    rig.inner.store(StoreMode.SET, b"differs", b"b", 0, 0)
    rig.old(b"cold", b"v")
    rig.backend.get_many([b"same", b"differs", b"cold"])  # sampled
    rig.backend.get_many([b"same"])  # not sampled
    rig.backend.get_many([b"gone"])  # sampled: both miss
    rig.run_spawned()
    b = rig.backend
    assert (b.shadow_reads, b.shadow_mismatches, b.shadow_momento_misses) == (4, 1, 1)


# -- stats --------------------------------------------------------------------------------------


def test_stats_migration_shows_momentos_share_rising_and_sums_over_workers() -> None:
    rig = Rig()
    for i in range(10):
        rig.old(b"k%d" % i, b"v")
    keys = [b"k%d" % i for i in range(10)]
    rig.backend.get_many(keys)  # all from legacy
    rig.run_spawned()
    rig.clock.now += 120
    rig.backend.get_many(keys)  # all from Momento
    stats = Stats()
    st = stats.cache("c")
    st.attach_backend(rig.backend.stats)
    st.attach_migration(rig.backend.migration_window)
    snap = stats.migration_snapshot(now=rig.clock.now)
    assert snap["c:mode"] == "warmup"
    assert (snap["c:reads_momento_1m"], snap["c:reads_legacy_1m"], snap["c:momento_share_1m"]) == (10, 0, "1.0000")
    assert (snap["c:reads_momento_5m"], snap["c:reads_legacy_5m"], snap["c:momento_share_5m"]) == (10, 10, "0.5000")
    assert stats.snapshot()["migration_backfills"] == 10
    assert "mproxy_migration_reads_legacy_total{cache=\"c\"} 10" in stats.prometheus()
    summed = Stats.from_export(sum_exports([stats.export(), stats.export()], pid=1, started=0.0))
    snap2 = summed.migration_snapshot(now=rig.clock.now)
    assert (snap2["c:reads_momento_5m"], snap2["c:reads_legacy_5m"]) == (20, 20)
    assert summed.snapshot()["migration_reads_momento"] == 20


# -- config ---------------------------------------------------------------------------------------


def test_config_keys_and_checks() -> None:
    base = '[[cache]]\ncache_name = "c"\n'
    cache = loads(base + 'migrate_from = ["10.0.0.1:11211", "10.0.0.2:11211:2"]\nmigration_mode = "dual_write"\n').caches[0]
    assert cache.migrate_from == ("10.0.0.1:11211", "10.0.0.2:11211:2")
    assert (cache.migration_mode, cache.migration_hash, cache.migration_flush_legacy) == ("dual_write", "ketama", False)
    assert loads(base).caches[0].migrate_from == ()
    for bad, what in (
        ('migrate_from = ["nohost"]', "migrate_from"),
        ('migrate_from = "10.0.0.1:11211"', "migrate_from"),
        ('migrate_from = ["a:1", "a:1:2"]', "listed twice"),
        ('migrate_from = ["a:1"]\nbackend = "memory"', "backend"),
        ('migration_hash = "crc16"', "migration_hash"),
        ("migration_shadow_rate = 2", "migration_shadow_rate"),
    ):
        with pytest.raises(ConfigError, match=what):
            loads(base + bad + "\n")


# -- wiring -----------------------------------------------------------------------------------


def test_the_registry_puts_the_migration_in_front_of_the_backend() -> None:
    config = loads('[[cache]]\ncache_name = "c"\nbackend = "memory"\n')
    cache = dataclasses.replace(config.caches[0], migrate_from=("127.0.0.1:1", "127.0.0.1:2:3"), migration_mode="shadow")
    backend = backends.create("memory", cache, config)
    try:
        assert isinstance(backend, MigratingBackend) and isinstance(backend.inner, MemoryBackend)
        assert backend.mode == SHADOW and isinstance(backend.legacy, LegacyClient)
        assert [s.weight for s in backend.legacy.ring.servers] == [1, 3]
        assert getattr(backend, "set_peers", None) is None  # no tiers: nothing for the other workers
    finally:
        backend.close()
    assert not isinstance(backends.create("memory", config.caches[0], config), MigratingBackend)


def test_in_front_of_local_tiers_a_backfill_goes_through_them_and_the_workers_hooks_pass() -> None:
    clock = FakeClock(1_000_000.0)
    tiered = TieredBackend(MemoryBackend(clock=clock), MemoryTier(1 << 20), second_miss=False, clock=clock, wall=clock)
    legacy = MemoryLegacy(clock)
    legacy.store_.store(StoreMode.SET, b"k", b"v", 4, 100)
    backend = MigratingBackend(tiered, legacy)
    assert backend.set_peers == tiered.set_peers and backend.apply_remote == tiered.apply_remote
    found = backend.get_many([b"k"], with_cas=True)  # backfilled before the answer
    assert (found[b"k"].value, found[b"k"].flags) == (b"v", 4)
    assert backend.get_many([b"k"])[b"k"].value == b"v"
    assert tiered.memory.hits == 2  # the add kept a copy: the read after the backfill, then this one
    backend.store(StoreMode.SET, b"k", b"w", 0, 0)
    assert backend.get_many([b"k"])[b"k"].value == b"w"
    assert legacy.store_.get_many([b"k"]) == {}


def test_a_legacy_server_that_does_not_answer_times_out() -> None:
    with socket.socket() as silent:  # accepts (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        client = LegacyClient(hashing.Ring([hashing.Server("127.0.0.1", port)]), timeout=0.2)
        try:
            start = time.monotonic()
            with pytest.raises(BackendError) as caught:
                client.get_many([b"k"])
            assert caught.value.code == "legacy_timeout" and f"127.0.0.1:{port}" in str(caught.value)
            assert time.monotonic() - start < 5.0
            assert client.errors == 1
            with pytest.raises(BackendError, match="after a failure"):  # failing fast for a while
                client.delete(b"k")
            failed: list[bytes] = []
            assert client.get_many([b"k", b"j"], failed) == {} and sorted(failed) == [b"j", b"k"]
        finally:
            client.close()
