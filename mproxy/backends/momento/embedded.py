"""The bundled local Momento server as a child process (``[momento] local = "embedded"``).

One child per proxy process, shared by every backend that uses it: the first
:func:`acquire` starts it, the last :func:`release` stops it, and an
``atexit`` hook stops it if backends were never closed. The child is a fresh
interpreter (``python -m mproxy.momento_local``), so it never inherits the
parent's gevent monkey-patching (a gRPC server does not work under gevent).

The child is told to die with its parent (Linux ``PR_SET_PDEATHSIG``), so a
killed proxy does not leave a server behind. That signal fires when the
*thread* that started the child exits: start it from the main thread (under
gevent every greenlet is on the main thread).

Stdlib only; works with or without gevent patching (``select`` and
``subprocess`` are cooperative when patched).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import mproxy

#: How long the child may take to print its listening line.
START_TIMEOUT_SECONDS = 20.0
#: How long the child gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT_SECONDS = 5.0
#: Loopback only: the embedded server has no authentication.
HOST = "127.0.0.1"

_LISTENING = re.compile(rb"listening on (\S+):(\d+) control (\S+):(\d+)")
#: Linux ``prctl`` option number of ``PR_SET_PDEATHSIG``.
_PR_SET_PDEATHSIG = 1


class EmbeddedServerError(RuntimeError):
    """The embedded server could not be started; the message says why."""


@dataclass(frozen=True)
class EmbeddedServer:
    """A running child: its gRPC port, its fault/stats control port and process."""

    host: str
    port: int
    control_port: int
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT_SECONDS`. Idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
        if self.process.stdout is not None:
            self.process.stdout.close()


_lock = threading.Lock()
_server: EmbeddedServer | None = None
_users = 0


def acquire() -> EmbeddedServer:
    """The shared embedded server, started on first use (or if it died)."""
    global _server, _users
    with _lock:
        if _server is None or _server.process.poll() is not None:
            if _server is not None:
                _server.stop()
            _server = _start()
        _users += 1
        return _server


def release() -> None:
    """One user fewer; the last one stops the server."""
    global _server, _users
    with _lock:
        _users = max(0, _users - 1)
        if _users == 0 and _server is not None:
            server, _server = _server, None
            server.stop()


@atexit.register
def _stop_at_exit() -> None:
    global _server, _users
    with _lock:
        if _server is not None:
            server, _server, _users = _server, None, 0
            server.stop()


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when its parent dies.

    ``prctl`` is looked up here, in the parent: between fork and exec the
    child only calls it (no dynamic loading, whose locks another thread of
    the parent may have held at fork time).
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return hook


def _start() -> EmbeddedServer:
    argv = [sys.executable, "-m", "mproxy.momento_local", "--host", HOST, "--port", "0", "--control-port", "0"]
    env = dict(os.environ)
    # The child must import this very mproxy, installed or not.
    root = os.path.dirname(os.path.dirname(os.path.abspath(mproxy.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
            start_new_session=True,  # terminal signals go to the proxy, which stops the child
            preexec_fn=_die_with_parent_hook(),
        )
    except OSError as exc:
        raise EmbeddedServerError(
            f"cannot start the embedded Momento server ({argv[0]} -m mproxy.momento_local): {exc}"
        ) from exc
    try:
        port, control_port = read_ports(process, START_TIMEOUT_SECONDS)
    except BaseException:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
        raise
    return EmbeddedServer(HOST, port, control_port, process)


def read_ports(process: subprocess.Popen[bytes], timeout: float) -> tuple[int, int]:
    """The data and control ports a ``mproxy.momento_local`` child reports on the
    first line of its stdout (``... listening on H:P control H:C``), read within
    ``timeout`` seconds. Raises :class:`EmbeddedServerError`."""
    line = _read_line(process, timeout)
    match = _LISTENING.search(line)
    if match is None:
        raise EmbeddedServerError(f"the local Momento server printed an unexpected first line: {line[:200]!r}")
    return int(match.group(2)), int(match.group(4))


def _read_line(process: subprocess.Popen[bytes], timeout: float) -> bytes:
    """The child's first stdout line, read within ``timeout`` seconds."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    buffer = b""
    while b"\n" not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise EmbeddedServerError(f"the embedded Momento server did not report its port within {timeout:g} s")
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            continue
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            continue
        if not chunk:
            status = process.wait(timeout=STOP_TIMEOUT_SECONDS)
            raise EmbeddedServerError(
                f"the embedded Momento server exited with status {status} before reporting its port "
                "(see its messages on stderr)"
            )
        buffer += chunk
    return buffer.split(b"\n", 1)[0]
