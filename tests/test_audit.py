"""The audit log: JSON lines, sampling, rotation, reopen, a blocked or failing disk."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable

import pytest

from mproxy import audit as audit_mod
from mproxy.audit import AuditLog, NullAudit
from mproxy.config import AuditConfig
from mproxy.stats import Stats

TIMEOUT = 30.0


def audit_settings(
    file: str = "",
    backup: str = "",
    sample: int = 1,
    max_size: int = 0,
    backup_count: int = 5,
    queue_size: int = 10000,
) -> AuditConfig:
    """``[klog]`` settings with small defaults (no rotation unless asked)."""
    return AuditConfig(
        file=file, backup=backup, sample=sample, max_size=max_size, backup_count=backup_count, queue_size=queue_size
    )


def until(cond: Callable[[], bool]) -> None:
    """Poll ``cond`` (the writer is another thread) for up to TIMEOUT seconds."""
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.001)


def lines_of(*paths: Path) -> list[dict]:
    return [json.loads(line) for p in paths if p.exists() for line in p.read_text().splitlines()]


def oldest_first(backup: Path) -> list[Path]:
    """Rotated files, oldest first: ``backup.N`` ... ``backup.1``, ``backup``."""
    numbered = sorted(backup.parent.glob(backup.name + ".*"), key=lambda p: -int(p.suffix[1:]))
    return numbered + ([backup] if backup.exists() else [])


@pytest.mark.parametrize("settings", [audit_settings(file=""), audit_settings(file="/nonexistent/audit.log", sample=0)])
def test_from_config_off(settings: AuditConfig) -> None:
    null = audit_mod.from_config(settings)
    assert isinstance(null, NullAudit)
    assert null.enabled is False
    null.record("1.2.3.4:5", "c", "get", [b"k"], "hit", 1)
    assert null.close() is True


def test_invalid_settings() -> None:
    with pytest.raises(ValueError, match="sample=0"):
        AuditLog(audit_settings(file="/nonexistent/audit.log", sample=0))


def test_lines_are_json_without_values(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = audit_mod.from_config(audit_settings(file=str(path)))
    assert isinstance(log, AuditLog) and log.enabled
    log.record("10.0.0.7:51234", "default", "get", (b"user:42", b"caf\xc3\xa9", b"bad\xff"), "hit", 840)
    log.record("10.0.0.7:51234", "default", "set", (b"user:42",), "stored", 1200, flags=3, exptime=300, nbytes=512)
    assert log.close(TIMEOUT) is True
    get, store = lines_of(path)
    assert get == {
        "ts": get["ts"],
        "client": "10.0.0.7:51234",
        "cache": "default",
        "cmd": "get",
        "keys": ["user:42", "café", "bad\\xff"],
        "outcome": "hit",
        "latency_us": 840,
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", get["ts"])
    assert list(store) == ["ts", "client", "cache", "cmd", "keys", "flags", "exptime", "bytes", "outcome", "latency_us"]
    assert (store["flags"], store["exptime"], store["bytes"]) == (3, 300, 512)
    assert (log.lines_written, log.lines_dropped) == (2, 0)


def test_rotation_keeps_every_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(audit_settings(file=str(path), max_size=2000, backup_count=100))
    for i in range(300):
        log.record("127.0.0.1:1", "default", "get", (b"key-%d" % i,), "miss", i)
    assert log.close(TIMEOUT) is True
    files = oldest_first(tmp_path / "audit.log.old") + [path]
    assert len(files) > 5
    assert all(p.stat().st_size <= 2000 for p in files)
    assert [entry["latency_us"] for entry in lines_of(*files)] == list(range(300))
    assert log.lines_written == 300


def test_rotation_keeps_backup_count_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = audit_mod.from_config(
        audit_settings(file=str(path), backup=str(tmp_path / "rotated" / "audit"), max_size=1000, backup_count=3)
    )
    (tmp_path / "rotated").mkdir()
    for i in range(300):
        log.record("127.0.0.1:1", "default", "get", (b"k",), "miss", i)
    assert log.close(TIMEOUT) is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.log", "rotated"]
    assert sorted(p.name for p in (tmp_path / "rotated").iterdir()) == ["audit", "audit.1", "audit.2"]
    kept = lines_of(*oldest_first(tmp_path / "rotated" / "audit"), path)
    assert [e["latency_us"] for e in kept] == list(range(300 - len(kept), 300))


@pytest.mark.parametrize("sample", [1, 7, 100])
def test_sampling(tmp_path: Path, sample: int) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(audit_settings(file=str(path), sample=sample))
    for i in range(1000):
        log.record("127.0.0.1:1", "default", "get", (b"k",), "hit", i)
    assert log.close(TIMEOUT) is True
    assert len(lines_of(path)) == 1000 // sample
    assert log.lines_written == 1000 // sample


def test_reconfigure(tmp_path: Path) -> None:
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    log = AuditLog(audit_settings(file=str(first)))
    log.record("127.0.0.1:1", "c", "get", (b"k",), "hit", 1)
    log.reconfigure(audit_settings(file=str(second), sample=2))
    for i in range(4):
        log.record("127.0.0.1:1", "c", "get", (b"k",), "hit", 2)
    log.reconfigure(audit_settings(file=""))
    assert log.enabled is False
    log.reconfigure(audit_settings(file=str(second), sample=0))
    assert log.enabled is False
    log.reconfigure(audit_settings(file=str(second)))
    assert log.enabled is True
    with pytest.raises(ValueError):
        log.reconfigure(audit_settings(file=str(second), queue_size=0))
    assert log.close(TIMEOUT) is True
    assert [e["latency_us"] for e in lines_of(first)] == [1]
    assert [e["latency_us"] for e in lines_of(second)] == [2, 2]


def test_reopen_after_logrotate_moved_the_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(audit_settings(file=str(path)))
    for _ in range(3):
        log.record("127.0.0.1:1", "c", "get", (b"k",), "hit", 1)
    until(lambda: log.lines_written == 3)
    path.rename(tmp_path / "audit.log.old")
    log.reopen()
    log.record("127.0.0.1:1", "c", "get", (b"k",), "hit", 2)
    assert log.close(TIMEOUT) is True
    assert [e["latency_us"] for e in lines_of(tmp_path / "audit.log.old")] == [1, 1, 1]
    assert [e["latency_us"] for e in lines_of(path)] == [2]


def test_blocked_disk_never_blocks_record(tmp_path: Path) -> None:
    """A FIFO without a reader blocks the writer thread in open(), like a hung disk."""
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    queue_size = 20
    log = AuditLog(audit_settings(file=str(fifo), queue_size=queue_size))
    start = time.perf_counter()
    for i in range(1000):
        log.record("127.0.0.1:1", "c", "get", (b"k",), "hit", i)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0  # a blocking put would never return
    # At most the queue plus the one batch the writer took before it blocked got in.
    assert log.lines_dropped >= 1000 - 2 * queue_size
    assert log.close(0.2) is False  # bounded even with the writer stuck

    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # unblocks the writer's open()
    try:
        assert log.close(TIMEOUT) is True
        data = b""
        while chunk := os.read(reader, 65536):
            data += chunk
    finally:
        os.close(reader)
    written = len(data.splitlines())
    assert written == log.lines_written
    assert written + log.lines_dropped == 1000


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_write_errors_are_counted_not_raised() -> None:
    log = AuditLog(audit_settings(file="/dev/full", max_size=100, backup_count=1))
    for i in range(50):
        log.record("127.0.0.1:1", "c", "get", (b"k",), "hit", i)
    assert log.close(TIMEOUT) is True
    assert (log.lines_written, log.lines_dropped) == (0, 50)
    assert os.path.exists("/dev/full")  # never rotated away: not a regular file


def test_stats_report_audit_counters(tmp_path: Path) -> None:
    stats = Stats()
    log = AuditLog(audit_settings(file=str(tmp_path / "audit.log"), queue_size=1))
    stats.attach_audit(log)
    for _ in range(3):
        log.record("127.0.0.1:1", "c", "get", (b"k",), "hit", 1)
    assert log.close(TIMEOUT) is True
    snap = stats.snapshot()
    assert snap["audit_lines_written"] + snap["audit_lines_dropped"] == 3
    assert snap["audit_lines_written"] == len(lines_of(tmp_path / "audit.log"))


def test_works_in_a_monkey_patched_process(tmp_path: Path) -> None:
    """In production gevent patches threading and queue: the writer must still be a real thread."""
    path = tmp_path / "audit.log"
    script = textwrap.dedent(
        f"""
        from gevent import monkey; monkey.patch_all()
        import gevent
        from mproxy.audit import AuditLog
        from mproxy.config import AuditConfig
        log = AuditLog(AuditConfig(file={str(path)!r}, max_size=4000, backup_count=50))
        def client(n):
            for i in range(100):
                log.record("127.0.0.1:%d" % n, "c", "get", (b"k",), "hit", i)
                gevent.sleep(0)
        gevent.joinall([gevent.spawn(client, n) for n in range(5)])
        assert log.close(30), "writer did not finish"
        print(log.lines_written, log.lines_dropped)
        """
    )
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=repo)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["500", "0"]
    assert len(lines_of(path, *oldest_first(tmp_path / "audit.log.old"))) == 500


def test_failed_rotation_keeps_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(audit_settings(file=str(path), max_size=500, backup_count=2, backup=str(tmp_path / "missing-dir" / "audit")))
    for i in range(50):
        log.record("127.0.0.1:1", "c", "get", (b"k",), "hit", i)
    assert log.close(TIMEOUT) is True
    assert [e["latency_us"] for e in lines_of(path)] == list(range(50))
    assert (log.lines_written, log.lines_dropped) == (50, 0)
