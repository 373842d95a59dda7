"""Parser cases, each fed whole, byte by byte, and followed by the next command."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mproxy.protocol import commands as c
from mproxy.protocol.commands import StoreMode
from mproxy.protocol.errors import ClientError, CommandError, ConnectionClosed, ProtocolError
from mproxy.protocol.meta import MsError, b64decode, b64encode
from mproxy.protocol.parser import NEED_DATA, Parser, parse_i32, parse_u32, parse_u64

NEXT = b"version\r\n"


def drain(parser: Parser) -> list[object]:
    """Every outcome the parser has for what it was fed: commands and errors."""
    out: list[object] = []
    while True:
        try:
            cmd = parser.next_command()
        except ProtocolError as err:
            out.append(err)
            if err.fatal:
                return out
            continue
        if cmd is NEED_DATA:
            return out
        out.append(cmd)


def feed_whole(data: bytes, **kw: int) -> list[object]:
    p = Parser(**kw)
    p.feed(data)
    return drain(p)


def feed_bytewise(data: bytes, **kw: int) -> list[object]:
    p = Parser(**kw)
    out: list[object] = []
    for i in range(len(data)):
        p.feed(data[i : i + 1])
        out.extend(drain(p))
        if out and isinstance(out[-1], ProtocolError) and out[-1].fatal:
            break
    return out


def same(a: list[object], b: list[object]) -> bool:
    def norm(x: object) -> object:
        return (type(x), x.reply) if isinstance(x, ProtocolError) else x

    return [norm(x) for x in a] == [norm(x) for x in b]


CASES: list[tuple[bytes, object]] = [
    (b"get a\r\n", c.Get((b"a",))),
    (b"get a b  c\r\n", c.Get((b"a", b"b", b"c"))),
    (b"gets a\n", c.Get((b"a",), cas=True)),
    (b"gat 10 a b\r\n", c.Gat(10, (b"a", b"b"))),
    (b"gats -1 a\r\n", c.Gat(-1, (b"a",), cas=True)),
    (b"gat 10\r\n", c.Gat(10, ())),
    (b"set k 5 100 3\r\nabc\r\n", c.Store(StoreMode.SET, b"k", 5, 100, b"abc")),
    (b"set k 0 0 4 noreply\r\na\r\nb\r\n", c.Store(StoreMode.SET, b"k", 0, 0, b"a\r\nb", noreply=True)),
    (b"add k 0 0 0\r\n\r\n", c.Store(StoreMode.ADD, b"k", 0, 0, b"")),
    (b"replace k 1 2 1\r\nx\r\n", c.Store(StoreMode.REPLACE, b"k", 1, 2, b"x")),
    (b"append k 0 0 1\r\nx\r\n", c.Store(StoreMode.APPEND, b"k", 0, 0, b"x")),
    (b"prepend k 0 0 1\r\nx\r\n", c.Store(StoreMode.PREPEND, b"k", 0, 0, b"x")),
    (b"cas k 0 0 1 99\r\nx\r\n", c.Store(StoreMode.CAS, b"k", 0, 0, b"x", cas_unique=99)),
    (b"set k 4294967297 0 1\r\nx\r\n", c.Store(StoreMode.SET, b"k", 1, 0, b"x")),
    (b"delete k\r\n", c.Delete(b"k")),
    (b"delete k 0\r\n", c.Delete(b"k")),
    (b"delete k noreply\r\n", c.Delete(b"k", noreply=True)),
    (b"delete k 0 noreply\r\n", c.Delete(b"k", noreply=True)),
    (b"incr k 5\r\n", c.Arith(b"k", 5, True)),
    (b"decr k 18446744073709551615 noreply\r\n", c.Arith(b"k", 2**64 - 1, False, noreply=True)),
    (b"touch k 10\r\n", c.Touch(b"k", 10)),
    (b"flush_all\r\n", c.FlushAll(0)),
    (b"flush_all 10\r\n", c.FlushAll(10)),
    (b"flush_all noreply\r\n", c.FlushAll(0, noreply=True)),
    (b"flush_all 0 noreply\r\n", c.FlushAll(0, noreply=True)),
    # a delay that is not a number: dispatch answers it (memcached -F says "not allowed" first)
    (b"flush_all x\r\n", c.FlushAll(None)),
    (b"version\r\n", c.Version()),
    (b"verbosity 1\r\n", c.Verbosity(1)),
    (b"quit\r\n", c.Quit()),
    (b"stats\r\n", c.Stats()),
    (b"stats reset\r\n", c.Stats((b"reset",))),
    (b"mn\r\n", c.MetaNoop()),
    (b"get " + b"k" * 250 + b"\r\n", c.Get((b"k" * 250,))),
    # errors, as memcached 1.6.18 answers them
    (b"\r\n", CommandError()),
    (b"GET a\r\n", CommandError()),
    (b"get\r\n", CommandError()),
    (b"set a 0 0\r\n", CommandError()),
    (b"incr a\r\n", CommandError()),
    (b"bogus\r\n", CommandError()),
    (b"shutdown\r\n", ProtocolError(b"ERROR: shutdown not enabled\r\n")),
    (b"set a x 0 1\r\n", ClientError("bad command line format")),
    (b"set a 0 0 -1\r\n", ClientError("bad command line format")),
    (b"set a 0 0 2147483648\r\n", ClientError("bad command line format")),
    (b"set a x 0 1 noreply\r\n", ClientError("bad command line format", noreply=True)),
    (b"get " + b"k" * 251 + b"\r\n", ClientError("bad command line format")),
    (b"set " + b"k" * 251 + b" 0 0 1\r\n", ClientError("bad command line format")),
    (b"incr a x\r\n", ClientError("invalid numeric delta argument")),
    (b"incr a -1\r\n", ClientError("invalid numeric delta argument")),
    (b"incr a 18446744073709551616\r\n", ClientError("invalid numeric delta argument")),
    (b"touch a x\r\n", ClientError("invalid exptime argument")),
    (b"gat x a\r\n", ClientError("invalid exptime argument")),
    (b"verbosity x\r\n", ClientError("bad command line format")),
    (b"delete a 10\r\n", ClientError("bad command line format.  Usage: delete <key> [noreply]")),
    (b"cas a 0 0 1 x\r\n", ClientError("bad command line format")),
    (b"PUT / HTTP/1.1\r\n", ConnectionClosed("http")),
    # meta commands
    (b"mn\r\n", c.MetaNoop()),
    (b"mn x y\r\n", c.MetaNoop()),
    (b"mg k\r\n", c.Mg(b"k")),
    (b"mg k v k O12 q\r\n", c.Mg(b"k", (b"v", b"k", b"O12", b"q"), quiet=True, value=True)),
    (b"mg k T30 N-1 R5 u h\r\n",
     c.Mg(b"k", (b"T30", b"N-1", b"R5", b"u", b"h"), touch=30, vivify=-1, recache=5, no_update=True, locked=True)),
    (b"mg Zm9v b v\r\n", c.Mg(b"foo", (b"b", b"v"), binary=True, value=True)),
    (b"mg k O" + b"x" * 32 + b" v\r\n", c.Mg(b"k", (b"O" + b"x" * 32, b"v"), value=True, long_opaque=0)),
    (b"ms k 3 T5 F7 c\r\nabc\r\n", c.Ms(b"k", b"abc", (b"T5", b"F7", b"c"), client_flags=7, exptime=5)),
    (b"ms k 0 MA\r\n\r\n", c.Ms(b"k", b"", (b"MA",), mode=StoreMode.APPEND)),
    (b"ms k 1 C9 I q\r\nx\r\n",
     c.Ms(b"k", b"x", (b"C9", b"I", b"q"), quiet=True, mode=StoreMode.CAS, compare_cas=9, invalidate=True)),
    (b"ms k 1 C9 ME\r\nx\r\n", c.Ms(b"k", b"x", (b"C9", b"ME"), mode=StoreMode.ADD, compare_cas=9)),
    (b"md k q C3 I T9\r\n", c.Md(b"k", (b"q", b"C3", b"I", b"T9"), quiet=True, compare_cas=3, invalidate=True, touch=9)),
    (b"ma k MD D5 N0 J3 v\r\n",
     c.Ma(b"k", (b"MD", b"D5", b"N0", b"J3", b"v"), value=True, incr=False, delta=5, initial=3, vivify=0)),
    (b"me k\r\n", c.Me(b"k")),
    (b"me Zm9v b\r\n", c.Me(b"foo", binary=True)),
    (b"me k x y\r\n", c.Me(b"k")),
    (b"mg\r\n", CommandError()),
    (b"mx k\r\n", CommandError()),
    (b"me\r\n", ClientError("bad command line format")),
    (b"mg k Z\r\n", ClientError("invalid flag")),
    (b"mg k v v\r\n", ClientError("duplicate flag")),
    (b"mg k \xff\r\n", ClientError("duplicate flag")),
    (b"mg k Tx Rx\r\n", ClientError("bad token in command line format")),
    (b"mg !!! b\r\n", ClientError("error decoding key")),
    (b"mg " + b"k" * 251 + b"\r\n", ClientError("bad command line format")),
    (b"mg k" + b" v" * 18 + b"\r\n", ClientError("options flags are too long")),
    (b"md k Z\r\n", ClientError("invalid or duplicate flag")),
    (b"md k O" + b"x" * 32 + b"\r\n", ClientError("opaque token too long")),
    (b"ma k Mx\r\n", ClientError("invalid mode for ma M token")),
    (b"ma k Dx\r\n", ClientError("invalid or duplicate flag")),
    (b"ms k\r\n", ClientError("bad command line format")),
    (b"ms k x\r\n", ClientError("bad command line format")),
    (b"ms k 1 Z\r\nx\r\n", MsError("CLIENT_ERROR invalid flag", 1)),
    (b"ms k 2 Mx\r\n\r\n\r\n", MsError("CLIENT_ERROR invalid mode for ms M token", 2)),
    (b"ms k 1 Fx Tx\r\nx\r\n", MsError("CLIENT_ERROR bad token in command line format", 1)),
    (b"ms k 1 O" + b"x" * 32 + b"\r\nx\r\n", MsError("CLIENT_ERROR opaque token too long", 1)),
    # admin commands
    (b"slabs automove 1\r\n", c.Admin("slabs", (b"automove", b"1"))),
    (b"slabs reassign 1 2\r\n", c.Admin("slabs", (b"reassign", b"1", b"2"))),
    (b"slabs automove 3\r\n", ProtocolError(b"ERROR\r\n")),
    (b"slabs automove x noreply\r\n", ClientError("bad command line format", noreply=True)),
    (b"lru tune 10 25 0.1 2.0\r\n", c.Admin("lru", (b"tune", b"10", b"25", b"0.1", b"2.0"))),
    (b"lru tune 50 50 0.1 2\r\n", ProtocolError(b"ERROR hot and warm pcts must not exceed 80\r\n")),
    (b"lru mode flat\r\n", ProtocolError(b"ERROR\r\n")),
    (b"lru_crawler crawl 1,2\r\n", c.Admin("lru_crawler", (b"crawl", b"1,2"))),
    (b"lru_crawler sleep 1000001\r\n", ClientError("sleep must be one second or less")),
    (b"lru_crawler\r\n", CommandError()),
    (b"watch bogus\r\n", ProtocolError(b"ERROR\r\n")),
    (b"cache_memlimit 64 noreply\r\n", c.CacheMemlimit(64, noreply=True)),
    (b"cache_memlimit 7\r\n", ProtocolError(b"MEMLIMIT_TOO_SMALL cannot set maxbytes to less than 8m\r\n")),
    (b"cache_memlimit x\r\n", ProtocolError(b"ERROR\r\n")),
]


@pytest.mark.parametrize("data,expected", CASES, ids=[repr(d[:30]) for d, _ in CASES])
def test_case_whole_bytewise_and_followed(data: bytes, expected: object) -> None:
    want = [expected]
    assert same(feed_whole(data), want)
    assert same(feed_bytewise(data), want)
    if isinstance(expected, ConnectionClosed):
        return
    assert same(feed_whole(data + NEXT), want + [c.Version()])
    assert same(feed_bytewise(data + NEXT), want + [c.Version()])


def test_watch_ends_the_reading() -> None:
    for out in (feed_whole(b"watch\r\n" + NEXT), feed_bytewise(b"watch\r\n" + NEXT)):
        assert out == [c.Admin("watch", (b"fetchers",))]


def test_ms_too_large_swallows_data_then_continues() -> None:
    data = b"ms big 101 T5\r\n" + b"v" * 101 + b"\r\n" + NEXT
    for out in (feed_whole(data, max_item_size=100), feed_bytewise(data, max_item_size=100)):
        assert out == [c.MsTooLarge(b"big", 101), c.Version()]


def test_ms_bad_data_chunk_is_never_silenced() -> None:
    out = feed_whole(b"ms k 1 q\r\nxy\r\n")
    assert isinstance(out[0], ClientError) and out[0].reply == b"CLIENT_ERROR bad data chunk\r\n"


@pytest.mark.parametrize(
    "token,decoded",
    [(b"Zm9v", b"foo"), (b"Zm9vYg==", b"foob"), (b"Zm9vYmE=", b"fooba"), (b"Zm9v!", b"foo"), (b"Zm=v", b"f`"),
     (b"Zg==Zm9v", b"f"), (b"Zm9", None), (b"A===", None), (b"====", None), (b"!!!!", None)],
)
def test_base64_keys_decode_as_memcached(token: bytes, decoded: bytes | None) -> None:
    """memcached's decoder: stray bytes skipped, groups of 4, decoding stops at padding."""
    assert b64decode(token) == decoded
    if decoded is not None and b"=" not in token and b"!" not in token:
        assert b64encode(decoded) == token


def test_bad_data_chunk_then_rest_of_line_is_a_command() -> None:
    # memcached reads exactly <bytes>+2, then parses what follows as a command
    out = feed_whole(b"set a 0 0 1\r\nxy\r\nget a\r\n")
    assert isinstance(out[0], ClientError) and out[0].reply == b"CLIENT_ERROR bad data chunk\r\n"
    assert isinstance(out[1], CommandError)  # the leftover "\n"
    assert out[2] == c.Get((b"a",))


def test_bad_data_chunk_silenced_by_noreply() -> None:
    out = feed_whole(b"set a 0 0 1 noreply\r\nxyz\r\n")
    assert isinstance(out[0], ClientError) and out[0].reply == b""


def test_too_large_swallows_data_then_continues() -> None:
    value = b"v" * 101
    data = b"set big 3 0 101\r\n" + value + b"\r\n" + NEXT
    for out in (feed_whole(data, max_item_size=100), feed_bytewise(data, max_item_size=100)):
        assert out == [c.TooLarge(StoreMode.SET, b"big", 3, 0, 101), c.Version()]


def test_long_line_without_newline_closes_but_multiget_does_not() -> None:
    p = Parser()
    p.feed(b"set " + b"x" * 3000)
    with pytest.raises(ConnectionClosed):
        p.next_command()
    p = Parser()
    p.feed(b"get " + b"k " * 2000)
    assert p.next_command() is NEED_DATA
    p.feed(b"\r\n")
    cmd = p.next_command()
    assert isinstance(cmd, c.Get) and len(cmd.keys) == 2000


def test_multiget_of_many_keys() -> None:
    keys = [b"key%d" % i for i in range(1500)]
    out = feed_whole(b"get " + b" ".join(keys) + b"\r\n")
    assert out == [c.Get(tuple(keys))]


def test_pipeline_in_one_read() -> None:
    data = b"set a 0 0 1\r\n1\r\nget a\r\nincr a 1\r\ndelete a\r\nbogus\r\nversion\r\n"
    out = feed_whole(data)
    assert out[:4] == [
        c.Store(StoreMode.SET, b"a", 0, 0, b"1"),
        c.Get((b"a",)),
        c.Arith(b"a", 1, True),
        c.Delete(b"a"),
    ]
    assert isinstance(out[4], CommandError)
    assert out[5] == c.Version()


def test_too_many_tokens_is_error() -> None:
    assert isinstance(feed_whole(b"set a 0 0 1 2 3\r\n")[0], CommandError)
    assert isinstance(feed_whole(b"incr " + b"a " * 30 + b"\r\n")[0], CommandError)


def test_numbers_parse_like_c() -> None:
    assert parse_u64(b"-0") == 0
    assert parse_u64(b"-1") is None
    assert parse_u64(b"18446744073709551615") == 2**64 - 1
    assert parse_u64(b"1x") is None
    assert parse_u64(b"") is None
    assert parse_u32(b"4294967296") == 0
    assert parse_i32(b"2147483648") == -(2**31)
    assert parse_i32(b"-5") == -5
    assert parse_i32(b"+7") == 7
    assert parse_i32(b"9223372036854775808") is None


def test_buffer_is_compacted() -> None:
    p = Parser()
    for _ in range(10_000):
        p.feed(b"get a\r\n")
        assert p.next_command() == c.Get((b"a",))
    assert len(p._buf) < 100


def test_long_line_in_pieces_is_scanned_once() -> None:
    p = Parser()
    keys = tuple(b"k%06d" % i for i in range(100_000))  # a 800 kB multi-get
    data = b"get a\r\n" + b"get " + b" ".join(keys) + b"\r\nversion\r\n"
    results: list[object] = []
    for i in range(0, len(data), 100):
        p.feed(data[i : i + 100])
        results += drain(p)
        # bytes already searched for a newline are not searched again
        assert p._scan >= len(p._buf) - 100
    assert results == [c.Get((b"a",)), c.Get(keys), c.Version()]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64) | st.sampled_from(
    [b"set a 0 0 1\r\n", b"x\r\n", b"get a b\r\n", b"\r\n", b"gat 1 a\r\n", b"noreply", b" ", b"cas a 0 0 1 1\r\n",
     b"incr a 1\r\n", b"delete a 0\r\n", b"flush_all 1\r\n", b"HTTP/1.1\r\n",
     b"mg a v k O1 q t T5 N0 R9 u h l\r\n", b"ms a 1 T0 c F3 MA C2 I\r\n", b"ms a 1", b"md a q C1 I T3\r\n",
     b"ma a N0 J1 D2 MD v\r\n", b"me a\r\n", b"mn\r\n", b" b", b" Zm9v", b" M", b" O", b"ms Zm9v 3 b\r\n",
     b"slabs automove 1\r\n", b"lru tune 1 2 0.1 2\r\n", b"lru_crawler crawl 1\r\n", b"cache_memlimit 64\r\n",
     b"stats detail on\r\n"]), max_size=30))
def test_arbitrary_bytes_only_yield_commands_or_protocol_errors(chunks: list[bytes]) -> None:
    p = Parser(max_item_size=64)
    for chunk in chunks:
        p.feed(chunk)
        while True:
            try:
                cmd = p.next_command()
            except ProtocolError as err:
                assert isinstance(err.reply, bytes)
                if err.fatal:
                    return
                continue
            if cmd is NEED_DATA:
                break
            assert isinstance(cmd, (c.Get, c.Gat, c.Store, c.TooLarge, c.Delete, c.Arith, c.Touch,
                                    c.FlushAll, c.Version, c.Verbosity, c.Quit, c.Stats, c.MetaNoop,
                                    c.Mg, c.Ms, c.MsTooLarge, c.Md, c.Ma, c.Me, c.Admin, c.CacheMemlimit))
