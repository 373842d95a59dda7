"""The supervisor: ``[proxy] workers`` of 2 or more, one worker process per core.

The supervisor is the process systemd (or the shell) started. It binds every
listener (data and admin; socket-activated ones are taken as they come), starts
the embedded Momento server once if the configuration asks for it, then starts
the workers (:mod:`mproxy.worker`) and waits until each says it serves: only
then does ``cli.py`` write the ready file and tell systemd ``READY=1``. It
never imports grpc or the Momento SDK and creates no backend.

Workers are fresh interpreters (``python -m mproxy --worker N``: fork and
exec), not forks of this process: this process runs a gevent loop (admin
port, links, audit) whose servers a plain fork would copy into the child
(gevent keeps a forked loop's watchers: the child would serve the admin
port too), and the SDK, grpc and gevent, what a worker spends its start-up
importing, are not loaded here anyway, so a fork would save little (and
``grpc.aio``'s process state does not survive a fork: a worker starts gRPC
itself, :mod:`mproxy.backends.momento.aio`). Each
worker inherits a listening socket per ``[[cache]]`` (its own in a
``SO_REUSEPORT`` group, or a socket systemd passed, shared: see
:mod:`mproxy.listeners`), creates its own backends and gRPC channels, and has
its own loop.

While running, the supervisor

* restarts a worker that exits (whatever its status, logged), after a delay
  that doubles with each quick failure (:data:`BACKOFF_FIRST` ..
  :data:`BACKOFF_MAX`); the others keep serving the listeners meanwhile;
* serves the admin port: ``stats`` and ``/metrics`` show the exact sum over the
  workers (:class:`FleetStats`), ``stats workers`` each one;
* writes the audit log, the one writer of the file, from every worker's relay;
* relays the local tiers' messages (a write's keys to drop) from a worker to all
  the others and answers once each has applied them (:meth:`Supervisor._relay_tier`);
* on SIGHUP reloads its own parts and passes the signal to every worker; on
  SIGUSR1 reopens the audit log; on SIGTERM (or SIGINT) stops the workers
  gracefully (each finishes the commands in hand within ``graceful_timeout``)
  and exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import gevent
from gevent import subprocess
from gevent.event import AsyncResult, Event

import mproxy
from mproxy import audit_relay, systemd
from mproxy.admin import StatsSource
from mproxy.app import App, Listener, StartupError, cannot_listen
from mproxy.audit import AuditLog
from mproxy.config import LOCAL_EMBEDDED, Config, render
from mproxy.link import Link, LinkError
from mproxy.listeners import PortGroup, SharedListener
from mproxy.stats import Export, Stats, sum_exports, without_gauges
from mproxy.worker import ENV, WorkerSpec

log = logging.getLogger("mproxy")

#: Seconds the workers may take, together, to start and say they serve.
START_TIMEOUT = 60.0
#: Delay before restarting a worker that failed quickly; it doubles with each such failure.
BACKOFF_FIRST = 0.5
#: Longest delay before a restart.
BACKOFF_MAX = 30.0
#: A worker that served this long before it exited is restarted after BACKOFF_FIRST again.
STABLE_SECONDS = 30.0
#: Seconds a worker gets, beyond ``graceful_timeout``, to close its backends and send its
#: audit lines before it is killed.
STOP_MARGIN = 10.0
#: Seconds the summed stats wait for each worker's export.
EXPORT_TIMEOUT = 2.0
#: Seconds a tier message waits for each other worker to apply it.
TIER_TIMEOUT = 2.0


def backoff(failures: int) -> float:
    """Seconds before restarting a worker after ``failures`` quick failures in a row (>= 1)."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** (max(failures, 1) - 1))


def shares(total: int, workers: int) -> list[int]:
    """``[proxy] max_connections`` split among ``workers``: as even as can be, at least 1 each."""
    return [max(1, total // workers + (1 if i < total % workers else 0)) for i in range(workers)]


def exit_text(status: int) -> str:
    """A ``Popen.returncode`` in words."""
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


@dataclass
class Slot:
    """Worker number ``number``: the process now in it, and its history."""

    number: int
    process: Any = None  # gevent.subprocess.Popen
    link: Link | None = None
    ready: Event = field(default_factory=Event)
    ready_at: float = 0.0
    #: its latest stats export (what it adds to the sums when it cannot answer)
    export: Export | None = None
    #: the configuration its worker was started with (rendered)
    config: str = ""
    #: quick failures in a row (the backoff)
    failures: int = 0
    restarts: int = 0
    #: waits for the process to exit
    watcher: gevent.Greenlet | None = None
    #: reads its audit lines into the audit log
    relay: gevent.Greenlet | None = None
    #: a restart waiting for its backoff delay
    pending: gevent.Greenlet | None = None
    #: its local tiers exist (it said ``tier-sync``): tier messages to it are waited for
    tiers_synced: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None and self.process.poll() is None else 0


class Supervisor(App):
    """The App of the supervisor process; see the module doc."""

    def __init__(self, cfg: Config, log_level: str | None = None, log_format: str | None = None) -> None:
        super().__init__(cfg, log_level, log_format)
        self.slots = [Slot(n) for n in range(1, cfg.proxy.workers + 1)]
        #: one per [[cache]], in order
        self.listeners: list[SharedListener | PortGroup] = []
        self.fleet = FleetStats(self)
        self._shares = shares(cfg.proxy.max_connections, cfg.proxy.workers)
        self._momento_local = ""
        self._embedded: Any = None
        self._starting = True
        self._stopping = False
        self._startup_failure: AsyncResult = AsyncResult()

    # -- start ----------------------------------------------------------------------

    def _descriptors(self) -> dict[str, int]:
        """A worker's needs (it inherits the limit raised here) with the supervisor's own added:
        the admin port and three descriptors per worker (its link, audit channel, process)."""
        needs = super()._descriptors()
        needs["client connections"] = max(self._shares)
        needs["admin connections"] += 3 * len(self.slots)
        return needs

    def _start_caches(self, listeners: Sequence[Listener]) -> None:
        cfg = self.cfg
        for cache, listener in zip(cfg.caches, listeners):
            if isinstance(listener, socket.socket):  # systemd's: the workers share it
                self.listeners.append(SharedListener(listener))
                continue
            try:
                self.listeners.append(PortGroup(listener, cfg.proxy.backlog))
            except OSError as err:
                raise cannot_listen(cfg, f"cache {cache.name!r}", cache.host, cache.port, err) from err
        if cfg.momento.local == LOCAL_EMBEDDED and any(c.backend == "momento" for c in cfg.caches):
            self._start_embedded()
        for slot in self.slots:
            self._spawn(slot)
        self._wait_ready()
        self._starting = False
        for i, (cache, group) in enumerate(zip(cfg.caches, self.listeners)):
            host, port = group.address
            self._announce(
                f"cache {cache.name} listening on {host}:{port} (backend {cache.backend}, "
                f"cache_name {cache.cache_name}, {len(self.slots)} workers)"
            )
            self._warn_exposed(f"cache[{i}]", group.address, cache)

    def _start_embedded(self) -> None:
        """The bundled Momento server, one for all workers (they get its address)."""
        from mproxy.backends.momento import embedded  # stdlib only: no SDK, no grpc

        try:
            self._embedded = embedded.acquire()
        except embedded.EmbeddedServerError as err:
            raise StartupError(f"{self.cfg.source}: [momento] local = \"embedded\": {err}") from err
        self._momento_local = f"{self._embedded.host}:{self._embedded.port}"
        log.info("embedded Momento server on %s, shared by the workers", self._momento_local)

    def _admin_stats(self) -> StatsSource:
        return self.fleet

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            waiting = [slot for slot in self.slots if not slot.ready.is_set()]
            if self._startup_failure.ready():
                raise StartupError(self._startup_failure.get())
            if not waiting:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                numbers = ", ".join(str(slot.number) for slot in waiting)
                raise StartupError(f"workers {numbers} did not start serving within {START_TIMEOUT:g} s")
            gevent.wait([self._startup_failure, *(slot.ready for slot in waiting)], timeout=remaining, count=1)

    def addresses(self) -> dict[str, Any]:
        caches = []
        for cache, group in zip(self.cfg.caches, self.listeners):
            host, port = group.address
            caches.append({"name": cache.name, "host": host, "port": port})
        admin = None
        if self.admin is not None:
            host, port = self.admin.address
            admin = {"host": host, "port": port}
        return {"caches": caches, "admin": admin}

    # -- one worker ---------------------------------------------------------------------

    def _spawn(self, slot: Slot) -> None:
        """Start the worker of ``slot`` (a fresh interpreter inheriting the listeners)."""
        try:
            listening = [group.for_worker() for group in self.listeners]
        except OSError as err:
            raise StartupError(f"worker {slot.number}: cannot listen: {err}") from err
        control, control_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        channel = None
        if isinstance(self.audit, AuditLog):  # opened at start (a reload may have paused it)
            channel, audit_theirs = audit_relay.channel()
            size = audit_theirs.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        spec = WorkerSpec(
            number=slot.number,
            source=self.cfg.source,
            config=render(self.cfg),
            listeners=tuple(sock.fileno() for sock in listening),
            control=control_theirs.fileno(),
            audit=audit_theirs.fileno() if channel is not None else None,
            max_connections=self._shares[slot.number - 1],
            momento_local=self._momento_local,
            log_level=self._log_level,
            log_format=self._log_format,
        )
        try:
            slot.process = subprocess.Popen(
                [sys.executable, "-m", "mproxy", "--worker", str(slot.number)],
                stdin=subprocess.DEVNULL,
                env=worker_environment(spec),
                pass_fds=spec.fds(),
            )
        except OSError as err:
            control.close()
            if channel is not None:
                channel.close()
            raise StartupError(f"cannot start worker {slot.number} ({sys.executable} -m mproxy): {err}") from err
        finally:  # the worker has its ends now (or there is no worker)
            for sock in (*listening, control_theirs, *((audit_theirs,) if channel is not None else ())):
                sock.close()
        slot.ready.clear()
        slot.tiers_synced = False
        slot.export = None
        slot.config = spec.config
        slot.link = Link(control, lambda kind, payload: self._on_message(slot, kind, payload), f"worker {slot.number}")
        slot.link.start()
        slot.watcher = gevent.spawn(self._watch, slot, slot.process, slot.link)
        slot.relay = gevent.spawn(self._relay, channel, size) if channel is not None else None
        log.debug("worker %d started (pid %d)", slot.number, slot.process.pid)

    def _relay(self, channel: socket.socket, size: int) -> None:
        try:
            audit_relay.relay_into(self.audit, channel, size)
        finally:
            channel.close()

    def _on_message(self, slot: Slot, kind: str, payload: Any) -> Any:
        if kind == "ready":
            slot.ready_at = time.monotonic()
            slot.ready.set()
            if slot.config != render(self.cfg):  # a reload came while it started: its turn now
                self._signal(slot, signal.SIGHUP)
            if not self._starting:
                log.info("worker %d serving again (pid %d)", slot.number, slot.pid)
            return None
        if kind == "stats":
            return self.fleet.snapshot()
        if kind == "reset":
            self.fleet.reset()
            return None
        if kind == "tier":
            self._relay_tier(slot, payload)
            return None
        if kind == "tier-sync":
            slot.tiers_synced = True
            return None
        raise ValueError(f"unknown request {kind!r}")

    def _relay_tier(self, origin: Slot, payload: Any) -> None:
        """A worker's local-tier messages (keys its write changed, a flush, a resize) to
        every other worker; returns once each whose tiers exist has applied them.

        A worker still starting gets them as notices, not waited for: it keeps them
        until its tiers exist, then says ``tier-sync``, whose answer comes after every
        notice sent before it (one stream), and from then on is waited for. So a write
        is not held up by a worker that is (re)starting, and that worker still drops
        the copies before it serves. A worker whose link closes meanwhile is gone, its
        tiers with it; one that does not answer in time fails the relay (the writing
        worker answers its client SERVER_ERROR)."""
        others = [s for s in self.slots if s is not origin and s.link is not None and not s.link.closed.is_set()]

        def tell(slot: Slot) -> str:
            link = slot.link
            assert link is not None
            try:
                if not slot.tiers_synced:
                    link.notify("tier", payload)
                else:
                    link.request("tier", payload, timeout=TIER_TIMEOUT)
            except LinkError as err:
                if not link.closed.is_set():
                    return str(err)
            return ""

        jobs = [gevent.spawn(tell, slot) for slot in others]
        gevent.joinall(jobs)
        failed = [job.value for job in jobs if job.value]
        if failed:
            raise RuntimeError(f"a worker did not confirm dropping its copies: {failed[0]}")

    def _watch(self, slot: Slot, process: Any, link: Link) -> None:
        """Wait for the worker to exit; restart it unless mproxy is stopping."""
        status = process.wait()
        link.close()
        if slot.export is not None:
            self.fleet.retire(slot.export)
            slot.export = None
        served = time.monotonic() - slot.ready_at if slot.ready.is_set() else 0.0
        slot.ready.clear()
        if self._stopping:
            log.debug("worker %d (pid %d) %s", slot.number, process.pid, exit_text(status))
            return
        if self._starting:
            self._startup_failure.set(f"worker {slot.number} (pid {process.pid}) {exit_text(status)} before it served")
            return
        slot.failures = 1 if served >= STABLE_SECONDS else slot.failures + 1
        delay = backoff(slot.failures)
        log.warning(
            "worker %d (pid %d) %s after %.1f s serving; restarting it in %g s",
            slot.number, process.pid, exit_text(status), served, delay,
        )  # fmt: skip
        slot.pending = gevent.spawn_later(delay, self._restart, slot)

    def _restart(self, slot: Slot) -> None:
        slot.pending = None
        if self._stopping:
            return
        slot.restarts += 1
        try:
            self._spawn(slot)
        except StartupError as err:
            log.error("%s", err)
            slot.failures += 1
            slot.pending = gevent.spawn_later(backoff(slot.failures), self._restart, slot)

    def live(self) -> list[Slot]:
        """The slots whose worker serves now."""
        return [slot for slot in self.slots if slot.ready.is_set() and slot.link is not None]

    # -- signals --------------------------------------------------------------------------

    def request_reload(self) -> None:
        """SIGHUP: reload this process's parts, and pass the signal to every worker that
        serves (one still starting has no handler yet: SIGHUP would end it; it gets its
        SIGHUP when it says it serves)."""
        super().request_reload()
        for slot in self.live():
            self._signal(slot, signal.SIGHUP)

    def _signal_workers(self, sig: int) -> None:
        for slot in self.slots:
            self._signal(slot, sig)

    @staticmethod
    def _signal(slot: Slot, sig: int) -> None:
        if slot.pid:
            try:
                os.kill(slot.pid, sig)
            except OSError:
                pass  # it just exited: _watch handles it

    def abort(self) -> None:
        """A second SIGINT: kill the workers at once (the caller exits)."""
        self._stopping = True
        self._signal_workers(signal.SIGKILL)

    # -- stop -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the workers gracefully (SIGTERM: each finishes the commands in hand within
        ``graceful_timeout``), kill those still running after :data:`STOP_MARGIN` more
        seconds, write out the audit lines and release the listeners."""
        systemd.notify("STOPPING=1")
        self._stopping = True
        admin = gevent.spawn(self.admin.stop, 1.0) if self.admin is not None else None
        gevent.killall([slot.pending for slot in self.slots if slot.pending is not None])
        self._signal_workers(signal.SIGTERM)
        for group in self.listeners:  # the workers close theirs at once: new connections are refused
            group.close()
        self.listeners = []
        watchers = [slot.watcher for slot in self.slots if slot.watcher is not None]
        done = gevent.joinall(watchers, timeout=self.cfg.proxy.graceful_timeout + STOP_MARGIN)
        if len(done) < len(watchers):
            log.warning("stopping: %d workers still running; killing them", len(watchers) - len(done))
            self._signal_workers(signal.SIGKILL)
            gevent.joinall(watchers, timeout=STOP_MARGIN)
        relays = [slot.relay for slot in self.slots if slot.relay is not None]
        gevent.joinall(relays, timeout=STOP_MARGIN)  # each ends once it read all its worker sent
        gevent.killall(relays + watchers, block=False)
        if admin is not None:
            admin.join(timeout=2.0)
        self.audit.close(timeout=min(self.cfg.proxy.graceful_timeout, 5.0))
        if self._embedded is not None:
            from mproxy.backends.momento import embedded

            embedded.release()
        log.info("stopped")


class FleetStats:
    """What the supervisor's admin port shows (a :class:`~mproxy.admin.StatsSource`):
    the exact sum of every worker's stats, with the supervisor's own (audit file,
    process facts: ``pid``, ``uptime``), and each worker on its own.

    A worker that exits takes its connections with it, not its counts: its last
    export (taken at every ``stats``, ``/metrics`` or data-port ``stats``) stays
    in the sums without its gauges, so the counters do not go back when a worker
    is restarted (counts since that export are lost).
    """

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor
        self._retired: list[Export] = []

    def _collect(self) -> list[Slot]:
        """Ask every serving worker for its export (at once, bounded); the slots asked."""
        live = self._supervisor.live()

        def ask(slot: Slot) -> None:
            assert slot.link is not None
            try:
                slot.export = slot.link.request("export", timeout=EXPORT_TIMEOUT)
            except LinkError as err:
                log.warning("stats: worker %d did not answer (%s): its previous figures are shown", slot.number, err)

        gevent.joinall([gevent.spawn(ask, slot) for slot in live])
        return live

    def total(self) -> Stats:
        """The sum, as a Stats (the supervisor's pid and start)."""
        live = self._collect()
        own = self._supervisor.stats
        parts = [own.export(), *self._retired, *(slot.export for slot in live if slot.export is not None)]
        stats = Stats.from_export(sum_exports(parts, pid=os.getpid(), started=own.started))
        stats.worker_figures = {
            "workers": len(live),
            "worker_restarts": sum(slot.restarts for slot in self._supervisor.slots),
        }
        return stats

    def retire(self, export: Export) -> None:
        """A worker exited after its last export: keep its counts, not its gauges."""
        self._retired = [sum_exports([*self._retired, without_gauges(export)], pid=0, started=0.0)]

    def snapshot(self) -> dict[str, int | str | float]:
        return self.total().snapshot()

    def cache_snapshot(self) -> dict[str, int]:
        return self.total().cache_snapshot()

    def prometheus(self) -> str:
        return self.total().prometheus()

    def migration_snapshot(self) -> dict[str, int | str]:
        return self.total().migration_snapshot()

    def workers_snapshot(self) -> dict[str, int | str | float]:
        """``<worker>:<stat>`` for every worker (``<worker>:pid 0`` while one restarts)."""
        self._collect()
        out: dict[str, int | str | float] = {}
        for slot in self._supervisor.slots:
            if slot.ready.is_set() and slot.export is not None:
                snap: dict[str, int | str | float] = Stats.from_export(slot.export).snapshot()
            else:
                snap = {"pid": 0}
            snap["restarts"] = slot.restarts
            out.update((f"{slot.number}:{name}", value) for name, value in snap.items())
        return out

    def reset(self) -> None:
        """``stats reset`` of every worker and the supervisor's own counters."""

        def reset(slot: Slot) -> None:
            assert slot.link is not None
            try:
                slot.link.request("reset", timeout=EXPORT_TIMEOUT)
            except LinkError as err:
                log.warning("stats reset: worker %d did not answer (%s)", slot.number, err)

        gevent.joinall([gevent.spawn(reset, slot) for slot in self._supervisor.live()])
        self._supervisor.stats.reset()
        self._retired = []
        for slot in self._supervisor.slots:
            slot.export = None


def worker_environment(spec: WorkerSpec) -> dict[str, str]:
    """The environment of a worker: this one, with its spec, without systemd's notify
    socket (only the supervisor talks to systemd), and with this mproxy first on the path."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env[ENV] = spec.to_env()
    root = os.path.dirname(os.path.dirname(os.path.abspath(mproxy.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env
