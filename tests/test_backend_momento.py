"""The Momento backend against the bundled Momento-compatible server.

Semantic tests run the backend in this (un-patched) process against
``mproxy.momento_local.server.serve()``; the concurrency tests run it in a
gevent-patched subprocess. Each test gets a fresh cache on a shared server.
The backend is a hybrid: the SDK's ``CacheClient`` for the calls it has, raw
stubs for the rest; tests below check which path each call takes.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from mproxy.backends import momento as mb
from mproxy.backends.momento import backend as backend_module
from mproxy.backends.momento import codec, embedded, errors, factory, transport
from mproxy.backends.momento.endpoint import credentials_from_env
from mproxy.backends.base import (
    BackendError,
    FlushDisabled,
    Item,
    NonNumericValue,
    StoreMode,
    StoreResult,
    ValueTooLarge,
)
from mproxy.config import MomentoConfig
from mproxy.dispatch import Dispatcher
from mproxy.momento_local.server import LocalServer, serve
from mproxy.protocol.commands import Store
from mproxy.protocol.parser import Parser
from mproxy.stats import Stats

HOST = "127.0.0.1"
#: Bound on any wait for an asynchronous effect (a delayed flush).
WAIT_SECONDS = 10.0
#: Subprocess bound.
SUBPROCESS_TIMEOUT = 120.0
_names = itertools.count()

S = StoreMode
R = StoreResult


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    srv = serve(host=HOST, port=0, max_workers=64)
    try:
        yield srv
    finally:
        srv.stop(None)


@pytest.fixture
def cache(server: LocalServer) -> str:
    name = f"test-{next(_names)}"
    server.store.create_cache(name)
    return name


def make_backend(server: LocalServer, cache: str, **kwargs: object) -> mb.MomentoBackend:
    return mb.MomentoBackend(mb.Endpoint.local(HOST, server.port), cache, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def backend(server: LocalServer, cache: str) -> Iterator[mb.MomentoBackend]:
    b = make_backend(server, cache, default_ttl=900, max_ttl=86400)
    try:
        yield b
    finally:
        b.close()
        server.faults.clear()


def raw(server: LocalServer, cache: str, key: bytes) -> bytes | None:
    """What Momento holds for a key (bypassing the backend)."""
    return server.store.get(cache, key)


def ttl_ms(server: LocalServer, cache: str, key: bytes) -> int | None:
    return server.store.remaining_ttl_ms(cache, key)


# ---- the item layout (pure) -----------------------------------------------------


@pytest.mark.parametrize(
    "value, flags",
    [(b"", 0), (b"plain", 0), (b"42", 0), (b"v", 1), (b"", 2**32 - 1), (codec.FLAGS_MAGIC + b"x", 0), (codec.FLAGS_MAGIC, 9)],
)
def test_flags_encoding_round_trips(value: bytes, flags: int) -> None:
    assert codec.decode(codec.encode(value, flags, True), True) == (value, flags)


def test_flags_encoding_keeps_plain_values_raw() -> None:
    assert codec.encode(b"123", 0, True) == b"123"
    assert codec.encode(b"123", 5, True) == codec.FLAGS_MAGIC + b"\x00\x00\x00\x05123"
    # a flags-0 value that looks like a header is escaped by a header of its own
    assert codec.encode(codec.FLAGS_MAGIC, 0, True) == codec.FLAGS_MAGIC + bytes(4) + codec.FLAGS_MAGIC
    # flags = false: raw values, flags dropped, nothing decoded
    assert codec.encode(b"v", 5, False) == b"v"
    assert codec.decode(codec.FLAGS_MAGIC + b"\x00\x00\x00\x05v", False) == (codec.FLAGS_MAGIC + b"\x00\x00\x00\x05v", 0)


def test_cas_unique_is_a_deterministic_nonzero_63_bit_content_hash() -> None:
    uniques = {codec.cas_unique(b"value-%d" % i) for i in range(1000)}
    assert len(uniques) == 1000
    assert all(0 < u < 2**63 for u in uniques)
    assert codec.cas_unique(b"same") == codec.cas_unique(b"same")


def test_ttl_milliseconds() -> None:
    now = 1_700_000_000.0
    assert codec.ttl_milliseconds(0, 900, 86400, now) == 900_000  # exptime 0 -> default TTL
    assert codec.ttl_milliseconds(10, 900, 86400, now) == 10_000
    assert codec.ttl_milliseconds(-1, 900, 86400, now) == 0  # already expired
    assert codec.ttl_milliseconds(2_000_000, 900, 86400, now) == 86_400_000  # clamped to max_ttl
    assert codec.ttl_milliseconds(int(now) + 5, 900, 86400, now) == 5_000  # absolute Unix time
    assert codec.ttl_milliseconds(int(now) - 5, 900, 86400, now) == 0


# ---- reads ------------------------------------------------------------------------


def test_get_many_one_key_is_one_get_and_many_keys_are_concurrent_batches(
    backend: mb.MomentoBackend, server: LocalServer, cache: str
) -> None:
    keys = [b"k%d" % i for i in range(250)]
    for key in keys[::2]:
        assert backend.store(S.SET, key, key.upper(), 3, 0) is R.STORED
    server.stats.reset()
    found = backend.get_many(keys + keys[:10], with_cas=True)
    assert set(found) == set(keys[::2])
    assert found[b"k0"] == Item(b"K0", 3, codec.cas_unique(raw(server, cache, b"k0") or b""))
    calls = server.stats.snapshot()["calls"]
    assert calls == {"GetBatch": 3}  # 250 unique keys in batches of 100
    server.stats.reset()
    assert backend.get_many([b"k0", b"k0"], with_cas=True) == {b"k0": found[b"k0"]}
    assert backend.get_many([b"k0"]) == {b"k0": Item(b"K0", 3, 0)}  # a plain get skips hashing the value
    assert backend.get_many([b"missing"]) == {}
    assert server.stats.snapshot()["calls"] == {"Get": 3}
    assert backend.get_many([]) == {}


def test_large_multi_keys_commands_go_in_bounded_windows(
    backend: mb.MomentoBackend, server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend, "max_batch_keys", 2)
    monkeypatch.setattr(backend_module, "GET_BATCH_WINDOW", 2)
    monkeypatch.setattr(backend_module, "FAN_OUT_WINDOW", 3)
    keys = [b"k%d" % i for i in range(11)]
    for key in keys[:9]:
        backend.store(S.SET, key, key, 0, 10)
    server.stats.reset()
    assert set(backend.get_many(keys)) == set(keys[:9])
    assert server.stats.snapshot()["calls"] == {"GetBatch": 6}
    assert set(backend.touch_many(keys, 300)) == set(keys[:9])
    assert all(299_000 < (server.store.remaining_ttl_ms(backend.cache_name, key) or 0) for key in keys[:9])
    assert set(backend.touch_many(keys, -1)) == set(keys[:9])
    assert server.store.get_many(backend.cache_name, keys) == [None] * 11


def test_flags_survive_and_plain_values_stay_readable_by_other_clients(
    backend: mb.MomentoBackend, server: LocalServer, cache: str
) -> None:
    backend.store(S.SET, b"f", b"data", 2**32 - 1, 0)
    backend.store(S.SET, b"n", b"42", 0, 0)
    assert backend.get_many([b"f"])[b"f"].flags == 2**32 - 1
    assert backend.get_many([b"f"])[b"f"].value == b"data"
    assert raw(server, cache, b"n") == b"42"


def test_flags_false_stores_raw_values(server: LocalServer, cache: str) -> None:
    b = make_backend(server, cache, with_flags=False)
    try:
        assert b.store(S.SET, b"k", b"v", 7, 0) is R.STORED
        assert raw(server, cache, b"k") == b"v"
        assert b.get_many([b"k"], with_cas=True)[b"k"] == Item(b"v", 0, codec.cas_unique(b"v"))
    finally:
        b.close()


# ---- storage commands ----------------------------------------------------------


def test_set_add_replace(backend: mb.MomentoBackend, server: LocalServer, cache: str) -> None:
    assert backend.store(S.REPLACE, b"k", b"a", 0, 0) is R.NOT_STORED
    assert backend.store(S.ADD, b"k", b"a", 0, 0) is R.STORED
    assert backend.store(S.ADD, b"k", b"b", 0, 0) is R.NOT_STORED
    assert backend.store(S.REPLACE, b"k", b"c", 1, 60) is R.STORED
    assert backend.get_many([b"k"])[b"k"].value == b"c"
    assert 59_000 < (ttl_ms(server, cache, b"k") or 0) <= 60_000
    assert backend.store(S.SET, b"k", b"d", 0, 0) is R.STORED
    assert 899_000 < (ttl_ms(server, cache, b"k") or 0) <= 900_000  # exptime 0 -> default_ttl
    backend.store(S.SET, b"long", b"x", 0, 2_000_000)  # 23 days: clamped to max_ttl
    assert (ttl_ms(server, cache, b"long") or 0) <= 86_400_000


def test_negative_exptime_stores_nothing_visible(backend: mb.MomentoBackend, server: LocalServer, cache: str) -> None:
    backend.store(S.SET, b"k", b"v", 0, 0)
    assert backend.store(S.SET, b"k", b"w", 0, -1) is R.STORED
    assert raw(server, cache, b"k") is None  # the old value is gone too
    assert backend.store(S.ADD, b"k", b"w", 0, -1) is R.STORED
    assert raw(server, cache, b"k") is None
    assert backend.store(S.REPLACE, b"k", b"w", 0, -1) is R.NOT_STORED
    backend.store(S.SET, b"k", b"v", 0, 0)
    assert backend.store(S.ADD, b"k", b"w", 0, -1) is R.NOT_STORED
    assert backend.store(S.REPLACE, b"k", b"w", 0, -1) is R.STORED
    assert raw(server, cache, b"k") is None
    backend.store(S.SET, b"k", b"v", 0, 0)
    cas = backend.get_many([b"k"], with_cas=True)[b"k"].cas
    assert backend.store(S.CAS, b"k", b"w", 0, -1, cas) is R.STORED
    assert raw(server, cache, b"k") is None


def test_cas_flow(backend: mb.MomentoBackend) -> None:
    assert backend.store(S.CAS, b"k", b"v", 0, 0, 123) is R.NOT_FOUND
    backend.store(S.SET, b"k", b"A", 4, 0)
    cas_a = backend.get_many([b"k"], with_cas=True)[b"k"].cas
    assert backend.store(S.CAS, b"k", b"B", 4, 0, cas_a + 1) is R.EXISTS
    assert backend.store(S.CAS, b"k", b"B", 4, 0, cas_a) is R.STORED
    assert backend.store(S.CAS, b"k", b"C", 4, 0, cas_a) is R.EXISTS
    assert backend.get_many([b"k"])[b"k"].value == b"B"
    # documented: the unique is a content hash, so A -> B -> A makes cas_a valid again
    backend.store(S.SET, b"k", b"A", 4, 0)
    assert backend.get_many([b"k"], with_cas=True)[b"k"].cas == cas_a
    assert backend.store(S.CAS, b"k", b"D", 4, 0, cas_a) is R.STORED


def test_append_prepend_keep_flags_and_ttl(backend: mb.MomentoBackend, server: LocalServer, cache: str) -> None:
    assert backend.store(S.APPEND, b"k", b"x", 0, 0) is R.NOT_STORED
    backend.store(S.SET, b"k", b"mid", 7, 100)
    assert backend.store(S.APPEND, b"k", b">", 0, 0) is R.STORED
    assert backend.store(S.PREPEND, b"k", b"<", 3, 5000) is R.STORED
    assert backend.get_many([b"k"])[b"k"].value == b"<mid>"
    assert backend.get_many([b"k"])[b"k"].flags == 7
    assert 90_000 < (ttl_ms(server, cache, b"k") or 0) <= 100_000


def test_append_result_too_large_is_not_stored(server: LocalServer, cache: str) -> None:
    b = make_backend(server, cache, max_value_size=10)
    try:
        b.store(S.SET, b"k", b"12345678", 0, 0)
        assert b.store(S.APPEND, b"k", b"abc", 0, 0) is R.NOT_STORED
        assert raw(server, cache, b"k") == b"12345678"
    finally:
        b.close()


def test_read_modify_write_retries_when_a_concurrent_writer_wins(
    backend: mb.MomentoBackend, server: LocalServer, cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another client writes between our read and our conditional write."""
    backend.store(S.SET, b"k", b"10", 0, 0)
    read = backend._read_for_update
    interference = iter([b"20", b"abc"])

    def racing_read(*args: object) -> object:
        result = read(*args)  # type: ignore[arg-type]
        value = next(interference, None)
        if value is not None:
            server.store.set(cache, b"k", value, 60_000)
        return result

    monkeypatch.setattr(backend, "_read_for_update", racing_read)
    # 1st read sees 10, then 20 is written; 2nd read sees 20, then abc; 3rd sees abc
    with pytest.raises(NonNumericValue):
        backend.incr_decr(b"k", 1, True)
    interference = iter([b"x%d" % i for i in range(backend_module.MAX_ATTEMPTS)])  # distinct: equal content would pass
    server.store.set(cache, b"k", b"base", 60_000)
    with pytest.raises(BackendError) as err:
        backend.store(S.APPEND, b"k", b"!", 0, 0)
    assert err.value.code == "contention"
    assert str(err.value) == f"momento contention on append: the item kept changing, gave up after {backend_module.MAX_ATTEMPTS} attempts"
    interference = iter([b"one"])
    assert backend.store(S.APPEND, b"k", b"!", 0, 0) is R.STORED
    assert raw(server, cache, b"k") == b"one!"  # appended to the winner's value, not lost


def test_too_large(server: LocalServer, cache: str, monkeypatch: pytest.MonkeyPatch) -> None:
    b = make_backend(server, cache, max_value_size=100)
    try:
        b.store(S.SET, b"k", b"old", 0, 0)
        with pytest.raises(ValueTooLarge):
            b.store(S.ADD, b"k", b"x" * 101, 0, 0)
        assert raw(server, cache, b"k") == b"old"
        with pytest.raises(ValueTooLarge):
            b.store(S.SET, b"k", b"x" * 101, 0, 0)
        # the backend only refuses; dropping the stale value is dispatch's rule (next test)
        assert raw(server, cache, b"k") == b"old"
    finally:
        b.close()
    # beyond Momento's limit, checked before any call ...
    big = make_backend(server, cache, max_value_size=2**30)
    try:
        server.stats.reset()
        with pytest.raises(ValueTooLarge):
            big.store(S.ADD, b"k", b"x" * backend_module.MOMENTO_MAX_ITEM_BYTES, 0, 0)
        assert server.stats.snapshot()["calls"] == {}
        # ... and the server's own refusal (RESOURCE_EXHAUSTED + item size trailer) maps the same
        limit = backend_module.MOMENTO_MAX_ITEM_BYTES
        monkeypatch.setattr(backend_module, "MOMENTO_MAX_ITEM_BYTES", limit + 1024)
        with pytest.raises(ValueTooLarge):
            big.store(S.ADD, b"k", b"x" * (limit + 100), 0, 0)
        assert server.stats.snapshot()["calls"] == {"SetIfNotExists": 1}
    finally:
        big.close()


def test_too_large_set_through_dispatch_drops_the_old_value(server: LocalServer, cache: str) -> None:
    """memcached drops the old value when a set is too large (no stale data): on
    Momento too, whichever limit refuses the value."""
    b = make_backend(server, cache, max_value_size=100)
    try:
        stats = Stats()
        dispatcher = Dispatcher(b, stats.cache(cache), stats)
        b.store(S.SET, b"k", b"old", 0, 0)
        parser = Parser()
        parser.feed(b"set k 0 0 101\r\n" + b"x" * 101 + b"\r\n")
        command = parser.next_command()
        assert isinstance(command, Store)  # within the parser's limit: the backend refuses it
        assert list(dispatcher.run([command])) == [b"SERVER_ERROR object too large for cache\r\n"]
        assert raw(server, cache, b"k") is None
    finally:
        b.close()


# ---- delete, incr/decr, touch, flush --------------------------------------------


def test_delete(backend: mb.MomentoBackend, server: LocalServer, cache: str) -> None:
    assert backend.delete(b"k") is False
    backend.store(S.SET, b"k", b"v", 0, 0)
    assert backend.delete(b"k") is True
    assert raw(server, cache, b"k") is None
    assert backend.delete(b"k") is False


def test_incr_decr(backend: mb.MomentoBackend, server: LocalServer, cache: str) -> None:
    assert backend.incr_decr(b"n", 1, True) is None
    assert raw(server, cache, b"n") is None  # unlike Momento's Increment, nothing is created
    backend.store(S.SET, b"n", b"18446744073709551614", 9, 100)
    assert backend.incr_decr(b"n", 1, True) == 2**64 - 1
    assert backend.incr_decr(b"n", 3, True) == 2  # wraps at 2**64
    assert backend.get_many([b"n"], with_cas=True)[b"n"] == Item(
        b"2" + b" " * 19, 9, codec.cas_unique(raw(server, cache, b"n") or b"")
    )  # memcached pads in place; flags kept
    assert 90_000 < (ttl_ms(server, cache, b"n") or 0) <= 100_000  # TTL kept
    assert backend.incr_decr(b"n", 5, False) == 0  # floors at 0
    backend.store(S.SET, b"n", b"100", 0, 0)
    assert backend.incr_decr(b"n", 1, False) == 99
    assert raw(server, cache, b"n") == b"99 "
    assert backend.incr_decr(b"n", 2**64 - 1, True) == 98
    backend.store(S.SET, b"s", b"12abc", 0, 0)
    with pytest.raises(NonNumericValue):
        backend.incr_decr(b"s", 1, True)
    with pytest.raises(ValueError):
        backend.incr_decr(b"s", 2**64, True)


def test_touch(backend: mb.MomentoBackend, server: LocalServer, cache: str) -> None:
    assert backend.touch(b"k", 10) is False
    backend.store(S.SET, b"k", b"v", 0, 10)
    assert backend.touch(b"k", 1000) is True
    assert 999_000 < (ttl_ms(server, cache, b"k") or 0) <= 1_000_000
    assert backend.touch(b"k", -1) is True
    assert raw(server, cache, b"k") is None
    assert backend.touch(b"k", -1) is False


def test_touch_many(backend: mb.MomentoBackend, server: LocalServer, cache: str) -> None:
    backend.store(S.SET, b"a", b"1", 1, 10)
    backend.store(S.SET, b"b", b"2", 2, 10)
    found = backend.touch_many([b"a", b"b", b"missing", b"a"], 500)
    assert {k: (i.value, i.flags) for k, i in found.items()} == {b"a": (b"1", 1), b"b": (b"2", 2)}
    assert 499_000 < (ttl_ms(server, cache, b"b") or 0) <= 500_000
    assert raw(server, cache, b"missing") is None
    found = backend.touch_many([b"a", b"missing"], -1)  # returned once, then gone
    assert set(found) == {b"a"}
    assert raw(server, cache, b"a") is None
    assert backend.touch_many([], 10) == {}


def test_flush_all(backend: mb.MomentoBackend, server: LocalServer, cache: str) -> None:
    backend.store(S.SET, b"k", b"v", 0, 0)
    backend.flush_all()
    assert raw(server, cache, b"k") is None
    backend.store(S.SET, b"k", b"v", 0, 0)
    backend.flush_all(1000)
    backend.flush_all(0)  # replaces the pending delayed flush
    assert backend._flush_timer is None
    backend.store(S.SET, b"k", b"v", 0, 0)
    backend.flush_all(1)
    assert raw(server, cache, b"k") == b"v"
    deadline = time.monotonic() + WAIT_SECONDS
    while raw(server, cache, b"k") is not None:
        assert time.monotonic() < deadline, "the delayed flush_all did not happen"
        time.sleep(0.02)  # polling interval for the timer's effect


def test_flush_disabled(server: LocalServer, cache: str) -> None:
    b = make_backend(server, cache, allow_flush=False)
    try:
        with pytest.raises(FlushDisabled):
            b.flush_all()
    finally:
        b.close()


# ---- errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, code",
    [
        ("UNAVAILABLE", "unavailable"),
        ("UNAUTHENTICATED", "authentication"),
        ("PERMISSION_DENIED", "permission_denied"),
        ("RESOURCE_EXHAUSTED", "limit_exceeded"),
        ("INTERNAL", "internal"),
        ("DATA_LOSS", "internal"),
    ],
)
def test_grpc_errors_map_to_backend_errors(backend: mb.MomentoBackend, server: LocalServer, status: str, code: str) -> None:
    server.faults.add(f"*:error={status}:message=injected")
    with pytest.raises(BackendError) as err:
        backend.get_many([b"k"])
    assert err.value.code == code
    assert str(err.value) == f"momento {code.replace('_', ' ')} on get: injected"
    with pytest.raises(BackendError) as err:
        backend.get_many([b"a", b"b"])  # streaming GetBatch
    assert err.value.code == code
    with pytest.raises(BackendError):
        backend.store(S.APPEND, b"k", b"v", 0, 0)  # concurrent calls


def test_missing_cache_is_not_found(server: LocalServer) -> None:
    b = make_backend(server, "no-such-cache")
    try:
        with pytest.raises(BackendError) as err:
            b.store(S.SET, b"k", b"v", 0, 0)
        assert err.value.code == "not_found"
        assert str(err.value) == "momento not found on set: Cache not found: no-such-cache"
    finally:
        b.close()


def test_timeout_is_the_request_timeout(server: LocalServer, cache: str) -> None:
    b = make_backend(server, cache, request_timeout=0.3)
    server.faults.add("Get:delay=2")
    try:
        start = time.monotonic()
        with pytest.raises(BackendError) as err:
            b.get_many([b"k"])
        elapsed = time.monotonic() - start
        assert err.value.code == "timeout"
        assert str(err.value) == "momento timeout after 0.3s on get"
        assert elapsed < 1.5
    finally:
        server.faults.clear()
        b.close()


def test_dead_server_is_unavailable_quickly() -> None:
    srv = serve(host=HOST, port=0, caches=["c"])
    port = srv.port
    srv.stop(None)
    b = mb.MomentoBackend(mb.Endpoint.local(HOST, port), "c", request_timeout=5.0)
    try:
        start = time.monotonic()
        with pytest.raises(BackendError) as err:
            b.get_many([b"k"])
        assert err.value.code in ("unavailable", "timeout")
        assert str(err.value).startswith(f"momento {err.value.code}")
        assert time.monotonic() - start < 5.0 + 1.0
    finally:
        b.close()
    with pytest.raises(BackendError) as err:
        b.get_many([b"k"])
    assert str(err.value) == "momento unavailable on get: the backend is closed"


def test_closed_backend_and_close_is_idempotent(server: LocalServer, cache: str) -> None:
    released: list[int] = []
    b = make_backend(server, cache, on_close=lambda: released.append(1))
    b.close()
    b.close()
    assert released == [1]


# ---- connections and in-flight bound --------------------------------------------------


def _established_to(port: int) -> int:
    """TCP connections of this host in ESTABLISHED state whose remote port is ``port``."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc/net/tcp")
def test_connection_count_opens_separate_connections() -> None:
    """N CacheClients = N connections (distinct channel arguments); each raw
    channel shares its client's connection (identical arguments); a second
    backend in the process gets connections of its own."""
    srv = serve(host=HOST, port=0, caches=["c"])
    b = mb.MomentoBackend(mb.Endpoint.local(HOST, srv.port), "c", connection_count=3)
    other = None
    try:
        for i in range(6):
            b.get_many([b"k%d" % i])  # SDK Get
        assert _established_to(srv.port) == 3
        for i in range(6):
            b.get_many([b"k%d" % i, b"x"])  # raw GetBatch
            b.touch(b"k%d" % i, 10)  # raw UpdateTtl
            b.store(S.SET, b"k%d" % i, b"v", 0, 0)  # SDK Set
        assert srv.stats.snapshot()["calls"] == {"Get": 6, "GetBatch": 6, "UpdateTtl": 6, "Set": 6}
        assert _established_to(srv.port) == 3
        other = mb.MomentoBackend(mb.Endpoint.local(HOST, srv.port), "c", connection_count=2)
        for i in range(4):
            other.get_many([b"k%d" % i])
            other.delete(b"k%d" % i)  # raw KeysExist + SDK Delete
        assert _established_to(srv.port) == 5
    finally:
        b.close()
        if other is not None:
            other.close()
        srv.stop(None)


def test_channel_ids_are_unique_among_live_backends(server: LocalServer, cache: str) -> None:
    first = make_backend(server, cache, connection_count=2)
    second = make_backend(server, cache, connection_count=2)
    try:
        assert not set(first._connections.channel_ids) & set(second._connections.channel_ids)
        ids = list(first._connections.channel_ids)
        first.close()
        third = make_backend(server, cache, connection_count=2)
        assert third._connections.channel_ids == ids  # released ids are reused: the send limit stays near the SDK's
        third.close()
    finally:
        first.close()
        second.close()


# ---- which path each call takes ---------------------------------------------------------


SDK_METHODS = ("get", "set", "delete", "set_if_not_exists", "flush_cache", "create_cache")


@pytest.fixture
def sdk_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of calls of the SDK CacheClient's methods (spies that still call them)."""
    from momento import CacheClient

    counts = dict.fromkeys(SDK_METHODS, 0)
    for name in SDK_METHODS:
        real = getattr(CacheClient, name)

        def spy(self: object, *args: object, _real: object = real, _name: str = name) -> object:
            counts[_name] += 1
            return _real(self, *args)  # type: ignore[operator]

        monkeypatch.setattr(CacheClient, name, spy)
    return counts


def test_sdk_path_is_used_for_the_calls_the_sdk_has(
    server: LocalServer, cache: str, sdk_calls: dict[str, int]
) -> None:
    cache_cfg, cfg = config(f"{HOST}:{server.port}", cache_name=f"{cache}-sdk")
    b = mb.from_config(cache_cfg, cfg)  # type: ignore[arg-type]
    try:
        assert sdk_calls["create_cache"] == 1
        server.stats.reset()
        assert b.store(S.SET, b"k", b"v", 5, 0) is R.STORED  # SDK set
        assert b.store(S.ADD, b"k", b"w", 0, 0) is R.NOT_STORED  # SDK set_if_not_exists
        assert b.store(S.ADD, b"n", b"1", 0, 0) is R.STORED
        assert b.get_many([b"k"])[b"k"].flags == 5  # SDK get
        assert b.get_many([b"missing"]) == {}
        assert b.delete(b"k") is True  # KeysExist (raw) + SDK delete
        assert b.store(S.SET, b"n", b"2", 0, -1) is R.STORED  # past exptime: SDK delete
        b.flush_all()  # SDK flush_cache
        # raw only: GetBatch, SetIf, GetWithHash + ItemGetTtl + SetIfHash, UpdateTtl
        b.get_many([b"a", b"b"])
        b.store(S.REPLACE, b"a", b"x", 0, 0)
        b.store(S.SET, b"c", b"1", 0, 0)
        b.incr_decr(b"c", 1, True)
        b.touch(b"c", 10)
        assert {k: v for k, v in sdk_calls.items() if v} == {
            "create_cache": 1, "set": 2, "set_if_not_exists": 2, "get": 2, "delete": 2, "flush_cache": 1,
        }
        assert server.stats.snapshot()["calls"] == {
            "Set": 2, "SetIfNotExists": 2, "Get": 2, "KeysExist": 1, "Delete": 2, "FlushCache": 1,
            "GetBatch": 1, "SetIf": 1, "GetWithHash": 1, "ItemGetTtl": 1, "SetIfHash": 1, "UpdateTtl": 1,
        }
    finally:
        b.close()


def test_sdk_ttls_are_exact_milliseconds(backend: mb.MomentoBackend, server: LocalServer, cache: str) -> None:
    from momento.internal._utilities import _timedelta_to_ms  # what the SDK sends

    assert all(_timedelta_to_ms(transport.sdk_ttl(ms)) == ms for ms in range(1, 200_001))
    assert _timedelta_to_ms(transport.sdk_ttl(86_400_000)) == 86_400_000
    backend.store(S.SET, b"k", b"v", 0, 10)
    assert 9_000 < (ttl_ms(server, cache, b"k") or 0) <= 10_000


# ---- errors on the SDK path map as on the raw path ----------------------------------------

STATUSES = [
    ("UNAVAILABLE", "unavailable"),
    ("INTERNAL", "internal"),
    ("UNAUTHENTICATED", "authentication"),
    ("PERMISSION_DENIED", "permission_denied"),
    ("RESOURCE_EXHAUSTED", "limit_exceeded"),
    ("NOT_FOUND", "not_found"),
    ("INVALID_ARGUMENT", "invalid_argument"),
    ("OUT_OF_RANGE", "invalid_argument"),
    ("FAILED_PRECONDITION", "failed_precondition"),
    ("UNIMPLEMENTED", "unimplemented"),
    ("CANCELLED", "cancelled"),
    ("DATA_LOSS", "internal"),
    ("UNKNOWN", "internal"),
]


@pytest.mark.parametrize("status, code", STATUSES)
def test_sdk_errors_map_like_raw_errors(backend: mb.MomentoBackend, server: LocalServer, status: str, code: str) -> None:
    # forever (no count): the SDK retries UNAVAILABLE/INTERNAL of idempotent calls
    server.faults.add(f"Get:error={status}:message=injected {status}")
    server.faults.add(f"GetBatch:error={status}:message=injected {status}")
    server.stats.reset()
    with pytest.raises(BackendError) as sdk_err:
        backend.get_many([b"k"])  # SDK get
    with pytest.raises(BackendError) as raw_err:
        backend.get_many([b"a", b"b"])  # raw GetBatch
    assert (sdk_err.value.code, str(sdk_err.value)) == (code, f"momento {code.replace('_', ' ')} on get: injected {status}")
    assert (raw_err.value.code, str(raw_err.value)) == (sdk_err.value.code, str(sdk_err.value))
    calls = server.stats.snapshot()["calls"]
    assert calls["GetBatch"] == 1  # no retries of our own
    if status in ("UNAVAILABLE", "INTERNAL"):
        assert calls["Get"] > 1, "the SDK retries these"
    else:
        assert calls["Get"] == 1


def test_sdk_retries_stay_within_the_request_timeout(server: LocalServer, cache: str) -> None:
    """The SDK retries UNAVAILABLE, but a retry gets what is left of the deadline, not a new one."""
    b = make_backend(server, cache, request_timeout=0.5)
    try:
        b.store(S.SET, b"k", b"v", 0, 0)
        server.faults.add("Get:error=UNAVAILABLE:count=2")  # transient: retried, answered
        server.stats.reset()
        assert b.get_many([b"k"])[b"k"].value == b"v"
        assert server.stats.snapshot()["calls"] == {"Get": 3}
        server.faults.add("Get:delay=0.45:error=UNAVAILABLE")  # every attempt fails slowly
        start = time.monotonic()
        with pytest.raises(BackendError) as err:
            b.get_many([b"k"])
        elapsed = time.monotonic() - start
        assert err.value.code in ("unavailable", "timeout")
        assert elapsed < 2 * 0.5, f"{elapsed:.2f} s: retries must share the request_timeout"
    finally:
        server.faults.clear()
        b.close()


def test_sdk_write_and_control_errors(server: LocalServer, cache: str) -> None:
    b = make_backend(server, cache, request_timeout=0.3)
    try:
        server.faults.add("Set:delay=1")  # past the SDK deadline
        start = time.monotonic()
        with pytest.raises(BackendError) as err:
            b.store(S.SET, b"k", b"v", 0, 0)
        assert (err.value.code, str(err.value)) == ("timeout", "momento timeout after 0.3s on set")
        assert time.monotonic() - start < 1.0  # one attempt: DEADLINE_EXCEEDED is not retried
        server.faults.clear()
        server.faults.add("SetIfNotExists:error=RESOURCE_EXHAUSTED:message=rate limited")
        with pytest.raises(BackendError) as err:
            b.store(S.ADD, b"k", b"v", 0, 0)
        assert (err.value.code, str(err.value)) == ("limit_exceeded", "momento limit exceeded on add: rate limited")
        server.faults.add("Delete:error=UNAVAILABLE:message=down")
        b.store(S.SET, b"d", b"v", 0, 0)
        with pytest.raises(BackendError) as err:
            b.delete(b"d")
        assert (err.value.code, str(err.value)) == ("unavailable", "momento unavailable on delete: down")
        server.faults.add("FlushCache:error=PERMISSION_DENIED:message=no flush")
        with pytest.raises(BackendError) as err:
            b.flush_all()
        assert (err.value.code, str(err.value)) == ("permission_denied", "momento permission denied on flush_all: no flush")
        server.faults.add("CreateCache:error=UNAUTHENTICATED:message=bad key")
        with pytest.raises(BackendError) as err:
            b.create_cache(5.0)
        assert (err.value.code, str(err.value)) == ("authentication", "momento authentication on create_cache: bad key")
    finally:
        server.faults.clear()
        b.close()


# ---- configuration, credentials, embedded server --------------------------------------


def config(local: str, **cache: object) -> tuple[SimpleNamespace, SimpleNamespace]:
    settings = dict(
        cache_name="c", default_ttl=900, max_ttl=86400, connection_count=1, request_timeout=5.0,
        max_in_flight=16, flags=True, allow_flush=True,
    )
    settings.update(cache)
    return SimpleNamespace(**settings), SimpleNamespace(
        momento=MomentoConfig(local=local),
        proxy=SimpleNamespace(max_item_size=1024 * 1024),
    )


def test_from_config_local_creates_the_cache(server: LocalServer) -> None:
    cache_cfg, cfg = config(f"{HOST}:{server.port}", cache_name="created-by-proxy")
    b = mb.from_config(cache_cfg, cfg)  # type: ignore[arg-type]
    try:
        assert b.kind == "momento"
        assert "created-by-proxy" in server.store.list_caches()
        b.store(S.SET, b"k", b"v", 0, 0)
        assert server.store.get("created-by-proxy", b"k") == b"v"
        again = mb.from_config(cache_cfg, cfg)  # type: ignore[arg-type]
        again.close()  # the cache existed already: fine
    finally:
        b.close()


def test_local_endpoint_brackets_ipv6_hosts() -> None:
    """The SDK and the raw channels both make the gRPC target ``f"{host}:{port}"``."""
    assert mb.Endpoint.local("::1", 5) == mb.Endpoint("[::1]:5", "[::1]:5", False, "")
    assert mb.Endpoint.local("[::1]", 5) == mb.Endpoint.local("::1", 5)
    assert mb.Endpoint.local("127.0.0.1", 5) == mb.Endpoint("127.0.0.1:5", "127.0.0.1:5", False, "")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_from_config_local_ipv6_address() -> None:
    srv = serve(host="::1", port=0)
    try:
        b = mb.from_config(*config(f"[::1]:{srv.port}", cache_name="v6"))  # type: ignore[arg-type]
        try:
            assert "v6" in srv.store.list_caches()
            assert b.store(S.SET, b"k", b"v", 0, 0) is R.STORED  # SDK path
            assert set(b.get_many([b"k", b"other"])) == {b"k"}  # raw GetBatch
            assert srv.store.get("v6", b"k") == b"v"
        finally:
            b.close()
    finally:
        srv.stop(None)


def test_from_config_unreachable_local_server_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    srv = serve(host=HOST, port=0)
    port = srv.port
    srv.stop(None)
    monkeypatch.setattr(factory, "LOCAL_CONNECT_TIMEOUT_SECONDS", 0.5)
    with pytest.raises(BackendError) as err:
        mb.from_config(*config(f"{HOST}:{port}"))  # type: ignore[arg-type]
    assert f"cannot reach the local Momento server at {HOST}:{port} to create cache 'c'" in str(err.value)


def test_from_config_embedded_shares_one_child_and_stops_it() -> None:
    first = mb.from_config(*config("embedded", cache_name="one"))  # type: ignore[arg-type]
    server = embedded._server
    assert server is not None
    try:
        second = mb.from_config(*config("embedded", cache_name="two"))  # type: ignore[arg-type]
        assert embedded._server is server
        first.store(S.SET, b"k", b"1", 0, 0)
        second.store(S.SET, b"k", b"2", 0, 0)
        assert first.get_many([b"k"])[b"k"].value == b"1"
        assert second.get_many([b"k"])[b"k"].value == b"2"
        second.close()
        assert server.process.poll() is None
    finally:
        first.close()
    assert server.process.poll() is not None  # stopped with the last backend
    assert embedded._server is None


def _legacy_key(endpoint: str) -> str:
    return base64.b64encode(json.dumps({"endpoint": endpoint, "api_key": "secret-token"}).encode()).decode()


def _jwt(claims: dict[str, str]) -> str:
    import jwt  # the SDK's dependency

    token: str = jwt.encode(claims, "a-test-signing-key-of-at-least-32-bytes", algorithm="HS256")
    return token


def test_credentials_from_env() -> None:
    with pytest.raises(BackendError) as err:
        credentials_from_env("MY_KEY", "", environ={})
    assert err.value.code == "authentication"
    assert str(err.value) == "no Momento API key: set the environment variable MY_KEY or MOMENTO_AUTHENTICATION"
    endpoint = credentials_from_env("MY_KEY", "", environ={"MOMENTO_AUTHENTICATION": _legacy_key("x.example")})
    assert (endpoint.data_target, endpoint.control_target, endpoint.secure) == ("cache.x.example", "control.x.example", True)
    assert endpoint.auth_token == "secret-token" and "secret" not in repr(endpoint)
    v1 = _jwt({"c": "cache.y.example", "cp": "control.y.example"})
    assert credentials_from_env("MY_KEY", "", environ={"MY_KEY": v1}).data_target == "cache.y.example"
    v2 = _jwt({"t": "g"})
    assert credentials_from_env("MY_KEY", "z.example", environ={"MY_KEY": v2}).data_target == "cache.z.example"
    with pytest.raises(BackendError) as err:
        credentials_from_env("MY_KEY", "", environ={"MY_KEY": v2})
    assert str(err.value) == (
        "MY_KEY does not hold a Momento API key (neither a v1 key nor a legacy token); "
        "a v2 key also needs [momento] endpoint"
    )
    with pytest.raises(BackendError) as err:
        credentials_from_env("MY_KEY", "z.example", environ={"MY_KEY": v1})
    assert "secret" not in str(err.value) and "MY_KEY" in str(err.value)


def test_sdk_contract_has_not_moved() -> None:
    """Canary: fails loudly when the momento SDK changes what mproxy copies from it."""
    from momento.internal._utilities import ClientType
    from momento.internal.synchronous import _scs_grpc_manager
    from momento.internal.synchronous._utilities import make_metadata

    contract = transport.sdk_contract()
    assert contract.version.startswith("1.29."), (
        f"momento SDK {contract.version} installed; mproxy is verified with 1.29.x: re-check sdk_contract()"
    )
    provider = contract.credential_provider.for_momento_local("h", 1234)
    assert (provider.auth_token, provider.cache_endpoint, provider.control_endpoint, provider.port) == ("", "h", "h", 1234), (
        "CredentialProvider fields moved: Endpoint.from_credentials must follow"
    )
    assert mb.Endpoint.from_credentials(provider) == mb.Endpoint("h:1234", "h:1234", False, "")
    assert make_metadata("c") == [(transport.CACHE_HEADER, "c")], "the SDK's per-call cache metadata changed"
    interceptor = _scs_grpc_manager._interceptors("t", ClientType.CACHE, [])[0]
    headers = [h.name for h in interceptor.headers_to_add_every_time + interceptor._headers_to_add_once]
    assert sorted(headers) == sorted([transport.AUTHORIZATION_HEADER, transport.AGENT_HEADER, transport.RUNTIME_VERSION_HEADER]), (
        f"the SDK now sends headers {headers}: update the headers MomentoBackend sends"
    )


def test_sdk_contract_cache_client_and_configuration() -> None:
    """Canary: the CacheClient, Configuration and channel facts the hybrid relies on."""
    from momento.internal._utilities._grpc_channel_options import (
        DEFAULT_MAX_MESSAGE_SIZE,
        grpc_data_channel_options_from_grpc_config,
    )
    from momento.retry import FixedCountRetryStrategy

    sdk = transport.sdk_contract()
    for name in (*SDK_METHODS, "__exit__"):
        assert callable(getattr(sdk.cache_client, name, None)), f"CacheClient.{name} is gone"
    assert not hasattr(sdk.cache_client, "close"), "CacheClient.close() appeared: transport.Connections.close should use it now"
    assert transport.SDK_MAX_MESSAGE_BYTES == DEFAULT_MAX_MESSAGE_SIZE
    configuration = transport.sdk_configuration(sdk, 0.3, 7)
    grpc_config = configuration.get_transport_strategy().get_grpc_configuration()
    preset = sdk.configurations.InRegion.Default.v1().get_transport_strategy().get_grpc_configuration()
    assert grpc_config.get_deadline().total_seconds() == 0.3
    assert grpc_config.get_max_send_message_length() == DEFAULT_MAX_MESSAGE_SIZE + 7
    for getter in ("get_keepalive_permit_without_calls", "get_keepalive_time", "get_keepalive_timeout",
                   "get_max_receive_message_length", "get_root_certificates_pem"):
        assert getattr(grpc_config, getter)() == getattr(preset, getter)(), f"{getter} differs from the preset"
    preset_retry = sdk.configurations.InRegion.Default.v1().get_retry_strategy()
    assert isinstance(preset_retry, FixedCountRetryStrategy) and preset_retry._max_attempts == transport.SDK_MAX_RETRIES
    assert isinstance(configuration.get_retry_strategy(), sdk.retry_strategy)
    # the SDK's RetryInterceptor reads these props and calls calculate_retry_deadline(overall_deadline)
    from momento.internal.synchronous._retry_interceptor import RetryInterceptor
    from momento.retry import RetryableProps

    assert "calculate_retry_deadline" in RetryInterceptor.intercept_unary_unary.__code__.co_names
    assert {"grpc_status", "grpc_method", "attempt_number", "overall_deadline"} <= set(RetryableProps.__dataclass_fields__)
    # a raw channel must get exactly the arguments of its CacheClient's channel to share its connection
    assert [*grpc_data_channel_options_from_grpc_config(grpc_config), *transport.RECONNECT_OPTIONS] == transport.channel_options(
        grpc_config
    ), "the SDK builds its data channels differently now: update transport.channel_options"
    # the SDK's channels get the short reconnect backoff through the builder its grpc manager calls
    import importlib

    manager = importlib.import_module(transport.SDK_CHANNEL_OPTIONS_MODULE)
    builder = getattr(manager, transport.SDK_CHANNEL_OPTIONS_FUNCTION, None)
    assert builder is not None and f"options={transport.SDK_CHANNEL_OPTIONS_FUNCTION}(" in _source(manager), (
        f"{transport.SDK_CHANNEL_OPTIONS_MODULE} no longer builds data channel options with {transport.SDK_CHANNEL_OPTIONS_FUNCTION}"
    )
    assert list(builder(grpc_config)) == transport.channel_options(grpc_config), (
        "the SDK's data channels no longer get mproxy's reconnect backoff: update transport._shorten_sdk_reconnect_backoff"
    )


def _source(module: object) -> str:
    import inspect

    return inspect.getsource(module)  # type: ignore[arg-type]


class _FakeRpcError(grpc.RpcError):
    def __init__(self, status: grpc.StatusCode, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        self._status, self._trailers = status, trailers

    def code(self) -> grpc.StatusCode:
        return self._status

    def details(self) -> str:
        return "d"

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailers


def test_sdk_contract_responses_and_error_codes() -> None:
    """Canary: the response classes and attributes read, and one error table for both paths."""
    from momento.errors import InvalidArgumentException, MomentoErrorCode, convert_error
    from momento.internal.services import Service

    sdk = transport.sdk_contract()
    assert sdk.cache_get.Hit(b"x").value_bytes == b"x"
    for family, names in (
        (sdk.cache_get, ("Hit", "Miss", "Error")),
        (sdk.cache_set, ("Success", "Error")),
        (sdk.cache_set_if_not_exists, ("Stored", "NotStored", "Error")),
        (sdk.cache_delete, ("Success", "Error")),
        (sdk.cache_flush, ("Success", "Error")),
        (sdk.create_cache, ("Success", "CacheAlreadyExists", "Error")),
    ):
        assert all(isinstance(getattr(family, name, None), type) for name in names), f"{family} changed"
    assert {name for _, _, names in errors.ERROR_TABLE for name in names} <= set(MomentoErrorCode.__members__)
    for status in grpc.StatusCode:
        if status is grpc.StatusCode.OK:
            continue
        response = sdk.cache_get.Error(convert_error(_FakeRpcError(status), Service.CACHE))
        expected = errors.STATUS_CODES.get(status, "internal")
        err = errors.sdk_error(response, "get", 1.0)
        assert isinstance(err, BackendError) and err.code == expected, status
        # error_code alone (used without transport details) says the same, but for the two
        # statuses the SDK calls BAD_REQUEST_ERROR although nothing was wrong with the request
        by_error_code = errors.SDK_ERROR_CODES.get(response.error_code.name, "internal")
        assert by_error_code == expected or status in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNKNOWN), status
    too_large = _FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, (("err", "item_size_limit_exceeded"),))
    assert isinstance(errors.sdk_error(sdk.cache_set.Error(convert_error(too_large, Service.CACHE)), "set", 1.0), ValueTooLarge)
    client_side = errors.sdk_error(sdk.cache_set.Error(InvalidArgumentException("bad ttl", Service.CACHE)), "set", 1.0)
    assert isinstance(client_side, BackendError) and client_side.code == "invalid_argument"


# ---- under gevent (subprocess) -------------------------------------------------------------

_GEVENT_SCRIPT = r"""
from gevent import monkey
monkey.patch_all()
import json, sys, time
import gevent
from mproxy.backends import momento as mb
from mproxy.backends.base import StoreMode
mb.prepare_gevent()
port, cache, in_flight = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
b = mb.MomentoBackend(mb.Endpoint.local("127.0.0.1", port), cache, max_in_flight=in_flight, connection_count=2)
b.store(StoreMode.SET, b"k1", b"v", 0, 0)
b.get_many([b"warm-up"])
result = {}
for name, keys in (("get", [b"k1"]), ("multi", [b"k1", b"k2", b"k3"])):
    start = time.perf_counter()
    greenlets = [gevent.spawn(b.get_many, keys) for _ in range(100)]
    gevent.joinall(greenlets, raise_error=True)
    result[name] = time.perf_counter() - start
    expected = b.get_many([b"k1"])
    assert all(g.value == expected for g in greenlets), "wrong get_many results"
b.close()
print(json.dumps(result))
"""


def _run_script(source: str, args: list[str], tmp_path: Path) -> dict[str, float]:
    """Run ``source`` in a fresh interpreter; return the JSON object of its last stdout line."""
    script = tmp_path / "script.py"
    script.write_text(source)
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=env
    )
    assert done.returncode == 0, done.stderr
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def _run_gevent(server: LocalServer, cache: str, in_flight: int, tmp_path: Path) -> dict[str, float]:
    return _run_script(_GEVENT_SCRIPT, [str(server.port), cache, str(in_flight)], tmp_path)


@pytest.fixture
def slow_server() -> Iterator[LocalServer]:
    srv = serve(host=HOST, port=0, caches=["c"], faults=["Get:delay=0.05", "GetBatch:delay=0.05"], max_workers=256)
    try:
        yield srv
    finally:
        srv.stop(None)


def test_gevent_concurrent_get_many_do_not_serialize(slow_server: LocalServer, tmp_path: Path) -> None:
    figures = _run_gevent(slow_server, "c", 256, tmp_path)
    print(f"100 concurrent get_many, server delay 50 ms: {figures}")
    # serialized they would take 100 x 50 ms = 5 s; the bound leaves room for a loaded machine
    assert figures["get"] < 2.5
    assert figures["multi"] < 2.5


def test_gevent_max_in_flight_applies_back_pressure(slow_server: LocalServer, tmp_path: Path) -> None:
    figures = _run_gevent(slow_server, "c", 5, tmp_path)
    # 100 calls of >= 50 ms, 5 at a time: at least 20 rounds
    assert figures["get"] >= 20 * 0.05


_GEVENT_EMBEDDED_SCRIPT = r"""
from gevent import monkey
monkey.patch_all()
import json
from types import SimpleNamespace as NS
from mproxy.backends import momento as mb
from mproxy.backends.base import StoreMode
from mproxy.backends.momento import embedded
from mproxy.config import MomentoConfig
cache = NS(cache_name="c", default_ttl=900, max_ttl=86400, connection_count=1, request_timeout=5.0,
           max_in_flight=16, flags=True, allow_flush=True)
cfg = NS(momento=MomentoConfig(local="embedded"), proxy=NS(max_item_size=1 << 20))
first = mb.from_config(cache, cfg)
first.store(StoreMode.SET, b"k", b"v", 3, 0)
assert first.get_many([b"k"])[b"k"].flags == 3
child = embedded._server.process
first.close()
assert child.poll() is not None, "the embedded server outlived its last backend"
second = mb.from_config(cache, cfg)  # a new child, never closed: the atexit hook stops it
print(json.dumps({"first": child.pid, "second": embedded._server.process.pid}))
"""


def test_gevent_embedded_server_lifecycle(tmp_path: Path) -> None:
    pids = _run_script(_GEVENT_EMBEDDED_SCRIPT, [], tmp_path)
    assert pids["first"] != pids["second"]
    with pytest.raises(ProcessLookupError):
        os.kill(int(pids["second"]), 0)  # stopped and reaped at interpreter exit
