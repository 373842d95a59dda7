"""The memcached binary protocol: sans-IO decoder of requests, encoder of responses.

A connection speaks binary when its first byte is :data:`REQUEST_MAGIC`
(memcached's ``try_read_command_negotiate``). The reader contract is the text
parser's: ``feed(data)`` appends bytes; ``next_command()`` returns a request
record, :data:`~mproxy.protocol.parser.NEED_DATA`, or raises a
:class:`~mproxy.protocol.errors.ProtocolError` whose ``reply`` is the exact
response frame.

Behaviour follows memcached 1.6.18 (``proto_bin.c``), checked against the
real binary (``tests/test_differential_binary.py``):

* a request is a 24-byte header, then ``extlen`` bytes of extras, ``keylen``
  bytes of key and the value (``bodylen`` counts all three). Only the header,
  extras and key are consumed before the opcode is looked at; the value is
  consumed by the commands that carry one (set, add, replace, append,
  prepend). Bytes the header claims beyond what a command reads (a ``stat`` or
  ``gat`` with a longer body) are read as the next request, as memcached does;
* a header whose magic byte is not :data:`REQUEST_MAGIC` closes the
  connection without a reply; an inconsistent header (``keylen`` or
  ``keylen + extlen`` above ``bodylen``) answers ``Unknown command``, a key
  over :data:`~mproxy.protocol.commands.KEY_MAX_LENGTH` or fields a command
  does not accept answer ``Invalid arguments``; both close the connection
  after the reply. The decoder raises a non-fatal error (its reply empty for
  the bad magic) and then returns :class:`~.commands.Quit`, so the replies
  to the requests before it are sent. memcached sends those it has written
  by then: after an error reply or a noop it writes at once, other replies
  wait, and a bad magic drops those waiting;
* an opcode memcached does not serve (``verbosity`` among them, and the SASL
  commands, memcached being built here without SASL) answers
  ``Unknown command`` and discards ``bodylen`` bytes *after* the extras and
  key it has already consumed (memcached's own arithmetic: a request with
  extras or a key loses the start of the next one);
* the quiet opcodes (``getq``, ``setq``, ...) are records with ``quiet`` set:
  dispatch answers nothing where memcached sends nothing (a success, a
  ``get`` miss), and errors all the same.

Memory stays bounded whatever a header claims: a value above ``max_item_size``
is discarded as it arrives (:class:`BinTooLarge`), so the buffer never holds
more than one header, extras, key and a value of at most ``max_item_size``
bytes beyond the last read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Final, NoReturn

from mproxy.protocol import commands as c
from mproxy.protocol.commands import StoreMode
from mproxy.protocol.errors import ProtocolError
from mproxy.protocol.parser import NEED_DATA, NeedData

#: First byte of every request (``PROTOCOL_BINARY_REQ``): it also picks the protocol of a connection.
REQUEST_MAGIC: Final = 0x80
#: First byte of every response (``PROTOCOL_BINARY_RES``).
RESPONSE_MAGIC: Final = 0x81
#: magic, opcode, keylen, extlen, datatype, status (vbucket in requests), bodylen, opaque, cas
HEADER: Final = struct.Struct(">BBHBBHIIQ")
HEADER_LENGTH: Final = HEADER.size
#: ``incr``/``decr`` expiry meaning "do not create a missing counter".
NO_CREATE: Final = 0xFFFFFFFF

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_STORE_EXTRAS = struct.Struct(">II")  # flags, expiry
_ARITH_EXTRAS = struct.Struct(">QQI")  # delta, initial, expiry


class Status:
    """Response status codes (``protocol_binary_response_status``)."""

    SUCCESS: Final = 0x00
    KEY_ENOENT: Final = 0x01
    KEY_EEXISTS: Final = 0x02
    E2BIG: Final = 0x03
    EINVAL: Final = 0x04
    NOT_STORED: Final = 0x05
    DELTA_BADVAL: Final = 0x06
    AUTH_ERROR: Final = 0x20
    UNKNOWN_COMMAND: Final = 0x81
    ENOMEM: Final = 0x82


#: The body memcached sends with each error status (``write_bin_error``).
ERROR_TEXT: Final[dict[int, bytes]] = {
    Status.KEY_ENOENT: b"Not found",
    Status.KEY_EEXISTS: b"Data exists for key.",
    Status.E2BIG: b"Too large.",
    Status.EINVAL: b"Invalid arguments",
    Status.NOT_STORED: b"Not stored.",
    Status.DELTA_BADVAL: b"Non-numeric server-side value for incr or decr",
    Status.AUTH_ERROR: b"Auth failure.",
    Status.UNKNOWN_COMMAND: b"Unknown command",
    Status.ENOMEM: b"Out of memory",
}


class Opcode:
    """The opcodes memcached 1.6 serves (``protocol_binary_command``)."""

    GET: Final = 0x00
    SET: Final = 0x01
    ADD: Final = 0x02
    REPLACE: Final = 0x03
    DELETE: Final = 0x04
    INCREMENT: Final = 0x05
    DECREMENT: Final = 0x06
    QUIT: Final = 0x07
    FLUSH: Final = 0x08
    GETQ: Final = 0x09
    NOOP: Final = 0x0A
    VERSION: Final = 0x0B
    GETK: Final = 0x0C
    GETKQ: Final = 0x0D
    APPEND: Final = 0x0E
    PREPEND: Final = 0x0F
    STAT: Final = 0x10
    SETQ: Final = 0x11
    ADDQ: Final = 0x12
    REPLACEQ: Final = 0x13
    DELETEQ: Final = 0x14
    INCREMENTQ: Final = 0x15
    DECREMENTQ: Final = 0x16
    QUITQ: Final = 0x17
    FLUSHQ: Final = 0x18
    APPENDQ: Final = 0x19
    PREPENDQ: Final = 0x1A
    TOUCH: Final = 0x1C
    GAT: Final = 0x1D
    GATQ: Final = 0x1E
    SASL_LIST_MECHS: Final = 0x20
    SASL_AUTH: Final = 0x21
    SASL_STEP: Final = 0x22
    GATK: Final = 0x23
    GATKQ: Final = 0x24


#: opcode -> name (audit records, logs): memcached's names, lower case.
OPCODE_NAMES: Final[dict[int, str]] = {
    value: name.lower() for name, value in vars(Opcode).items() if not name.startswith("_")
}


# -- records ----------------------------------------------------------------


class _Request:
    """What every record has: the request's ``opcode`` (echoed in the response; its
    ``name`` is memcached's) and ``opaque``. ``noreply`` is False: quiet requests still
    answer errors, so their handler decides what to send (b"" where memcached sends
    nothing)."""

    __slots__ = ()
    opcode: int
    noreply = False

    @property
    def name(self) -> str:
        return OPCODE_NAMES[self.opcode]


class _Keyed(_Request, c.OneKey):
    """A request on one key: ``keys`` is ``(key,)``, as the text records name theirs
    (:class:`~.commands.OneKey`); flush, noop, version, quit and stat have ``keys = None``."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class BinGet(_Keyed):
    """get, getq, getk, getkq: ``with_key`` for the k forms (the key is echoed)."""

    opcode: int
    opaque: int
    key: bytes
    quiet: bool = False
    with_key: bool = False


@dataclass(frozen=True, slots=True)
class BinTouch(_Keyed):
    """touch, gat, gatq, gatk, gatkq: set the expiry, answer the flags (and the value
    unless ``touch``)."""

    opcode: int
    opaque: int
    key: bytes
    exptime: int
    quiet: bool = False
    with_key: bool = False
    with_value: bool = True


@dataclass(frozen=True, slots=True)
class BinStore(_Keyed):
    """set, add, replace, append, prepend and their quiet forms. ``cas`` is the
    request's CAS field (0: none); append and prepend carry no flags or expiry."""

    opcode: int
    opaque: int
    mode: StoreMode
    key: bytes
    flags: int
    exptime: int
    value: bytes
    cas: int = 0
    quiet: bool = False


@dataclass(frozen=True, slots=True)
class BinTooLarge(_Keyed):
    """A store whose value is over ``max_item_size``: its bytes are being discarded."""

    opcode: int
    opaque: int
    mode: StoreMode
    key: bytes
    flags: int
    exptime: int
    nbytes: int
    quiet: bool = False


@dataclass(frozen=True, slots=True)
class BinDelete(_Keyed):
    opcode: int
    opaque: int
    key: bytes
    cas: int = 0
    quiet: bool = False


@dataclass(frozen=True, slots=True)
class BinArith(_Keyed):
    """increment / decrement: a missing counter is created as ``initial`` (answered
    as is) unless ``exptime`` is :data:`NO_CREATE`."""

    opcode: int
    opaque: int
    key: bytes
    incr: bool
    delta: int
    initial: int
    exptime: int
    cas: int = 0
    quiet: bool = False


@dataclass(frozen=True, slots=True)
class BinFlush(_Request):
    opcode: int
    opaque: int
    delay: int = 0
    quiet: bool = False
    keys = None


@dataclass(frozen=True, slots=True)
class BinSimple(_Request):
    """noop, version, quit: no arguments (quit ends the connection after its reply)."""

    opcode: int
    opaque: int
    keys = None


@dataclass(frozen=True, slots=True)
class BinStat(_Request):
    """stat: ``key`` is the group (empty: the general statistics)."""

    opcode: int
    opaque: int
    key: bytes = b""
    keys = None


BinCommand = BinGet | BinTouch | BinStore | BinTooLarge | BinDelete | BinArith | BinFlush | BinSimple | BinStat

for _record in (BinGet, BinTouch, BinStore, BinTooLarge, BinDelete, BinArith, BinFlush, BinSimple, BinStat):
    c.fast_init(_record)


# -- encoder ----------------------------------------------------------------


def response(
    opcode: int,
    opaque: int,
    status: int = Status.SUCCESS,
    extras: bytes = b"",
    key: bytes = b"",
    value: bytes = b"",
    cas: int = 0,
) -> bytes:
    """One response frame."""
    header = HEADER.pack(
        RESPONSE_MAGIC, opcode, len(key), len(extras), 0, status, len(extras) + len(key) + len(value), opaque, cas
    )
    return b"".join((header, extras, key, value))


def error(opcode: int, opaque: int, status: int, text: bytes | None = None) -> bytes:
    """An error frame: ``status`` with memcached's text for it, or ``text``."""
    return response(opcode, opaque, status, value=ERROR_TEXT[status] if text is None else text)


def item(opcode: int, opaque: int, flags: int, cas: int, key: bytes = b"", value: bytes = b"") -> bytes:
    """A hit of get/getk/gat/gatk/touch: the flags as extras, the item's CAS."""
    return response(opcode, opaque, extras=_U32.pack(flags), key=key, value=value, cas=cas)


def counter(opcode: int, opaque: int, number: int, cas: int) -> bytes:
    """increment/decrement: the new value as 8 bytes."""
    return response(opcode, opaque, value=_U64.pack(number), cas=cas)


def stat(opcode: int, opaque: int, name: bytes, value: bytes) -> bytes:
    """One statistic; ``stat(op, opaque, b"", b"")`` is the terminator of a stat answer."""
    return response(opcode, opaque, key=name, value=value)


# -- decoder ----------------------------------------------------------------

#: quiet opcode -> the opcode it is the quiet form of (memcached's first switch)
QUIET_FORMS: Final[dict[int, int]] = {
    Opcode.SETQ: Opcode.SET,
    Opcode.ADDQ: Opcode.ADD,
    Opcode.REPLACEQ: Opcode.REPLACE,
    Opcode.DELETEQ: Opcode.DELETE,
    Opcode.INCREMENTQ: Opcode.INCREMENT,
    Opcode.DECREMENTQ: Opcode.DECREMENT,
    Opcode.QUITQ: Opcode.QUIT,
    Opcode.FLUSHQ: Opcode.FLUSH,
    Opcode.APPENDQ: Opcode.APPEND,
    Opcode.PREPENDQ: Opcode.PREPEND,
    Opcode.GETQ: Opcode.GET,
    Opcode.GETKQ: Opcode.GETK,
    Opcode.GATQ: Opcode.GAT,
    Opcode.GATKQ: Opcode.GATK,
}

_STORE_MODES: Final = {
    Opcode.SET: StoreMode.SET,
    Opcode.ADD: StoreMode.ADD,
    Opcode.REPLACE: StoreMode.REPLACE,
    Opcode.APPEND: StoreMode.APPEND,
    Opcode.PREPEND: StoreMode.PREPEND,
}


@dataclass(frozen=True, slots=True)
class _Header:
    """A request header, with its extras and key (already in the buffer)."""

    opcode: int
    base: int  # opcode without the quiet bit (memcached's c->cmd)
    quiet: bool
    extlen: int
    keylen: int
    bodylen: int
    opaque: int
    cas: int
    extras: bytes
    key: bytes


class BinaryParser:
    """Decoder state for one binary connection (same contract as :class:`~.parser.Parser`)."""

    __slots__ = ("_buf", "_pos", "_skip", "_pending", "_ended", "max_item_size")

    def __init__(self, max_item_size: int = c.DEFAULT_MAX_ITEM_SIZE) -> None:
        self.max_item_size = max_item_size
        self._buf = bytearray()
        self._pos = 0
        #: bytes still to discard (a too-large value, an unknown command's body)
        self._skip = 0
        #: a store whose header is consumed, waiting for its value: (header, value length)
        self._pending: tuple[_Header, int] | None = None
        #: after a reply that closes the connection: only Quit from now on
        self._ended = False

    def feed(self, data: bytes) -> None:
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed."""
        return len(self._buf) - self._pos

    def next_command(self) -> BinCommand | c.Quit | NeedData:
        if self._ended:
            return c.Quit()
        buf = self._buf
        if self._skip:
            take = min(self._skip, len(buf) - self._pos)
            self._pos += take
            self._skip -= take
            if self._skip:
                return NEED_DATA
        if self._pending is not None:
            header, vlen = self._pending
            start = self._pos
            if len(buf) - start < vlen:
                return NEED_DATA
            self._pending = None
            self._pos = start + vlen
            return _store(header, bytes(buf[start : start + vlen]))
        pos = self._pos
        if len(buf) - pos < HEADER_LENGTH:
            return NEED_DATA
        magic, opcode, keylen, extlen, _, _, bodylen, opaque, cas = HEADER.unpack_from(buf, pos)
        if magic != REQUEST_MAGIC:
            # no reply; the replies before it are sent (see the module docstring)
            self._ended = True
            raise ProtocolError(b"", f"binary request with magic byte 0x{magic:02x}, not 0x{REQUEST_MAGIC:02x}")
        end = pos + HEADER_LENGTH + extlen + keylen
        if len(buf) < end:
            return NEED_DATA
        extras = bytes(buf[pos + HEADER_LENGTH : pos + HEADER_LENGTH + extlen])
        key = bytes(buf[pos + HEADER_LENGTH + extlen : end])
        self._pos = end
        if keylen > bodylen or keylen + extlen > bodylen:
            raise self._closing(opcode, opaque, Status.UNKNOWN_COMMAND, "header lengths disagree")
        if keylen > c.KEY_MAX_LENGTH:
            raise self._closing(opcode, opaque, Status.EINVAL, f"key of {keylen} bytes")
        base = QUIET_FORMS.get(opcode, opcode)
        header = _Header(opcode, base, base != opcode, extlen, keylen, bodylen, opaque, cas, extras, key)
        handler = _OPCODES.get(base)
        if handler is None:
            # memcached discards bodylen more bytes, although it consumed extras and key already
            self._skip = _swallowed(bodylen)
            raise ProtocolError(error(opcode, opaque, Status.UNKNOWN_COMMAND), f"unknown binary opcode 0x{opcode:02x}")
        result = handler(self, header)
        if result is None:  # a store: its value follows
            return self.next_command()
        return result

    def _closing(self, opcode: int, opaque: int, status: int, detail: str) -> ProtocolError:
        """An error reply after which memcached closes the connection."""
        self._ended = True
        return ProtocolError(error(opcode, opaque, status), f"binary opcode 0x{opcode:02x}: {detail}")

    def _invalid(self, h: _Header) -> ProtocolError:
        return self._closing(h.opcode, h.opaque, Status.EINVAL, "invalid arguments")

    # -- one opcode each (memcached's dispatch_bin_command) ---------------------

    def _get(self, h: _Header) -> BinGet:
        if h.extlen or h.bodylen != h.keylen or not h.keylen:
            raise self._invalid(h)
        return BinGet(h.opcode, h.opaque, h.key, h.quiet, h.base == Opcode.GETK)

    def _touch(self, h: _Header) -> BinTouch:
        if h.extlen != 4 or not h.keylen:
            raise self._invalid(h)
        (exptime,) = _U32.unpack(h.extras)
        return BinTouch(
            h.opcode, h.opaque, h.key, exptime, h.quiet, h.base == Opcode.GATK, h.base != Opcode.TOUCH
        )

    def _update(self, h: _Header) -> BinTooLarge | None:
        if h.extlen != 8 or not h.keylen or h.bodylen < h.keylen + 8:
            raise self._invalid(h)
        return self._value(h)

    def _concat(self, h: _Header) -> BinTooLarge | None:
        if h.extlen or not h.keylen:
            raise self._invalid(h)
        return self._value(h)

    def _value(self, h: _Header) -> BinTooLarge | None:
        vlen = h.bodylen - h.extlen - h.keylen
        flags, exptime = _STORE_EXTRAS.unpack(h.extras) if h.extlen else (0, 0)
        if c.item_size(h.key, vlen, flags) > self.max_item_size:
            self._skip = vlen
            return BinTooLarge(h.opcode, h.opaque, _STORE_MODES[h.base], h.key, flags, exptime, vlen, h.quiet)
        self._pending = (h, vlen)
        return None

    def _delete(self, h: _Header) -> BinDelete:
        if not h.keylen or h.extlen or h.bodylen != h.keylen:
            raise self._invalid(h)
        return BinDelete(h.opcode, h.opaque, h.key, h.cas, h.quiet)

    def _arith(self, h: _Header) -> BinArith:
        if not h.keylen or h.extlen != 20 or h.bodylen != h.keylen + 20:
            raise self._invalid(h)
        delta, initial, exptime = _ARITH_EXTRAS.unpack(h.extras)
        return BinArith(h.opcode, h.opaque, h.key, h.base == Opcode.INCREMENT, delta, initial, exptime, h.cas, h.quiet)

    def _flush(self, h: _Header) -> BinFlush:
        if h.keylen or h.bodylen != h.extlen or h.extlen not in (0, 4):
            raise self._invalid(h)
        delay = _U32.unpack(h.extras)[0] if h.extlen else 0
        return BinFlush(h.opcode, h.opaque, delay, h.quiet)

    def _simple(self, h: _Header) -> BinSimple:
        if h.extlen or h.keylen or h.bodylen:
            raise self._invalid(h)
        return BinSimple(h.opcode, h.opaque)

    def _quit(self, h: _Header) -> BinSimple:
        cmd = self._simple(h)
        self._ended = True  # the connection closes after quit's reply (none for quitq)
        return cmd

    def _stat(self, h: _Header) -> BinStat:
        if h.extlen:
            raise self._invalid(h)
        return BinStat(h.opcode, h.opaque, h.key)

    def _sasl_list(self, h: _Header) -> NoReturn:
        if h.extlen or h.keylen or h.bodylen:
            raise self._invalid(h)
        raise ProtocolError(error(h.opcode, h.opaque, Status.UNKNOWN_COMMAND), "SASL is not enabled")

    def _sasl_auth(self, h: _Header) -> NoReturn:
        if h.extlen or not h.keylen:
            raise self._invalid(h)
        self._skip = _swallowed(h.bodylen - h.keylen)
        raise ProtocolError(error(h.opcode, h.opaque, Status.UNKNOWN_COMMAND), "SASL is not enabled")


def _swallowed(count: int) -> int:
    """The bytes memcached discards after an error reply: its ``write_bin_error`` takes the
    count as a C ``int``, so from 2**31 on it is negative and nothing is discarded."""
    return count if count < 2**31 else 0


def _store(h: _Header, value: bytes) -> BinStore:
    flags, exptime = _STORE_EXTRAS.unpack(h.extras) if h.extlen else (0, 0)
    return BinStore(h.opcode, h.opaque, _STORE_MODES[h.base], h.key, flags, exptime, value, h.cas, h.quiet)


_Handler = Callable[[BinaryParser, _Header], "BinCommand | None"]

#: dispatch table: opcode (quiet forms folded) -> reader of its fields
_OPCODES: Final[dict[int, _Handler]] = {
    Opcode.GET: BinaryParser._get,
    Opcode.GETK: BinaryParser._get,
    Opcode.TOUCH: BinaryParser._touch,
    Opcode.GAT: BinaryParser._touch,
    Opcode.GATK: BinaryParser._touch,
    Opcode.SET: BinaryParser._update,
    Opcode.ADD: BinaryParser._update,
    Opcode.REPLACE: BinaryParser._update,
    Opcode.APPEND: BinaryParser._concat,
    Opcode.PREPEND: BinaryParser._concat,
    Opcode.DELETE: BinaryParser._delete,
    Opcode.INCREMENT: BinaryParser._arith,
    Opcode.DECREMENT: BinaryParser._arith,
    Opcode.FLUSH: BinaryParser._flush,
    Opcode.NOOP: BinaryParser._simple,
    Opcode.VERSION: BinaryParser._simple,
    Opcode.QUIT: BinaryParser._quit,
    Opcode.STAT: BinaryParser._stat,
    Opcode.SASL_LIST_MECHS: BinaryParser._sasl_list,
    Opcode.SASL_AUTH: BinaryParser._sasl_auth,
    Opcode.SASL_STEP: BinaryParser._sasl_auth,
}

__all__ = [
    "REQUEST_MAGIC", "BinaryParser", "Opcode", "Status", "response", "error", "item", "counter", "stat",
    "BinGet", "BinTouch", "BinStore", "BinTooLarge", "BinDelete", "BinArith", "BinFlush", "BinSimple", "BinStat",
]
