"""Start and stop real servers for integration tests, and talk raw bytes to them.

* :func:`start_memcached` runs the real ``memcached`` binary (the reference).
* :func:`start_mproxy` runs ``python -m mproxy -c CONFIG`` as a subprocess, its
  ports picked by mproxy (``port = 0``) and read from its ``--ready-file``.
* :func:`start_local_momento` runs the bundled Momento-compatible server.
* :class:`RawSession` is a blocking socket wrapper that sends bytes and reads
  replies until a caller-given condition, the peer closing, or a deadline.

Every server is a :class:`Server`; ``stop()`` is idempotent, terminates with
SIGTERM and kills after a bound, so a test never leaves a process behind.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from mproxy.backends.momento.embedded import read_ports
from mproxy.momento_local.control import control_request

HOST = "127.0.0.1"
#: How long a server may take to accept its first connection.
START_TIMEOUT = 20.0
#: How long a server may take to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 5.0
#: Default bound for one read in :class:`RawSession`.
READ_TIMEOUT = 10.0


class FakeClock:
    """A settable clock for code that takes ``clock=``: ``clock.now += 5`` advances time."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ServerStartError(RuntimeError):
    """A server process exited or did not accept connections in time."""


def free_port() -> int:
    """Return a TCP port on the loopback interface that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def memcached_binary() -> str | None:
    """Path of the ``memcached`` executable, or ``None`` when it is not installed."""
    return shutil.which("memcached")


@dataclass
class Server:
    """A server subprocess listening on ``HOST:port``.

    For mproxy, ``port`` is its first ``[[cache]]`` listener, ``ports`` maps
    every cache name to its port, and ``config_path`` is the file it runs.
    """

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] = field(repr=False)
    admin_port: int = 0
    ports: dict[str, int] = field(default_factory=dict)
    config_path: Path | None = None

    def stop(self) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after ``STOP_TIMEOUT``)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)
        self._log.close()

    def output(self) -> str:
        """The process's combined stdout/stderr so far (for error messages)."""
        return self.log_path.read_text(errors="replace")


def _spawn(
    name: str, argv: list[str], log_path: Path, ready: Callable[[Server], bool], pass_fds: tuple[int, ...] = ()
) -> Server:
    """Start ``argv`` with output to ``log_path``; return once ``ready(server)`` holds.

    Raises :class:`ServerStartError` (with the output) when the process exits
    first or ``START_TIMEOUT`` passes."""
    log = log_path.open("wb")
    try:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, pass_fds=pass_fds
        )
    except BaseException:
        log.close()
        raise
    server = Server(name=name, port=0, process=process, log_path=log_path, _log=log)
    deadline = time.monotonic() + START_TIMEOUT
    while not ready(server):
        if process.poll() is not None:
            server.stop()
            raise ServerStartError(
                f"{name} exited with status {process.returncode} before it was ready; "
                f"command {argv!r}; output:\n{server.output()}"
            )
        if time.monotonic() > deadline:
            server.stop()
            raise ServerStartError(
                f"{name} was not ready within {START_TIMEOUT} s; command {argv!r}; output:\n{server.output()}"
            )
        time.sleep(0.02)  # polling interval while the server starts
    return server


def _accepts(port: int) -> Callable[[Server], bool]:
    def ready(server: Server) -> bool:
        try:
            socket.create_connection((HOST, port), timeout=1.0).close()
        except OSError:
            return False
        server.port = port
        return True

    return ready


def start_memcached(log_dir: Path, extra_args: tuple[str, ...] = ()) -> Server:
    """Run the real memcached on a free loopback port (TCP only, one thread).

    memcached cannot report a port it picked, so this one comes from
    :func:`free_port`. Raises :class:`FileNotFoundError` when the binary is
    missing: the caller decides whether that is a skip or a failure (see
    ``conftest.py``).
    """
    binary = memcached_binary()
    if binary is None:
        raise FileNotFoundError("memcached binary not found on PATH")
    port = free_port()
    argv = [binary, "-l", HOST, "-p", str(port), "-U", "0", "-t", "1", *extra_args]
    if os.geteuid() == 0:
        argv += ["-u", "root"]  # memcached refuses to run as root without -u
    return _spawn("memcached", argv, log_dir / f"memcached-{port}.log", _accepts(port))


#: Numbers the config, ready and log files of the mproxy processes of one test.
_mproxy_count = itertools.count(1)

#: What systemd does between fork and exec for socket activation, as a ``python -c``
#: script: the sockets (fds in argv[1]) become fds 3, 4, ..., ``LISTEN_FDS`` counts them,
#: ``LISTEN_PID`` is this process, which then execs mproxy (same pid) with argv[2:].
_SOCKET_ACTIVATION = """\
import fcntl, os, sys
fds = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 100) for fd in sys.argv[1].split(",")]  # out of the way
for n, fd in enumerate(fds):
    os.dup2(fd, 3 + n)
os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_PID=str(os.getpid()))
os.execv(sys.executable, [sys.executable, "-m", "mproxy", *sys.argv[2:]])
"""


def start_mproxy(
    config_text: str,
    tmp_path: Path,
    extra_args: tuple[str, ...] = (),
    systemd_sockets: tuple[socket.socket, ...] = (),
) -> Server:
    """Run ``python -m mproxy -c CONFIG`` with ``config_text`` as the TOML config.

    Give the listeners ``port = 0``: mproxy binds free ports itself and writes
    them to its ``--ready-file`` once every listener is up; this returns when
    that file is there, with the ports in the :class:`Server`.
    ``systemd_sockets`` are passed the way systemd's socket activation does.
    """
    n = next(_mproxy_count)
    config_path = tmp_path / f"mproxy-{n}.toml"
    config_path.write_text(config_text)
    ready_path = tmp_path / f"mproxy-{n}.ready.json"

    def ready(server: Server) -> bool:
        if not ready_path.exists():
            return False
        report = json.loads(ready_path.read_text())
        server.ports = {cache["name"]: cache["port"] for cache in report["caches"]}
        server.port = report["caches"][0]["port"]
        server.admin_port = report["admin"]["port"]
        server.config_path = config_path
        return True

    args = ["-c", str(config_path), "--ready-file", str(ready_path), *extra_args]
    fds = tuple(sock.fileno() for sock in systemd_sockets)
    if fds:
        argv = [sys.executable, "-c", _SOCKET_ACTIVATION, ",".join(map(str, fds)), *args]
    else:
        argv = [sys.executable, "-m", "mproxy", *args]
    return _spawn("mproxy", argv, tmp_path / f"mproxy-{n}.log", ready, pass_fds=fds)


@contextmanager
def mproxy_with_notify(
    config_text: str, tmp_path: Path, timeout: float = START_TIMEOUT
) -> Iterator[tuple[subprocess.Popen[bytes], socket.socket, Path]]:
    """Run mproxy as systemd would for a ``Type=notify`` unit: ``$NOTIFY_SOCKET`` is a datagram
    socket bound here. Yields the process, that socket (``recv`` bounded by ``timeout``) and
    the path of its ``--ready-file``; kills the process at the end if it still runs."""
    config = tmp_path / "notify.toml"
    config.write_text(config_text)
    ready_file = tmp_path / "ready.json"
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify_path))
        sock.settimeout(timeout)
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
        argv = [sys.executable, "-m", "mproxy", "-c", str(config), "--ready-file", str(ready_file)]
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            yield proc, sock, ready_file
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


class RawSession:
    """A blocking TCP connection for byte-exact protocol conversations.

    ``connect`` makes the socket: ``gevent.socket.create_connection`` gives a
    cooperative one, to talk to a server running in the test's own process.
    """

    def __init__(
        self, port: int, host: str = HOST, connect: Callable[..., socket.socket] = socket.create_connection
    ) -> None:
        self.sock = connect((host, port), timeout=READ_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        #: True once the peer closed (EOF or reset) the connection.
        self.closed_by_peer = False

    def __enter__(self) -> RawSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close our end (idempotent)."""
        self.sock.close()

    def send(self, data: bytes) -> bool:
        """Send all of ``data``; return False if the peer has closed the connection."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            self.closed_by_peer = True
            return False
        return True

    def _recv_some(self, deadline: float) -> bytes | None:
        """One ``recv`` bounded by ``deadline``: data, ``b""`` on EOF, None on timeout."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return None
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.closed_by_peer = True
        return chunk

    def recv_until(
        self, done: Callable[[bytes], bool], timeout: float = READ_TIMEOUT
    ) -> tuple[bytes, bool]:
        """Read until ``done(buffer)`` holds, the peer closes, or ``timeout`` passes.

        Returns ``(buffer, complete)``; ``complete`` is True only if ``done`` held.
        """
        deadline = time.monotonic() + timeout
        buffer = b""
        while not done(buffer):
            chunk = self._recv_some(deadline)
            if not chunk:
                return buffer, False
            buffer += chunk
        return buffer, True

    def recv_until_terminator(
        self, terminator: bytes, timeout: float = READ_TIMEOUT
    ) -> tuple[bytes, bool]:
        """Read until the buffer ends with ``terminator`` (see :meth:`recv_until`)."""
        return self.recv_until(lambda buf: buf.endswith(terminator), timeout)

    def recv_until_closed(self, timeout: float = READ_TIMEOUT) -> tuple[bytes, bool]:
        """Read until the peer closes; ``complete`` is False if it stayed open."""
        deadline = time.monotonic() + timeout
        buffer = b""
        while True:
            chunk = self._recv_some(deadline)
            if chunk is None:
                return buffer, False
            if not chunk:
                return buffer, True
            buffer += chunk

    def recv_until_quiet(self, quiet: float = 0.2, timeout: float = READ_TIMEOUT) -> bytes:
        """Read until nothing arrives for ``quiet`` seconds, the peer closes, or ``timeout``."""
        deadline = time.monotonic() + timeout
        buffer = b""
        while True:
            chunk = self._recv_some(min(deadline, time.monotonic() + quiet))
            if not chunk:
                return buffer
            buffer += chunk


def talk(
    port: int, data: bytes, terminator: bytes, connect: Callable[..., socket.socket] = socket.create_connection
) -> bytes:
    """One exchange on a new connection: send ``data``, read until the reply ends with ``terminator``."""
    with RawSession(port, connect=connect) as s:
        s.send(data)
        got, complete = s.recv_until_terminator(terminator)
    assert complete, got
    return got


@dataclass
class LocalMomento:
    """A running ``mproxy.momento_local`` child: gRPC port, control port, process."""

    port: int
    control_port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def control(self, command: str) -> str:
        return control_request(HOST, self.control_port, command)

    def kill(self) -> None:
        """SIGKILL and reap (idempotent)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def stop(self) -> None:
        """SIGTERM, SIGKILL after 5 s (idempotent)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


def start_local_momento(
    tmp_path: Path, cache: str, port: int = 0, faults: tuple[str, ...] = (), workers: int | None = None
) -> LocalMomento:
    """Start the bundled local server (``--cache cache``) and wait for its listening line.

    ``port`` 0 lets the server pick (it reports it); a fixed port is used to
    restart a server where a proxy expects it. ``workers``: calls served at once
    (``--workers``; None: the server's default). A call asleep in a fault's delay
    gives its place up, so delays do not hold other calls back.
    """
    argv = [
        sys.executable, "-m", "mproxy.momento_local", "--host", HOST, "--port", str(port),
        "--control-port", "0", "--cache", cache,
    ]
    if workers is not None:
        argv += ["--workers", str(workers)]
    for spec in faults:
        argv += ["--fault", spec]
    log_path = tmp_path / f"momento-local-{port}-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
    try:
        server = LocalMomento(*read_ports(process, START_TIMEOUT), process, log_path)
    except BaseException:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
        raise
    assert port in (0, server.port)
    return server
