"""Results of RPCs run on a real OS thread, handed back to greenlets.

:mod:`.aio` runs every gRPC call on one real thread (``grpc.aio``); this
module carries each outcome back to whoever waits for it:

* :class:`PendingCall` is the outcome of one RPC for greenlets of the hub
  thread (the thread that started the transport: the proxy's only thread).
  ``get()`` blocks the calling greenlet only, and cancels the RPC if that
  greenlet is interrupted (``gevent.Timeout``, ``Greenlet.kill``);
  ``wait(timeout)`` waits without cancelling (a write outlives its client);
  ``add_done_callback(fn)`` runs ``fn(call)`` in the hub when it resolves, so
  a batch fans out to its waiters without a greenlet of its own.
* :class:`HubInbox` is the one wake-up from the loop thread: a ``deque`` of
  finished calls and one libev ``async`` watcher. libev coalesces sends until
  the hub has run the callback, so a burst of results costs one eventfd write
  and one hub callback. The watcher holds the hub's loop only while calls are
  expected, so an idle transport never keeps ``gevent.wait()`` from returning.
* :class:`BlockingCall` is the same outcome for any other thread (an
  un-patched process's ``threading.Timer``): it waits on a real lock, released
  by the loop thread itself.
* :func:`real_threading` gives ``threading`` and ``socket`` their un-patched
  members for a moment, so that what ``grpc.aio`` and ``asyncio`` create in it
  (the completion-queue poller thread, the loop's wake-up socket pair) are real
  OS-level objects. Only use it while the hub thread cannot run (it waits on a
  real lock: :meth:`.aio.AioLoop.call_blocking`).

gevent's primitives work without monkey-patching too (the hub then runs
whenever the thread waits through gevent), so this module serves a patched
proxy and an un-patched test process alike.
"""

from __future__ import annotations

import collections
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

from gevent import monkey
from gevent.hub import Waiter, get_hub

#: ``threading`` members gevent replaces that gRPC and asyncio touch when they make a
#: thread or a lock (``get_ident``/``local`` stay patched: the stdlib keys its thread
#: table by ``get_ident`` both when a thread starts and when it ends).
_REAL_THREADING_NAMES = ("Thread", "_start_new_thread", "_set_sentinel", "_allocate_lock", "Lock", "_CRLock", "Event")
_REAL_SOCKET_NAMES = ("socket", "socketpair", "SocketType")

#: The un-patched primitives of the stdlib.
start_real_thread: Callable[..., int] = monkey.get_original("_thread", "start_new_thread")
RealLock: Callable[[], Any] = monkey.get_original("_thread", "allocate_lock")
real_thread_id: Callable[[], int] = monkey.get_original("_thread", "get_ident")

#: What a timed-out :meth:`PendingCall.wait` receives instead of a result.
_TIMED_OUT = object()


@contextmanager
def real_threading() -> Iterator[None]:
    """``threading`` and ``socket`` un-patched for the duration of the block (process-wide).

    Anything any thread makes in the block gets real threads, locks and
    sockets. The caller keeps the hub thread blocked meanwhile, so no greenlet
    sees the swap. A no-op in a process gevent has not patched.
    """
    swaps = [
        (module, name)
        for module, names in ((threading, _REAL_THREADING_NAMES), (socket, _REAL_SOCKET_NAMES))
        if monkey.is_module_patched(module.__name__)
        for name in names
    ]
    saved = [(module, name, getattr(module, name)) for module, name in swaps]
    for module, name in swaps:
        setattr(module, name, monkey.get_original(module.__name__, name))
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


class TransportClosed(RuntimeError):
    """The transport was closed before (or while) the call ran."""


class Call:
    """The outcome of one RPC: a response (a list of responses for a server
    stream) or an exception (the RPC's ``grpc.RpcError``, :class:`TransportClosed`).

    Resolved exactly once. The loop thread hands the outcome over with
    :meth:`post`; ``handle`` is the loop's cancel hook (its task), set there.
    """

    __slots__ = ("_value", "_error", "_done", "_on_cancel", "handle", "cancel_requested")

    def __init__(self, on_cancel: Callable[[Call], None]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._done = False
        self._on_cancel = on_cancel
        self.handle: Any = None
        self.cancel_requested = False

    def done(self) -> bool:
        return self._done

    def result(self) -> Any:
        """The outcome of a resolved call (raises its error)."""
        if not self._done:
            raise RuntimeError("the call has not finished")
        if self._error is not None:
            raise self._error
        return self._value

    def exception(self) -> BaseException | None:
        """The error of a resolved call, or None."""
        return self._error

    def cancel(self) -> None:
        """Ask the transport to cancel the RPC (it then fails with CANCELLED)."""
        if not self._done and not self.cancel_requested:
            self.cancel_requested = True
            self._on_cancel(self)

    def post(self, value: Any, error: BaseException | None) -> None:
        """Loop thread: hand over the outcome (once)."""
        raise NotImplementedError

    def get(self) -> Any:
        """Wait for the outcome and return it (raise its error)."""
        raise NotImplementedError

    def wait(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds (None: for ever) without cancelling; whether it is done."""
        raise NotImplementedError


class PendingCall(Call):
    """A :class:`Call` for greenlets of the hub thread, delivered by a :class:`HubInbox`."""

    __slots__ = ("_inbox", "_waiter", "_callbacks")

    def __init__(self, on_cancel: Callable[[Call], None], inbox: HubInbox) -> None:
        super().__init__(on_cancel)
        self._inbox = inbox
        self._waiter: Waiter | None = None
        self._callbacks: list[Callable[[PendingCall], None]] | None = None

    def post(self, value: Any, error: BaseException | None) -> None:
        self._inbox.post(self, value, error)

    def get(self) -> Any:
        """Blocks this greenlet only. If it is interrupted meanwhile, the RPC is cancelled."""
        if not self._done:
            try:
                self._block(None)
            except BaseException:
                if not self._done:
                    self.cancel()
                raise
        if self._error is not None:
            raise self._error
        return self._value

    def wait(self, timeout: float | None) -> bool:
        if not self._done and (timeout is None or timeout > 0):
            self._block(timeout)
        return self._done

    @property
    def waited_for(self) -> bool:
        """Whether a greenlet waits in :meth:`get` or :meth:`wait` now (one at a time)."""
        return self._waiter is not None

    def _block(self, timeout: float | None) -> None:
        if self._waiter is not None:
            raise RuntimeError("another greenlet is already waiting for this call (use add_done_callback)")
        waiter = self._waiter = Waiter()
        timer = None
        if timeout is not None:
            timer = waiter.hub.loop.timer(timeout)
            timer.start(waiter.switch, _TIMED_OUT, update=True)
        try:
            waiter.get()
        finally:
            self._waiter = None
            if timer is not None:
                timer.close()

    def add_done_callback(self, callback: Callable[[PendingCall], None]) -> None:
        """Run ``callback(self)`` in the hub greenlet once resolved (at once if it is).
        It must not block; its exceptions go to the hub's error handler."""
        if self._done:
            callback(self)
        elif self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    def _resolve(self, value: Any, error: BaseException | None) -> None:
        """Hub greenlet: set the outcome, run the callbacks, wake the waiter."""
        if self._done:
            return
        self._value, self._error, self._done = value, error, True
        callbacks, self._callbacks = self._callbacks, None
        if callbacks:
            for callback in callbacks:
                try:
                    callback(self)
                except Exception:
                    get_hub().handle_error(callback, *sys.exc_info())
        waiter = self._waiter
        if waiter is not None:
            waiter.switch(None)


class BlockingCall(Call):
    """A :class:`Call` for a thread other than the hub's: it waits on a real lock,
    released by the loop thread when it posts the outcome."""

    __slots__ = ("_lock",)

    def __init__(self, on_cancel: Callable[[Call], None]) -> None:
        super().__init__(on_cancel)
        self._lock = RealLock()
        self._lock.acquire()

    def post(self, value: Any, error: BaseException | None) -> None:
        if not self._done:
            self._value, self._error, self._done = value, error, True
            self._lock.release()

    def get(self) -> Any:
        self.wait(None)
        return self.result()

    def wait(self, timeout: float | None) -> bool:
        if not self._done:
            if self._lock.acquire(True, -1 if timeout is None else max(timeout, 0.0)):
                self._lock.release()
        return self._done


class HubInbox:
    """Calls finished on the loop thread, delivered to their greenlets in the hub.

    Made in, and bound to, the hub thread that will wait for the calls.
    """

    def __init__(self) -> None:
        self._hub = get_hub()
        self._queue: collections.deque[tuple[PendingCall, Any, BaseException | None]] = collections.deque()
        self._pending = 0
        # (typeshed's watcher type lacks ``ref``: what keeps the loop alive)
        self._watcher: Any = cast(Any, self._hub.loop.async_())
        self._watcher.start(self._deliver)
        self._watcher.ref = False

    def expect(self) -> None:
        """Hub thread: one more call will be posted (the watcher holds the loop meanwhile)."""
        self._pending += 1
        if self._pending == 1:
            self._watcher.ref = True

    def post(self, call: PendingCall, value: Any, error: BaseException | None) -> None:
        """Any thread: hand over one finished call (exactly once per expected call)."""
        self._queue.append((call, value, error))
        self._watcher.send()

    def _deliver(self) -> None:
        queue = self._queue
        while queue:
            call, value, error = queue.popleft()
            self._pending -= 1
            try:
                call._resolve(value, error)
            except BaseException:  # a waiter that raises must not stop the others
                self._hub.handle_error(call, *sys.exc_info())
        if self._pending <= 0:
            self._pending = 0
            self._watcher.ref = False

    def close(self) -> None:
        """Hub thread: deliver what is left (from the hub greenlet, as waking a waiter
        requires), then stop the watcher."""
        self._hub.loop.run_callback(self._final_delivery)

    def _final_delivery(self) -> None:
        self._deliver()
        self._watcher.stop()
        self._watcher.close()
