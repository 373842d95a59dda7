"""memcached's admin commands where the differential corpus cannot compare bytes: the
figures of ``stats settings`` (memcached's names, mproxy's values), the listings mproxy
does not have (``stats items``, ``slabs``, ``conns``: ``END``), ``watch`` (the connection
becomes a watcher: ``OK``, then nothing is read from it), and the state the others keep."""

from __future__ import annotations

import re

import pytest

from mproxy.backends.memory import MemoryBackend
from mproxy.dispatch import Dispatcher
from mproxy.protocol import commands as c
from mproxy.protocol.parser import NEED_DATA, Parser
from mproxy.stats import Stats
from tests.conftest import MproxyFactory
from tests.servers import RawSession, Server
from tests.wire import replies as run

STAT_LINE = re.compile(rb"STAT [a-z_]+ [^ \r\n]+\r\n")


def make(settings: dict[str, object] | None = None) -> Dispatcher:
    stats = Stats()
    return Dispatcher(MemoryBackend(), stats.cache("c"), stats, settings=settings)


def stat_names(reply: bytes) -> list[bytes]:
    assert reply.endswith(b"END\r\n")
    lines = reply[: -len(b"END\r\n")]
    assert STAT_LINE.sub(b"", lines) == b"", f"not all STAT lines: {reply!r}"
    return [line.split(b" ")[1] for line in lines.split(b"\r\n") if line]


def test_stats_settings_are_memcacheds_names_with_our_values() -> None:
    d = make({"maxconns": 50, "tcpport": 11311, "item_size_max": 2048, "idle_timeout": 7})
    reply = run(d, b"stats settings\r\n")
    names = stat_names(reply)
    assert names[:3] == [b"maxbytes", b"maxconns", b"tcpport"]
    assert b"STAT maxbytes 67108864\r\n" in reply and b"STAT item_size_max 2048\r\n" in reply
    run(d, b"verbosity 9\r\nstats detail on\r\nlru_crawler disable\r\nslabs automove 0\r\nlru tune 10 25 0.1 2\r\n")
    reply = run(d, b"stats settings\r\n")
    for line in (b"verbosity 2", b"detail_enabled yes", b"lru_crawler no", b"slab_automove 0",
                 b"hot_lru_pct 10", b"warm_lru_pct 25", b"hot_max_factor 0.10"):
        assert b"STAT " + line + b"\r\n" in reply


@pytest.mark.e2e
@pytest.mark.memcached
def test_stats_settings_names_are_memcacheds(memcached_server: Server, mproxy_factory: MproxyFactory) -> None:
    """Every name mproxy shows is one memcached 1.6.18 shows, in memcached's order."""
    proxy = mproxy_factory("memory")
    replies = []
    for port in (memcached_server.port, proxy.port):
        with RawSession(port) as conn:
            conn.send(b"stats settings\r\n")
            reply, complete = conn.recv_until_terminator(b"END\r\n")
            assert complete
            replies.append(stat_names(reply))
    theirs, ours = replies
    assert set(ours) <= set(theirs), set(ours) - set(theirs)
    assert ours == [name for name in theirs if name in ours]


@pytest.mark.parametrize("what", [b"items", b"slabs", b"conns"])
def test_listings_mproxy_does_not_have_are_empty(what: bytes) -> None:
    """No slab classes (the memory backend keeps one LRU), no connection table on the data
    port: memcached's format with no lines, which every parser of these listings accepts."""
    assert run(make(), b"stats " + what + b"\r\n") == b"END\r\n"


def test_stats_sizes_is_off() -> None:
    for what in (b"sizes", b"sizes_enable", b"sizes_disable"):
        assert run(make(), b"stats " + what + b"\r\n") == b"STAT sizes_status disabled\r\nEND\r\n"


def test_stats_detail_dump_lists_no_prefixes() -> None:
    d = make()
    assert run(d, b"stats detail on\r\nget a:b\r\nstats detail dump\r\n") == b"OK\r\nEND\r\nEND\r\n"


def test_watch_answers_ok_then_reads_nothing_more() -> None:
    """memcached hands a watcher's connection to its logger: no command on it is read
    again. mproxy has no log stream to send either."""
    parser = Parser()
    parser.feed(b"get a\r\nwatch fetchers mutations\r\nget b\r\nversion\r\n")
    assert parser.next_command() == c.Get((b"a",))
    assert parser.next_command() == c.Admin("watch", (b"fetchers", b"mutations"))
    assert parser.next_command() is NEED_DATA
    parser.feed(b"set a 0 0 1\r\nx\r\n" * 1000)
    assert parser.next_command() is NEED_DATA
    assert parser.buffered == 0
    assert run(make(), b"watch\r\n") == b"OK\r\n"


@pytest.mark.e2e
def test_watch_over_tcp(mproxy_factory: MproxyFactory) -> None:
    proxy = mproxy_factory("memory")
    with RawSession(proxy.port) as conn:
        conn.send(b"watch\r\n")
        reply, complete = conn.recv_until_terminator(b"OK\r\n")
        assert complete and reply == b"OK\r\n"
    with RawSession(proxy.port) as conn:  # other connections are served as ever
        conn.send(b"version\r\n")
        reply, complete = conn.recv_until_terminator(b"\r\n")
        assert complete and reply.startswith(b"VERSION ")


def test_cache_memlimit_resizes_the_memory_backend() -> None:
    backend = MemoryBackend()
    stats = Stats()
    d = Dispatcher(backend, stats.cache("c"), stats)
    assert run(d, b"cache_memlimit 8\r\n") == b"OK\r\n"
    assert backend.stats()["limit_maxbytes"] == 8 * 2**20
    assert run(d, b"cache_memlimit 9 noreply\r\n") == b""
    assert backend.stats()["limit_maxbytes"] == 9 * 2**20


def test_slabs_reassign_finds_no_page_to_move() -> None:
    """No class holds a spare page: a valid pair is NOSPARE, "any class" (-1) finds none."""
    d = make()
    assert run(d, b"slabs reassign 1 2\r\n") == b"NOSPARE source class has no spare pages\r\n"
    assert run(d, b"slabs reassign -1 2\r\n") == b"BADCLASS invalid src or dst class id\r\n"
    assert run(d, b"slabs reassign 39 0\r\n") == b"NOSPARE source class has no spare pages\r\n"
    assert run(d, b"slabs reassign 40 0\r\n") == b"BADCLASS invalid src or dst class id\r\n"


def test_lru_crawler_state() -> None:
    d = make()
    assert run(d, b"lru_crawler enable\r\n") == b"ERROR failed to start lru crawler thread\r\n"
    assert run(d, b"lru_crawler disable\r\nlru_crawler crawl 0\r\n") == b"OK\r\nCLIENT_ERROR lru crawler disabled\r\n"
    assert run(d, b"lru_crawler enable\r\nlru_crawler crawl 1,2\r\nlru_crawler metadump all\r\n") == (
        b"OK\r\nOK\r\nEND\r\n"
    )
