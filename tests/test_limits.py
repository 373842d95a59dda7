"""The limits a hostile or careless client meets, in-process (issue 11, defects 2-7).

Servers run on gevent in the test's own process, as in ``tests/test_server.py``;
clients are ``gevent.socket`` connections, so the test and the servers take turns
on one hub. Timing: only generous bounds (a connection must close within several
times its timeout), never a tight one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.socket
import pytest

from mproxy.backends.memory import MemoryBackend
from mproxy.stats import Stats
from tests.servers import HOST, RawSession
from tests.test_server import StartServer, session, start, wait_until  # noqa: F401  # start: a fixture

#: Bound for a condition the server reaches on its own.
DEADLINE = 10.0


def trickle(s: RawSession, first: bytes, byte: bytes, every: float, until: float) -> float | None:
    """Send ``first``, then ``byte`` every ``every`` seconds for ``until`` seconds at most;
    the seconds after which the server closed the connection, or None if it stayed open."""
    began = time.monotonic()
    s.send(first)
    while time.monotonic() - began < until:
        if not s.send(byte):
            return time.monotonic() - began
        got = s._recv_some(time.monotonic() + every)
        if got == b"":
            return time.monotonic() - began
        assert not got, f"unexpected reply {got!r}"
    return None


# -- defect 4: idle_timeout counts the time without a completed command -----------------


@pytest.mark.parametrize(
    "first, byte",
    [(b"get ", b"k"), (b"set k 0 0 100000\r\n", b"x")],
    ids=["command line", "data block"],
)
def test_idle_timeout_closes_a_client_trickling_bytes_of_an_unfinished_command(
    start: StartServer, first: bytes, byte: bytes
) -> None:
    server = start(idle_timeout=0.3)
    with session(server) as s:
        closed_after = trickle(s, first, byte, every=0.05, until=5.0)
    assert closed_after is not None, "a trickle of bytes kept the connection open past idle_timeout"
    assert server.stats.idle_kicks == 1


def test_idle_timeout_keeps_a_client_that_completes_commands(start: StartServer) -> None:
    server = start(idle_timeout=0.3)
    with session(server) as s:
        began = time.monotonic()
        while time.monotonic() - began < 1.0:  # > 3 idle timeouts of steady, slow commands
            s.send(b"ver")
            gevent.sleep(0.05)
            s.send(b"sion\r\n")
            got, complete = s.recv_until_terminator(b"\r\n")
            assert complete and got.startswith(b"VERSION "), got
    assert server.stats.idle_kicks == 0


# -- defect 5: the listen backlog is [proxy] backlog (1024), not 128 ---------------------


def connect_without_accepting(port: int, count: int) -> int:
    """Open ``count`` connections with the stdlib's blocking sockets, never giving the hub a
    turn (so the server accepts none of them): how many the kernel completed (the listen
    queue holds ``backlog`` + 1; past it the kernel drops the SYN and the connect waits)."""
    import socket

    made: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.settimeout(0.5)
            try:
                sock.connect((HOST, port))
            except OSError:
                sock.close()
                break
            made.append(sock)
        return len(made)
    finally:
        for sock in made:
            sock.close()


def test_the_data_listener_queues_backlog_connections(start: StartServer) -> None:
    server = start()  # the default [proxy] backlog
    assert connect_without_accepting(server.address[1], 600) == 600


def test_the_backlog_is_configurable(start: StartServer) -> None:
    server = start(backlog=16)
    assert connect_without_accepting(server.address[1], 64) == 17  # backlog + 1, as Linux counts


def test_the_admin_listener_and_a_workers_socket_queue_backlog_connections() -> None:
    from mproxy.admin import AdminServer
    from mproxy.listeners import PortGroup

    admin = AdminServer((HOST, 0), Stats(), "test")
    admin.start()
    try:
        assert connect_without_accepting(admin.address[1], 600) == 600
    finally:
        admin.stop()
    group = PortGroup((HOST, 0), backlog=32)
    try:
        sock = group.for_worker()
        try:
            assert connect_without_accepting(group.address[1], 64) == 33
        finally:
            sock.close()
    finally:
        group.close()


# -- defect 2: the open-file limit -------------------------------------------------------


@pytest.fixture
def soft_nofile() -> Iterator[Callable[[int], None]]:
    """``set(n)``: this process's soft RLIMIT_NOFILE set to ``n`` until the test ends."""
    import resource

    saved = resource.getrlimit(resource.RLIMIT_NOFILE)

    def set_soft(n: int) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, saved[1]))

    yield set_soft
    resource.setrlimit(resource.RLIMIT_NOFILE, saved)


def open_fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


def test_accept_without_a_file_descriptor_backs_off_quietly_and_is_counted(
    start: StartServer, soft_nofile: Callable[[int], None], capfd: pytest.CaptureFixture[str]
) -> None:
    import socket

    server = start()
    first = session(server)  # served: two descriptors (ours and the server's)
    first.send(b"version\r\n")
    assert first.recv_until_terminator(b"\r\n")[1]
    soft_nofile(open_fds())  # (listdir counts its own descriptor) room for one more client socket, none for the server's end
    waiting = gevent.socket.socket()
    waiting.settimeout(DEADLINE)
    waiting.connect((HOST, server.address[1]))  # completes in the kernel's listen queue
    # a few failures, each followed by a pause (gevent's own path prints a traceback for each)
    wait_until(lambda: server.stats.listen_disabled_num >= 3, "accept to fail a few times")
    soft_nofile(4096)
    waiting.sendall(b"version\r\n")
    assert waiting.recv(100).startswith(b"VERSION ")  # accepted once descriptors are back
    waiting.close()
    first.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "EMFILE" not in err, err



# -- defect 3: the admin port's own limits, and stats reset an operator can turn off ------


@pytest.fixture
def admin_server() -> Iterator[Callable[..., Any]]:
    """``admin_server(**[admin] settings) -> AdminServer`` on port 0 over a fresh Stats."""
    from mproxy.admin import AdminServer
    from mproxy.config import AdminConfig

    started: list[AdminServer] = []

    def make(**settings: Any) -> AdminServer:
        server = AdminServer((HOST, 0), Stats(), "test", settings=AdminConfig(**settings))
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def admin_session(server: Any) -> RawSession:
    return RawSession(server.address[1], connect=gevent.socket.create_connection)


def test_the_admin_port_caps_its_connections_and_says_so(admin_server: Callable[..., Any]) -> None:
    admin = admin_server(max_connections=2)
    held = [admin_session(admin) for _ in range(2)]
    try:
        for s in held:
            s.send(b"version\r\n")
            assert s.recv_until_terminator(b"\r\n")[0] == b"VERSION test\r\n"
        with admin_session(admin) as third:
            assert third.recv_until_closed() == (b"ERROR Too many open connections\r\n", True)
        held.pop().close()
        wait_until(lambda: admin.active == 1, "the closed admin connection to be released")
        with admin_session(admin) as again:
            again.send(b"version\r\n")
            assert again.recv_until_terminator(b"\r\n")[0] == b"VERSION test\r\n"
    finally:
        for s in held:
            s.close()


@pytest.mark.parametrize("first", [b"stats", b"GET /metrics HTTP/1.1\r\nHost: x\r\n"], ids=["command", "http head"])
def test_the_admin_port_closes_a_command_trickled_past_command_timeout(
    admin_server: Callable[..., Any], first: bytes
) -> None:
    admin = admin_server(command_timeout=0.3)
    with admin_session(admin) as s:
        closed_after = trickle(s, first, b"x", every=0.05, until=5.0)
    assert closed_after is not None, "a trickle of bytes held an admin connection past command_timeout"


def test_tricklers_lock_the_admin_port_for_command_timeout_at_most(admin_server: Callable[..., Any]) -> None:
    admin = admin_server(max_connections=4, command_timeout=0.3)
    tricklers = [admin_session(admin) for _ in range(4)]
    try:
        for s in tricklers:
            s.send(b"st")
        wait_until(lambda: admin.active == 4, "the tricklers to hold every slot")
        for s in tricklers:  # a byte each, never a line end: all closed past command_timeout
            s.send(b"a")
        wait_until(lambda: admin.active == 0, "the tricklers to be closed")
        with admin_session(admin) as operator:
            operator.send(b"version\r\n")
            assert operator.recv_until_terminator(b"\r\n")[0] == b"VERSION test\r\n"
    finally:
        for s in tricklers:
            s.close()


def test_an_admin_port_that_refuses_reset_says_so_and_keeps_the_counters(admin_server: Callable[..., Any]) -> None:
    admin = admin_server(allow_reset=False)
    admin.stats.cache("c").cmd_get = 5
    with admin_session(admin) as s:
        s.send(b"stats reset\r\n")
        assert s.recv_until_terminator(b"\r\n")[0] == b"CLIENT_ERROR stats reset not allowed\r\n"
    assert admin.stats.cache("c").cmd_get == 5
    allowing = admin_server()
    with admin_session(allowing) as s:
        s.send(b"stats reset\r\n")
        assert s.recv_until_terminator(b"\r\n")[0] == b"RESET\r\n"


def test_the_data_ports_refuse_reset_too_text_and_binary(start: StartServer) -> None:
    from mproxy.protocol import binary as b
    from tests.test_binary_parser import req

    server = start()
    root = server.dispatcher.root_stats
    assert root is not None
    root.allow_reset = False
    server.stats.cmd_get = 7
    with session(server) as s:
        s.send(b"stats reset\r\n")
        assert s.recv_until_terminator(b"\r\n")[0] == b"CLIENT_ERROR stats reset not allowed\r\n"
    with session(server) as s:
        s.send(req(b.Opcode.STAT, key=b"reset"))
        reply, _ = s.recv_until(lambda got: len(got) >= 24)
        assert int.from_bytes(reply[6:8], "big") == b.Status.AUTH_ERROR
    assert server.stats.cmd_get == 7


def test_allow_reset_is_applied_by_a_reload() -> None:
    from mproxy.config import loads, reload

    base = '[[cache]]\ncache_name = "c"\n'
    running, pending = reload(loads(base), loads("[admin]\nallow_reset = false\n" + base))
    assert running.admin.allow_reset is False and pending == []
    running, pending = reload(loads(base), loads("[admin]\nmax_connections = 8\n" + base))
    assert running.admin.max_connections == 64 and pending == ["[admin] max_connections"]


# -- defect 6: a get line over the 4 MiB line limit ----------------------------------------


def test_a_get_line_over_the_limit_answers_memcacheds_out_of_memory_error_then_closes(start: StartServer) -> None:
    from mproxy.protocol.commands import MAX_GET_LINE_LENGTH

    server = start()
    with session(server) as s:
        s.send(b"set k 0 0 1\r\nx\r\nget k\r\n")
        assert s.recv_until_terminator(b"END\r\n")[1]
        chunk = b" k" * 32768
        sent = 3
        s.send(b"get")
        while sent <= MAX_GET_LINE_LENGTH and s.send(chunk):
            sent += len(chunk)
        got, closed = s.recv_until_closed()
    assert (got, closed) == (b"SERVER_ERROR out of memory reading request\r\n", True)
    assert server.stats.protocol_errors == 1


def test_a_get_line_just_under_the_limit_is_served(start: StartServer) -> None:
    from mproxy.protocol.commands import MAX_GET_LINE_LENGTH

    server = start()
    key = b"k" * 250
    keys = (MAX_GET_LINE_LENGTH - 8) // (len(key) + 1)
    with session(server) as s:
        s.send(b"set " + key + b" 0 0 1\r\nx\r\n")
        assert s.recv_until_terminator(b"STORED\r\n")[1]
        s.send(b"get" + (b" " + key) * keys + b"\r\n")
        got, complete = s.recv_until_terminator(b"END\r\n", timeout=60.0)
    assert complete and got.count(b"VALUE " + key + b" 0 1\r\nx\r\n") == keys


# -- defect 7: flush_all with a bad argument where flush is refused ------------------------


FLUSH_FORMS = [
    b"flush_all abc\r\n",
    b"flush_all abc noreply\r\n",
    b"flush_all\r\n",
    b"flush_all 0\r\n",
    b"flush_all 1 2\r\n",
    b"flush_all 1 2 3\r\n",
    b"flush_all noreply\r\n",
]

#: memcached 1.6.18's replies to FLUSH_FORMS, each followed by ``mn``, with and without -F
#: (checked by test_flush_forms_match_memcached when the binary is installed)
FLUSH_REPLIES = {
    True: [b"CLIENT_ERROR invalid exptime argument\r\n", b"", b"OK\r\n", b"OK\r\n", b"OK\r\n", b"ERROR\r\n", b""],
    False: [b"CLIENT_ERROR flush_all not allowed\r\n", b"", b"CLIENT_ERROR flush_all not allowed\r\n",
            b"CLIENT_ERROR flush_all not allowed\r\n", b"CLIENT_ERROR flush_all not allowed\r\n",
            b"ERROR\r\n", b""],
}


def flush_replies(port: int, connect: Any) -> list[bytes]:
    out = []
    for form in FLUSH_FORMS:
        with RawSession(port, connect=connect) as s:
            s.send(form + b"mn\r\n")
            got, complete = s.recv_until_terminator(b"MN\r\n")
            assert complete, (form, got)
            out.append(got[: -len(b"MN\r\n")])
    return out


@pytest.mark.parametrize("allowed", [True, False], ids=["flush allowed", "flush refused (-F)"])
def test_flush_all_forms_answer_as_memcached(start: StartServer, allowed: bool) -> None:
    server = start(MemoryBackend(allow_flush=allowed))
    assert flush_replies(server.address[1], gevent.socket.create_connection) == FLUSH_REPLIES[allowed]
    assert server.stats.cmd_flush == 6  # as memcached: every form but the one answered ERROR


@pytest.mark.memcached
@pytest.mark.parametrize("allowed", [True, False], ids=["flush allowed", "flush refused (-F)"])
def test_flush_forms_match_memcached(tmp_path: Any, allowed: bool) -> None:
    import socket

    from tests.servers import memcached_binary, start_memcached

    if memcached_binary() is None:
        pytest.skip("memcached is not installed")
    memcached = start_memcached(tmp_path, () if allowed else ("-F",))
    try:
        assert flush_replies(memcached.port, socket.create_connection) == FLUSH_REPLIES[allowed]
    finally:
        memcached.stop()


# -- defect 7: one rule for the item size limit, in the parsers ----------------------------


def test_the_parsers_refuse_an_item_over_max_item_size_as_memcached_counts_it() -> None:
    import struct

    from mproxy.protocol import commands as c
    from mproxy.protocol.binary import BinaryParser, BinStore, BinTooLarge, Opcode
    from mproxy.protocol.parser import Parser
    from tests.test_binary_parser import req

    limit = 1024 * 1024
    largest = limit - 1 - c.ITEM_OVERHEAD  # key "k", no flags: 1048516, memcached 1.6.18's figure
    assert largest == 1048516
    for nbytes, fits in ((largest, True), (largest + 1, False), (limit, False)):
        text = Parser(limit)
        text.feed(b"set k 0 0 %d\r\n%s\r\n" % (nbytes, b"x" * nbytes))
        assert isinstance(text.next_command(), c.Store if fits else c.TooLarge), nbytes
        meta = Parser(limit)
        meta.feed(b"ms k %d\r\n%s\r\n" % (nbytes, b"x" * nbytes))
        assert isinstance(meta.next_command(), c.Ms if fits else c.MsTooLarge), nbytes
        binary = BinaryParser(limit)
        binary.feed(req(Opcode.SET, b"k", struct.pack(">II", 0, 0), b"x" * nbytes))
        assert isinstance(binary.next_command(), BinStore if fits else BinTooLarge), nbytes
    flagged = Parser(limit)  # non-zero flags take 4 bytes more
    flagged.feed(b"set k 5 0 %d\r\n%s\r\n" % (largest - 3, b"x" * (largest - 3)))
    assert isinstance(flagged.next_command(), c.TooLarge)
