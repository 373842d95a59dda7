"""Flow control of the Momento backend: budgets, call slots, the order of writes per key.

All of it runs in the hub thread (greenlets and the hub's callbacks), so it
needs no locks; waits are gevent ones, each bounded by the command's deadline.

* :class:`Budget`: the time one backend command may take.
* :class:`Signal`: a one-shot event greenlets wait for with a deadline (a
  gevent ``Event`` without the ``Timeout`` object per wait).
* :class:`Slots`: at most ``max_in_flight`` RPCs in flight per backend. An RPC
  holds its slot until it ends, not until its caller stops waiting: a write
  whose client timed out keeps its slot, so a delay storm cannot pile up RPCs
  without bound. Callers wait for a slot within their budget; batchers ask for
  one with a callback and are served in the same first-come order.
* :class:`KeyOrder`: a write to a key starts only after the previous write to
  that key has ended at the RPC level, even if that write's client gave up
  already. A command takes its turn on each key it writes (all at once, before
  it waits: no cycle can form), waits for the turns before it, and gives its
  turns up when its last write RPC ends (:class:`Turns`).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from typing import Any

from gevent.hub import Waiter, get_hub

from mproxy.backends.momento.errors import timeout_error


class Budget:
    """The time one backend command may take: ``op`` names the command in
    errors, ``deadline`` (``time.monotonic()``) is when it must be done,
    ``timeout`` the seconds it was given (named in timeout errors). Not to be
    changed once made (a plain class: made once per command, on the hot path)."""

    __slots__ = ("op", "deadline", "timeout")

    def __init__(self, op: str, deadline: float, timeout: float) -> None:
        self.op = op
        self.deadline = deadline
        self.timeout = timeout

    def left(self) -> float:
        """Seconds left (0 when none)."""
        return max(self.deadline - time.monotonic(), 0.0)

    def remaining(self) -> float:
        """Seconds left; raises the command's timeout error when none are."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise timeout_error(self.op, self.timeout)
        return left

    def expired(self, waiting: str = "") -> Exception:
        """The command's timeout error (``waiting`` says for what, if not the server)."""
        return timeout_error(self.op, self.timeout, waiting)


class Signal:
    """Set once; greenlets of the hub thread :meth:`wait` for it, each up to a timeout.

    :meth:`set` wakes the waiters from a hub callback (never from inside the
    caller), as gevent's ``Event`` does.
    """

    __slots__ = ("is_set", "_waiters")

    def __init__(self) -> None:
        self.is_set = False
        self._waiters: list[Waiter[Any]] | None = None

    def wait(self, timeout: float) -> bool:
        """Whether it is set, waiting up to ``timeout`` seconds for it."""
        if self.is_set:
            return True
        if timeout <= 0:
            return False
        waiter: Waiter[Any] = Waiter()
        if self._waiters is None:
            self._waiters = [waiter]
        else:
            self._waiters.append(waiter)
        timer = waiter.hub.loop.timer(timeout)
        timer.start(waiter.switch, False, update=True)
        try:
            waiter.get()
        finally:
            timer.close()
            if not self.is_set and self._waiters is not None:
                self._waiters.remove(waiter)
        return self.is_set

    def set(self) -> None:
        if not self.is_set:
            self.is_set = True
            if self._waiters:
                get_hub().loop.run_callback(self._wake)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            waiter.switch(True)


class Slots:
    """At most ``size`` RPCs in flight (see the module docstring)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        self.size = size
        self.free = size
        self._queue: collections.deque[Signal | Callable[[], None]] = collections.deque()

    @property
    def in_flight(self) -> int:
        return self.size - self.free

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody waits for one."""
        if self.free > 0 and not self._queue:
            self.free -= 1
            return True
        return False

    def acquire(self, budget: Budget) -> None:
        """Take a slot, waiting within ``budget``; raises its timeout error."""
        if self.free > 0 and not self._queue:
            self.free -= 1
            return
        entry = Signal()
        self._queue.append(entry)
        if not entry.wait(budget.left()):
            self._queue.remove(entry)  # still queued: release() sets what it pops
            raise budget.expired("waiting for a free call slot")

    def ask(self, granted: Callable[[], None]) -> None:
        """Call ``granted()`` (in the hub) with a slot taken for it, in turn."""
        if self.try_acquire():
            granted()
        else:
            self._queue.append(granted)

    def release(self) -> None:
        """Give a slot back: to the first in line, else to the free ones."""
        if self._queue:
            entry = self._queue.popleft()
            if isinstance(entry, Signal):
                entry.set()
            else:
                entry()
        else:
            self.free += 1


class _Turn:
    """One command's turn on one key: done once its writes of the key ended."""

    __slots__ = ("done", "_event", "_callbacks")

    def __init__(self) -> None:
        self.done = False
        self._event: Signal | None = None
        self._callbacks: list[Callable[[], None]] | None = None

    def wait(self, timeout: float) -> bool:
        if self.done:
            return True
        if self._event is None:
            self._event = Signal()
        return self._event.wait(timeout)

    def on_done(self, callback: Callable[[], None]) -> None:
        if self.done:
            callback()
        elif self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    def finish(self) -> None:
        self.done = True
        if self._event is not None:
            self._event.set()
        callbacks, self._callbacks = self._callbacks, None
        for callback in callbacks or ():
            callback()


class KeyOrder:
    """The turns of writes per key (see the module docstring).

    ``on_write_end(key)`` runs when the writes of a turn have ended (the
    backend drops in-flight reads of the key there, so that no later get
    joins a read sent before the write was acknowledged).
    """

    def __init__(self, on_write_end: Callable[[bytes], None]) -> None:
        self._last: dict[bytes, _Turn] = {}
        self._on_write_end = on_write_end

    @property
    def keys_held(self) -> int:
        """Keys with a write in flight or waiting its turn."""
        return len(self._last)

    def take(self, keys: Sequence[bytes], budget: Budget) -> Turns:
        """Take a turn on each key, then wait for the earlier turns (within ``budget``;
        on timeout the turns are given up, after the earlier ones, and the
        timeout error raised)."""
        turns = []
        earlier = []
        last = self._last
        for key in dict.fromkeys(keys):
            turn = _Turn()
            before = last.get(key)
            last[key] = turn
            turns.append((key, turn))
            if before is not None and not before.done:
                earlier.append(before)
        held = Turns(self, turns)
        for before in earlier:
            if not before.wait(budget.left()):
                held.give_up_after(earlier)
                raise budget.expired("waiting for an earlier write of the same key")
        return held

    def _end(self, key: bytes, turn: _Turn) -> None:
        if self._last.get(key) is turn:
            del self._last[key]
        turn.finish()
        self._on_write_end(key)


class Turns:
    """The turns of one command (:meth:`KeyOrder.take`); a context manager that
    gives them up when the command is over and its write RPCs have ended."""

    __slots__ = ("_order", "_turns", "_writes", "_over")

    def __init__(self, order: KeyOrder, turns: list[tuple[bytes, _Turn]]) -> None:
        self._order = order
        self._turns = turns
        self._writes = 0
        self._over = False

    def __enter__(self) -> Turns:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def started(self) -> None:
        """A write RPC of the command started (pair with :meth:`ended`)."""
        self._writes += 1

    def ended(self, *_: Any) -> None:
        """A write RPC of the command ended (success, error, deadline or cancel)."""
        self._writes -= 1
        if self._over and self._writes == 0:
            self._finish()

    def track(self, call: Any) -> None:
        """A write RPC started: the turns last until ``call`` (a ``PendingCall``) ends."""
        self.started()
        call.add_done_callback(self.ended)

    def release(self) -> None:
        """The command is over: give the turns up now, or when its write RPCs end."""
        if not self._over:
            self._over = True
            if self._writes == 0:
                self._finish()

    def give_up_after(self, earlier: list[_Turn]) -> None:
        """No write started: give the turns up once the ``earlier`` ones are done
        (a later write must not overtake one still in flight)."""
        self._over = True
        waiting = [turn for turn in earlier if not turn.done]
        if not waiting:
            self._finish()
            return
        count = [len(waiting)]

        def one_done() -> None:
            count[0] -= 1
            if count[0] == 0:
                self._finish()

        for turn in waiting:
            turn.on_done(one_done)

    def _finish(self) -> None:
        turns, self._turns = self._turns, []
        for key, turn in turns:
            self._order._end(key, turn)
