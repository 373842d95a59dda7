"""The audit log of a worker process: its lines go to the supervisor, the one writer.

With ``[proxy] workers`` of 2 or more, each worker records commands as one
process does (:meth:`AuditRelay.record`, sampling included), but the lines
leave by a ``SOCK_SEQPACKET`` socket to the supervisor, which writes them all
into the one file (:func:`relay_into` feeds its :class:`~mproxy.audit.AuditLog`):
lines are whole and never interleaved, and rotation and SIGUSR1 reopens happen
in one place.

The channel is bounded and never blocks a worker: the lines recorded while
the event loop runs greenlets are sent together, as one ``marshal``-encoded
datagram, when the loop next turns (no timer: idle costs nothing); a send the
socket cannot take at once (the supervisor is behind) drops those lines and
counts them in ``lines_dropped``, as a full queue does in one process. The
``marshal`` payload comes only from this program's own workers over a private
socket pair.
"""

from __future__ import annotations

import errno
import logging
import marshal
import socket
from typing import Any, Protocol

from mproxy.audit import AuditLog
from mproxy.config import AuditConfig

log = logging.getLogger(__name__)

#: Most lines sent in one datagram; more wait for the next.
BATCH_LINES = 256
#: Send buffer of a worker's end: what may wait for the supervisor before lines are dropped
#: (Linux doubles it, capped by net.core.wmem_max); also the largest datagram.
CHANNEL_BYTES = 1024 * 1024


def channel() -> tuple[socket.socket, socket.socket]:
    """A (supervisor end, worker end) pair of connected ``SOCK_SEQPACKET`` sockets."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CHANNEL_BYTES)
    except OSError:
        pass  # the default buffer then; larger batches are split
    return ours, theirs


class _Scheduler(Protocol):
    def __call__(self, callback: Any) -> object: ...


def _hub_callback(callback: Any) -> object:
    """Run ``callback`` when the gevent loop next turns (after the greenlets now ready)."""
    import gevent

    return gevent.get_hub().loop.run_callback(callback)


class AuditRelay(AuditLog):
    """A worker's audit log: :meth:`record` as in one process, lines sent to the supervisor.

    ``fd`` is the worker's end of :func:`channel`. ``schedule(callback)`` runs
    ``callback`` soon, once (the gevent loop's next turn by default; tests
    flush by hand).
    """

    def __init__(self, settings: AuditConfig, fd: int, schedule: _Scheduler = _hub_callback) -> None:
        # Not AuditLog.__init__ (no file, no thread): this class shares record(), the sampling.
        # The C socket: gevent's would wait for room instead of failing at once.
        import _socket

        self._sock = _socket.socket(fileno=fd)
        self._sock.setblocking(False)
        self._schedule = schedule
        self._batch: list[tuple[Any, ...]] = []
        self._dropped = 0
        self._closed = False
        self._tick = 0
        self.sample = 1
        self.enabled = False
        self.reconfigure(settings)  # started paused if a reload paused the audit log

    @property
    def lines_written(self) -> int:
        """Always 0: the supervisor writes (and counts) them."""
        return 0

    @property
    def lines_dropped(self) -> int:
        """Lines the channel could not take (the supervisor was behind, or gone)."""
        return self._dropped

    def _put(self, line: tuple[Any, ...]) -> None:
        batch = self._batch
        batch.append(line)
        if len(batch) == 1:
            self._schedule(self.flush)
        elif len(batch) >= BATCH_LINES:
            self.flush()

    def flush(self) -> None:
        """Send the lines recorded since the last flush (drop and count what cannot go now)."""
        batch, self._batch = self._batch, []
        if batch and not self._closed:
            self._send(batch)
        else:
            self._dropped += len(batch)

    def _send(self, batch: list[tuple[Any, ...]]) -> None:
        try:
            self._sock.send(marshal.dumps(batch))
        except OSError as err:
            if err.errno == errno.EMSGSIZE and len(batch) > 1:
                half = len(batch) // 2
                self._send(batch[:half])
                self._send(batch[half:])
                return
            self._dropped += len(batch)  # EAGAIN: the channel is full; EPIPE: no supervisor
        except ValueError:  # a value marshal cannot carry: a bug, but never the client's problem
            self._dropped += len(batch)

    def reopen(self) -> None:
        """Nothing here: the supervisor reopens the file."""

    def reconfigure(self, settings: AuditConfig) -> None:
        """Apply reloaded sampling (the supervisor applies the file settings)."""
        if settings.enabled:
            self.sample = settings.sample
        self.enabled = settings.enabled

    def close(self, timeout: float = 5.0) -> bool:
        """Send what is pending and close the channel."""
        self.enabled = False
        self.flush()
        self._closed = True
        self._sock.close()
        return True


class _Lines(Protocol):
    def enqueue(self, lines: Any) -> None: ...


def relay_into(audit: _Lines, sock: socket.socket, size: int) -> None:
    """Read one worker's datagrams from ``sock`` into ``audit`` until the worker's end closes.

    ``size`` is the largest datagram (the worker end's send buffer). Runs in
    the supervisor, in a greenlet of its own per worker (``sock`` cooperative).
    """
    buffer = bytearray(size)
    view = memoryview(buffer)
    while True:
        try:
            n = sock.recv_into(buffer)
        except OSError as err:
            log.warning("audit channel: %s", err)
            return
        if n == 0:
            return  # the worker's end is closed and everything it sent was read
        try:
            lines = marshal.loads(view[:n])
        except (EOFError, ValueError, TypeError) as err:
            log.warning("audit channel: a malformed datagram of %d bytes (%s)", n, err)
            continue
        audit.enqueue(lines)
