"""The meta commands of memcached 1.6.18's text protocol: ``mg ms md ma me``.

Their lines are parsed here as ``proto_text.c`` parses them, so that every
error is memcached's, in memcached's order: the key and token-count checks of
each command, then ``_meta_flag_preparse`` (one pass over the flags: the first
unknown or repeated flag ends it at once; a bad token, a bad base64 key or an
``M`` token of the wrong length is remembered and reported at the end, the last
message set winning), then the checks each command makes after it.

A flag is a token whose first byte names it; what follows that byte is its
argument (``T30``, ``Oabc``) or ignored (``vxyz`` is ``v``). The records keep
the flag tokens in the order sent: replies echo ``O``/``k``/``c``/``t``/...
in that order (see :mod:`mproxy.dispatch.meta`).

Stdlib only, like the rest of :mod:`mproxy.protocol`.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Final

from mproxy.protocol import commands as c
from mproxy.protocol.errors import ClientError, CommandError, ProtocolError
from mproxy.protocol.numbers import parse_i32, parse_u32, parse_u64

#: memcached ``MFLAG_MAX_OPT_LENGTH``: a meta line of more tokens (counting
#: memcached's terminal token) is refused.
MFLAG_MAX_OPT_LENGTH: Final = 20
#: memcached ``MFLAG_MAX_OPAQUE_LENGTH``: longest ``O`` token (with its ``O``).
MFLAG_MAX_OPAQUE_LENGTH: Final = 32

BAD_FORMAT: Final = "bad command line format"
BAD_TOKEN: Final = "bad token in command line format"
INVALID_FLAG: Final = "invalid flag"
#: what md and ma answer for any error their flag pass finds
INVALID_OR_DUPLICATE: Final = "invalid or duplicate flag"
OPAQUE_TOO_LONG: Final = "opaque token too long"

#: ms ``M`` token -> storage mode (``C`` turns SET and REPLACE into CAS, see :class:`Ms`)
MS_MODES: Final = {
    ord("S"): c.StoreMode.SET,
    ord("E"): c.StoreMode.ADD,
    ord("R"): c.StoreMode.REPLACE,
    ord("A"): c.StoreMode.APPEND,
    ord("P"): c.StoreMode.PREPEND,
}
#: ma ``M`` token -> incr (True) or decr (False)
MA_MODES: Final = {ord("I"): True, ord("+"): True, ord("D"): False, ord("-"): False}

# The flags memcached 1.6.18's preparse knows; any other first byte is "invalid flag".
# (``E`` and ``x``, documented for later versions, are not among them.)
_KNOWN = frozenset(b"bNTRlOPLkstcfvhuqFCMJDI")

_B64_SYMBOLS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


def b64decode(token: bytes) -> bytes | None:
    """memcached's ``base64_decode`` of a key token, or None where it returns 0.

    Bytes outside the alphabet are skipped; the rest must be a non-zero
    multiple of 4; decoding stops after the first group holding ``=``, which
    may pad one or two bytes only."""
    symbols = bytes(b for b in token if b in _B64_SYMBOLS)
    if not symbols or len(symbols) % 4:
        return None
    pad_at = symbols.find(b"=")
    if pad_at < 0:
        return binascii.a2b_base64(symbols)
    end = pad_at - pad_at % 4 + 4  # the group holding the first "=" is the last decoded
    group = symbols[end - 4 : end]
    pad = group.count(b"=")
    if pad > 2:
        return None
    # memcached decodes "=" as 0 wherever it stands in the group, then drops `pad` bytes
    return binascii.a2b_base64(symbols[: end - 4] + group.replace(b"=", b"A"))[: (end // 4) * 3 - pad]


def b64encode(key: bytes) -> bytes:
    """memcached's ``base64_encode``: standard alphabet, padded, one line."""
    return binascii.b2a_base64(key, newline=False)


@dataclass(slots=True)
class _Flags:
    """What the flag pass found (memcached's ``struct _meta_flags``)."""

    key: bytes
    binary: bool = False
    quiet: bool = False
    value: bool = False
    no_update: bool = False
    #: a flag that makes memcached take the item lock (T N R l h): the LRU bump waits
    locked: bool = False
    touch: int | None = None
    vivify: int | None = None
    recache: int | None = None
    client_flags: int = 0
    compare_cas: int | None = None
    mode: int = 0
    initial: int = 0
    delta: int = 1
    invalidate: bool = False
    #: index (among the flag tokens) of the first ``O`` token over the limit, or -1
    long_opaque: int = -1


def _preparse(key: bytes, flags: list[bytes], default_error: str) -> _Flags:
    """memcached's ``_meta_flag_preparse``; raises ClientError with its message."""
    out = _Flags(key)
    seen: set[int] = set()
    error: str | None = None
    errstr = default_error
    for index, token in enumerate(flags):
        o = token[0]
        if o >= 127 or o in seen:
            raise ClientError("duplicate flag")
        seen.add(o)
        arg = token[1:]
        if o not in _KNOWN:
            raise ClientError(INVALID_FLAG)
        if o == 98:  # b
            decoded = b64decode(out.key)
            if decoded is None:
                errstr = error = "error decoding key"
                decoded = b""
            out.key = decoded
            out.binary = True
        elif o in b"NTR":
            out.locked = True
            number = parse_i32(arg)
            if number is None:
                errstr = error = BAD_TOKEN
            elif o == 78:
                out.vivify = number
            elif o == 84:
                out.touch = number
            else:
                out.recache = number
        elif o == 108 or o == 104:  # l h
            out.locked = True
        elif o == 79:  # O
            if out.long_opaque < 0 and len(token) > MFLAG_MAX_OPAQUE_LENGTH:
                out.long_opaque = index
        elif o == 118:
            out.value = True
        elif o == 117:
            out.no_update = True
        elif o == 113:
            out.quiet = True
        elif o == 70:  # F: a bad number is an error with the command's default message
            number = parse_u32(arg)
            if number is None:
                error = errstr
            else:
                out.client_flags = number
        elif o == 67:  # C
            number = parse_u64(arg)
            if number is None:
                errstr = error = BAD_TOKEN
            else:
                out.compare_cas = number
        elif o == 77:  # M
            if len(token) != 2:
                errstr = error = "incorrect length for M token"
            else:
                out.mode = token[1]
        elif o == 74:  # J
            number = parse_u64(arg)
            if number is None:
                errstr = error = "invalid numeric initial value"
            else:
                out.initial = number
        elif o == 68:  # D
            number = parse_u64(arg)
            if number is None:
                errstr = error = "invalid numeric delta value"
            else:
                out.delta = number
        elif o == 73:  # I
            out.invalidate = True
        # k s t c f P L: nothing to prepare
    if error is not None:
        raise ClientError(errstr)
    return out


def _check_line(tokens: list[bytes], ntokens: int, too_many: str) -> None:
    """What mg, ms, md and ma check before their flags: a key (else ``ERROR``), not
    over 250 bytes, and not too many tokens (each words that differently)."""
    if ntokens < 3:
        raise CommandError()
    if len(tokens[1]) > c.KEY_MAX_LENGTH:
        raise ClientError(BAD_FORMAT)
    if ntokens > MFLAG_MAX_OPT_LENGTH:
        raise ClientError(too_many)


def _md_ma_flags(tokens: list[bytes], ntokens: int) -> _Flags:
    """md and ma answer every error of their flag pass the same way."""
    _check_line(tokens, ntokens, "options flags too long")
    try:
        return _preparse(tokens[1], tokens[2:], BAD_FORMAT)
    except ClientError:
        raise ClientError(INVALID_OR_DUPLICATE) from None


def parse_mg(tokens: list[bytes], ntokens: int) -> c.Command:
    _check_line(tokens, ntokens, "options flags are too long")
    flags = tokens[2:]
    f = _preparse(tokens[1], flags, BAD_FORMAT)
    return c.Mg(
        key=f.key, flags=tuple(flags), binary=f.binary, quiet=f.quiet, value=f.value,
        touch=f.touch, vivify=f.vivify, recache=f.recache, no_update=f.no_update,
        locked=f.locked, long_opaque=f.long_opaque,
    )


def parse_md(tokens: list[bytes], ntokens: int) -> c.Command:
    f = _md_ma_flags(tokens, ntokens)
    if f.long_opaque >= 0:
        raise ClientError(OPAQUE_TOO_LONG)
    return c.Md(
        key=f.key, flags=tuple(tokens[2:]), binary=f.binary, quiet=f.quiet,
        compare_cas=f.compare_cas, invalidate=f.invalidate, touch=f.touch,
    )


def parse_ma(tokens: list[bytes], ntokens: int) -> c.Command:
    f = _md_ma_flags(tokens, ntokens)
    incr = True
    if f.mode:
        mode = MA_MODES.get(f.mode)
        if mode is None:
            raise ClientError("invalid mode for ma M token")
        incr = mode
    return c.Ma(
        key=f.key, flags=tuple(tokens[2:]), binary=f.binary, quiet=f.quiet, value=f.value,
        incr=incr, delta=f.delta, initial=f.initial, vivify=f.vivify, touch=f.touch,
        compare_cas=f.compare_cas or 0, long_opaque=f.long_opaque,
    )


def parse_me(tokens: list[bytes], ntokens: int) -> c.Command:
    if ntokens < 3 or len(tokens[1]) > c.KEY_MAX_LENGTH:
        raise ClientError(BAD_FORMAT)
    key = tokens[1]
    binary = ntokens >= 4 and tokens[2] == b"b"
    if binary:
        decoded = b64decode(key)
        if decoded is None:
            raise ClientError(BAD_FORMAT)
        key = decoded
    return c.Me(key, binary)


@dataclass(frozen=True, slots=True)
class MsHeader:
    """An ``ms`` line checked up to its data block: what the parser needs to read it."""

    key: bytes
    nbytes: int
    flags: tuple[bytes, ...]
    binary: bool
    quiet: bool
    mode: c.StoreMode
    client_flags: int
    exptime: int
    compare_cas: int | None
    invalidate: bool

    def command(self, value: bytes) -> c.Ms:
        return c.Ms(
            key=self.key, value=value, flags=self.flags, binary=self.binary, quiet=self.quiet,
            mode=self.mode, client_flags=self.client_flags, exptime=self.exptime,
            compare_cas=self.compare_cas, invalidate=self.invalidate,
        )


class MsError(ProtocolError):
    """An ``ms`` refused after its length was read: memcached answers, then
    swallows ``nbytes`` + 2 bytes of data (whatever they are)."""

    def __init__(self, message: str, nbytes: int) -> None:
        super().__init__(message.encode() + b"\r\n")
        self.swallow = nbytes + 2


def parse_ms(tokens: list[bytes], ntokens: int) -> MsHeader:
    """The header of an ``ms``; raises ProtocolError (nothing to swallow) or
    :class:`MsError` (the data block follows and is swallowed)."""
    _check_line(tokens, ntokens, "options flags too long")
    if ntokens == 3:  # a key and no length
        raise ClientError(BAD_FORMAT)
    nbytes = parse_i32(tokens[2])
    if nbytes is None or nbytes < 0 or nbytes > 2**31 - 3:
        raise ClientError(BAD_FORMAT)
    flags = tokens[3:]
    try:
        f = _preparse(tokens[1], flags, BAD_FORMAT)
    except ClientError as err:
        raise MsError("CLIENT_ERROR " + err.message, nbytes) from None
    if f.mode:
        mode = MS_MODES.get(f.mode)
        if mode is None:
            raise MsError("CLIENT_ERROR invalid mode for ms M token", nbytes)
    else:
        mode = c.StoreMode.SET
    if f.long_opaque >= 0:
        raise MsError("CLIENT_ERROR " + OPAQUE_TOO_LONG, nbytes)
    if f.compare_cas is not None and mode in (c.StoreMode.SET, c.StoreMode.REPLACE):
        mode = c.StoreMode.CAS
    return MsHeader(
        key=f.key, nbytes=nbytes, flags=tuple(flags), binary=f.binary, quiet=f.quiet, mode=mode,
        client_flags=f.client_flags, exptime=f.touch if f.touch is not None else 0,
        compare_cas=f.compare_cas, invalidate=f.invalidate,
    )
