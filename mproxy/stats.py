"""Counters and latency histograms. No I/O: ``snapshot()`` returns plain data.

Per-command bookkeeping is O(1): plain integer attributes bumped by
``dispatch`` and ``server`` (``st.cmd_get += 1``), and one histogram
observation per backend call.
"""

from __future__ import annotations

import os
import time

from mproxy import __version__

#: memcached-named counters kept per [[cache]] listener, in ``stats`` order.
COUNTERS = (
    "curr_connections",
    "total_connections",
    "rejected_connections",
    "cmd_get",
    "cmd_set",
    "cmd_flush",
    "cmd_touch",
    "get_hits",
    "get_misses",
    "get_expired",
    "get_flushed",
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


class CacheStats:
    """The counters of one ``[[cache]]`` listener."""

    __slots__ = COUNTERS + ("name", "backend_requests", "backend_error_codes")

    def __init__(self, name: str) -> None:
        self.name = name
        for counter in COUNTERS:
            setattr(self, counter, 0)
        self.backend_requests: dict[str, int] = {}
        self.backend_error_codes: dict[str, int] = {}

    def observe(self, op: str, seconds: float, error_code: str | None = None) -> None:
        """One backend call of operation ``op`` took ``seconds``."""
        self.backend_requests[op] = self.backend_requests.get(op, 0) + 1
        if error_code is not None:
            self.backend_errors += 1
            self.backend_error_codes[error_code] = self.backend_error_codes.get(error_code, 0) + 1

    def reset(self) -> None:
        curr = self.curr_connections
        self.__init__(self.name)  # type: ignore[misc]
        self.curr_connections = curr

    def snapshot(self) -> dict[str, int]:
        out = {c: getattr(self, c) for c in COUNTERS}
        for op, n in sorted(self.backend_requests.items()):
            out[f"backend_{op}_requests"] = n
        for code, n in sorted(self.backend_error_codes.items()):
            out[f"backend_errors_{code}"] = n
        return out


class Stats:
    """Process-wide stats: one CacheStats per listener, summed for ``stats``."""

    def __init__(self) -> None:
        self.started = time.time()
        self.caches: dict[str, CacheStats] = {}

    def cache(self, name: str) -> CacheStats:
        st = self.caches.get(name)
        if st is None:
            st = self.caches[name] = CacheStats(name)
        return st

    def reset(self) -> None:
        for st in self.caches.values():
            st.reset()

    def snapshot(self) -> dict[str, int | str | float]:
        now = time.time()
        out: dict[str, int | str | float] = {
            "pid": os.getpid(),
            "uptime": int(now - self.started),
            "time": int(now),
            "version": __version__,
        }
        totals: dict[str, int] = {}
        for st in self.caches.values():
            for k, v in st.snapshot().items():
                totals[k] = totals.get(k, 0) + v
        for c in COUNTERS:
            out[c] = totals.pop(c, 0)
        out.update(sorted(totals.items()))
        return out
