"""The connection loop in-process: ``CacheServer`` on port 0 over the memory backend.

The server runs on gevent in the test's own process; the client is a
:class:`~tests.servers.RawSession` over ``gevent.socket``, so the test
greenlet and the server's greenlets take turns on one hub and no
monkey-patching of the pytest process is needed. Where a command must be
"in hand" (a graceful stop, an early flush), a :class:`Gate` backend holds it
until the test opens the gate: synchronisation by events, not by time.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import gevent.socket
import pytest

from mproxy import server as server_mod
from mproxy.backends.base import StoreMode
from mproxy.backends.memory import MemoryBackend
from mproxy.dispatch import Dispatcher
from mproxy.server import CacheServer, ConnectionLimit
from mproxy.stats import Stats
from tests import servers
from tests.servers import HOST, RawSession

#: Bound for a condition the server reaches on its own (a counter it updates).
DEADLINE = 10.0

TOO_MANY = b"ERROR Too many open connections\r\n"

StartServer = Callable[..., CacheServer]


class Gate(MemoryBackend):
    """``touch`` waits until the test opens the gate: a command held in hand."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = gevent.event.Event()
        self.opened = gevent.event.Event()

    def touch(self, key: bytes, exptime: int) -> bool:
        self.entered.set()
        self.opened.wait()
        return super().touch(key, exptime)


class Spy(MemoryBackend):
    """Records the keys of every read."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[bytes, ...]] = []

    def get_many(self, keys: Any, with_cas: bool = False) -> Any:
        self.reads.append(tuple(keys))
        return super().get_many(keys, with_cas)


@pytest.fixture
def start() -> Iterator[StartServer]:
    """``start(backend=None, listener=(HOST, 0), **CacheServer options) -> CacheServer``."""
    started: list[CacheServer] = []

    def start(backend: Any = None, listener: Any = (HOST, 0), **options: Any) -> CacheServer:
        stats = Stats()
        cache = stats.cache("test")
        dispatcher = Dispatcher(backend if backend is not None else MemoryBackend(), cache, stats)
        server = CacheServer(listener, dispatcher, cache, **options)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(timeout=1.0)


def session(server: CacheServer) -> RawSession:
    return RawSession(server.address[1], connect=gevent.socket.create_connection)


def talk(server: CacheServer, data: bytes, terminator: bytes) -> bytes:
    return servers.talk(server.address[1], data, terminator, connect=gevent.socket.create_connection)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Let the server's greenlets run until ``condition`` holds (bounded by DEADLINE)."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        gevent.sleep(0.001)  # a turn of the hub, bounded by the deadline


# -- pipelining ---------------------------------------------------------------------


def test_pipeline_in_one_write_and_error_recovery(start: StartServer) -> None:
    server = start()
    with session(server) as s:
        s.send(b"set a 0 0 1\r\n1\r\nbogus\r\nincr a 2\r\nget a\r\nset a x 0 1\r\n")
        got = s.recv_until_terminator(b"CLIENT_ERROR bad command line format\r\n")[0]
        assert got == (
            b"STORED\r\nERROR\r\n3\r\nVALUE a 0 1\r\n3\r\nEND\r\nCLIENT_ERROR bad command line format\r\n"
        )
        # one command split across many writes
        for byte in b"get a\r\n":
            s.send(bytes([byte]))
        assert s.recv_until_terminator(b"END\r\n")[0] == b"VALUE a 0 1\r\n3\r\nEND\r\n"
    assert server.stats.protocol_errors == 2


def test_pipelined_gets_are_grouped_and_answered_in_order(start: StartServer) -> None:
    spy = Spy()
    server = start(spy)
    for i in range(250):
        spy.store(mode=StoreMode.SET, key=b"k%d" % i, value=b"%d" % i, flags=0, exptime=0)
    got = talk(server, b"".join(b"get k%d\r\n" % i for i in range(250)) + b"mn\r\n", b"MN\r\n")
    assert got == b"".join(b"VALUE k%d 0 %d\r\n%d\r\nEND\r\n" % (i, len(b"%d" % i), i) for i in range(250)) + b"MN\r\n"
    # groups of at most max_batch_keys keys; how a read is cut into recvs may split more
    assert sum(map(len, spy.reads)) == 250 and len(spy.reads) >= 3
    assert all(len(keys) <= spy.max_batch_keys for keys in spy.reads)


def test_replies_past_flush_bytes_leave_before_the_rest_of_the_read(
    start: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_mod, "FLUSH_BYTES", 1000)
    gate = Gate()
    server = start(gate)
    gate.store(mode=StoreMode.SET, key=b"big", value=b"x" * 1000, flags=0, exptime=0)
    with session(server) as s:
        s.send(b"get big\r\ntouch big 0\r\n")
        # the touch is held in hand: the get's reply, past FLUSH_BYTES, is already out
        got, complete = s.recv_until_terminator(b"END\r\n")
        assert complete and got == b"VALUE big 0 1000\r\n" + b"x" * 1000 + b"\r\nEND\r\n"
        assert gate.entered.is_set()
        gate.opened.set()
        assert s.recv_until_terminator(b"\r\n")[0] == b"TOUCHED\r\n"


def test_on_a_blocking_backend_replies_ready_leave_while_a_slow_command_runs(start: StartServer) -> None:
    from tests.test_dispatch_concurrent import Held

    held = Held()
    held.hold(b"slow")
    server = start(held)
    with session(server) as s:
        s.send(b"set fast 0 0 1\r\n1\r\nget fast\r\nset slow 0 0 1\r\n2\r\nset after 0 0 1\r\n3\r\nget after\r\n")
        # the set after the held one has run, its reply waits; the ones before it are out
        got, complete = s.recv_until_terminator(b"END\r\n")
        assert complete and got == b"STORED\r\nVALUE fast 0 1\r\n1\r\nEND\r\n"
        wait_until(lambda: (b"after",) in held.started("set"), "the set after the held one to run")
        held.release(b"slow")
        got, complete = s.recv_until_terminator(b"END\r\n")
        assert complete and got == b"STORED\r\nSTORED\r\nVALUE after 0 1\r\n3\r\nEND\r\n"


# -- memory held by one read ------------------------------------------------------------

#: issue 11's case: a 1 MiB item (memcached's largest with a 3-byte key) named 1,000 times
BIG = b"v" * (1024 * 1024 - 100)
REPEATS = 1000


class BlockingMemory(MemoryBackend):
    """The memory store declared blocking: dispatch's concurrent path, on the same data."""

    blocking = True


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("backend", [MemoryBackend, BlockingMemory], ids=["inline", "concurrent"])
@pytest.mark.parametrize("request_", [b"get" + b" big" * REPEATS + b"\r\n", b"get big\r\n" * REPEATS],
                         ids=["one-get", "pipelined-gets"])
def test_a_get_naming_a_large_item_many_times_holds_little_memory(
    start: StartServer, backend: type[MemoryBackend], request_: bytes
) -> None:
    """Issue 11 defect 1: a 4 KB get naming a 1 MiB item a thousand times grew the
    process by ~2 GB (memcached: +1 MB). The reply is sent as it is formed: the
    process (server and client here) grows by well under 64 MB while 1 GB goes out."""
    store = backend(max_bytes=64 * 1024 * 1024, max_item_size=1024 * 1024)
    store.store(mode=StoreMode.SET, key=b"big", value=BIG, flags=0, exptime=0)
    server = start(store)
    block = b"VALUE big 0 %d\r\n" % len(BIG) + BIG + b"\r\n"
    expected = REPEATS * len(block) + (5 if request_.count(b"get") == 1 else 5 * REPEATS)
    buffer = bytearray(1024 * 1024)
    with session(server) as s:
        base = peak = rss_bytes()
        s.send(request_)
        received = 0
        tail = b""
        while received < expected:
            n = s.sock.recv_into(buffer)
            assert n, f"closed after {received} of {expected} bytes"
            received += n
            tail = (tail + bytes(buffer[max(0, n - 16) : n]))[-16:]
            peak = max(peak, rss_bytes())
    assert received == expected and tail.endswith(b"\r\nEND\r\n")
    assert peak - base < 64 * 1024 * 1024, f"the process grew by {(peak - base) >> 20} MiB"


def test_a_connection_whose_data_is_always_waiting_lets_the_others_run(
    start: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gevent's recv returns at once when data is waiting: without a turn given to the
    hub every FAIR_READS reads, one busy connection is served over and over while the
    others wait (the bench saw connections starved for a second)."""
    monkeypatch.setattr(server_mod, "READ_SIZE", 16)  # a 3 KB pipeline: ~200 reads that never wait
    store = MemoryBackend()
    server = start(store)
    with session(server) as busy, session(server) as other:
        for s in (busy, other):
            s.send(b"version\r\n")
            assert s.recv_until_terminator(b"\r\n")[1]
        busy.send(b"".join(b"set k%d 0 0 1 noreply\r\n1\r\n" % i for i in range(100)) + b"mn\r\n")
        other.send(b"version\r\n")
        assert other.recv_until_terminator(b"\r\n")[0].startswith(b"VERSION ")
        # answered while the busy pipeline was still being read
        assert store.get_many([b"k99"]) == {}
        assert busy.recv_until_terminator(b"MN\r\n")[1]
        assert len(store.get_many([b"k%d" % i for i in range(100)])) == 100


# -- quit and fatal errors ------------------------------------------------------------


def test_quit_sends_pending_replies_then_closes(start: StartServer) -> None:
    server = start()
    with session(server) as s:
        s.send(b"version\r\nget a\r\nget b\r\nquit\r\nversion\r\n")
        data, closed = s.recv_until_closed()
    assert closed and data.count(b"VERSION") == 1 and data.endswith(b"\r\nEND\r\nEND\r\n")


HTTP = b"GET / HTTP/1.1\r\n"
LONG = b"set " + b"x" * 5000  # over 2048 bytes without a newline


@pytest.mark.parametrize("fatal", [HTTP, LONG], ids=["http", "long-line"])
@pytest.mark.parametrize(
    "before, sent",
    [
        (b"get a\r\n", b"VALUE a 0 1\r\n1\r\nEND\r\n"),
        (b"version\r\n", b""),
        (b"version\r\nget a\r\n", b"VERSION <v>\r\nVALUE a 0 1\r\n1\r\nEND\r\n"),
        (b"get a\r\nversion\r\n", b"VALUE a 0 1\r\n1\r\nEND\r\n"),
        (b"get zz\r\nset b 0 0 1\r\n2\r\n", b"END\r\n"),
        (b"set b 0 0 1 noreply\r\n2\r\ngets zz\r\n", b"END\r\n"),
        (b"gat 0 zz\r\nbogus\r\nmn\r\nincr zz 1\r\n", b"END\r\nERROR\r\nMN\r\n"),
        (b"mg a v\r\ndelete zz\r\n", b""),
    ],
)
def test_a_fatal_error_sends_the_replies_memcached_has_sent_then_closes(
    start: StartServer, before: bytes, sent: bytes, fatal: bytes
) -> None:
    """memcached transmits its replies at every get, gets, gat, gats and mn (and when
    a read is done): a fatal error (an HTTP request line, a line too long) drops only
    the replies after the last of those, then closes (checked against memcached 1.6.18;
    tests/differential/fatal_error_replies.txt compares the same bytes)."""
    server = start()
    talk(server, b"set a 0 0 1\r\n1\r\n", b"STORED\r\n")
    with session(server) as s:
        s.send(before + fatal)
        data, closed = s.recv_until_closed()
    assert closed and re.sub(rb"VERSION \S+", b"VERSION <v>", data) == sent
    assert server.stats.protocol_errors == 1 + before.count(b"bogus")


def test_the_commands_before_a_fatal_error_are_executed(start: StartServer) -> None:
    server = start()
    with session(server) as s:
        s.send(b"set a 0 0 1\r\n1\r\nincr a 5\r\nget a\r\nget b\r\nGET / HTTP/1.1\r\n")
        data, closed = s.recv_until_closed()
    assert (data, closed) == (b"STORED\r\n6\r\nVALUE a 0 1\r\n6\r\nEND\r\nEND\r\n", True)
    assert server.stats.cmd_get == 2 and server.stats.incr_hits == 1


def test_unterminated_long_line_closes_connection_and_server_keeps_serving(start: StartServer) -> None:
    server = start()
    with session(server) as s:
        s.send(b"set " + b"x" * 5000)
        _, closed = s.recv_until_closed()
        assert closed
    assert talk(server, b"version\r\n", b"\r\n").startswith(b"VERSION ")


# -- connections ----------------------------------------------------------------------


def test_connection_cap_answers_like_memcached(start: StartServer) -> None:
    server = start(limit=ConnectionLimit(2))
    held = [session(server) for _ in range(2)]
    try:
        for s in held:  # both are being served
            s.send(b"version\r\n")
            assert s.recv_until_terminator(b"\r\n")[0].startswith(b"VERSION ")
        with session(server) as s:
            assert s.recv_until_closed() == (TOO_MANY, True)
        assert server.stats.rejected_connections == 1
        held.pop().close()  # a slot frees once the server saw the close
        wait_until(lambda: server.stats.curr_connections == 1, "the closed connection to be released")
        assert talk(server, b"version\r\n", b"\r\n").startswith(b"VERSION ")
    finally:
        for s in held:
            s.close()


def test_idle_timeout_closes_idle_connections(start: StartServer) -> None:
    server = start(idle_timeout=0.2)
    with session(server) as silent, session(server) as half:
        half.send(b"vers")  # half a command, then nothing
        assert silent.recv_until_closed() == (b"", True)
        assert half.recv_until_closed() == (b"", True)
    wait_until(lambda: server.stats.curr_connections == 0, "both connections released")


def test_a_bound_socket_is_a_listener(start: StartServer) -> None:
    sock = gevent.socket.socket()
    sock.bind((HOST, 0))
    sock.listen(16)
    server = start(listener=sock)
    assert server.address == sock.getsockname()
    assert talk(server, b"version\r\n", b"\r\n").startswith(b"VERSION ")


# -- graceful stop --------------------------------------------------------------------


def test_graceful_stop_finishes_the_command_in_hand_and_closes_idle_connections(start: StartServer) -> None:
    gate = Gate()
    server = start(gate)
    gate.store(mode=StoreMode.SET, key=b"k", value=b"v", flags=0, exptime=0)
    with session(server) as idle, session(server) as busy:
        idle.send(b"version\r\n")
        assert idle.recv_until_terminator(b"\r\n")[1]
        busy.send(b"touch k 0\r\nversion\r\n")
        assert gate.entered.wait(DEADLINE)
        stopper = gevent.spawn(server.stop, DEADLINE)
        # the idle connection closes at once, while the busy one is still in hand
        assert idle.recv_until_closed() == (b"", True)
        with pytest.raises(ConnectionRefusedError):  # no longer accepting
            gevent.socket.create_connection(server.address, timeout=DEADLINE)
        gate.opened.set()
        data, closed = busy.recv_until_closed()
        assert closed and data.startswith(b"TOUCHED\r\nVERSION ")  # the whole read was answered
    stopper.get(timeout=DEADLINE)
    assert server.stats.curr_connections == 0


def test_graceful_stop_closes_a_command_still_running_after_its_timeout(start: StartServer) -> None:
    gate = Gate()  # never opened: the touch would run for ever
    server = start(gate)
    with session(server) as busy:
        busy.send(b"touch k 0\r\n")
        assert gate.entered.wait(DEADLINE)
        server.stop(timeout=0.1)
        assert busy.recv_until_closed() == (b"", True)
    assert server.stats.curr_connections == 0
