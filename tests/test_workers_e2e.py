"""``[proxy] workers = 2`` end to end: a supervisor and two worker processes.

On the Momento backend (the embedded server, or a local server the test runs
for faults): both workers serve the one listener, the admin port's stats are
their exact sum (and each one's on request), a killed worker is restarted,
SIGHUP reaches every worker, SIGTERM stops them all with the command in hand
answered, the audit log is one file of whole lines from both that rotates, and
the ready file and READY=1 come once every worker serves. And the memory
backend refuses more than one worker.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import (
    HOST,
    LocalMomento,
    RawSession,
    Server,
    mproxy_with_notify,
    start_local_momento,
    start_mproxy,
    talk,
)
from tests.test_ops_e2e import admin_stats as stats
from tests.test_ops_e2e import wait_for

pytestmark = pytest.mark.e2e

DEADLINE = 30.0
CACHE = "w"


def config(local: str = "embedded", klog: str = "", workers: str = "workers = 2", extra: str = "") -> str:
    return f"""
[proxy]
{workers}
{extra}

[admin]
host = "{HOST}"
port = 0

[klog]
{klog}

[[cache]]
host = "{HOST}"
port = 0
cache_name = "{CACHE}"
backend = "momento"

[momento]
local = "{local}"
"""


def worker_pids(server: Server) -> dict[int, int]:
    per = stats(server.admin_port, b"stats workers")
    return {n: int(per[f"{n}:pid"]) for n in (1, 2)}


def pids_alive(pids: Iterator[int] | list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        alive.append(pid)
    return alive


class Connections:
    """Client connections held open, each known to land on worker 1 or 2."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.on: dict[int, list[RawSession]] = {1: [], 2: []}

    def open_until_both(self, limit: int = 200) -> None:
        """Open connections one by one until each worker holds at least one; a connection's
        worker is the one whose curr_connections grew when it was opened."""
        before = self._current()
        for _ in range(limit):
            session = RawSession(self.server.port)
            assert session.send(b"version\r\n")
            assert session.recv_until_terminator(b"\r\n")[1]  # accepted and served
            now = self._current()
            grew = [n for n in (1, 2) if now[n] > before[n]]
            assert len(grew) == 1, (before, now)
            self.on[grew[0]].append(session)
            before = now
            if self.on[1] and self.on[2]:
                return
        raise AssertionError(f"{limit} connections all landed on one worker: {before}")

    def _current(self) -> dict[int, int]:
        per = stats(self.server.admin_port, b"stats workers")
        return {n: int(per[f"{n}:curr_connections"]) for n in (1, 2)}

    def all(self) -> list[tuple[int, RawSession]]:
        return [(n, s) for n in (1, 2) for s in self.on[n]]

    def close(self) -> None:
        for _, session in self.all():
            session.close()


@pytest.fixture
def mproxy(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(text: str, **kwargs: object) -> Server:
        server = start_mproxy(text, tmp_path, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def test_both_workers_serve_stats_sum_exactly_and_audit_is_one_rotated_file(mproxy, tmp_path: Path) -> None:
    audit = tmp_path / "audit.log"
    server = mproxy(config(klog=f'file = "{audit}"\nmax_size = 1000\nbackup_count = 50'))
    supervisor = server.process.pid
    pids = worker_pids(server)  # the ready file is there: both serve already
    assert 0 not in pids.values() and len({supervisor, *pids.values()}) == 3
    conns = Connections(server)
    try:
        conns.open_until_both()
        sets = gets = 0
        clients: dict[str, int] = {}
        for n, session in conns.all():
            host, port = session.sock.getsockname()[:2]
            clients[f"{host}:{port}"] = n
            for i in range(5):
                key = b"key-%d-%d" % (port, i)
                assert session.send(b"set %s 0 0 1\r\nx\r\nget %s nokey\r\n" % (key, key))
                assert session.recv_until_terminator(b"END\r\n")[1]
                sets, gets = sets + 1, gets + 2
        total = stats(server.admin_port)
        assert (int(total["cmd_set"]), int(total["cmd_get"])) == (sets, gets)
        assert (int(total["get_hits"]), int(total["get_misses"])) == (sets, gets - sets)
        assert int(total["total_connections"]) == len(conns.all())
        assert int(total["curr_connections"]) == len(conns.all())
        assert total["pid"] == str(supervisor) and total["workers"] == "2" and total["worker_restarts"] == "0"
        assert int(total["backend_set_requests"]) >= 1
        per = stats(server.admin_port, b"stats workers")
        assert [int(per[f"{n}:cmd_set"]) for n in (1, 2)] == [len(conns.on[n]) * 5 for n in (1, 2)]
        assert sum(int(per[f"{n}:cmd_get"]) for n in (1, 2)) == gets
        assert {int(per[f"{n}:pid"]) for n in (1, 2)} == set(pids.values())
        # the data port, answered by one worker, shows the same sum
        data_port = stats(server.port)
        assert (data_port["pid"], data_port["cmd_get"], data_port["cmd_set"]) == (str(supervisor), str(gets), str(sets))
        with urllib.request.urlopen(f"http://{HOST}:{server.admin_port}/metrics", timeout=10) as resp:
            families = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
        [sample] = [s for s in families["mproxy_cmd_get"].samples if s.name == "mproxy_cmd_get_total"]
        assert sample.value == gets and families["mproxy_workers"].samples[0].value == 2

        # the audit log: one file (and its rotations) of whole lines, from both workers
        expected = sets * 2 + 1  # a set and a get per step, and the data port's stats
        written = wait_for(lambda: int(stats(server.admin_port)["audit_lines_written"]) >= expected or None,
                           "the audit lines of both workers")
        assert written and stats(server.admin_port)["audit_lines_dropped"] == "0"
        files = sorted(tmp_path.glob("audit.log.old*")) + [audit]
        assert len(files) >= 3  # rotated by size
        records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
        ours = [r for r in records if r["client"] in clients and r["cmd"] in ("set", "get")]
        assert len(ours) == sets * 2
        assert {clients[r["client"]] for r in ours if r["cmd"] == "set"} == {1, 2}
        assert all(r["outcome"] == "stored" for r in ours if r["cmd"] == "set")
    finally:
        conns.close()


def test_a_killed_worker_is_restarted_and_the_others_serve_meanwhile(mproxy) -> None:
    server = mproxy(config())
    before = worker_pids(server)
    assert talk(server.port, b"set k 0 0 1\r\nv\r\n", b"\r\n") == b"STORED\r\n"
    counted = int(stats(server.admin_port)["cmd_set"])  # every worker exported its counts just now
    os.kill(before[1], signal.SIGKILL)
    # once it is gone (its listening socket closed with it), worker 2 serves every new connection
    wait_for(lambda: worker_pids(server)[1] != before[1], "the supervisor to see worker 1 gone")
    for _ in range(5):
        assert talk(server.port, b"get k\r\n", b"END\r\n") == b"VALUE k 0 1\r\nv\r\nEND\r\n"
    after = wait_for(lambda: (p := worker_pids(server))[1] not in (0, before[1]) and p or None, "worker 1 restarted")
    assert after[2] == before[2] and pids_alive([before[1]]) == []
    total = stats(server.admin_port)
    assert total["worker_restarts"] == "1" and total["workers"] == "2"
    assert int(total["cmd_set"]) == counted and int(total["cmd_get"]) == 5  # the exited worker's counts stay
    assert f"worker 1 (pid {before[1]}) was killed by SIGKILL" in server.output()
    wait_for(lambda: "worker 1 serving again" in server.output(), "the restart logged")
    conns = Connections(server)  # both serve again
    try:
        conns.open_until_both()
    finally:
        conns.close()


def test_sighup_reaches_every_worker(mproxy) -> None:
    server = mproxy(config())
    assert server.config_path is not None
    server.config_path.write_text(server.config_path.read_text().replace("[klog]", '[debug]\nlog_level = "debug"\n[klog]'))
    server.process.send_signal(signal.SIGHUP)
    for who in ("mproxy", "[worker 1] mproxy", "[worker 2] mproxy"):
        wait_for(lambda: f"INFO {who}: configuration reloaded" in server.output(), f"{who} reloaded")
    assert talk(server.port, b"version\r\n", b"\r\n").startswith(b"VERSION")


@pytest.fixture
def local_momento(tmp_path: Path) -> Iterator[LocalMomento]:
    momento = start_local_momento(tmp_path, CACHE)
    yield momento
    momento.kill()


def _calls(momento: LocalMomento) -> int:
    return sum(json.loads(momento.control("stats"))["calls"].values())


def test_sigterm_stops_every_worker_with_the_commands_in_hand_answered(mproxy, local_momento: LocalMomento) -> None:
    server = mproxy(config(local=f"{HOST}:{local_momento.port}"))
    pids = worker_pids(server)
    conns = Connections(server)
    try:
        conns.open_until_both()
        one, two = conns.on[1][0], conns.on[2][0]
        for session in (one, two):
            assert session.send(b"set inflight 0 0 5\r\nvalue\r\n")
            assert session.recv_until_terminator(b"STORED\r\n")[1]
        before = _calls(local_momento)
        assert local_momento.control("fault *:delay=1.0") == "OK"
        for session in (one, two):
            assert session.send(b"get inflight\r\n")
        wait_for(lambda: _calls(local_momento) >= before + 2, "both gets in flight")
        server.process.send_signal(signal.SIGTERM)
        for session in (one, two):
            data, closed = session.recv_until_closed(timeout=DEADLINE)
            assert data == b"VALUE inflight 0 5\r\nvalue\r\nEND\r\n" and closed
        assert server.process.wait(timeout=DEADLINE) == 0
        assert pids_alive(pids.values()) == []  # type: ignore[arg-type]
    finally:
        conns.close()


def test_a_second_sigint_kills_the_workers_at_once(mproxy, local_momento: LocalMomento) -> None:
    server = mproxy(config(local=f"{HOST}:{local_momento.port}", extra="graceful_timeout = 60"))
    pids = worker_pids(server)
    with RawSession(server.port) as session:
        before = _calls(local_momento)
        assert local_momento.control("fault *:delay=30") == "OK"
        assert session.send(b"get held\r\n")
        wait_for(lambda: _calls(local_momento) > before, "the get in flight")
        server.process.send_signal(signal.SIGINT)
        wait_for(lambda: "stopping (SIGINT)" in server.output(), "the graceful stop begun")
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(timeout=DEADLINE) == 1
    wait_for(lambda: pids_alive(pids.values()) == [] or None, "the workers gone")  # type: ignore[arg-type]


def test_ready_file_and_ready_1_once_every_worker_serves(tmp_path: Path) -> None:
    with mproxy_with_notify(config(), tmp_path, DEADLINE) as (proc, sock, ready_file):
        assert sock.recv(4096) == b"READY=1"
        ready = json.loads(ready_file.read_text())  # written before READY=1
        assert ready["pid"] == proc.pid
        per = stats(ready["admin"]["port"], b"stats workers")
        assert per["1:pid"] != "0" and per["2:pid"] != "0"  # both served when READY=1 was sent
        port = ready["caches"][0]["port"]
        assert talk(port, b"set r 0 0 1\r\n1\r\n", b"\r\n") == b"STORED\r\n"
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096) == b"STOPPING=1"
        assert proc.wait(timeout=DEADLINE) == 0
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing from the workers: only the supervisor notifies
            sock.recv(4096)


def test_the_supervisor_loads_no_grpc_its_workers_do(mproxy) -> None:
    server = mproxy(config())
    maps = Path(f"/proc/{server.process.pid}/maps")
    if not maps.exists():
        pytest.skip("no /proc")
    assert "cygrpc" not in maps.read_text()
    for pid in worker_pids(server).values():
        assert "cygrpc" in Path(f"/proc/{pid}/maps").read_text()


def test_socket_activated_listener_is_served_by_the_workers(mproxy) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((HOST, 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        text = config().replace(f'cache_name = "{CACHE}"', f'cache_name = "{CACHE}"\nport = {port}').replace(
            "port = 0\ncache_name", "cache_name"
        )
        server = mproxy(text, systemd_sockets=(listener,))
    finally:
        listener.close()  # the workers hold it now
    assert server.port == port
    conns = Connections(server)
    try:
        conns.open_until_both()
    finally:
        conns.close()


@pytest.mark.parametrize("key", ["workers", "threads"])
def test_the_memory_backend_refuses_several_workers(tmp_path: Path, key: str) -> None:
    cfg = tmp_path / "memory.toml"
    cfg.write_text(f'[proxy]\n{key} = 2\n[[cache]]\nport = 0\ncache_name = "m"\nbackend = "memory"\n')
    for extra in (["--check-config"], []):
        done = subprocess.run([sys.executable, "-m", "mproxy", "-c", str(cfg), *extra],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done
        assert f'proxy.{key} = 2: expected 1 when cache[0].backend = "memory"' in done.stderr


def test_a_worker_that_cannot_start_fails_the_start(tmp_path: Path) -> None:
    """No API key for the Momento service: each worker says why and exits 1; so does mproxy."""
    cfg = tmp_path / "nokey.toml"
    cfg.write_text(config(local="").replace("[momento]", '[momento]\napi_key_env = "MPROXY_TEST_NO_SUCH_KEY"'))
    env = {k: v for k, v in os.environ.items() if k not in ("MPROXY_TEST_NO_SUCH_KEY", "MOMENTO_AUTHENTICATION")}
    done = subprocess.run([sys.executable, "-m", "mproxy", "-c", str(cfg)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 1, done
    assert re.search(r"mproxy: worker [12]: .*MPROXY_TEST_NO_SUCH_KEY", done.stderr), done.stderr
    assert re.search(r"mproxy: worker [12] \(pid \d+\) exited with status 1 before it served", done.stderr)
    assert "the supervisor is gone" not in done.stderr
