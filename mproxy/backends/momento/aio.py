"""gRPC calls for greenlets, run by ``grpc.aio`` on one real OS thread.

Measured the cheapest way to drive gRPC from a gevent process (about half the
client CPU per streamed key of the sync stubs under ``init_gevent``, and no
gevent thread pool: docs/performance.md, "How mproxy drives gRPC")::

    transport = AioTransport(target, options=..., credentials=None, channels=2)
    transport.start()                      # in the serving process, after any fork
    call = transport.submit("GetBatch", request, metadata, deadline, retry=True)
    responses = call.get()                 # this greenlet waits, the hub runs on
    transport.close()

:class:`AioLoop`, one per process, shared by every transport: one real thread
(``_thread.start_new_thread`` as it was before gevent patched it) owning an
asyncio loop on a real ``selectors`` selector (asyncio would otherwise pick
gevent's and run a second hub in that thread). Channels are made on it by
:meth:`AioLoop.call_blocking`, inside :func:`.bridge.real_threading`:
``grpc.aio`` starts its completion-queue poller with ``threading.Thread``,
which under ``patch_all`` would be a greenlet of the loop thread blocking in C
for ever (the first call would never return). The hub thread waits on a real
lock meanwhile, so no greenlet sees the un-patched ``threading``.

:meth:`AioTransport.submit` (the hub thread, any greenlet) appends to a deque
and wakes the loop with ``call_soon_threadsafe`` only when no wake-up is
pending: a burst of submissions costs one self-pipe write. The loop runs each
RPC as a task with a gRPC deadline and, for idempotent RPCs, the SDK's
retries (:data:`RETRYABLE_CODES`, up to ``retry`` more attempts, at once, each
with what is left of the deadline), then posts the response (a list for a
server stream) or the ``grpc.aio.AioRpcError`` (a ``grpc.RpcError`` with
``code()``, ``details()``, ``trailing_metadata()``, but not a ``grpc.Call``)
to the caller's :class:`.bridge.Call`. Cancelling a call cancels its task
(gRPC CANCELLED on the wire).

Forks: ``grpc.aio``'s process-wide state does not survive one. A forked child
sees every transport closed and cannot start one if its parent ever did
(:meth:`AioLoop.start` raises): create transports only after the fork, in the
serving process (mproxy's workers are fork+exec'd, so they start afresh).

No ``grpc.experimental.gevent.init_gevent`` is needed or wanted (it is for the
sync API and costs a thread pool round trip per message).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import itertools
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import grpc.aio
from gevent import monkey

from mproxy.backends.momento.bridge import (
    BlockingCall,
    Call,
    HubInbox,
    PendingCall,
    RealLock,
    TransportClosed,
    real_thread_id,
    real_threading,
    start_real_thread,
)

#: How long starting the loop thread, or making channels on it, may take.
START_TIMEOUT_SECONDS = 10.0
#: How long stopping the loop thread may take (after the channels' grace).
STOP_TIMEOUT_SECONDS = 5.0
#: Statuses a retried RPC is retried on (the SDK's ``DefaultEligibilityStrategy``).
RETRYABLE_CODES = frozenset((grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL))
#: Least time left for which a failed RPC is still retried; also the least
#: deadline given to an RPC started late (it then fails as a timeout).
MIN_ATTEMPT_SECONDS = 0.001

Metadata = Sequence[tuple[str, str]]


def _real_selector() -> Any:
    """A selector of the un-patched stdlib (gevent replaces ``DefaultSelector``)."""
    for name in ("EpollSelector", "PollSelector", "SelectSelector"):
        try:
            return monkey.get_original("selectors", name)()
        except (AttributeError, OSError):
            continue
    raise RuntimeError("no usable selector for the gRPC loop thread")


def cancelled_error(details: str) -> grpc.aio.AioRpcError:
    """The error of a call cancelled on the client side."""
    return grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class AioLoop:
    """The asyncio loop thread of the process (see the module docstring); use :func:`acquire_loop`."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        self._jobs: collections.deque[tuple[Any, ...]] = collections.deque()
        self._wake_pending = False
        self._stopped = RealLock()

    def start(self) -> None:
        """Start the thread and its loop (blocks the hub thread briefly)."""
        global _used_in_pid
        if _used_in_pid is not None and _used_in_pid != os.getpid():
            raise RuntimeError(
                "grpc.aio was used in the parent before this process was forked: "
                "create gRPC transports only after the fork"
            )
        _used_in_pid = os.getpid()
        ready = RealLock()
        ready.acquire()
        self._stopped.acquire()
        errors: list[BaseException] = []
        start_real_thread(self._thread_main, (ready, errors))
        if not ready.acquire(True, START_TIMEOUT_SECONDS):
            raise RuntimeError(f"the gRPC loop thread did not start within {START_TIMEOUT_SECONDS:g} s")
        if errors:
            self.closed = True
            raise errors[0]

    def _thread_main(self, ready: Any, errors: list[BaseException]) -> None:
        try:
            with real_threading():  # the loop's self-pipe is a real socket pair
                loop = asyncio.SelectorEventLoop(_real_selector())
            asyncio.set_event_loop(loop)
            self.loop = loop
        except BaseException as exc:
            errors.append(exc)
            ready.release()
            self._stopped.release()
            return
        ready.release()
        try:
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()
                self._stopped.release()

    def call_blocking(self, function: Callable[[], Any], timeout: float = START_TIMEOUT_SECONDS) -> Any:
        """Run ``function()`` on the loop thread inside :func:`.bridge.real_threading`
        while this thread waits on a real lock (no greenlet runs meanwhile); its result."""
        done = RealLock()
        done.acquire()
        outcome: list[Any] = []

        def run() -> None:
            try:
                with real_threading():
                    outcome.append((function(), None))
            except BaseException as exc:
                outcome.append((None, exc))
            finally:
                done.release()

        assert self.loop is not None
        self.loop.call_soon_threadsafe(run)
        if not done.acquire(True, timeout):
            raise RuntimeError(f"the gRPC loop thread did not answer within {timeout:g} s")
        value, error = outcome[0]
        if error is not None:
            raise error
        return value

    def run_blocking(self, factory: Callable[[], Awaitable[Any]], timeout: float) -> None:
        """Run ``await factory()`` on the loop while this thread waits on a real lock
        (at most ``timeout`` seconds; the outcome is not returned)."""
        done = RealLock()
        done.acquire()

        def start() -> None:
            task = asyncio.ensure_future(factory())
            task.add_done_callback(lambda _: done.release())

        assert self.loop is not None
        self.loop.call_soon_threadsafe(start)
        done.acquire(True, timeout)

    def submit(self, job: tuple[Any, ...]) -> None:
        """Any thread: run ``job`` (``(coroutine function, *args)``, or ``(None, call)`` to
        cancel ``call``) on the loop. Raises :class:`.bridge.TransportClosed` once stopped."""
        self._jobs.append(job)
        if not self._wake_pending:
            self._wake_pending = True
            loop = self.loop
            try:
                if loop is None or self.closed:
                    raise RuntimeError("stopped")
                loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: the thread is gone
                self._jobs.clear()
                raise TransportClosed("the gRPC transport is closed") from None

    def _drain(self) -> None:
        self._wake_pending = False
        jobs = self._jobs
        loop = self.loop
        assert loop is not None
        while jobs:
            function, *args = jobs.popleft()
            if function is None:  # a cancel request
                task = args[0].handle
                if task is not None:
                    task.cancel()
                continue
            call: Call = args[0]
            if call.cancel_requested:
                call.post(None, cancelled_error("cancelled before it started"))
                continue
            task = loop.create_task(function(*args))
            call.handle = task

    def stop(self) -> None:
        """Stop the loop and join its thread (every channel is closed by now)."""
        if self.closed or self.loop is None:
            self.closed = True
            return
        self.closed = True
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:
            return
        if not self._stopped.acquire(True, STOP_TIMEOUT_SECONDS):
            raise RuntimeError("the gRPC loop thread did not stop")


#: The process's loop and how many transports use it.
_loop: AioLoop | None = None
_loop_users = 0
#: The process that first started a loop (grpc.aio's global state is per process).
_used_in_pid: int | None = None


def acquire_loop() -> AioLoop:
    """The process's :class:`AioLoop`, started on first use."""
    global _loop, _loop_users
    if _loop is None or _loop.closed:
        loop = AioLoop()
        loop.start()
        _loop = loop
    _loop_users += 1
    return _loop


def release_loop(loop: AioLoop) -> None:
    """One user fewer; the last one stops the loop."""
    global _loop, _loop_users
    if loop is not _loop:
        return
    _loop_users -= 1
    if _loop_users <= 0:
        _loop, _loop_users = None, 0
        loop.stop()


class AioTransport:
    """Unary and server-streaming calls of ``cache_client.Scs`` on ``channels``
    HTTP/2 connections to ``target``, used round-robin.

    ``options`` are the channel arguments (``grpc.use_local_subchannel_pool``
    is added, so that channels never share a connection); ``credentials``: TLS
    channel credentials, None for plaintext. ``stub_class`` is the generated
    stub whose methods ``submit`` names.
    """

    def __init__(
        self,
        target: str,
        stub_class: Callable[[Any], Any],
        *,
        options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        channels: int = 1,
    ) -> None:
        if channels < 1:
            raise ValueError("channels must be >= 1")
        self.target = target
        self._stub_class = stub_class
        self._options = [*options, ("grpc.use_local_subchannel_pool", 1)]
        self._credentials = credentials
        self._channel_count = channels
        self._channels: list[grpc.aio.Channel] = []
        self._next_methods: Callable[[], dict[str, tuple[Any, bool]]] = lambda: {}
        self._loop: AioLoop | None = None
        self._inbox: HubInbox | None = None
        self._hub_thread = 0
        self._closed = False
        #: retries made (any RPC), counted on the loop thread
        self.retries = 0

    @property
    def channel_count(self) -> int:
        return self._channel_count

    # -- the hub thread -----------------------------------------------------------

    def start(self) -> None:
        """Make the channels (on the process's loop thread); the calling thread's
        greenlets are the ones whose calls come back through the hub."""
        if self._loop is not None or self._closed:
            raise RuntimeError("the transport was started already")
        self._loop = acquire_loop()
        try:
            self._loop.call_blocking(self._make_channels)
        except BaseException:
            self._closed = True
            release_loop(self._loop)
            raise
        self._inbox = HubInbox()
        self._hub_thread = real_thread_id()
        _live.add(self)

    def _make_channels(self) -> None:
        methods = []
        for _ in range(self._channel_count):
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(self.target, options=self._options)
            else:
                channel = grpc.aio.secure_channel(self.target, self._credentials, options=self._options)
            self._channels.append(channel)
            stub = self._stub_class(channel)
            methods.append(
                {
                    name: (callable_, isinstance(callable_, grpc.aio.UnaryStreamMultiCallable))
                    for name, callable_ in vars(stub).items()
                    if isinstance(callable_, (grpc.aio.UnaryUnaryMultiCallable, grpc.aio.UnaryStreamMultiCallable))
                }
            )
        self._next_methods = itertools.cycle(methods).__next__

    def _new_call(self) -> Call:
        if self._inbox is not None and real_thread_id() == self._hub_thread:
            self._inbox.expect()
            return PendingCall(self._request_cancel, self._inbox)
        return BlockingCall(self._request_cancel)

    def submit(self, method: str, request: Any, metadata: Metadata, deadline: float, retry: int = 0) -> Call:
        """Start RPC ``method`` (a stub attribute) with gRPC deadline ``deadline``
        (``time.monotonic()``), retried up to ``retry`` times on
        :data:`RETRYABLE_CODES` within it; its :class:`.bridge.Call` (a
        :class:`.bridge.PendingCall` for greenlets of the starting thread)."""
        call = self._new_call()
        if self._closed or self._loop is None:  # also a forked child
            call.post(None, TransportClosed("the gRPC transport is closed"))
            return call
        try:
            methods = self._next_methods()
            callable_, streaming = methods[method]
        except KeyError:
            call.post(None, ValueError(f"{self._stub_class.__name__} has no method {method!r}"))
            return call
        self._run(call, (self._rpc, call, callable_, streaming, request, metadata, deadline, retry))
        return call

    def submit_coroutine(self, factory: Callable[[], Awaitable[Any]]) -> Call:
        """Run ``await factory()`` on the loop; its result or exception resolves the call.
        For what the stubs do not cover: the SDK's ``CacheClientAsync`` control calls
        (make such a client inside the coroutine, so that it belongs to the loop)."""
        call = self._new_call()
        if self._closed or self._loop is None:
            call.post(None, TransportClosed("the gRPC transport is closed"))
            return call
        self._run(call, (self._coroutine, call, factory))
        return call

    def _run(self, call: Call, job: tuple[Any, ...]) -> None:
        assert self._loop is not None
        try:
            self._loop.submit(job)
        except TransportClosed as exc:
            self._closed = True
            call.post(None, exc)

    def _request_cancel(self, call: Call) -> None:
        if not self._closed and self._loop is not None:
            try:
                self._loop.submit((None, call))
            except TransportClosed:
                pass

    def wait_ready(self, timeout: float) -> bool:
        """Whether the first channel connects within ``timeout`` seconds."""
        channel = self._channels[0] if self._channels else None
        if channel is None:
            return False

        async def ready() -> bool:
            try:
                await asyncio.wait_for(channel.channel_ready(), timeout)
            except asyncio.TimeoutError:
                return False
            return True

        return bool(self.submit_coroutine(ready).get())

    def close(self, grace: float | None = None) -> None:
        """Close the channels (RPCs still in flight after ``grace`` seconds end
        CANCELLED; the caller's thread waits meanwhile); the last transport of
        the process stops the loop thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _live.discard(self)
        loop = self._loop
        if loop is None:
            return
        channels, self._channels = self._channels, []
        self._next_methods = lambda: {}
        if not loop.closed and _used_in_pid == os.getpid():

            async def close_channels() -> None:
                await asyncio.gather(*(channel.close(grace) for channel in channels), return_exceptions=True)

            try:
                loop.run_blocking(close_channels, (grace or 0.0) + STOP_TIMEOUT_SECONDS)
            except RuntimeError:  # the loop thread is gone
                pass
        if self._inbox is not None:
            self._inbox.close()
        release_loop(loop)

    # -- the loop thread ------------------------------------------------------------

    async def _rpc(
        self,
        call: Call,
        callable_: Any,
        streaming: bool,
        request: Any,
        metadata: Metadata,
        deadline: float,
        retry: int,
    ) -> None:
        while True:
            rpc = None
            try:
                rpc = callable_(request, metadata=metadata, timeout=max(deadline - time.monotonic(), MIN_ATTEMPT_SECONDS))
                response = [message async for message in rpc] if streaming else await rpc
            except asyncio.CancelledError:
                if rpc is not None:
                    rpc.cancel()
                call.post(None, cancelled_error("cancelled by the caller"))
                return
            except grpc.RpcError as exc:
                if retry > 0 and _retryable(exc, deadline):
                    retry -= 1
                    self.retries += 1
                    continue
                call.post(None, exc)
                return
            except BaseException as exc:
                call.post(None, exc)
                return
            call.post(response, None)
            return

    async def _coroutine(self, call: Call, factory: Callable[[], Awaitable[Any]]) -> None:
        try:
            result = await factory()
        except asyncio.CancelledError:
            call.post(None, cancelled_error("cancelled by the caller"))
        except BaseException as exc:
            call.post(None, exc)
        else:
            call.post(result, None)


def _retryable(exc: grpc.RpcError, deadline: float) -> bool:
    code = getattr(exc, "code", None)
    return (
        callable(code)
        and code() in RETRYABLE_CODES
        and deadline - time.monotonic() >= MIN_ATTEMPT_SECONDS
    )


#: Started transports of this process (closed at exit; forgotten after a fork).
_live: weakref.WeakSet[AioTransport] = weakref.WeakSet()


def _close_all_at_exit() -> None:
    for transport in list(_live):
        try:
            transport.close()
        except Exception:  # exiting anyway
            pass


def _forget_in_child() -> None:
    global _loop, _loop_users
    # the loop thread does not exist in a forked child
    for transport in list(_live):
        transport._closed = True
    _live.clear()
    if _loop is not None:
        _loop.closed = True
    _loop, _loop_users = None, 0


atexit.register(_close_all_at_exit)
os.register_at_fork(after_in_child=_forget_in_child)
