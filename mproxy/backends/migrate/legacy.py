"""A small memcached client for the legacy servers a cache migrates from.

A transport of the migration backend, nothing more: pooled connections per
server (at most ``connections`` each, opened on demand, reused LIFO), a
deadline per request (``timeout``), keys placed on servers by a
:class:`~.hashing.Ring`. Under gevent (the proxy's process is patched) a
request yields while it waits.

Reads use meta ``mg <key> t v f c`` where the server speaks meta (memcached
>= 1.6: asked once per server with ``mn``), so the remaining TTL comes with
the item; else ``gets`` (TTL unknown). Writes use the classic commands, which
every version speaks. A key that the text protocol cannot carry (longer than
250 bytes, or with control or space characters: only binary-protocol clients
could have stored it) is sent base64-encoded (meta ``b``) to a meta server and
treated as absent by a classic one.

Failures raise :class:`~mproxy.backends.base.BackendError` with code
``legacy_timeout``, ``legacy_unavailable`` or ``legacy_protocol`` and the
server's address in the message; the connection is then dropped. Values are
never logged.
"""

from __future__ import annotations

import base64
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import gevent
from gevent.lock import BoundedSemaphore

from mproxy.backends.base import BackendError, NonNumericValue, StoreResult
from mproxy.backends.migrate.hashing import Ring, Server
from mproxy.protocol.commands import StoreMode

#: Longest key the text protocol carries (memcached ``KEY_MAX_LENGTH``).
KEY_MAX_LENGTH = 250
#: Bytes asked of one recv.
RECV_SIZE = 65536
#: Keys per ``gets`` line or per pipelined batch of ``mg`` to one server.
BATCH_KEYS = 100
#: Seconds a server that could not be reached (or did not answer in time) is not asked
#: again: its requests fail at once meanwhile (libmemcached's ``retry_timeout``).
DOWN_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class LegacyItem:
    """An item as a legacy server holds it."""

    value: bytes
    flags: int
    #: the server's CAS unique (0: not known)
    cas: int = 0
    #: seconds left (-1: never expires; None: not known, the server does not speak meta)
    ttl: int | None = None


def _text_key(key: bytes) -> bool:
    return 0 < len(key) <= KEY_MAX_LENGTH and all(b > 0x20 and b != 0x7F for b in key)


class _Connection:
    """One socket to one server, with a read buffer."""

    def __init__(self, server: Server, timeout: float) -> None:
        self.server = server
        self.sock = socket.create_connection((server.host, server.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        """The next line without its CRLF."""
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 2]
                return line
            self._fill()

    def exact(self, n: int) -> bytes:
        """The next ``n`` bytes and the CRLF after them."""
        while len(self.buf) < n + 2:
            self._fill()
        if self.buf[n : n + 2] != b"\r\n":
            raise _ProtocolError("a value not followed by CRLF")
        data = bytes(self.buf[:n])
        del self.buf[: n + 2]
        return data

    def _fill(self) -> None:
        data = self.sock.recv(RECV_SIZE)
        if not data:
            raise ConnectionResetError("the server closed the connection")
        self.buf += data


class _ProtocolError(Exception):
    """The server answered something this client does not expect."""


class _Deadline(Exception):
    """A request to a legacy server took longer than its timeout (gevent.Timeout raises it)."""


class _Pool:
    """The connections to one server: at most ``size`` in use at once."""

    def __init__(self, server: Server, size: int, timeout: float) -> None:
        self.server = server
        self.timeout = timeout
        self.idle: list[_Connection] = []
        self.slots = BoundedSemaphore(size)
        #: whether the server answers meta commands (None: not asked yet)
        self.meta: bool | None = None
        self.closed = False
        #: monotonic time before which the server is not asked (it failed)
        self.down_until = 0.0

    def take(self, fresh: bool = False) -> tuple[_Connection, bool]:
        """A connection (an idle one unless ``fresh``), and whether it was idle."""
        if self.idle and not fresh:
            return self.idle.pop(), True
        conn = _Connection(self.server, self.timeout)
        if self.meta is None:
            try:
                conn.send(b"mn\r\n")
                answer = conn.line()
            except BaseException:
                conn.close()
                raise
            if answer not in (b"MN", b"ERROR"):
                conn.close()
                raise _ProtocolError(f"unexpected answer to mn: {answer[:40]!r}")
            self.meta = answer == b"MN"
        return conn, False

    def give_back(self, conn: _Connection) -> None:
        if self.closed:
            conn.close()
        else:
            self.idle.append(conn)

    def close(self) -> None:
        self.closed = True
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()


class LegacyClient:
    """The legacy servers of one cache (see the module doc)."""

    def __init__(self, ring: Ring, timeout: float = 1.0, connections: int = 4) -> None:
        self.ring = ring
        self.timeout = timeout
        self._pools = [_Pool(server, connections, timeout) for server in ring.servers]
        #: requests that failed (any code)
        self.errors = 0

    def __repr__(self) -> str:
        return f"LegacyClient({', '.join(s.address for s in self.ring.servers)}, {self.ring.scheme})"

    def speaks_meta(self) -> list[bool | None]:
        """Per server: whether it answered ``mn`` (None: not contacted yet)."""
        return [pool.meta for pool in self._pools]

    # -- requests -------------------------------------------------------------------

    def _run(self, index: int, what: str, request: Callable[[_Connection, bool], Any]) -> Any:
        """Run ``request(conn, meta)`` on a connection of server ``index`` within the deadline."""
        pool = self._pools[index]
        address = pool.server.address
        now = time.monotonic()
        if pool.down_until > now:
            self.errors += 1
            raise BackendError(
                "legacy_unavailable", f"legacy {address}: not asked for {pool.down_until - now:.1f} s more after a failure ({what})"
            )
        deadline = now + self.timeout
        if not pool.slots.acquire(timeout=self.timeout):
            self.errors += 1
            raise BackendError("legacy_timeout", f"legacy {address}: no connection free within {self.timeout:g} s ({what})")
        conn: _Connection | None = None
        try:
            for attempt in (1, 2):
                try:
                    with gevent.Timeout(max(0.001, deadline - time.monotonic()), _Deadline):
                        conn, reused = pool.take(fresh=attempt == 2)
                        result = request(conn, bool(pool.meta))
                    pool.give_back(conn)
                    conn = None
                    return result
                except ConnectionError:
                    # an idle connection the server (or a firewall) closed: once more on a new one
                    if attempt == 2 or conn is None or not reused:
                        raise
                    conn.close()
                    conn = None
            raise AssertionError("unreachable")
        except (OSError, _ProtocolError, ValueError, _Deadline) as err:
            self.errors += 1
            if isinstance(err, (OSError, _Deadline)):  # unreachable or silent: fail fast for a while
                pool.down_until = time.monotonic() + DOWN_SECONDS
            if isinstance(err, (socket.timeout, _Deadline)):
                raise BackendError("legacy_timeout", f"legacy {address}: no answer within {self.timeout:g} s ({what})") from err
            code = "legacy_protocol" if isinstance(err, (_ProtocolError, ValueError)) else "legacy_unavailable"
            raise BackendError(code, f"legacy {address}: {what} failed: {err}") from err
        finally:
            if conn is not None:
                conn.close()
            pool.slots.release()

    def get_many(self, keys: Sequence[bytes], failed: list[bytes] | None = None) -> dict[bytes, LegacyItem]:
        """The items present among ``keys``; servers asked concurrently. When a server
        fails: raises BackendError, or, given a ``failed`` list, puts its keys there and
        returns the others' items (counted in ``errors`` all the same)."""
        by_server: dict[int, list[bytes]] = {}
        for key in dict.fromkeys(keys):
            by_server.setdefault(self.ring.index(key), []).append(key)
        found: dict[bytes, LegacyItem] = {}
        if len(by_server) == 1:
            ((index, group),) = by_server.items()
            try:
                found.update(self._get_server(index, group))
            except BackendError:
                if failed is None:
                    raise
                failed.extend(group)
            return found
        jobs = [gevent.spawn(self._get_server, index, group) for index, group in by_server.items()]
        gevent.joinall(jobs)
        for job, group in zip(jobs, by_server.values()):
            if failed is not None and not job.successful() and isinstance(job.exception, BackendError):
                failed.extend(group)
                continue
            _raise_failure(job)
            found.update(job.value or {})
        return found

    def _get_server(self, index: int, keys: list[bytes]) -> dict[bytes, LegacyItem]:
        found: dict[bytes, LegacyItem] = {}
        for at in range(0, len(keys), BATCH_KEYS):
            batch = keys[at : at + BATCH_KEYS]
            got = self._run(index, "get", lambda conn, meta: self._get(conn, meta, batch))
            assert isinstance(got, dict)
            found.update(got)
        return found

    @staticmethod
    def _get(conn: _Connection, meta: bool, keys: list[bytes]) -> dict[bytes, LegacyItem]:
        found: dict[bytes, LegacyItem] = {}
        if meta:
            lines = []
            for key in keys:
                if _text_key(key):
                    lines.append(b"mg " + key + b" t v f c\r\n")
                else:
                    lines.append(b"mg " + base64.b64encode(key) + b" b t v f c\r\n")
            conn.send(b"".join(lines))
            for key in keys:
                head = conn.line()
                if head == b"EN":
                    continue
                parts = head.split()
                if len(parts) < 2 or parts[0] != b"VA":
                    raise _ProtocolError(f"unexpected answer to mg: {head[:40]!r}")
                value = conn.exact(int(parts[1]))
                flags, cas, ttl = 0, 0, -1
                for token in parts[2:]:
                    if token[:1] == b"f":
                        flags = int(token[1:])
                    elif token[:1] == b"c":
                        cas = int(token[1:])
                    elif token[:1] == b"t":
                        ttl = int(token[1:])
                found[key] = LegacyItem(value, flags, cas, ttl)
            return found
        text = [key for key in keys if _text_key(key)]
        if not text:
            return found
        conn.send(b"gets " + b" ".join(text) + b"\r\n")
        while True:
            head = conn.line()
            if head == b"END":
                return found
            parts = head.split()
            if len(parts) != 5 or parts[0] != b"VALUE":
                raise _ProtocolError(f"unexpected answer to gets: {head[:40]!r}")
            value = conn.exact(int(parts[3]))
            found[parts[1]] = LegacyItem(value, int(parts[2]), int(parts[4]), None)

    def delete(self, key: bytes) -> bool:
        """True if the server had the key."""
        if not _text_key(key):
            return self._run(self.ring.index(key), "delete", lambda conn, meta: self._meta_delete(conn, meta, key)) is True
        answer = self._line(key, "delete", b"delete " + key + b"\r\n")
        if answer not in (b"DELETED", b"NOT_FOUND"):
            raise BackendError("legacy_protocol", f"legacy {self.ring.server(key).address}: delete answered {answer[:40]!r}")
        return answer == b"DELETED"

    @staticmethod
    def _meta_delete(conn: _Connection, meta: bool, key: bytes) -> bool:
        if not meta:
            return False  # a classic server cannot hold a key the text protocol cannot carry
        conn.send(b"md " + base64.b64encode(key) + b" b\r\n")
        answer = conn.line()
        if answer not in (b"HD", b"NF"):
            raise _ProtocolError(f"unexpected answer to md: {answer[:40]!r}")
        return answer == b"HD"

    def store(self, mode: StoreMode, key: bytes, value: bytes, flags: int, exptime: int, cas_unique: int = 0) -> StoreResult:
        """The classic storage command; the server's answer."""
        self._text_only(key, mode.value)
        verb = mode.value.encode()
        line = b"%s %s %d %d %d" % (verb, key, flags, exptime, len(value))
        if mode is StoreMode.CAS:
            line += b" %d" % cas_unique
        answer = self._line(key, mode.value, line + b"\r\n" + value + b"\r\n")
        try:
            return StoreResult(answer)
        except ValueError:
            raise BackendError("legacy_protocol", f"legacy {self.ring.server(key).address}: {mode.value} answered {answer[:40]!r}") from None

    def incr_decr(self, key: bytes, delta: int, incr: bool) -> int | None:
        """The new number, or None on a miss. Raises NonNumericValue when the server
        refuses the value (``CLIENT_ERROR``)."""
        self._text_only(key, "incr")
        verb = b"incr" if incr else b"decr"
        answer = self._line(key, verb.decode(), b"%s %s %d\r\n" % (verb, key, delta))
        if answer == b"NOT_FOUND":
            return None
        if answer.isdigit():
            return int(answer)
        if answer.startswith(b"CLIENT_ERROR"):
            raise NonNumericValue("cannot increment or decrement non-numeric value")
        raise BackendError("legacy_protocol", f"legacy {self.ring.server(key).address}: {verb.decode()} answered {answer[:40]!r}")

    def touch(self, key: bytes, exptime: int) -> bool:
        self._text_only(key, "touch")
        answer = self._line(key, "touch", b"touch %s %d\r\n" % (key, exptime))
        if answer not in (b"TOUCHED", b"NOT_FOUND"):
            raise BackendError("legacy_protocol", f"legacy {self.ring.server(key).address}: touch answered {answer[:40]!r}")
        return answer == b"TOUCHED"

    def flush_all(self, delay: int = 0) -> None:
        """flush_all on every server."""
        command = b"flush_all %d\r\n" % delay if delay else b"flush_all\r\n"

        def request(conn: _Connection, meta: bool) -> bytes:
            conn.send(command)
            return conn.line()

        def flush(index: int) -> None:
            answer = self._run(index, "flush_all", request)
            if answer != b"OK":
                raise BackendError("legacy_protocol", f"legacy {self.ring.servers[index].address}: flush_all answered {answer!r:.40}")

        jobs = [gevent.spawn(flush, index) for index in range(len(self._pools))]
        gevent.joinall(jobs)
        for job in jobs:
            _raise_failure(job)

    def _text_only(self, key: bytes, what: str) -> None:
        if not _text_key(key):
            raise BackendError("legacy_key", f"{what}: the key cannot be sent to a legacy server in the text protocol")

    def _line(self, key: bytes, what: str, data: bytes) -> bytes:
        def request(conn: _Connection, meta: bool) -> bytes:
            conn.send(data)
            return conn.line()

        answer: bytes = self._run(self.ring.index(key), what, request)
        return answer

    def close(self) -> None:
        for pool in self._pools:
            pool.close()


def _raise_failure(job: gevent.Greenlet) -> None:
    """Raise what a finished greenlet raised, if it did."""
    if not job.successful():
        error = job.exception
        if isinstance(error, BaseException):
            raise error
        raise BackendError("internal", "a legacy request was interrupted")
