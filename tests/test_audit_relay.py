"""A worker's audit lines reach the supervisor's one writer: batching, bounds, drops, EOF.

No processes: both ends of the channel live in the test, the relay's flush is
run by hand (``schedule``), and the supervisor's side reads until EOF.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from mproxy.audit import AuditLog
from mproxy.audit_relay import BATCH_LINES, AuditRelay, channel, relay_into
from tests.test_audit import TIMEOUT, audit_settings, lines_of, oldest_first


class Collect:
    """What the supervisor's AuditLog is to relay_into: lines, in order."""

    def __init__(self) -> None:
        self.lines: list[tuple[Any, ...]] = []

    def enqueue(self, lines: Any) -> None:
        self.lines.extend(lines)


class Relay:
    """An AuditRelay on a fresh channel, flushed by hand."""

    def __init__(self, **settings: Any) -> None:
        self.ours, theirs = channel()
        self.size = theirs.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self.scheduled: list[Any] = []
        self.relay = AuditRelay(audit_settings(file="unused.log", **settings), theirs.detach(), self.scheduled.append)

    def run_scheduled(self) -> None:
        callbacks, self.scheduled[:] = list(self.scheduled), []
        for callback in callbacks:
            callback()

    def drain(self, into: Any) -> None:
        """The supervisor's side, after the worker closed its end."""
        self.ours.settimeout(TIMEOUT)
        relay_into(into, self.ours, self.size)
        self.ours.close()


def record(relay: AuditRelay, n: int, key: bytes = b"k") -> None:
    relay.record(f"127.0.0.1:{n}", "c", "get", (key,), "hit", n)


def test_lines_of_one_loop_turn_leave_together_and_arrive_in_order() -> None:
    r = Relay()
    for n in range(5):
        record(r.relay, n)
    assert len(r.scheduled) == 1  # one flush per loop turn, however many lines
    r.run_scheduled()
    record(r.relay, 5)
    r.run_scheduled()
    r.relay.close()
    got = Collect()
    r.drain(got)
    assert [line[6] for line in got.lines] == [0, 1, 2, 3, 4, 5]
    t, client, cache, command, keys, outcome, latency, flags, exptime, nbytes = got.lines[0]
    assert (client, cache, command, keys, outcome, flags) == ("127.0.0.1:0", "c", "get", (b"k",), "hit", None)
    assert isinstance(t, float)
    assert (r.relay.lines_written, r.relay.lines_dropped) == (0, 0)


def test_a_full_batch_leaves_at_once() -> None:
    r = Relay()
    for n in range(BATCH_LINES + 1):
        record(r.relay, n)
    r.relay.close()  # sends the one left over
    got = Collect()
    r.drain(got)
    assert len(got.lines) == BATCH_LINES + 1


def test_sampling_is_the_workers() -> None:
    r = Relay(sample=3)
    for n in range(9):
        record(r.relay, n)
    r.relay.close()
    got = Collect()
    r.drain(got)
    assert [line[6] for line in got.lines] == [2, 5, 8]


def test_a_full_channel_drops_and_counts_never_blocks() -> None:
    r = Relay()
    sent = 0
    while r.relay.lines_dropped == 0:  # nobody reads the supervisor's end
        for _ in range(BATCH_LINES):
            record(r.relay, sent, key=b"x" * 200)
            sent += 1
        assert sent < 10_000_000, "the channel never filled"
    r.relay.close()
    got = Collect()
    r.drain(got)
    assert len(got.lines) + r.relay.lines_dropped == sent
    assert len(got.lines) > 0


def test_a_batch_larger_than_a_datagram_is_split_and_a_line_too_large_dropped() -> None:
    r = Relay()
    r.relay._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)  # Linux doubles it
    largest = r.relay._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - 32

    def keys(n: int, size: int) -> tuple[bytes, ...]:  # distinct keys: marshal shares equal ones
        return tuple(b"%d-%06d-" % (n, i) + b"k" * 100 for i in range(size // 110))

    for n in range(2):  # two lines, each fits alone, not together
        r.relay.record("c:1", "c", "get", keys(n, largest * 6 // 10), "miss", n)
    r.run_scheduled()
    r.relay.record("c:1", "c", "get", keys(2, largest * 2), "miss", 2)  # too large alone
    r.run_scheduled()
    assert r.relay.lines_dropped == 1
    r.relay.close()
    got = Collect()
    r.size = largest + 32
    r.drain(got)
    assert [line[6] for line in got.lines] == [0, 1]


def test_after_close_lines_are_counted_not_sent() -> None:
    r = Relay()
    r.relay.close()
    record(r.relay, 1)
    assert r.relay.enabled is False
    got = Collect()
    r.drain(got)
    assert got.lines == []


def test_reconfigure_changes_sampling_and_pauses() -> None:
    r = Relay()
    r.relay.reconfigure(audit_settings(file="unused.log", sample=2))
    assert (r.relay.enabled, r.relay.sample) == (True, 2)
    r.relay.reconfigure(audit_settings(file=""))
    assert r.relay.enabled is False
    r.relay.reopen()  # nothing to reopen in a worker
    r.relay.close()


def test_two_workers_one_file_whole_lines_rotated(tmp_path: Path) -> None:
    """The supervisor's AuditLog writes both workers' lines, whole, and rotates them."""
    path = tmp_path / "audit.log"
    log = AuditLog(audit_settings(file=str(path), max_size=3000, backup_count=100))
    relays = [Relay(), Relay()]
    for n in range(100):
        for i, r in enumerate(relays):
            r.relay.record(f"10.0.0.{i}:{n}", "c", "set", (b"key-%d" % n,), "stored", n, 0, 60, 10)
        if n % 7 == 0:
            for r in relays:
                r.run_scheduled()
    for r in relays:
        r.relay.close()
        r.drain(log)
    assert log.close(TIMEOUT) is True
    records = lines_of(*oldest_first(tmp_path / "audit.log.old"), path)
    assert len(records) == 200 and log.lines_written == 200
    assert len(oldest_first(tmp_path / "audit.log.old")) >= 2  # rotated
    for i in range(2):
        mine = [r for r in records if r["client"].startswith(f"10.0.0.{i}:")]
        assert [r["latency_us"] for r in mine] == list(range(100))
        assert all(r["keys"] == [f"key-{r['latency_us']}"] and r["bytes"] == 10 for r in mine)
    for file in (*oldest_first(tmp_path / "audit.log.old"), path):
        assert all(json.loads(line) for line in file.read_text().splitlines())


def test_a_malformed_datagram_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    ours, theirs = channel()
    theirs.send(b"\xff not marshal")
    theirs.send(b"")  # an empty datagram reads as the end
    theirs.close()
    got = Collect()
    ours.settimeout(TIMEOUT)
    relay_into(got, ours, 65536)
    ours.close()
    assert got.lines == [] and "malformed datagram" in caplog.text


def test_by_default_the_flush_runs_when_the_gevent_loop_turns() -> None:
    import gevent

    ours, theirs = channel()
    relay = AuditRelay(audit_settings(file="unused.log"), theirs.detach())
    record(relay, 1)
    record(relay, 2)
    gevent.sleep(0)  # the loop turns: the flush callback runs
    ours.settimeout(TIMEOUT)
    assert len(ours.recv(65536)) > 0
    relay.close()
    ours.close()


def test_a_relay_may_start_paused() -> None:
    """A worker restarted after a reload paused the audit log (file = "") starts paused."""
    ours, theirs = channel()
    relay = AuditRelay(audit_settings(file=""), theirs.detach(), lambda callback: None)
    assert relay.enabled is False
    relay.reconfigure(audit_settings(file="back.log", sample=4))
    assert (relay.enabled, relay.sample) == (True, 4)
    relay.close()
    ours.close()
