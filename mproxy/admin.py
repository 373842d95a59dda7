"""The admin port: memcached-style ``stats`` for operators, ``GET /metrics`` for scrapers.

Text protocol (lines end with ``\\n`` or ``\\r\\n``)::

    stats          STAT <name> <value> lines, then END   (Stats.snapshot)
    stats cache    STAT <cache>:<name> <value> lines, END (Stats.cache_snapshot)
    stats workers  STAT <worker>:<name> <value> lines, END: each worker process's own
                   stats, workers numbered from 1 (one process is worker 1)
    stats migration STAT <cache>:<name> <value> lines, END: the caches migrating from
                   legacy memcached servers, reads by who answered them over the last
                   1, 5 and 15 minutes (Stats.migration_snapshot, docs/migration.md)
    stats reset    RESET; with ``[admin] allow_reset = false``
                   CLIENT_ERROR stats reset not allowed
    version        VERSION <version>
    quit           closes the connection
    anything else  ERROR (an empty line too, as memcached); the connection stays

The port has limits of its own (``[admin]``), apart from the data ports', so that
clients cannot lock operators out: ``max_connections`` at once (one more is
answered ``ERROR Too many open connections`` and closed); ``idle_timeout``
seconds in which nothing arrives close a connection, and so does a command line
not complete ``command_timeout`` seconds after its first byte (an HTTP request:
its line and headers), so that bytes trickled one at a time cannot hold it. A
line longer than :data:`MAX_LINE` bytes closes it too. If the
first line of a connection is an HTTP/1.x request line, the connection is
HTTP instead: ``GET /metrics`` answers the Prometheus text format
(:func:`mproxy.stats.prometheus_text`), other paths 404, other methods 405,
then the connection closes. So a scraper needs no second port. With
``[admin] tls`` on, both are served over TLS (HTTPS for ``/metrics``), the
handshake first (:mod:`mproxy.handshake`).

What the port shows comes from a :class:`StatsSource`: one process's
:class:`~mproxy.stats.Stats`, or with several workers the supervisor's view
that sums theirs (:mod:`mproxy.workers`).
"""

from __future__ import annotations

import re
import socket
from time import monotonic
from typing import TYPE_CHECKING, Protocol

from gevent.pool import Pool

from mproxy.config import DEFAULT_BACKLOG, AdminConfig
from mproxy.protocol import replies
from mproxy.server import ExhaustedLog, bound_address, listening_server, refuse

if TYPE_CHECKING:
    from mproxy.handshake import ListenerTls


class StatsSource(Protocol):
    """What the admin port reads (:class:`mproxy.stats.Stats` is one)."""

    def snapshot(self) -> dict[str, int | str | float]: ...

    def cache_snapshot(self) -> dict[str, int]: ...

    def workers_snapshot(self) -> dict[str, int | str | float]: ...

    def migration_snapshot(self) -> dict[str, int | str]: ...

    def reset(self) -> None: ...

    def prometheus(self) -> str: ...


#: Longest command or HTTP header line, in bytes, without its line end (memcached's key
#: line limit is 2048 too).
MAX_LINE = 2048
#: Most header lines read from an HTTP request.
MAX_HEADERS = 64
#: Bytes asked of one recv.
RECV_SIZE = 4096

HTTP_REQUEST_LINE = re.compile(rb"([A-Z]+) (\S+) HTTP/1\.[01]")
METRICS_PATH = b"/metrics"
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _LineReader:
    """Lines from a socket, with a bounded buffer and the port's two timeouts: ``idle``
    seconds for a line's first byte, ``command`` seconds from it to the line's end (or,
    once :attr:`deadline` is set, to that time: an HTTP request's whole head).
    Raises ``socket.timeout`` past either."""

    def __init__(self, sock: socket.socket, idle: float, command: float) -> None:
        self.sock = sock
        self.idle = idle
        self.command = command
        self.buf = b""
        #: when the first of the buffered bytes arrived (None: nothing buffered)
        self.since: float | None = None
        #: a deadline for every line from now on (monotonic), or None
        self.deadline: float | None = None

    def readline(self) -> bytes | None:
        """The next line without ``\\r\\n``/``\\n``; None at EOF or when a line exceeds MAX_LINE."""
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line, self.buf = self.buf[:end], self.buf[end + 1 :]
                self.since = monotonic() if self.buf else None  # what follows began by now
                if line.endswith(b"\r"):
                    line = line[:-1]
                return line if len(line) <= MAX_LINE else None
            if len(self.buf) > MAX_LINE + 1:  # +1: a line of MAX_LINE may wait for "\n" after "\r"
                return None
            deadline = self.deadline
            if deadline is None and self.since is not None:
                deadline = self.since + self.command
            if deadline is None:
                self.sock.settimeout(self.idle)
            else:
                left = deadline - monotonic()
                if left <= 0:
                    raise socket.timeout("command line not complete within [admin] command_timeout")
                self.sock.settimeout(min(left, self.idle))
            data = self.sock.recv(RECV_SIZE)
            if not data:
                return None
            if self.since is None:
                self.since = monotonic()
            self.buf += data


def http_response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8", extra: str = "") -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    head = (
        f"HTTP/1.1 {status}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{extra}"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class AdminServer:
    """The admin listener: one greenlet per connection, at most ``settings.max_connections`` at once."""

    def __init__(
        self,
        listener: tuple[str, int] | socket.socket,
        stats: StatsSource,
        version: str,
        settings: AdminConfig = AdminConfig(),
        tls: ListenerTls | None = None,
        backlog: int = DEFAULT_BACKLOG,
    ) -> None:
        self.stats = stats
        self.version = version
        #: the ``[admin]`` table; a reload replaces it (``allow_reset`` applies at once, the
        #: connection cap only after a restart)
        self.settings = settings
        self.max_connections = settings.max_connections
        self.active = 0
        handle = self._handle if tls is None else tls.serve(self._handle)
        # unbounded: the cap is max_connections, answered as memcached answers its -c
        self._server = listening_server(listener, handle, Pool(), backlog, ExhaustedLog("admin", None))

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): the real port once started on port 0."""
        return bound_address(self._server)

    def start(self) -> None:
        """Bind (unless given a socket) and start accepting."""
        self._server.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop accepting, then close the open admin connections after at most ``timeout`` seconds."""
        self._server.stop(timeout)

    def _handle(self, sock: socket.socket, address: object) -> None:
        if self.active >= self.max_connections:
            refuse(sock)
            return
        self.active += 1
        settings = self.settings
        reader = _LineReader(sock, settings.idle_timeout, settings.command_timeout)
        try:
            line = reader.readline()
            request = HTTP_REQUEST_LINE.fullmatch(line) if line is not None else None
            if request is not None:
                reader.deadline = (reader.since or monotonic()) + settings.command_timeout
                self._http(sock, reader, request.group(1), request.group(2))
                return
            while line is not None:
                reply = self._command(line)
                if reply is None:
                    return
                sock.settimeout(settings.idle_timeout)  # a reply left unread that long closes too
                sock.sendall(reply)
                line = reader.readline()
        except OSError:
            return  # the client went away, or was silent or slow past a timeout
        finally:
            self.active -= 1
            sock.close()

    def _command(self, line: bytes) -> bytes | None:
        """The reply to one command line; None for ``quit``."""
        tokens = line.split()
        if tokens == [b"stats"]:
            return replies.stats(self.stats.snapshot())
        if tokens == [b"stats", b"reset"]:
            if not self.settings.allow_reset:
                return replies.RESET_NOT_ALLOWED
            self.stats.reset()
            return replies.RESET
        if tokens == [b"stats", b"cache"]:
            return replies.stats(self.stats.cache_snapshot())
        if tokens == [b"stats", b"workers"]:
            return replies.stats(self.stats.workers_snapshot())
        if tokens == [b"stats", b"migration"]:
            return replies.stats(self.stats.migration_snapshot())
        if tokens == [b"version"]:
            return replies.version(self.version)
        if tokens == [b"quit"]:
            return None
        return replies.ERROR

    def _http(self, sock: socket.socket, reader: _LineReader, method: bytes, target: bytes) -> None:
        """Answer one HTTP request whose request line was read; the caller closes."""
        for _ in range(MAX_HEADERS):
            header = reader.readline()
            if header is None:
                return
            if not header:
                break
        else:
            sock.sendall(http_response("431 Request Header Fields Too Large", b"too many header lines\n"))
            return
        if method != b"GET":
            sock.sendall(http_response("405 Method Not Allowed", b"only GET\n", extra="Allow: GET\r\n"))
        elif target.split(b"?", 1)[0] != METRICS_PATH:
            sock.sendall(http_response("404 Not Found", b"only /metrics is served here\n"))
        else:
            body = self.stats.prometheus().encode()
            sock.sendall(http_response("200 OK", body, METRICS_CONTENT_TYPE))
