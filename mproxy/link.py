"""Messages between the supervisor and one worker process, both ways, over a socket pair.

A :class:`Link` is one end of a ``SOCK_STREAM`` Unix socket pair the
supervisor makes for each worker. A message is ``(kind, id, payload)``,
``marshal``-encoded, framed by a 4-byte length; ``payload`` is plain data
(numbers, strings, lists, tuples, dicts). Either end may send:

* a notice (``id`` 0): :meth:`Link.notify`, no answer;
* a request: :meth:`Link.request` waits (cooperatively, bounded) for the
  other end's handler to answer with a ``reply`` (or an ``error``).

Each incoming request runs in a greenlet of its own, so a handler may itself
make requests on the same link (the supervisor, asked for the summed stats
by a worker, asks that very worker for its export). When the other end goes
away (EOF), :attr:`Link.closed` is set and waiting requests fail.
``marshal`` is safe here: both ends are this program, over a private pair.
"""

from __future__ import annotations

import itertools
import logging
import marshal
import socket
import struct
from typing import Any, Callable

import gevent
from gevent.event import AsyncResult, Event
from gevent.lock import Semaphore

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")
#: Largest message accepted (a stats export of many caches stays far below).
MAX_MESSAGE = 64 * 1024 * 1024
#: Seconds a request waits for its reply by default.
REQUEST_TIMEOUT = 5.0
#: Bytes asked of one recv.
_READ_SIZE = 65536

_REPLY = "reply"
_ERROR = "error"

#: ``handler(kind, payload) -> reply payload`` for the requests and notices of the other end.
Handler = Callable[[str, Any], Any]


class LinkError(Exception):
    """A request got no reply: the link is closed, the reply timed out, or the handler failed."""


class Link:
    """One end of a supervisor <-> worker link; see the module doc."""

    def __init__(self, sock: socket.socket, handler: Handler, name: str) -> None:
        self.name = name
        self._sock = sock
        self._handler = handler
        self._ids = itertools.count(1)
        self._pending: dict[int, AsyncResult] = {}
        self._send_lock = Semaphore()
        #: Set once the other end has gone (EOF or error) or :meth:`close` was called.
        self.closed = Event()
        self._reader: gevent.Greenlet | None = None

    def start(self) -> None:
        """Start reading (in a greenlet of its own)."""
        self._reader = gevent.spawn(self._read)

    def notify(self, kind: str, payload: Any = None) -> None:
        """Send a notice; raises LinkError if the link is closed."""
        self._send((kind, 0, payload))

    def request(self, kind: str, payload: Any = None, timeout: float = REQUEST_TIMEOUT) -> Any:
        """Send a request and return the other end's reply; LinkError when none comes."""
        ident = next(self._ids)
        result = self._pending[ident] = AsyncResult()
        try:
            self._send((kind, ident, payload))
            return result.get(timeout=timeout)
        except gevent.Timeout:
            raise LinkError(f"{self.name}: no reply to {kind!r} within {timeout:g} s") from None
        finally:
            self._pending.pop(ident, None)

    def close(self) -> None:
        """Close this end (idempotent); waiting requests fail."""
        self._closed("closed")
        if self._reader is not None and self._reader is not gevent.getcurrent():
            self._reader.kill(block=False)
        self._sock.close()

    # -- internals --------------------------------------------------------------------

    def _send(self, message: tuple[str, int, Any]) -> None:
        if self.closed.is_set():
            raise LinkError(f"{self.name}: link closed")
        data = marshal.dumps(message)
        try:
            with self._send_lock:  # frames of two greenlets must not interleave
                self._sock.sendall(_HEADER.pack(len(data)) + data)
        except OSError as err:
            self._closed(str(err))
            raise LinkError(f"{self.name}: {err}") from None

    def _read(self) -> None:
        buffer = b""
        why = "the other end closed the link"
        try:
            while True:
                while len(buffer) >= _HEADER.size:
                    (size,) = _HEADER.unpack_from(buffer)
                    if size > MAX_MESSAGE:
                        why = f"a message of {size} bytes (more than {MAX_MESSAGE})"
                        return
                    if len(buffer) < _HEADER.size + size:
                        break
                    body = buffer[_HEADER.size : _HEADER.size + size]
                    buffer = buffer[_HEADER.size + size :]
                    self._dispatch(marshal.loads(body))
                data = self._sock.recv(_READ_SIZE)
                if not data:
                    return
                buffer += data
        except OSError as err:
            why = str(err)
        except (EOFError, ValueError, TypeError) as err:
            why = f"a malformed message ({err})"
        finally:
            self._closed(why)

    def _dispatch(self, message: tuple[str, int, Any]) -> None:
        kind, ident, payload = message
        if kind in (_REPLY, _ERROR):
            result = self._pending.get(ident)
            if result is not None:
                if kind == _REPLY:
                    result.set(payload)
                else:
                    result.set_exception(LinkError(f"{self.name}: {payload}"))
            return
        gevent.spawn(self._serve, kind, ident, payload)

    def _serve(self, kind: str, ident: int, payload: Any) -> None:
        try:
            reply = self._handler(kind, payload)
        except Exception as err:  # answer the error: the asker must not wait for nothing
            log.exception("%s: handling %r", self.name, kind)
            answer: tuple[str, int, Any] = (_ERROR, ident, f"{kind}: {err}")
        else:
            answer = (_REPLY, ident, reply)
        if ident:
            try:
                self._send(answer)
            except LinkError:
                pass  # the asker is gone

    def _closed(self, why: str) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        log.debug("%s: %s", self.name, why)
        for result in list(self._pending.values()):
            result.set_exception(LinkError(f"{self.name}: {why}"))
