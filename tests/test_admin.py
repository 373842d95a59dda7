"""The admin port over real TCP (port 0): memcached-style stats and GET /metrics.

The server runs on gevent; the client uses gevent.socket in the test's own
greenlet, so no monkey-patching of the pytest process is needed.
"""

from __future__ import annotations

import os
import time
from typing import Iterator

import gevent.socket
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mproxy.admin import MAX_LINE, AdminServer
from mproxy.config import AdminConfig
from mproxy.stats import COUNTERS, Stats

TIMEOUT = 30.0


class Client:
    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = gevent.socket.create_connection(address, timeout=TIMEOUT)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, end: bytes) -> bytes:
        while end not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, f"closed before {end!r}; got {self.buf!r}"
            self.buf += chunk
        i = self.buf.index(end) + len(end)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def read_to_eof(self) -> bytes:
        while chunk := self.sock.recv(65536):
            self.buf += chunk
        out, self.buf = self.buf, b""
        return out

    def stats(self, command: bytes = b"stats") -> dict[str, str]:
        self.send(command + b"\r\n")
        lines = self.read_until(b"END\r\n").split(b"\r\n")
        assert lines[-2:] == [b"END", b""]
        out = {}
        for line in lines[:-2]:
            stat, name, value = line.decode().split(" ", 2)
            assert stat == "STAT"
            out[name] = value
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def stats() -> Stats:
    stats = Stats()
    default = stats.cache("default")
    default.cmd_get += 5
    default.get_hits += 4
    default.curr_connections += 1
    default.observe("get_many", 0.0005)
    stats.cache("sessions").cmd_set += 2
    return stats


@pytest.fixture
def server(stats: Stats) -> Iterator[AdminServer]:
    srv = AdminServer(("127.0.0.1", 0), stats, "9.9.9-test")
    srv.start()
    yield srv
    srv.stop(timeout=1.0)


@pytest.fixture
def client(server: AdminServer) -> Iterator[Client]:
    c = Client(server.address)
    yield c
    c.close()


def test_address_is_the_bound_port(server: AdminServer) -> None:
    host, port = server.address
    assert host == "127.0.0.1" and port > 0


def test_stats(client: Client) -> None:
    snap = client.stats()
    names = list(snap)
    assert names[:4] == ["pid", "uptime", "time", "version"]
    assert names.index("curr_connections") < names.index("bytes_written") < names.index("backend_get_many_requests")
    assert set(COUNTERS) <= set(snap)
    assert snap["cmd_get"] == "5"
    assert snap["cmd_set"] == "2"
    assert snap["backend_get_many_requests"] == "1"
    assert 450 <= int(snap["backend_get_many_p50_us"]) <= 550
    assert snap["rusage_user"].count(".") == 1 and len(snap["rusage_user"].split(".")[1]) == 6


def test_stats_cache(client: Client) -> None:
    snap = client.stats(b"stats cache")
    assert snap["default:cmd_get"] == "5"
    assert snap["sessions:cmd_set"] == "2"
    assert snap["sessions:cmd_get"] == "0"


def test_stats_workers_one_process_is_worker_1(client: Client) -> None:
    snap = client.stats(b"stats workers")
    assert snap["1:cmd_get"] == "5" and snap["1:pid"] == str(os.getpid())
    assert not [name for name in snap if not name.startswith("1:")]


def test_stats_migration_lists_the_migrating_caches_only(client: Client, stats: Stats) -> None:
    assert client.stats(b"stats migration") == {}
    window = {"mode": "warmup", "seconds": 10, "buckets": [[int(time.time()) // 10 * 10, 3, 1, 2]]}
    stats.cache("sessions").attach_migration(lambda: window)
    snap = client.stats(b"stats migration")
    assert snap["sessions:mode"] == "warmup"
    assert (snap["sessions:reads_momento_1m"], snap["sessions:reads_legacy_1m"], snap["sessions:read_misses_1m"]) == ("3", "1", "2")
    assert snap["sessions:momento_share_15m"] == "0.7500"
    assert not [name for name in snap if not name.startswith("sessions:")]


def test_stats_reset(client: Client, stats: Stats) -> None:
    client.send(b"stats reset\r\n")
    assert client.read_until(b"\r\n") == b"RESET\r\n"
    snap = client.stats()
    assert snap["cmd_get"] == "0"
    assert snap["curr_connections"] == "1"
    assert stats.cache("default").get_hits == 0


def test_version_and_bare_newlines(client: Client) -> None:
    client.send(b"version\n")
    assert client.read_until(b"\r\n") == b"VERSION 9.9.9-test\r\n"


@pytest.mark.parametrize("line", [b"", b"get foo", b"stats nonsense", b"VERSION", b"GET /metrics"])
def test_unknown_is_error_and_the_connection_stays(client: Client, line: bytes) -> None:
    client.send(line + b"\r\nversion\r\n")
    assert client.read_until(b"\r\n") == b"ERROR\r\n"
    assert client.read_until(b"\r\n") == b"VERSION 9.9.9-test\r\n"


def test_pipelined_and_split_commands(client: Client) -> None:
    client.send(b"version\r\nvers")
    assert client.read_until(b"\r\n") == b"VERSION 9.9.9-test\r\n"
    client.send(b"ion\r")
    client.send(b"\n")
    assert client.read_until(b"\r\n") == b"VERSION 9.9.9-test\r\n"


def test_quit_closes(client: Client) -> None:
    client.send(b"quit\r\n")
    assert client.read_to_eof() == b""


def test_overlong_line_closes(client: Client) -> None:
    client.send(b"x" * (MAX_LINE + 10))
    assert client.read_to_eof() == b""


def test_line_of_max_length_is_answered(client: Client) -> None:
    client.send(b"x" * MAX_LINE + b"\r\n")
    assert client.read_until(b"\r\n") == b"ERROR\r\n"


def http(server: AdminServer, request: bytes) -> tuple[str, dict[str, str], bytes]:
    c = Client(server.address)
    try:
        c.send(request)
        raw = c.read_to_eof()  # the server closes after one response
    finally:
        c.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v for k, v in (h.split(": ", 1) for h in header_lines)}
    return status, headers, body


def test_metrics(server: AdminServer) -> None:
    status, headers, body = http(
        server, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain;version=0.0.4\r\n\r\n"
    )
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    cmd_get = {s.labels["cache"]: s.value for s in families["mproxy_cmd_get"].samples}
    assert cmd_get == {"default": 5.0, "sessions": 0.0}
    latency = families["mproxy_backend_latency_seconds"]
    [count] = [s.value for s in latency.samples if s.name.endswith("_count")]
    assert count == 1


def test_metrics_with_bare_newlines_and_query(server: AdminServer) -> None:
    status, _, body = http(server, b"GET /metrics?x=1 HTTP/1.0\n\n")
    assert status == "HTTP/1.1 200 OK"
    assert b"mproxy_cmd_get_total" in body


def test_other_path_is_404(server: AdminServer) -> None:
    status, headers, body = http(server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == "HTTP/1.1 404 Not Found"
    assert int(headers["content-length"]) == len(body)


def test_other_method_is_405(server: AdminServer) -> None:
    status, headers, _ = http(server, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert status == "HTTP/1.1 405 Method Not Allowed"
    assert headers["allow"] == "GET"


def test_listener_can_be_a_bound_socket(stats: Stats) -> None:
    sock = gevent.socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    srv = AdminServer(sock, stats, "1.0")
    srv.start()
    try:
        assert srv.address == sock.getsockname()
        c = Client(srv.address)
        c.send(b"version\r\n")
        assert c.read_until(b"\r\n") == b"VERSION 1.0\r\n"
        c.close()
    finally:
        srv.stop(timeout=1.0)


def test_stop_closes_idle_connections(stats: Stats) -> None:
    srv = AdminServer(("127.0.0.1", 0), stats, "1.0")
    srv.start()
    c = Client(srv.address)
    c.send(b"version\r\n")
    c.read_until(b"\r\n")
    srv.stop(timeout=0.1)
    assert c.read_to_eof() == b""
    c.close()


def test_silent_connection_is_closed_after_idle_timeout(stats: Stats) -> None:
    srv = AdminServer(("127.0.0.1", 0), stats, "1.0", settings=AdminConfig(idle_timeout=0.2))
    srv.start()
    try:
        c = Client(srv.address)
        c.send(b"vers")  # half a line, then nothing
        assert c.read_to_eof() == b""
        c.close()
    finally:
        srv.stop(timeout=1.0)
