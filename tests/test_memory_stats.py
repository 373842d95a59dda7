"""A memory cache's own figures in ``stats`` match a real memcached 1.6's, command by command.

``curr_items``, ``bytes``, ``limit_maxbytes``, ``evictions``, ``get_expired`` and
``get_flushed`` are not byte-comparable in the differential corpus (which compares
only the shape of ``stats``), so this session sends the same commands to memcached
and to mproxy on the memory backend and compares those figures after every step.

memcached reclaims dead items in two more ways mproxy does not have: its LRU crawler
(off here: ``MEMCACHED_ARGS`` turns the LRU maintainer off, and the crawler with it)
and, when allocating a new item, the expired or flushed items it finds at the tail
of the LRU. The session keeps the latter out of play: a live item (``p0``) stays at
the LRU tail until the flush, and no command after the flush allocates an item.
Items are expired with ``touch KEY -1`` rather than by waiting.
"""

from __future__ import annotations

import pytest

from tests.conftest import MproxyFactory
from tests.servers import RawSession, Server

pytestmark = [pytest.mark.memcached, pytest.mark.e2e]

FIGURES = ("curr_items", "bytes", "limit_maxbytes", "evictions", "get_expired", "get_flushed")

STEPS: tuple[bytes, ...] = (
    b"set p0 0 0 1\r\n0\r\n",  # stays at the LRU tail: memcached's allocations stop there
    b"set a 0 0 1\r\n1\r\n",
    b"touch a -1\r\n",  # expired, still held
    b"get a\r\n",  # get_expired
    b"set b 0 0 1\r\n2\r\n",
    b"gat -1 b\r\n",  # returned once, then expired
    b"gets b\r\n",
    b"set c 0 0 1\r\n3\r\ntouch c -1\r\ndelete c\r\n",
    b"set d 0 0 1\r\n4\r\ntouch d -1\r\nincr d 1\r\n",
    b"set e 0 0 1\r\n5\r\ntouch e -1\r\nset e 0 0 1\r\n6\r\n",  # a storage command looks up too
    b"set f 0 0 1\r\n7\r\ntouch f -1\r\nadd f 0 0 1\r\n8\r\n",
    b"set g 0 0 1\r\n9\r\ntouch g -1\r\ntouch g 100\r\n",
    b"set h 0 0 1\r\n1\r\nset i 0 0 1\r\n2\r\nset j 0 0 1\r\n3\r\nset k 0 0 1\r\n4\r\n",
    b"flush_all\r\n",  # everything held is now invalid, and still held (k until the end)
    b"get h\r\n",  # get_flushed
    b"touch i 100\r\n",
    b"delete j\r\n",
    b"incr p0 1\r\n",
    b"gat 100 e f g\r\n",
    b"stats reset\r\n",  # zeroes the counters, keeps the gauges
)


def exchange(session: RawSession, data: bytes) -> bytes:
    """Send ``data`` then the meta no-op; the replies up to its ``MN``."""
    assert session.send(data + b"mn\r\n")
    reply, complete = session.recv_until_terminator(b"MN\r\n")
    assert complete, reply
    return reply[: -len(b"MN\r\n")]


def figures(session: RawSession) -> dict[str, int]:
    lines = exchange(session, b"stats\r\n").decode().splitlines()
    stats = dict(line.split(" ", 2)[1:] for line in lines if line.startswith("STAT "))
    return {name: int(stats[name]) for name in FIGURES}


def test_figures_match_memcached_step_by_step(memcached_server: Server, mproxy_factory: MproxyFactory) -> None:
    mproxy = mproxy_factory("memory")
    with RawSession(memcached_server.port) as real, RawSession(mproxy.port) as ours:
        assert figures(ours) == figures(real)
        seen = []
        for step in STEPS:
            assert exchange(ours, step) == exchange(real, step), step
            seen.append(figures(ours))
            assert seen[-1] == figures(real), step
    before_reset, final = seen[-2], seen[-1]
    assert (before_reset["get_expired"], before_reset["get_flushed"]) == (7, 6)
    assert (final["curr_items"], final["get_expired"], final["get_flushed"]) == (1, 0, 0)
