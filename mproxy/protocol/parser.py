"""Incremental, sans-IO parser of the memcached text protocol.

One reader contract, as in h11: ``feed(data)`` appends bytes;
``next_command()`` returns a :mod:`~mproxy.protocol.commands` record, or
:data:`NEED_DATA` when the buffer holds no complete command, or raises a
:class:`~mproxy.protocol.errors.ProtocolError` whose ``reply`` is the exact
wire answer (the parser has already consumed the offending input, so the
caller writes the reply and carries on, or closes when ``err.fatal``).

Replies match memcached 1.6 (``proto_text.c``) byte for byte, including its
quirks: tokens are split on spaces only; at most 24 tokens; numbers are
parsed like C's ``strtoul``/``strtol`` (leading white space, a sign, and any
white space after the digits accepted; flags and exptime truncated to 32
bits); ``noreply`` also silences error lines; a data block is exactly
``<bytes>`` + 2 bytes, and the next command starts right after it.
"""

from __future__ import annotations

from typing import Any, Callable, Final

from mproxy.protocol import admin
from mproxy.protocol import commands as c
from mproxy.protocol import meta
from mproxy.protocol.commands import StoreMode
from mproxy.protocol.errors import ClientError, CommandError, ConnectionClosed, ProtocolError, RequestTooLarge
from mproxy.protocol.numbers import parse_i32, parse_u32, parse_u64


class NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()

_FIRST_LETTER_FAMILIES = frozenset(b"gsacidt")
_BAD_FORMAT = "bad command line format"
_BAD_EXPTIME = "invalid exptime argument"
_KEY_MAX = c.KEY_MAX_LENGTH
_Get = c.Get


def _noreply(tokens: list[bytes], ntokens: int) -> bool:
    """memcached ``set_noreply_maybe``: the last token (within the first 23) is noreply."""
    return tokens[ntokens - 2] == b"noreply" if ntokens >= 2 else False


class Parser:
    """Parser state for one connection."""

    __slots__ = ("_buf", "_pos", "_scan", "_resume", "_pending", "_swallow", "max_item_size")

    def __init__(self, max_item_size: int = c.DEFAULT_MAX_ITEM_SIZE) -> None:
        self.max_item_size = max_item_size
        #: bytes received, from ``_pos`` on not consumed yet: the ``bytes`` of a read as
        #: they came when nothing was left over (the usual case: no copy), else a
        #: bytearray the reads are appended to
        self._buf: bytes | bytearray = b""
        self._pos = 0
        #: where the search for the next newline resumes: bytes before it hold none, so a
        #: long line arriving in small pieces is scanned once, not once per piece
        self._scan = 0
        #: None when the next bytes are a command line; else what reads them: a data
        #: block (:meth:`_store_value`, :meth:`_ms_value`), bytes to discard
        #: (:meth:`_discard`), or nothing ever again (:meth:`_watching`)
        self._resume: Callable[[], c.Command | NeedData] | None = None
        #: a storage command waiting for its data block: its header and total bytes
        self._pending: tuple[Any, ...] | None = None
        #: bytes of a data block still to discard, and the command to return after
        #: them (an oversized store) or None (an ``ms`` already answered with an error)
        self._swallow: tuple[c.TooLarge | c.MsTooLarge | None, int] | None = None

    def feed(self, data: bytes) -> None:
        buf = self._buf
        pos = self._pos
        if pos >= len(buf):  # all consumed: keep the read as it is
            self._buf = bytes(data)
            self._pos = self._scan = 0
            return
        if isinstance(buf, bytes):
            buf = self._buf = bytearray(memoryview(buf)[pos:])
            self._scan -= pos
            self._pos = 0
        elif pos and pos >= len(buf) // 2:
            del buf[:pos]
            self._scan -= pos
            self._pos = 0
        buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed."""
        return len(self._buf) - self._pos

    def next_command(self) -> c.Command | NeedData:
        if self._resume is not None:
            return self._resume()
        buf = self._buf
        pos = self._pos
        if pos >= len(buf):  # all consumed (the call after the last command of a read)
            return NEED_DATA
        scan = self._scan
        nl = buf.find(b"\n", scan if scan > pos else pos)
        if nl < 0:
            self._scan = len(buf)
            if len(buf) - pos > c.MAX_LINE_LENGTH:
                self._check_unterminated()
            return NEED_DATA
        line = buf[pos : nl - 1 if nl - pos > 1 and buf[nl - 1] == 13 else nl]
        if type(line) is not bytes:
            line = bytes(line)
        self._pos = nl + 1
        nul = line.find(b"\0")
        if nul >= 0:  # memcached works on a C string: a NUL ends the line
            line = line[:nul]
        # one command line
        tokens = line.split(b" ")
        if b"" in tokens:
            tokens = [t for t in tokens if t]
            if not tokens:
                raise CommandError()
        word = tokens[0]
        if word == b"get" and len(tokens) == 2 and len(tokens[1]) <= _KEY_MAX:  # the usual command, in place
            return _Get((tokens[1],), False)
        handler = _HANDLERS.get(word)
        if handler is None:
            if len(word) < 2:
                raise CommandError()
            # memcached dispatches on the first letter first: only words
            # outside those families get its "HTTP request -> close" check.
            if word[0] in _FIRST_LETTER_FAMILIES or (word[0] == 109 and len(word) == 2):
                raise CommandError()
            last = tokens[min(len(tokens), c.MAX_TOKENS - 1) - 1]
            if last.startswith(b"HTTP/"):
                raise ConnectionClosed("HTTP request on the memcached port")
            raise CommandError()
        # memcached's token count: up to 23 tokens plus a terminal token
        n = len(tokens)
        result = handler(self, tokens, n + 1 if n < c.MAX_TOKENS else c.MAX_TOKENS)
        if result is None:  # a storage header: its data block follows
            return self.next_command()
        return result

    # -- what reads the bytes after a command line (``_resume``) -----------------

    def _store_value(self) -> c.Command | NeedData:
        mode, key, flags, exptime, cas_unique, noreply, need = self._pending  # type: ignore[misc]
        buf = self._buf
        start = self._pos
        end = start + need
        if len(buf) < end:
            return NEED_DATA
        self._pending = self._resume = None
        self._pos = end
        if buf[end - 2 : end] != b"\r\n":
            raise ClientError("bad data chunk", noreply)
        value = buf[start : end - 2]
        return c.Store(mode, key, flags, exptime, value if type(value) is bytes else bytes(value), cas_unique, noreply)

    def _ms_value(self) -> c.Command | NeedData:
        build, need = self._pending  # type: ignore[misc]
        buf = self._buf
        start = self._pos
        end = start + need
        if len(buf) < end:
            return NEED_DATA
        self._pending = self._resume = None
        self._pos = end
        if buf[end - 2 : end] != b"\r\n":
            raise ClientError("bad data chunk", build(b"").noreply)
        return build(bytes(buf[start : end - 2]))  # type: ignore[no-any-return]

    def _discard(self) -> c.Command | NeedData:
        cmd, left = self._swallow  # type: ignore[misc]
        take = min(left, len(self._buf) - self._pos)
        self._pos += take
        if take < left:
            self._swallow = (cmd, left - take)
            return NEED_DATA
        self._swallow = self._resume = None
        if cmd is None:
            return self.next_command()
        return cmd

    def _watching(self) -> c.Command | NeedData:
        """After ``watch``: memcached reads nothing more from a watcher connection."""
        self._pos = self._scan = len(self._buf)
        return NEED_DATA

    def _swallowing(self, cmd: c.TooLarge | c.MsTooLarge | None, nbytes: int) -> None:
        self._swallow = (cmd, nbytes)
        self._resume = self._discard

    def _check_unterminated(self) -> None:
        held = len(self._buf) - self._pos
        if held <= c.MAX_LINE_LENGTH:
            return
        head = bytes(self._buf[self._pos : self._pos + 110])
        stripped = head.lstrip(b" ")
        if len(head) - len(stripped) > 100 or not (
            stripped.startswith(b"get ") or stripped.startswith(b"gets ")
        ):
            raise ConnectionClosed(f"line of over {c.MAX_LINE_LENGTH} bytes without a newline")
        if held > c.MAX_GET_LINE_LENGTH:
            self._pos = self._scan = len(self._buf)  # what is held is dropped: the connection ends
            raise RequestTooLarge(f"get line of over {c.MAX_GET_LINE_LENGTH} bytes")

    # -- one command each ----------------------------------------------------

    def _get(self, tokens: list[bytes], ntokens: int, cas: bool = False) -> c.Command:
        if ntokens < 3:
            raise CommandError()
        if len(tokens) == 2:
            key = tokens[1]
            if len(key) > c.KEY_MAX_LENGTH:  # memcached answers a key too long with a format error
                raise ClientError(_BAD_FORMAT)
            return c.Get((key,), cas)
        keys = tuple(tokens[1:])
        _check_keys(keys)
        return c.Get(keys, cas)

    def _gets(self, tokens: list[bytes], ntokens: int) -> c.Command:
        return self._get(tokens, ntokens, True)

    def _gat(self, tokens: list[bytes], ntokens: int, cas: bool) -> c.Command:
        if ntokens < 3:
            raise CommandError()
        exptime = parse_i32(tokens[1])
        if exptime is None:
            raise ClientError(_BAD_EXPTIME)
        keys = tuple(tokens[2:])
        _check_keys(keys)
        return c.Gat(exptime, keys, cas)

    def _store(self, tokens: list[bytes], ntokens: int, mode: StoreMode) -> None:
        with_cas = mode is StoreMode.CAS
        if ntokens not in ((7, 8) if with_cas else (6, 7)):
            raise CommandError()
        noreply = _noreply(tokens, ntokens)
        key = tokens[1]
        _check_key(key, noreply)
        flags = parse_u32(tokens[2])
        exptime = parse_i32(tokens[3])
        nbytes = parse_i32(tokens[4])
        if flags is None or exptime is None or nbytes is None:
            raise ClientError(_BAD_FORMAT, noreply)
        cas_unique = 0
        if with_cas:
            parsed = parse_u64(tokens[5])
            if parsed is None:
                raise ClientError(_BAD_FORMAT, noreply)
            cas_unique = parsed
        if nbytes < 0 or nbytes > 2**31 - 3:
            raise ClientError(_BAD_FORMAT, noreply)
        if c.item_size(key, nbytes, flags) > self.max_item_size:
            self._swallowing(c.TooLarge(mode, key, flags, exptime, nbytes, noreply), nbytes + 2)
            return None
        self._pending = (mode, key, flags, exptime, cas_unique, noreply, nbytes + 2)
        self._resume = self._store_value
        return None

    def _arith(self, tokens: list[bytes], ntokens: int, incr: bool) -> c.Command:
        key, delta, noreply = _key_and_number(tokens, ntokens, parse_u64, "invalid numeric delta argument")
        return c.Arith(key, delta, incr, noreply)

    def _delete(self, tokens: list[bytes], ntokens: int) -> c.Command:
        if not 3 <= ntokens <= 5:
            raise CommandError()
        noreply = False
        if ntokens > 3:
            hold_is_zero = tokens[2] == b"0"
            noreply = _noreply(tokens, ntokens)
            if not ((ntokens == 4 and (hold_is_zero or noreply)) or (ntokens == 5 and hold_is_zero and noreply)):
                raise ClientError(_BAD_FORMAT + ".  Usage: delete <key> [noreply]", noreply)
        _check_key(tokens[1], noreply)
        return c.Delete(tokens[1], noreply)

    def _touch(self, tokens: list[bytes], ntokens: int) -> c.Command:
        key, exptime, noreply = _key_and_number(tokens, ntokens, parse_i32, _BAD_EXPTIME)
        return c.Touch(key, exptime, noreply)

    def _flush_all(self, tokens: list[bytes], ntokens: int) -> c.Command:
        if not 2 <= ntokens <= 4:
            raise CommandError()
        noreply = _noreply(tokens, ntokens)
        delay: int | None = 0
        if ntokens != (3 if noreply else 2):
            delay = parse_i32(tokens[1])  # None: not a number, answered by dispatch (see FlushAll)
        return c.FlushAll(delay, noreply)

    def _verbosity(self, tokens: list[bytes], ntokens: int) -> c.Command:
        if ntokens not in (3, 4):
            raise CommandError()
        noreply = _noreply(tokens, ntokens)
        level = parse_u32(tokens[1])
        if level is None:
            raise ClientError(_BAD_FORMAT, noreply)
        return c.Verbosity(level, noreply)

    def _stats(self, tokens: list[bytes], ntokens: int) -> c.Command:
        return c.Stats(tuple(tokens[1:]))

    def _ms(self, tokens: list[bytes], ntokens: int) -> None:
        try:
            header = meta.parse_ms(tokens, ntokens)
        except meta.MsError as err:
            self._swallowing(None, err.swallow)
            raise
        if c.item_size(header.key, header.nbytes, header.client_flags) > self.max_item_size:
            self._swallowing(c.MsTooLarge(header.key, header.nbytes), header.nbytes + 2)
            return None
        self._pending = (header.command, header.nbytes + 2)
        self._resume = self._ms_value
        return None

    def _watch(self, tokens: list[bytes], ntokens: int) -> c.Command:
        cmd = admin.parse_watch(tokens, ntokens)
        self._resume = self._watching
        return cmd


def _check_key(key: bytes, noreply: bool = False) -> None:
    """memcached answers a key longer than KEY_MAX_LENGTH with a format error."""
    if len(key) > c.KEY_MAX_LENGTH:
        raise ClientError(_BAD_FORMAT, noreply)


def _check_keys(keys: tuple[bytes, ...]) -> None:
    for key in keys:
        _check_key(key)


def _key_and_number(
    tokens: list[bytes], ntokens: int, parse: Callable[[bytes], int | None], error: str
) -> tuple[bytes, int, bool]:
    """``<command> <key> <number> [noreply]`` (incr, decr, touch): the key, the number
    read by ``parse`` (else ``CLIENT_ERROR <error>``) and noreply."""
    if ntokens not in (4, 5):
        raise CommandError()
    noreply = _noreply(tokens, ntokens)
    _check_key(tokens[1], noreply)
    number = parse(tokens[2])
    if number is None:
        raise ClientError(error, noreply)
    return tokens[1], number, noreply


def _refuse(reply: bytes) -> c.Command:
    raise ProtocolError(reply)


_Handler = Callable[[Parser, list[bytes], int], "c.Command | None"]

#: dispatch table: command word -> handler (no if-chains)
_HANDLERS: dict[bytes, _Handler] = {
    b"get": Parser._get,
    b"gets": Parser._gets,
    b"bget": Parser._get,
    b"gat": lambda p, t, n: p._gat(t, n, False),
    b"gats": lambda p, t, n: p._gat(t, n, True),
    b"set": lambda p, t, n: p._store(t, n, StoreMode.SET),
    b"add": lambda p, t, n: p._store(t, n, StoreMode.ADD),
    b"replace": lambda p, t, n: p._store(t, n, StoreMode.REPLACE),
    b"append": lambda p, t, n: p._store(t, n, StoreMode.APPEND),
    b"prepend": lambda p, t, n: p._store(t, n, StoreMode.PREPEND),
    b"cas": lambda p, t, n: p._store(t, n, StoreMode.CAS),
    b"incr": lambda p, t, n: p._arith(t, n, True),
    b"decr": lambda p, t, n: p._arith(t, n, False),
    b"delete": Parser._delete,
    b"touch": Parser._touch,
    b"flush_all": Parser._flush_all,
    b"verbosity": Parser._verbosity,
    b"stats": Parser._stats,
    b"version": lambda p, t, n: c.Version(),
    b"quit": lambda p, t, n: c.Quit(),
    b"mn": lambda p, t, n: c.MetaNoop(),
    b"mg": lambda p, t, n: meta.parse_mg(t, n),
    b"ms": Parser._ms,
    b"md": lambda p, t, n: meta.parse_md(t, n),
    b"ma": lambda p, t, n: meta.parse_ma(t, n),
    b"me": lambda p, t, n: meta.parse_me(t, n),
    b"shutdown": lambda p, t, n: _refuse(b"ERROR: shutdown not enabled\r\n"),
    b"slabs": lambda p, t, n: admin.parse_slabs(t, n),
    b"lru": lambda p, t, n: admin.parse_lru(t, n),
    b"lru_crawler": lambda p, t, n: admin.parse_lru_crawler(t, n),
    b"watch": Parser._watch,
    b"cache_memlimit": lambda p, t, n: admin.parse_cache_memlimit(t, n),
}

__all__ = ["NEED_DATA", "Parser", "ProtocolError", "parse_u64", "parse_u32", "parse_i32"]
