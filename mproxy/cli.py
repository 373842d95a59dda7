"""``mproxy`` command line: owns the process (patching, signals, exit).

Order matters: gevent patches the standard library FIRST, and only then are
backends created (a Momento backend starts gRPC on a thread of its own, in the
serving process: :mod:`mproxy.backends.momento.aio`). A process serving a
Momento backend gets a shorter GIL switch interval. Signal handlers only set
flags / wake the main greenlet. This is the only module that calls ``sys.exit``.

One process (``[proxy] workers = 1``) runs an :class:`~mproxy.app.App`. With
more, this process is the supervisor (:mod:`mproxy.workers`: patched too, but
it never imports grpc) and each worker is ``mproxy --worker N``, started by it
(:mod:`mproxy.worker`), which patches and prepares itself as one process does.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
from typing import Any, NoReturn, Sequence

from mproxy import __version__
from mproxy.config import LOG_FORMATS, LOG_LEVELS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mproxy",
        description="A memcached-compatible proxy for Momento Cache.",
    )
    p.add_argument("-c", "--config", metavar="FILE", help="TOML configuration file (see docs/configuration.md)")
    p.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, print the effective configuration and exit (0 valid, 2 invalid)",
    )
    p.add_argument(
        "--ready-file",
        metavar="FILE",
        help="once every listener is bound, write their addresses to FILE as JSON "
        "(for scripts and tests that let mproxy pick its ports with port = 0)",
    )
    p.add_argument("--version", action="version", version=f"mproxy {__version__}")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="overrides [debug] log_level")
    p.add_argument("--log-format", choices=LOG_FORMATS, help="overrides [debug] log_format")
    # a worker of a supervisor (its spec in $MPROXY_WORKER): not for people
    p.add_argument("--worker", type=int, metavar="N", help=argparse.SUPPRESS)
    return p


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"mproxy: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.worker is not None:
        _worker_main(args.worker)
    if not args.config:
        _fail("no configuration file: run `mproxy -c FILE` (config/local.toml is a working start)")

    from mproxy import config as config_mod

    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as err:
        _fail(str(err))
    if args.check_config:
        for warning in cfg.warnings:
            print(f"mproxy: warning: {warning}", file=sys.stderr)
        sys.stdout.write(config_mod.render(cfg))
        sys.exit(0)

    supervise = cfg.proxy.workers > 1  # the supervisor has no backend: no grpc
    _patch(momento=not supervise and any(cache.backend == "momento" for cache in cfg.caches))
    from mproxy.app import App, StartupError

    app: Any
    if supervise:
        from mproxy.workers import Supervisor

        app = Supervisor(cfg, log_level=args.log_level, log_format=args.log_format)
    else:
        app = App(cfg, log_level=args.log_level, log_format=args.log_format)
    # before start(): a SIGTERM right after READY=1 must still stop gracefully
    _install_signals(app)
    try:
        app.start()
    except StartupError as err:
        app.stop()
        _fail(str(err), code=1)
    if args.ready_file:
        try:
            _write_ready_file(args.ready_file, app.addresses())
        except OSError as err:
            app.stop()
            _fail(f"--ready-file {args.ready_file}: {err}", code=1)
    from mproxy import systemd

    systemd.notify("READY=1")  # every listener is served (and the ready file written)
    _freeze_startup_objects()
    app.wait()
    app.stop()
    sys.exit(0)


def _patch(momento: bool) -> None:
    """gevent's monkey-patching, first; with a Momento backend, the switch interval."""
    # gRPC core's own INFO lines (fork support, GOAWAY) are noise for operators
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from gevent import monkey

    monkey.patch_all()
    if momento:
        # gRPC runs on a thread of its own: hand it the GIL sooner when the hub is busy
        from mproxy.backends.momento import SWITCH_INTERVAL_SECONDS

        sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)


def _freeze_startup_objects() -> None:
    """What start-up made (modules, gRPC, the SDK, config: ~50,000 objects) lives as long
    as the process: out of the cyclic GC's reach (``gc.freeze``), a full collection no
    longer walks it. On the Momento path at 40 connections this took the GC from 4.5 %
    of the process's CPU to 1.2 % (docs/performance.md)."""
    gc.freeze()


def _worker_main(number: int) -> NoReturn:
    """A worker of a supervisor (see :mod:`mproxy.worker`); exits 1 if it cannot serve."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is the supervisor's to handle
    from mproxy import config as config_mod
    from mproxy.worker import ENV, WorkerSpec, effective

    try:
        spec = WorkerSpec.from_env(os.environ.pop(ENV))
        cfg = effective(config_mod.loads(spec.config, spec.source), spec.momento_local)
    except (KeyError, ValueError, TypeError) as err:  # ConfigError is a ValueError
        _fail(f"--worker {number}: no valid worker spec in ${ENV} ({err}): workers are started by mproxy itself")
    _patch(momento=any(cache.backend == "momento" for cache in cfg.caches))
    from mproxy.app import StartupError
    from mproxy.worker import Worker

    app = Worker(cfg, spec)
    _install_signals(app, interrupt=False)
    try:
        app.start()
    except StartupError as err:
        app.stop()
        _fail(f"worker {number}: {err}", code=1)
    app.report_ready()
    _freeze_startup_objects()
    app.wait()
    app.stop()
    sys.exit(0)


def _write_ready_file(path: str, addresses: dict[str, Any]) -> None:
    """``{"pid": ..., "caches": [{"name", "host", "port"}, ...], "admin": {"host", "port"}}``,
    written whole (a temporary file renamed into place): a reader never sees half of it."""
    import json

    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as out:
        json.dump({"pid": os.getpid(), **addresses}, out)
        out.write("\n")
    os.replace(tmp, path)


def _install_signals(app: Any, interrupt: bool = True) -> None:
    """TERM: graceful stop; INT (unless ``interrupt`` is False): the same, a second one exits
    at once; HUP: reload; USR1: reopen the audit log."""
    import gevent

    interrupts = 0

    def on_interrupt() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            abort = getattr(app, "abort", None)
            if abort is not None:
                abort()  # the supervisor kills its workers
            os._exit(1)  # second SIGINT: exit at once
        app.request_stop("SIGINT")

    gevent.signal_handler(signal.SIGTERM, app.request_stop, "SIGTERM")
    if interrupt:
        gevent.signal_handler(signal.SIGINT, on_interrupt)
    gevent.signal_handler(signal.SIGHUP, app.request_reload)
    gevent.signal_handler(signal.SIGUSR1, app.reopen_logs)


if __name__ == "__main__":  # pragma: no cover
    main()
