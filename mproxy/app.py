"""Wiring of one mproxy process: backends, listeners, admin port, audit log.

``cli.py`` owns the process (patching, signals, exit) and drives an
:class:`App`; everything here runs in an already gevent-patched process.

With ``[proxy] workers`` of 2 or more the same life cycle (start, reload,
reopen, stop) is driven through two subclasses: the supervisor
(:class:`mproxy.workers.Supervisor`: listeners, admin port, audit file, no
backend) and each worker (:class:`mproxy.worker.Worker`: backends serving the
inherited listeners). They replace the steps of :meth:`App.start` marked as
hooks below.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Any, Sequence, Union

import gevent
from gevent.event import Event

from mproxy import __version__, backends, fdlimit, logs, systemd
from mproxy import audit as audit_mod
from mproxy.admin import AdminServer, StatsSource
from mproxy.config import AdminConfig, CacheConfig, Config, ConfigError, listener_tables, load, reload
from mproxy.dispatch import Dispatcher
from mproxy.handshake import ListenerTls
from mproxy.server import CacheServer, ConnectionLimit, address_text
from mproxy.stats import Stats
from mproxy.tls import TlsError

log = logging.getLogger("mproxy")


#: Where a listener is: an address to bind, or a socket bound already (systemd, a supervisor).
Listener = Union[tuple[str, int], socket.socket]


def backend_descriptors(cfg: Config) -> int:
    """File descriptors the Momento caches' gRPC connections may take (see :mod:`mproxy.fdlimit`)."""
    return sum(c.connection_count for c in cfg.caches if c.backend == "momento") * fdlimit.PER_BACKEND_CONNECTION


def exposure(where: str, address: tuple[str, int], settings: AdminConfig | CacheConfig) -> str | None:
    """The warning for a listener bound to ``address`` reachable beyond this host, or None.

    A loopback address draws none. The admin port draws one unless it admits only clients
    with a certificate (``tls`` with ``tls_verify = "require"``): its stats, ``/metrics`` and
    ``stats reset`` need no password. A data port draws one unless it serves TLS: memcached's
    protocol has no authentication, so in plaintext whoever can reach the port owns the cache;
    with TLS on the operator chose remote clients (``tls_verify = "require"`` admits only
    those with a certificate)."""
    host, port = address[:2]
    try:
        if ipaddress.ip_address(host.split("%", 1)[0]).is_loopback:
            return None
    except ValueError:  # not an IP address: a bound socket always has one
        return None
    if where == "admin":
        if settings.tls and settings.tls_verify == "require":
            return None
        return (
            f"admin listens on {host}:{port}, not a loopback address: whoever can reach it reads every "
            "stat and /metrics and can reset the stats (see [admin] allow_reset); bind 127.0.0.1, "
            'firewall the port, or set [admin] tls = true with tls_verify = "require"'
        )
    if settings.tls:
        return None
    return (
        f"{where} listens on {host}:{port}, not a loopback address, in plaintext: whoever can reach it "
        "can read, write and flush the cache (memcached's protocol has no authentication); bind "
        f'127.0.0.1, firewall the port, or set {where}.tls = true (with tls_verify = "require" to '
        "admit only clients with a certificate)"
    )


class StartupError(Exception):
    """mproxy could not start (a port in use, a backend unreachable, ...)."""


def cannot_listen(cfg: Config, what: str, host: str, port: int, err: OSError) -> StartupError:
    """The error of a listener that could not be bound (``what``: ``cache 'x'`` or ``admin``)."""
    return StartupError(f"{cfg.source}: {what}: cannot listen on {host}:{port}: {err}")


class App:
    """One running proxy: start() binds everything, stop() releases it; cli.py drives it."""

    #: A worker's number (its log lines say it); 0 for one process and for the supervisor.
    worker_number = 0

    def __init__(self, cfg: Config, log_level: str | None = None, log_format: str | None = None) -> None:
        self.cfg = cfg
        self._log_level = log_level
        self._log_format = log_format
        self.stats = Stats()
        #: a no-op until start() opens the configured one
        self.audit: audit_mod.AuditLog | audit_mod.NullAudit = audit_mod.NullAudit()
        self.admin: AdminServer | None = None
        self.servers: list[CacheServer] = []
        self.backends: list[Any] = []
        #: the TLS of each listener served here, by its table (``admin``, ``cache[0]``): a reload reconfigures it
        self.tls: dict[str, ListenerTls] = {}
        self._stop = Event()
        self._limit = ConnectionLimit(cfg.proxy.max_connections)

    # -- start ----------------------------------------------------------------

    def start(self) -> None:
        cfg = self.cfg
        self._setup_logging()
        for warning in cfg.warnings:
            log.warning("%s", warning)
        self._check_open_files()
        self.stats.allow_reset = cfg.admin.allow_reset
        self.audit = self._open_audit()
        self.stats.attach_audit(self.audit)
        listeners, admin_listener = self._listeners()
        self._start_caches(listeners)
        self._start_admin(admin_listener)

    # -- the steps of start(), hooks of the supervisor and the workers -------------------

    def _descriptors(self) -> dict[str, int]:
        """The file descriptors this process may hold at once, by what they are for."""
        cfg = self.cfg
        return {
            "client connections": self._limit.maximum,
            "admin connections": cfg.admin.max_connections,
            "backend connections": backend_descriptors(cfg),
            "listeners, files and the like": fdlimit.HEADROOM,
        }

    def _check_open_files(self) -> None:
        """Raise the soft open-file limit; refuse to start when ``[proxy] max_connections``
        and the rest do not fit (see :mod:`mproxy.fdlimit`)."""
        cfg = self.cfg
        needs = self._descriptors()
        needed = sum(needs.values())
        try:
            before, soft, hard = fdlimit.ensure(needed)
        except fdlimit.FdLimitError as err:
            detail = ", ".join(f"{count} {what}" for what, count in needs.items() if count)
            # the cap that would fit: what is left for client connections, in every worker
            fits = max(0, err.soft - (needed - needs["client connections"])) * max(1, cfg.proxy.workers)
            raise StartupError(
                f"{cfg.source}: proxy.max_connections = {cfg.proxy.max_connections} does not fit the "
                f"open-file limit: {needed} file descriptors needed ({detail}), but the limit is "
                f"{err.soft} (hard limit {fdlimit.limit_text(err.hard)}). Raise it (systemd: LimitNOFILE="
                f"{needed} or more in the unit's [Service] section; a shell: ulimit -n {needed}) "
                f"or lower proxy.max_connections to {fits} or less"
            ) from err
        if soft != before:
            log.info("open-file limit raised from %d to %s (the hard limit); %d needed", before, fdlimit.limit_text(soft), needed)

    def _setup_logging(self) -> None:
        cfg = self.cfg
        logs.setup_logging(
            self._log_level or cfg.debug.log_level,
            self._log_format or cfg.debug.log_format,
            cfg.debug.log_file,
            stats=self.stats,
            worker=self.worker_number,
        )

    def _open_audit(self) -> audit_mod.AuditLog | audit_mod.NullAudit:
        """The audit log commands are recorded into (a no-op one when off)."""
        return audit_mod.from_config(self.cfg.audit)

    def _listeners(self) -> tuple[Sequence[Listener], Listener | None]:
        """One listener per ``[[cache]]``, and the admin port's (None: no admin port here).

        Socket activation: a listener systemd bound already is used, the others are addresses.
        """
        cfg = self.cfg
        passed = systemd.listen_fds()
        if passed:
            log.info("socket activation: %d listening sockets from systemd", len(passed))
        listeners = [systemd.take_listener(passed, c.host, c.port) or (c.host, c.port) for c in cfg.caches]
        admin_listener = systemd.take_listener(passed, cfg.admin.host, cfg.admin.port) or (cfg.admin.host, cfg.admin.port)
        if passed:
            where = ", ".join(address_text(sock.getsockname()) for sock in passed)
            raise StartupError(f"{cfg.source}: systemd passed listening sockets that no [[cache]] or [admin] declares: {where}")
        return listeners, admin_listener

    def _start_caches(self, listeners: Sequence[Listener]) -> None:
        """A backend and a CacheServer per ``[[cache]]``, serving ``listeners``."""
        cfg = self.cfg
        for i, (cache, listener) in enumerate(zip(cfg.caches, listeners)):
            name = cache.name  # config.loads fills it from cache_name when empty
            try:
                backend = self._backend(cache)
            except Exception as err:  # the backend says what was wrong
                raise StartupError(f"{cfg.source}: cache {name!r}: backend {cache.backend}: {err}") from err
            self.backends.append(backend)
            cache_stats = self.stats.cache(name)
            cache_stats.attach_backend(backend.stats)
            if callable(getattr(backend, "migration_window", None)):
                cache_stats.attach_migration(backend.migration_window)
            dispatcher = Dispatcher(backend, cache_stats, self.stats, self.audit, name)
            tls = self._listener_tls(f"cache[{i}]", cache)
            server = CacheServer(
                listener,
                dispatcher,
                cache_stats,
                limit=self._limit,
                idle_timeout=cfg.proxy.idle_timeout,
                max_item_size=cfg.proxy.max_item_size,
                tls=tls,
                backlog=cfg.proxy.backlog,
            )
            try:
                server.start()
            except OSError as err:
                raise cannot_listen(cfg, f"cache {name!r}", cache.host, cache.port, err) from err
            self.servers.append(server)
            host, port = server.address
            self._announce(f"cache {name} listening on {host}:{port} (backend {cache.backend}, cache_name {cache.cache_name})")
            self._warn_exposed(f"cache[{i}]", server.address, cache)

    def _backend(self, cache: CacheConfig) -> Any:
        """The backend of one ``[[cache]]``, behind the local tiers it asks for."""
        return backends.create(cache.backend, cache, self.cfg, worker=self.worker_number)

    def _announce(self, message: str) -> None:
        """Say where a listener serves (a worker says it quieter: the supervisor says it once)."""
        log.info("%s", message)

    def _warn_exposed(self, where: str, address: tuple[str, int], settings: AdminConfig | CacheConfig) -> None:
        """Warn, loudly, of a listener reachable beyond this host (see :func:`exposure`; a
        worker leaves it to the supervisor, which says it once)."""
        warning = exposure(where, address, settings)
        if warning is not None:
            log.warning("%s", warning)

    def _admin_stats(self) -> StatsSource:
        """What the admin port shows: this process's stats."""
        return self.stats

    def _start_admin(self, listener: Listener | None) -> None:
        if listener is None:
            return
        cfg = self.cfg
        tls = self._listener_tls("admin", cfg.admin)
        self.admin = AdminServer(
            listener, self._admin_stats(), __version__, settings=cfg.admin, tls=tls, backlog=cfg.proxy.backlog
        )
        try:
            self.admin.start()
        except OSError as err:
            raise cannot_listen(cfg, "admin", cfg.admin.host, cfg.admin.port, err) from err
        host, port = self.admin.address
        log.info("admin listening on %s:%d", host, port)
        self._warn_exposed("admin", self.admin.address, cfg.admin)

    def _listener_tls(self, where: str, settings: AdminConfig | CacheConfig) -> ListenerTls:
        """The TLS of the listener of table ``where`` (its context None while ``tls`` is off)."""
        tls = ListenerTls(self.stats)
        try:
            tls.configure(settings, f"{where}.")
        except TlsError as err:
            raise StartupError(f"{self.cfg.source}: {err}") from err
        self.tls[where] = tls
        return tls

    def addresses(self) -> dict[str, Any]:
        """Where the started listeners are bound (``cli.py --ready-file`` writes it)."""
        caches = []
        for server in self.servers:
            host, port = server.address
            caches.append({"name": server.stats.name, "host": host, "port": port})
        admin = None
        if self.admin is not None:
            host, port = self.admin.address
            admin = {"host": host, "port": port}
        return {"caches": caches, "admin": admin}

    # -- signals (handlers only set flags and wake the main greenlet) -------------

    def request_stop(self, why: str = "") -> None:
        if not self._stop.is_set():
            log.info("stopping (%s): finishing commands in hand", why or "requested")
        self._stop.set()

    def request_reload(self) -> None:
        gevent.spawn(self._reload)

    def reopen_logs(self) -> None:
        self.audit.reopen()  # never blocks: the writer thread reopens

    def _reload(self) -> None:
        """SIGHUP: re-read the file; apply what can change without a restart."""
        try:
            new = self._effective(load(self.cfg.source))
        except ConfigError as err:
            log.error("reload refused, keeping the running configuration: %s", err)
            return
        for warning in new.warnings:
            log.warning("%s", warning)
        # The options declared reload=True apply now; the others wait for a restart and are
        # left out of self.cfg, so the next reload warns again about what is still pending.
        overridden = [key for key, value in (("debug.log_level", self._log_level), ("debug.log_format", self._log_format)) if value]
        running, pending = reload(self.cfg, new, overridden)
        logs.set_level(self._log_level or running.debug.log_level)
        self.audit.reconfigure(running.audit)
        self._reload_tls(running)
        self.stats.allow_reset = running.admin.allow_reset
        if self.admin is not None:
            self.admin.settings = running.admin
        for what in pending:
            log.warning("reload: %s changed; it takes effect only after a restart", what)
        self.cfg = running
        log.info("configuration reloaded from %s", new.source)

    def _reload_tls(self, cfg: Config) -> None:
        """Every listener's TLS made again from ``cfg``, its files read again (a renewed
        certificate): new connections get it."""
        for where, settings in listener_tables(cfg):
            tls = self.tls.get(where)
            if tls is None:
                continue
            try:
                tls.configure(settings, f"{where}.")
            except TlsError as err:  # a file changed since the reload checked it
                log.error("reload: %s: %s keeps its TLS settings", err, where)

    def _effective(self, cfg: Config) -> Config:
        """A configuration as this process runs it (a worker replaces the embedded server
        by the supervisor's); reloads compare the file with the running one through it."""
        return cfg

    # -- run and stop ---------------------------------------------------------------

    def wait(self) -> None:
        self._stop.wait()

    def stop(self) -> None:
        """Graceful stop: stop accepting, finish commands in hand (for at most
        ``[proxy] graceful_timeout`` seconds), close, release."""
        systemd.notify("STOPPING=1")
        timeout = self.cfg.proxy.graceful_timeout
        jobs = [gevent.spawn(server.stop, timeout) for server in self.servers]
        if self.admin is not None:
            jobs.append(gevent.spawn(self.admin.stop, 1.0))
        gevent.joinall(jobs, timeout=timeout + 2.0)
        for backend in self.backends:
            try:
                backend.close()
            except Exception:
                log.exception("closing backend %s", getattr(backend, "kind", backend))
        self.audit.close(timeout=min(timeout, 5.0))
        log.info("stopped")
