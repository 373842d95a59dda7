"""TieredBackend over an in-process backend: reads, fills, TTLs, the write protocol, races.

The backend behind is the memory backend, wrapped by :class:`Inner`, which counts
calls and can hold a call on an event or fail it after it applied (what a
timed-out write does). Clocks are fake (``tests.servers.FakeClock``); the races
are driven with gevent events, never with sleeps. The tier's own store, the
disk tier and the Momento backend behind have tests of their own
(test_tier_memory.py, test_tier_disk.py, test_tier_momento.py).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import gevent
import pytest
from gevent.event import Event

from mproxy.backends.base import (
    ANSWERED_BY,
    BackendError,
    Item,
    MetaArith,
    MetaDelete,
    MetaGet,
    MetaStatus,
    MetaStore,
    StoreResult,
)
from mproxy.backends.memory import MemoryBackend
from mproxy.backends.tiered import TieredBackend
from mproxy.backends.tiered.memory import MemoryTier
from mproxy.protocol.commands import StoreMode
from tests.servers import FakeClock

S = StoreMode
R = StoreResult


class Inner:
    """The memory backend, each call counted; ``gates[name]`` holds calls of that method
    until the event is set, ``after[name]`` the same once the call has applied (its
    answer held back); ``fail[name]`` raises after the call applied."""

    def __init__(self, clock: FakeClock) -> None:
        self.backend = MemoryBackend(clock=clock)
        self.calls: Counter[str] = Counter()
        self.gates: dict[str, Event] = {}
        self.after: dict[str, Event] = {}
        self.fail: dict[str, BaseException] = {}
        self.blocking = True

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.backend, name)
        if not callable(target):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            gate = self.gates.get(name)
            if gate is not None:
                gate.wait()
            result = target(*args, **kwargs)
            held = self.after.get(name)
            if held is not None:
                held.wait()
            err = self.fail.get(name)
            if err is not None:
                raise err
            return result

        return call


class Peers:
    """The other workers: records messages (and whether the write had returned by then)."""

    def __init__(self) -> None:
        self.messages: list[tuple[Any, ...]] = []
        self.error: Exception | None = None

    def __call__(self, message: tuple[Any, ...]) -> None:
        self.messages.append(message)
        if self.error is not None:
            raise self.error


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_000_000.0)


@pytest.fixture
def inner(clock: FakeClock) -> Inner:
    return Inner(clock)


def make(inner: Inner, clock: FakeClock, **kwargs: Any) -> TieredBackend:
    kwargs.setdefault("second_miss", False)
    kwargs.setdefault("memory", MemoryTier(1 << 20))
    memory = kwargs.pop("memory")
    return TieredBackend(inner, memory, clock=clock, wall=clock, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def tier(inner: Inner, clock: FakeClock) -> TieredBackend:
    return make(inner, clock, memory_ttl=60.0)


def settle() -> None:
    """Let the fill greenlet run (it has nothing to wait for: the backend is in-process)."""
    gevent.sleep(0)
    gevent.sleep(0)


def local(tier: TieredBackend, key: bytes) -> Item | None:
    """The memory tier's copy, without counting a lookup."""
    entry = tier.memory._main.get(key) or tier.memory._small.get(key)
    return None if entry is None else entry[0]


# -- reads and fills -----------------------------------------------------------------------


def test_a_miss_reads_the_backend_then_keeps_a_copy_after_answering(tier: TieredBackend, inner: Inner) -> None:
    inner.backend.store(S.SET, b"k", b"v", 5, 100)  # written by someone else
    assert tier.get_many([b"k"]) == {b"k": Item(b"v", 5, 1)}
    assert ANSWERED_BY.get() == "backend"
    assert local(tier, b"k") is None  # not yet: its remaining TTL is asked after the answer
    settle()
    assert local(tier, b"k") == Item(b"v", 5, 1)
    assert inner.calls["remaining_ttl"] == 1
    assert tier.get_many([b"k"], True) == {b"k": Item(b"v", 5, 1)}
    assert ANSWERED_BY.get() == "memory"
    assert inner.calls["get_many"] == 1
    stats = tier.stats()
    assert (stats["memory_cache_hits"], stats["memory_cache_misses"], stats["memory_cache_fills"]) == (1, 1, 1)
    assert (stats["memory_cache_items"], stats["memory_cache_ttl_lookups"]) == (1, 1)
    assert stats["memory_cache_limit_bytes"] == 1 << 20 and stats["memory_cache_bytes"] > 0


def test_a_miss_is_kept_on_the_second_miss_only_by_default(inner: Inner, clock: FakeClock) -> None:
    tier = make(inner, clock, second_miss=True)
    inner.backend.store(S.SET, b"k", b"v", 0, 100)
    tier.get_many([b"k"])
    settle()
    assert local(tier, b"k") is None and inner.calls["remaining_ttl"] == 0  # one read: no call spent on it
    tier.get_many([b"k"])
    settle()
    assert local(tier, b"k") is not None and inner.calls["remaining_ttl"] == 1


def test_a_multi_get_reads_the_missing_keys_in_one_call(tier: TieredBackend, inner: Inner) -> None:
    for key in (b"a", b"b", b"c"):
        tier.store(S.SET, key, key, 0, 0)
    tier.memory.drop(b"b")
    inner.backend.store(S.SET, b"d", b"d", 0, 0)
    found = tier.get_many([b"a", b"b", b"c", b"d", b"e", b"a"])
    assert set(found) == {b"a", b"b", b"c", b"d"}
    assert inner.calls["get_many"] == 1  # b and d: one read (the second get found them kept)


def test_a_backend_without_remaining_ttl_keeps_only_what_this_proxy_writes(inner: Inner, clock: FakeClock) -> None:
    tier = make(inner, clock, use_remaining_ttl=False)
    inner.backend.store(S.SET, b"theirs", b"v", 0, 100)
    tier.get_many([b"theirs"])
    settle()
    assert local(tier, b"theirs") is None  # its TTL cannot be known: never kept
    tier.store(S.SET, b"mine", b"v", 0, 100)
    assert local(tier, b"mine") == inner.backend.get_many([b"mine"])[b"mine"]


# -- TTLs: a copy never outlives the item, nor the tier's TTL ---------------------------


@pytest.mark.parametrize("written_here", [True, False], ids=["written-here", "written-elsewhere"])
def test_an_item_ttl_shorter_than_the_tiers_ends_the_copy(
    tier: TieredBackend, inner: Inner, clock: FakeClock, written_here: bool
) -> None:
    if written_here:
        tier.store(S.SET, b"k", b"v", 0, 5)
    else:
        inner.backend.store(S.SET, b"k", b"v", 0, 5)
        tier.get_many([b"k"])
        settle()
    assert local(tier, b"k") is not None
    clock.now += 4.9
    assert tier.get_many([b"k"]) and ANSWERED_BY.get() == "memory"
    clock.now += 0.1  # the item's 5 s are over, the tier's 60 s are not
    assert tier.get_many([b"k"]) == {}
    assert ANSWERED_BY.get() == "backend"


@pytest.mark.parametrize("written_here", [True, False], ids=["written-here", "written-elsewhere"])
def test_a_tier_ttl_shorter_than_the_items_ends_the_copy(
    tier: TieredBackend, inner: Inner, clock: FakeClock, written_here: bool
) -> None:
    if written_here:
        tier.store(S.SET, b"k", b"v", 0, 1000)
    else:
        inner.backend.store(S.SET, b"k", b"v", 0, 1000)
        tier.get_many([b"k"])
        settle()
    inner.backend.store(S.SET, b"k", b"theirs", 0, 1000)  # another client's write
    clock.now += 59.9
    assert tier.get_many([b"k"])[b"k"].value == b"v"  # seen after at most the tier's TTL...
    clock.now += 0.1
    assert tier.get_many([b"k"])[b"k"].value == b"theirs"  # ...and no later
    assert ANSWERED_BY.get() == "backend"


def test_no_tier_ttl_means_the_items_own(inner: Inner, clock: FakeClock) -> None:
    tier = make(inner, clock)  # memory_ttl 0: momento-proxy's "no expiration"
    tier.store(S.SET, b"forever", b"v", 0, 0)  # the memory backend keeps exptime 0 for ever
    tier.store(S.SET, b"brief", b"v", 0, 30)
    clock.now += 10_000
    assert set(tier.get_many([b"forever", b"brief"])) == {b"forever"}
    assert ANSWERED_BY.get() == "backend"  # brief was gone locally, and asked for


def test_exptime_zero_on_a_backend_with_a_default_ttl(inner: Inner, clock: FakeClock) -> None:
    tier = make(inner, clock, default_ttl=900.0, max_ttl=3600.0)  # Momento's rule
    tier.store(S.SET, b"k", b"v", 0, 0)
    tier.store(S.SET, b"long", b"v", 0, 86_400)
    assert tier.memory.expires_at(b"k") == pytest.approx(clock.now + 900)
    assert tier.memory.expires_at(b"long") == pytest.approx(clock.now + 3600)


def test_a_write_in_the_past_keeps_nothing(tier: TieredBackend) -> None:
    tier.store(S.SET, b"k", b"v", 0, 0)
    assert tier.store(S.SET, b"k", b"v2", 0, -1) is R.STORED
    assert local(tier, b"k") is None and tier.get_many([b"k"]) == {}


# -- every write keeps the copy right ----------------------------------------------------


def _warm(tier: TieredBackend, inner: Inner) -> None:
    """k holds "5" here and behind, and a stale copy of it is kept... unless a write fixes it."""
    tier.store(S.SET, b"k", b"5", 7, 0)
    assert local(tier, b"k") is not None
    inner.backend.store(S.SET, b"k", b"10", 7, 0)  # another client: the kept copy is stale now


WRITES: dict[str, Callable[[TieredBackend], Any]] = {
    "set": lambda t: t.store(S.SET, b"k", b"new", 1, 0),
    "add": lambda t: t.store(S.ADD, b"k", b"new", 1, 0),
    "replace": lambda t: t.store(S.REPLACE, b"k", b"new", 1, 0),
    "append": lambda t: t.store(S.APPEND, b"k", b"+", 0, 0),
    "prepend": lambda t: t.store(S.PREPEND, b"k", b"+", 0, 0),
    "cas": lambda t: t.store(S.CAS, b"k", b"new", 1, 0, t.inner.backend.get_many([b"k"])[b"k"].cas),
    "cas-exists": lambda t: t.store(S.CAS, b"k", b"new", 1, 0, 999_999),
    "incr": lambda t: t.incr_decr(b"k", 1, True),
    "decr": lambda t: t.incr_decr(b"k", 1, False),
    "touch": lambda t: t.touch(b"k", 100),
    "gat": lambda t: t.touch_many([b"k", b"k"], 100),
    "gat-past": lambda t: t.touch_many([b"k"], -1),
    "delete": lambda t: t.delete(b"k"),
    "flush_all": lambda t: t.flush_all(0),
    "ms": lambda t: t.meta_store(b"k", b"new", MetaStore(flags=2)),
    "ms-append": lambda t: t.meta_store(b"k", b"+", MetaStore(mode=S.APPEND)),
    "ms-invalidate": lambda t: t.meta_store(b"k", b"new", MetaStore(mode=S.CAS, compare_cas=1, invalidate=True)),
    "md": lambda t: t.meta_delete(b"k", MetaDelete()),
    "md-invalidate": lambda t: t.meta_delete(b"k", MetaDelete(invalidate=True)),
    "ma": lambda t: t.meta_arith(b"k", MetaArith(delta=3)),
    "mg-touch": lambda t: t.meta_get(b"k", MetaGet(touch=100)),
}


@pytest.mark.parametrize("write", list(WRITES), ids=list(WRITES))
def test_every_write_leaves_the_copy_equal_to_the_backend(tier: TieredBackend, inner: Inner, write: str) -> None:
    _warm(tier, inner)
    WRITES[write](tier)
    behind = inner.backend.get_many([b"k"])
    copy = local(tier, b"k")
    assert copy is None or behind.get(b"k") == copy, (copy, behind)
    assert tier.get_many([b"k"], True) == behind
    assert inner.backend.remaining_ttl([b"k"]).keys() == behind.keys()


@pytest.mark.parametrize("mode", [S.SET, S.ADD, S.REPLACE, S.CAS])
def test_a_stored_item_is_kept_with_the_backends_cas_unique(tier: TieredBackend, inner: Inner, mode: StoreMode) -> None:
    if mode is not S.ADD:
        inner.backend.store(S.SET, b"k", b"old", 0, 0)
    cas = inner.backend.get_many([b"k"]).get(b"k", Item(b"", 0, 0)).cas
    assert tier.store(mode, b"k", b"new", 9, 0, cas) is R.STORED
    assert local(tier, b"k") == inner.backend.get_many([b"k"])[b"k"] == Item(b"new", 9, inner.backend._cas)
    assert inner.calls["get_many"] == 0  # nothing read to know it


def test_flags_are_kept_as_the_backend_reads_them_back(inner: Inner, clock: FakeClock) -> None:
    tier = make(inner, clock, keeps_flags=False)  # Momento with flags = false reads flags 0
    tier.store(S.SET, b"k", b"v", 42, 0)
    assert local(tier, b"k") == Item(b"v", 0, inner.backend._cas)


# -- failures and races --------------------------------------------------------------------


def test_a_failed_write_leaves_no_stale_copy_and_blocks_fills_for_a_while(
    tier: TieredBackend, inner: Inner, clock: FakeClock
) -> None:
    tier.store(S.SET, b"k", b"old", 0, 0)
    inner.fail["meta_store"] = BackendError("timeout", "momento timeout after 5s on set")
    with pytest.raises(BackendError):
        tier.store(S.SET, b"k", b"new", 0, 0)  # applied behind, then timed out
    del inner.fail["meta_store"]
    assert tier.get_many([b"k"]) == {b"k": inner.backend.get_many([b"k"])[b"k"]}
    assert tier.get_many([b"k"])[b"k"].value == b"new"
    settle()
    assert local(tier, b"k") is None  # quarantined: the write may still land
    clock.now += tier._quarantine_seconds
    tier.get_many([b"k"])
    settle()
    assert local(tier, b"k") is not None


def test_a_read_during_a_write_is_served_the_old_copy_and_the_new_one_replaces_it_in_place(
    tier: TieredBackend, inner: Inner
) -> None:
    tier.store(S.SET, b"k", b"old", 0, 0)
    tier.get_many([b"k"])  # read: its frequency is 1
    inner.after["meta_store"] = gate = Event()
    writer = gevent.spawn(tier.store, S.SET, b"k", b"new", 0, 0)
    gevent.sleep(0)  # applied behind, not acknowledged
    assert tier.get_many([b"k"])[b"k"].value == b"old"  # a read concurrent with the write
    assert inner.calls["get_many"] == 0 and ANSWERED_BY.get() == "memory"
    gate.set()
    assert writer.get() is R.STORED
    entry = tier.memory._small[b"k"]  # the same queue, its reads still counted
    assert entry[0].value == b"new" and entry[3] == 2


def test_a_fill_that_read_before_a_write_is_not_kept(tier: TieredBackend, inner: Inner) -> None:
    inner.backend.store(S.SET, b"k", b"old", 0, 0)
    inner.after["get_many"] = gate = Event()
    reader = gevent.spawn(tier.get_many, [b"k"])
    gevent.sleep(0)  # the reader has read "old"; its answer is held
    del inner.after["get_many"]
    tier.store(S.APPEND, b"k", b"+", 0, 0)  # nothing kept: the new value is not known here
    gate.set()
    assert reader.get()[b"k"].value == b"old"  # a read concurrent with the write
    settle()
    assert local(tier, b"k") is None
    assert tier.get_many([b"k"])[b"k"].value == b"old+"


def test_a_fill_landing_after_an_invalidation_is_dropped(tier: TieredBackend, inner: Inner) -> None:
    inner.backend.store(S.SET, b"k", b"old", 0, 0)
    inner.gates["remaining_ttl"] = gate = Event()
    assert tier.get_many([b"k"])[b"k"].value == b"old"
    gevent.sleep(0)  # the fill waits for the remaining TTL
    tier.apply_remote(("inv", (b"k",), 0.0))  # another worker wrote k meanwhile
    gate.set()
    settle()
    assert local(tier, b"k") is None and tier.fills == 0


def test_a_read_after_a_write_does_not_join_a_read_from_before_it(tier: TieredBackend, inner: Inner) -> None:
    inner.backend.store(S.SET, b"k", b"old", 0, 0)
    inner.after["get_many"] = gate = Event()
    early = gevent.spawn(tier.get_many, [b"k"])
    gevent.sleep(0)  # it has read "old"
    del inner.after["get_many"]
    tier.store(S.APPEND, b"k", b"+", 0, 0)  # acknowledged
    late = tier.get_many([b"k"])  # not the early read's answer
    gate.set()
    assert late[b"k"].value == b"old+"
    assert early.get()[b"k"].value == b"old"
    assert inner.calls["get_many"] == 2


def test_concurrent_misses_of_a_key_share_one_backend_read(tier: TieredBackend, inner: Inner) -> None:
    inner.backend.store(S.SET, b"k", b"v", 0, 0)
    inner.gates["get_many"] = gate = Event()
    readers = [gevent.spawn(tier.get_many, [b"k"]) for _ in range(10)]
    gevent.sleep(0)
    gate.set()
    gevent.joinall(readers, raise_error=True)
    assert all(r.value == {b"k": Item(b"v", 0, 1)} for r in readers)
    assert inner.calls["get_many"] == 1


def test_a_multi_get_joins_the_reads_in_flight_and_reads_the_rest(tier: TieredBackend, inner: Inner) -> None:
    inner.backend.store(S.SET, b"k", b"v", 0, 0)
    inner.gates["get_many"] = gate = Event()
    first = gevent.spawn(tier.get_many, [b"k"])
    gevent.sleep(0)
    second = gevent.spawn(tier.get_many, [b"k", b"j"])  # k: the first's read; j: its own
    gevent.sleep(0)
    gate.set()
    assert second.get() == first.get() == {b"k": Item(b"v", 0, 1)}
    assert inner.calls["get_many"] == 2


def test_a_shared_read_that_fails_fails_every_reader(tier: TieredBackend, inner: Inner) -> None:
    inner.gates["get_many"] = gate = Event()
    inner.fail["get_many"] = BackendError("unavailable", "momento unavailable on get")
    readers = [gevent.spawn(tier.get_many, [b"k"]) for _ in range(3)]
    gevent.sleep(0)
    gate.set()
    gevent.joinall(readers)
    assert [type(r.exception) for r in readers] == [BackendError] * 3
    assert inner.calls["get_many"] == 1 and not tier._flights


def test_overlapping_writes_of_a_key_keep_no_copy(tier: TieredBackend, inner: Inner) -> None:
    inner.gates["meta_store"] = gate = Event()
    first = gevent.spawn(tier.store, S.SET, b"k", b"one", 0, 0)
    second = gevent.spawn(tier.store, S.SET, b"k", b"two", 0, 0)
    gevent.sleep(0)
    gate.set()
    gevent.joinall([first, second], raise_error=True)
    assert local(tier, b"k") is None  # which landed last is not known here
    assert tier.get_many([b"k"]) == inner.backend.get_many([b"k"])


# -- meta commands ------------------------------------------------------------------------


def test_a_plain_meta_get_is_served_locally_and_others_go_behind(tier: TieredBackend, inner: Inner) -> None:
    tier.store(S.SET, b"k", b"v", 3, 100)
    item = tier.meta_get(b"k", MetaGet())
    assert item is not None and (item.value, item.flags, item.binary_key) == (b"v", 3, None)
    assert inner.calls["meta_get"] == 0 and ANSWERED_BY.get() == "memory"
    with_ttl = tier.meta_get(b"k", MetaGet(with_ttl=True))
    assert with_ttl is not None and with_ttl.ttl == 100 and ANSWERED_BY.get() == "backend"
    assert local(tier, b"k") is not None  # a read: the copy stays
    assert tier.meta_get(b"k", MetaGet(touch=50)) is not None
    assert local(tier, b"k") is None  # a touch is a write
    assert tier.meta_get(b"nope", MetaGet()) is None


# -- flush, resize, the other workers -----------------------------------------------------


def test_flush_all_now_and_later(inner: Inner, clock: FakeClock) -> None:
    timers: list[tuple[float, Callable[[], None]]] = []
    tier = make(inner, clock)
    tier._later = lambda delay, fn: timers.append((delay, fn)) or None  # type: ignore[assignment,func-returns-value]
    tier.store(S.SET, b"a", b"v", 0, 0)
    tier.flush_all(0)
    assert local(tier, b"a") is None
    tier.store(S.SET, b"a", b"v", 0, 0)
    tier.flush_all(30)
    assert local(tier, b"a") is not None and timers[0][0] == pytest.approx(30)
    tier.store(S.SET, b"b", b"v", 0, 0)  # written before the flush's moment: flushed too
    timers[0][1]()
    assert local(tier, b"a") is None and local(tier, b"b") is None


def test_resize_is_cache_memlimit_of_the_memory_tier(inner: Inner, clock: FakeClock) -> None:
    peers = Peers()
    tier = make(inner, clock, workers=2)
    tier.set_peers(peers)
    for i in range(2000):
        tier.store(S.SET, b"k%d" % i, b"x" * 100, 0, 0)
    assert tier.resize(400_000)
    assert tier.memory.max_bytes == 200_000 and tier.memory.used_bytes <= 200_000
    assert peers.messages[-1] == ("resize", 200_000)
    assert not tier.resize(1000)  # below the least a tier takes
    tier.apply_remote(("resize", 300_000))
    assert tier.memory.max_bytes == 300_000


def test_the_other_workers_are_told_before_a_write_returns(tier: TieredBackend, inner: Inner) -> None:
    peers = Peers()
    tier.set_peers(peers)
    tier.store(S.SET, b"k", b"v", 0, 0)
    assert peers.messages == [("inv", (b"k",), 0.0)]
    tier.store(S.ADD, b"k", b"v", 0, 0)  # NOT_STORED: nothing changed, nobody told
    tier.delete(b"nope")
    assert len(peers.messages) == 1
    inner.fail["delete"] = BackendError("timeout", "t")
    with pytest.raises(BackendError, match="^t$"):
        tier.delete(b"k")
    assert peers.messages[-1] == ("inv", (b"k",), tier._quarantine_seconds)  # they quarantine it too
    del inner.fail["delete"]
    tier.flush_all(0)
    assert peers.messages[-1] == ("flush", 0.0)


def test_a_write_whose_peers_cannot_confirm_answers_an_error(tier: TieredBackend, inner: Inner) -> None:
    peers = Peers()
    peers.error = RuntimeError("worker 2: no reply to 'tier' within 2 s")
    tier.set_peers(peers)
    with pytest.raises(BackendError) as err:
        tier.store(S.SET, b"k", b"v", 0, 0)
    assert err.value.code == "invalidation" and "the write was applied" in str(err.value)
    assert inner.backend.get_many([b"k"])[b"k"].value == b"v"


def test_messages_of_other_workers(tier: TieredBackend, clock: FakeClock) -> None:
    tier.store(S.SET, b"k", b"v", 0, 0)
    tier.apply_remote(("inv", (b"k",), 5.0))
    assert local(tier, b"k") is None
    tier.get_many([b"k"])
    settle()
    assert local(tier, b"k") is None  # quarantined by the other worker's failed write
    tier.store(S.SET, b"j", b"v", 0, 0)
    tier.apply_remote(("flush", 0.0))
    assert local(tier, b"j") is None
    with pytest.raises(ValueError):
        tier.apply_remote(("what",))


def test_it_says_it_blocks_and_who_it_is(tier: TieredBackend, inner: Inner) -> None:
    assert tier.blocking and tier.kind == "memory" and tier.max_batch_keys == inner.backend.max_batch_keys
    tier.close()
    tier.close()


def test_statuses_of_meta_writes_pass_through(tier: TieredBackend) -> None:
    assert tier.meta_delete(b"nope", MetaDelete()) is MetaStatus.NOT_FOUND
    assert tier.meta_arith(b"nope", MetaArith()).status is MetaStatus.NOT_FOUND
    result, cas = tier.meta_store(b"k", b"v", MetaStore())
    assert result is R.STORED and cas
