"""One worker process of a supervisor (``[proxy] workers`` of 2 or more).

The supervisor (:mod:`mproxy.workers`) starts each worker as a fresh
interpreter, ``python -m mproxy --worker N``, with the listening sockets
inherited and a :class:`WorkerSpec` in the environment variable
:data:`ENV`. ``cli.py`` patches gevent first, as in one process, then drives a
:class:`Worker`: an :class:`~mproxy.app.App` whose

* listeners are the inherited sockets (all workers accept on the same ones),
  and which has no admin port: the supervisor serves it;
* audit log is an :class:`~mproxy.audit_relay.AuditRelay` to the supervisor;
* stats are its own, exported to the supervisor on request over the
  :class:`~mproxy.link.Link`; the data port's ``stats`` and ``stats reset``
  ask the supervisor, so they show and reset the sum over all workers;
* connection cap is its share of ``[proxy] max_connections``;
* embedded Momento server, if any, is the supervisor's (``[momento] local``
  replaced by its address);
* local tiers (``memory_cache_bytes``, ``disk_cache_path``) are its own: a write
  through it returns only after the other workers have dropped their copies
  (:class:`TierPeers`, relayed by the supervisor), and it drops its own when told.

It tells the supervisor ``ready`` once its listeners serve, and stops
gracefully when the link closes (the supervisor is gone).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
from dataclasses import dataclass
from typing import Any, Sequence

import gevent
from gevent.event import AsyncResult
from gevent.server import StreamServer

from mproxy.app import App, Listener, StartupError
from mproxy.audit import AuditLog, NullAudit
from mproxy.audit_relay import AuditRelay
from mproxy.config import CacheConfig, Config
from mproxy.link import Link, LinkError
from mproxy.server import ConnectionLimit
from mproxy.stats import Stats

log = logging.getLogger("mproxy")

#: The environment variable carrying a worker's :class:`WorkerSpec` (JSON).
ENV = "MPROXY_WORKER"
#: Seconds the data port's ``stats`` waits for the supervisor's sum before it shows this worker's own.
SUM_TIMEOUT = 5.0
#: Connections a worker accepts per wake-up of its listening socket (gevent's default is 100).
ACCEPT_AT_ONCE = 1
#: Seconds a write waits for the other workers to confirm they dropped their copies
#: (the supervisor gives each worker 2 s less).
TIER_TIMEOUT = 4.0


class TierPeers:
    """A worker's messages to the other workers' local tiers (``TieredBackend.set_peers``).

    :meth:`send` returns once the supervisor says every other worker applied the
    message, and raises :class:`LinkError` when it cannot say so. The messages of
    concurrent writes travel together: while one request is out, the next ones wait
    and leave as one request when it returns (no timer: nothing is added when idle).
    """

    def __init__(self, link: Link, timeout: float = TIER_TIMEOUT) -> None:
        self._link = link
        self._timeout = timeout
        self._waiting: list[tuple[int, Any]] = []
        self._result: AsyncResult | None = None
        self._sender: gevent.Greenlet | None = None

    def for_cache(self, index: int) -> Any:
        """The ``peers`` function of the ``[[cache]]`` at ``index``."""
        return lambda message: self.send(index, message)

    def send(self, index: int, message: Any) -> None:
        self._waiting.append((index, message))
        if self._result is None:
            self._result = AsyncResult()
        result = self._result
        if self._sender is None:
            self._sender = gevent.spawn(self._run)
        result.get()

    def _run(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                result, self._result = self._result, None
                assert result is not None
                try:
                    self._link.request("tier", batch, timeout=self._timeout)
                except LinkError as err:
                    result.set_exception(err)
                else:
                    result.set(None)
        finally:
            self._sender = None


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker is told by its supervisor."""

    #: 1, 2, ... (stats, logs)
    number: int
    #: the configuration file (reloads read it)
    source: str
    #: the supervisor's running configuration, rendered TOML (a restarted worker runs the
    #: same configuration as its siblings even if the file changed since)
    config: str
    #: inherited listening sockets, one per ``[[cache]]`` in order
    listeners: tuple[int, ...]
    #: this worker's end of the control link
    control: int
    #: this worker's end of the audit channel; None when the audit log is off
    audit: int | None
    #: this worker's share of ``[proxy] max_connections``
    max_connections: int
    #: ``HOST:PORT`` of the supervisor's embedded Momento server, or ""
    momento_local: str = ""
    log_level: str | None = None
    log_format: str | None = None

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls, text: str) -> WorkerSpec:
        fields = json.loads(text)
        fields["listeners"] = tuple(fields["listeners"])
        return cls(**fields)

    def fds(self) -> tuple[int, ...]:
        """The file descriptors the worker inherits."""
        return (*self.listeners, self.control, *(() if self.audit is None else (self.audit,)))


class WorkerStats(Stats):
    """A worker's stats: its own counters; ``snapshot`` and ``reset`` (the data port's
    ``stats``, ``stats reset``) go to the supervisor, for all workers."""

    def __init__(self) -> None:
        super().__init__()
        self.link: Link | None = None

    def snapshot(self) -> dict[str, int | str | float]:
        if self.link is not None:
            try:
                summed: dict[str, int | str | float] = self.link.request("stats", timeout=SUM_TIMEOUT)
                return summed
            except LinkError as err:
                log.warning("stats: the supervisor did not answer (%s): this worker's own", err)
        return super().snapshot()

    def reset(self) -> None:
        if self.link is not None:
            try:
                self.link.request("reset", timeout=SUM_TIMEOUT)
                return
            except LinkError as err:
                log.warning("stats reset: the supervisor did not answer (%s): this worker's own", err)
        self.reset_own()

    def reset_own(self) -> None:
        """``stats reset`` of this worker alone (asked by the supervisor)."""
        super().reset()


class Worker(App):
    """The App of a worker process; see the module doc."""

    def __init__(self, cfg: Config, spec: WorkerSpec) -> None:
        super().__init__(cfg, spec.log_level, spec.log_format)
        self.spec = spec
        self.worker_number = spec.number
        self.stats: WorkerStats = WorkerStats()
        self._limit = ConnectionLimit(spec.max_connections)
        self.link = Link(socket.socket(fileno=spec.control), self._on_message, f"worker {spec.number}")
        self.peers = TierPeers(self.link)
        #: the local tiers' backends by [[cache]] index (what other workers' messages name)
        self.tiered: dict[int, Any] = {}
        #: messages for tiers not made yet (applied when they are)
        self._early: dict[int, list[Any]] = {}

    def _open_audit(self) -> AuditLog | NullAudit:
        if self.spec.audit is None:
            return NullAudit()
        return AuditRelay(self.cfg.audit, self.spec.audit)

    def start(self) -> None:
        self.link.start()
        self.stats.link = self.link
        gevent.spawn(self._watch_supervisor)
        super().start()

    def _listeners(self) -> tuple[Sequence[Listener], Listener | None]:
        return [socket.socket(fileno=fd) for fd in self.spec.listeners], None

    def _descriptors(self) -> dict[str, int]:
        needs = super()._descriptors()
        del needs["admin connections"]  # the supervisor serves the admin port
        return needs

    def _start_caches(self, listeners: Sequence[Listener]) -> None:
        # Accept one connection per wake-up, not up to 100: on a socket the workers share (one
        # systemd passed) every worker wakes when a connection comes, and the first would take
        # a whole burst; one at a time, the less busy worker takes more. gevent documents this
        # class default as the knob for several processes on one socket.
        StreamServer.max_accept = ACCEPT_AT_ONCE
        super()._start_caches(listeners)

    def _backend(self, cache: CacheConfig) -> Any:
        """The cache's backend; with local tiers, wired to the other workers: the messages
        that came before it existed applied, then ``tier-sync`` (see
        :meth:`mproxy.workers.Supervisor._relay_tier`), before its listener serves."""
        backend = super()._backend(cache)
        if callable(getattr(backend, "set_peers", None)):
            index = self.cfg.caches.index(cache)
            backend.set_peers(self.peers.for_cache(index))
            self.tiered[index] = backend
            for message in self._early.pop(index, []):
                backend.apply_remote(tuple(message))
            try:
                self.link.request("tier-sync", timeout=TIER_TIMEOUT)
            except LinkError as err:
                backend.close()
                raise StartupError(f"worker {self.spec.number}: the supervisor did not answer tier-sync: {err}") from err
        return backend

    def _announce(self, message: str) -> None:
        log.debug("%s", message)

    def _warn_exposed(self, where: str, address: tuple[str, int], settings: Any) -> None:
        pass  # the supervisor warned

    def _effective(self, cfg: Config) -> Config:
        return effective(cfg, self.spec.momento_local)

    def report_ready(self) -> None:
        """Tell the supervisor this worker serves (after :meth:`start`)."""
        self.link.notify("ready")

    def _on_message(self, kind: str, payload: Any) -> Any:
        if kind == "export":
            return self.stats.export()
        if kind == "reset":
            self.stats.reset_own()
            return None
        if kind == "tier":  # another worker's write: drop the copies it names
            for index, message in payload:
                backend = self.tiered.get(index)
                if backend is not None:
                    backend.apply_remote(tuple(message))
                elif index < len(self.cfg.caches):
                    self._early.setdefault(index, []).append(message)
            return None
        raise ValueError(f"unknown request {kind!r}")

    def _watch_supervisor(self) -> None:
        self.link.closed.wait()
        if not self._stop.is_set():
            self.request_stop("the supervisor is gone")

    def stop(self) -> None:
        self._stop.set()  # closing the link below is not "the supervisor is gone"
        super().stop()
        self.link.close()


def effective(cfg: Config, momento_local: str) -> Config:
    """``cfg`` with ``[momento] local`` = ``momento_local`` (the supervisor's embedded server) if given."""
    if not momento_local:
        return cfg
    return dataclasses.replace(cfg, momento=dataclasses.replace(cfg.momento, local=momento_local))
