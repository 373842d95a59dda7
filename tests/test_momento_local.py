"""The local Momento-compatible server, driven by the real ``momento`` SDK and raw stubs.

Runs un-patched (no gevent): the server is a plain gRPC server on a small
:class:`~mproxy.momento_local.pool.CallPool`.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import grpc
import pytest
from momento import CacheClient, Configurations, CredentialProvider
from momento.errors import MomentoErrorCode
from momento.responses import (
    CacheDelete,
    CacheFlush,
    CacheGet,
    CacheIncrement,
    CacheSet,
    CacheSetIfNotExists,
    CreateCache,
    DeleteCache,
    ListCaches,
)
from momento_wire_types import cacheclient_pb2 as pb
from momento_wire_types import cacheclient_pb2_grpc as pb_grpc
from momento_wire_types import common_pb2 as common

from mproxy.momento_local.control import control_request
from mproxy.momento_local.faults import FaultSpecError, parse_fault
from mproxy.momento_local.gate import MAX_ITEM_SIZE_BYTES
from mproxy.momento_local.pool import CallPool
from mproxy.momento_local.server import LocalServer, serve
from mproxy.momento_local.store import (
    CacheExistsError,
    CacheNotFoundError,
    IncrementOverflowError,
    NotAnIntegerError,
    Store,
    TtlUpdate,
    TtlUpdateResult,
    value_hash,
)

from tests.servers import FakeClock

HOST = "127.0.0.1"
CACHE = "test-cache"
#: Bound for anything that waits on the server (shared 2-core CI).
DEADLINE = 20.0

logging.getLogger("momentosdk").setLevel(logging.CRITICAL)


# ---- store unit tests (fake clock, no sockets) -------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> Store:
    s = Store(clock)
    s.create_cache("c")
    return s


def test_store_expiry_and_remaining_ttl(store: Store, clock: FakeClock) -> None:
    store.set("c", b"k", b"v", 1500)
    assert store.remaining_ttl_ms("c", b"k") == 1500
    clock.now += 1.499
    assert store.get("c", b"k") == b"v"
    clock.now += 0.001
    assert store.get("c", b"k") is None
    assert store.remaining_ttl_ms("c", b"k") is None
    assert store.keys_exist("c", [b"k"]) == [False]


def test_store_sweeps_expired_items_on_write(store: Store, clock: FakeClock) -> None:
    for i in range(100):
        store.set("c", b"old%d" % i, b"v", 10)
    clock.now += 1.0
    store.set("c", b"new", b"v", 10_000)
    assert list(store._caches["c"].items) == [b"new"]


def test_store_heap_stays_bounded_under_overwrites(store: Store) -> None:
    for _ in range(10_000):
        store.set("c", b"k", b"v", 60_000)
    assert len(store._caches["c"].heap) <= 2 + 1024 + 1


def test_store_caches(store: Store) -> None:
    with pytest.raises(CacheExistsError):
        store.create_cache("c")
    store.set("c", b"k", b"v", 1000)
    store.flush_cache("c")
    assert store.get("c", b"k") is None
    assert store.list_caches() == ["c"]
    store.delete_cache("c")
    for call in (lambda: store.get("c", b"k"), lambda: store.delete_cache("c"), lambda: store.flush_cache("c")):
        with pytest.raises(CacheNotFoundError):
            call()


def test_store_increment(store: Store, clock: FakeClock) -> None:
    assert store.increment("c", b"n", 5, 1000) == 5
    assert store.increment("c", b"n", -7, 1000) == -2
    assert store.get("c", b"n") == b"-2"
    store.set("c", b"plus", b"+41", 1000)
    assert store.increment("c", b"plus", 1, 1000) == 42
    for bad in (b"abc", b"1.5", b" 1", b"", b"9" * 30):
        store.set("c", b"bad", bad, 1000)
        with pytest.raises(NotAnIntegerError):
            store.increment("c", b"bad", 1, 1000)
        assert store.get("c", b"bad") == bad
    store.set("c", b"max", str(2**63 - 1).encode(), 1000)
    with pytest.raises(IncrementOverflowError):
        store.increment("c", b"max", 1, 1000)
    clock.now += 0.5
    store.increment("c", b"n", 1, 1000)
    assert store.remaining_ttl_ms("c", b"n") == 1000


def test_store_update_ttl(store: Store) -> None:
    assert store.update_ttl("c", b"k", TtlUpdate.OVERWRITE_TO, 1000) is TtlUpdateResult.MISSING
    store.set("c", b"k", b"v", 10_000)
    assert store.update_ttl("c", b"k", TtlUpdate.INCREASE_TO, 5000) is TtlUpdateResult.NOT_SET
    assert store.update_ttl("c", b"k", TtlUpdate.DECREASE_TO, 20_000) is TtlUpdateResult.NOT_SET
    assert store.remaining_ttl_ms("c", b"k") == 10_000
    assert store.update_ttl("c", b"k", TtlUpdate.INCREASE_TO, 20_000) is TtlUpdateResult.SET
    assert store.remaining_ttl_ms("c", b"k") == 20_000
    assert store.update_ttl("c", b"k", TtlUpdate.DECREASE_TO, 3000) is TtlUpdateResult.SET
    assert store.update_ttl("c", b"k", TtlUpdate.OVERWRITE_TO, 7000) is TtlUpdateResult.SET
    assert store.remaining_ttl_ms("c", b"k") == 7000
    assert store.get("c", b"k") == b"v"


def test_parse_fault() -> None:
    fault = parse_fault("Get:delay=0.5:error=unavailable:count=3:message=down: for a bit")
    assert (fault.rpc, fault.delay, fault.code, fault.remaining, fault.message) == (
        "Get",
        0.5,
        grpc.StatusCode.UNAVAILABLE,
        3,
        "down: for a bit",
    )
    assert parse_fault("*:delay=1").remaining is None
    for bad in ("Nope:delay=1", "Get", "Get:delay=x", "Get:delay=-1", "Get:error=OK", "Get:error=NOPE",
                "Get:count=0:delay=1", "Get:colour=red"):
        with pytest.raises(FaultSpecError):
            parse_fault(bad)


# ---- call pool (no sockets) ---------------------------------------------------


def test_call_pool_lends_a_sleepers_place_then_shrinks_back() -> None:
    release = threading.Event()
    pool = CallPool(1, sleep=lambda _seconds: release.wait(DEADLINE))
    asleep = pool.submit(pool.wait, 60.0)
    assert pool.submit(lambda: "ran").result(timeout=DEADLINE) == "ran"
    assert not asleep.done()
    release.set()
    assert asleep.result(timeout=DEADLINE) is None
    assert [pool.submit(lambda i=i: i).result(timeout=DEADLINE) for i in range(3)] == [0, 1, 2]
    deadline = time.monotonic() + DEADLINE
    while len(pool._workers) > 1:  # the surplus thread ends after its next job
        assert time.monotonic() < deadline, "the pool never shrank back to its size"
        pool.submit(lambda: None).result(timeout=DEADLINE)
    pool.shutdown()
    assert not pool._workers
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)


def test_call_pool_shutdown_runs_or_cancels_queued_jobs() -> None:
    gate = threading.Event()
    pool = CallPool(1)
    blocker = pool.submit(gate.wait, DEADLINE)
    queued = pool.submit(lambda: "queued")
    failing = pool.submit(lambda: 1 / 0)
    gate.set()
    pool.shutdown(wait=True)
    assert blocker.result() is True and queued.result() == "queued"
    with pytest.raises(ZeroDivisionError):
        failing.result()
    gate.clear()
    pool = CallPool(1)
    blocker = pool.submit(gate.wait, DEADLINE)
    deadline = time.monotonic() + DEADLINE
    while not blocker.running():
        assert time.monotonic() < deadline, "the first job never started"
        time.sleep(0.01)
    queued = pool.submit(lambda: "queued")
    pool.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    gate.set()
    assert blocker.result(timeout=DEADLINE) is True
    with pytest.raises(ValueError):
        CallPool(0)


# ---- server fixtures ---------------------------------------------------------


@pytest.fixture
def server() -> Iterator[LocalServer]:
    srv = serve(caches=[CACHE])
    try:
        yield srv
    finally:
        srv.stop(0)


def sdk_client(port: int, token: str = "") -> CacheClient:
    provider = CredentialProvider(token, HOST, HOST, HOST, port)
    return CacheClient(Configurations.Laptop.v1(), provider, timedelta(seconds=60))


@pytest.fixture
def client(server: LocalServer) -> Iterator[CacheClient]:
    with sdk_client(server.port) as c:
        yield c


@pytest.fixture
def stub(server: LocalServer) -> Iterator[pb_grpc.ScsStub]:
    with grpc.insecure_channel(f"{HOST}:{server.port}") as channel:
        yield pb_grpc.ScsStub(channel)


def md(cache: str = CACHE, token: str = "") -> list[tuple[str, str]]:
    return [("cache", cache), ("authorization", token)]


def rpc_error(call: object, *args: object, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value


def set_if(stub: pb_grpc.ScsStub, key: bytes, value: bytes, **condition: object) -> str:
    request = pb._SetIfRequest(cache_key=key, cache_body=value, ttl_milliseconds=60_000, **condition)
    return stub.SetIf(request, metadata=md(), timeout=DEADLINE).WhichOneof("result")


# ---- data plane through the SDK ----------------------------------------------


def test_sdk_set_get_delete(client: CacheClient) -> None:
    assert isinstance(client.get(CACHE, "k"), CacheGet.Miss)
    assert isinstance(client.set(CACHE, "k", b"\x00bytes\xff"), CacheSet.Success)
    hit = client.get(CACHE, "k")
    assert isinstance(hit, CacheGet.Hit) and hit.value_bytes == b"\x00bytes\xff"
    assert isinstance(client.delete(CACHE, "k"), CacheDelete.Success)
    assert isinstance(client.get(CACHE, "k"), CacheGet.Miss)
    assert isinstance(client.delete(CACHE, "never-set"), CacheDelete.Success)
    assert isinstance(client.set_if_not_exists(CACHE, "n", "1"), CacheSetIfNotExists.Stored)
    assert isinstance(client.set_if_not_exists(CACHE, "n", "2"), CacheSetIfNotExists.NotStored)


def test_ttl_expires(client: CacheClient, stub: pb_grpc.ScsStub) -> None:
    assert isinstance(client.set(CACHE, "short", "v", ttl=timedelta(milliseconds=50)), CacheSet.Success)
    client.set(CACHE, "long", "v", ttl=timedelta(seconds=60))
    deadline = time.monotonic() + DEADLINE
    while not isinstance(client.get(CACHE, "short"), CacheGet.Miss):
        assert time.monotonic() < deadline, "item with a 50 ms TTL never expired"
        time.sleep(0.01)
    assert isinstance(client.get(CACHE, "long"), CacheGet.Hit)
    ttl = stub.ItemGetTtl(pb._ItemGetTtlRequest(cache_key=b"long"), metadata=md(), timeout=DEADLINE)
    assert 0 < ttl.found.remaining_ttl_millis <= 60_000
    missing = stub.ItemGetTtl(pb._ItemGetTtlRequest(cache_key=b"short"), metadata=md(), timeout=DEADLINE)
    assert missing.WhichOneof("result") == "missing"


def test_unknown_cache_is_not_found(client: CacheClient, stub: pb_grpc.ScsStub) -> None:
    for response in (client.get("nope", "k"), client.set("nope", "k", "v"), client.increment("nope", "k")):
        assert response.error_code is MomentoErrorCode.NOT_FOUND_ERROR  # type: ignore[union-attr]
    error = rpc_error(stub.Get, pb._GetRequest(cache_key=b"k"), metadata=md("nope"), timeout=DEADLINE)
    assert error.code() is grpc.StatusCode.NOT_FOUND and "nope" in error.details()


def test_missing_cache_header_and_unimplemented(stub: pb_grpc.ScsStub, server: LocalServer) -> None:
    error = rpc_error(stub.Get, pb._GetRequest(cache_key=b"k"), metadata=[("authorization", "")], timeout=DEADLINE)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    error = rpc_error(stub.DictionaryFetch, pb._DictionaryFetchRequest(dictionary_name=b"d"), metadata=md(),
                      timeout=DEADLINE)
    assert error.code() is grpc.StatusCode.UNIMPLEMENTED


def test_limits(client: CacheClient, stub: pb_grpc.ScsStub) -> None:
    too_long = client.set(CACHE, "k", "v", ttl=timedelta(seconds=86_401))
    assert too_long.error_code is MomentoErrorCode.INVALID_ARGUMENT_ERROR  # type: ignore[union-attr]
    assert isinstance(client.set(CACHE, "k", "v", ttl=timedelta(seconds=86_400)), CacheSet.Success)
    too_big = client.set(CACHE, "k", b"x" * MAX_ITEM_SIZE_BYTES)
    assert too_big.error_code is MomentoErrorCode.LIMIT_EXCEEDED_ERROR  # type: ignore[union-attr]
    assert "Item size limit exceeded" in too_big.message  # type: ignore[union-attr]
    assert isinstance(client.set(CACHE, "k", b"x" * (MAX_ITEM_SIZE_BYTES - 1)), CacheSet.Success)
    huge = pb._SetRequest(cache_key=b"k", cache_body=b"x" * MAX_ITEM_SIZE_BYTES, ttl_milliseconds=1000)
    error = rpc_error(stub.Set, huge, metadata=md(), timeout=DEADLINE)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("err", "item_size_limit_exceeded") in error.trailing_metadata()
    zero = rpc_error(stub.Set, pb._SetRequest(cache_key=b"k", cache_body=b"v"), metadata=md(), timeout=DEADLINE)
    assert zero.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_auth_token_required() -> None:
    with serve(caches=[CACHE], auth_token="s3cret") as srv:
        with sdk_client(srv.port) as anonymous:
            denied = anonymous.get(CACHE, "k")
            assert denied.error_code is MomentoErrorCode.AUTHENTICATION_ERROR  # type: ignore[union-attr]
            listed = anonymous.list_caches()
            assert listed.error_code is MomentoErrorCode.AUTHENTICATION_ERROR  # type: ignore[union-attr]
        with sdk_client(srv.port, "s3cret") as authorized:
            assert isinstance(authorized.set(CACHE, "k", "v"), CacheSet.Success)
            assert isinstance(authorized.get(CACHE, "k"), CacheGet.Hit)
        with grpc.insecure_channel(f"{HOST}:{srv.port}") as channel:
            raw = pb_grpc.ScsStub(channel)
            error = rpc_error(raw.Get, pb._GetRequest(cache_key=b"k"), metadata=[("cache", CACHE)], timeout=DEADLINE)
            assert error.code() is grpc.StatusCode.UNAUTHENTICATED


def test_increment(client: CacheClient) -> None:
    first = client.increment(CACHE, "n", 5)
    assert isinstance(first, CacheIncrement.Success) and first.value == 5
    assert client.increment(CACHE, "n", -8).value == -3  # type: ignore[union-attr]
    hit = client.get(CACHE, "n")
    assert isinstance(hit, CacheGet.Hit) and hit.value_bytes == b"-3"
    client.set(CACHE, "text", "abc")
    bad = client.increment(CACHE, "text")
    assert bad.error_code is MomentoErrorCode.FAILED_PRECONDITION_ERROR  # type: ignore[union-attr]
    client.set(CACHE, "big", str(2**63 - 1))
    overflow = client.increment(CACHE, "big")
    assert overflow.error_code is MomentoErrorCode.FAILED_PRECONDITION_ERROR  # type: ignore[union-attr]


# ---- data plane through raw stubs --------------------------------------------


def test_concurrent_increments_are_atomic(stub: pb_grpc.ScsStub) -> None:
    def worker() -> None:
        for _ in range(50):
            request = pb._IncrementRequest(cache_key=b"n", amount=1, ttl_milliseconds=60_000)
            stub.Increment(request, metadata=md(), timeout=DEADLINE)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)
    got = stub.Get(pb._GetRequest(cache_key=b"n"), metadata=md(), timeout=DEADLINE)
    assert got.cache_body == b"400"


def test_set_if_conditions(stub: pb_grpc.ScsStub) -> None:
    assert set_if(stub, b"k", b"a", present=common.Present()) == "not_stored"
    assert set_if(stub, b"k", b"a", equal=common.Equal(value_to_check=b"a")) == "not_stored"
    differs_x = common.PresentAndNotEqual(value_to_check=b"x")
    assert set_if(stub, b"k", b"a", present_and_not_equal=differs_x) == "not_stored"
    assert set_if(stub, b"k", b"a", absent=common.Absent()) == "stored"
    assert set_if(stub, b"k", b"b", absent=common.Absent()) == "not_stored"
    assert set_if(stub, b"k", b"b", present=common.Present()) == "stored"
    assert set_if(stub, b"k", b"c", equal=common.Equal(value_to_check=b"a")) == "not_stored"
    assert set_if(stub, b"k", b"c", equal=common.Equal(value_to_check=b"b")) == "stored"
    assert set_if(stub, b"k", b"d", not_equal=common.NotEqual(value_to_check=b"c")) == "not_stored"
    assert set_if(stub, b"k", b"d", not_equal=common.NotEqual(value_to_check=b"z")) == "stored"
    differs_d = common.PresentAndNotEqual(value_to_check=b"d")
    assert set_if(stub, b"k", b"e", present_and_not_equal=differs_d) == "not_stored"
    assert set_if(stub, b"k", b"e", present_and_not_equal=common.PresentAndNotEqual(value_to_check=b"z")) == "stored"
    assert set_if(stub, b"k", b"f", absent_or_equal=common.AbsentOrEqual(value_to_check=b"z")) == "not_stored"
    assert set_if(stub, b"k", b"f", absent_or_equal=common.AbsentOrEqual(value_to_check=b"e")) == "stored"
    assert set_if(stub, b"new1", b"v", absent_or_equal=common.AbsentOrEqual(value_to_check=b"z")) == "stored"
    assert set_if(stub, b"new2", b"v", not_equal=common.NotEqual(value_to_check=b"v")) == "stored"
    got = stub.Get(pb._GetRequest(cache_key=b"k"), metadata=md(), timeout=DEADLINE)
    assert (got.result, got.cache_body) == (pb.Hit, b"f")
    error = rpc_error(stub.SetIf, pb._SetIfRequest(cache_key=b"k", cache_body=b"v", ttl_milliseconds=1000),
                      metadata=md(), timeout=DEADLINE)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_set_if_hash_with_get_with_hash(stub: pb_grpc.ScsStub) -> None:
    def get_hash(key: bytes) -> pb._GetWithHashResponse:
        return stub.GetWithHash(pb._GetWithHashRequest(cache_key=key), metadata=md(), timeout=DEADLINE)

    def set_if_hash(key: bytes, value: bytes, **condition: object) -> pb._SetIfHashResponse:
        request = pb._SetIfHashRequest(cache_key=key, cache_body=value, ttl_milliseconds=60_000, **condition)
        return stub.SetIfHash(request, metadata=md(), timeout=DEADLINE)

    assert get_hash(b"k").WhichOneof("result") == "missing"
    missing_ok = set_if_hash(b"k", b"A", absent_or_hash_equal=common.AbsentOrHashEqual(hash_to_check=b"h"))
    assert missing_ok.WhichOneof("result") == "stored"
    found = get_hash(b"k").found
    assert found.value == b"A" and found.hash == missing_ok.stored.new_hash == value_hash(b"A")
    assert len(found.hash) == 32
    swapped = set_if_hash(b"k", b"B", present_and_hash_equal=common.PresentAndHashEqual(hash_to_check=found.hash))
    assert swapped.WhichOneof("result") == "stored"
    stale = set_if_hash(b"k", b"C", present_and_hash_equal=common.PresentAndHashEqual(hash_to_check=found.hash))
    assert stale.WhichOneof("result") == "not_stored"
    same = common.PresentAndNotHashEqual(hash_to_check=value_hash(b"B"))
    assert set_if_hash(b"k", b"C", present_and_not_hash_equal=same).WhichOneof("result") == "not_stored"
    other = common.AbsentOrNotHashEqual(hash_to_check=value_hash(b"A"))
    assert set_if_hash(b"k", b"C", absent_or_not_hash_equal=other).WhichOneof("result") == "stored"
    assert set_if_hash(b"k", b"D", unconditional=common.Unconditional()).WhichOneof("result") == "stored"
    absent_only = common.PresentAndHashEqual(hash_to_check=value_hash(b"D"))
    assert set_if_hash(b"gone", b"v", present_and_hash_equal=absent_only).WhichOneof("result") == "not_stored"
    assert get_hash(b"k").found.value == b"D"


def test_update_ttl_and_item_type(stub: pb_grpc.ScsStub) -> None:
    def update(**mode: int) -> str:
        request = pb._UpdateTtlRequest(cache_key=b"k", **mode)
        return stub.UpdateTtl(request, metadata=md(), timeout=DEADLINE).WhichOneof("result")

    def remaining() -> int:
        response = stub.ItemGetTtl(pb._ItemGetTtlRequest(cache_key=b"k"), metadata=md(), timeout=DEADLINE)
        return response.found.remaining_ttl_millis

    assert update(overwrite_to_milliseconds=1000) == "missing"
    item_type = stub.ItemGetType(pb._ItemGetTypeRequest(cache_key=b"k"), metadata=md(), timeout=DEADLINE)
    assert item_type.WhichOneof("result") == "missing"
    stub.Set(pb._SetRequest(cache_key=b"k", cache_body=b"v", ttl_milliseconds=100_000), metadata=md(), timeout=DEADLINE)
    item_type = stub.ItemGetType(pb._ItemGetTypeRequest(cache_key=b"k"), metadata=md(), timeout=DEADLINE)
    assert item_type.found.item_type == pb._ItemGetTypeResponse.SCALAR
    assert update(increase_to_milliseconds=50_000) == "not_set"
    assert update(increase_to_milliseconds=500_000) == "set"
    assert 100_000 < remaining() <= 500_000
    assert update(decrease_to_milliseconds=600_000) == "not_set"
    assert update(decrease_to_milliseconds=200_000) == "set"
    assert 100_000 < remaining() <= 200_000
    assert update(overwrite_to_milliseconds=300_000) == "set"
    assert 200_000 < remaining() <= 300_000
    error = rpc_error(stub.UpdateTtl, pb._UpdateTtlRequest(cache_key=b"k", overwrite_to_milliseconds=86_400_001),
                      metadata=md(), timeout=DEADLINE)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_batches_stream_in_order(stub: pb_grpc.ScsStub, server: LocalServer) -> None:
    items = [pb._SetRequest(cache_key=b"k%d" % i, cache_body=b"v%d" % i, ttl_milliseconds=60_000) for i in range(5)]
    set_responses = list(stub.SetBatch(pb._SetBatchRequest(items=items), metadata=md(), timeout=DEADLINE))
    assert [r.result for r in set_responses] == [pb.Ok] * 5
    keys = [b"k0", b"missing", b"k4", b"k2"]
    request = pb._GetBatchRequest(items=[pb._GetRequest(cache_key=k) for k in keys])
    got = [(r.result, r.cache_body) for r in stub.GetBatch(request, metadata=md(), timeout=DEADLINE)]
    assert got == [(pb.Hit, b"v0"), (pb.Miss, b""), (pb.Hit, b"v4"), (pb.Hit, b"v2")]
    exists = stub.KeysExist(pb._KeysExistRequest(cache_keys=keys), metadata=md(), timeout=DEADLINE)
    assert list(exists.exists) == [True, False, True, True]
    stats = server.stats.snapshot()
    assert stats["calls"] == {"SetBatch": 1, "GetBatch": 1, "KeysExist": 1}
    assert stats["keys"] == {"SetBatch": 5, "GetBatch": 4, "KeysExist": 4}
    error = rpc_error(lambda: list(stub.GetBatch(request, metadata=md("nope"), timeout=DEADLINE)))
    assert error.code() is grpc.StatusCode.NOT_FOUND


# ---- control plane through the SDK -------------------------------------------


def test_control_calls(client: CacheClient) -> None:
    assert isinstance(client.create_cache("other"), CreateCache.Success)
    assert isinstance(client.create_cache("other"), CreateCache.CacheAlreadyExists)
    listed = client.list_caches()
    assert isinstance(listed, ListCaches.Success)
    assert sorted(c.name for c in listed.caches) == ["other", CACHE]
    client.set("other", "k", "v")
    assert isinstance(client.flush_cache("other"), CacheFlush.Success)
    assert isinstance(client.get("other", "k"), CacheGet.Miss)
    assert isinstance(client.delete_cache("other"), DeleteCache.Success)
    assert client.get("other", "k").error_code is MomentoErrorCode.NOT_FOUND_ERROR  # type: ignore[union-attr]
    gone = client.delete_cache("other")
    assert gone.error_code is MomentoErrorCode.NOT_FOUND_ERROR  # type: ignore[union-attr]
    flushed = client.flush_cache("other")
    assert flushed.error_code is MomentoErrorCode.NOT_FOUND_ERROR  # type: ignore[union-attr]


# ---- fault injection ---------------------------------------------------------


def test_fault_delay(client: CacheClient, server: LocalServer) -> None:
    client.set(CACHE, "k", "v")
    server.faults.add("Get:delay=0.3:count=1")
    started = time.monotonic()
    assert isinstance(client.get(CACHE, "k"), CacheGet.Hit)
    assert time.monotonic() - started >= 0.3


def test_fault_delay_holds_no_thread() -> None:
    with serve(caches=[CACHE], faults=["Get:delay=60:count=2"], max_workers=1) as srv:
        with grpc.insecure_channel(f"{HOST}:{srv.port}") as channel:
            raw = pb_grpc.ScsStub(channel)
            delayed = [raw.Get.future(pb._GetRequest(cache_key=b"k"), metadata=md(), timeout=DEADLINE * 3)
                       for _ in range(2)]
            deadline = time.monotonic() + DEADLINE
            while srv.stats.snapshot()["calls"].get("Get", 0) < 2:
                assert time.monotonic() < deadline, "the delayed calls never arrived"
                time.sleep(0.01)
            # both delayed calls are asleep: the one serving thread is free for this call
            set_request = pb._SetRequest(cache_key=b"k", cache_body=b"v", ttl_milliseconds=60_000)
            raw.Set(set_request, metadata=md(), timeout=DEADLINE)
            assert srv.store.get(CACHE, b"k") == b"v"
            for call in delayed:
                call.cancel()


def test_delayed_write_applies_after_the_client_gave_up(stub: pb_grpc.ScsStub, server: LocalServer) -> None:
    server.faults.add("Set:delay=0.5:count=1")
    request = pb._SetRequest(cache_key=b"late", cache_body=b"v", ttl_milliseconds=60_000)
    error = rpc_error(stub.Set, request, metadata=md(), timeout=0.05)
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + DEADLINE
    while server.store.get(CACHE, b"late") is None:
        assert time.monotonic() < deadline, "the delayed write never applied"
        time.sleep(0.01)


def test_fault_error_for_n_calls_then_success(client: CacheClient, server: LocalServer) -> None:
    client.set(CACHE, "k", "v")
    reply = control_request(HOST, server.control_port, "fault Get:error=RESOURCE_EXHAUSTED:count=2:message=slow down")
    assert reply == "OK"
    for _ in range(2):
        failed = client.get(CACHE, "k")
        assert failed.error_code is MomentoErrorCode.LIMIT_EXCEEDED_ERROR  # type: ignore[union-attr]
    assert isinstance(client.get(CACHE, "k"), CacheGet.Hit)
    assert isinstance(client.set(CACHE, "k", "v"), CacheSet.Success)


def test_fault_wildcard_and_control_port(client: CacheClient, server: LocalServer) -> None:
    port = server.control_port
    assert control_request(HOST, port, "fault *:error=unavailable") == "OK"
    assert client.set(CACHE, "k", "v").error_code is MomentoErrorCode.SERVER_UNAVAILABLE  # type: ignore[union-attr]
    listed = client.list_caches()
    assert listed.error_code is MomentoErrorCode.SERVER_UNAVAILABLE  # type: ignore[union-attr]
    assert control_request(HOST, port, "clear") == "OK"
    assert isinstance(client.set(CACHE, "k", "v"), CacheSet.Success)
    assert control_request(HOST, port, "fault Get:nonsense=1").startswith("ERROR ")
    assert control_request(HOST, port, "explode").startswith("ERROR ")
    assert control_request(HOST, port, "reset") == "OK"
    assert control_request(HOST, port, "stats") == '{"calls": {}, "keys": {}}'
    client.set(CACHE, "k", "v")
    assert control_request(HOST, port, "stats") == '{"calls": {"Set": 1}, "keys": {"Set": 1}}'


def test_fault_rules_all_consume_first_error_wins(stub: pb_grpc.ScsStub, server: LocalServer) -> None:
    server.faults.add("Get:error=DATA_LOSS:count=1")
    server.faults.add("*:error=UNAVAILABLE:count=1")
    error = rpc_error(stub.Get, pb._GetRequest(cache_key=b"k"), metadata=md(), timeout=DEADLINE)
    assert (error.code(), error.details()) == (grpc.StatusCode.DATA_LOSS, "injected fault: DATA_LOSS on Get")
    stub.Set(pb._SetRequest(cache_key=b"k", cache_body=b"v", ttl_milliseconds=1000), metadata=md(), timeout=DEADLINE)


# ---- console script ------------------------------------------------------------


def read_line(stream: object, timeout: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()  # type: ignore[attr-defined]
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"no line within {timeout} s")


@pytest.mark.e2e
def test_console_script_prints_ports_and_exits_zero_on_sigterm() -> None:
    argv = [sys.executable, "-m", "mproxy.momento_local", "--port", "0", "--control-port", "0",
            "--cache", CACHE, "--fault", "Increment:error=INTERNAL:count=1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = read_line(proc.stdout, DEADLINE)
        words = line.split()
        assert words[:3] == ["mproxy-momento-local", "listening", "on"] and words[4] == "control", line
        port = int(words[3].rsplit(":", 1)[1])
        control_port = int(words[5].rsplit(":", 1)[1])
        with sdk_client(port) as client:
            assert isinstance(client.set(CACHE, "k", "v"), CacheSet.Success)
            assert isinstance(client.get(CACHE, "k"), CacheGet.Hit)
            failed = client.increment(CACHE, "n")
            assert failed.error_code is MomentoErrorCode.INTERNAL_SERVER_ERROR  # type: ignore[union-attr]
            assert client.increment(CACHE, "n").value == 1  # type: ignore[union-attr]
        assert '"Increment": 2' in control_request(HOST, control_port, "stats")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=DEADLINE)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


@pytest.mark.e2e
def test_console_script_exits_one_when_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        argv = [sys.executable, "-m", "mproxy.momento_local", "--port", str(taken.getsockname()[1])]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=DEADLINE)
    assert result.returncode == 1 and "cannot bind" in result.stderr and result.stdout == ""


@pytest.mark.e2e
def test_console_script_rejects_bad_fault() -> None:
    argv = [sys.executable, "-m", "mproxy.momento_local", "--fault", "Get:delay=soon"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=DEADLINE)
    assert result.returncode == 2 and "bad fault spec" in result.stderr and result.stdout == ""
