"""The commands of one read on a blocking backend: concurrent, in order per key, replies in order.

The backend double, :class:`Held`, is the memory store declared blocking whose calls
on a held key wait until the test releases that key (events, never sleeps); it logs
every call as it starts. ``gevent.idle()`` lets every greenlet that can run do so
before the test looks. The memory backend itself (not blocking) runs inline.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import gevent
import gevent.event
import pytest

from mproxy.backends.base import BackendError
from mproxy.backends.memory import MemoryBackend
from mproxy.dispatch import Dispatcher
from mproxy.dispatch import core
from mproxy.protocol import binary as b
from mproxy.protocol.binary import BinaryParser, Opcode
from mproxy.protocol.errors import ProtocolError
from mproxy.protocol.parser import NEED_DATA, Parser
from mproxy.stats import Stats
from tests.test_binary_parser import req, store_req
from tests.test_dispatch_binary import frames
from tests.wire import answers

#: Bound on waiting for what the greenlets reach on their own (events, not timing).
DEADLINE = 10.0


class Held(MemoryBackend):
    """A blocking backend whose calls on a held key wait for :meth:`release`."""

    blocking = True

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[bytes, gevent.event.Event] = {}
        #: (operation, keys) of every call, as it starts
        self.calls: list[tuple[str, tuple[bytes, ...]]] = []
        #: keys whose calls fail
        self.failing: set[bytes] = set()

    def hold(self, *keys: bytes) -> None:
        for key in keys:
            self.gates[key] = gevent.event.Event()

    def release(self, *keys: bytes) -> None:
        for key in keys:
            self.gates.pop(key).set()

    def _enter(self, op: str, keys: Iterable[bytes]) -> None:
        keys = tuple(keys)
        self.calls.append((op, keys))
        for key in keys:
            gate = self.gates.get(key)
            if gate is not None:
                gate.wait()
            if key in self.failing:
                raise BackendError("timeout", f"timeout on {op}")

    def started(self, op: str) -> list[tuple[bytes, ...]]:
        return [keys for name, keys in self.calls if name == op]

    def get_many(self, keys: Any, with_cas: bool = False) -> Any:
        self._enter("get", keys)
        return super().get_many(keys, with_cas)

    def store(self, mode: Any, key: bytes, value: bytes, flags: int, exptime: int, cas_unique: int = 0) -> Any:
        self._enter(mode.value, (key,))
        return super().store(mode, key, value, flags, exptime, cas_unique)

    def incr_decr(self, key: bytes, delta: int, incr: bool) -> Any:
        self._enter("incr", (key,))
        return super().incr_decr(key, delta, incr)

    def delete(self, key: bytes) -> bool:
        self._enter("delete", (key,))
        return super().delete(key)

    def flush_all(self, delay: int = 0) -> None:
        self._enter("flush_all", ())
        super().flush_all(delay)

    def meta_get(self, key: bytes, request: Any) -> Any:
        self._enter("mg", (key,))
        return super().meta_get(key, request)

    def meta_store(self, key: bytes, value: bytes, request: Any) -> Any:
        self._enter("ms", (key,))
        return super().meta_store(key, value, request)

    def meta_delete(self, key: bytes, request: Any) -> Any:
        self._enter("md", (key,))
        return super().meta_delete(key, request)


def make(backend: Any) -> tuple[Dispatcher, Stats]:
    stats = Stats()
    return Dispatcher(backend, stats.cache("c"), stats), stats


def commands(data: bytes) -> list[Any]:
    parser = Parser()
    parser.feed(data)
    out: list[Any] = []
    while True:
        try:
            cmd = parser.next_command()
        except ProtocolError as err:
            out.append(err)
            continue
        if cmd is NEED_DATA:
            return out
        out.append(cmd)


class Reader:
    """Runs ``d.run`` in a greenlet, keeping each reply as it arrives (None: a flush)."""

    def __init__(self, d: Dispatcher, data: bytes | list[Any]) -> None:
        self.items: list[Any] = []
        cmds = commands(data) if isinstance(data, bytes) else data
        self.greenlet = gevent.spawn(self._read, d.run(cmds, "test:1"))

    def _read(self, replies: Iterator[Any]) -> None:
        for reply in replies:
            self.items.append(reply if reply is None or isinstance(reply, bytes) else b"".join(reply))

    @property
    def replies(self) -> list[bytes]:
        return [item for item in self.items if item is not None]

    def finish(self) -> list[bytes]:
        self.greenlet.get(timeout=DEADLINE)
        return self.replies


def settle() -> None:
    """Let every greenlet that can run, run (until the hub has nothing else to do)."""
    gevent.idle()


# -- concurrency ----------------------------------------------------------------------


def test_a_slow_command_does_not_delay_the_execution_of_the_others() -> None:
    held = Held()
    d, _ = make(held)
    held.hold(b"a")
    reader = Reader(d, b"set a 0 0 1\r\n1\r\nset b 0 0 1\r\n2\r\nget c\r\nincr n 1\r\ndelete z\r\n")
    settle()
    # everything ran but the held set; nothing is answered before it
    assert held.started("set") == [(b"a",), (b"b",)]
    assert held.started("get") == [(b"c",)] and held.started("incr") == [(b"n",)]
    assert held.started("delete") == [(b"z",)]
    assert reader.replies == []
    held.release(b"a")
    assert reader.finish() == [b"STORED\r\n", b"STORED\r\n", b"END\r\n", b"NOT_FOUND\r\n", b"NOT_FOUND\r\n"]


def test_twenty_stalled_sets_all_run_at_once() -> None:
    """Issue 8's case: 20 pipelined sets against a stalled backend wait for one stall, not 20."""
    held = Held()
    d, _ = make(held)
    keys = [b"k%d" % i for i in range(20)]
    held.hold(*keys)
    reader = Reader(d, b"".join(b"set %b 0 0 1\r\nx\r\n" % key for key in keys))
    settle()
    assert held.started("set") == [(key,) for key in keys]
    held.release(*keys)
    assert reader.finish() == [b"STORED\r\n"] * 20


def test_replies_leave_in_order_as_each_becomes_ready() -> None:
    held = Held()
    d, _ = make(held)
    held.hold(b"a", b"b")
    reader = Reader(d, b"get x\r\nset a 0 0 1\r\n1\r\nset y 0 0 1\r\n1\r\nset b 0 0 1\r\n2\r\nget y\r\n")
    settle()
    # the get of x is answered, then "flush what you have" while a is held
    assert reader.items == [b"END\r\n", None]
    held.release(b"b")
    settle()
    assert reader.replies == [b"END\r\n"]  # b is done, but a comes first
    held.release(b"a")
    assert reader.finish() == [b"END\r\n", b"STORED\r\n", b"STORED\r\n", b"STORED\r\n", b"VALUE y 0 1\r\n1\r\nEND\r\n"]


def test_no_more_than_max_in_flight_groups_per_read() -> None:
    held = Held()
    d, _ = make(held)
    keys = [b"k%d" % i for i in range(core.MAX_IN_FLIGHT + 36)]
    held.hold(*keys)
    reader = Reader(d, b"".join(b"incr %b 1\r\n" % key for key in keys))
    settle()
    assert len(held.started("incr")) == core.MAX_IN_FLIGHT
    held.release(keys[0])  # the first is answered: one more starts
    settle()
    assert len(held.started("incr")) == core.MAX_IN_FLIGHT + 1
    held.release(*keys[1:])
    assert reader.finish() == [b"NOT_FOUND\r\n"] * len(keys)


def test_a_read_of_one_command_runs_in_the_callers_greenlet() -> None:
    held = Held()
    d, _ = make(held)
    spawned: list[Any] = []
    real_spawn = gevent.spawn
    try:
        gevent.spawn = lambda *a, **k: spawned.append(a) or real_spawn(*a, **k)  # type: ignore[assignment]
        assert answers(d.run(commands(b"set a 0 0 1\r\n1\r\n"))) == [b"STORED\r\n"]
        assert answers(d.run(commands(b"get a b\r\nget c\r\n"))) == [b"VALUE a 0 1\r\n1\r\nEND\r\n", b"END\r\n"]
    finally:
        gevent.spawn = real_spawn  # type: ignore[assignment]
    assert spawned == []  # the gets are one group: alone in their read


# -- order per key -------------------------------------------------------------------


def test_a_command_waits_for_the_earlier_ones_on_its_keys() -> None:
    held = Held()
    d, _ = make(held)
    held.hold(b"k")
    reader = Reader(d, b"set k 0 0 1\r\n1\r\nget q k\r\nset other 0 0 1\r\n2\r\nget z\r\n")
    settle()
    # the get naming k waits for the set of k; the others go on
    assert held.started("get") == [(b"z",)] and held.started("set") == [(b"k",), (b"other",)]
    held.release(b"k")
    assert reader.finish() == [b"STORED\r\n", b"VALUE k 0 1\r\n1\r\nEND\r\n", b"STORED\r\n", b"END\r\n"]


def test_increments_of_one_key_apply_in_order() -> None:
    held = Held()
    d, _ = make(held)
    held.store(mode=core.StoreMode.SET, key=b"n", value=b"10", flags=0, exptime=0)
    held.hold(b"n")
    reader = Reader(d, b"incr n 1\r\n" * 5 + b"decr m 1\r\n")
    settle()
    assert held.started("incr") == [(b"n",), (b"m",)]  # one of n at a time
    held.release(b"n")
    assert reader.finish() == [b"11\r\n", b"12\r\n", b"13\r\n", b"14\r\n", b"15\r\n", b"NOT_FOUND\r\n"]


def test_meta_commands_keep_their_order_per_key() -> None:
    held = Held()
    d, _ = make(held)
    held.hold(b"k")
    reader = Reader(d, b"ms k 1\r\nA\r\nmg k v\r\nmd k q\r\nmg k v\r\nmn\r\n")
    settle()
    assert reader.replies == [] and held.calls == [("ms", (b"k",))]
    held.release(b"k")
    assert reader.finish() == [b"HD\r\n", b"VA 1\r\nA\r\n", b"", b"EN\r\n", b"MN\r\n"]


def test_a_command_without_keys_is_a_barrier() -> None:
    held = Held()
    d, _ = make(held)
    held.hold(b"a")
    reader = Reader(d, b"set a 0 0 1\r\n1\r\nflush_all\r\nset b 0 0 1\r\n2\r\nget a b\r\n")
    settle()
    # flush_all waits for the set before it; the set after it waits for flush_all
    assert held.calls == [("set", (b"a",))]
    held.release(b"a")
    assert reader.finish() == [b"STORED\r\n", b"OK\r\n", b"STORED\r\n", b"VALUE b 0 1\r\n2\r\nEND\r\n"]
    assert [op for op, _ in held.calls] == ["set", "flush_all", "set", "get"]


@pytest.mark.parametrize("barrier", [b"version\r\n", b"stats settings\r\n", b"verbosity 1\r\n", b"mn\r\n"])
def test_process_wide_commands_wait_for_everything_before_them(barrier: bytes) -> None:
    held = Held()
    d, _ = make(held)
    held.hold(b"a")
    reader = Reader(d, b"delete a\r\n" + barrier + b"delete b\r\n")
    settle()
    assert held.calls == [("delete", (b"a",))]
    held.release(b"a")
    replies = reader.finish()
    assert len(replies) == 3 and replies[0] == replies[2] == b"NOT_FOUND\r\n"


def test_binary_quiet_gets_are_one_read_and_wait_for_a_write_of_their_key() -> None:
    held = Held()
    d, _ = make(held)
    held.hold(b"b")
    parser = BinaryParser()
    parser.feed(store_req(Opcode.SETQ, b"b", b"B", 0) + req(Opcode.GETKQ, b"a") + req(Opcode.GETKQ, b"b")
                + req(Opcode.GETK, b"c") + req(Opcode.NOOP))
    cmds: list[Any] = []
    while (cmd := parser.next_command()) is not NEED_DATA:
        cmds.append(cmd)
    reader = Reader(d, cmds)
    settle()
    assert held.started("get") == []  # the run names b, which the setq holds
    held.release(b"b")
    got = frames(b"".join(reader.finish()))
    assert held.started("get") == [(b"a", b"b", b"c")]
    assert [(f.opcode, f.status, f.key) for f in got] == [(Opcode.GETKQ, 0, b"b"), (Opcode.GETK, 1, b"c"), (Opcode.NOOP, 0, b"")]


# -- failures ------------------------------------------------------------------------


def test_a_failure_answers_its_command_only() -> None:
    held = Held()
    held.failing.add(b"bad")
    d, stats = make(held)
    reader = Reader(d, b"set bad 0 0 1\r\n1\r\nset good 0 0 1\r\n2\r\nget bad\r\nincr bad 1\r\nget good\r\n")
    assert reader.finish() == [
        b"SERVER_ERROR timeout on set\r\n", b"STORED\r\n", b"SERVER_ERROR timeout on get\r\n",
        b"SERVER_ERROR timeout on incr\r\n", b"VALUE good 0 1\r\n2\r\nEND\r\n",
    ]
    assert stats.cache("c").snapshot()["backend_errors_timeout"] == 3


def test_a_binary_failure_answers_binary_frames() -> None:
    held = Held()
    held.failing.add(b"bad")
    d, _ = make(held)
    cmds = [b.BinGet(Opcode.GETKQ, 1, b"bad", quiet=True, with_key=True), b.BinGet(Opcode.GETK, 2, b"ok", with_key=True),
            b.BinSimple(Opcode.NOOP, 3)]
    got = frames(b"".join(Reader(d, cmds).finish()))
    # one read for the run: its failure answers each get
    assert [(f.opcode, f.status, f.value) for f in got] == [
        (Opcode.GETKQ, 0x82, b"timeout on get"), (Opcode.GETK, 0x82, b"timeout on get"), (Opcode.NOOP, 0, b"")]


# -- the memory backend: inline -----------------------------------------------------


def test_the_memory_backend_runs_inline_in_the_callers_greenlet() -> None:
    class Where(MemoryBackend):
        greenlets: set[Any] = set()

        def get_many(self, keys: Any, with_cas: bool = False) -> Any:
            self.greenlets.add(gevent.getcurrent())
            return super().get_many(keys, with_cas)

        def store(self, *args: Any, **kwargs: Any) -> Any:
            self.greenlets.add(gevent.getcurrent())
            return super().store(*args, **kwargs)

    backend = Where()
    d, _ = make(backend)
    assert d.concurrent is False
    replies = list(d.run(commands(b"set a 0 0 1\r\n1\r\nget a\r\nset b 0 0 1\r\n2\r\nget b a\r\n")))
    assert None not in replies and len(replies) == 4
    assert backend.greenlets == {gevent.getcurrent()}


def test_a_backend_that_does_not_say_is_taken_as_blocking() -> None:
    class Quiet:
        kind = "quiet"
        max_batch_keys = 10

    d, _ = make(Quiet())
    assert d.concurrent is True


def test_a_read_of_one_command_on_a_blocking_backend_runs_in_the_callers_greenlet() -> None:
    class Where(MemoryBackend):
        blocking = True
        max_batch_keys = 10
        greenlets: set[Any] = set()
        reads: list[int] = []

        def get_many(self, keys: Any, with_cas: bool = False) -> Any:
            self.greenlets.add(gevent.getcurrent())
            self.reads.append(len(keys))
            return super().get_many(keys, with_cas)

    backend = Where()
    d, _ = make(backend)
    assert d.concurrent is True
    assert list(d.run(commands(b"get a\r\n"))) == [b"END\r\n"]  # a local tier's hit: no greenlet, no generator
    assert backend.greenlets == {gevent.getcurrent()}
    keys = b" ".join(b"k%d" % i for i in range(25))
    replies = list(d.run(commands(b"get " + keys + b"\r\n")))  # more keys than one read: still in batches
    assert b"".join(b"".join(r) if not isinstance(r, bytes) else r for r in replies if r is not None) == b"END\r\n"
    assert backend.reads == [1, 10, 10, 5]
