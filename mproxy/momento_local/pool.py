"""The threads the local server's calls run on: :class:`CallPool`.

The synchronous ``grpc.server`` runs every call on a thread of its executor.
Few threads are cheapest: only one runs Python at a time (the GIL), and every
extra runnable thread adds context switches to every call (docs/momento-local.md
has the figures). But a call that waits out a fault's delay must not hold one of
those few places, or a slow RPC would stall every other: :meth:`CallPool.wait`
sleeps outside the pool's count, so while it sleeps the pool may start another
thread for the calls that queue up, and whichever thread is surplus once it has
finished its call ends. The sleeping call itself still runs to its end, so a
delayed write applies even when its client has given up meanwhile.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

_Job = tuple["Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class CallPool(Executor):
    """An executor running at most ``size`` jobs at once, not counting jobs asleep in :meth:`wait`.

    Threads start on demand, as daemons (a delay of up to an hour must not
    hold up the interpreter's exit). ``sleep`` is how :meth:`wait` sleeps.
    """

    def __init__(self, size: int, sleep: Callable[[float], object] = time.sleep) -> None:
        if size < 1:
            raise ValueError(f"the pool needs at least one thread, got {size}")
        self._size = size
        self._sleep = sleep
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._workers: set[threading.Thread] = set()
        self._names = itertools.count(1)
        self._queued = 0  # jobs submitted and not yet taken by a worker
        self._idle = 0  # workers waiting for a job
        self._sleeping = 0  # workers asleep in wait()
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Queue ``fn(*args, **kwargs)``; its future."""
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit to a pool that is shut down")
            self._jobs.put((future, fn, args, kwargs))
            self._queued += 1
            self._grow()
        return future

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds`` on a worker of this pool, giving its place to another thread meanwhile."""
        with self._lock:
            self._sleeping += 1
            self._grow()
        try:
            self._sleep(seconds)
        finally:
            with self._lock:
                self._sleeping -= 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more jobs; workers end once the queued jobs are done (``cancel_futures``: cancelled).

        With ``wait``, join every worker, so also a job still running (asleep in
        a delay: up to its delay); without, return at once.
        """
        with self._lock:
            self._closed = True
            workers = list(self._workers)
            if cancel_futures:
                while True:
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if job is not None:
                        self._queued -= 1
                        job[0].cancel()
            for _ in workers:
                self._jobs.put(None)  # one end per worker, after the jobs queued so far
        if wait:
            for worker in workers:
                worker.join()

    def _grow(self) -> None:
        """Start a worker if a queued job has no idle worker and a place is free (lock held)."""
        if self._closed or self._queued <= self._idle or len(self._workers) - self._sleeping >= self._size:
            return
        worker = threading.Thread(target=self._work, name=f"momento-local-{next(self._names)}", daemon=True)
        worker.start()  # raises if no thread can be had, before the count; the worker waits for the lock
        self._workers.add(worker)

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            with self._lock:
                if len(self._workers) - self._sleeping > self._size:
                    self._workers.discard(me)  # surplus since a sleeper woke up
                    return
                self._idle += 1
            job = self._jobs.get()
            with self._lock:
                self._idle -= 1
                if job is None:
                    self._workers.discard(me)
                    return
                self._queued -= 1
            future, fn, args, kwargs = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # the future carries it, as ThreadPoolExecutor's do
                future.set_exception(exc)
            else:
                future.set_result(result)
            del job, future, fn, args, kwargs  # hold no request while idle
