"""End to end on the Momento path, through the real CLI and real processes.

    client (raw TCP) -> ``python -m mproxy`` (gevent) -> momento SDK / gRPC
    -> ``python -m mproxy.momento_local`` (the bundled Momento-compatible server)

Both servers are subprocesses; the local server is reached with
``[momento] local = "HOST:PORT"`` and driven at run time through its control
port (``fault SPEC`` / ``clear`` / ``stats``). Covered:

* concurrency: 100 connections each doing one ``get`` of its own key while the
  server delays every Get by 50 ms finish in well under a second (gRPC does
  not block the gevent hub) in a few coalesced calls; the same without delay
  for comparison;
* faults: error statuses, delays past ``request_timeout``, and the server
  SIGKILLed and restarted on the same port, each answered ``SERVER_ERROR``
  promptly on a connection that stays open and works again afterwards;
* the admin port's ``stats`` counts the backend errors by code;
* a timed-out write may still apply, but never after a later acknowledged
  write of the same key (issue 11, defect 8).

Measured figures are printed (``pytest -s`` shows them). Every process is
stopped in a ``finally``; every wait is a poll with a deadline.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mproxy.backends.momento.embedded import read_ports
from tests.servers import HOST, LocalMomento, RawSession, Server, start_local_momento, start_mproxy

pytestmark = pytest.mark.e2e

CACHE = "e2e"
#: How long the local server may take to print its listening line.
LOCAL_START_TIMEOUT = 20.0
#: ``request_timeout`` of the mproxy used by the fault tests.
REQUEST_TIMEOUT = 0.5
#: Slack on top of ``REQUEST_TIMEOUT`` for a SERVER_ERROR reply (shared 2-core CI).
#: Smaller than the injected delay (3 s), so a proxy waiting for the server fails.
REPLY_SLACK = 1.5
#: Injected delay past the timeout.
LONG_DELAY = 3.0
#: Connections of the concurrency test, and the per-call delay injected there.
CLIENTS = 100
CALL_DELAY = 0.05
#: Upper bound for the 100 delayed gets (serialized they would take 5 s).
CONCURRENCY_BOUND = 1.0
#: Bound for mproxy to serve again after the local server restarts.
RECOVERY_DEADLINE = 15.0
#: Interval between two recovery probes (a poll interval, not a synchronisation).
POLL_INTERVAL = 0.05


def mproxy_config(momento_port: int, request_timeout: float) -> str:
    return f"""\
[admin]
host = "{HOST}"
port = 0

[debug]
log_level = "warning"

[[cache]]
host = "{HOST}"
port = 0
cache_name = "{CACHE}"
backend = "momento"
request_timeout = {request_timeout}

[momento]
local = "{HOST}:{momento_port}"
"""


@dataclass
class Stack:
    momento: LocalMomento
    mproxy: Server
    tmp_path: Path

    @property
    def port(self) -> int:
        return self.mproxy.port

    @property
    def admin_port(self) -> int:
        return self.mproxy.admin_port

    def admin_stats(self) -> dict[str, str]:
        with RawSession(self.admin_port) as admin:
            assert admin.send(b"stats\r\n")
            raw, complete = admin.recv_until_terminator(b"END\r\n")
        assert complete, raw
        stats = {}
        for line in raw.decode().splitlines():
            if line.startswith("STAT "):
                _, name, value = line.split(" ", 2)
                stats[name] = value
        return stats


@pytest.fixture
def stack_factory(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """``factory(request_timeout, faults=()) -> Stack``; everything started is stopped."""
    stacks: list[Stack] = []

    def factory(request_timeout: float, faults: tuple[str, ...] = ()) -> Stack:
        momento = start_local_momento(tmp_path, CACHE, faults=faults)
        try:
            proxy = start_mproxy(mproxy_config(momento.port, request_timeout), tmp_path)
        except BaseException:
            momento.stop()
            raise
        stack = Stack(momento, proxy, tmp_path)
        stacks.append(stack)
        return stack

    try:
        yield factory
    finally:
        for stack in stacks:
            try:
                stack.mproxy.stop()
            finally:  # no graceful stop: it would wait for calls a fault still delays
                stack.momento.kill()


# ---- talking to mproxy -------------------------------------------------------------


def _retrieval_done(buf: bytes) -> bool:
    if buf.endswith(b"END\r\n"):
        return True
    return buf.startswith((b"SERVER_ERROR", b"CLIENT_ERROR", b"ERROR")) and buf.endswith(b"\r\n")


def request(session: RawSession, command: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send one command; return its whole reply and how long it took.

    Retrieval commands (``get``/``gets``) read up to ``END`` or an error line,
    others one line. Fails if the reply is incomplete or the peer closed.
    """
    retrieval = command.split(b" ", 1)[0] in (b"get", b"gets")
    start = time.monotonic()
    assert session.send(command), f"connection closed before sending {command!r}"
    if retrieval:
        reply, complete = session.recv_until(_retrieval_done, timeout)
    else:
        reply, complete = session.recv_until_terminator(b"\r\n", timeout)
    elapsed = time.monotonic() - start
    assert complete, (
        f"{command!r}: incomplete reply {reply!r} after {elapsed:.2f} s (closed by peer: {session.closed_by_peer})"
    )
    return reply, elapsed


def assert_works(session: RawSession, key: bytes, value: bytes) -> None:
    """set + get + multi-get round trip on ``session`` (SDK path and raw GetBatch path)."""
    reply, _ = request(session, b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value))
    assert reply == b"STORED\r\n"
    reply, _ = request(session, b"get %s\r\n" % key)
    assert reply == b"VALUE %s 0 %d\r\n%s\r\nEND\r\n" % (key, len(value), value)
    reply, _ = request(session, b"get %s %s-missing\r\n" % (key, key))
    assert reply == b"VALUE %s 0 %d\r\n%s\r\nEND\r\n" % (key, len(value), value)


#: One command per code path of the backend: SDK Get, SDK Set, raw GetBatch,
#: raw KeysExist (delete), raw GetWithHash + ItemGetTtl (incr).
FAULT_COMMANDS = (
    b"get fk\r\n",
    b"set fk 0 0 1\r\nx\r\n",
    b"get fk fk2\r\n",
    b"delete fk\r\n",
    b"incr fk 1\r\n",
)


# ---- 1. concurrency ----------------------------------------------------------------


def _concurrent_gets(port: int, keys: list[bytes], value: bytes) -> float:
    """``CLIENTS`` connections, all connected first, released together; connection i gets ``keys[i]``.

    Returns the seconds from the release to the last complete reply.
    """
    sessions = [RawSession(port) for _ in range(CLIENTS)]
    try:
        # every connection is accepted and served before the race starts
        for session in sessions:
            reply, _ = request(session, b"version\r\n")
            assert reply.startswith(b"VERSION "), reply
        released: list[float] = []
        barrier = threading.Barrier(CLIENTS, action=lambda: released.append(time.monotonic()), timeout=30)
        finished: list[float] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def client(session: RawSession, key: bytes) -> None:
            try:
                barrier.wait()
                reply, _ = request(session, b"get %s\r\n" % key)
                done = time.monotonic()
                assert reply == b"VALUE %s 0 %d\r\n%s\r\nEND\r\n" % (key, len(value), value), reply
                with lock:
                    finished.append(done)
            except BaseException as exc:  # reported by the main thread
                with lock:
                    errors.append(exc)

        threads = [threading.Thread(target=client, args=(s, k), daemon=True) for s, k in zip(sessions, keys)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a client thread did not finish within 60 s"
        assert not errors, errors[:3]
        assert len(finished) == CLIENTS
        return max(finished) - released[0]
    finally:
        for session in sessions:
            session.close()


def test_concurrent_gets_do_not_block_the_hub(stack_factory, capsys) -> None:
    stack = stack_factory(5.0, faults=(f"Get:delay={CALL_DELAY}", f"GetBatch:delay={CALL_DELAY}"))
    keys, value = [b"hot%d" % i for i in range(CLIENTS)], b"v" * 32
    with RawSession(stack.port) as session:
        assert_works(session, keys[0], value)  # also opens the gRPC connection
        for key in keys:
            assert request(session, b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value))[0] == b"STORED\r\n"
    assert stack.momento.control("reset") == "OK"

    delayed = _concurrent_gets(stack.port, keys, value)
    calls = json.loads(stack.momento.control("stats"))["calls"]
    # the gets coalesce: a call or two at once, the rest in GetBatch calls as those end
    assert set(calls) <= {"Get", "GetBatch"} and sum(calls.values()) <= 10, calls

    assert stack.momento.control("clear") == "OK"
    undelayed = _concurrent_gets(stack.port, keys, value)
    with capsys.disabled():
        print(
            f"\n[e2e] {CLIENTS} concurrent gets: {delayed:.3f} s with {CALL_DELAY * 1000:.0f} ms server delay, "
            f"{undelayed:.3f} s without (serialized: {CLIENTS * CALL_DELAY:.1f} s)"
        )
    assert delayed < CONCURRENCY_BOUND, f"{CLIENTS} gets with a {CALL_DELAY} s delay took {delayed:.3f} s"
    assert undelayed < CONCURRENCY_BOUND


# ---- 2. faults ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "word"),
    [("UNAVAILABLE", b"unavailable"), ("INTERNAL", b"internal")],
)
def test_server_error_status_then_clear(stack_factory, status: str, word: bytes) -> None:
    stack = stack_factory(REQUEST_TIMEOUT)
    with RawSession(stack.port) as session:
        assert_works(session, b"k1", b"before")
        assert stack.momento.control(f"fault *:error={status}:message=injected {status}") == "OK"
        for command in FAULT_COMMANDS:
            reply, elapsed = request(session, command)
            assert reply.startswith(b"SERVER_ERROR ") and reply.count(b"\r\n") == 1, (command, reply)
            assert word in reply.lower() and b"momento" in reply.lower(), (command, reply)
            assert elapsed < REQUEST_TIMEOUT + REPLY_SLACK, (command, elapsed)
        assert stack.momento.control("clear") == "OK"
        assert_works(session, b"k1", b"after")  # the same connection
    stats = stack.admin_stats()
    assert int(stats.get(f"backend_errors_{word.decode()}", 0)) >= len(FAULT_COMMANDS), stats


def test_delay_past_request_timeout(stack_factory, capsys) -> None:
    stack = stack_factory(REQUEST_TIMEOUT)
    latencies = {}
    with RawSession(stack.port) as session:
        assert_works(session, b"k2", b"before")
        assert stack.momento.control(f"fault *:delay={LONG_DELAY}") == "OK"
        for command in FAULT_COMMANDS:
            reply, elapsed = request(session, command)
            latencies[command.split(b"\r\n")[0].decode()] = elapsed
            assert reply.startswith(b"SERVER_ERROR ") and reply.count(b"\r\n") == 1, (command, reply)
            assert b"timeout" in reply.lower(), (command, reply)
            assert elapsed < REQUEST_TIMEOUT + REPLY_SLACK, (command, elapsed)
            assert elapsed >= REQUEST_TIMEOUT * 0.9, (command, elapsed)  # it did wait for the deadline
        assert stack.momento.control("clear") == "OK"
        assert_works(session, b"k2", b"after")  # the same connection, no stale reply in between
    with capsys.disabled():
        figures = ", ".join(f"{c!r} {t:.3f} s" for c, t in latencies.items())
        print(f"\n[e2e] timeout replies (request_timeout {REQUEST_TIMEOUT} s, server delay {LONG_DELAY} s): {figures}")
    stats = stack.admin_stats()
    assert int(stats.get("backend_errors_timeout", 0)) >= len(FAULT_COMMANDS), stats


def test_server_killed_and_restarted_on_the_same_port(stack_factory, capsys) -> None:
    stack = stack_factory(REQUEST_TIMEOUT)
    momento_port = stack.momento.port
    with RawSession(stack.port) as session:
        assert_works(session, b"k3", b"before")
        stack.momento.kill()
        killed_at = time.monotonic()
        down_latencies = []
        for command in FAULT_COMMANDS:
            reply, elapsed = request(session, command)
            down_latencies.append(elapsed)
            assert reply.startswith(b"SERVER_ERROR ") and reply.count(b"\r\n") == 1, (command, reply)
            assert elapsed < REQUEST_TIMEOUT + REPLY_SLACK, (command, elapsed)
        assert not session.closed_by_peer

        # same port, same cache name, empty store; the fixture stops it
        stack.momento = start_local_momento(stack.tmp_path, CACHE, port=momento_port)
        restarted_at = time.monotonic()
        deadline = restarted_at + RECOVERY_DEADLINE
        attempts = 0
        while True:
            attempts += 1
            reply, _ = request(session, b"set k3 0 0 5\r\nafter\r\n")
            if reply == b"STORED\r\n":
                break
            assert reply.startswith(b"SERVER_ERROR "), reply
            assert time.monotonic() < deadline, (
                f"mproxy did not serve again within {RECOVERY_DEADLINE} s of the restart; last reply {reply!r}"
            )
            time.sleep(POLL_INTERVAL)
        recovered_at = time.monotonic()
        assert_works(session, b"k3", b"again")
    with capsys.disabled():
        print(
            f"\n[e2e] server killed: SERVER_ERROR in {min(down_latencies):.3f}-{max(down_latencies):.3f} s; "
            f"served again {recovered_at - restarted_at:.3f} s after the restart "
            f"({recovered_at - killed_at:.3f} s after the kill, {attempts} probes)"
        )
    stats = stack.admin_stats()
    down = sum(int(v) for k, v in stats.items() if k.startswith("backend_errors_"))
    assert down >= len(FAULT_COMMANDS), stats


def test_a_timed_out_set_never_lands_after_a_later_acknowledged_one(stack_factory) -> None:
    """Issue 11, defect 8: ``set k v1`` times out at the client (the server holds it past
    ``request_timeout``) but its RPC still runs and may apply; ``set k v2``, answered
    STORED, starts only once v1's RPC has ended, so ``k`` reads v2, also after v1's delay.
    Before the fix v1's RPC landed after v2 and silently undid it."""
    stack = stack_factory(REQUEST_TIMEOUT)
    delay = REQUEST_TIMEOUT * 3  # past the client's timeout, within the write RPC's own deadline
    with RawSession(stack.port) as session:
        assert_works(session, b"k5", b"before")
        for rpc in ("Set", "SetBatch"):
            assert stack.momento.control(f"fault {rpc}:delay={delay}") == "OK"
        sent = time.monotonic()
        reply, _ = request(session, b"set k5 0 0 2\r\nv1\r\n")
        assert reply.startswith(b"SERVER_ERROR ") and b"timeout" in reply, reply
        assert stack.momento.control("clear") == "OK"  # v1 is held already; v2 is not delayed
        deadline = time.monotonic() + RECOVERY_DEADLINE
        while True:  # v2 may time out waiting for v1's RPC to end: the client retries
            reply, _ = request(session, b"set k5 0 0 2\r\nv2\r\n")
            if reply == b"STORED\r\n":
                break
            assert reply.startswith(b"SERVER_ERROR ") and b"earlier write" in reply, reply
            assert time.monotonic() < deadline, "set k5 v2 was never STORED"
            time.sleep(POLL_INTERVAL)
        stored = time.monotonic()
        expected = b"VALUE k5 0 2\r\nv2\r\nEND\r\n"
        assert request(session, b"get k5\r\n")[0] == expected
        while time.monotonic() < sent + delay + REPLY_SLACK:  # well past the moment v1 could land
            assert request(session, b"get k5\r\n")[0] == expected
            time.sleep(POLL_INTERVAL)
        assert stored - sent >= delay * 0.9, "v2 was stored before v1's RPC could have ended"
    stats = stack.admin_stats()
    assert stats["backend_rpc_writes_in_flight"] == "0", stats
    assert int(stats["backend_errors_timeout"]) >= 1, stats


@pytest.mark.parametrize("command", [b"get fk\r\n", b"set fk 0 0 1\r\nx\r\n"], ids=["get", "set"])
def test_request_timeout_covers_sdk_retries(stack_factory, command: bytes) -> None:
    stack = stack_factory(REQUEST_TIMEOUT)
    rpc = command.split(b" ", 1)[0].decode().capitalize()
    with RawSession(stack.port) as session:
        assert_works(session, b"k4", b"before")
        # each attempt fails slowly, just inside the deadline
        assert stack.momento.control(f"fault {rpc}:delay={REQUEST_TIMEOUT * 0.9}:error=UNAVAILABLE") == "OK"
        reply, elapsed = request(session, command)
        assert reply.startswith(b"SERVER_ERROR "), reply
        calls = json.loads(stack.momento.control("stats"))["calls"]
        assert elapsed < 2 * REQUEST_TIMEOUT, f"{command!r} answered after {elapsed:.2f} s; server calls {calls}"


def test_auth_token_mismatch_stops_the_start(tmp_path: Path) -> None:
    """A local server requiring a token mproxy does not send: mproxy exits 1 naming the problem."""
    argv = [
        sys.executable, "-m", "mproxy.momento_local", "--host", HOST, "--port", "0",
        "--control-port", "0", "--cache", CACHE, "--auth-token", "not-the-proxy-token",
    ]
    server = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        momento_port, _ = read_ports(server, LOCAL_START_TIMEOUT)
        config = tmp_path / "auth.toml"
        config.write_text(mproxy_config(momento_port, REQUEST_TIMEOUT))
        result = subprocess.run(
            [sys.executable, "-m", "mproxy", "-c", str(config)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        )
    finally:
        server.kill()
        server.wait(timeout=10)
        assert server.stdout is not None
        server.stdout.close()
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "authentication" in result.stderr and "create cache 'e2e'" in result.stderr, result.stderr


def test_sigterm_finishes_the_command_in_hand(stack_factory) -> None:
    """Graceful stop: a get in flight when SIGTERM arrives still gets its reply, then the
    connection closes and mproxy exits 0."""
    stack = stack_factory(5.0)
    with RawSession(stack.port) as session:
        assert_works(session, b"inflight", b"value")
        assert stack.momento.control("fault Get:delay=1.0") == "OK"
        assert session.send(b"get inflight\r\n")
        _wait_for_calls(stack, "Get", 2)  # the get is in flight once the server counted it
        stack.mproxy.process.send_signal(signal.SIGTERM)
        data, closed = session.recv_until_closed(timeout=15)
    assert data == b"VALUE inflight 0 5\r\nvalue\r\nEND\r\n" and closed
    assert stack.mproxy.process.wait(timeout=15) == 0


def test_pipelined_gets_become_one_batched_call(stack_factory) -> None:
    """50 single-key gets in one write: one GetBatch, not 50 round trips."""
    stack = stack_factory(5.0, faults=("Get:delay=0.05", "GetBatch:delay=0.05"))
    with RawSession(stack.port) as session:
        assert session.send(b"set p 0 0 1\r\nx\r\n")
        assert session.recv_until_terminator(b"STORED\r\n")[1]
        stack.momento.control("reset")
        start = time.monotonic()
        assert session.send(b"get p\r\n" * 49 + b"get missing\r\n")
        data, complete = session.recv_until(lambda buf: buf.count(b"END\r\n") == 50, timeout=15)
        elapsed = time.monotonic() - start
    assert complete and data == b"VALUE p 0 1\r\nx\r\nEND\r\n" * 49 + b"END\r\n"
    calls = json.loads(stack.momento.control("stats"))["calls"]
    # one read normally carries all 50 lines: one GetBatch (a split read adds a call or two)
    assert calls.get("GetBatch", 0) >= 1 and sum(calls.values()) <= 3, calls
    print(f"50 pipelined gets: {elapsed:.3f} s, calls {calls}")
    assert elapsed < 2.0, f"50 pipelined gets took {elapsed:.2f} s (50 sequential calls would take 2.5 s)"


def test_second_sigint_exits_at_once(stack_factory) -> None:
    """A first SIGINT starts the graceful stop, which waits for a get the server holds
    for 30 s; a second SIGINT ends mproxy at once (exit status 1)."""
    stack = stack_factory(60.0)
    with RawSession(stack.port) as session:
        assert_works(session, b"slow", b"value")
        assert stack.momento.control("fault Get:delay=30") == "OK"
        assert session.send(b"get slow\r\n")
        _wait_for_calls(stack, "Get", 2)  # the get is in flight once the server counted it
        process = stack.mproxy.process
        process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 10
        while _accepts(stack.port):  # the graceful stop closes the listener first
            assert time.monotonic() < deadline, "the first SIGINT did not start a graceful stop"
            time.sleep(0.01)  # polling interval, bounded by the deadline
        assert process.poll() is None  # still waiting for the get in hand
        start = time.monotonic()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 1
        assert time.monotonic() - start < 5
        assert stack.momento.control("clear") == "OK"


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def _wait_for_calls(stack: Stack, rpc: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while json.loads(stack.momento.control("stats"))["calls"].get(rpc, 0) < count:
        assert time.monotonic() < deadline, f"{rpc} never reached the local server {count} times"
        time.sleep(0.01)  # polling interval, bounded by the deadline
