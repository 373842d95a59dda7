"""Counters and latency histograms. No I/O: ``snapshot()`` returns plain data.

Per-command bookkeeping is O(1): plain integer attributes bumped by
``dispatch`` and ``server`` (``st.cmd_get += 1``), and one histogram
observation per backend call (:meth:`CacheStats.observe`).

A backend may keep figures of its own (``Backend.stats()``: a memory cache
counts its items, bytes, evictions and the expired or flushed items it
found, :data:`FIGURES`; the local tiers in front of a Momento cache, :data:`TIER_FIGURES`;
a remote backend its calls, :data:`CALL_FIGURES`); :meth:`CacheStats.attach_backend`
makes them part of its cache's stats. A cache whose backend keeps none does not show them.

Three views of the same numbers:

* :meth:`Stats.snapshot`: the admin port's ``stats`` (memcached names first,
  then mproxy's own, summed over every ``[[cache]]``);
* :meth:`Stats.cache_snapshot`: ``stats cache``, one ``<cache>:<stat>`` per line;
* :func:`prometheus_text`: ``GET /metrics`` (text exposition format 0.0.4).

With several worker processes (``[proxy] workers``) every worker keeps its own
:class:`Stats`; :meth:`Stats.export` turns one into plain data (dicts, lists,
numbers: what ``marshal`` and JSON carry), :func:`sum_exports` adds exports
exactly (counters, figures and histogram buckets alike) and
:meth:`Stats.from_export` makes a :class:`Stats` of the result, so the three
views above read the sum as they read one process.
"""

from __future__ import annotations

import math
import os
import re
import resource
import struct
import time
from typing import Any, Callable, Iterable, Mapping, Protocol

from mproxy import __version__

#: memcached-named counters kept per [[cache]] listener, in ``stats`` order.
COUNTERS = (
    "curr_connections",
    "total_connections",
    "rejected_connections",
    "listen_disabled_num",
    "idle_kicks",
    "cmd_get",
    "cmd_set",
    "cmd_flush",
    "cmd_touch",
    "get_hits",
    "get_misses",
    "delete_misses",
    "delete_hits",
    "incr_misses",
    "incr_hits",
    "decr_misses",
    "decr_hits",
    "cas_misses",
    "cas_hits",
    "cas_badval",
    "touch_hits",
    "touch_misses",
    "bytes_read",
    "bytes_written",
    # ours
    "protocol_errors",
    "backend_errors",
)

#: Counters that go up and down (Prometheus gauges); every other one only grows.
GAUGES = frozenset({"curr_connections"})

#: One line of help per counter: the Prometheus HELP text (docs/operations.md's table says the same).
HELP = {
    "curr_connections": "Client connections open now.",
    "total_connections": "Client connections accepted since start.",
    "rejected_connections": "Client connections refused: [proxy] max_connections were open already, or mproxy was stopping.",
    "listen_disabled_num": "Times accepting paused because the process had no file descriptor left (accept failed with EMFILE or ENFILE).",
    "idle_kicks": "Client connections closed by [proxy] idle_timeout: that long without a completed command.",
    "cmd_get": "Keys requested by get, gets, gat and gats (a multi-get of N keys counts N).",
    "cmd_set": "Storage commands: set, add, replace, append, prepend, cas.",
    "cmd_flush": "flush_all commands.",
    "cmd_touch": "Keys touched by touch, gat and gats.",
    "get_hits": "Requested keys that were found.",
    "get_misses": "Requested keys that were not found.",
    "delete_misses": "delete of a missing key.",
    "delete_hits": "delete that removed an item.",
    "incr_misses": "incr of a missing key.",
    "incr_hits": "Successful incr.",
    "decr_misses": "decr of a missing key.",
    "decr_hits": "Successful decr.",
    "cas_misses": "cas on a missing key.",
    "cas_hits": "Successful cas.",
    "cas_badval": "cas refused because the item changed since gets.",
    "touch_hits": "touch that found its key.",
    "touch_misses": "touch of a missing key.",
    "bytes_read": "Bytes read from clients.",
    "bytes_written": "Bytes sent to clients.",
    "protocol_errors": "Malformed commands answered with ERROR or CLIENT_ERROR.",
    "backend_errors": "Backend calls that failed (SERVER_ERROR to the client); by code in backend_errors_<code>.",
}

#: Counters of the whole process, not of one cache, in ``stats`` order: name -> help.
PROCESS_COUNTERS: dict[str, str] = {
    "ssl_handshake_errors": "TLS handshakes that failed or did not finish in time, on every TLS listener (data and admin).",
    "sdk_warnings": "WARNING records of the momentosdk logger (one per failed SDK request).",
}

#: Figures a backend keeps itself (``Backend.stats()``), memcached's names in ``stats``
#: order: name -> (Prometheus type, help). Only ``counter`` figures are zeroed by ``stats reset``.
FIGURES: dict[str, tuple[str, str]] = {
    "get_expired": ("counter", "Lookups (by any command) that found their item expired and reclaimed it."),
    "get_flushed": ("counter", "Lookups (by any command) that found their item invalidated by flush_all and reclaimed it."),
    "curr_items": ("gauge", "Items held, including expired or flushed ones not reclaimed yet."),
    "bytes": ("gauge", "Bytes the items held take, sized as memcached sizes them."),
    "limit_maxbytes": ("gauge", "Byte budget of the cache."),
    "evictions": ("counter", "Live items removed to make room for new ones."),
}

#: Figures of the local tiers in front of a Momento cache (``docs/tiers.md``), kept by
#: its :class:`~mproxy.backends.tiered.TieredBackend`, shown after :data:`FIGURES`,
#: treated alike.
TIER_FIGURES: dict[str, tuple[str, str]] = {
    "memory_cache_hits": ("counter", "Keys the memory tier answered."),
    "memory_cache_misses": ("counter", "Keys looked up in the memory tier and not found there."),
    "memory_cache_evictions": ("counter", "Live copies the memory tier removed to make room."),
    "memory_cache_fills": ("counter", "Copies the memory tier kept of items read from the backend."),
    "memory_cache_ttl_lookups": ("counter", "Remaining-TTL calls made to keep copies of items read from the backend."),
    "memory_cache_items": ("gauge", "Copies held by the memory tier."),
    "memory_cache_bytes": ("gauge", "Bytes the memory tier takes: keys, values and per-item overhead."),
    "memory_cache_limit_bytes": ("gauge", "Byte budget of the memory tier."),
    "disk_cache_hits": ("counter", "Keys the disk tier answered."),
    "disk_cache_misses": ("counter", "Keys looked up in the disk tier and not found there (or not read in time)."),
    "disk_cache_evictions": ("counter", "Live copies the disk tier removed to make room."),
    "disk_cache_corrupt": ("counter", "Disk tier rows whose checksum did not match: ignored and deleted."),
    "disk_cache_timeouts": ("counter", "Disk tier reads abandoned as too slow (answered as misses)."),
    "disk_cache_dropped_writes": ("counter", "Copies not written to the disk tier because its queue was full."),
    "disk_cache_errors": ("counter", "Disk tier reads or writes that failed."),
    "disk_cache_items": ("gauge", "Copies held by the disk tier."),
    "disk_cache_bytes": ("gauge", "Bytes the disk tier counts: keys, values and per-row overhead."),
    "disk_cache_limit_bytes": ("gauge", "Byte budget of the disk tier."),
}

#: Figures of a cache migrating from legacy memcached servers (``docs/migration.md``),
#: kept by its :class:`~mproxy.backends.migrate.MigratingBackend`, shown after
#: :data:`TIER_FIGURES`, treated alike.
MIGRATION_FIGURES: dict[str, tuple[str, str]] = {
    "migration_reads_momento": ("counter", "Keys read that Momento answered (warmup)."),
    "migration_reads_legacy": ("counter", "Keys read that the legacy servers answered (a warmup miss of Momento, or every read in dual_write and shadow)."),
    "migration_read_misses": ("counter", "Keys read that no side had."),
    "migration_backfills": ("counter", "Legacy items copied into Momento (and still there after the check against writes)."),
    "migration_backfill_races": ("counter", "Backfills not made or undone because a write of the key came first or meanwhile."),
    "migration_backfill_undone": ("counter", "Backfills deleted again after a write elsewhere changed the legacy item during the copy."),
    "migration_backfill_errors": ("counter", "Backfills that failed (Momento errors)."),
    "migration_backfills_dropped": ("counter", "Backfills not made because too many were waiting."),
    "migration_invalidations": ("counter", "Legacy copies deleted by writes through mproxy (warmup)."),
    "migration_shadow_reads": ("counter", "Keys read from Momento to compare with the legacy answer (shadow)."),
    "migration_shadow_mismatches": ("counter", "Compared keys whose Momento item differed from the legacy one (value, flags, or present on one side only, Momento misses apart)."),
    "migration_shadow_momento_misses": ("counter", "Compared keys the legacy servers had and Momento did not."),
    "migration_momento_write_errors": ("counter", "Momento writes of dual_write and shadow that failed (not answered: the legacy answer was)."),
    "migration_legacy_errors": ("counter", "Requests to the legacy servers that failed or timed out."),
}

#: Every named figure a backend may report, in ``stats`` order (the per-RPC ones,
#: :data:`RPC_FIGURE`, follow :data:`CALL_FIGURES`).
BACKEND_FIGURES: dict[str, tuple[str, str]] = {**FIGURES, **TIER_FIGURES, **MIGRATION_FIGURES}

#: The windows of ``stats migration``, in minutes.
MIGRATION_WINDOWS = (1, 5, 15)

#: Figures of a remote backend's calls (``Backend.stats()`` of the Momento backend), shown
#: after :data:`FIGURES`: these, and per RPC ``backend_rpc_<rpc>_calls`` (RPCs sent) and
#: ``backend_rpc_<rpc>_keys`` (keys they carried), counters (:data:`RPC_FIGURE`).
CALL_FIGURES: dict[str, tuple[str, str]] = {
    "backend_rpc_retries": ("counter", "RPCs sent again after a retryable failure (UNAVAILABLE, INTERNAL)."),
    "backend_rpc_in_flight": ("gauge", "RPCs in flight now (each holds one of max_in_flight call slots)."),
    "backend_rpc_writes_in_flight": ("gauge", "Keys with a write RPC in flight, or waiting for an earlier one to end."),
}
#: A per-RPC call figure: group 1 the RPC (snake case), group 2 ``calls`` or ``keys``.
RPC_FIGURE = re.compile(r"backend_rpc_([a-z0-9_]+)_(calls|keys)")


def figure_kind(name: str) -> str | None:
    """``counter`` or ``gauge`` for a backend figure mproxy shows; None for any other name."""
    known = BACKEND_FIGURES.get(name) or CALL_FIGURES.get(name)
    if known is not None:
        return known[0]
    return "counter" if RPC_FIGURE.fullmatch(name) else None


def figure_order(names: Iterable[str]) -> list[str]:
    """The backend figures mproxy shows among ``names``, in the order it shows them."""
    present = set(names)
    rpc = sorted(name for name in present if RPC_FIGURE.fullmatch(name))
    return [n for n in BACKEND_FIGURES if n in present] + [n for n in CALL_FIGURES if n in present] + rpc


#: Figures of the supervisor, shown (after the audit lines) only when several workers
#: serve: name -> (Prometheus type, help).
WORKER_FIGURES: dict[str, tuple[str, str]] = {
    "workers": ("gauge", "Worker processes serving now."),
    "worker_restarts": ("counter", "Worker processes restarted after they died."),
}

#: ``Stats.export()``: plain data, see the module doc.
Export = dict[str, Any]

#: Percentiles reported by ``stats``, as (suffix, quantile).
PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p999", 0.999))

#: Latency buckets per power of two: each bucket is 2**(1/8) = 9.05 % wider than the last.
BUCKETS_PER_OCTAVE = 8
#: Upper bound of the first bucket, in seconds (1 µs: everything faster lands there).
LOWEST_SECONDS = 1e-6
#: Number of finite buckets: the last upper bound, 2**(207/8) µs = 61.5 s, covers 60 s.
FINITE_BUCKETS = 208
#: Every this many fine buckets make one Prometheus ``le`` bound (powers of two µs).
PROMETHEUS_STRIDE = BUCKETS_PER_OCTAVE

_SCALE = BUCKETS_PER_OCTAVE / math.log(2.0)
#: Finite upper bounds in seconds; bucket ``len(UPPER_BOUNDS)`` is the +Inf overflow.
UPPER_BOUNDS: tuple[float, ...] = tuple(
    LOWEST_SECONDS * 2.0 ** (i / BUCKETS_PER_OCTAVE) for i in range(FINITE_BUCKETS)
)


class Histogram:
    """Log-spaced latency histogram, 1 µs .. 61.5 s, ~9 % per bucket; O(1) :meth:`observe`.

    Bucket ``i`` counts observations in ``(UPPER_BOUNDS[i-1], UPPER_BOUNDS[i]]``;
    bucket 0 everything up to 1 µs, the last one everything above 61.5 s.
    """

    __slots__ = ("counts", "count", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (FINITE_BUCKETS + 1)
        self.count = 0
        #: Sum of all observations, in seconds.
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one observation of ``seconds``."""
        self.count += 1
        self.sum += seconds
        if seconds <= LOWEST_SECONDS:
            self.counts[0] += 1
            return
        i = math.ceil(math.log(seconds / LOWEST_SECONDS) * _SCALE - 1e-9)
        self.counts[i if i < FINITE_BUCKETS else FINITE_BUCKETS] += 1

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s observations to this histogram."""
        self.count += other.count
        self.sum += other.sum
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0 < q <= 1) in seconds, 0.0 when empty.

        Interpolated linearly inside the bucket that holds the rank, so the
        error is below one bucket's width (9 %); a rank in the overflow
        bucket answers its lower bound, 61.5 s.
        """
        if self.count == 0:
            return 0.0
        rank = q * self.count
        seen = 0
        for i in range(FINITE_BUCKETS):
            n = self.counts[i]
            if n and seen + n >= rank:
                low = UPPER_BOUNDS[i - 1] if i else 0.0
                return low + (UPPER_BOUNDS[i] - low) * (rank - seen) / n
            seen += n
        return UPPER_BOUNDS[-1]  # the rank lies in the overflow bucket

    def cumulative(self, stride: int) -> list[tuple[float, int]]:
        """``(le, count <= le)`` at every ``stride``-th finite bound, then ``(inf, count)``."""
        out: list[tuple[float, int]] = []
        seen = 0
        for i, n in enumerate(self.counts[:FINITE_BUCKETS]):
            seen += n
            if i % stride == 0:
                out.append((UPPER_BOUNDS[i], seen))
        out.append((math.inf, self.count))
        return out


class CacheStats:
    """The counters of one ``[[cache]]`` listener."""

    __slots__ = COUNTERS + ("name", "latency", "backend_error_codes", "_figures", "_figures_base", "_migration")

    # the counters, set in __init__ from COUNTERS (declared for type checkers)
    curr_connections: int
    total_connections: int
    rejected_connections: int
    listen_disabled_num: int
    idle_kicks: int
    cmd_get: int
    cmd_set: int
    cmd_flush: int
    cmd_touch: int
    get_hits: int
    get_misses: int
    delete_misses: int
    delete_hits: int
    incr_misses: int
    incr_hits: int
    decr_misses: int
    decr_hits: int
    cas_misses: int
    cas_hits: int
    cas_badval: int
    touch_hits: int
    touch_misses: int
    bytes_read: int
    bytes_written: int
    protocol_errors: int
    backend_errors: int

    def __init__(self, name: str) -> None:
        self.name = name
        self._zero()
        #: The backend's own figures (``Backend.stats``), once attached.
        self._figures: Callable[[], Mapping[str, int]] | None = None
        #: Counter figures at the last ``stats reset`` (the backend owns the numbers).
        self._figures_base: dict[str, int] = {}
        #: The migration's read window (``MigratingBackend.migration_window``), once attached.
        self._migration: Callable[[], Mapping[str, Any]] | None = None

    def _zero(self) -> None:
        for counter in COUNTERS:
            setattr(self, counter, 0)
        #: Backend call latencies by operation name (``get_many``, ``set``, ...).
        self.latency: dict[str, Histogram] = {}
        #: Failed backend calls by :class:`~mproxy.backends.base.BackendError` code.
        self.backend_error_codes: dict[str, int] = {}

    def attach_backend(self, figures: Callable[[], Mapping[str, int]]) -> None:
        """Report what ``figures()`` (a backend's ``stats``) returns of :data:`FIGURES` from now on."""
        self._figures = figures
        self._figures_base = {}

    def attach_migration(self, window: Callable[[], Mapping[str, Any]]) -> None:
        """Report what ``window()`` returns (``{"mode": ..., "seconds": bucket width,
        "buckets": [[start, momento, legacy, misses], ...]}``) in ``stats migration`` from now on."""
        self._migration = window

    def migration(self) -> dict[str, Any] | None:
        """The migration's mode and read buckets, or None for a cache without one."""
        if self._migration is None:
            return None
        window = self._migration()
        return {"mode": window["mode"], "seconds": window["seconds"], "buckets": [list(b) for b in window["buckets"]]}

    def figures(self) -> dict[str, int]:
        """The backend's figures in :func:`figure_order`; counters since the last reset."""
        if self._figures is None:
            return {}
        raw = self._figures()
        return {
            name: raw[name] - self._figures_base.get(name, 0) if figure_kind(name) == "counter" else raw[name]
            for name in figure_order(raw)
        }

    def observe(self, op: str, seconds: float, error_code: str | None = None) -> None:
        """One backend call of operation ``op`` took ``seconds``; ``error_code`` if it failed."""
        hist = self.latency.get(op)
        if hist is None:
            hist = self.latency[op] = Histogram()
        hist.observe(seconds)
        if error_code is not None:
            self.backend_errors += 1
            self.backend_error_codes[error_code] = self.backend_error_codes.get(error_code, 0) + 1

    def reset(self) -> None:
        """Zero everything but gauges: ``curr_connections`` and the backend's gauge
        figures such as ``curr_items`` (memcached's ``stats reset``)."""
        curr = self.curr_connections
        self._zero()
        self.curr_connections = curr
        if self._figures is not None:
            raw = self._figures()
            self._figures_base = {n: raw[n] for n in raw if figure_kind(n) == "counter"}

    def export(self) -> Export:
        """This cache's figures as plain data (see :meth:`Stats.export`)."""
        return {
            "counters": {c: getattr(self, c) for c in COUNTERS},
            "figures": self.figures(),
            "latency": {op: (list(h.counts), h.count, h.sum) for op, h in self.latency.items()},
            "errors": dict(self.backend_error_codes),
            "migration": self.migration(),
        }

    @classmethod
    def from_export(cls, name: str, data: Export) -> CacheStats:
        """A CacheStats holding ``data`` (:meth:`export`'s form); its figures are fixed."""
        st = cls(name)
        for c, value in data["counters"].items():
            if c in COUNTERS:
                setattr(st, c, value)
        for op, (counts, count, total) in data["latency"].items():
            hist = st.latency[op] = Histogram()
            hist.counts, hist.count, hist.sum = list(counts), count, total
        st.backend_error_codes = dict(data["errors"])
        figures = dict(data["figures"])
        if figures:
            st.attach_backend(lambda: figures)
        migration = data.get("migration")
        if migration is not None:
            st.attach_migration(lambda: migration)
        return st

    def snapshot(self) -> dict[str, int]:
        """Counters in :data:`COUNTERS` order, the backend's :meth:`figures`, then the
        backend calls (see :func:`backend_stats`)."""
        out = {c: getattr(self, c) for c in COUNTERS}
        out.update(self.figures())
        out.update(backend_stats(self.latency, self.backend_error_codes))
        return out


def backend_stats(latency: dict[str, Histogram], error_codes: dict[str, int]) -> dict[str, int]:
    """``backend_<op>_requests``, ``backend_<op>_<pNN>_us`` per op, then ``backend_errors_<code>``."""
    out: dict[str, int] = {}
    for op, hist in sorted(latency.items()):
        out[f"backend_{op}_requests"] = hist.count
        for suffix, q in PERCENTILES:
            out[f"backend_{op}_{suffix}_us"] = round(hist.quantile(q) * 1e6)
    for code, n in sorted(error_codes.items()):
        out[f"backend_errors_{code}"] = n
    return out


class AuditCounters(Protocol):
    """What :class:`Stats` reads from the audit log (:class:`mproxy.audit.AuditLog`)."""

    @property
    def lines_written(self) -> int: ...

    @property
    def lines_dropped(self) -> int: ...


class Stats:
    """Process-wide stats: one CacheStats per listener, summed for ``stats``."""

    # the PROCESS_COUNTERS, set in __init__ (declared for type checkers)
    #: failed TLS handshakes (counted by :mod:`mproxy.handshake`)
    ssl_handshake_errors: int
    #: ``momentosdk`` WARNING records seen (counted by :mod:`mproxy.logs`)
    sdk_warnings: int

    def __init__(self) -> None:
        self.started = time.time()
        #: The process the stats are of; None = this one (a :meth:`from_export` view sets it).
        self.pid: int | None = None
        #: CPU seconds (user, system) of an exported view; None = this process's own, read now.
        self.cpu: tuple[float, float] | None = None
        #: :data:`WORKER_FIGURES` values when several workers serve (the supervisor sets them).
        self.worker_figures: dict[str, int] = {}
        self.caches: dict[str, CacheStats] = {}
        #: ``[admin] allow_reset``: False refuses the data ports' ``stats reset`` (dispatch asks)
        self.allow_reset = True
        for name in PROCESS_COUNTERS:
            setattr(self, name, 0)
        self._audit: AuditCounters | None = None
        # The audit log owns its counters; ``stats reset`` moves these baselines.
        self._audit_written_base = 0
        self._audit_dropped_base = 0

    def cache(self, name: str) -> CacheStats:
        """The stats of ``[[cache]]`` ``name``, created on first use."""
        st = self.caches.get(name)
        if st is None:
            st = self.caches[name] = CacheStats(name)
        return st

    def attach_audit(self, audit: AuditCounters) -> None:
        """Report ``audit``'s ``lines_written`` / ``lines_dropped`` from now on."""
        self._audit = audit
        self._audit_written_base = self._audit_dropped_base = 0

    @property
    def audit_lines_written(self) -> int:
        """Audit lines written since start (or the last ``stats reset``)."""
        return self._audit.lines_written - self._audit_written_base if self._audit else 0

    @property
    def audit_lines_dropped(self) -> int:
        """Audit lines lost (queue full or write error) since start (or the last reset)."""
        return self._audit.lines_dropped - self._audit_dropped_base if self._audit else 0

    def rusage(self) -> tuple[float, float]:
        """CPU seconds (user, system) of the process (or processes) these stats are of."""
        if self.cpu is not None:
            return self.cpu
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime, usage.ru_stime

    def export(self) -> Export:
        """Everything :meth:`snapshot` and :func:`prometheus_text` read, as plain data:
        ``pid``, ``started``, ``rusage``, each of :data:`PROCESS_COUNTERS`, ``audit``
        (written, dropped) and ``caches`` (name -> :meth:`CacheStats.export`)."""
        return {
            "pid": self.pid if self.pid is not None else os.getpid(),
            "started": self.started,
            "rusage": self.rusage(),
            **{name: getattr(self, name) for name in PROCESS_COUNTERS},
            "audit": (self.audit_lines_written, self.audit_lines_dropped),
            "caches": {name: st.export() for name, st in self.caches.items()},
        }

    @classmethod
    def from_export(cls, data: Export) -> Stats:
        """A Stats showing ``data`` (:meth:`export`'s form, or :func:`sum_exports`'s):
        its ``pid``, ``started`` and CPU are those of the export."""
        stats = cls()
        stats.pid, stats.started = data["pid"], data["started"]
        user, system = data["rusage"]
        stats.cpu = (user, system)
        for name in PROCESS_COUNTERS:
            setattr(stats, name, data[name])
        written, dropped = data["audit"]
        stats.attach_audit(_FixedAudit(written, dropped))
        for name, cache in data["caches"].items():
            stats.caches[name] = CacheStats.from_export(name, cache)
        return stats

    def reset(self) -> None:
        """``stats reset``: zero every counter except gauges and process facts."""
        for st in self.caches.values():
            st.reset()
        for name in PROCESS_COUNTERS:
            setattr(self, name, 0)
        if self._audit is not None:
            self._audit_written_base = self._audit.lines_written
            self._audit_dropped_base = self._audit.lines_dropped

    def snapshot(self) -> dict[str, int | str | float]:
        """``stats``: memcached's names first, then mproxy's, summed over every cache."""
        now = time.time()
        user, system = self.rusage()
        out: dict[str, int | str | float] = {
            "pid": self.pid if self.pid is not None else os.getpid(),
            "uptime": int(now - self.started),
            "time": int(now),
            "version": __version__,
            "pointer_size": struct.calcsize("P") * 8,
            "rusage_user": user,
            "rusage_system": system,
        }
        totals = dict.fromkeys(COUNTERS, 0)
        figures: dict[str, int] = {}
        latency: dict[str, Histogram] = {}
        error_codes: dict[str, int] = {}
        for st in self.caches.values():
            for c in COUNTERS:
                totals[c] += getattr(st, c)
            for name, value in st.figures().items():
                figures[name] = figures.get(name, 0) + value
            for op, hist in st.latency.items():
                latency.setdefault(op, Histogram()).merge(hist)
            for code, n in st.backend_error_codes.items():
                error_codes[code] = error_codes.get(code, 0) + n
        out.update(totals)
        out.update((name, figures[name]) for name in figure_order(figures))
        out.update(backend_stats(latency, error_codes))
        out.update((name, getattr(self, name)) for name in PROCESS_COUNTERS)
        out["audit_lines_written"] = self.audit_lines_written
        out["audit_lines_dropped"] = self.audit_lines_dropped
        out.update((name, self.worker_figures[name]) for name in WORKER_FIGURES if name in self.worker_figures)
        return out

    def cache_snapshot(self) -> dict[str, int]:
        """``stats cache``: every cache's own stats as ``<cache>:<stat>``, caches by name."""
        out: dict[str, int] = {}
        for name, st in sorted(self.caches.items()):
            for k, v in st.snapshot().items():
                out[f"{name}:{k}"] = v
        return out

    def migration_snapshot(self, now: float | None = None) -> dict[str, int | str]:
        """``stats migration``: per migrating cache, its mode and, over the last 1, 5 and 15
        minutes, the keys read that Momento answered, that the legacy servers answered,
        that neither had, and ``momento_share_<n>m``: Momento's share of the hits (what
        tells that Momento is warm enough to go without the legacy servers)."""
        now = time.time() if now is None else now
        out: dict[str, int | str] = {}
        for name, st in sorted(self.caches.items()):
            window = st.migration()
            if window is None:
                continue
            out[f"{name}:mode"] = window["mode"]
            for minutes in MIGRATION_WINDOWS:
                since = now - minutes * 60
                momento = legacy = misses = 0
                for start, m, l, x in window["buckets"]:
                    if start + window["seconds"] > since:  # overlaps: may reach a bucket further back
                        momento, legacy, misses = momento + m, legacy + l, misses + x
                hits = momento + legacy
                out[f"{name}:reads_momento_{minutes}m"] = momento
                out[f"{name}:reads_legacy_{minutes}m"] = legacy
                out[f"{name}:read_misses_{minutes}m"] = misses
                out[f"{name}:momento_share_{minutes}m"] = f"{momento / hits:.4f}" if hits else "0.0000"
        return out

    def workers_snapshot(self) -> dict[str, int | str | float]:
        """``stats workers``: one process is worker 1, ``1:<stat>`` for each of :meth:`snapshot`."""
        return {f"1:{k}": v for k, v in self.snapshot().items()}

    def prometheus(self) -> str:
        """``GET /metrics``: :func:`prometheus_text` of these stats."""
        return prometheus_text(self)


class _FixedAudit:
    """The audit counters of an export (:class:`AuditCounters`)."""

    def __init__(self, written: int, dropped: int) -> None:
        self.lines_written = written
        self.lines_dropped = dropped


def sum_exports(parts: Iterable[Export], pid: int, started: float) -> Export:
    """The exact sum of :meth:`Stats.export` results: counters, figures, error codes,
    CPU seconds and histogram buckets added per cache name; ``pid`` and ``started``
    are the given ones (the supervisor's)."""
    caches: dict[str, Export] = {}
    user = system = 0.0
    written = dropped = 0
    process = dict.fromkeys(PROCESS_COUNTERS, 0)
    for part in parts:
        part_user, part_system = part["rusage"]
        user += part_user
        system += part_system
        _add(process, {name: part[name] for name in PROCESS_COUNTERS})
        part_written, part_dropped = part["audit"]
        written += part_written
        dropped += part_dropped
        for name, cache in part["caches"].items():
            into = caches.setdefault(name, {"counters": {}, "figures": {}, "latency": {}, "errors": {}, "migration": None})
            for key in ("counters", "figures", "errors"):
                _add(into[key], cache[key])
            into["migration"] = _add_migration(into["migration"], cache.get("migration"))
            for op, (counts, count, total) in cache["latency"].items():
                have = into["latency"].get(op)
                if have is None:
                    into["latency"][op] = (list(counts), count, total)
                else:
                    into["latency"][op] = ([a + b for a, b in zip(have[0], counts)], have[1] + count, have[2] + total)
    return {
        "pid": pid,
        "started": started,
        "rusage": (user, system),
        **process,
        "audit": (written, dropped),
        "caches": caches,
    }


def _add_migration(into: Export | None, part: Export | None) -> Export | None:
    """Two migration windows added bucket by bucket (the buckets are of Unix time)."""
    if part is None:
        return into
    if into is None:
        return {"mode": part["mode"], "seconds": part["seconds"], "buckets": [list(b) for b in part["buckets"]]}
    buckets = {b[0]: list(b) for b in into["buckets"]}
    for start, *counts in part["buckets"]:
        have = buckets.setdefault(start, [start, 0, 0, 0])
        for i, n in enumerate(counts, 1):
            have[i] += n
    return {"mode": into["mode"], "seconds": into["seconds"], "buckets": [buckets[s] for s in sorted(buckets)]}


def _add(into: dict[str, int], values: Mapping[str, int]) -> None:
    for key, value in values.items():
        into[key] = into.get(key, 0) + value


def without_gauges(export: Export) -> Export:
    """``export`` with its gauges at 0 (``curr_connections``, the gauge :data:`FIGURES`):
    what a worker that has exited still adds to the sums (its counters, not its
    connections)."""
    caches = {}
    for name, cache in export["caches"].items():
        counters = {c: 0 if c in GAUGES else v for c, v in cache["counters"].items()}
        figures = {f: v for f, v in cache["figures"].items() if figure_kind(f) == "counter"}
        caches[name] = {**cache, "counters": counters, "figures": figures}
    return {**export, "caches": caches}


# -- Prometheus text exposition format 0.0.4 ----------------------------------------------


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


def _family(lines: list[str], name: str, kind: str, help_text: str, samples: Iterable[str]) -> None:
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    lines.extend(samples)


def prometheus_text(stats: Stats) -> str:
    """Every stat in Prometheus text format 0.0.4 (``Content-Type: text/plain; version=0.0.4``).

    Per-cache counters are ``mproxy_<name>_total{cache="..."}``; backend latency
    is the histogram ``mproxy_backend_latency_seconds{cache,op}`` whose ``le``
    bounds are every 8th fine bucket (powers of two microseconds).
    """
    caches = sorted(stats.caches.items())
    lines: list[str] = []
    _family(lines, "mproxy_info", "gauge", "mproxy build information.", [f'mproxy_info{{version="{_label(__version__)}"}} 1'])
    _family(lines, "mproxy_start_time_seconds", "gauge", "Unix time the process started.", [f"mproxy_start_time_seconds {_number(stats.started)}"])
    for counter in COUNTERS:
        if counter in GAUGES:
            name, kind = f"mproxy_{counter}", "gauge"
        else:
            name, kind = f"mproxy_{counter}_total", "counter"
        _family(lines, name, kind, HELP[counter], (f'{name}{{cache="{_label(c)}"}} {getattr(st, counter)}' for c, st in caches))
    figures = [(c, st.figures()) for c, st in caches]
    for figure, (kind, help_text) in (*BACKEND_FIGURES.items(), *CALL_FIGURES.items()):
        name = f"mproxy_{figure}_total" if kind == "counter" else f"mproxy_{figure}"
        samples = (f'{name}{{cache="{_label(c)}"}} {values[figure]}' for c, values in figures if figure in values)
        _family(lines, name, kind, help_text, samples)
    for what, help_text in (("calls", "RPCs sent to the backend, by RPC."), ("keys", "Keys the RPCs carried, by RPC.")):
        name = f"mproxy_backend_rpc_{what}_total"
        samples = (
            f'{name}{{cache="{_label(c)}",rpc="{_label(match.group(1))}"}} {value}'
            for c, values in figures
            for figure, value in values.items()
            if (match := RPC_FIGURE.fullmatch(figure)) is not None and match.group(2) == what
        )
        _family(lines, name, "counter", help_text, samples)
    _family(
        lines,
        "mproxy_backend_errors_by_code_total",
        "counter",
        "Failed backend calls by error code.",
        (
            f'mproxy_backend_errors_by_code_total{{cache="{_label(c)}",code="{_label(code)}"}} {n}'
            for c, st in caches
            for code, n in sorted(st.backend_error_codes.items())
        ),
    )
    hist_lines: list[str] = []
    for c, st in caches:
        for op, hist in sorted(st.latency.items()):
            labels = f'cache="{_label(c)}",op="{_label(op)}"'
            for le, n in hist.cumulative(PROMETHEUS_STRIDE):
                hist_lines.append(f'mproxy_backend_latency_seconds_bucket{{{labels},le="{_number(le)}"}} {n}')
            hist_lines.append(f"mproxy_backend_latency_seconds_sum{{{labels}}} {_number(hist.sum)}")
            hist_lines.append(f"mproxy_backend_latency_seconds_count{{{labels}}} {hist.count}")
    _family(lines, "mproxy_backend_latency_seconds", "histogram", "Latency of backend calls by operation.", hist_lines)
    for name, help_text, value in (
        *((name, help_text, getattr(stats, name)) for name, help_text in PROCESS_COUNTERS.items()),
        ("audit_lines_written", "Audit log lines written.", stats.audit_lines_written),
        ("audit_lines_dropped", "Audit log lines lost: queue full or write error.", stats.audit_lines_dropped),
    ):
        _family(lines, f"mproxy_{name}_total", "counter", help_text, [f"mproxy_{name}_total {value}"])
    for name, (kind, help_text) in WORKER_FIGURES.items():
        if name in stats.worker_figures:
            metric = f"mproxy_{name}_total" if kind == "counter" else f"mproxy_{name}"
            _family(lines, metric, kind, help_text, [f"{metric} {stats.worker_figures[name]}"])
    lines.append("")
    return "\n".join(lines)
