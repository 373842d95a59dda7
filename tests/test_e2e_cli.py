"""End to end: ``python -m mproxy -c FILE`` as a subprocess, real clients over TCP.

The connection loop itself (pipelining, quit, fatal errors, the connection cap,
idle timeout, graceful stop) is tested in-process in ``test_server.py``; here
what only the whole process shows: the command line, signals, exit codes, and
configuration reaching the listeners."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pymemcache.client.base import Client

from tests.servers import HOST, RawSession, Server, start_mproxy

pytestmark = pytest.mark.e2e


def memory_toml(proxy: str = "") -> str:
    return f"""
[admin]
host = "{HOST}"
port = 0

[proxy]
{proxy}

[[cache]]
host = "{HOST}"
port = 0
cache_name = "e2e"
backend = "memory"
"""


@pytest.fixture()
def proxy(tmp_path: Path):
    server = start_mproxy(memory_toml(), tmp_path)
    yield server
    server.stop()


def test_pymemcache_full_command_set(proxy: Server) -> None:
    client = Client((HOST, proxy.port), timeout=10, connect_timeout=10)
    try:
        assert client.set("a", b"1", expire=0) is True
        assert client.get("a") == b"1"
        assert client.add("a", b"2", noreply=False) is False
        assert client.add("b", b"2", noreply=False) is True
        assert client.replace("a", b"10", noreply=False) is True
        assert client.append("a", b"0", noreply=False) is True
        assert client.prepend("a", b"9", noreply=False) is True
        assert client.get("a") == b"9100"
        assert client.incr("a", 5) == 9105
        assert client.decr("a", 10_000) == 0
        value, cas = client.gets("a")
        assert value == b"0   "  # memcached pads a shrunk counter with spaces
        assert client.cas("a", b"x", cas, noreply=False) is True
        assert client.cas("a", b"y", cas, noreply=False) is False
        assert client.touch("a", 100, noreply=False) is True
        assert client.get_many(["a", "b", "zz"]) == {"a": b"x", "b": b"2"}
        assert client.raw_command(b"gat 100 a", b"END\r\n") == b"VALUE a 0 1\r\nx\r\n"
        assert client.delete("a", noreply=False) is True
        assert client.delete("a", noreply=False) is False
        assert client.incr("missing", 1) is None
        client.set("quiet", b"v", noreply=True)
        assert client.get("quiet") == b"v"
        assert client.flush_all(noreply=False) is True
        assert client.get("b") is None
        assert client.version().startswith(b"1.6")
        stats = client.stats()
        assert stats[b"cmd_get"] > 0 and stats[b"curr_connections"] >= 1
    finally:
        client.close()


def test_many_keys_and_large_values(proxy: Server) -> None:
    client = Client((HOST, proxy.port), timeout=10, connect_timeout=10)
    try:
        values = {f"k{i}": f"value-{i}".encode() for i in range(1100)}
        assert client.set_many(values, noreply=False) == []
        assert client.get_many(list(values)) == values
        big = b"x" * 1_000_000  # memcached's -I 1m limit counts ~60 bytes of item overhead
        assert client.set("big", big, noreply=False) is True
        assert client.get("big") == big
    finally:
        client.close()


def test_sigterm_is_graceful_and_exits_zero(tmp_path: Path) -> None:
    server = start_mproxy(memory_toml(), tmp_path)
    idle = socket.create_connection((HOST, server.port), timeout=10)
    try:
        client = Client((HOST, server.port), timeout=10)
        assert client.set("k", b"v", noreply=False)
        client.close()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=15) == 0
        idle.settimeout(10)
        assert idle.recv(100) == b""  # the idle connection was closed, not left hanging
    finally:
        idle.close()
        server.stop()


def test_proxy_limits_reach_the_listeners(tmp_path: Path) -> None:
    """``[proxy] max_connections`` and ``idle_timeout`` from the file are the ones served."""
    server = start_mproxy(memory_toml("max_connections = 1\nidle_timeout = 0.5"), tmp_path)
    try:
        with RawSession(server.port) as held:
            held.send(b"version\r\n")
            assert held.recv_until_terminator(b"\r\n")[0].startswith(b"VERSION ")
            with RawSession(server.port) as refused:
                assert refused.recv_until_closed() == (b"ERROR Too many open connections\r\n", True)
            assert held.recv_until_closed(timeout=20) == (b"", True)  # idle for 0.5 s
    finally:
        server.stop()


def test_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[cache]]\ncache_name = "x"\nport = "abc"\n')
    proc = subprocess.run([sys.executable, "-m", "mproxy", "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "port" in lines[0] and "abc" in lines[0]


def test_check_config_prints_effective_config(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "mproxy", "-c", str(repo / "config" / "local.toml"), "--check-config"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[[cache]]" in proc.stdout and "default-cache" in proc.stdout


def test_version_flag() -> None:
    proc = subprocess.run([sys.executable, "-m", "mproxy", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("mproxy ")


def test_random_bytes_never_take_the_server_down(proxy: Server) -> None:
    """Garbage, truncated commands and abrupt closes on many connections: mproxy keeps
    serving, and its memory stays bounded (checked from /proc)."""
    import random

    rng = random.Random(1234)
    pieces = [b"set k 0 0 5\r\n", b"get k\r\n", b"gat -1 k\r\n", b"\r\n", b"noreply", b" ", b"\x00",
              b"incr k 99999999999999999999\r\n", b"cas k 0 0 1 x\r\n", b"HTTP/1.1\r\n", b"x" * 3000]
    rss_before = _rss_kib(proxy)
    for _ in range(200):
        blob = b"".join(rng.choice(pieces) if rng.random() < 0.7 else rng.randbytes(rng.randint(1, 200))
                        for _ in range(rng.randint(1, 20)))
        with socket.create_connection((HOST, proxy.port), timeout=10) as sock:
            sock.sendall(blob)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(10)
            while sock.recv(65536):
                pass
    with RawSession(proxy.port) as s:
        s.send(b"set ok 0 0 2\r\nok\r\nget ok\r\n")
        assert s.recv_until_terminator(b"END\r\n")[0] == b"STORED\r\nVALUE ok 0 2\r\nok\r\nEND\r\n"
    assert _rss_kib(proxy) < rss_before + 64 * 1024


def _rss_kib(server: Server) -> int:
    with open(f"/proc/{server.process.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")
