"""Coalescing, single-flight and the order of writes per key on the Momento backend.

The batchers and the flow control (``mproxy.backends.momento.batcher`` and
``.flow``) are driven here with a fake ``submit`` whose calls the test ends by
hand, in this process's gevent hub (greenlets, no monkey-patching, no gRPC):
what leaves when, which caller gets which result. The last tests run the
backend against the bundled server: a get after an acknowledged write never
joins a read sent before it, and a write waits for an earlier one of the key.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import grpc
import pytest
from momento_wire_types import cacheclient_pb2 as pb

from mproxy.backends.base import BackendError, StoreMode
from mproxy.backends.momento import MomentoBackend
from mproxy.backends.momento.batcher import GetBatcher, SetBatcher
from mproxy.backends.momento.endpoint import Endpoint
from mproxy.backends.momento.flow import Budget, KeyOrder, Slots
from mproxy.momento_local.server import LocalServer, serve

HOST = "127.0.0.1"
#: The budget of a caller that must not time out in a test.
LONG = 30.0


class FakeCall:
    """A started RPC the test ends with :meth:`finish` (what ``PendingCall`` offers a batcher)."""

    def __init__(self, method: str, request: Any, keys: int, deadline: float) -> None:
        self.method, self.request, self.keys, self.deadline = method, request, keys, deadline
        self._callbacks: list[Callable[[FakeCall], None]] = []
        self._value: Any = None
        self._error: BaseException | None = None
        self.finished = False

    @property
    def sent_keys(self) -> list[bytes]:
        if self.method in ("Get", "Set"):
            return [self.request.cache_key]
        return [item.cache_key for item in self.request.items]

    #: the batcher waits on the batch's event, not on the call (a fake call cannot block)
    waited_for = True

    def add_done_callback(self, callback: Callable[[FakeCall], None]) -> None:
        self._callbacks.append(callback)

    def exception(self) -> BaseException | None:
        return self._error

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value

    def finish(self, value: Any = None, error: BaseException | None = None) -> None:
        self._value, self._error, self.finished = value, error, True
        for callback in self._callbacks:
            callback(self)
        gevent.sleep(0)  # let the woken callers run


class FakeSubmit:
    def __init__(self) -> None:
        self.calls: list[FakeCall] = []

    def __call__(self, method: str, request: Any, keys: int, deadline: float) -> FakeCall:
        call = FakeCall(method, request, keys, deadline)
        self.calls.append(call)
        return call

    def running(self) -> list[FakeCall]:
        return [call for call in self.calls if not call.finished]


def hits(call: FakeCall, values: dict[bytes, bytes]) -> Any:
    """The response of a read call: a hit for the keys in ``values``, a miss for the others."""
    responses = [
        pb._GetResponse(result=pb.Hit, cache_body=values[key]) if key in values else pb._GetResponse(result=pb.Miss)
        for key in call.sent_keys
    ]
    return responses[0] if call.method == "Get" else responses


def budget(op: str = "get", seconds: float = LONG) -> Budget:
    return Budget(op, time.monotonic() + seconds, seconds)


@pytest.fixture
def submit() -> FakeSubmit:
    return FakeSubmit()


def make_gets(submit: FakeSubmit, window: int = 1, max_keys: int = 100, max_pending: int = 1000, slots: int = 64) -> GetBatcher:
    return GetBatcher(submit, Slots(slots), window, max_keys, max_pending)  # type: ignore[arg-type]


def read(gets: GetBatcher, keys: list[bytes], seconds: float = LONG, op: str = "get") -> gevent.Greenlet:
    greenlet = gevent.spawn(gets.read, keys, budget(op, seconds))
    gevent.sleep(0)  # it places its keys now
    return greenlet


# ---- the get batcher ------------------------------------------------------------------------


def test_an_idle_batcher_sends_at_once_and_keys_wait_only_while_the_window_is_full(submit: FakeSubmit) -> None:
    gets = make_gets(submit, window=1)
    first = read(gets, [b"a"])
    assert [(c.method, c.sent_keys) for c in submit.calls] == [("Get", [b"a"])]  # alone: a unary Get, at once
    waiting = [read(gets, [b"b"]), read(gets, [b"c", b"d"]), read(gets, [b"b"])]
    assert len(submit.calls) == 1  # no timer: nothing leaves while the window is full
    submit.calls[0].finish(hits(submit.calls[0], {b"a": b"1"}))
    assert first.get(timeout=1) == {b"a": b"1"}
    assert [(c.method, c.sent_keys) for c in submit.calls[1:]] == [("GetBatch", [b"b", b"c", b"d"])]  # together
    submit.calls[1].finish(hits(submit.calls[1], {b"b": b"2", b"d": b"4"}))
    assert [g.get(timeout=1) for g in waiting] == [{b"b": b"2"}, {b"d": b"4"}, {b"b": b"2"}]
    assert gets.pending == gets.in_flight == 0


def test_identical_keys_share_one_read_until_a_write_of_the_key_ends(submit: FakeSubmit) -> None:
    gets = make_gets(submit, window=4)
    first = read(gets, [b"k"])
    joined = read(gets, [b"k"])
    assert len(submit.calls) == 1  # single-flight: the second get joined the read in flight
    gets.forget(b"k")  # a write of k ended (was acknowledged) after that read was sent
    fresh = read(gets, [b"k"])
    assert len(submit.calls) == 2  # so a later get must not be served what was read before it
    submit.calls[1].finish(hits(submit.calls[1], {b"k": b"new"}))
    submit.calls[0].finish(hits(submit.calls[0], {b"k": b"old"}))
    assert (first.get(timeout=1), joined.get(timeout=1), fresh.get(timeout=1)) == (
        {b"k": b"old"}, {b"k": b"old"}, {b"k": b"new"},
    )
    # forgetting a key that is only waiting to leave changes nothing: its read is not sent yet
    blocker = [read(gets, [b"x%d" % i]) for i in range(4)]
    pending = read(gets, [b"p"])
    gets.forget(b"p")
    again = read(gets, [b"p"])
    for call in submit.running():
        call.finish(hits(call, {}))
    assert [c.sent_keys for c in submit.running()] == [[b"p"]]  # one read of p, both callers on it
    submit.running()[0].finish(hits(submit.running()[0], {b"p": b"1"}))
    assert pending.get(timeout=1) == again.get(timeout=1) == {b"p": b"1"}
    assert all(g.get(timeout=1) == {} for g in blocker)


def test_results_and_errors_fan_out_per_key(submit: FakeSubmit) -> None:
    gets = make_gets(submit, window=1)
    read(gets, [b"first"])
    callers = {key: read(gets, [key], op="gets") for key in (b"hit", b"miss", b"bad")}
    both = read(gets, [b"hit", b"bad"])
    submit.calls[0].finish(hits(submit.calls[0], {}))
    batch = submit.calls[1]
    assert batch.sent_keys == [b"hit", b"miss", b"bad"]
    batch.finish([
        pb._GetResponse(result=pb.Hit, cache_body=b"v"),
        pb._GetResponse(result=pb.Miss),
        pb._GetResponse(result=pb.Invalid, message="boom"),
    ])  # fmt: skip
    assert callers[b"hit"].get(timeout=1) == {b"hit": b"v"}
    assert callers[b"miss"].get(timeout=1) == {}
    for greenlet in (callers[b"bad"], both):
        greenlet.join(timeout=1)
        assert isinstance(greenlet.exception, BackendError) and greenlet.exception.code == "internal"
    # a failed call fails every caller, each named by its own command
    first, second = read(gets, [b"x"], op="get"), read(gets, [b"y"], op="gets")
    submit.calls[2].finish(error=grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down"))
    submit.calls[3].finish(error=grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down"))
    for greenlet, op in ((first, "get"), (second, "gets")):
        greenlet.join(timeout=1)
        assert str(greenlet.exception) == f"momento unavailable on {op}: down"


def test_batches_are_bounded_in_keys_and_in_flight(submit: FakeSubmit) -> None:
    gets = make_gets(submit, window=2, max_keys=100)
    keys = [b"k%d" % i for i in range(250)]
    caller = read(gets, keys)
    assert [len(c.sent_keys) for c in submit.calls] == [100, 100]  # the window: 2 in flight
    submit.calls[0].finish(hits(submit.calls[0], {}))
    assert [len(c.sent_keys) for c in submit.calls] == [100, 100, 50]
    for call in submit.running():
        call.finish(hits(call, {key: key for key in call.sent_keys}))
    assert len(caller.get(timeout=1)) == 150


def test_pending_keys_are_bounded_and_callers_wait_for_room(submit: FakeSubmit) -> None:
    gets = make_gets(submit, window=1, max_keys=2, max_pending=2)
    read(gets, [b"a"])  # in flight
    read(gets, [b"b", b"c"])  # pending: 2, the bound
    start = time.monotonic()
    late = read(gets, [b"d"], seconds=0.2)
    late.join(timeout=5)
    assert isinstance(late.exception, BackendError) and late.exception.code == "timeout"
    assert "waiting for room" in str(late.exception) and time.monotonic() - start >= 0.15
    roomy = read(gets, [b"e"])
    submit.calls[0].finish(hits(submit.calls[0], {}))  # b, c leave: room for e
    assert [c.sent_keys for c in submit.calls] == [[b"a"], [b"b", b"c"]]
    submit.calls[1].finish(hits(submit.calls[1], {}))
    assert [c.sent_keys for c in submit.calls[2:]] == [[b"e"]]
    submit.calls[2].finish(hits(submit.calls[2], {b"e": b"5"}))
    assert roomy.get(timeout=1) == {b"e": b"5"}


def test_a_batch_whose_callers_all_gave_up_is_not_sent(submit: FakeSubmit) -> None:
    gets = make_gets(submit, window=1)
    read(gets, [b"a"])
    quitter = read(gets, [b"q"], seconds=0.05)
    quitter.join(timeout=5)
    assert isinstance(quitter.exception, BackendError) and quitter.exception.code == "timeout"
    submit.calls[0].finish(hits(submit.calls[0], {}))
    assert len(submit.calls) == 1 and gets.pending == 0
    again = read(gets, [b"q"])  # a new read, not the dropped one
    submit.calls[1].finish(hits(submit.calls[1], {b"q": b"1"}))
    assert again.get(timeout=1) == {b"q": b"1"}


def test_a_sent_read_whose_callers_all_gave_up_does_not_hold_the_window(submit: FakeSubmit) -> None:
    gets = make_gets(submit, window=1)
    stalled = read(gets, [b"a"], seconds=0.05)
    stalled.join(timeout=5)
    assert isinstance(stalled.exception, BackendError) and stalled.exception.code == "timeout"
    assert gets.in_flight == 0 and len(submit.running()) == 1  # its RPC ends at its own deadline
    nxt = read(gets, [b"b"])
    assert [c.sent_keys for c in submit.calls] == [[b"a"], [b"b"]]  # at once, not after the stalled one
    submit.calls[1].finish(hits(submit.calls[1], {b"b": b"2"}))
    assert nxt.get(timeout=1) == {b"b": b"2"}
    submit.calls[0].finish(hits(submit.calls[0], {}))
    assert gets.in_flight == 0 and gets.pending == 0


def test_batches_hold_call_slots_and_wait_their_turn_for_one() -> None:
    submit = FakeSubmit()
    slots = Slots(1)
    gets = GetBatcher(submit, slots, 4, 100, 1000)  # type: ignore[arg-type]
    slots.acquire(budget())  # someone else holds the only slot
    caller = read(gets, [b"a"])
    assert submit.calls == [] and gets.pending == 1
    slots.release()  # handed to the batcher, in line
    assert [c.sent_keys for c in submit.calls] == [[b"a"]] and slots.free == 0
    submit.calls[0].finish(hits(submit.calls[0], {}))
    assert caller.get(timeout=1) == {} and slots.free == 1


# ---- the set batcher and the order of writes ------------------------------------------------------


def make_sets(submit: FakeSubmit, window: int = 1, max_bytes: int = 1000) -> tuple[SetBatcher, KeyOrder, list[bytes]]:
    forgotten: list[bytes] = []
    sets = SetBatcher(submit, Slots(64), window, 100, 1000, max_bytes, LONG)  # type: ignore[arg-type]
    return sets, KeyOrder(forgotten.append), forgotten


def write(sets: SetBatcher, order: KeyOrder, key: bytes, value: bytes, seconds: float = LONG) -> gevent.Greenlet:
    def run() -> None:
        b = budget("set", seconds)
        with order.take([key], b) as turns:
            sets.write(key, value, 1000, turns, b)

    greenlet = gevent.spawn(run)
    gevent.sleep(0)
    return greenlet


def stored(call: FakeCall) -> Any:
    responses = [pb._SetResponse(result=pb.Ok) for _ in call.sent_keys]
    return responses[0] if call.method == "Set" else responses


def test_plain_sets_coalesce_and_large_items_go_alone(submit: FakeSubmit) -> None:
    sets, order, _ = make_sets(submit, window=1, max_bytes=100)
    writers = [write(sets, order, b"a", b"1"), write(sets, order, b"b", b"2"), write(sets, order, b"c", b"3")]
    big = write(sets, order, b"big", b"x" * 200)
    assert [(c.method, c.sent_keys) for c in submit.calls] == [("Set", [b"a"])]
    submit.calls[0].finish(stored(submit.calls[0]))
    assert [(c.method, c.sent_keys) for c in submit.calls[1:]] == [("SetBatch", [b"b", b"c"])]
    submit.calls[1].finish(stored(submit.calls[1]))
    assert [(c.method, c.sent_keys) for c in submit.calls[2:]] == [("Set", [b"big"])]  # above max_bytes: alone
    submit.calls[2].finish(stored(submit.calls[2]))
    for greenlet in (*writers, big):
        greenlet.get(timeout=1)
    assert order.keys_held == 0


def test_a_write_waits_for_an_earlier_write_of_the_key_even_one_whose_client_gave_up(submit: FakeSubmit) -> None:
    sets, order, forgotten = make_sets(submit, window=4)
    v1 = write(sets, order, b"k", b"v1", seconds=0.05)
    v1.join(timeout=5)
    assert isinstance(v1.exception, BackendError) and v1.exception.code == "timeout"  # the client gave up ...
    assert [c.sent_keys for c in submit.running()] == [[b"k"]] and order.keys_held == 1  # ... its RPC runs on
    v2 = write(sets, order, b"k", b"v2")
    other = write(sets, order, b"other", b"x")
    assert [c.sent_keys for c in submit.calls] == [[b"k"], [b"other"]]  # v2 waits; another key does not
    assert forgotten == []
    submit.calls[0].finish(stored(submit.calls[0]))  # v1's RPC ends: now v2 starts
    assert forgotten == [b"k"]  # and reads of k in flight are not joined any more
    assert [c.sent_keys for c in submit.calls[2:]] == [[b"k"]]
    assert submit.calls[2].request.cache_body == b"v2"
    for call in submit.running():
        call.finish(stored(call))
    v2.get(timeout=1)
    other.get(timeout=1)
    assert order.keys_held == 0


def test_an_item_whose_client_gave_up_before_its_batch_left_is_never_written(submit: FakeSubmit) -> None:
    sets, order, _ = make_sets(submit, window=1)
    first = write(sets, order, b"a", b"1")
    quitter = write(sets, order, b"q", b"1", seconds=0.05)
    stays = write(sets, order, b"s", b"1")
    quitter.join(timeout=5)
    assert isinstance(quitter.exception, BackendError)
    assert order.keys_held == 2  # q's turn is given up at once: nothing of it was sent
    submit.calls[0].finish(stored(submit.calls[0]))
    assert [c.sent_keys for c in submit.calls[1:]] == [[b"s"]]
    submit.calls[1].finish(stored(submit.calls[1]))
    first.get(timeout=1)
    stays.get(timeout=1)


def test_a_sent_batch_whose_callers_all_gave_up_does_not_hold_the_window(submit: FakeSubmit) -> None:
    # 20 pipelined sets against a stalled server: their RPCs run on to write_timeout,
    # but once their clients have their timeouts the next sets must not queue behind them
    sets, order, _ = make_sets(submit, window=1)
    stalled = write(sets, order, b"a", b"1", seconds=0.05)
    stalled.join(timeout=5)
    assert isinstance(stalled.exception, BackendError) and stalled.exception.code == "timeout"
    assert sets.in_flight == 0 and order.keys_held == 1  # its RPC runs on, its turn with it
    nxt = write(sets, order, b"b", b"2")
    assert [c.sent_keys for c in submit.calls] == [[b"a"], [b"b"]]  # at once
    submit.calls[1].finish(stored(submit.calls[1]))
    nxt.get(timeout=1)
    submit.calls[0].finish(stored(submit.calls[0]))
    assert sets.in_flight == 0 and order.keys_held == 0


def test_a_turn_given_up_while_waiting_still_ends_after_the_earlier_one() -> None:
    order = KeyOrder(lambda key: None)
    first = order.take([b"k"], budget())
    first.started()  # a write RPC of k is in flight
    first.release()  # its command is over (its client may have given up)

    def second() -> None:
        order.take([b"k"], budget("set", 0.05))  # waits for the first, gives up

    g = gevent.spawn(second)
    g.join(timeout=5)
    assert isinstance(g.exception, BackendError) and "earlier write" in str(g.exception)
    third = gevent.spawn(lambda: order.take([b"k"], budget()).release())
    gevent.sleep(0.05)
    assert not third.dead  # the abandoned second turn must not let the third overtake the first
    first.ended()
    third.join(timeout=1)
    assert third.successful() and order.keys_held == 0


# ---- the backend against the bundled server -------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    srv = serve(host=HOST, port=0, caches=["c"])
    try:
        yield srv
    finally:
        srv.stop(None)


@pytest.fixture
def backend(server: LocalServer) -> Iterator[MomentoBackend]:
    b = MomentoBackend(Endpoint.local(HOST, server.port), "c", request_timeout=5.0)
    try:
        yield b
    finally:
        server.faults.clear()
        b.close()


def test_a_get_after_an_acknowledged_set_does_not_join_an_earlier_read(backend: MomentoBackend, server: LocalServer) -> None:
    backend.store(StoreMode.SET, b"k", b"old", 0, 0)
    server.faults.add("Get:delay=0.3:count=1")
    server.stats.reset()
    early = gevent.spawn(backend.get_many, [b"k"])
    gevent.sleep(0.05)  # its Get is in flight (held by the server)
    assert backend.store(StoreMode.SET, b"k", b"new", 0, 0).name == "STORED"
    late = backend.get_many([b"k"])
    assert late[b"k"].value == b"new"
    early.join(timeout=5)
    assert server.stats.snapshot()["calls"] == {"Get": 2, "Set": 1}  # the late get made its own read
    # and without a write in between, identical gets share one read
    server.faults.add("Get:delay=0.2:count=1")
    server.stats.reset()
    greenlets = [gevent.spawn(backend.get_many, [b"k"]) for _ in range(20)]
    gevent.joinall(greenlets, timeout=5)
    assert all(g.value[b"k"].value == b"new" for g in greenlets)
    assert server.stats.snapshot()["calls"] == {"Get": 1}


def test_every_write_kind_waits_for_an_earlier_write_of_the_key(backend: MomentoBackend, server: LocalServer) -> None:
    """A write whose client timed out holds the key until its RPC ends; then the next
    write of any kind runs, and the order of the two is the order they were sent."""
    b = MomentoBackend(Endpoint.local(HOST, server.port), "c", request_timeout=0.2)
    try:
        commands: list[tuple[str, Callable[[], object]]] = [
            ("set", lambda: b.store(StoreMode.SET, b"w", b"2", 0, 0)),
            ("add", lambda: b.store(StoreMode.ADD, b"w", b"2", 0, 0)),
            ("replace", lambda: b.store(StoreMode.REPLACE, b"w", b"2", 0, 0)),
            ("append", lambda: b.store(StoreMode.APPEND, b"w", b"2", 0, 0)),
            ("delete", lambda: b.delete(b"w")),
            ("incr", lambda: b.incr_decr(b"w", 1, True)),
            ("touch", lambda: b.touch(b"w", 100)),
            ("gat", lambda: b.touch_many([b"w"], 100)),
        ]
        for name, command in commands:
            b.store(StoreMode.SET, b"w", b"1", 0, 0)
            server.faults.add("Set:delay=0.6:count=1")
            with pytest.raises(BackendError) as err:
                b.store(StoreMode.SET, b"w", b"5", 0, 0)  # times out; lands at 0.6 s
            assert err.value.code == "timeout"
            with pytest.raises(BackendError) as err:
                command()  # waits for the earlier write, within its own 0.2 s
            assert "earlier write" in str(err.value), name
            deadline = time.monotonic() + LONG
            while b.stats()["backend_rpc_writes_in_flight"]:
                assert time.monotonic() < deadline
                gevent.sleep(0.02)  # polling interval; the hub delivers the RPC's end
            assert server.store.get("c", b"w") == b"5", name  # the timed-out write applied
            command()  # now it runs, after it
    finally:
        b.close()
