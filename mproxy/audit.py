"""The audit log: one JSON line per (sampled) command, written by a real OS thread.

The caller's side, :meth:`AuditLog.record`, is O(1) and never blocks: a
sampling counter, then a put on a bounded queue; when the queue is full the
line is dropped and counted. A writer thread (a real thread even in a
gevent-monkey-patched process, so a slow disk never stalls the hub) formats
lines with python-json-logger and appends them to a size-rotated file.
Rotation follows momento-proxy's ``[klog]``: the file becomes
:attr:`~mproxy.config.AuditConfig.backup_path`, which becomes
``<backup_path>.1``, and so on: ``backup_count`` rotated files in all, the
oldest removed; no rotation when ``max_size`` or ``backup_count`` is 0.
Whether commands are logged at all is
:attr:`~mproxy.config.AuditConfig.enabled`. The writer does its own file I/O
rather than use a logging handler, whose locks would be gevent's in a
patched process.

A line (never a value)::

    {"ts": "2026-11-26T05:06:07.123Z", "client": "10.0.0.7:51234", "cache": "default",
     "cmd": "set", "keys": ["user:42"], "flags": 0, "exptime": 300, "bytes": 512,
     "outcome": "stored", "latency_us": 840}

``flags``, ``exptime`` and ``bytes`` appear for storage commands only; ``tier``
(``memory``, ``disk`` or ``backend``: which answered) for caches with local tiers only, and
``legacy`` for a read the legacy servers of a migrating cache answered (docs/migration.md).

Only one thread may call :meth:`AuditLog.record` (the gevent hub's, where
every connection greenlet runs): the queue bound is kept with plain counters.

With several worker processes the supervisor alone owns the file: each
worker's :class:`mproxy.audit_relay.AuditRelay` (an AuditLog whose lines leave
by a socket) sends its lines, and the supervisor :meth:`AuditLog.enqueue` s
them here, so lines are whole, in one file, rotated and reopened in one place.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Sequence, TextIO

from gevent.monkey import get_original
from pythonjsonlogger.json import JsonFormatter

from mproxy.config import AuditConfig
from mproxy.logs import iso_utc

log = logging.getLogger(__name__)

# Originals even when gevent has patched them: the writer is a real thread and
# must never touch the hub. Unpatched, these are the ordinary stdlib objects.
_start_thread = get_original("_thread", "start_new_thread")
_allocate_lock = get_original("_thread", "allocate_lock")
_SimpleQueue = get_original("queue", "SimpleQueue")
_time = get_original("time", "time")

#: Most lines the writer formats between two flushes of the file.
WRITE_BATCH = 256


class NullAudit:
    """The audit log when it is off: ``enabled`` is False and everything is a no-op."""

    enabled = False
    lines_written = 0
    lines_dropped = 0

    def record(self, *args: object, **kwargs: object) -> None:
        """Nothing to record (same arguments as :meth:`AuditLog.record`)."""

    def enqueue(self, lines: Iterable[tuple[Any, ...]]) -> None:
        """Nothing to write (same arguments as :meth:`AuditLog.enqueue`)."""

    def reopen(self) -> None:
        """Nothing to reopen."""

    def reconfigure(self, settings: AuditConfig) -> None:
        """An audit log switched on by a reload needs a restart: say so."""
        if settings.enabled:
            log.warning("audit log %s not opened: turning the audit log on needs a restart", settings.file)

    def close(self, timeout: float = 5.0) -> bool:
        """Nothing to flush."""
        return True


def from_config(settings: AuditConfig) -> AuditLog | NullAudit:
    """An :class:`AuditLog` when ``settings.enabled``, else a :class:`NullAudit`."""
    if not settings.enabled:
        return NullAudit()
    return AuditLog(settings)


def _check_settings(settings: AuditConfig) -> None:
    if not settings.file:
        raise ValueError("audit settings: no file")
    sample, queue_size = settings.sample, settings.queue_size
    max_size, backup_count = settings.max_size, settings.backup_count
    if sample < 1 or queue_size < 1 or max_size < 0 or backup_count < 0:
        raise ValueError(
            f"audit settings out of range: sample={sample} (>= 1) queue_size={queue_size} (>= 1) "
            f"max_size={max_size} (>= 0) backup_count={backup_count} (>= 0)"
        )


# Queue items besides lines (which start with a float): tuples tagged by their first element.
_REOPEN = "reopen"
_SETTINGS = "settings"
_STOP = "stop"
_CONTROLS = frozenset({_REOPEN, _SETTINGS, _STOP})


class AuditLog:
    """The audit log; see the module doc. Start-up opens nothing: the writer opens the file."""

    def __init__(self, settings: AuditConfig) -> None:
        _check_settings(settings)
        self.enabled = True
        self.sample = settings.sample
        self.queue_size = settings.queue_size
        self._tick = 0  # commands since the last sampled one
        self._queued = 0  # lines put, by the recording thread
        self._taken = 0  # lines taken, by the writer
        self._dropped_full = 0  # by the recording thread
        self._dropped_io = 0  # by the writer
        self._written = 0  # by the writer
        self._queue = _SimpleQueue()
        self._formatter = JsonFormatter()
        # The writer's own: the file is opened there, never on the caller's thread.
        self._path = os.path.abspath(settings.file)
        self._backup = os.path.abspath(settings.backup_path)
        self._max_size = settings.max_size
        self._backup_count = settings.backup_count
        self._stream: TextIO | None = None
        self._size = 0  # bytes in the open file
        self._done = _allocate_lock()
        self._done.acquire()
        _start_thread(self._run, ())

    @property
    def lines_written(self) -> int:
        """Lines written to the file since start."""
        return self._written

    @property
    def lines_dropped(self) -> int:
        """Lines lost since start: queue full, or the write failed (disk full, ...)."""
        return self._dropped_full + self._dropped_io

    def record(
        self,
        client: str,
        cache: str,
        command: str,
        keys: Sequence[bytes],
        outcome: str,
        latency_us: int,
        flags: int | None = None,
        exptime: int | None = None,
        nbytes: int | None = None,
        tier: str = "",
    ) -> None:
        """Queue one command's line (1 in ``sample``); drop and count it if the queue is full.

        ``client`` is ``"ip:port"``; ``keys`` raw key bytes; ``flags``,
        ``exptime``, ``nbytes`` are given for storage commands only; ``tier`` (which
        local tier answered, ``""``: no tiers) for caches with local tiers only.
        ``keys`` must not be mutated afterwards (commands hold tuples).
        """
        self._tick += 1
        if self._tick < self.sample:
            return
        self._tick = 0
        line = (_time(), client, cache, command, keys, outcome, latency_us, flags, exptime, nbytes)
        self._put(line + (tier,) if tier else line)

    def _put(self, line: tuple[Any, ...]) -> None:
        """Queue one line (a record's fields, time first); drop and count it if the queue is full."""
        if self._queued - self._taken >= self.queue_size:
            self._dropped_full += 1
            return
        self._queued += 1
        self._queue.put(line)

    def enqueue(self, lines: Iterable[tuple[Any, ...]]) -> None:
        """Queue lines recorded (and sampled) elsewhere: a worker's, relayed to the supervisor."""
        if self.enabled:
            for line in lines:
                self._put(line)

    def reopen(self) -> None:
        """Close and reopen the file (SIGUSR1, after an external logrotate moved it)."""
        self._queue.put((_REOPEN,))

    def reconfigure(self, settings: AuditConfig) -> None:
        """Apply reloaded settings (SIGHUP): sample, queue size, file names, rotation.

        Settings that are not ``enabled`` turn recording off (``enabled``
        False); enabled ones turn it on again. New file names take effect
        from the next line. Raises ValueError (changing nothing) on
        out-of-range values.
        """
        if not settings.enabled:
            self.enabled = False
            self.reopen()  # closes the file; nothing reopens it until recording resumes
            return
        _check_settings(settings)
        self.sample = settings.sample
        self.queue_size = settings.queue_size
        path, backup = os.path.abspath(settings.file), os.path.abspath(settings.backup_path)
        self._queue.put((_SETTINGS, path, backup, settings.max_size, settings.backup_count))
        self.enabled = True

    def close(self, timeout: float = 5.0) -> bool:
        """Stop recording, write what is queued and close the file within ``timeout`` seconds.

        Returns False if the writer did not finish in time (its lines are lost).
        Blocks the calling thread: call it at shutdown, after the servers stopped.
        """
        self.enabled = False
        self._queue.put((_STOP,))
        finished: bool = self._done.acquire(timeout=timeout)
        return finished

    # -- writer thread: everything below runs there -------------------------------------

    def _run(self) -> None:
        try:
            while self._write_batch():
                pass
        finally:
            self._close_stream()
            self._done.release()

    def _write_batch(self) -> bool:
        """Write up to WRITE_BATCH queued items, then flush; False once told to stop."""
        items = [self._queue.get()]
        while len(items) < WRITE_BATCH and not self._queue.empty():
            items.append(self._queue.get())
        self._taken += sum(1 for item in items if item[0] not in _CONTROLS)
        unflushed = 0  # lines in the stream's buffer
        for item in items:
            if item[0] not in _CONTROLS:
                try:
                    line = self._format(item)
                except Exception:  # a caller's bad argument must not end the writer
                    self._dropped_io += 1
                    continue
                try:
                    self._write(line)
                    unflushed += 1
                except OSError:  # disk full, directory gone...: retry the open on the next line
                    self._dropped_io += unflushed + 1
                    unflushed = 0
                    self._close_stream()
                continue
            self._flush(unflushed)
            unflushed = 0
            if item[0] == _STOP:
                return False
            self._control(item)
        self._flush(unflushed)
        return True

    def _format(self, item: tuple[Any, ...]) -> str:
        t, client, cache, command, keys, outcome, latency_us, flags, exptime, nbytes, *rest = item
        line: dict[str, Any] = {
            "ts": iso_utc(t),
            "client": client,
            "cache": cache,
            "cmd": command,
            "keys": [k.decode("utf-8", "backslashreplace") for k in keys],
        }
        if flags is not None:
            line["flags"] = flags
            line["exptime"] = exptime
            line["bytes"] = nbytes
        line["outcome"] = outcome
        if rest and rest[0]:
            line["tier"] = rest[0]
        line["latency_us"] = latency_us
        # ASCII only (json ensure_ascii), so len() is the size in bytes.
        return self._formatter.serialize_log_record(line) + "\n"

    def _write(self, line: str) -> None:
        if self._stream is None:
            self._stream = open(self._path, "a", encoding="ascii")
            self._size = os.fstat(self._stream.fileno()).st_size
        if self._max_size and self._backup_count and self._size and self._size + len(line) > self._max_size:
            self._size = 0
            if os.path.isfile(self._path):  # never rename a FIFO or /dev/null
                self._close_stream()
                try:
                    self._rotate()
                except OSError:
                    pass  # say the backup directory is gone: keep appending, retry after max_size more
                self._stream = open(self._path, "a", encoding="ascii")
        self._stream.write(line)
        self._size += len(line)

    def _rotate(self) -> None:
        """file -> backup -> backup.1 -> ... -> backup.<backup_count - 1>; the oldest is replaced."""
        names = [self._backup] + [f"{self._backup}.{i}" for i in range(1, self._backup_count)]
        for older, newer in zip(reversed(names), reversed(names[:-1])):
            if os.path.exists(newer):
                os.replace(newer, older)
        os.replace(self._path, self._backup)

    def _flush(self, unflushed: int) -> None:
        try:
            if self._stream is not None:
                self._stream.flush()
            self._written += unflushed
        except OSError:
            self._dropped_io += unflushed
            self._close_stream()

    def _control(self, item: tuple[Any, ...]) -> None:
        if item[0] == _SETTINGS:
            _, path, self._backup, self._max_size, self._backup_count = item
            if path != self._path:
                self._close_stream()
                self._path = path
        else:  # _REOPEN
            self._close_stream()

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass  # its unflushed lines are counted as dropped already
