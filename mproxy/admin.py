"""The admin port: memcached-style ``stats`` for operators, ``GET /metrics`` for scrapers.

Text protocol (lines end with ``\\n`` or ``\\r\\n``)::

    stats          STAT <name> <value> lines, then END   (Stats.snapshot)
    stats cache    STAT <cache>:<name> <value> lines, END (Stats.cache_snapshot)
    stats workers  STAT <worker>:<name> <value> lines, END: each worker process's own
                   stats, workers numbered from 1 (one process is worker 1)
    stats migration STAT <cache>:<name> <value> lines, END: the caches migrating from
                   legacy memcached servers, reads by who answered them over the last
                   1, 5 and 15 minutes (Stats.migration_snapshot, docs/migration.md)
    stats reset    RESET
    version        VERSION <version>
    quit           closes the connection
    anything else  ERROR (an empty line too, as memcached); the connection stays

A line longer than :data:`MAX_LINE` bytes, or :data:`IDLE_TIMEOUT` seconds
in which nothing arrives, closes the connection. If the
first line of a connection is an HTTP/1.x request line, the connection is
HTTP instead: ``GET /metrics`` answers the Prometheus text format
(:func:`mproxy.stats.prometheus_text`), other paths 404, other methods 405,
then the connection closes. So a scraper needs no second port.

What the port shows comes from a :class:`StatsSource`: one process's
:class:`~mproxy.stats.Stats`, or with several workers the supervisor's view
that sums theirs (:mod:`mproxy.workers`).
"""

from __future__ import annotations

import re
import socket
from typing import Protocol

from gevent.pool import Pool
from gevent.server import StreamServer

from mproxy.protocol import replies


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
#: Admin connections served at once; more wait in the listen backlog.
MAX_CONNECTIONS = 64
#: Seconds an admin connection may stay silent before it is closed, so that clients
#: that connect and say nothing cannot hold the ``MAX_CONNECTIONS`` slots forever.
IDLE_TIMEOUT = 60.0

HTTP_REQUEST_LINE = re.compile(rb"([A-Z]+) (\S+) HTTP/1\.[01]")
METRICS_PATH = b"/metrics"
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _LineReader:
    """Lines from a socket, with a bounded buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def readline(self) -> bytes | None:
        """The next line without ``\\r\\n``/``\\n``; None at EOF or when a line exceeds MAX_LINE."""
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line, self.buf = self.buf[:end], self.buf[end + 1 :]
                if line.endswith(b"\r"):
                    line = line[:-1]
                return line if len(line) <= MAX_LINE else None
            if len(self.buf) > MAX_LINE + 1:  # +1: a line of MAX_LINE may wait for "\n" after "\r"
                return None
            data = self.sock.recv(RECV_SIZE)
            if not data:
                return None
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
    """The admin listener: one greenlet per connection, at most ``max_connections`` at once."""

    def __init__(
        self,
        listener: tuple[str, int] | socket.socket,
        stats: StatsSource,
        version: str,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.stats = stats
        self.version = version
        self.idle_timeout = idle_timeout
        self._server = StreamServer(listener, self._handle, spawn=Pool(max_connections))

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): the real port once started on port 0."""
        host, port = self._server.address[:2]
        return host, port

    def start(self) -> None:
        """Bind (unless given a socket) and start accepting."""
        self._server.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop accepting, then close the open admin connections after at most ``timeout`` seconds."""
        self._server.stop(timeout)

    def _handle(self, sock: socket.socket, address: object) -> None:
        reader = _LineReader(sock)
        try:
            sock.settimeout(self.idle_timeout)
            line = reader.readline()
            request = HTTP_REQUEST_LINE.fullmatch(line) if line is not None else None
            if request is not None:
                self._http(sock, reader, request.group(1), request.group(2))
                return
            while line is not None:
                reply = self._command(line)
                if reply is None:
                    return
                sock.sendall(reply)
                line = reader.readline()
        except OSError:
            return  # the client went away, or stayed silent past idle_timeout
        finally:
            sock.close()

    def _command(self, line: bytes) -> bytes | None:
        """The reply to one command line; None for ``quit``."""
        tokens = line.split()
        if tokens == [b"stats"]:
            return replies.stats(self.stats.snapshot())
        if tokens == [b"stats", b"reset"]:
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
