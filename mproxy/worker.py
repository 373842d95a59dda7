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
  replaced by its address).

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
from gevent.server import StreamServer

from mproxy.app import App, Listener
from mproxy.audit import AuditLog, NullAudit
from mproxy.audit_relay import AuditRelay
from mproxy.config import Config
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
