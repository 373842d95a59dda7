"""Dispatch without sockets: commands in, exact reply bytes and counters out."""

from __future__ import annotations

from typing import Any

from mproxy.backends.base import BackendError, ValueTooLarge
from mproxy.backends.memory import MemoryBackend
from mproxy.dispatch import Dispatcher
from mproxy.protocol import commands as c
from mproxy.protocol.commands import StoreMode
from mproxy.protocol.errors import ClientError, CommandError
from mproxy.protocol.parser import NEED_DATA, Parser
from mproxy.stats import Stats
from tests.wire import answers


def run(d: Dispatcher, data: bytes) -> bytes:
    p = Parser()
    p.feed(data)
    commands = []
    while (cmd := p.next_command()) is not NEED_DATA:
        commands.append(cmd)
    return b"".join(answers(d.run(commands, "test:1")))


def make(backend: Any = None) -> tuple[Dispatcher, Stats]:
    stats = Stats()
    return Dispatcher(backend or MemoryBackend(), stats.cache("c"), stats), stats


def test_exact_counters_after_a_scripted_workload() -> None:
    d, stats = make()
    run(d, b"set a 0 0 1\r\n1\r\nget a b\r\ngets a\r\nincr a 1\r\nincr zz 1\r\ndecr a 1\r\n"
           b"delete a\r\ndelete a\r\ntouch a 1\r\nadd b 0 0 1\r\nx\r\ngat 0 b c\r\nflush_all\r\n"
           b"cas b 0 0 1 1\r\ny\r\n")
    st = stats.cache("c")
    assert (st.cmd_get, st.get_hits, st.get_misses) == (3, 2, 1)
    assert st.cmd_set == 3
    assert (st.incr_hits, st.incr_misses, st.decr_hits, st.decr_misses) == (1, 1, 1, 0)
    assert (st.delete_hits, st.delete_misses) == (1, 1)
    assert (st.cmd_touch, st.touch_hits, st.touch_misses) == (3, 1, 2)
    assert st.cmd_flush == 1
    assert st.cas_misses == 1


def test_noreply_suppresses_every_reply() -> None:
    d, _ = make()
    assert run(d, b"set a 0 0 1 noreply\r\n1\r\nincr a 1 noreply\r\ndelete a noreply\r\nflush_all noreply\r\n") == b""


def test_multiget_keeps_order_and_duplicates() -> None:
    d, _ = make()
    run(d, b"set a 1 0 1\r\nA\r\nset b 2 0 1\r\nB\r\n")
    assert run(d, b"get b x a b\r\n") == b"VALUE b 2 1\r\nB\r\nVALUE a 1 1\r\nA\r\nVALUE b 2 1\r\nB\r\nEND\r\n"


def test_too_large_set_removes_old_value() -> None:
    d, _ = make()
    run(d, b"set a 0 0 1\r\n1\r\n")
    assert answers(d.run([c.TooLarge(StoreMode.SET, b"a", 0, 0, 10**7)])) == [b"SERVER_ERROR object too large for cache\r\n"]
    assert run(d, b"get a\r\n") == b"END\r\n"


class Failing:
    kind = "failing"
    max_batch_keys = 100

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise BackendError("timeout", "momento timeout after 5.0s on " + name)
        return fail


def test_backend_errors_become_server_error_and_are_counted() -> None:
    d, stats = make(Failing())
    assert run(d, b"get a\r\n") == b"SERVER_ERROR momento timeout after 5.0s on get_many\r\n"
    assert run(d, b"set a 0 0 1 noreply\r\n1\r\n") == b""
    snap = stats.cache("c").snapshot()
    assert snap["backend_errors"] == 2 and snap["backend_errors_timeout"] == 2


class Buggy:
    kind = "buggy"
    max_batch_keys = 100

    def get_many(self, keys: Any) -> Any:
        raise ZeroDivisionError("bug")


def test_a_bug_costs_one_reply_not_the_connection() -> None:
    d, _ = make(Buggy())
    assert run(d, b"get a\r\nversion\r\n").startswith(b"SERVER_ERROR internal error\r\nVERSION ")


def test_stats_on_data_port() -> None:
    d, _ = make()
    out = run(d, b"stats\r\n")
    assert out.startswith(b"STAT pid ") and out.endswith(b"END\r\n")
    assert run(d, b"stats reset\r\n") == b"RESET\r\n"
    assert run(d, b"stats nonsense\r\n") == b"ERROR\r\n"


class Spy(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[tuple[bytes, ...], bool]] = []

    def get_many(self, keys: Any, with_cas: bool = False) -> Any:
        self.reads.append((tuple(keys), with_cas))
        return super().get_many(keys, with_cas)


def test_pipelined_gets_are_one_backend_read_with_per_command_replies() -> None:
    spy = Spy()
    d, stats = make(spy)
    run(d, b"set a 1 0 1\r\nA\r\nset b 2 0 1\r\nB\r\n")
    replies = answers(d.run([c.Get((b"a",)), c.Get((b"x", b"b"), cas=True), c.Get((b"a",))]))
    assert spy.reads == [((b"a", b"x", b"b", b"a"), True)]
    assert replies[0] == b"VALUE a 1 1\r\nA\r\nEND\r\n"
    assert replies[1].startswith(b"VALUE b 2 1 ") and replies[1].endswith(b"\r\nB\r\nEND\r\n")
    assert replies[2] == replies[0]
    st = stats.cache("c")
    assert (st.cmd_get, st.get_hits, st.get_misses) == (4, 3, 1)
    assert answers(d.run([c.Get((b"a",))])) == [replies[0]] and len(spy.reads) == 2


def test_pipelined_gets_share_a_backend_failure() -> None:
    d, stats = make(Failing())
    replies = answers(d.run([c.Get((b"a",)), c.Get((b"b",))]))
    assert replies == [b"SERVER_ERROR momento timeout after 5.0s on get_many\r\n"] * 2
    assert stats.cache("c").snapshot()["backend_errors_timeout"] == 1


def test_gets_are_grouped_up_to_the_backend_batch_size() -> None:
    spy = Spy()
    spy.max_batch_keys = 3
    d, _ = make(spy)
    gets = [c.Get((b"a", b"b")), c.Get((b"c",)), c.Get((b"d",)), c.Get((b"e", b"f", b"g", b"h")), c.Get((b"i",))]
    assert answers(d.run(gets)) == [b"END\r\n"] * 5
    # a get that would pass the limit starts the next group; one over it is a group alone
    assert spy.reads == [((b"a", b"b", b"c"), False), ((b"d",), False), ((b"e", b"f", b"g", b"h"), False), ((b"i",), False)]


def test_a_parse_error_answers_in_place_and_ends_the_group() -> None:
    spy = Spy()
    d, _ = make(spy)
    replies = answers(d.run([c.Get((b"a",)), CommandError(), ClientError("bad", noreply=True), c.Get((b"b",)), c.Version()]))
    # one reply per command: b"" where nothing is sent (the noreply error)
    assert replies[:4] == [b"END\r\n", b"ERROR\r\n", b"", b"END\r\n"] and replies[4].startswith(b"VERSION ")
    assert spy.reads == [((b"a",), False), ((b"b",), False)]


class RaisesTooLarge(MemoryBackend):
    """A backend that only raises on a value it cannot hold (deletes nothing itself)."""

    def store(self, mode: Any, key: bytes, value: bytes, flags: int, exptime: int, cas_unique: int = 0) -> Any:
        if len(value) > 4:
            raise ValueTooLarge("too large for this backend")
        return super().store(mode, key, value, flags, exptime, cas_unique)


def test_a_set_the_backend_finds_too_large_removes_old_value_but_add_does_not() -> None:
    d, _ = make(RaisesTooLarge())
    run(d, b"set a 0 0 1\r\n1\r\nset b 0 0 1\r\n2\r\n")
    assert run(d, b"set a 0 0 5\r\n12345\r\nadd b 0 0 5\r\n12345\r\n") == b"SERVER_ERROR object too large for cache\r\n" * 2
    assert run(d, b"get a b\r\n") == b"VALUE b 0 1\r\n2\r\nEND\r\n"
