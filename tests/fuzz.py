r"""Whole-server fuzzing: mutated memcached inputs, sent to mproxy (and to memcached, the arbiter).

Used by ``tests/test_fuzz_e2e.py`` (a seeded slice per backend) and ``scripts/fuzz``
(the full run: ``--count``, ``--seed``, ``--backend``).

Inputs
------
:func:`generate` makes one input from a ``random.Random``: one to four commands of one
protocol (text and meta share a connection; binary is a connection of its own, as
memcached picks the protocol per connection from the first byte), built valid from
templates, then mutated: numbers swapped for boundary values (0, -1, 2^32, 2^64, 2^64 + 1,
20 digits, ``abc``, ``1a``, ``+5``...), ``noreply`` added, keys of 250 and 251 bytes,
data blocks one byte short or long or without their ``\r\n``, values at the item size
limit, multi-gets of up to 2,000 keys, binary header fields (magic, opcode, key, extras
and body lengths) replaced; then, sometimes, byte-level damage (a byte flipped,
inserted or dropped; the input cut short).

Running one input (:class:`Target`)
-----------------------------------
On a fresh connection: send the input, half-close (``SHUT_WR``), read until the server
closes. memcached answers every command it read, then closes on end of file; so must
mproxy. The no-hang check: no reply stalls for :data:`INPUT_DEADLINE` seconds (no byte,
no close), and none takes over :data:`INPUT_TOTAL_DEADLINE`. On
the memory backend, where memcached is the arbiter, both servers are emptied first
(``flush_all`` on a control connection) so every input starts from the same state, and
the replies, normalised as the differential tests do (CAS uniques numbered by first
appearance, clock-dependent meta figures masked), must be identical byte for byte.

What is not generated (documented differences, or not deterministic)
-------------------------------------------------------------------
:data:`EXCLUDED` lists them with the reason; ``docs/reliability.md`` repeats it.
"""

from __future__ import annotations

import os
import random
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from mproxy.protocol import binary as b
from mproxy.protocol.binary import BinaryParser
from mproxy.protocol.commands import DEFAULT_MAX_ITEM_SIZE, KEY_MAX_LENGTH, MAX_LINE_LENGTH, Quit
from mproxy.protocol.errors import ProtocolError
from mproxy.protocol.parser import NeedData, Parser
from tests.servers import HOST
from tests.test_binary_parser import split_frames
from tests.test_differential import Normaliser, split_units
from tests.test_differential_binary import Normaliser as BinaryNormaliser

#: Seconds a reply may make no progress (no byte, no close) before the input counts as a hang.
INPUT_DEADLINE = 10.0
#: Seconds a whole reply may take: a multi-get naming a 1 MiB item 600 times is 600 MB.
INPUT_TOTAL_DEADLINE = 300.0

#: Command classes never generated, and why (the list ``docs/reliability.md`` gives).
EXCLUDED: dict[str, str] = {
    "stats (text, binary)": "the proxy reports its own counters (docs/compatibility.md: stats)",
    "me (meta debug)": "prints memcached's internal item fields (slab class, last access)",
    "watch, shutdown, cache_memlimit, slabs, lru, lru_crawler, extstore": "server administration: "
    "documented as refused or differing in docs/compatibility.md, and they change memcached's own state",
    "flush_all / binary flush with a delay > 0": "the outcome depends on the wall clock",
    "exptime 1 .. 2592000 s (relative, not yet past)": "the outcome depends on the wall clock "
    "(both servers see the same input ms apart, but their clocks tick on different seconds)",
    "meta T or N below zero": "memcached 1.6.18 answers the item's t as its own uptime wrapped to "
    "32 bits (mg k N0 T-1 t: t4294967234)",
    "binary set/add/replace/append/prepend with a body length of 2**31 or more": "an open finding: "
    "memcached 1.6.18 answers some of them (e.g. replace, flags 0xffffffff, body 0xffffffff: "
    "'Too large.', then reads the next request at once) and closes on others; mproxy answers "
    "'Too large.' and discards the body as it arrives. Reported, not fixed",
    "binary writes with an exptime in the past": "mproxy answers CAS 0, memcached the unique of the "
    "invisible item (docs/compatibility.md, binary CAS)",
}

#: Inputs run but compared only in part, and why (``docs/reliability.md`` repeats it).
PARTLY_COMPARED: dict[str, str] = {
    "input ending inside a data block or a binary request body": "memcached holds the replies of "
    "the read until the block is complete, and drops them when the client half-closes; mproxy "
    "sends them. Checked: memcached's reply is a prefix of mproxy's",
    "a binary write whose exptime is in the past (made by byte damage)": "mproxy answers CAS 0, "
    "memcached the unique of the invisible item (docs/compatibility.md). Checked: identical but for "
    "the CAS of write answers",
    "a bad magic byte (binary)": "memcached drops the replies it has not sent yet, mproxy sends them "
    "(docs/compatibility.md). Checked: memcached's reply is a prefix of mproxy's",
    "get/gets/gat/gats naming a key over 250 bytes after other commands in the same read": "memcached "
    "1.6.18 discards the replies of the earlier commands it has not sent yet (a memcached bug: the "
    "client loses replies); mproxy answers them. Not compared",
    "a fatal error (HTTP request line, command line over 2048 bytes) in the text protocol": "which "
    "replies before it go out depends on memcached's flush points (every get, mn, 20 commands) and on "
    "how the input was split into reads (docs/compatibility.md, Pipelines). Checked: one reply is a "
    "prefix of the other",
    "incr/decr of a value memcached reads past (empty or white space only)": "memcached's strtoull "
    "skips the white space and goes on into the bytes after the value in its slab chunk: it answers "
    "a number left there by an earlier item, or non-numeric (a memcached bug); mproxy answers "
    "non-numeric. Not compared when that is the only difference",
    "a malformed data block of a value within memcached's item overhead of the limit": "memcached "
    "refuses the item from its header (SERVER_ERROR object too large for cache) before reading the "
    "block, mproxy reads the block first and answers CLIENT_ERROR bad data chunk (an open finding, "
    "reported). Checked: identical but for that line",
}

#: Keys the templates use: few, so commands of one input meet each other's items.
KEYS = (b"a", b"b", b"k1", b"\xc3\xa9t\xc3\xa9", b"x" * KEY_MAX_LENGTH)
#: Values of the templates (boundary sizes are added by mutation).
VALUES = (b"", b"v", b"0", b"42", b"18446744073709551615", b"hello world", b" 7", b"a\r\n\r\n", b"\0\xff")
#: Numbers a mutation swaps in.
BAD_NUMBERS = (
    b"0", b"-1", b"1", b"4294967295", b"4294967296", b"-2147483648", b"2147483648", b"9223372036854775807",
    b"18446744073709551615", b"18446744073709551616", b"99999999999999999999999", b"abc", b"1a", b"+5",
    b"-0", b"0x10", b"007", b"1.5", b"\t3", b"",
)
#: exptimes that do not depend on the clock: none, past (negative, or an absolute time in
#: 1970), the 30-day boundary as an absolute time, far future.
EXPTIMES = (b"0", b"-1", b"-2147483648", b"2592001", b"4294967295", b"99999999999999999999", b"abc", b"1a")
#: Value lengths at the item size limit (memcached -I 1m; the header and key take some bytes).
BIG_LENGTHS = (DEFAULT_MAX_ITEM_SIZE - 100, DEFAULT_MAX_ITEM_SIZE - 60, DEFAULT_MAX_ITEM_SIZE, DEFAULT_MAX_ITEM_SIZE + 1)
META_FLAGS = (b"v", b"k", b"c", b"f", b"s", b"t", b"h", b"l", b"q", b"O123", b"b", b"I", b"E99", b"N0", b"R5",
              b"T0", b"T-1", b"MS", b"ME", b"MA", b"MP", b"MR", b"MI", b"MD", b"M+", b"MX", b"D5", b"J7", b"F3",
              b"C1", b"x", b"Z", b"S10", b"P", b"L")


def _key(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.03:
        return b"y" * (KEY_MAX_LENGTH + 1)
    if r < 0.05:
        return b"k\x01ey"
    return rng.choice(KEYS)


def _number(rng: random.Random, good: bytes) -> bytes:
    return rng.choice(BAD_NUMBERS) if rng.random() < 0.2 else good


def _exptime(rng: random.Random) -> bytes:
    return rng.choice(EXPTIMES) if rng.random() < 0.3 else b"0"


def _noreply(rng: random.Random) -> list[bytes]:
    return [b"noreply"] if rng.random() < 0.15 else []


def _data(rng: random.Random) -> tuple[bytes, bytes]:
    """A value and the length its command announces (sometimes wrong)."""
    if rng.random() < 0.01:
        value = b"z" * rng.choice(BIG_LENGTHS)
    else:
        value = rng.choice(VALUES) * rng.choice((1, 1, 1, 2, 50))
    length = len(value)
    r = rng.random()
    if r < 0.05:
        length += rng.choice((-1, 1, 2))
    elif r < 0.08:
        return value, rng.choice(BAD_NUMBERS)
    return value, b"%d" % max(length, 0)


def _block(rng: random.Random, value: bytes) -> bytes:
    r = rng.random()
    if r < 0.03:
        return value  # no line end
    if r < 0.05:
        return value + b"\n"
    if r < 0.07:
        return value + b"\r\nx"
    return value + b"\r\n"


def _text_command(rng: random.Random) -> bytes:
    kind = rng.choice(("set", "add", "replace", "append", "prepend", "cas", "get", "gets", "gat", "gats",
                       "delete", "incr", "decr", "touch", "flush_all", "version", "verbosity", "mn", "mg", "ms",
                       "md", "ma", "many", "quit", "junk"))
    if kind in ("set", "add", "replace", "append", "prepend", "cas"):
        value, length = _data(rng)
        tokens = [kind.encode(), _key(rng), _number(rng, b"%d" % rng.choice((0, 1, 65535, 4294967295))),
                  _exptime(rng), length]
        if kind == "cas":
            tokens.append(_number(rng, b"%d" % rng.randrange(1, 10)))
        return b" ".join(tokens + _noreply(rng)) + b"\r\n" + _block(rng, value)
    if kind in ("get", "gets"):
        return b" ".join([kind.encode(), *(_key(rng) for _ in range(rng.randint(1, 4)))]) + b"\r\n"
    if kind in ("gat", "gats"):
        return b" ".join([kind.encode(), _exptime(rng), *(_key(rng) for _ in range(rng.randint(1, 3)))]) + b"\r\n"
    if kind == "many":
        count = rng.choice((24, 100, 500, 2000))
        return b"get" + b"".join(b" %s" % rng.choice(KEYS[:3]) for _ in range(count)) + b"\r\n"
    if kind == "delete":
        extra = [b"0"] if rng.random() < 0.1 else []
        return b" ".join([b"delete", _key(rng), *extra, *_noreply(rng)]) + b"\r\n"
    if kind in ("incr", "decr"):
        return b" ".join([kind.encode(), _key(rng), _number(rng, b"%d" % rng.choice((1, 5, 2**63)))]
                         + _noreply(rng)) + b"\r\n"
    if kind == "touch":
        return b" ".join([b"touch", _key(rng), _exptime(rng), *_noreply(rng)]) + b"\r\n"
    if kind == "flush_all":
        return b" ".join([b"flush_all", *([b"0"] if rng.random() < 0.3 else []), *_noreply(rng)]) + b"\r\n"
    if kind == "verbosity":
        return b" ".join([b"verbosity", _number(rng, b"1"), *_noreply(rng)]) + b"\r\n"
    if kind in ("version", "mn", "quit"):
        return kind.encode() + b"\r\n"
    if kind in ("mg", "md", "ma"):
        flags = rng.sample(META_FLAGS, rng.randint(0, 4))
        return b" ".join([kind.encode(), _key(rng), *flags]) + b"\r\n"
    if kind == "ms":
        value, length = _data(rng)
        flags = rng.sample(META_FLAGS, rng.randint(0, 4))
        return b" ".join([b"ms", _key(rng), length, *flags]) + b"\r\n" + _block(rng, value)
    return rng.choice((b"GET / HTTP/1.1\r\n", b"bogus\r\n", b"\r\n", b" \r\n", b"gets\r\n", b"set a\r\n",
                       b"incr\r\n", b"m\r\n", b"mx a\r\n", b"g\xff a\r\n"))


def _token_mutation(rng: random.Random, command: bytes) -> bytes:
    line, sep, rest = command.partition(b"\r\n")
    tokens = line.split(b" ")
    i = rng.randrange(len(tokens))
    r = rng.random()
    if r < 0.4:
        tokens[i] = rng.choice(BAD_NUMBERS)
    elif r < 0.55:
        tokens.append(b"noreply")
    elif r < 0.7:
        del tokens[i]
    elif r < 0.8:
        tokens.insert(i, tokens[i])
    elif r < 0.9:
        tokens[i] = tokens[i] + b"  "
    else:
        tokens.extend([b"t"] * rng.randint(20, 30))  # past memcached's 24 tokens
    return b" ".join(tokens) + sep + rest


def _byte_damage(rng: random.Random, data: bytes) -> bytes:
    if not data:
        return data
    i = rng.randrange(len(data))
    r = rng.random()
    if r < 0.3:
        return data[:i] + bytes([rng.randrange(256)]) + data[i + 1 :]
    if r < 0.55:
        return data[:i] + rng.choice((b"\0", b"\r", b"\n", b" ", b"\t", b"\xff", b"\r\n")) + data[i:]
    if r < 0.8:
        return data[:i] + data[i + 1 :]
    return data[:i]  # cut short: the half-close follows


def text_input(rng: random.Random) -> bytes:
    """One text/meta input (see the module docstring)."""
    commands = [_text_command(rng) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.4:
        i = rng.randrange(len(commands))
        commands[i] = _token_mutation(rng, commands[i])
    data = b"".join(commands)
    if rng.random() < 0.15 and len(data) < 100_000:
        data = _byte_damage(rng, data)
    if b"\r\nstats" in data or data.startswith(b"stats") or b"watch" in data or b"shutdown" in data:
        return b"version\r\n"  # damage made an excluded command (EXCLUDED)
    return _drop_clock_dependent(data)


def _drop_clock_dependent(data: bytes) -> bytes:
    """Damage and token swaps can make a small positive exptime or a flush delay: the one
    class of generated input whose outcome depends on the clock (EXCLUDED); such inputs
    become ``version``. Checked on each line's tokens by the position of the exptime."""
    for line in data.split(b"\n"):
        tokens = [t for t in line.rstrip(b"\r").split(b" ") if t]
        if not tokens:
            continue
        word = tokens[0]
        slot = {b"set": 3, b"add": 3, b"replace": 3, b"append": 3, b"prepend": 3, b"cas": 3, b"touch": 2,
                b"gat": 1, b"gats": 1, b"flush_all": 1}.get(word)
        if slot is not None and len(tokens) > slot and _clock_dependent(tokens[slot], flush=word == b"flush_all"):
            return b"version\r\n"
        if word in (b"mg", b"ms", b"md", b"ma") and any(
            t[:1] in (b"T", b"N") and _clock_dependent(t[1:], flush=False, meta=True) for t in tokens[2:]
        ):
            return b"version\r\n"
    return data


def _clock_dependent(token: bytes, flush: bool, meta: bool = False) -> bool:
    """A number as memcached reads it (strtol: white space, sign, digits, any tail) that is
    a relative time in the future (or any delay, for flush_all). A meta TTL below zero too:
    memcached 1.6.18 answers its ``t`` as the seconds since its start, wrapped to 32 bits."""
    digits = token.strip(b" \t\r\n\v\f").lstrip(b"+")
    if meta and digits.startswith(b"-") and digits[1:2].isdigit() and digits[1:2] != b"0":
        return True
    n = 0
    for ch in digits:
        if not 48 <= ch <= 57:
            break
        n = n * 10 + ch - 48
    return (0 < n) if flush else (0 < n <= 2592000)


_BIN_OPCODES = (b.Opcode.GET, b.Opcode.GETQ, b.Opcode.GETK, b.Opcode.GETKQ, b.Opcode.SET, b.Opcode.SETQ,
                b.Opcode.ADD, b.Opcode.REPLACE, b.Opcode.APPEND, b.Opcode.PREPEND, b.Opcode.DELETE,
                b.Opcode.DELETEQ, b.Opcode.INCREMENT, b.Opcode.DECREMENT, b.Opcode.INCREMENTQ, b.Opcode.NOOP,
                b.Opcode.VERSION, b.Opcode.QUIT, b.Opcode.QUITQ, b.Opcode.FLUSH, b.Opcode.TOUCH, b.Opcode.GAT,
                b.Opcode.GATQ, b.Opcode.GATK, b.Opcode.GATKQ, b.Opcode.SASL_LIST_MECHS, 0x1B, 0x30, 0xFF)
_STORE_OPS = frozenset((b.Opcode.SET, b.Opcode.SETQ, b.Opcode.ADD, b.Opcode.REPLACE))
_VALUE_OPS = _STORE_OPS | {b.Opcode.APPEND, b.Opcode.PREPEND}
_ARITH_OPS = frozenset((b.Opcode.INCREMENT, b.Opcode.DECREMENT, b.Opcode.INCREMENTQ))
_TTL_OPS = frozenset((b.Opcode.TOUCH, b.Opcode.GAT, b.Opcode.GATQ, b.Opcode.GATK, b.Opcode.GATKQ))
#: Binary exptimes: none or far future. A write with one in the past answers CAS 0 where
#: memcached answers the unique of the invisible item (documented: EXCLUDED).
_BIN_EXPTIMES = (0, 0, 0, 0x7FFFFFFF)


def _binary_request(rng: random.Random, opaque: int) -> bytes:
    op = rng.choice(_BIN_OPCODES)
    key = _key(rng) if op not in (b.Opcode.NOOP, b.Opcode.VERSION, b.Opcode.QUIT, b.Opcode.FLUSH) else b""
    extras = value = b""
    cas = 0
    if op in _STORE_OPS:
        extras = struct.pack(">II", rng.choice((0, 1, 0xFFFFFFFF)), rng.choice(_BIN_EXPTIMES))
        value = _data(rng)[0]
        cas = rng.choice((0, 0, 0, 1, 2**64 - 1))
    elif op in (b.Opcode.APPEND, b.Opcode.PREPEND):
        value = _data(rng)[0]
    elif op in _ARITH_OPS:
        extras = struct.pack(">QQI", rng.choice((1, 0, 2**64 - 1)), rng.choice((0, 5, 2**64 - 1)),
                             rng.choice((0, 0, 0xFFFFFFFF, 0x7FFFFFFF)))  # 0xFFFFFFFF: do not create
    elif op in _TTL_OPS:
        extras = struct.pack(">I", rng.choice(_BIN_EXPTIMES))
    fields = {"magic": 0x80, "keylen": len(key), "extlen": len(extras), "bodylen": len(extras) + len(key) + len(value)}
    if rng.random() < 0.2:
        name = rng.choice(("magic", "keylen", "extlen", "bodylen", "bodylen"))
        fields[name] = {
            "magic": lambda: rng.choice((0x81, 0x00, 0x47)),
            "keylen": lambda: rng.choice((0, 1, 251, 0xFFFF)),
            "extlen": lambda: rng.choice((0, 1, 4, 8, 20, 0xFF)),
            "bodylen": lambda: rng.choice((0, fields["bodylen"] - 1, fields["bodylen"] + 1, 2**32 - 1, 2**20 + 100)),
        }[name]()
        fields["bodylen"] = max(0, fields["bodylen"]) & 0xFFFFFFFF
        if fields["bodylen"] >= 2**31 and op in _VALUE_OPS:
            fields["bodylen"] = 2**20 + 100  # an open finding (EXCLUDED)
    header = b.HEADER.pack(fields["magic"], op, fields["keylen"] & 0xFFFF, fields["extlen"] & 0xFF, 0, 0,
                           fields["bodylen"], opaque, cas)
    return header + extras + key + value


def binary_input(rng: random.Random) -> bytes:
    """One binary input (see the module docstring)."""
    data = b"".join(_binary_request(rng, opaque) for opaque in range(rng.randint(1, 4)))
    if rng.random() < 0.1 and len(data) < 100_000:
        data = _byte_damage(rng, data)
    return data


def generate(rng: random.Random) -> bytes:
    """One input: text and meta four times in five, binary otherwise."""
    return binary_input(rng) if rng.random() < 0.2 else text_input(rng)


def inputs(seed: int, count: int) -> Iterator[tuple[int, bytes]]:
    """``count`` inputs, each from its own ``random.Random(f"{seed}/{n}")``: input ``n`` of a
    seed is the same whatever the slice, so one failing input replays alone."""
    for n in range(count):
        yield n, generate(random.Random(f"{seed}/{n}"))


# ---- running inputs -----------------------------------------------------------------


def exchange(port: int, data: bytes, deadline: float = INPUT_DEADLINE) -> tuple[bytes, bool]:
    """Send ``data`` on a new connection, half-close, read until the peer closes.

    Returns ``(reply, closed)``; ``closed`` is False when the peer neither closed nor sent
    a byte for ``deadline`` seconds, or took over :data:`INPUT_TOTAL_DEADLINE` (a hang)."""
    end = time.monotonic() + INPUT_TOTAL_DEADLINE
    with socket.create_connection((HOST, port), timeout=deadline) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # EPIPE, ECONNRESET, ENOTCONN
            pass  # it closed early (a fatal error): read what it sent
        chunks: list[bytes] = []
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return b"".join(chunks), False
            sock.settimeout(min(left, deadline))
            try:
                chunk = sock.recv(262144)
            except TimeoutError:
                return b"".join(chunks), False
            except ConnectionResetError:
                return b"".join(chunks), True
            if not chunk:
                return b"".join(chunks), True
            chunks.append(chunk)


def normalise(data: bytes, reply: bytes) -> bytes:
    """``reply`` to ``data`` as the differential tests compare it (see their docstrings)."""
    if data[:1] == b"\x80":
        frames, rest = split_frames(reply)
        return BinaryNormaliser()(frames) + (b"<rest>" + rest if rest else b"")
    units, rest = split_units(reply)
    return Normaliser()(units) + (b"<rest>" + rest if rest else b"")


def ends_inside_a_request(data: bytes) -> bool:
    """Whether memcached, reading ``data`` then end of file, is left waiting inside a data
    block or a binary body (or closes on a bad magic byte): it then drops the replies it has
    not sent (:data:`PARTLY_COMPARED`). Decided with mproxy's own parsers, which track memcached's
    states."""
    if data[:1] == b"\x80":
        bp = BinaryParser()
        bp.feed(data)
        while True:
            try:
                cmd = bp.next_command()
            except ProtocolError as err:
                if err.reply == b"":
                    return True  # a bad magic byte: closed with no reply
                continue
            except Exception:  # noqa: BLE001  (the parser tests catch these; here: compare strictly)
                return False
            if isinstance(cmd, NeedData):
                return bool(bp._skip or bp._pending or bp.buffered >= b.HEADER_LENGTH)
            if isinstance(cmd, Quit):
                return False
    tp = Parser()
    tp.feed(data)
    while True:
        try:
            if isinstance(tp.next_command(), NeedData):
                return tp._resume is not None
        except ProtocolError as err:
            if err.fatal:
                return False
        except Exception:  # noqa: BLE001
            return False


_GET_WORDS = (b"get", b"gets", b"gat", b"gats")
_BAD_CHUNK = b"CLIENT_ERROR bad data chunk\r\n"
_TOO_LARGE = b"SERVER_ERROR object too large for cache\r\n"


def _fatal_text(data: bytes) -> bool:
    """Whether a text input holds a command after which memcached closes the connection."""
    if data[:1] == b"\x80":
        return False
    tp = Parser()
    for start in range(0, len(data), MAX_LINE_LENGTH):  # in reads of memcached's size: a long line is seen unended
        tp.feed(data[start : start + MAX_LINE_LENGTH])
        while True:
            try:
                if isinstance(tp.next_command(), NeedData):
                    break
            except ProtocolError as err:
                if err.fatal:
                    return True
            except Exception:  # noqa: BLE001
                return False
    return False
#: The CAS of a binary write's answer, as normalised (``set status=0x00 opaque=1 cas=<cas#1> ...``).
_WRITE_CAS = re.compile(rb"(?m)^((?:set|add|replace|append|prepend|increment|decrement)q? status=0x00 opaque=\d+ )cas=\S+")


def long_key_get_after_others(data: bytes) -> bool:
    """A get-family line with a token over 250 bytes, not first in the input (:data:`PARTLY_COMPARED`)."""
    if data[:1] == b"\x80":
        return False
    lines = data.split(b"\n")
    for line in lines[1:]:
        tokens = line.rstrip(b"\r").split(b" ")
        # (a damaged block before it may leave a byte or two of the line to the block: "xgets")
        if tokens[0].endswith(_GET_WORDS) and any(len(t) > KEY_MAX_LENGTH for t in tokens[1:]):
            return True
    return False


IDENTICAL, PARTLY, NOT_COMPARED, MISMATCH = "identical", "partly compared", "not compared", "mismatch"


def classify(data: bytes, got: bytes, expected: bytes) -> str:
    """Compare mproxy's reply ``got`` with memcached's ``expected`` to input ``data``:
    :data:`IDENTICAL` after normalisation, else one of the classes of :data:`PARTLY_COMPARED`
    (:data:`PARTLY` or :data:`NOT_COMPARED`), else :data:`MISMATCH`."""
    ours, theirs = normalise(data, got), normalise(data, expected)
    if ours == theirs:
        return IDENTICAL
    if long_key_get_after_others(data):
        return NOT_COMPARED
    if ends_inside_a_request(data) and ours.startswith(theirs):
        return PARTLY
    if _fatal_text(data) and (ours.startswith(theirs) or theirs.startswith(ours)):
        return PARTLY
    if ours.count(b"on-numeric") > theirs.count(b"on-numeric"):
        return NOT_COMPARED
    if _BAD_CHUNK in ours and ours.split(_BAD_CHUNK, 1)[0] == theirs.split(_TOO_LARGE, 1)[0] != theirs:
        return PARTLY  # the same up to the block memcached refused from its header
    if data[:1] == b"\x80" and _WRITE_CAS.sub(rb"\1cas=*", ours) == _WRITE_CAS.sub(rb"\1cas=*", theirs):
        return PARTLY
    return MISMATCH


def flush(port: int) -> None:
    """Empty a server (memcached or mproxy) with ``flush_all``."""
    reply, closed = exchange(port, b"flush_all\r\n")
    if reply != b"OK\r\n" or not closed:
        raise AssertionError(f"flush_all on port {port} answered {reply!r} (closed: {closed})")


def rss_kib(pid: int) -> int:
    """Resident set size in KiB of process ``pid`` and its descendants (a supervisor's
    workers, the embedded Momento server): ``VmRSS`` of ``/proc/PID/status``, summed."""
    total = 0
    for member in process_tree(pid):
        try:
            total += rss_kib_one(member)
        except (FileNotFoundError, ProcessLookupError):
            pass  # it exited meanwhile
    return total


def rss_by_process(pid: int) -> dict[str, int]:
    """RSS in KiB of each process of ``pid``'s tree, named ``PID:command`` (for reports)."""
    out = {}
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/cmdline", "rb") as cmdline:
                words = cmdline.read().split(b"\0")
            if b"--worker" in words:
                name = "worker " + words[words.index(b"--worker") + 1].decode()
            else:
                name = next((w.decode() for w in words if w.startswith(b"mproxy")), words[0].decode())
            out[f"{member}:{name}"] = rss_kib_one(member)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def rss_kib_one(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        return next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        member = todo.pop()
        tree.append(member)
        todo.extend(children.get(member, ()))
    return tree


@dataclass
class Finding:
    """An input that crashed, hung or answered differently from memcached."""

    n: int
    kind: str  # "hang", "mismatch", "dead"
    data: bytes
    got: bytes
    expected: bytes = b""

    def __str__(self) -> str:
        text = f"input {self.n}: {self.kind}\n  sent     {self.data[:600]!r}\n  mproxy   {self.got[:600]!r}"
        if self.kind == "mismatch":
            text += f"\n  memcached {self.expected[:600]!r}"
        return text


@dataclass
class Report:
    """What a run found, with its figures."""

    tried: int = 0
    #: inputs whose replies were compared with memcached's in full, in part (a prefix), not at all
    compared: int = 0
    partly_compared: int = 0
    not_compared: int = 0
    findings: list[Finding] = field(default_factory=list)
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    seconds: float = 0.0

    @property
    def rss_growth_kib(self) -> int:
        return self.rss_after_kib - self.rss_before_kib


def run(
    proxy_port: int,
    proxy_pid: int,
    seed: int,
    count: int,
    memcached_port: int | None = None,
    start: int = 0,
    max_findings: int = 20,
    progress: Callable[[Report], None] | None = None,
    found: Callable[[Finding], None] | None = None,
) -> Report:
    """Run inputs ``start .. start + count`` of ``seed`` against the proxy (and compare with
    memcached when ``memcached_port`` is given). Stops early after ``max_findings``.
    ``progress`` is called every 1,000 inputs, ``found`` with each finding as it is made."""
    report = Report(rss_before_kib=rss_kib(proxy_pid))
    began = time.monotonic()
    for n, data in ((n, generate(random.Random(f"{seed}/{n}"))) for n in range(start, start + count)):
        if memcached_port is not None:
            flush(memcached_port)
            flush(proxy_port)
        got, closed = exchange(proxy_port, data)
        report.tried += 1
        if not _alive(proxy_pid):
            report.findings.append(Finding(n, "dead", data, got))
            break
        if not closed:
            report.findings.append(Finding(n, "hang", data, got))
        elif memcached_port is not None:
            expected, _ = exchange(memcached_port, data)
            verdict = classify(data, got, expected)
            if verdict == IDENTICAL:
                report.compared += 1
            elif verdict == PARTLY:
                report.partly_compared += 1
            elif verdict == NOT_COMPARED:
                report.not_compared += 1
            else:
                report.findings.append(Finding(n, "mismatch", data, got, expected))
        if found is not None and report.findings and report.findings[-1].n == n:
            found(report.findings[-1])
        if len(report.findings) >= max_findings:
            break
        if progress is not None and report.tried % 1000 == 0:
            progress(report)
    report.rss_after_kib = rss_kib(proxy_pid) if _alive(proxy_pid) else 0
    report.seconds = time.monotonic() - began
    return report


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
