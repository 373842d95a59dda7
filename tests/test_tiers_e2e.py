"""The local tiers end to end: mproxy with tiers in front of a local Momento server.

Every test runs its own Momento-compatible server (``start_local_momento``:
its control port counts the calls mproxy makes and injects faults) and one or
more mproxy processes. A second listener on the same Momento cache without
tiers plays "another client" where a test needs a write that does not go
through the tiered listener.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import HOST, LocalMomento, RawSession, Server, start_local_momento, start_mproxy, talk
from tests.test_ops_e2e import admin_stats as stats
from tests.test_ops_e2e import wait_for

pytestmark = pytest.mark.e2e

CACHE = "tiers"


def config(momento: LocalMomento, tier: str, workers: int = 1, klog: str = "", timeout: float = 5.0) -> str:
    """A tiered listener (``tiered``) and one without tiers (``plain``) on one Momento cache."""
    return f"""
[proxy]
workers = {workers}

[admin]
host = "{HOST}"
port = 0

[klog]
{klog}

[[cache]]
name = "tiered"
host = "{HOST}"
port = 0
cache_name = "{CACHE}"
request_timeout = {timeout}
{tier}

[[cache]]
name = "plain"
host = "{HOST}"
port = 0
cache_name = "{CACHE}"

[momento]
local = "{HOST}:{momento.port}"
"""


MEMORY = "memory_cache_bytes = 4194304\nmemory_cache_ttl_seconds = 600\n"


@pytest.fixture
def momento(tmp_path: Path) -> Iterator[LocalMomento]:
    server = start_local_momento(tmp_path, CACHE)
    try:
        yield server
    finally:
        server.stop()


def calls(momento: LocalMomento) -> dict[str, int]:
    counts: dict[str, int] = json.loads(momento.control("stats"))["calls"]
    return counts


def get(port: int, key: bytes) -> bytes:
    reply = talk(port, b"get " + key + b"\r\n", b"END\r\n")
    if reply == b"END\r\n":
        return b""
    return reply.split(b"\r\n")[1]


def set_(port: int, key: bytes, value: bytes, exptime: int = 0) -> bytes:
    return talk(port, b"set %s 0 %d %d\r\n%s\r\n" % (key, exptime, len(value), value), b"\r\n")


def test_a_hit_costs_no_momento_call_and_concurrent_misses_share_one(momento: LocalMomento, tmp_path: Path) -> None:
    server = start_mproxy(config(momento, MEMORY), tmp_path)
    tiered, plain = server.ports["tiered"], server.ports["plain"]
    try:
        assert set_(tiered, b"mine", b"v") == b"STORED\r\n"
        momento.control("reset")
        assert all(get(tiered, b"mine") == b"v" for _ in range(5))
        assert calls(momento) == {}  # written here: kept with its TTL, answered locally

        set_(plain, b"theirs", b"v2")
        momento.control("reset")
        momento.control("fault Get:delay=0.5:count=1")
        momento.control("fault GetBatch:delay=0.5:count=1")
        barrier = threading.Barrier(20)
        answers: list[bytes] = []

        def read() -> None:
            with RawSession(tiered) as s:
                barrier.wait()
                s.send(b"get theirs\r\n")
                data, complete = s.recv_until_terminator(b"END\r\n")
            answers.append(data if complete else b"incomplete")

        readers = [threading.Thread(target=read) for _ in range(20)]
        for t in readers:
            t.start()
        for t in readers:
            t.join()
        assert answers == [b"VALUE theirs 0 2\r\nv2\r\nEND\r\n"] * 20
        got = calls(momento)
        assert got.get("Get", 0) + got.get("GetBatch", 0) == 1, got  # 20 misses, one read
        figures = stats(server.admin_port, b"stats cache")
        assert int(figures["tiered:memory_cache_hits"]) == 5
        assert int(figures["tiered:memory_cache_limit_bytes"]) == 4194304
    finally:
        server.stop()


def test_a_failed_write_leaves_no_stale_copy(momento: LocalMomento, tmp_path: Path) -> None:
    server = start_mproxy(config(momento, MEMORY, timeout=1.0), tmp_path)
    tiered, plain = server.ports["tiered"], server.ports["plain"]
    try:
        set_(tiered, b"k", b"old")
        assert get(tiered, b"k") == b"old"
        momento.control("fault Set:delay=2.5:count=1")  # applied after the client gave up (quarantine: 5 s)
        assert set_(tiered, b"k", b"new").startswith(b"SERVER_ERROR momento timeout")
        assert get(tiered, b"k") in (b"old", b"new")  # read from Momento: the write may land any moment
        wait_for(lambda: get(plain, b"k") == b"new", "the timed-out write to land")
        assert get(tiered, b"k") == b"new"  # never the copy of "old"
        momento.control("fault Set:error=UNAVAILABLE:count=10")  # every attempt of the SDK's refused
        assert set_(tiered, b"k", b"newer").startswith(b"SERVER_ERROR")
        assert get(tiered, b"k") == b"new"
    finally:
        server.stop()


def test_a_restart_finds_the_disk_tier_warm(momento: LocalMomento, tmp_path: Path) -> None:
    tier = MEMORY + f'disk_cache_path = "{tmp_path / "disk"}"\ndisk_cache_bytes = 16777216\n'
    audit = tmp_path / "audit.log"
    text = config(momento, tier, klog=f'file = "{audit}"\nsample = 1')
    server = start_mproxy(text, tmp_path)
    try:
        for i in range(20):
            set_(server.ports["tiered"], b"k%d" % i, b"v%d" % i)
    finally:
        server.stop()  # SIGTERM: a graceful stop, the disk tier closed cleanly
    assert server.process.returncode == 0
    assert list((tmp_path / "disk").glob("mproxy-tiered-w1.sqlite3"))
    again = start_mproxy(text, tmp_path)
    try:
        momento.control("reset")
        assert [get(again.ports["tiered"], b"k%d" % i) for i in range(20)] == [b"v%d" % i for i in range(20)]
        assert calls(momento) == {}  # every one from the disk tier
        figures = stats(again.admin_port)
        assert int(figures["disk_cache_hits"]) == 20 and int(figures["disk_cache_items"]) == 20
        lines = wait_for(lambda: [json.loads(x) for x in audit.read_text().splitlines() if '"get"' in x][-20:], "audit")
        assert {line["tier"] for line in lines} == {"disk"}
        get(again.ports["tiered"], b"k0")
        wait_for(lambda: '"tier": "memory"' in audit.read_text().splitlines()[-1], "a memory hit's line")
        get(again.ports["plain"], b"k0")
        assert "tier" not in json.loads(wait_for(lambda: [x for x in audit.read_text().splitlines() if '"plain"' in x], "plain")[-1])
    finally:
        again.stop()


def test_cache_memlimit_resizes_the_memory_tier(momento: LocalMomento, tmp_path: Path) -> None:
    server = start_mproxy(config(momento, "memory_cache_bytes = 67108864\n"), tmp_path)
    try:
        assert talk(server.ports["tiered"], b"cache_memlimit 16\r\n", b"\r\n") == b"OK\r\n"
        assert int(stats(server.admin_port)["memory_cache_limit_bytes"]) == 16 * 1024 * 1024
        assert talk(server.ports["plain"], b"cache_memlimit 16\r\n", b"\r\n").startswith(b"MEMLIMIT_ADJUST_FAILED")
    finally:
        server.stop()


def test_with_two_workers_a_write_is_never_followed_by_the_value_it_replaced(momento: LocalMomento, tmp_path: Path) -> None:
    server = start_mproxy(config(momento, MEMORY, workers=2), tmp_path)
    tiered = server.ports["tiered"]
    sessions = [RawSession(tiered) for _ in range(16)]
    try:

        def ask(s: RawSession, command: bytes, end: bytes) -> bytes:
            s.send(command)
            data, complete = s.recv_until_terminator(end)
            assert complete, data
            return data

        for s in sessions:
            ask(s, b"get k\r\n", b"END\r\n")
        per = stats(server.admin_port, b"stats workers")
        assert int(per["1:curr_connections"]) > 0 and int(per["2:curr_connections"]) > 0, per
        for i in range(30):
            writer = sessions[i % len(sessions)]
            assert ask(writer, b"set k 0 0 %d\r\n%d\r\n" % (len(b"%d" % i), i), b"\r\n") == b"STORED\r\n"
            for s in sessions:  # every connection, both workers: the new value, twice (the second from a copy)
                for _ in range(2):
                    assert ask(s, b"get k\r\n", b"END\r\n") == b"VALUE k 0 %d\r\n%d\r\nEND\r\n" % (len(b"%d" % i), i)
        figures = stats(server.admin_port)
        assert int(figures["memory_cache_hits"]) > 0
    finally:
        for s in sessions:
            s.close()
        server.stop()


def test_a_restarted_worker_rejoins_the_invalidations(momento: LocalMomento, tmp_path: Path) -> None:
    server = start_mproxy(config(momento, MEMORY, workers=2), tmp_path)
    tiered = server.ports["tiered"]
    try:
        before = stats(server.admin_port, b"stats workers")
        victim = int(before["2:pid"])
        import os

        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: stats(server.admin_port, b"stats workers").get("2:pid", "0") not in ("0", str(victim)), "restart")
        sessions = [RawSession(tiered) for _ in range(16)]
        try:
            for i in range(5):
                sessions[i].send(b"set r 0 0 1\r\n%d\r\n" % i)
                assert sessions[i].recv_until_terminator(b"\r\n")[0] == b"STORED\r\n"
                for s in sessions:
                    s.send(b"get r\r\n")
                    assert s.recv_until_terminator(b"END\r\n")[0] == b"VALUE r 0 1\r\n%d\r\nEND\r\n" % i
        finally:
            for s in sessions:
                s.close()
    finally:
        server.stop()


def _server_alive(server: Server) -> bool:
    return server.process.poll() is None
