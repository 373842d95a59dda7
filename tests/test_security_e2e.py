"""The whole process keeps secrets: ``python -m mproxy`` run with a recognisable fake
API key, every output searched for it; values never in a log.

The key is a well-formed v1 key (base64 JSON naming an endpoint that does not
resolve, ``.invalid``), so mproxy starts, sends it to no one, and answers
``SERVER_ERROR``. It is searched for whole, and by the pieces the SDK's own
``CredentialProvider.__repr__`` shows (its first and last 10 characters), in:
the process log at debug level (mproxy's loggers and the SDK's ``momentosdk``),
the audit log, replies (``SERVER_ERROR`` texts included), ``stats`` (data and
admin port), ``/metrics``, ``--check-config`` and start errors.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.servers import HOST, RawSession, Server, start_mproxy

pytestmark = pytest.mark.e2e

#: The token inside the fake key: what the SDK would send as ``authorization``.
TOKEN = "MPROXY-HEAD-0b9e7c51d2a84f36-SECRET-MIDDLE-9a1f4e7d2c6b8035-MPROXY-TAIL"
#: The fake v1 key, as MOMENTO_API_KEY holds it (base64 JSON: it starts "eyJ").
FAKE_KEY = base64.b64encode(json.dumps({"endpoint": "mproxy-test.invalid", "api_key": TOKEN}).encode()).decode()
#: Every piece that must not show: the key, the token, and what the SDK's repr shows of them.
PIECES = (FAKE_KEY, TOKEN, "SECRET-MIDDLE", TOKEN[:10], TOKEN[-10:], FAKE_KEY[:10], FAKE_KEY[-10:])
#: A value no log may hold.
VALUE = b"VALUE-MARKER-5e2d9c0a7b"


def leaks(text: str | bytes) -> list[str]:
    """The :data:`PIECES` found in ``text``."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return [piece for piece in PIECES if piece in text]


def config(workers: int, audit: Path, extra_momento: str = "", backend: str = "momento") -> str:
    """The Momento service with the key from the environment (or ``backend = "memory"``)."""
    return f"""
[proxy]
workers = {workers}

[admin]
host = "{HOST}"
port = 0

[[cache]]
host = "{HOST}"
port = 0
cache_name = "secrets"
backend = "{backend}"
request_timeout = 1.0

[klog]
file = "{audit}"

[momento]
api_key_env = "MOMENTO_API_KEY"
{extra_momento}
"""


def exchange(port: int, data: bytes, last: bytes) -> bytes:
    """Send ``data``, read until a whole line that starts with ``last``."""
    with RawSession(port) as s:
        s.send(data)
        got, complete = s.recv_until(lambda buf: buf.endswith(b"\r\n") and buf[:-2].rsplit(b"\r\n", 1)[-1].startswith(last))
    assert complete, got
    return got


def admin(port: int, command: bytes) -> bytes:
    return exchange(port, command + b"\r\n", b"END")


@pytest.mark.parametrize("workers", [1, 2])
def test_the_api_key_is_in_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    monkeypatch.setenv("MOMENTO_API_KEY", FAKE_KEY)
    audit = tmp_path / "audit.log"
    # the key typed into the file too, under a key mproxy does not know (so it starts)
    text = config(workers, audit, f'api_key = "{FAKE_KEY}"')
    server: Server = start_mproxy(text, tmp_path, extra_args=("--log-level", "debug"))
    outputs: dict[str, bytes | str] = {}
    try:
        outputs["replies"] = exchange(
            server.port,
            b"set k 0 0 %d\r\n%s\r\nget k\r\ndelete k\r\nincr n 1\r\nbogus\r\nversion\r\n" % (len(VALUE), VALUE),
            b"VERSION ",
        )
        assert outputs["replies"].count(b"SERVER_ERROR") == 4, outputs["replies"]
        outputs["data stats"] = exchange(server.port, b"stats\r\n", b"END")
        for command in (b"stats", b"stats cache", b"stats workers"):
            outputs[command.decode()] = admin(server.admin_port, command)
        with urllib.request.urlopen(f"http://{HOST}:{server.admin_port}/metrics", timeout=10) as page:
            outputs["/metrics"] = page.read()
        assert server.config_path is not None
        check = subprocess.run(
            [sys.executable, "-m", "mproxy", "-c", str(server.config_path), "--check-config"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        outputs["--check-config"] = check.stdout + check.stderr
        assert "looks like a Momento API key (momento.api_key)" in check.stderr  # the file is mode 0644
        server.process.send_signal(signal.SIGHUP)  # a reload logs the file's warnings again
        exchange(server.port, b"version\r\n", b"VERSION ")
    finally:
        server.stop()
    outputs["process log"] = server.output()
    outputs["audit log"] = audit.read_bytes()
    assert b'"cmd": "set"' in outputs["audit log"] and b'"keys": ["k"]' in outputs["audit log"]
    assert " DEBUG " in outputs["process log"] and " momentosdk: " in outputs["process log"]  # the SDK's lines too
    assert {where: leaks(text) for where, text in outputs.items() if leaks(text)} == {}
    assert VALUE.decode() not in outputs["process log"] and VALUE not in outputs["audit log"]


@pytest.mark.parametrize(
    ("momento", "expected"),
    [
        (
            f'api_key_env = "{FAKE_KEY}"',
            "momento.api_key_env = <what looks like a Momento API key, not shown>: expected an environment "
            "variable name (letters, digits, _); the key belongs in the environment (the variable [momento] "
            "api_key_env names), never in the file",
        ),
        (
            f'endpoint = "{FAKE_KEY}"',
            "momento.endpoint = <what looks like a Momento API key, not shown>: expected a string; the key "
            "belongs in the environment (the variable [momento] api_key_env names), never in the file",
        ),
    ],
)
def test_a_key_typed_into_a_known_key_of_the_file_stops_the_start_unshown(tmp_path: Path, momento: str, expected: str) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(config(1, tmp_path / "audit.log").replace('api_key_env = "MOMENTO_API_KEY"', momento))
    for extra in (["--check-config"], []):
        done = subprocess.run(
            [sys.executable, "-m", "mproxy", "-c", str(path), *extra], capture_output=True, text=True, timeout=60
        )
        assert (done.returncode, done.stdout, done.stderr) == (2, "", f"mproxy: {path}: {expected}\n")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_garbage_key_fails_the_start_naming_the_variable_not_the_key(tmp_path: Path, workers: int) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(config(workers, tmp_path / "audit.log"))
    env = dict(os.environ, MOMENTO_API_KEY=TOKEN)  # the token alone: not a Momento key
    done = subprocess.run(
        [sys.executable, "-m", "mproxy", "-c", str(path), "--log-level", "debug"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 1
    assert "MOMENTO_API_KEY does not hold a Momento API key (neither a v1 key nor a legacy token)" in done.stderr
    assert leaks(done.stdout + done.stderr) == []


def test_values_are_in_no_log_and_keys_only_in_the_audit_log(tmp_path: Path) -> None:
    audit = tmp_path / "audit.log"
    server = start_mproxy(config(1, audit, backend="memory"), tmp_path, extra_args=("--log-level", "debug"))
    try:
        pipeline = (
            b"set k 7 0 %d\r\n%s\r\nget k\r\nappend k 0 0 %d\r\n%s\r\ngets k\r\n" % (len(VALUE), VALUE, len(VALUE), VALUE)
            + b"set bad 0 0 2\r\n%s\r\n" % VALUE  # a data block longer than announced: bad data chunk
        )
        replies = exchange(server.port, pipeline + b"version\r\n", b"VERSION ")
        assert VALUE in replies and b"CLIENT_ERROR bad data chunk" in replies
        with RawSession(server.port) as s:  # a value cut short by a closed connection
            s.send(b"set cut 0 0 100\r\n%s" % VALUE)
    finally:
        server.stop()
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert {"k"} <= {key for line in lines for key in line.get("keys", [])}
    assert VALUE not in audit.read_bytes()
    assert VALUE.decode() not in server.output()
