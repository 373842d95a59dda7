"""The limits of issue 11 seen from outside: mproxy started as a subprocess.

The open-file limit at start (defect 2), the warnings about listeners on
non-loopback addresses (defect 3).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

#: Seconds mproxy may take to start or to refuse to.
START = 30.0

MEMORY = """\
[proxy]
max_connections = {max_connections}
workers = {workers}

[admin]
host = "127.0.0.1"
port = 0

[[cache]]
cache_name = "limits"
backend = "{backend}"
host = "127.0.0.1"
port = 0
"""


def nofile(soft: int, hard: int) -> Callable[[], None]:
    """A ``preexec_fn`` giving the child these open-file limits."""

    def set_limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return set_limits


def run(tmp_path: Path, config: str, limits: Callable[[], None]) -> subprocess.Popen[bytes]:
    path = tmp_path / "limits.toml"
    path.write_text(config)
    ready = tmp_path / "ready.json"
    return subprocess.Popen(
        [sys.executable, "-m", "mproxy", "-c", str(path), "--ready-file", str(ready)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=limits,
    )


def hard_limit() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 30 if hard == resource.RLIM_INFINITY else hard


def test_max_connections_beyond_the_hard_open_file_limit_refuses_to_start(tmp_path: Path) -> None:
    proc = run(tmp_path, MEMORY.format(max_connections=1024, workers=1, backend="memory"), nofile(256, 256))
    out, _ = proc.communicate(timeout=START)
    text = out.decode()
    assert proc.returncode == 1, text
    assert "proxy.max_connections = 1024 does not fit the open-file limit" in text, text
    assert "the limit is 256 (hard limit 256)" in text and "LimitNOFILE=" in text, text
    assert "or lower proxy.max_connections to 128 or less" in text, text  # 256 - 64 admin - 64 others
    assert "Traceback" not in text


@pytest.mark.parametrize("workers", [1, 2], ids=["one process", "two workers"])
def test_the_soft_open_file_limit_is_raised_to_the_hard_one(tmp_path: Path, workers: int) -> None:
    if hard_limit() < 4096:
        pytest.skip(f"the hard open-file limit here is {hard_limit()}: the test needs 4096")
    backend = "memory" if workers == 1 else "momento"
    config = MEMORY.format(max_connections=2000, workers=workers, backend=backend)
    if workers > 1:
        config += '\n[momento]\nlocal = "embedded"\n'
    proc = run(tmp_path, config, nofile(256, 4096))
    try:
        deadline = time.monotonic() + START
        while not (tmp_path / "ready.json").exists():
            assert proc.poll() is None, proc.communicate()[0].decode()
            assert time.monotonic() < deadline, "mproxy did not start"
            time.sleep(0.05)
        pids = [proc.pid]
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        if workers > 1:
            pids += [int(pid) for pid in children.read_text().split()]
        for pid in pids:
            limits = Path(f"/proc/{pid}/limits").read_text()
            line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
            assert line.split()[3:5] == ["4096", "4096"], (pid, line)
        assert json.loads((tmp_path / "ready.json").read_text())["caches"]
    finally:
        proc.terminate()
        proc.communicate(timeout=START)


# -- defect 3: a listener reachable beyond this host is warned about ------------------------


@pytest.mark.parametrize("workers", [1, 2], ids=["one process", "two workers"])
def test_listeners_on_non_loopback_addresses_are_warned_about_once(tmp_path: Path, workers: int) -> None:
    from tests.servers import start_mproxy

    backend = "memory" if workers == 1 else "momento"
    config = MEMORY.format(max_connections=64, workers=workers, backend=backend).replace("127.0.0.1", "0.0.0.0")
    if workers > 1:
        config += '\n[momento]\nlocal = "embedded"\n'
    server = start_mproxy(config, tmp_path)
    try:
        text = server.output()
        admin = [line for line in text.splitlines() if "admin listens on 0.0.0.0:" in line]
        cache = [line for line in text.splitlines() if "cache[0] listens on 0.0.0.0:" in line]
        assert len(admin) == 1 and "WARNING" in admin[0] and "tls_verify" in admin[0], text
        assert len(cache) == 1 and "WARNING" in cache[0] and "in plaintext" in cache[0], text
    finally:
        server.stop()
    quiet = start_mproxy(MEMORY.format(max_connections=64, workers=1, backend="memory"), tmp_path)
    try:
        assert "not a loopback address" not in quiet.output()
    finally:
        quiet.stop()
