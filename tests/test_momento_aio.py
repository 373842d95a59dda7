"""The gRPC transport of the Momento backend: ``grpc.aio`` on one real thread, bridged to the hub.

``mproxy.backends.momento.aio`` and ``.bridge`` against the bundled server
(in this process, which gevent has not patched: the hub runs whenever a test
waits through gevent), then in gevent-patched subprocesses, as the proxy runs
it: deadlines, statuses, cancelling, closing, an idle transport, a thousand
waiters, callers on other threads, and forks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import grpc
import pytest
from momento_wire_types import cacheclient_pb2 as pb
from momento_wire_types import cacheclient_pb2_grpc as pb_grpc

from mproxy.backends.momento.aio import AioTransport
from mproxy.backends.momento.bridge import BlockingCall, PendingCall, TransportClosed
from mproxy.momento_local.server import LocalServer, serve

HOST = "127.0.0.1"
CACHE = "c"
METADATA = (("cache", CACHE), ("authorization", ""))
SUBPROCESS_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    srv = serve(host=HOST, port=0, caches=[CACHE])
    try:
        yield srv
    finally:
        srv.stop(None)


@pytest.fixture
def transport(server: LocalServer) -> Iterator[AioTransport]:
    t = AioTransport(f"{HOST}:{server.port}", pb_grpc.ScsStub, channels=2)
    t.start()
    try:
        yield t
    finally:
        t.close()
        server.faults.clear()


def get(transport: AioTransport, key: bytes = b"absent", timeout: float = 5.0, retry: int = 0) -> PendingCall:
    call = transport.submit("Get", pb._GetRequest(cache_key=key), METADATA, time.monotonic() + timeout, retry)
    assert isinstance(call, PendingCall)
    return call


def test_unary_and_streaming_calls(transport: AioTransport) -> None:
    deadline = time.monotonic() + 5
    transport.submit("Set", pb._SetRequest(cache_key=b"k", cache_body=b"v", ttl_milliseconds=60_000), METADATA, deadline).get()
    assert get(transport, b"k").get().cache_body == b"v"
    batch = pb._GetBatchRequest(items=[pb._GetRequest(cache_key=key) for key in (b"k", b"missing", b"k")])
    responses = transport.submit("GetBatch", batch, METADATA, deadline).get()
    assert [r.result for r in responses] == [pb.Hit, pb.Miss, pb.Hit]  # a server stream: the list of its messages
    seen: list[int] = []
    call = transport.submit("GetBatch", batch, METADATA, deadline)
    call.add_done_callback(lambda c: seen.append(len(c.result())))  # type: ignore[attr-defined]
    call.get()
    assert seen == [3]
    with pytest.raises(ValueError, match="no method 'Nope'"):
        transport.submit("Nope", batch, METADATA, deadline).get()


def test_deadline_status_and_retries(transport: AioTransport, server: LocalServer) -> None:
    server.faults.add("Get:delay=2")
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        get(transport, timeout=0.3).get()
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    assert 0.25 <= time.monotonic() - start < 1.5
    server.faults.clear()
    server.faults.add("Get:error=UNAVAILABLE:count=2:message=down")
    assert get(transport, retry=3).get().result == pb.Miss  # retried twice, then answered
    assert transport.retries == 2
    server.faults.add("Get:error=UNAVAILABLE:message=down")
    with pytest.raises(grpc.RpcError) as err:
        get(transport, retry=3).get()
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.UNAVAILABLE, "down")  # type: ignore[attr-defined]
    assert not isinstance(err.value, grpc.Call)  # an AioRpcError: errors.rpc_error reads it anyway
    assert transport.retries == 5
    server.faults.clear()
    server.faults.add("Get:error=FAILED_PRECONDITION:message=no")
    with pytest.raises(grpc.RpcError):
        get(transport, retry=3).get()
    assert transport.retries == 5  # only UNAVAILABLE and INTERNAL are retried


def test_cancel_and_interrupted_waiters(transport: AioTransport, server: LocalServer) -> None:
    server.faults.add("Get:delay=2")
    call = get(transport)
    gevent.sleep(0.05)
    call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        call.get()
    assert err.value.code() is grpc.StatusCode.CANCELLED  # type: ignore[attr-defined]
    start = time.monotonic()
    with pytest.raises(gevent.Timeout):
        with gevent.Timeout(0.1):
            get(transport).get()  # the greenlet gives up: its RPC is cancelled
    assert time.monotonic() - start < 1.0
    waiting = get(transport)
    assert waiting.wait(0.05) is False and not waiting.cancel_requested  # wait() does not cancel
    server.faults.clear()
    assert get(transport).get().result == pb.Miss


def test_close_ends_calls_in_flight_and_refuses_new_ones(server: LocalServer) -> None:
    t = AioTransport(f"{HOST}:{server.port}", pb_grpc.ScsStub)
    t.start()
    server.faults.add("Get:delay=3")
    try:
        calls = [get(t) for _ in range(5)]
        gevent.sleep(0.1)
        start = time.monotonic()
        t.close()
        assert time.monotonic() - start < 2.0
        for call in calls:
            assert call.wait(5.0)
            assert isinstance(call.exception(), (grpc.RpcError, TransportClosed))
        with pytest.raises(TransportClosed):
            get(t).get()
        t.close()  # idempotent
    finally:
        server.faults.clear()


def test_callers_on_other_threads_wait_on_real_locks(transport: AioTransport) -> None:
    out: list[object] = []

    def other_thread() -> None:
        call = transport.submit("Get", pb._GetRequest(cache_key=b"t"), METADATA, time.monotonic() + 5)
        out.append(type(call))
        out.append(call.get().result)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join(timeout=10)  # a real wait: the hub of this thread does not run meanwhile
    assert out == [BlockingCall, pb.Miss]


# ---- under gevent (subprocesses) -------------------------------------------------------------------

_PATCHED = r"""
from gevent import monkey
monkey.patch_all()
import json, os, sys, time
import gevent
from momento_wire_types import cacheclient_pb2 as pb, cacheclient_pb2_grpc as pb_grpc
from mproxy.backends.momento.aio import AioTransport

port, scenario = int(sys.argv[1]), sys.argv[2]
md = (("cache", "c"), ("authorization", ""))


def make():
    t = AioTransport("127.0.0.1:%d" % port, pb_grpc.ScsStub, channels=2)
    t.start()
    return t


def get(t, timeout=30.0):
    return t.submit("Get", pb._GetRequest(cache_key=b"absent"), md, time.monotonic() + timeout).get()


out = {}
if scenario == "many":
    t = make()
    get(t)
    threads = len(os.listdir("/proc/self/task"))
    start = time.monotonic()
    greenlets = [gevent.spawn(get, t) for _ in range(1000)]
    gevent.sleep(0.1)
    out["threads_added"] = len(os.listdir("/proc/self/task")) - threads
    gevent.joinall(greenlets, timeout=60)
    out["answered"] = sum(1 for g in greenlets if g.successful())
    out["seconds"] = time.monotonic() - start
    t.close()
elif scenario == "idle":
    # a fresh process: nothing but the transport could keep the hub's loop running
    t = make()
    slow = gevent.spawn(get, t)  # in flight: the transport holds the loop until it answers
    start = time.monotonic()
    gevent.wait(timeout=20)
    out["in_flight_waited"] = time.monotonic() - start
    out["in_flight_answered"] = slow.successful()
    get(t)
    start = time.monotonic()
    gevent.wait(timeout=20)  # idle: returns at once
    out["idle_waited"] = time.monotonic() - start
    t.close()
elif scenario == "fork":
    import grpc  # the parent imports gRPC, as a worker would, but makes no channel yet
    pid = os.fork()
    if pid == 0:
        t = make()  # the child may: the parent never started gRPC
        code = 0 if get(t).result == pb.Miss else 1
        t.close()
        os._exit(code)
    out["child_before"] = os.waitpid(pid, 0)[1]
    t = make()
    get(t)
    t.close()
    pid = os.fork()
    if pid == 0:
        try:
            make()
            os._exit(3)
        except RuntimeError as exc:
            os._exit(0 if "used in the parent before" in str(exc) else 4)
    out["child_after"] = os.waitpid(pid, 0)[1]
    t = make()  # the parent still can
    out["parent"] = get(t).result == pb.Miss
    t.close()
print(json.dumps(out))
"""


def _patched(server: LocalServer, scenario: str, tmp_path: Path, fault: str = "") -> dict[str, float]:
    """Run ``scenario`` of :data:`_PATCHED` in a fresh process (with the server's ``fault`` meanwhile)."""
    if fault:
        server.faults.add(fault)
    try:
        return _run_patched(server, scenario, tmp_path)
    finally:
        server.faults.clear()


def _run_patched(server: LocalServer, scenario: str, tmp_path: Path) -> dict[str, float]:
    script = tmp_path / "patched.py"
    script.write_text(_PATCHED)
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p))
    done = subprocess.run(
        [sys.executable, str(script), str(server.port), scenario],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_patched_a_thousand_waiters_without_a_thread_each(server: LocalServer, tmp_path: Path) -> None:
    result = _patched(server, "many", tmp_path, "Get:delay=0.3")
    assert result["answered"] == 1000
    assert result["threads_added"] <= 8  # gRPC core's own pool may grow a little: nothing per call
    assert result["seconds"] < 30


def test_patched_an_idle_transport_does_not_keep_the_hub_alive(server: LocalServer, tmp_path: Path) -> None:
    result = _patched(server, "idle", tmp_path, "Get:delay=0.3:count=1")
    assert result["in_flight_answered"] is True
    assert result["in_flight_waited"] >= 0.25  # gevent.wait() waited for the call in flight
    assert result["idle_waited"] < 10  # and not for an idle transport (it would wait 20 s)


def test_patched_fork_rules(server: LocalServer, tmp_path: Path) -> None:
    result = _patched(server, "fork", tmp_path)
    assert result["child_before"] == 0  # gRPC made after the fork works
    assert result["child_after"] == 0  # a child of a parent that used gRPC refuses, loudly
    assert result["parent"] is True
