"""Meta commands on the memory backend with a settable clock: the figures the differential
corpus normalises (``t``, ``l``, ``me``'s ``exp`` and ``la``) and the item state behind
``h``, ``N``, ``R``, ``W``/``X``/``Z`` and ``I``, exactly, with no sleeping.

The replies are memcached 1.6.18's (``proto_text.c``); its clock counts whole
seconds, the memory backend's is continuous: a TTL shows rounded up (a fresh
``T100`` reads ``t100``), an access time rounded down.
"""

from __future__ import annotations

import pytest

from mproxy.backends.base import MetaArith, MetaDelete, MetaGet, MetaStatus, MetaStore, StoreResult
from mproxy.backends.memory import UPDATE_INTERVAL, MemoryBackend
from mproxy.dispatch import Dispatcher
from mproxy.protocol.commands import StoreMode
from mproxy.stats import Stats
from tests.servers import FakeClock
from tests.wire import replies


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture
def backend(clock: FakeClock) -> MemoryBackend:
    return MemoryBackend(clock=clock)


@pytest.fixture
def run(backend: MemoryBackend) -> object:
    stats = Stats()
    dispatcher = Dispatcher(backend, stats.cache("c"), stats)

    return lambda data: replies(dispatcher, data)


def test_t_is_the_ttl_left_before_or_after_t_as_sent(run, clock) -> None:  # type: ignore[no-untyped-def]
    assert run(b"ms a 1 T100\r\nx\r\n") == b"HD\r\n"
    assert run(b"mg a t\r\n") == b"HD t100\r\n"
    clock.now += 30.5
    assert run(b"mg a t\r\n") == b"HD t70\r\n"
    assert run(b"mg a t T500\r\n") == b"HD t70\r\n"  # t before T: the TTL it had
    assert run(b"mg a T400 t\r\n") == b"HD t400\r\n"
    assert run(b"mg a T0 t\r\n") == b"HD t-1\r\n"
    assert run(b"ms b 1\r\nx\r\nmg b t v\r\n") == b"HD\r\nVA 1 t-1\r\nx\r\n"


def test_t_of_an_absolute_exptime(run, clock) -> None:  # type: ignore[no-untyped-def]
    run(b"ms a 1 T%d\r\nx\r\n" % int(clock.now + 3600))
    assert run(b"mg a t\r\n") == b"HD t3600\r\n"


def test_l_counts_from_the_store_and_moves_only_after_the_update_interval(run, clock) -> None:  # type: ignore[no-untyped-def]
    run(b"ms a 1\r\nx\r\n")
    clock.now += 10
    assert run(b"mg a l h\r\n") == b"HD l10 h0\r\n"
    clock.now += 10  # the previous access was less than 60 s after the store: time kept
    assert run(b"mg a l h\r\n") == b"HD l20 h1\r\n"
    clock.now += UPDATE_INTERVAL
    assert run(b"mg a l\r\n") == b"HD l80\r\n"  # this access moves it
    assert run(b"mg a l\r\n") == b"HD l0\r\n"


def test_u_leaves_hit_and_access_time_alone(run, clock) -> None:  # type: ignore[no-untyped-def]
    run(b"ms a 1\r\nx\r\n")
    clock.now += 100
    assert run(b"mg a u v\r\n") == b"VA 1\r\nx\r\n"
    assert run(b"mg a h l\r\n") == b"HD h0 l100\r\n"
    assert run(b"mg a h l\r\n") == b"HD h1 l0\r\n"


def test_me_line(run, clock) -> None:  # type: ignore[no-untyped-def]
    run(b"ms a 3 T100 F1\r\nabc\r\n")
    clock.now += 40
    # exp is minus the TTL left; size as memcached counts it (key 1 + value 3 + 59 + flags 4)
    assert run(b"me a\r\n") == b"ME a exp=-60 la=40 cas=1 fetch=no cls=1 size=67\r\n"
    run(b"get a\r\nset b 0 0 1000\r\n" + b"z" * 1000 + b"\r\n")
    assert run(b"me a\r\nme b\r\n") == (
        b"ME a exp=-60 la=40 cas=1 fetch=yes cls=1 size=67\r\nME b exp=-1 la=0 cas=2 fetch=no cls=12 size=1060\r\n"
    )


def test_n_vivifies_once_and_its_ttl_applies(run, clock) -> None:  # type: ignore[no-untyped-def]
    assert run(b"mg a N30 t v c\r\n") == b"VA 0 t30 c1 W\r\n\r\n"
    assert run(b"mg a N30 t v c\r\n") == b"VA 0 t30 c1 Z\r\n\r\n"
    assert run(b"mg b t N30\r\n") == b"HD t-1 W\r\n"  # before N: the new item has no TTL yet
    assert run(b"mg b t\r\n") == b"HD t30 Z\r\n"
    clock.now += 31
    assert run(b"mg a v\r\n") == b"EN\r\n"


def test_r_wins_once_inside_the_window(backend, clock) -> None:  # type: ignore[no-untyped-def]
    backend.meta_store(b"a", b"x", MetaStore(exptime=100))
    assert not backend.meta_get(b"a", MetaGet(recache=50)).won
    clock.now += 60
    first = backend.meta_get(b"a", MetaGet(recache=50))
    assert first.won and not first.token_sent
    second = backend.meta_get(b"a", MetaGet(recache=50))
    assert not second.won and second.token_sent
    # a touch before the check: the window compares the new TTL
    backend.meta_store(b"b", b"x", MetaStore(exptime=1000))
    assert backend.meta_get(b"b", MetaGet(touch=10, recache=50)).won
    # no TTL: never in the window
    backend.meta_store(b"c", b"x", MetaStore())
    assert not backend.meta_get(b"c", MetaGet(recache=50)).won


def test_invalidate_marks_stale_and_hands_out_one_win(backend, clock) -> None:  # type: ignore[no-untyped-def]
    _, cas = backend.meta_store(b"a", b"x", MetaStore(exptime=1000))
    assert backend.meta_delete(b"a", MetaDelete(compare_cas=cas + 1, invalidate=True)) is MetaStatus.EXISTS
    assert backend.meta_delete(b"a", MetaDelete(compare_cas=cas, invalidate=True, touch=30)) is MetaStatus.DONE
    first = backend.meta_get(b"a", MetaGet())
    assert (first.stale, first.won, first.token_sent, first.new_ttl) == (True, True, False, 30)
    assert first.cas > cas
    second = backend.meta_get(b"a", MetaGet())
    assert (second.stale, second.won, second.token_sent) == (True, False, True)
    # a lower CAS with invalidate stores, still stale, keeping the TTL and the token
    result, _ = backend.meta_store(
        b"a", b"old", MetaStore(mode=StoreMode.CAS, compare_cas=1, invalidate=True, exptime=5000)
    )
    assert result is StoreResult.STORED
    third = backend.meta_get(b"a", MetaGet())
    assert (third.value, third.stale, third.token_sent, third.new_ttl) == (b"old", True, True, 30)
    # a store with the current CAS replaces it: fresh, not stale
    backend.meta_store(b"a", b"new", MetaStore(mode=StoreMode.CAS, compare_cas=third.cas))
    assert not backend.meta_get(b"a", MetaGet()).stale


def test_binary_key_bit_is_kept_by_meta_set_only(backend) -> None:  # type: ignore[no-untyped-def]
    backend.meta_store(b"k", b"x", MetaStore(binary_key=True))
    assert backend.meta_get(b"k", MetaGet()).binary_key
    backend.store(StoreMode.APPEND, b"k", b"y", 0, 0)
    assert not backend.meta_get(b"k", MetaGet()).binary_key
    backend.meta_store(b"k", b"x", MetaStore(binary_key=True))
    backend.store(StoreMode.SET, b"k", b"y", 0, 0)
    assert not backend.meta_get(b"k", MetaGet()).binary_key


def test_ma_t_is_lost_when_the_number_grows(backend, clock) -> None:  # type: ignore[no-untyped-def]
    backend.meta_store(b"n", b"99", MetaStore(exptime=100))
    result = backend.meta_arith(b"n", MetaArith(touch=500))
    assert (result.number, result.ttl, result.new_ttl) == (100, 100, 500)
    assert backend.meta_get(b"n", MetaGet()).ttl == 100  # memcached 1.6.18 set it on the old item
    result = backend.meta_arith(b"n", MetaArith(touch=500))
    assert (result.number, result.new_ttl) == (101, 500)
    assert backend.meta_get(b"n", MetaGet()).ttl == 500


def test_ma_vivify_and_cas(backend) -> None:  # type: ignore[no-untyped-def]
    created = backend.meta_arith(b"n", MetaArith(vivify=0, initial=41))
    assert (created.status, created.number, created.created, created.new_ttl) == (MetaStatus.DONE, 41, True, -1)
    assert backend.meta_arith(b"n", MetaArith(compare_cas=created.cas + 1)).status is MetaStatus.EXISTS
    result = backend.meta_arith(b"n", MetaArith(compare_cas=created.cas, delta=2, incr=False))
    assert (result.number, result.created) == (39, False)
    assert backend.meta_get(b"n", MetaGet()).value == b"39"


def test_resize_evicts_down_to_the_new_budget(clock) -> None:  # type: ignore[no-untyped-def]
    backend = MemoryBackend(max_bytes=16 * 2**20, clock=clock)
    for i in range(100):
        backend.store(StoreMode.SET, b"k%d" % i, b"v" * 100_000, 0, 0)
    assert backend.resize(8 * 2**20)
    assert backend.bytes_used <= 8 * 2**20 and backend.evictions > 0
    assert backend.get_many([b"k99"]) and not backend.get_many([b"k0"])
    assert not backend.resize(2**19)  # below the item size: refused, nothing changed
    assert backend.stats()["limit_maxbytes"] == 8 * 2**20
