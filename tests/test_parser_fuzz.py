"""Property tests of the three decoders (text, meta, binary) with hypothesis.

Inputs are the whole-server fuzzer's mutated commands (``tests/fuzz.py``, driven by a
hypothesis-controlled ``Random``) and raw bytes, fed whole, byte by byte and in random
pieces. Properties:

* only :class:`ProtocolError` is ever raised (nothing else escapes a decoder);
* no loop: each ``next_command`` call either consumes input or asks for more, so a
  buffer's worth of calls drains it;
* the way the bytes arrive does not change what is decoded (up to the first fatal
  error; lines over memcached's 2048-byte limit excepted: there the outcome depends on
  the reads, in memcached too);
* the buffer is bounded: what a decoder holds after asking for more is at most a line,
  a data block or a binary request, never the whole stream.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mproxy.protocol import commands as c
from mproxy.protocol.binary import HEADER_LENGTH, BinaryParser
from mproxy.protocol.errors import ProtocolError
from mproxy.protocol.parser import NeedData, Parser
from tests import fuzz

#: item size limit of the decoders under test (small, so limits are reached)
MAX_ITEM = 1024
#: the most a text decoder holds after NEED_DATA: a get line, or a line + a data block
TEXT_BOUND = max(c.MAX_GET_LINE_LENGTH, c.MAX_LINE_LENGTH + MAX_ITEM + 2)
#: the most a binary decoder holds: a header, extras (255), key (65535), a value
BINARY_BOUND = HEADER_LENGTH + 255 + 65535 + MAX_ITEM

Decoder = Parser | BinaryParser


def decode(make: Callable[[], Decoder], pieces: list[bytes], bound: int) -> list[Any]:
    """Feed ``pieces`` one after the other; the decoded records and error replies, in order,
    up to and including the first fatal error (``("fatal", reply)``)."""
    p = make()
    out: list[Any] = []
    for piece in pieces:
        p.feed(piece)
        budget = p.buffered + 2  # every call but the last consumes at least a byte
        calls = 0
        while True:
            calls += 1
            assert calls <= budget, "next_command loops without consuming"
            try:
                cmd = p.next_command()
            except ProtocolError as err:
                if err.fatal:
                    out.append(("fatal", err.reply))
                    return out
                out.append(("error", err.reply))
                continue
            if isinstance(cmd, NeedData):
                break
            out.append(cmd)
            if isinstance(cmd, c.Quit):
                return out
        assert p.buffered <= bound + len(piece), (p.buffered, bound)
    return out


def split(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 8)))) if len(data) > 1 else []
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


def _long_line(data: bytes) -> bool:
    return any(len(line) > c.MAX_LINE_LENGTH for line in data.split(b"\n"))


def _same_whatever_the_reads(make: Callable[[], Decoder], data: bytes, rng: random.Random, bound: int) -> None:
    whole = decode(make, [data], bound)
    pieces = decode(make, split(data, rng), bound)
    assert pieces == whole
    if len(data) <= 3000:  # byte by byte is quadratic in the slow paths; long inputs are split instead
        assert decode(make, [data[i : i + 1] for i in range(len(data))], bound) == whole


_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(st.randoms(use_true_random=False), st.randoms(use_true_random=False))
def test_text_and_meta_decoding_does_not_depend_on_the_reads(gen: random.Random, cut: random.Random) -> None:
    data = fuzz.text_input(gen)
    if _long_line(data):
        decode(lambda: Parser(MAX_ITEM), split(data, cut), TEXT_BOUND)  # still only ProtocolError, bounded
        return
    _same_whatever_the_reads(lambda: Parser(MAX_ITEM), data, cut, TEXT_BOUND)


@_SETTINGS
@given(st.randoms(use_true_random=False), st.randoms(use_true_random=False))
def test_binary_decoding_does_not_depend_on_the_reads(gen: random.Random, cut: random.Random) -> None:
    data = fuzz.binary_input(gen)
    _same_whatever_the_reads(lambda: BinaryParser(MAX_ITEM), data, cut, BINARY_BOUND)


@_SETTINGS
@given(st.lists(st.binary(max_size=300), max_size=20), st.booleans())
def test_raw_bytes_only_raise_protocol_errors(chunks: list[bytes], binary: bool) -> None:
    if binary:
        decode(lambda: BinaryParser(MAX_ITEM), [b"\x80" + b"".join(chunks[:1]), *chunks[1:]], BINARY_BOUND)
    else:
        decode(lambda: Parser(MAX_ITEM), chunks, TEXT_BOUND)


def test_a_stream_without_newline_is_cut_at_the_line_limit() -> None:
    # 10 MB of garbage in 64 KiB reads: closed as soon as a line passes the limit
    p = Parser(MAX_ITEM)
    for _ in range(160):
        p.feed(b"x" * 65536)
        try:
            assert isinstance(p.next_command(), NeedData)
        except ProtocolError as err:
            assert err.fatal
            break
        assert p.buffered <= c.MAX_LINE_LENGTH + 65536
    else:
        raise AssertionError("never closed")


def test_a_huge_data_block_is_discarded_as_it_arrives() -> None:
    p = Parser(MAX_ITEM)
    p.feed(b"set k 0 0 6553600\r\n")
    assert isinstance(p.next_command(), NeedData)
    for _ in range(100):
        p.feed(b"v" * 65536)
        assert isinstance(p.next_command(), NeedData)
        assert p.buffered == 0
    p.feed(b"\r\nversion\r\n")
    assert isinstance(p.next_command(), c.TooLarge)
    assert isinstance(p.next_command(), c.Version)
