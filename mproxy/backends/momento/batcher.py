"""Coalescing: one batcher of gets and one of plain sets per backend.

Gets (:class:`GetBatcher`)
--------------------------
Gets of all connections, one key or many, go through it. A key that a read
in flight already carries joins that read (single-flight), unless a write to
the key has ended since that read was sent: the backend's
:class:`~.flow.KeyOrder` calls :meth:`GetBatcher.forget` then, so no get
acknowledged after a write can be served what was read before it. Any other
key joins the open batch. Batches leave while fewer than ``window`` are in
flight, so an idle backend sends a get at once; while ``window`` reads are in
flight, new keys wait and leave together as soon as one ends (no timer, so
nothing is added when idle). A batch carries at most ``max_keys`` keys (a
full one waits in line), at most ``max_pending`` keys wait in all (callers
wait for room within their deadline), and every batch in flight holds a call
slot (:class:`~.flow.Slots`). A batch of one key is a unary ``Get``, of more
a ``GetBatch`` (server streaming). Each key's result (hit, miss, or a failure
of its own) or the call's error goes back to every caller of that key; one
slow batch holds its own callers and its slot, not the next batch: once every
caller of a batch in flight has given up, it leaves its place in the window.

Sets (:class:`SetBatcher`)
--------------------------
Plain sets (a value and a TTL) the same way, as ``SetBatch`` (``Set`` for one
item). The caller holds the key's write turn (:class:`~.flow.Turns`: any
earlier write of the key has ended), so a batch never carries a key twice.
An item whose client gave up before its batch left is dropped (never
written); once sent, the RPC runs to its own deadline (``write_timeout``),
and the turn lasts until it ends. A batch carries at most ``max_keys`` items
and ``max_bytes`` bytes of values; a larger item goes alone (``Set``).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from typing import Any

from momento_wire_types import cacheclient_pb2 as pb

from mproxy.backends.base import BackendError
from mproxy.backends.momento.bridge import PendingCall
from mproxy.backends.momento.errors import rpc_error
from mproxy.backends.momento.flow import Budget, Signal, Slots, Turns

#: ``submit(method, request, keys, deadline)``: start one RPC (the backend's; it
#: counts the call and its keys and retries what is idempotent).
Submit = Callable[[str, Any, int, float], PendingCall]


class _Batch:
    """Keys (or items) that leave together in one RPC."""

    __slots__ = ("keys", "items", "deadline", "waiting", "event", "done", "sent", "overdue", "error", "results", "call")

    def __init__(self) -> None:
        self.keys: list[bytes] = []
        #: what the batcher keeps per key (the set items)
        self.items: list[Any] = []
        self.deadline = 0.0
        #: callers waiting for it (a batch all of whose callers gave up is not sent)
        self.waiting = 0
        self.event = Signal()
        self.done = False
        self.sent = False
        #: sent, and every caller gave up on it: it no longer holds a place in the window
        self.overdue = False
        #: the call's error, else each key's result: bytes, None (a miss), or an Exception
        self.error: BaseException | None = None
        self.results: dict[bytes, Any] = {}
        #: its RPC, once sent
        self.call: PendingCall | None = None

    def wait(self, timeout: float) -> bool:
        """Whether it ended, waiting up to ``timeout`` seconds. The first caller waits
        on the call itself (woken as it resolves, after the batcher's callback has
        set the results: one hub hop less), the others on :attr:`event`."""
        if self.done:
            return True
        call = self.call
        if call is not None and not call.waited_for:
            call.wait(timeout)
            return self.done
        return self.event.wait(timeout)


class _Batcher:
    """What both batchers share: the open batch, the line of full ones, the
    window of batches in flight, call slots, the bound on pending keys."""

    def __init__(self, submit: Submit, slots: Slots, window: int, max_keys: int, max_pending: int) -> None:
        if window < 1 or max_keys < 1 or max_pending < max_keys:
            raise ValueError("window and max_keys must be >= 1, max_pending >= max_keys")
        self._submit = submit
        self._slots = slots
        self.window = window
        self.max_keys = max_keys
        self.max_pending = max_pending
        self._open: _Batch | None = None
        self._line: collections.deque[_Batch] = collections.deque()
        #: keys waiting to leave, and batches in flight
        self.pending = 0
        self.in_flight = 0
        self._asked = False
        self._room: Signal | None = None

    def _wait_for_room(self, budget: Budget) -> None:
        while self.pending >= self.max_pending:
            if self._room is None:
                self._room = Signal()
            if not self._room.wait(budget.left()):
                raise budget.expired("waiting for room among the keys waiting to leave")

    def _new_open(self) -> _Batch:
        if self._open is not None:
            self._line.append(self._open)
        batch = self._open = _Batch()
        return batch

    def _pump(self) -> None:
        """Send batches while the window and the call slots allow."""
        while self.in_flight < self.window and (self._line or self._open is not None):
            if not self._slots.try_acquire():
                if not self._asked:
                    self._asked = True
                    self._slots.ask(self._granted)
                return
            self._send(self._next())

    def _granted(self) -> None:
        """A call slot came free for this batcher."""
        self._asked = False
        if self.in_flight >= self.window or not (self._line or self._open is not None):
            self._slots.release()
            return
        self._send(self._next())
        self._pump()

    def _next(self) -> _Batch:
        if self._line:
            return self._line.popleft()
        batch = self._open
        assert batch is not None
        self._open = None
        return batch

    def _send(self, batch: _Batch) -> None:
        """Send ``batch`` on a call slot taken for it."""
        self.pending -= len(batch.keys)
        if self._room is not None and self.pending < self.max_pending:
            room, self._room = self._room, None
            room.set()
        batch.sent = True
        if batch.waiting > 0 and self._start(batch):
            self.in_flight += 1
            return
        self._dropped(batch)  # nobody waits for it any more
        batch.done = True
        batch.event.set()
        self._slots.release()

    def _start(self, batch: _Batch) -> bool:
        """Start the RPC of ``batch``; False if there is nothing to send."""
        raise NotImplementedError

    def _dropped(self, batch: _Batch) -> None:
        """``batch`` is not sent: every caller gave up before it could leave."""

    def _leave(self, batch: _Batch) -> None:
        """A caller of ``batch`` stopped waiting for it (its deadline passed). Once
        none waits, a batch in flight gives its place in the window to the next one
        (it keeps its call slot until its RPC ends): a stalled batch holds its own
        callers, not those who come after them."""
        batch.waiting -= 1
        if batch.waiting <= 0 and batch.sent and not batch.done and not batch.overdue:
            batch.overdue = True
            self.in_flight -= 1
            self._pump()

    def _ended(self, batch: _Batch) -> None:
        """The RPC of ``batch`` ended (its outcome is set): wake its callers, go on."""
        if not batch.overdue:
            self.in_flight -= 1
        batch.done = True
        batch.event.set()
        self._slots.release()
        self._pump()


class GetBatcher(_Batcher):
    """Gets, coalesced and single-flight (module docstring)."""

    def __init__(self, submit: Submit, slots: Slots, window: int, max_keys: int, max_pending: int) -> None:
        super().__init__(submit, slots, window, max_keys, max_pending)
        self._reads: dict[bytes, _Batch] = {}

    def start(self, keys: Sequence[bytes], budget: Budget) -> dict[bytes, _Batch]:
        """Put each key (``keys`` without duplicates) in a read; :meth:`collect` waits for them."""
        self._wait_for_room(budget)
        reads = self._reads
        placed: dict[bytes, _Batch] = {}
        for key in keys:
            batch = reads.get(key)
            if batch is None:
                batch = self._open
                if batch is None or len(batch.keys) >= self.max_keys:
                    batch = self._new_open()
                batch.keys.append(key)
                self.pending += 1
                if budget.deadline > batch.deadline:
                    batch.deadline = budget.deadline
                reads[key] = batch  # later callers join it: it carries the key now
            placed[key] = batch
        for batch in _distinct(placed.values()) if len(placed) > 1 else placed.values():
            batch.waiting += 1
        self._pump()
        return placed

    def collect(self, placed: dict[bytes, _Batch], budget: Budget) -> dict[bytes, bytes]:
        """The stored bytes of the keys found, once their reads have ended; raises
        the command's timeout error at its deadline, or the read's error."""
        batches = _distinct(placed.values()) if len(placed) > 1 else list(placed.values())
        for i, batch in enumerate(batches):
            if not batch.wait(budget.left()):
                for left in batches[i:]:
                    self._leave(left)
                raise budget.expired()
        found: dict[bytes, bytes] = {}
        for key, batch in placed.items():
            if batch.error is not None:
                raise rpc_error(batch.error, budget.op, budget.timeout)
            value = batch.results[key]
            if type(value) is bytes:
                found[key] = value
            elif value is not None:
                raise value
        return found

    def read(self, keys: Sequence[bytes], budget: Budget) -> dict[bytes, bytes]:
        """:meth:`start`, then :meth:`collect`."""
        return self.collect(self.start(keys, budget), budget)

    def forget(self, key: bytes) -> None:
        """Later gets of ``key`` must not join the read in flight (a write of it ended)."""
        batch = self._reads.get(key)
        if batch is not None and batch.sent:
            del self._reads[key]

    def _start(self, batch: _Batch) -> bool:
        keys = batch.keys
        if len(keys) == 1:
            call = self._submit("Get", pb._GetRequest(cache_key=keys[0]), 1, batch.deadline)
        else:
            request = pb._GetBatchRequest()
            add = request.items.add  # (2.4x faster than building the items first)
            for key in keys:
                add(cache_key=key)
            call = self._submit("GetBatch", request, len(keys), batch.deadline)
        call.add_done_callback(lambda call: self._done(batch, call))
        batch.call = call
        return True

    def _dropped(self, batch: _Batch) -> None:
        reads = self._reads
        for key in batch.keys:
            if reads.get(key) is batch:
                del reads[key]

    def _done(self, batch: _Batch, call: PendingCall) -> None:
        reads = self._reads
        for key in batch.keys:
            if reads.get(key) is batch:
                del reads[key]
        batch.error = call.exception()
        if batch.error is None:
            response = call.result()
            keys = batch.keys
            batch.results = dict(zip(keys, _get_results(len(keys), [response] if len(keys) == 1 else response)))
        self._ended(batch)


class _SetItem:
    __slots__ = ("key", "stored", "ttl_ms", "turns", "dropped", "failure")

    def __init__(self, key: bytes, stored: bytes, ttl_ms: int, turns: Turns) -> None:
        self.key = key
        self.stored = stored
        self.ttl_ms = ttl_ms
        self.turns = turns
        self.dropped = False
        #: the item's own failure (the call answered for it), if any
        self.failure: BaseException | None = None


class SetBatcher(_Batcher):
    """Plain sets, coalesced (module docstring)."""

    def __init__(
        self,
        submit: Submit,
        slots: Slots,
        window: int,
        max_keys: int,
        max_pending: int,
        max_bytes: int,
        write_timeout: float,
    ) -> None:
        super().__init__(submit, slots, window, max_keys, max_pending)
        self.max_bytes = max_bytes
        self.write_timeout = write_timeout
        self._open_bytes = 0

    def write(self, key: bytes, stored: bytes, ttl_ms: int, turns: Turns, budget: Budget) -> None:
        """Set ``key`` (whose write turn the caller holds) within ``budget``;
        raises its timeout error (the write may still apply if its batch left) or the RPC's."""
        self._wait_for_room(budget)
        size = len(key) + len(stored)
        batch = self._open
        if batch is None or len(batch.keys) >= self.max_keys or self._open_bytes + size > self.max_bytes:
            batch = self._new_open()
            self._open_bytes = 0
        item = _SetItem(key, stored, ttl_ms, turns)
        batch.keys.append(key)
        batch.items.append(item)
        self._open_bytes += size
        batch.waiting += 1
        self.pending += 1
        self._pump()
        if not batch.wait(budget.left()):
            if not batch.sent:
                item.dropped = True  # never written
            self._leave(batch)
            raise budget.expired()
        if batch.error is not None:
            raise rpc_error(batch.error, budget.op, budget.timeout)
        if item.failure is not None:
            raise item.failure

    def _start(self, batch: _Batch) -> bool:
        items = [item for item in batch.items if not item.dropped]
        if not items:
            return False
        batch.keys = [item.key for item in items]
        deadline = time.monotonic() + self.write_timeout
        if len(items) == 1:
            item = items[0]
            request: Any = pb._SetRequest(cache_key=item.key, cache_body=item.stored, ttl_milliseconds=item.ttl_ms)
            call = self._submit("Set", request, 1, deadline)
        else:
            request = pb._SetBatchRequest()
            add = request.items.add
            for i in items:
                add(cache_key=i.key, cache_body=i.stored, ttl_milliseconds=i.ttl_ms)
            call = self._submit("SetBatch", request, len(items), deadline)
        for item in items:
            item.turns.started()
        call.add_done_callback(lambda call: self._done(batch, items, call))
        batch.call = call
        return True

    def _done(self, batch: _Batch, items: list[_SetItem], call: PendingCall) -> None:
        batch.error = call.exception()
        if batch.error is None:
            response = call.result()
            for item, failure in zip(items, _set_results(len(items), [response] if len(items) == 1 else response)):
                item.failure = failure
        self._ended(batch)
        for item in items:
            item.turns.ended()


def _distinct(batches: Any) -> list[_Batch]:
    out: list[_Batch] = []
    for batch in batches:
        if not any(batch is seen for seen in out):
            out.append(batch)
    return out


def _get_results(count: int, responses: Sequence[Any]) -> list[Any]:
    """One result per key of a read: the stored bytes, None (a miss), or the key's failure."""
    if len(responses) != count:
        failure = BackendError("internal", f"momento internal error on get: answered {len(responses)} of {count} keys")
        return [failure] * count
    results: list[Any] = []
    for response in responses:
        if response.result == pb.Hit:
            results.append(response.cache_body)
        elif response.result == pb.Miss:
            results.append(None)
        else:
            results.append(BackendError("internal", f"momento internal error on get: unexpected result {response.result}"))
    return results


def _set_results(count: int, responses: Sequence[Any]) -> list[Any]:
    """One result per item of a write: None (stored) or the item's failure."""
    if len(responses) != count:
        failure = BackendError("internal", f"momento internal error on set: answered {len(responses)} of {count} items")
        return [failure] * count
    return [
        None
        if response.result == pb.Ok
        else BackendError("internal", f"momento internal error on set: unexpected result {response.result}")
        for response in responses
    ]
