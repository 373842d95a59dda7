"""gevent TCP server: one StreamServer per ``[[cache]]`` listener, one
greenlet per connection. The only place that calls ``recv``/``sendall``.

A connection speaks the text protocol, or the binary one when its first
byte is the binary request magic (as memcached decides). It handles
everything one read delivered before it writes: the complete commands in the
buffer are parsed, go to ``Dispatcher.run`` in order, and their replies go out
in one ``sendall`` (flushed early past ``FLUSH_BYTES``, so that a pipeline of
large gets cannot pile up memory, and whenever dispatch says the next reply is
not ready yet). The loop knows bytes, ``quit`` (the replies before it are sent,
then the connection closes) and fatal parse errors: the connection closes
after the replies memcached would have sent (memcached transmits at every
get, gets, gat, gats and mn: those up to the last of them in the read,
``commands.TRANSMITTING``; the rest are dropped). What commands mean, and
which run together, is dispatch's.

Graceful stop (``CacheServer.stop``): stop accepting, let every connection
finish the command in hand and send its reply, close idle connections, and
kill whatever is still running after the timeout. memcached clients keep
pooled connections open for ever, so waiting for them to go idle would
never end.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
from time import monotonic
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, cast

import gevent.socket
from gevent import get_hub
from gevent.socket import wait
from gevent.pool import Pool
from gevent.server import StreamServer

from mproxy.config import DEFAULT_BACKLOG
from mproxy.dispatch import Dispatcher
from mproxy.protocol import commands as c
from mproxy.protocol.binary import REQUEST_MAGIC, BinaryParser, BinCommand
from mproxy.protocol import replies as r
from mproxy.protocol.errors import ProtocolError
from mproxy.protocol.parser import NEED_DATA, Parser
from mproxy.stats import CacheStats

if TYPE_CHECKING:
    from mproxy.handshake import ListenerTls

log = logging.getLogger(__name__)

#: bytes asked of each recv
READ_SIZE = 64 * 1024
#: replies of one read are sent early once they reach this size
FLUSH_BYTES = 1024 * 1024
#: errnos of an accept that failed for want of a file descriptor (or of kernel memory for one)
FD_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: seconds a listener stops accepting after such a failure
ACCEPT_PAUSE = 0.1
#: seconds between two log lines about such failures
EXHAUSTED_LOG_EVERY = 60.0
#: after this many reads in a row that found data waiting (never giving the hub a
#: turn), a connection lets the others whose data is ready go first (gevent's recv
#: returns at once when data is there: a busy connection would be served over and
#: over while the others wait)
FAIR_READS = 1


def _raw_socket(sock: socket.socket) -> socket.socket | None:
    """The non-blocking OS socket under a plain gevent socket (its private ``_sock``),
    or None: anything else (a TLS socket above all) goes through its own methods.

    The connection loop calls ``recv`` and ``send`` on it directly and falls back to
    the gevent socket only to wait: gevent's ``sendall`` costs a ``getsockopt``
    system call and a few Python frames per call, its ``recv`` a frame."""
    if type(sock) is gevent.socket.socket:
        raw = getattr(sock, "_sock", None)
        if raw is not None and raw.gettimeout() == 0.0:
            return raw  # type: ignore[no-any-return]
    return None


class _Connection:
    """One client connection: its socket, and the replies of the read in hand,
    sent with one ``sendall`` (early past ``FLUSH_BYTES``)."""

    __slots__ = ("sock", "raw", "readable", "stats", "busy", "parts", "size", "ending")

    def __init__(self, sock: socket.socket, stats: CacheStats) -> None:
        self.sock = sock
        #: the OS socket under it, for the calls that do not wait (see _raw_socket)
        self.raw = _raw_socket(sock)
        #: a watcher of its bytes, to wait for them through the hub (FAIR_READS); one
        #: per connection: a new one per wait costs two system calls
        self.readable = get_hub().loop.io(sock.fileno(), 1) if self.raw is not None else None
        self.stats = stats
        #: between a read and the sendall of its replies (a graceful stop lets it finish)
        self.busy = False
        self.parts: list[bytes] = []
        self.size = 0
        #: why the connection ends after this read: ``quit``, or the fatal ProtocolError
        self.ending: c.Quit | ProtocolError | None = None

    def commands(self, parser: Parser | BinaryParser) -> list[c.Command | BinCommand | ProtocolError]:
        """The complete commands in the parser's buffer, with the parse errors that
        are answered in place. Stops at ``quit`` or at a fatal error, noting it in
        ``ending``."""
        next_command = parser.next_command
        need_data, Quit = NEED_DATA, c.Quit
        out: list[c.Command | BinCommand | ProtocolError] = []
        append = out.append
        while True:
            try:
                cmd = next_command()
            except ProtocolError as err:
                self.stats.protocol_errors += 1
                if err.fatal:
                    self.ending = err
                    return out
                append(err)
                continue
            if cmd is need_data:
                return out
            if type(cmd) is Quit:
                self.ending = cmd  # type: ignore[assignment]  # a Quit
                return out
            append(cmd)  # type: ignore[arg-type]  # not NEED_DATA: `is` does not narrow for mypy

    def send_replies(self, replies: Iterator[bytes | Iterable[bytes] | None]) -> None:
        """Add the replies of a read, flushing past ``FLUSH_BYTES`` and where dispatch
        yields None (what is ready goes out while the rest runs)."""
        parts = self.parts
        append = parts.append
        size = self.size
        holding = self.ending is not None and type(self.ending) is not c.Quit  # fatal: see ``drop_unsent``
        for reply in replies:
            if type(reply) is bytes:
                append(reply)
                size += len(reply)
                if size >= FLUSH_BYTES:
                    self.flush()
                    size = 0
            elif reply is None:
                if not holding:
                    self.flush()
                    size = 0
            else:
                self.size = size
                for part in cast(Iterable[bytes], reply):  # a reply in parts
                    self.add(part)
                size = self.size
        self.size = size

    def add(self, part: bytes) -> None:
        self.parts.append(part)
        self.size += len(part)
        if self.size >= FLUSH_BYTES:
            self.flush()

    def drop_unsent(self, commands: list[Any]) -> None:
        """Before closing on a fatal error: drop the replies memcached would not have
        sent, those after the last command at which it transmits (each is one part:
        the transmitting commands are the only ones whose replies come in pieces)."""
        keep = 0
        for index in range(len(commands) - 1, -1, -1):
            if type(commands[index]) in c.TRANSMITTING:
                keep = index + 1
                break
        drop = min(len(commands) - keep, len(self.parts))
        if drop:
            del self.parts[len(self.parts) - drop :]

    def flush(self) -> None:
        parts = self.parts
        if not parts:
            return
        payload = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        self.size = 0
        self.stats.bytes_written += len(payload)
        raw = self.raw
        if raw is not None:
            try:
                sent = raw.send(payload)
            except BlockingIOError:
                sent = 0
            if sent == len(payload):
                return
            self.sock.sendall(memoryview(payload)[sent:])  # waits for room, with the idle timeout
            return
        self.sock.sendall(payload)


class _Listener(StreamServer):
    """gevent's StreamServer, quiet when the process has no file descriptor left.

    gevent logs a traceback for every failed ``accept`` and retries after a delay that
    grows to 1 s: past the open-file limit that is a traceback a second, for ever. Here
    an accept that fails for want of a descriptor pauses accepting for
    :data:`ACCEPT_PAUSE` (the clients wait in the listen queue, as with memcached, whose
    stat ``listen_disabled_num`` counts its pauses: ``on_exhausted`` counts these) and
    logs at most once per :data:`EXHAUSTED_LOG_EVERY`."""

    #: called with the error at each such failure
    on_exhausted: Callable[[OSError], None] | None = None

    def do_read(self) -> Any:
        try:
            return super().do_read()
        except OSError as err:
            if err.errno not in FD_EXHAUSTED:
                raise
            if self.on_exhausted is not None:
                self.on_exhausted(err)
        self.stop_accepting()
        self._timer = timer = self.loop.timer(ACCEPT_PAUSE)
        timer.start(self._resume)
        return None

    def _resume(self) -> None:
        if self.started:
            self.start_accepting()
            # accept what waited meanwhile now: libev does not always report again a socket
            # that stayed readable while its watcher was stopped
            self._do_read()  # type: ignore[attr-defined]  # gevent's accept loop, not in its stubs


def listening_server(
    listener: tuple[str, int] | socket.socket,
    handle: Any,
    pool: Pool,
    backlog: int,
    on_exhausted: Callable[[OSError], None] | None = None,
) -> StreamServer:
    """A StreamServer on ``listener``: an address, bound with a queue of ``backlog`` (``[proxy]
    backlog``), or a socket listening already (systemd's, a worker's: its queue as it is).
    ``on_exhausted`` is told of each accept that failed for want of a file descriptor."""
    if isinstance(listener, tuple):
        server = _Listener(listener, handle, spawn=pool, backlog=backlog)
    else:
        server = _Listener(listener, handle, spawn=pool)
    server.on_exhausted = on_exhausted
    return server


class ExhaustedLog:
    """Counts accepts that failed for want of a file descriptor (``listen_disabled_num``) and
    logs them, at most once per :data:`EXHAUSTED_LOG_EVERY` seconds."""

    __slots__ = ("what", "stats", "logged", "since")

    def __init__(self, what: str, stats: CacheStats | None) -> None:
        self.what = what
        self.stats = stats
        self.logged = -EXHAUSTED_LOG_EVERY
        self.since = 0  # failures not logged yet

    def __call__(self, err: OSError) -> None:
        if self.stats is not None:
            self.stats.listen_disabled_num += 1
        self.since += 1
        now = monotonic()
        if now - self.logged >= EXHAUSTED_LOG_EVERY:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            log.warning(
                "%s: cannot accept a connection: %s (open-file limit %d; %d such failures since the "
                "last report): new clients wait in the listen queue; raise the open-file limit "
                "(LimitNOFILE) or lower [proxy] max_connections",
                self.what, err.strerror or err, soft, self.since,
            )
            self.logged = now
            self.since = 0


def bound_address(server: StreamServer) -> tuple[str, int]:
    """The (host, port) a started server listens on (the real port when bound to port 0)."""
    address = server.address
    assert isinstance(address, tuple), address  # a TCP listener
    return address[0], address[1]


class ConnectionLimit:
    """The connection cap shared by every listener of the process."""

    __slots__ = ("maximum", "active")

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.active = 0


class CacheServer:
    """The data listener of one ``[[cache]]``."""

    def __init__(
        self,
        listener: tuple[str, int] | socket.socket,
        dispatcher: Dispatcher,
        stats: CacheStats,
        limit: ConnectionLimit | None = None,
        idle_timeout: float = 0.0,
        max_item_size: int = c.DEFAULT_MAX_ITEM_SIZE,
        tls: ListenerTls | None = None,
        backlog: int = DEFAULT_BACKLOG,
    ) -> None:
        self.dispatcher = dispatcher
        self.stats = stats
        self.limit = limit or ConnectionLimit(1024)
        self.idle_timeout = idle_timeout or None
        self.max_item_size = max_item_size
        self.stopping = False
        self._conns: set[_Connection] = set()
        # a pool (unbounded: the cap is ConnectionLimit) so that stop() waits for
        # the handlers and then kills them; without one it would not wait at all
        handle = self._handle if tls is None else tls.serve(self._handle)
        self._server = listening_server(listener, handle, Pool(), backlog, ExhaustedLog(f"cache {stats.name}", stats))

    @property
    def address(self) -> tuple[str, int]:
        return bound_address(self._server)

    def start(self) -> None:
        self._server.start()

    def stop(self, timeout: float) -> None:
        """Graceful stop (see the module docstring); ``timeout`` is ``[proxy] graceful_timeout``."""
        self.stopping = True
        self._server.close()  # stop accepting
        for conn in list(self._conns):
            if not conn.busy:
                _shutdown(conn.sock)
        self._server.stop(timeout=timeout)

    # -- one connection -------------------------------------------------------

    def _handle(self, sock: socket.socket, address: Any) -> None:
        st = self.stats
        limit = self.limit
        if limit.active >= limit.maximum or self.stopping:
            st.rejected_connections += 1
            refuse(sock)
            return
        conn = _Connection(sock, st)
        self._conns.add(conn)
        limit.active += 1
        st.curr_connections += 1
        st.total_connections += 1
        client = address_text(address)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.idle_timeout)
            self._serve(conn, client)
        except socket.timeout:  # idle_timeout without a completed command (or a reply unread that long)
            st.idle_kicks += 1
            log.debug("closing idle connection from %s", client)
        except OSError as err:  # reset by peer and the like
            log.debug("connection from %s ended: %s", client, err)
        finally:
            st.curr_connections -= 1
            limit.active -= 1
            self._conns.discard(conn)
            if conn.readable is not None:
                conn.readable.close()
            sock.close()

    def _serve(self, conn: _Connection, client: str) -> None:
        sock = conn.sock
        st = self.stats
        parser: Parser | BinaryParser | None = None
        run = self.dispatcher.run
        raw = conn.raw
        recv = raw.recv if raw is not None else sock.recv
        commands_of = conn.commands
        flush = conn.flush
        readable = conn.readable
        ready = 0  # reads in a row that did not wait
        # idle_timeout is the time without a completed command, not without a byte (as
        # memcached's): a read that completes none shortens the socket's timeout to what
        # is left, so that bytes trickled into a command that never ends cannot hold it
        idle = self.idle_timeout
        timeout = idle
        last = monotonic() if idle is not None else 0.0  # when the last command completed
        while not self.stopping:
            if raw is None:
                data = sock.recv(READ_SIZE)
            else:
                if ready >= FAIR_READS:
                    # the others' turn: wait for our next bytes through the hub, with the
                    # connections whose bytes are ready too (gevent.sleep(0) would run us
                    # again before the hub polls, for up to its 5 ms switch interval)
                    ready = 0
                    wait(readable, timeout)  # type: ignore[arg-type]  # set with raw
                try:
                    data = recv(READ_SIZE)
                except BlockingIOError:
                    ready = 0
                    data = sock.recv(READ_SIZE)  # waits, with the idle timeout
                else:
                    ready += 1
            if not data:
                return
            conn.busy = True
            st.bytes_read += len(data)
            if parser is None:  # the first byte says which protocol the connection speaks
                parser = (BinaryParser if data[0] == REQUEST_MAGIC else Parser)(self.max_item_size)
            parser.feed(data)
            commands = commands_of(parser)
            if idle is not None:
                if commands or conn.ending is not None:
                    last = monotonic()
                    if timeout != idle:
                        timeout = idle
                        sock.settimeout(idle)
                else:
                    timeout = last + idle - monotonic()
                    if timeout <= 0:
                        raise socket.timeout("no command completed within idle_timeout")
                    sock.settimeout(timeout)
            if commands:
                conn.send_replies(run(commands, client))
            if conn.ending is not None and type(conn.ending) is not c.Quit:
                conn.drop_unsent(commands)
                reply = cast(ProtocolError, conn.ending).reply  # a fatal error's own, if it has one
                if reply:
                    conn.add(reply)
                conn.flush()
                log.debug("closing connection from %s: %s", client, conn.ending)
                return
            flush()
            conn.busy = False
            if conn.ending is not None:  # quit, once the replies before it are sent
                return


def refuse(sock: socket.socket) -> None:
    """A connection over a cap: answered as memcached answers one over its ``-c``, and closed."""
    try:
        sock.sendall(r.TOO_MANY_CONNECTIONS)
    except OSError:
        pass
    sock.close()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass


def address_text(address: Any) -> str:
    """``host:port`` of a socket address (a Unix socket's path as is)."""
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)
