"""Operations end to end: the CLI with its admin port, audit log, signals and sd_notify."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import HOST, RawSession, ServerStartError, mproxy_with_notify, start_mproxy, talk

pytestmark = pytest.mark.e2e

DEADLINE = 20.0


def config(klog: str = "", debug: str = "", port: int = 0, admin: int = 0) -> str:
    return f"""
[admin]
host = "{HOST}"
port = {admin}

[debug]
{debug}

[klog]
{klog}

[[cache]]
host = "{HOST}"
port = {port}
cache_name = "ops"
backend = "memory"
"""


def admin_stats(admin_port: int, command: bytes = b"stats") -> dict[str, str]:
    with RawSession(admin_port) as s:
        s.send(command + b"\r\n")
        data, complete = s.recv_until_terminator(b"END\r\n")
    assert complete, data
    out = {}
    for line in data.decode().splitlines()[:-1]:
        _, name, value = line.split(" ", 2)
        out[name] = value
    return out


def wait_for(predicate, what: str, timeout: float = DEADLINE):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)  # polling interval, bounded by the deadline
    raise AssertionError(f"timed out waiting for {what}")


def test_exact_stats_after_a_scripted_workload_and_metrics(tmp_path: Path) -> None:
    server = start_mproxy(config(), tmp_path)
    port, admin = server.port, server.admin_port
    try:
        talk(port, b"set a 0 0 1\r\n1\r\nset b 0 0 1\r\n2\r\nget a b c\r\nincr a 5\r\nincr zz 1\r\n"
                   b"delete b\r\ndelete b\r\ntouch a 10\r\nbogus\r\nmn\r\n", b"MN\r\n")
        st = admin_stats(admin)
        expected = {"cmd_get": "3", "get_hits": "2", "get_misses": "1", "cmd_set": "2", "incr_hits": "1",
                    "incr_misses": "1", "delete_hits": "1", "delete_misses": "1", "cmd_touch": "1",
                    "touch_hits": "1", "protocol_errors": "1",
                    "total_connections": "1"}
        assert {k: st[k] for k in expected} == expected
        assert int(st["backend_get_p50_us"]) >= 0 and st["version"]
        per_cache = admin_stats(admin, b"stats cache")
        assert per_cache["ops:cmd_get"] == "3"
        with urllib.request.urlopen(f"http://{HOST}:{admin}/metrics", timeout=10) as resp:
            body = resp.read().decode()
        families = {f.name: f for f in text_string_to_metric_families(body)}
        gets = [s for s in families["mproxy_cmd_get"].samples if s.name == "mproxy_cmd_get_total"]
        assert gets[0].labels == {"cache": "ops"} and gets[0].value == 3
        assert talk(admin, b"stats reset\r\n", b"RESET\r\n") == b"RESET\r\n"
        assert admin_stats(admin)["cmd_get"] == "0"
        assert talk(admin, b"bogus\r\nversion\r\n", b"\r\nVERSION 0.1.0\r\n").startswith(b"ERROR\r\n")
    finally:
        server.stop()


def test_audit_log_one_json_line_per_command_without_values(tmp_path: Path) -> None:
    audit = tmp_path / "audit.log"
    server = start_mproxy(config(klog=f'file = "{audit}"\nsample = 1'), tmp_path)
    port, admin = server.port, server.admin_port
    try:
        secret = b"s3cr3t-value"
        talk(port, b"set k1 7 60 12\r\n" + secret + b"\r\nget k1 k2\r\ndelete k1\r\nmn\r\n", b"MN\r\n")
        lines = wait_for(lambda: [ln for ln in audit.read_text().splitlines()] if audit.exists()
                         and len(audit.read_text().splitlines()) >= 4 else None, "audit lines")
        records = [json.loads(line) for line in lines]
        assert [r["cmd"] for r in records] == ["set", "get", "delete", "mn"]
        assert records[0]["keys"] == ["k1"] and records[0]["flags"] == 7 and records[0]["exptime"] == 60
        assert records[0]["bytes"] == 12 and records[0]["outcome"] == "stored"
        assert records[1]["outcome"] == "partial" and records[2]["outcome"] == "deleted"
        assert all(r["ts"].endswith("Z") and isinstance(r["latency_us"], int) for r in records)
        assert secret.decode() not in audit.read_text()
        # SIGUSR1 reopens the file: an external logrotate moved it away
        audit.rename(tmp_path / "audit.log.rotated")
        server.process.send_signal(signal.SIGUSR1)

        def reopened() -> bool:  # the signal is asynchronous: keep writing until a line lands anew
            talk(port, b"get again\r\n", b"END\r\n")
            return audit.exists() and "again" in audit.read_text()

        wait_for(reopened, "audit line in the reopened file")
        assert int(admin_stats(admin)["audit_lines_written"]) >= 5
    finally:
        server.stop()


def test_sighup_reloads_log_level_and_keeps_serving(tmp_path: Path) -> None:
    text = config(debug='log_level = "info"')
    server = start_mproxy(text, tmp_path)
    port = server.port
    try:
        cfg = server.config_path
        assert cfg is not None
        cfg.write_text(text.replace('log_level = "info"', 'log_level = "debug"'))
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in server.output(), "reload log line")
        cfg.write_text("this is [not toml")
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in server.output(), "refused reload")
        assert talk(port, b"version\r\n", b"\r\n").startswith(b"VERSION")
    finally:
        server.stop()


def test_sd_notify_ready_after_bind_and_stopping_on_sigterm(tmp_path: Path) -> None:
    with mproxy_with_notify(config(), tmp_path, DEADLINE) as (proc, sock, ready_file):
        assert sock.recv(4096) == b"READY=1"
        port = json.loads(ready_file.read_text())["caches"][0]["port"]  # written before READY
        with socket.create_connection((HOST, port), timeout=10):  # bound before READY was sent
            pass
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096) == b"STOPPING=1"
        assert proc.wait(timeout=DEADLINE) == 0


@pytest.mark.skipif(not Path("/usr/bin/systemd-analyze").exists(), reason="systemd-analyze not installed")
def test_unit_file_is_valid() -> None:
    unit = Path(__file__).resolve().parent.parent / "scripts" / "mproxy.service"
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [ln for ln in proc.stderr.splitlines() if "/usr/local/bin/mproxy" not in ln and ln.strip()]
    assert not problems, proc.stderr


def test_socket_activation_serves_on_the_sockets_systemd_passes(tmp_path: Path) -> None:
    """Sockets passed as systemd does (LISTEN_FDS, LISTEN_PID, fds from 3) go to the
    listener declaring the same address, in whatever order they come."""
    listening = []
    for _ in range(2):
        sock = socket.socket()
        sock.bind((HOST, 0))
        sock.listen()
        listening.append(sock)
    admin_sock, cache_sock = listening  # not the config's order: matched by address
    port, admin = cache_sock.getsockname()[1], admin_sock.getsockname()[1]
    try:
        server = start_mproxy(config(port=port, admin=admin), tmp_path, systemd_sockets=(admin_sock, cache_sock))
    finally:
        for sock in listening:  # only mproxy holds them now (it could not bind these ports itself)
            sock.close()
    try:
        assert (server.port, server.admin_port) == (port, admin)
        assert talk(port, b"version\r\n", b"\r\n").startswith(b"VERSION ")
        assert admin_stats(admin)["curr_connections"] == "0"
        assert "socket activation: 2 listening sockets from systemd" in server.output()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=DEADLINE) == 0
    finally:
        server.stop()


def test_socket_activation_refuses_a_socket_no_listener_declares(tmp_path: Path) -> None:
    stray = socket.socket()
    stray.bind((HOST, 0))
    stray.listen()
    where = f"{HOST}:{stray.getsockname()[1]}"
    with stray, pytest.raises(ServerStartError, match="exited with status 1") as failed:
        start_mproxy(config(), tmp_path, systemd_sockets=(stray,))
    assert f"no [[cache]] or [admin] declares: {where}" in str(failed.value)
