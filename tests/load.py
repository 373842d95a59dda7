"""Load scenarios of issue 11 against an mproxy subprocess: many connections held,
slowloris, a client that never reads. Each returns its figures (a dict).

``tests/test_load.py`` runs them at CI size; the full size runs from the shell::

    .venv/bin/python -m tests.load                      # every scenario, full size, JSON out
    .venv/bin/python -m tests.load --connections 20000 --slowloris 1000 --seconds 10

The client side is plain blocking sockets driven by one ``selectors`` loop (or one
thread for the tricklers), so that the load costs the test process little CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import selectors
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.servers import HOST, Server, start_mproxy

#: Descriptors the client side needs beyond its connections (pytest, logs, ...).
SPARE_FDS = 256


def raise_nofile(needed: int) -> int | None:
    """Raise this process's soft open-file limit to at least ``needed``; None if it is
    done, else the hard limit that is too low (the caller skips)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return None
    if hard != resource.RLIM_INFINITY and hard < needed:
        return hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return None


def config(max_connections: int, idle_timeout: float = 0.0) -> str:
    return f"""\
[proxy]
max_connections = {max_connections}
idle_timeout = {idle_timeout}

[admin]
host = "127.0.0.1"
port = 0

[[cache]]
cache_name = "load"
backend = "memory"
host = "127.0.0.1"
port = 0
memory_cache_bytes = 268435456
"""


@contextmanager
def mproxy(max_connections: int, tmp: Path, idle_timeout: float = 0.0) -> Iterator[Server]:
    server = start_mproxy(config(max_connections, idle_timeout), tmp)
    try:
        yield server
    finally:
        server.stop()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def stat(server: Server, name: str) -> int:
    with socket.create_connection((HOST, server.admin_port), timeout=10) as s:
        s.sendall(b"stats\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    for line in data.decode().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == name:
            return int(parts[2])
    raise KeyError(name)


def request(sock: socket.socket, data: bytes, terminator: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while not got.endswith(terminator):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {got!r}")
        got += chunk
    return got


def good_client_latencies(port: int, seconds: float) -> list[float]:
    """A client doing set then get of its own key, one at a time, for ``seconds``: each
    exchange's seconds."""
    out: list[float] = []
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            began = time.perf_counter()
            assert request(s, b"set good 0 0 4\r\n%04d\r\n" % (i % 10000), b"\r\n") == b"STORED\r\n"
            out.append(time.perf_counter() - began)
            began = time.perf_counter()
            assert request(s, b"get good\r\n", b"END\r\n").startswith(b"VALUE good 0 4\r\n")
            out.append(time.perf_counter() - began)
            i += 1
            time.sleep(0.005)  # a request every few ms, not a flood
    return out


def connect_many(port: int, count: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.create_connection((HOST, port), timeout=30)
            socks.append(s)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


# -- scenarios ------------------------------------------------------------------------


def held_connections(count: int, tmp: Path) -> dict[str, Any]:
    """``count`` connections opened and held; every one answers ``version``; the RSS the
    server spent on them."""
    with mproxy(count + 16, tmp) as server:
        pid = server.process.pid
        base = rss_kib(pid)
        began = time.monotonic()
        socks = connect_many(server.port, count)
        try:
            connected = time.monotonic() - began
            deadline = time.monotonic() + 60
            while stat(server, "curr_connections") < count:
                assert time.monotonic() < deadline, "the server did not accept every connection"
                time.sleep(0.05)
            held = rss_kib(pid)
            sel = selectors.DefaultSelector()
            for s in socks:
                s.sendall(b"version\r\n")
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ)
            answered = 0
            deadline = time.monotonic() + 60
            while answered < count and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=1.0):
                    data = key.fileobj.recv(100)  # type: ignore[union-attr]
                    assert data.startswith(b"VERSION "), data
                    sel.unregister(key.fileobj)
                    answered += 1
            sel.close()
            latencies = good_client_latencies(server.port, 1.0)
        finally:
            for s in socks:
                s.close()
        return {
            "connections": count,
            "answered": answered,
            "seconds_to_connect": round(connected, 2),
            "rss_kib_before": base,
            "rss_kib_held": held,
            "rss_bytes_per_connection": round((held - base) * 1024 / count),
            "good_client_median_ms": round(statistics.median(latencies) * 1000, 3),
        }


def slowloris(count: int, where: str, seconds: float, tmp: Path) -> dict[str, Any]:
    """``count`` clients trickling a byte every 0.1 s into a command line (``where`` =
    ``line``) or a data block (``data``) that never ends, while a good client works."""
    first = b"get " if where == "line" else b"set slow 0 0 1000000\r\n"
    byte = b"k" if where == "line" else b"x"
    with mproxy(count + 16, tmp) as server:
        socks = connect_many(server.port, count)
        stop = threading.Event()
        sent = [0]

        def trickle() -> None:
            for s in socks:
                s.sendall(first)
            while not stop.is_set():
                for s in socks:
                    s.sendall(byte)
                    sent[0] += 1
                stop.wait(0.1)

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        try:
            time.sleep(0.5)  # the trickle under way
            latencies = good_client_latencies(server.port, seconds)
            open_now = stat(server, "curr_connections")
        finally:
            stop.set()
            thread.join()
            for s in socks:
                s.close()
        return {
            "slowloris": count,
            "where": where,
            "bytes_trickled": sent[0],
            "connections_open": open_now,
            "good_client_requests": len(latencies),
            "good_client_median_ms": round(statistics.median(latencies) * 1000, 3),
            "good_client_p99_ms": round(sorted(latencies)[int(len(latencies) * 0.99)] * 1000, 3),
        }


def never_reads(seconds: float, tmp: Path) -> dict[str, Any]:
    """A client sending gets of a 512 KiB item as fast as the server reads them and never
    reading a reply: the server's RSS growth, and a good client's latency meanwhile."""
    with mproxy(64, tmp) as server:
        pid = server.process.pid
        value = b"v" * (512 * 1024)
        with socket.create_connection((HOST, server.port), timeout=10) as s:
            assert request(s, b"set big 0 0 %d\r\n%s\r\n" % (len(value), value), b"\r\n") == b"STORED\r\n"
        base = rss_kib(pid)
        hog = socket.create_connection((HOST, server.port), timeout=10)
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.setblocking(False)
        pipeline = b"get big\r\n" * 1000
        sent = 0
        stop = threading.Event()

        def flood() -> None:
            nonlocal sent
            while not stop.is_set():
                try:
                    sent += hog.send(pipeline)
                except BlockingIOError:
                    stop.wait(0.05)  # the server stopped reading: its replies are unread

        thread = threading.Thread(target=flood, daemon=True)
        thread.start()
        try:
            time.sleep(1.0)
            latencies = good_client_latencies(server.port, seconds)
            peak = rss_kib(pid)
        finally:
            stop.set()
            thread.join()
            hog.close()
        return {
            "requests_sent": sent // len(b"get big\r\n"),
            "replies_if_answered_mib": round(sent // len(b"get big\r\n") * len(value) / 2**20),
            "rss_kib_before": base,
            "rss_kib_during": peak,
            "rss_growth_mib": round((peak - base) / 1024, 1),
            "good_client_requests": len(latencies),
            "good_client_median_ms": round(statistics.median(latencies) * 1000, 3),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=5000)
    p.add_argument("--slowloris", type=int, default=300)
    p.add_argument("--seconds", type=float, default=5.0, help="good-client measuring time per scenario")
    args = p.parse_args()
    too_low = raise_nofile(args.connections * 2 + SPARE_FDS)
    if too_low is not None:
        raise SystemExit(f"the hard open-file limit ({too_low}) is below {args.connections * 2 + SPARE_FDS}")
    with tempfile.TemporaryDirectory() as tmp:
        figures = [
            held_connections(args.connections, Path(tmp)),
            slowloris(args.slowloris, "line", args.seconds, Path(tmp)),
            slowloris(args.slowloris, "data", args.seconds, Path(tmp)),
            never_reads(args.seconds, Path(tmp)),
        ]
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
