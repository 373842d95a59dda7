"""Process logging: readable text or JSON lines, and a gate on the Momento SDK's warnings.

The SDK logs every failed request at WARNING on logger ``momentosdk``: during
an outage that is one line per client command. :class:`SdkWarningGate`
counts them into ``stats`` (``sdk_warnings``) and lets at most one a minute
through, carrying the number it held back.

Logs go to stderr by default (the systemd journal) or to ``file``, reopened
by itself when logrotate moves it (:class:`logging.handlers.WatchedFileHandler`).
The audit log is separate: :mod:`mproxy.audit`.
"""

from __future__ import annotations

import logging
import logging.handlers
import time
from typing import Callable

from pythonjsonlogger.json import JsonFormatter

from mproxy.stats import Stats

#: Logger of the momento SDK (``momento/logs.py``).
SDK_LOGGER = "momentosdk"

#: Text format: ``2026-11-26 05:06:07,123 INFO mproxy.server: message``.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Text format in a worker process: ``2026-11-26 05:06:07,123 INFO [worker 2] mproxy.server: message``.
WORKER_TEXT_FORMAT = "%(asctime)s %(levelname)s [worker %(worker)d] %(name)s: %(message)s"

#: Seconds between two SDK warnings let through.
SDK_WARNING_INTERVAL = 60.0


class UtcJsonFormatter(JsonFormatter):
    """JSON lines: ``ts`` (ISO 8601 UTC, milliseconds), ``level``, ``logger``, ``message``."""

    def __init__(self, worker: int = 0) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s " + ("%(worker)s " if worker else "") + "%(name)s %(message)s",
            rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"},
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso_utc(record.created)


def iso_utc(t: float) -> str:
    """``t`` (Unix seconds) as ``2026-11-26T05:06:07.123Z``."""
    ms = int(t * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{ms:03d}Z"


class SdkWarningGate(logging.Handler):
    """Handler on ``momentosdk``: counts WARNING records, forwards at most one per ``interval``.

    Records of other levels pass through unchanged. A forwarded warning says
    how many were held back since the previous one. Forwarding goes to the
    root logger's handlers when the root level allows the record.
    """

    def __init__(
        self,
        stats: Stats | None,
        interval: float = SDK_WARNING_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(logging.DEBUG)
        self.stats = stats
        self.interval = interval
        self.clock = clock
        self._next_allowed = float("-inf")
        self._held_back = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.WARNING:
            if self.stats is not None:
                self.stats.sdk_warnings += 1
            now = self.clock()
            if now < self._next_allowed:
                self._held_back += 1
                return
            self._next_allowed = now + self.interval
            if self._held_back:
                record.msg = (
                    f"{record.getMessage()} [{self._held_back} more {SDK_LOGGER} warnings in the "
                    f"last {self.interval:.0f} s were counted in stat sdk_warnings, not logged]"
                )
                record.args = None
                self._held_back = 0
        root = logging.getLogger()
        if record.levelno >= root.getEffectiveLevel():
            root.handle(record)


#: What :func:`setup_logging` installed, so that a second call replaces it.
_installed: list[tuple[logging.Logger, logging.Handler]] = []


class _WorkerField(logging.Filter):
    """Puts the worker's number on every record (``%(worker)d``, JSON ``worker``)."""

    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


def setup_logging(
    level: str, fmt: str = "text", file: str = "", stats: Stats | None = None, worker: int = 0
) -> None:
    """Configure the root logger and gate the SDK's warnings (see the module doc).

    ``level`` is a logging level name (``INFO``, ``debug``...); ``file`` ""
    means stderr; ``worker`` (from 1) marks every line of a worker process.
    Calling it again replaces what the previous call installed.
    """
    for logger, handler in _installed:
        logger.removeHandler(handler)
        handler.close()
    _installed.clear()

    out: logging.Handler = logging.handlers.WatchedFileHandler(file) if file else logging.StreamHandler()
    text = WORKER_TEXT_FORMAT if worker else TEXT_FORMAT
    out.setFormatter(UtcJsonFormatter(worker) if fmt == "json" else logging.Formatter(text))
    if worker:
        out.addFilter(_WorkerField(worker))
    root = logging.getLogger()
    root.addHandler(out)

    sdk = logging.getLogger(SDK_LOGGER)
    gate = SdkWarningGate(stats)
    sdk.addHandler(gate)
    sdk.propagate = False
    _installed.extend(((root, out), (sdk, gate)))
    set_level(level)


def set_level(level: str) -> None:
    """Set the log level (SIGHUP reload); SDK warnings stay counted at any level."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    # The gate must see WARNING records to count them, whatever the level shown.
    logging.getLogger(SDK_LOGGER).setLevel(min(root.level, logging.WARNING))
