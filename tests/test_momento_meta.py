"""The meta operations of the Momento backend against the bundled Momento server.

Each flag the memory backend serves from memcached's item state is mapped to
Momento calls (``mproxy/backends/momento/meta.py``, ``docs/compatibility.md``,
"Meta commands"); these tests run the backend in this process against
``mproxy.momento_local.server.serve()`` and look at what Momento holds. Over
the wire, and where the answers differ from memcached's:
``tests/test_momento_differences.py``.
"""

from __future__ import annotations

import pytest

from mproxy.backends import momento as mb
from mproxy.backends.base import (
    MetaArith,
    MetaDelete,
    MetaGet,
    MetaStatus,
    MetaStore,
    MetaUnsupported,
    NonNumericValue,
)
from mproxy.backends.momento import codec
from mproxy.backends.momento.meta import Accesses
from mproxy.dispatch import Dispatcher
from mproxy.momento_local.server import LocalServer
from mproxy.protocol.binary import Opcode
from mproxy.protocol.commands import StoreMode
from mproxy.stats import Stats
from tests.test_binary_parser import req, store_req
from tests.test_backend_momento import R, S, backend, cache, make_backend, server  # noqa: F401 (fixtures)
from tests.test_dispatch_binary import run

#: Bound on the time between a command and reading the TTL it set (ms): a loaded machine.
TTL_SLACK_MS = 3000


def held(server: LocalServer, b: mb.MomentoBackend, key: bytes) -> tuple[bytes, int, int] | None:
    """``(value, flags, marks)`` of what Momento holds for ``key``."""
    stored = server.store.get(b.cache_name, key)
    return None if stored is None else codec.decode_marked(stored, True)


def ttl_ms(server: LocalServer, b: mb.MomentoBackend, key: bytes) -> int:
    remaining = server.store.remaining_ttl_ms(b.cache_name, key)
    assert remaining is not None
    return int(remaining)


def unique(b: mb.MomentoBackend, key: bytes) -> int:
    """The CAS unique ``gets`` shows."""
    return b.get_many([key], with_cas=True)[key].cas


# ---- the marks encoding (pure) ------------------------------------------------------


@pytest.mark.parametrize(
    "value, flags, marks",
    [(b"", 0, codec.TOKEN), (b"v", 7, codec.STALE), (b"v", 0, codec.STALE | codec.TOKEN), (codec.MARKS_MAGIC, 0, 0)],
)
def test_marks_round_trip_and_classic_reads_see_the_value(value: bytes, flags: int, marks: int) -> None:
    stored = codec.encode(value, flags, True, marks)
    assert codec.decode_marked(stored, True) == (value, flags, marks)
    assert codec.decode(stored, True) == (value, flags)


def test_a_plain_value_that_looks_like_a_marks_header_is_escaped() -> None:
    stored = codec.encode(codec.MARKS_MAGIC + b"\x02rest", 0, True)
    assert stored.startswith(codec.FLAGS_MAGIC)
    assert codec.decode_marked(stored, True) == (codec.MARKS_MAGIC + b"\x02rest", 0, 0)


def test_the_token_mark_keeps_the_cas_unique_and_the_stale_mark_changes_it() -> None:
    plain = codec.encode(b"v", 3, True)
    assert codec.cas_unique(codec.encode(b"v", 3, True, codec.TOKEN)) == codec.cas_unique(plain)
    assert codec.cas_unique(codec.encode(b"v", 3, True, codec.STALE)) != codec.cas_unique(plain)
    stale = codec.encode(b"v", 3, True, codec.STALE)
    assert codec.cas_unique(codec.encode(b"v", 3, True, codec.STALE | codec.TOKEN)) == codec.cas_unique(stale)


def test_marks_need_the_flags_encoding() -> None:
    with pytest.raises(ValueError):
        codec.encode(b"v", 0, False, codec.STALE)


def test_the_access_record_is_bounded_and_starts_over_on_a_write() -> None:
    accesses = Accesses(capacity=2)
    assert accesses.look(b"a", 10.0) == (False, 0)
    accesses.record(b"a", 10.0, fetched=True)
    assert accesses.look(b"a", 15.5) == (True, 5)
    accesses.record(b"a", 16.0, fetched=False)
    assert accesses.look(b"a", 16.0) == (False, 0)
    accesses.record(b"b", 17.0, fetched=True)
    accesses.record(b"c", 18.0, fetched=True)  # a is forgotten
    assert accesses.look(b"a", 20.0) == (False, 0)
    accesses.forget(b"c")
    assert accesses.look(b"c", 20.0) == (False, 0)


# ---- mg -----------------------------------------------------------------------------


def test_t_is_the_ttl_momento_holds(backend: mb.MomentoBackend) -> None:
    backend.store(S.SET, b"k", b"v", 3, 100)
    item = backend.meta_get(b"k", MetaGet(with_ttl=True))
    assert item is not None and (item.value, item.flags) == (b"v", 3)
    assert 97 <= (item.ttl or 0) <= 100
    backend.store(S.SET, b"k", b"v", 0, 0)  # exptime 0: the default TTL, not "never"
    item = backend.meta_get(b"k", MetaGet(with_ttl=True))
    assert item is not None and 897 <= (item.ttl or 0) <= 900
    assert backend.meta_get(b"missing", MetaGet(with_ttl=True)) is None


def test_t_with_touch_shows_the_ttl_before_and_after(server: LocalServer, backend: mb.MomentoBackend) -> None:
    backend.store(S.SET, b"k", b"v", 0, 100)
    item = backend.meta_get(b"k", MetaGet(touch=500, with_ttl=True))
    assert item is not None and 97 <= (item.ttl or 0) <= 100 and item.new_ttl == 500
    assert 500_000 - TTL_SLACK_MS < ttl_ms(server, backend, b"k") <= 500_000


def test_vivify_creates_an_empty_item_the_creator_wins(server: LocalServer, backend: mb.MomentoBackend) -> None:
    first = backend.meta_get(b"v", MetaGet(vivify=30))
    assert first is not None and first.created and first.won and not first.token_sent
    assert (first.value, first.flags, first.ttl, first.new_ttl) == (b"", 0, -1, 30)
    assert held(server, backend, b"v") == (b"", 0, codec.TOKEN)
    assert 30_000 - TTL_SLACK_MS < ttl_ms(server, backend, b"v") <= 30_000
    second = backend.meta_get(b"v", MetaGet(vivify=30))
    assert second is not None and not second.created and not second.won and second.token_sent
    assert first.cas == second.cas == unique(backend, b"v")
    # a classic get reads the empty value; the set that fills it clears the token
    assert backend.get_many([b"v"])[b"v"].value == b""
    backend.store(S.SET, b"v", b"filled", 0, 100)
    third = backend.meta_get(b"v", MetaGet(vivify=30))
    assert third is not None and third.value == b"filled" and not (third.won or third.token_sent)


def test_vivify_races_have_one_winner(server: LocalServer, cache: str) -> None:
    """Two proxies on one cache: exactly one creates the item and wins."""
    a = make_backend(server, cache)
    b = make_backend(server, cache)
    try:
        results = [a.meta_get(b"r", MetaGet(vivify=30)), b.meta_get(b"r", MetaGet(vivify=30))]
        assert [bool(r and r.won) for r in results] == [True, False]
        assert results[1] is not None and results[1].token_sent
    finally:
        a.close()
        b.close()


def test_recache_wins_once_inside_the_window(server: LocalServer, backend: mb.MomentoBackend) -> None:
    backend.store(S.SET, b"k", b"v", 5, 100)
    before = unique(backend, b"k")
    item = backend.meta_get(b"k", MetaGet(recache=30))
    assert item is not None and not item.won and not item.token_sent  # 100 s left: outside
    item = backend.meta_get(b"k", MetaGet(recache=200))
    assert item is not None and item.won and not item.token_sent
    assert held(server, backend, b"k") == (b"v", 5, codec.TOKEN)
    assert 97_000 < ttl_ms(server, backend, b"k") <= 100_000  # the TTL is kept
    item = backend.meta_get(b"k", MetaGet(recache=200))
    assert item is not None and not item.won and item.token_sent
    assert unique(backend, b"k") == before == item.cas  # winning does not change the CAS
    # the CAS a client read still stores (and clears the token)
    assert backend.meta_store(b"k", b"w", MetaStore(mode=S.CAS, compare_cas=before))[0] is R.STORED
    assert held(server, backend, b"k") == (b"w", 0, 0)


def test_h_and_l_come_from_this_process_record(backend: mb.MomentoBackend) -> None:
    backend.meta_store(b"k", b"v", MetaStore())
    item = backend.meta_get(b"k", MetaGet(with_access=True))
    assert item is not None and (item.hit_before, item.last_access) == (False, 0)
    item = backend.meta_get(b"k", MetaGet(with_access=True))
    assert item is not None and item.hit_before is True and item.last_access is not None
    backend.store(S.SET, b"other", b"v", 0, 0)  # a classic write counts too
    item = backend.meta_get(b"other", MetaGet(with_access=True, no_bump=True))
    assert item is not None and (item.hit_before, item.last_access) == (False, 0)
    item = backend.meta_get(b"other", MetaGet(with_access=True))  # u above did not count
    assert item is not None and item.hit_before is False
    backend.meta_delete(b"k", MetaDelete())
    backend.meta_store(b"k", b"v", MetaStore())
    item = backend.meta_get(b"k", MetaGet(with_access=True))
    assert item is not None and item.hit_before is False


def test_without_the_flags_encoding_marks_are_refused(server: LocalServer, cache: str) -> None:
    b = make_backend(server, cache, with_flags=False)
    try:
        b.store(S.SET, b"k", b"v", 0, 100)
        for request in (MetaGet(vivify=30), MetaGet(recache=30)):
            with pytest.raises(MetaUnsupported):
                b.meta_get(b"k", request)
        with pytest.raises(MetaUnsupported):
            b.meta_delete(b"k", MetaDelete(invalidate=True))
        with pytest.raises(MetaUnsupported):
            b.meta_store(b"k", b"w", MetaStore(mode=S.CAS, compare_cas=1, invalidate=True))
        item = b.meta_get(b"k", MetaGet(with_ttl=True))  # t needs no mark
        assert item is not None and item.value == b"v"
    finally:
        b.close()


# ---- md -----------------------------------------------------------------------------


def test_md_compares_the_cas(server: LocalServer, backend: mb.MomentoBackend) -> None:
    backend.store(S.SET, b"k", b"v", 0, 100)
    cas = unique(backend, b"k")
    assert backend.meta_delete(b"k", MetaDelete(compare_cas=cas + 1)) is MetaStatus.EXISTS
    assert held(server, backend, b"k") is not None
    assert backend.meta_delete(b"k", MetaDelete(compare_cas=cas)) is MetaStatus.DONE
    assert held(server, backend, b"k") is None
    assert backend.meta_delete(b"k", MetaDelete(compare_cas=cas)) is MetaStatus.NOT_FOUND


def test_md_invalidate_marks_stale_and_one_reader_wins(server: LocalServer, backend: mb.MomentoBackend) -> None:
    backend.store(S.SET, b"k", b"v", 4, 100)
    cas = unique(backend, b"k")
    assert backend.meta_delete(b"k", MetaDelete(invalidate=True, touch=30)) is MetaStatus.DONE
    assert held(server, backend, b"k") == (b"v", 4, codec.STALE)
    assert 30_000 - TTL_SLACK_MS < ttl_ms(server, backend, b"k") <= 30_000
    stale_cas = unique(backend, b"k")
    assert stale_cas != cas  # a new CAS unique, as memcached gives
    first = backend.meta_get(b"k", MetaGet())
    assert first is not None and first.stale and first.won and not first.token_sent and first.cas == stale_cas
    second = backend.meta_get(b"k", MetaGet())
    assert second is not None and second.stale and not second.won and second.token_sent
    assert backend.get_many([b"k"])[b"k"].value == b"v"  # classic reads see the value
    # invalidating again puts the token back
    assert backend.meta_delete(b"k", MetaDelete(invalidate=True, compare_cas=stale_cas + 1)) is MetaStatus.EXISTS
    assert backend.meta_delete(b"k", MetaDelete(invalidate=True, compare_cas=stale_cas)) is MetaStatus.DONE
    third = backend.meta_get(b"k", MetaGet(touch=60))
    assert third is not None and third.won
    assert 60_000 - TTL_SLACK_MS < ttl_ms(server, backend, b"k") <= 60_000
    assert backend.meta_delete(b"missing", MetaDelete(invalidate=True)) is MetaStatus.NOT_FOUND


# ---- ms -----------------------------------------------------------------------------


def test_ms_invalidate_stores_a_mismatch_stale(server: LocalServer, backend: mb.MomentoBackend) -> None:
    backend.store(S.SET, b"k", b"old", 0, 100)
    cas = unique(backend, b"k")
    request = MetaStore(mode=S.CAS, compare_cas=cas + 1, invalidate=True, flags=2, with_cas=True)
    result, new_cas = backend.meta_store(b"k", b"new", request)
    assert result is R.STORED and new_cas == unique(backend, b"k")
    assert held(server, backend, b"k") == (b"new", 2, codec.STALE)
    assert 97_000 < ttl_ms(server, backend, b"k") <= 100_000  # the TTL is kept
    # the matching CAS stores a fresh item (exptime applied)
    request = MetaStore(mode=S.CAS, compare_cas=new_cas, invalidate=True, exptime=50)
    assert backend.meta_store(b"k", b"fresh", request)[0] is R.STORED
    assert held(server, backend, b"k") == (b"fresh", 0, 0)
    assert 50_000 - TTL_SLACK_MS < ttl_ms(server, backend, b"k") <= 50_000
    request = MetaStore(mode=S.CAS, compare_cas=1, invalidate=True)
    assert backend.meta_store(b"missing", b"x", request)[0] is R.NOT_FOUND


@pytest.mark.parametrize("mode, expected", [(S.APPEND, b"ab"), (S.PREPEND, b"ba")])
def test_ms_append_compares_the_cas_and_returns_the_new_one(
    backend: mb.MomentoBackend, mode: StoreMode, expected: bytes
) -> None:
    backend.store(S.SET, b"k", b"a", 9, 100)
    cas = unique(backend, b"k")
    assert backend.meta_store(b"k", b"b", MetaStore(mode=mode, compare_cas=cas + 1, with_cas=True)) == (R.EXISTS, 0)
    result, new_cas = backend.meta_store(b"k", b"b", MetaStore(mode=mode, compare_cas=cas, with_cas=True))
    assert result is R.STORED and new_cas == unique(backend, b"k") != cas
    assert backend.get_many([b"k"])[b"k"].value == expected
    assert backend.meta_store(b"missing", b"b", MetaStore(mode=mode, with_cas=True)) == (R.NOT_STORED, 0)


# ---- ma -----------------------------------------------------------------------------


def test_ma_vivify_creates_the_initial_number(server: LocalServer, backend: mb.MomentoBackend) -> None:
    result = backend.meta_arith(b"n", MetaArith(vivify=60, initial=10, with_ttl=True, with_cas=True))
    assert result.status is MetaStatus.DONE and result.created and result.number == 10
    assert (result.ttl, result.new_ttl) == (-1, 60) and result.cas == unique(backend, b"n")
    assert 60_000 - TTL_SLACK_MS < ttl_ms(server, backend, b"n") <= 60_000
    result = backend.meta_arith(b"n", MetaArith(vivify=60, initial=10, with_ttl=True, with_cas=True))
    assert result.status is MetaStatus.DONE and not result.created and result.number == 11
    assert result.cas == unique(backend, b"n") and 57 <= (result.ttl or 0) <= 60
    assert backend.meta_arith(b"other", MetaArith(incr=False, vivify=0, initial=5)).number == 5


def test_ma_compares_the_cas_and_sets_the_ttl_with_the_write(
    server: LocalServer, backend: mb.MomentoBackend
) -> None:
    backend.store(S.SET, b"n", b"5", 3, 100)
    cas = unique(backend, b"n")
    assert backend.meta_arith(b"n", MetaArith(compare_cas=cas + 1)).status is MetaStatus.EXISTS
    result = backend.meta_arith(b"n", MetaArith(compare_cas=cas, delta=2, touch=300, with_ttl=True))
    assert result.status is MetaStatus.DONE and result.number == 7 and result.new_ttl == 300
    assert held(server, backend, b"n") == (b"7", 3, 0)
    assert 300_000 - TTL_SLACK_MS < ttl_ms(server, backend, b"n") <= 300_000
    assert backend.meta_arith(b"missing", MetaArith(with_cas=True)).status is MetaStatus.NOT_FOUND
    backend.store(S.SET, b"text", b"", 0, 100)
    with pytest.raises(NonNumericValue):
        backend.meta_arith(b"text", MetaArith(with_cas=True))


# ---- the binary protocol's write CAS ------------------------------------------------


@pytest.mark.parametrize("opcode", [Opcode.SET, Opcode.ADD, Opcode.REPLACE])
def test_a_binary_write_answers_the_cas_a_get_returns_without_reading(
    backend: mb.MomentoBackend, opcode: int
) -> None:
    """The content unique of what was stored is the CAS the next get shows: no read back."""
    stats = Stats()
    d = Dispatcher(backend, stats.cache("c"), stats)
    if opcode == Opcode.REPLACE:
        backend.store(S.SET, b"k", b"old", 0, 100)
    reads = backend.rpc_calls.get("Get", 0) + backend.rpc_calls.get("GetBatch", 0)
    [stored] = run(d, store_req(opcode, b"k", b"value", flags=7, exptime=100))
    assert stored.status == 0 and stored.cas != 0
    assert backend.rpc_calls.get("Get", 0) + backend.rpc_calls.get("GetBatch", 0) == reads
    [got] = run(d, req(Opcode.GET, b"k"))
    assert got.status == 0 and got.value == b"value" and got.cas == stored.cas
    # a cas with it stores; append still reads its result back
    [again] = run(d, store_req(Opcode.SET, b"k", b"next", cas=got.cas))
    assert again.status == 0 and again.cas == run(d, req(Opcode.GET, b"k"))[0].cas
    [appended] = run(d, req(Opcode.APPEND, b"k", value=b"!"))
    assert appended.status == 0 and appended.cas == run(d, req(Opcode.GET, b"k"))[0].cas
