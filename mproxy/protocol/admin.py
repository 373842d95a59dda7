"""memcached's tuning commands on the data port, checked as memcached 1.6.18 checks them.

``slabs``, ``lru``, ``lru_crawler``, ``watch`` and ``cache_memlimit``: each
parse function returns the command record (:class:`~.commands.Admin` or
:class:`~.commands.CacheMemlimit`) for arguments memcached accepts, and raises
the :class:`~.errors.ProtocolError` carrying memcached's reply otherwise
(``proto_text.c``: ``process_slabs_command``, ``process_lru_command``,
``process_lru_crawler_command``, ``process_watch_command``,
``process_memlimit_command``). What an accepted command does, and answers, is
dispatch's. Stdlib only.
"""

from __future__ import annotations

import math
import re

from mproxy.protocol import commands as c
from mproxy.protocol.errors import ClientError, CommandError, ProtocolError
from mproxy.protocol.numbers import parse_i32, parse_u32

_BAD_FORMAT = "bad command line format"

#: ``watch`` arguments memcached 1.6.18 knows (others: ``ERROR``)
WATCH_TOPICS = frozenset(
    {b"rawcmds", b"evictions", b"fetchers", b"mutations", b"sysevents", b"connevents",
     b"proxyreqs", b"proxyevents", b"proxyuser"}
)


def _noreply(tokens: list[bytes], ntokens: int) -> bool:
    """memcached ``set_noreply_maybe``."""
    return tokens[ntokens - 2] == b"noreply"


def _reply(text: bytes, noreply: bool) -> ProtocolError:
    return ProtocolError(b"" if noreply else text + b"\r\n", text.decode("ascii", "replace"))


#: what C ``strtod`` reads (decimal, hexadecimal, inf, nan), then white space or the end
_DOUBLE = re.compile(
    rb"[ \t\n\v\f\r]*([+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
    rb"|0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)(?:[pP][+-]?[0-9]+)?"
    rb"|[iI][nN][fF](?:[iI][nN][iI][tT][yY])?|[nN][aA][nN]))(?:[ \t\n\v\f\r]|\Z)"
)


def parse_double(token: bytes) -> float | None:
    """memcached ``safe_strtod``: C ``strtod`` followed by white space or the end;
    None also where strtod reports a range error (overflow or underflow)."""
    match = _DOUBLE.match(token)
    if match is None:
        return None
    text = match[1].decode("ascii")
    number = float.fromhex(text) if "x" in text.lower() else float(text)
    if math.isinf(number) and "inf" not in text.lower():
        return None  # overflow: ERANGE
    if number == 0.0 and re.search(r"[1-9]", text.split("e")[0].split("E")[0].split("p")[0].split("P")[0]):
        return None  # underflow of a non-zero mantissa: ERANGE
    return number


def parse_slabs(tokens: list[bytes], ntokens: int) -> c.Command:
    if ntokens == 5 and tokens[1] == b"reassign":
        if parse_i32(tokens[2]) is None or parse_i32(tokens[3]) is None:
            raise ClientError(_BAD_FORMAT)
        return c.Admin("slabs", (b"reassign", tokens[2], tokens[3]))
    if ntokens >= 4 and tokens[1] == b"automove":
        noreply = _noreply(tokens, ntokens)
        if tokens[2] == b"ratio":
            if ntokens < 5 or parse_double(tokens[3]) is None:
                raise _reply(b"ERROR", noreply)
            return c.Admin("slabs", (b"automove", b"ratio", tokens[3]), noreply)
        level = parse_u32(tokens[2])
        if level is None:
            raise ClientError(_BAD_FORMAT, noreply)
        if level > 2:
            raise _reply(b"ERROR", noreply)
        return c.Admin("slabs", (b"automove", b"%d" % level), noreply)
    raise CommandError()


def parse_lru(tokens: list[bytes], ntokens: int) -> c.Command:
    """Only ``lru tune``: ``mode`` and ``temp_ttl`` need memcached's LRU maintainer
    thread, which mproxy's reference runs without (``-o no_lru_maintainer``), so
    memcached answers them ``ERROR`` as it does any other word."""
    if ntokens < 3:
        raise CommandError()
    noreply = _noreply(tokens, ntokens)
    if tokens[1] == b"tune" and ntokens >= 7:
        pct_hot, pct_warm = parse_u32(tokens[2]), parse_u32(tokens[3])
        hot_factor, factor = parse_double(tokens[4]), parse_double(tokens[5])
        if pct_hot is None or pct_warm is None or hot_factor is None or factor is None:
            raise _reply(b"ERROR", noreply)
        if pct_hot + pct_warm > 80:
            raise _reply(b"ERROR hot and warm pcts must not exceed 80", noreply)
        if factor <= 0 or hot_factor <= 0:
            raise _reply(b"ERROR hot/warm age factors must be greater than 0", noreply)
        return c.Admin("lru", tuple(tokens[1:6]), noreply)
    raise _reply(b"ERROR", noreply)


def parse_lru_crawler(tokens: list[bytes], ntokens: int) -> c.Command:
    if ntokens == 4 and tokens[1] in (b"crawl", b"metadump"):
        # memcached checks the class list after the crawler's state: dispatch does (valid_classes)
        return c.Admin("lru_crawler", (tokens[1], tokens[2]))
    if ntokens == 4 and tokens[1] in (b"tocrawl", b"sleep"):
        number = parse_u32(tokens[2])
        if number is None:
            raise ClientError(_BAD_FORMAT)
        if tokens[1] == b"sleep" and number > 1_000_000:
            raise ClientError("sleep must be one second or less")
        return c.Admin("lru_crawler", (tokens[1], b"%d" % number))
    if ntokens == 3 and tokens[1] in (b"enable", b"disable"):
        return c.Admin("lru_crawler", (tokens[1],))
    raise CommandError()


def valid_classes(spec: bytes) -> bool:
    """memcached ``lru_crawler_crawl``'s class list: ``all``, ``hash`` or comma-separated ids."""
    if spec in (b"all", b"hash"):
        return True
    for part in spec.split(b","):
        if not part:
            continue  # strtok_r skips empty fields
        clsid = parse_u32(part)
        if clsid is None or not 1 <= clsid < c.MAX_NUMBER_OF_SLAB_CLASSES:
            return False
    return True


def parse_watch(tokens: list[bytes], ntokens: int) -> c.Command:
    noreply = _noreply(tokens, ntokens)
    topics = tuple(tokens[1 : ntokens - 1])
    for topic in topics:
        if topic not in WATCH_TOPICS:
            raise _reply(b"ERROR", noreply)
    return c.Admin("watch", topics or (b"fetchers",), noreply)


def parse_cache_memlimit(tokens: list[bytes], ntokens: int) -> c.Command:
    if ntokens not in (3, 4):
        raise CommandError()
    noreply = _noreply(tokens, ntokens)
    megabytes = parse_u32(tokens[1])
    if megabytes is None:
        raise _reply(b"ERROR", noreply)
    if megabytes < 8:
        raise _reply(b"MEMLIMIT_TOO_SMALL cannot set maxbytes to less than 8m", noreply)
    if megabytes > 1_000_000_000:
        raise _reply(b"MEMLIMIT_ADJUST_FAILED input value is megabytes not bytes", noreply)
    return c.CacheMemlimit(megabytes, noreply)
