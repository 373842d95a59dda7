"""The migration end to end: real legacy ``memcached`` processes preloaded with items
(flags, TTLs), mproxy in warmup mode in front of the bundled Momento server.

Each test starts two memcached servers and a Momento server of its own. Keys are
preloaded where the application's client would put them (ketama, as libmemcached
places them: :mod:`mproxy.backends.migrate.hashing`, checked against libmemcached's
vectors in ``test_migrate.py``). A second listener on the same Momento cache without
the migration (``plain``) shows what Momento itself holds.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from mproxy.backends.base import BackendError, NonNumericValue, StoreResult
from mproxy.backends.migrate.hashing import Ring
from mproxy.backends.migrate.hashing import Server as LegacyServer
from mproxy.backends.migrate.legacy import LegacyClient
from mproxy.protocol.commands import StoreMode
from tests.servers import HOST, LocalMomento, RawSession, Server, start_local_momento, start_memcached, start_mproxy, talk
from tests.test_ops_e2e import admin_stats, wait_for

pytestmark = pytest.mark.e2e

CACHE = "migrating"


@pytest.fixture
def momento(tmp_path: Path) -> Iterator[LocalMomento]:
    server = start_local_momento(tmp_path, CACHE)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def legacy(tmp_path: Path) -> Iterator[list[Server]]:
    servers: list[Server] = []
    try:
        for _ in range(2):
            try:
                servers.append(start_memcached(tmp_path))
            except FileNotFoundError:
                pytest.skip("memcached is not installed")
        yield servers
    finally:
        for server in servers:
            server.stop()


def config(momento: LocalMomento, legacy: list[Server], mode: str = "warmup", workers: int = 1) -> str:
    servers = ", ".join(f'"{HOST}:{s.port}"' for s in legacy)
    return f"""
[proxy]
workers = {workers}

[admin]
host = "{HOST}"
port = 0

[[cache]]
name = "migrating"
host = "{HOST}"
port = 0
cache_name = "{CACHE}"
migrate_from = [{servers}]
migration_mode = "{mode}"

[[cache]]
name = "plain"
host = "{HOST}"
port = 0
cache_name = "{CACHE}"

[momento]
local = "{HOST}:{momento.port}"
"""


def ring(legacy: list[Server]) -> Ring:
    return Ring([LegacyServer(HOST, s.port) for s in legacy], "ketama")


def preload(legacy: list[Server], items: dict[bytes, tuple[bytes, int, int]]) -> None:
    """``key -> (value, flags, exptime)`` written to the server the ring gives each key."""
    placement = ring(legacy)
    for key, (value, flags, exptime) in items.items():
        port = legacy[placement.index(key)].port
        assert talk(port, b"set %s %d %d %d\r\n%s\r\n" % (key, flags, exptime, len(value), value), b"\r\n") == b"STORED\r\n"


def legacy_has(legacy: list[Server], key: bytes) -> bool:
    port = legacy[ring(legacy).index(key)].port
    return talk(port, b"get " + key + b"\r\n", b"END\r\n") != b"END\r\n"


def get_many(port: int, keys: list[bytes]) -> dict[bytes, tuple[int, bytes]]:
    """key -> (flags, value) of the keys a ``get`` through ``port`` found."""
    reply = talk(port, b"get " + b" ".join(keys) + b"\r\n", b"END\r\n")
    out: dict[bytes, tuple[int, bytes]] = {}
    lines = reply.split(b"\r\n")
    i = 0
    while lines[i] != b"END":
        _, key, flags, _size = lines[i].split()
        out[key] = (int(flags), lines[i + 1])
        i += 2
    return out


def settled(admin: int) -> dict[str, str]:
    """The stats once every backfill queued by a legacy hit has ended (made, lost a race,
    failed): the figures no longer move."""
    def done() -> dict[str, str] | None:
        st = admin_stats(admin)
        ended = sum(int(st[n]) for n in ("migration_backfills", "migration_backfill_races",
                                          "migration_backfill_errors", "migration_backfills_dropped"))
        return st if ended >= int(st["migration_reads_legacy"]) else None

    result: dict[str, str] = wait_for(done, "the backfills to end")
    return result


def test_warmup_serves_every_key_while_momento_warms_then_momento_serves_them(
    momento: LocalMomento, legacy: list[Server], tmp_path: Path
) -> None:
    items = {b"key:%d" % i: (b"value-%d" % i, i * 7, 600) for i in range(200)}
    preload(legacy, items)
    assert all(any(ring(legacy).index(k) == n for k in items) for n in (0, 1))  # both servers hold keys
    server = start_mproxy(config(momento, legacy), tmp_path)
    port, plain, admin = server.ports["migrating"], server.ports["plain"], server.admin_port
    keys = list(items)
    try:
        expected = {k: (flags, value) for k, (value, flags, _) in items.items()}
        # Momento is empty: every read is answered (from the legacy servers), none misses
        for at in range(0, 200, 50):
            assert get_many(port, keys[at : at + 50]) == {k: expected[k] for k in keys[at : at + 50]}
        cold = admin_stats(admin, b"stats migration")
        assert cold["migrating:momento_share_1m"] == "0.0000"
        st = settled(admin)
        assert int(st["get_misses"]) == 0 and int(st["get_hits"]) == 200
        assert int(st["migration_backfills"]) == 200
        # Momento holds them, with their flags
        assert get_many(plain, keys) == expected
        # read again: Momento answers, the share rises
        assert get_many(port, keys) == expected
        warm = admin_stats(admin, b"stats migration")
        assert warm["migrating:mode"] == "warmup"
        assert int(warm["migrating:reads_momento_1m"]) == 200 and int(warm["migrating:reads_legacy_1m"]) == 200
        assert float(warm["migrating:momento_share_1m"]) > float(cold["migrating:momento_share_1m"])
        # with the legacy fleet gone, Momento still answers every key
        for s in legacy:
            s.stop()
        assert get_many(port, keys) == expected
        assert int(admin_stats(admin)["migration_legacy_errors"]) == 0
        assert float(admin_stats(admin, b"stats migration")["migrating:momento_share_1m"]) > float(warm["migrating:momento_share_1m"])
        metrics = talk(admin, b"GET /metrics HTTP/1.0\r\n\r\n", b"\n")
        assert metrics.startswith(b"HTTP/1.1 200")
    finally:
        server.stop()


def test_a_backfilled_item_lives_no_longer_than_the_legacy_one(
    momento: LocalMomento, legacy: list[Server], tmp_path: Path
) -> None:
    server = start_mproxy(config(momento, legacy), tmp_path)
    port, plain, admin = server.ports["migrating"], server.ports["plain"], server.admin_port
    try:
        preload(legacy, {b"short": (b"v", 5, 4), b"long": (b"w", 6, 600)})  # "short": copied with 2-3 s
        assert get_many(port, [b"short", b"long"]) == {b"short": (5, b"v"), b"long": (6, b"w")}
        settled(admin)
        assert get_many(plain, [b"short", b"long"]) == {b"short": (5, b"v"), b"long": (6, b"w")}
        wait_for(lambda: not legacy_has(legacy, b"short"), "the legacy item to expire", timeout=10)
        assert get_many(plain, [b"short", b"long"]) == {b"long": (6, b"w")}  # gone from Momento too
        assert get_many(port, [b"short"]) == {}
    finally:
        server.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_writes_and_deletes_through_mproxy_are_never_followed_by_an_older_legacy_value(
    momento: LocalMomento, legacy: list[Server], tmp_path: Path, workers: int
) -> None:
    """Each key is read (a backfill starts) and written or deleted at once: pipelined on
    the same connection, right after the answer or at the same time on another (with two
    workers, maybe another process): whatever the order the backfill and the write land
    in, the write wins."""
    n = 60
    items = {b"race:%d" % i: (b"old-%d" % i, 1, 600) for i in range(n)}
    preload(legacy, items)
    server = start_mproxy(config(momento, legacy, workers=workers), tmp_path)
    port, plain, admin = server.ports["migrating"], server.ports["plain"], server.admin_port
    try:
        with RawSession(port) as reader, RawSession(port) as writer:
            for i, key in enumerate(items):
                write = b"set %s 2 0 3\r\nnew\r\n" % key if i % 2 else b"delete %s\r\n" % key
                if i % 3 == 1:  # the write right after the answer: its backfill is under way
                    reader.send(b"get " + key + b"\r\n")
                    assert reader.recv_until_terminator(b"END\r\n")[1]
                    writer.send(write)
                    assert writer.recv_until_terminator(b"\r\n")[1]
                elif i % 3 == 2:  # at the same time
                    reader.send(b"get " + key + b"\r\n")
                    writer.send(write)
                    assert reader.recv_until_terminator(b"END\r\n")[1]
                    assert writer.recv_until_terminator(b"\r\n")[1]
                else:  # pipelined after the read
                    reader.send(b"get " + key + b"\r\n" + write)
                    answer = b"STORED\r\n" if i % 2 else b"DELETED\r\n"
                    assert reader.recv_until(lambda data: b"END\r\n" + answer in data)[1]
        settled(admin)
        for i, key in enumerate(items):
            assert not legacy_has(legacy, key)
            want = {key: (2, b"new")} if i % 2 else {}
            assert get_many(port, [key]) == want, key
            assert get_many(plain, [key]) == want, key
        window = admin_stats(admin, b"stats migration")  # summed over the workers
        read = sum(int(window[f"migrating:{what}_15m"]) for what in ("reads_momento", "reads_legacy", "read_misses"))
        assert read == 2 * n
    finally:
        server.stop()


def test_dual_write_reads_legacy_and_writes_both(momento: LocalMomento, legacy: list[Server], tmp_path: Path) -> None:
    preload(legacy, {b"k": (b"old", 3, 600)})
    server = start_mproxy(config(momento, legacy, mode="dual_write"), tmp_path)
    port, plain, admin = server.ports["migrating"], server.ports["plain"], server.admin_port
    try:
        assert get_many(port, [b"k"]) == {b"k": (3, b"old")}
        assert get_many(plain, [b"k"]) == {}  # not backfilled in dual_write
        assert talk(port, b"set k 4 0 3\r\nnew\r\n", b"\r\n") == b"STORED\r\n"
        assert get_many(plain, [b"k"]) == {b"k": (4, b"new")} and legacy_has(legacy, b"k")
        assert talk(port, b"delete k\r\n", b"\r\n") == b"DELETED\r\n"
        assert get_many(plain, [b"k"]) == {} and not legacy_has(legacy, b"k")
        assert admin_stats(admin, b"stats migration")["migrating:mode"] == "dual_write"
    finally:
        server.stop()


def test_shadow_counts_what_momento_lacks_and_what_differs(momento: LocalMomento, legacy: list[Server], tmp_path: Path) -> None:
    preload(legacy, {b"cold": (b"v", 1, 600)})
    text = config(momento, legacy, mode="shadow").replace('migration_mode = "shadow"', 'migration_mode = "shadow"\nmigration_shadow_rate = 1.0')
    server = start_mproxy(text, tmp_path)
    port, plain, admin = server.ports["migrating"], server.ports["plain"], server.admin_port

    def figures() -> tuple[int, ...]:
        st = admin_stats(admin)
        return tuple(int(st[f"migration_shadow_{n}"]) for n in ("reads", "momento_misses", "mismatches"))

    try:
        assert get_many(port, [b"cold"]) == {b"cold": (1, b"v")}
        wait_for(lambda: figures() == (1, 1, 0), "the shadow read of cold")
        assert talk(port, b"set same 2 0 1\r\nx\r\n", b"\r\n") == b"STORED\r\n"  # both sides
        assert get_many(port, [b"same"]) == {b"same": (2, b"x")}
        wait_for(lambda: figures() == (2, 1, 0), "the shadow read of same")
        assert talk(plain, b"set same 2 0 1\r\ny\r\n", b"\r\n") == b"STORED\r\n"  # Momento only
        assert get_many(port, [b"same"]) == {b"same": (2, b"x")}  # the legacy servers answer
        wait_for(lambda: figures() == (3, 1, 1), "the shadow read that differs")
    finally:
        server.stop()


def test_the_legacy_client_reads_ttl_with_meta_and_without(legacy: list[Server]) -> None:
    preload(legacy, {b"a": (b"x", 9, 100), b"b": (b"y", 8, 0)})
    client = LegacyClient(ring(legacy), timeout=2.0)
    try:
        got = client.get_many([b"a", b"b", b"c"])
        assert client.speaks_meta() == [True, True] or set(client.speaks_meta()) <= {True, None}
        assert set(got) == {b"a", b"b"}
        assert (got[b"a"].value, got[b"a"].flags) == (b"x", 9) and 98 <= got[b"a"].ttl <= 100  # type: ignore[operator]
        assert got[b"b"].ttl == -1 and got[b"a"].cas > 0
        for pool in client._pools:
            pool.meta = False  # a server older than 1.6: gets, no TTL
        classic = client.get_many([b"a", b"b"])
        assert classic[b"a"].ttl is None and classic[b"a"].cas == got[b"a"].cas
        assert client.delete(b"a") is True and client.delete(b"a") is False
        assert client.store(StoreMode.SET, b"n", b"41", 3, 0) is StoreResult.STORED
        assert client.incr_decr(b"n", 1, True) == 42 and client.incr_decr(b"zz", 1, True) is None
        with pytest.raises(NonNumericValue):
            client.incr_decr(b"b", 1, True)
        assert client.touch(b"n", 100) is True
        for pool in client._pools:  # idle connections that went dead (closed by a firewall, say)
            for conn in pool.idle:
                conn.sock.shutdown(socket.SHUT_RDWR)
        assert client.incr_decr(b"n", 1, True) == 43 and client.errors == 0  # on a new connection
    finally:
        client.close()
    keys = {n: next(k for k in (b"k%d" % i for i in range(100)) if ring(legacy).index(k) == n) for n in (0, 1)}
    preload(legacy, {key: (b"v", 0, 0) for key in keys.values()})
    legacy[0].stop()
    client = LegacyClient(ring(legacy), timeout=0.5)
    try:
        with pytest.raises(BackendError, match=f"legacy {HOST}:{legacy[0].port}"):
            client.get_many(list(keys.values()))
        failed: list[bytes] = []  # warmup's way: the other server's items, the failed keys apart
        assert set(client.get_many(list(keys.values()), failed)) == {keys[1]} and failed == [keys[0]]
    finally:
        client.close()
