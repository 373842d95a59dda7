"""memcached's admin commands on the data port, answered as memcached 1.6.18 answers them.

``stats <what>``, ``cache_memlimit``, ``slabs``, ``lru``, ``lru_crawler``,
``watch``: the parser has checked their arguments (:mod:`mproxy.protocol.admin`);
here they take effect and answer. mproxy has no slab allocator, LRU
maintainer, crawler thread, item-size histogram or log stream, so most of them
change nothing but what ``stats settings`` reports; each answer is the one
memcached gives for the same request (run as mproxy's reference,
``-o no_lru_maintainer``), and where memcached would list figures mproxy does
not have it lists none (``docs/compatibility.md``, "Admin commands").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

from mproxy.protocol import commands as c
from mproxy.protocol import replies as r
from mproxy.protocol.admin import parse_double, valid_classes
from mproxy.protocol.numbers import parse_i32, parse_u32

if TYPE_CHECKING:
    from mproxy.dispatch.core import Dispatcher

#: memcached ``MAX_VERBOSITY_LEVEL``
MAX_VERBOSITY_LEVEL = 2
#: memcached ``SLAB_GLOBAL_PAGE_POOL``: class 0, the pool of free pages
_GLOBAL_PAGE_POOL = 0


class AdminCommands:
    """State and answers of the admin commands of one :class:`~mproxy.dispatch.Dispatcher`.

    ``settings`` are figures of the proxy's configuration shown by ``stats
    settings`` (memcached's names: ``maxconns``, ``tcpport``, ``item_size_max``,
    ``idle_timeout``, ...), given by whoever wires the dispatcher."""

    def __init__(self, dispatcher: Dispatcher, settings: Mapping[str, object] | None = None) -> None:
        self._dispatcher = dispatcher
        self.settings = dict(settings or {})
        self.verbosity = 0
        self.detail_enabled = False
        self.lru_crawler = True
        self.lru_crawler_sleep = 100
        self.lru_crawler_tocrawl = 0
        self.slab_automove = 1
        self.slab_automove_ratio = 0.8
        self.hot_lru_pct, self.warm_lru_pct = 20, 40
        self.hot_max_factor, self.warm_max_factor = 0.2, 2.0

    def handlers(self) -> dict[type, Callable[[Any], tuple[bytes, str]]]:
        return {
            c.CacheMemlimit: self.cache_memlimit,
            c.Admin: self.admin,
            c.Verbosity: self.verbosity_command,
        }

    # -- commands --------------------------------------------------------------

    def verbosity_command(self, cmd: c.Verbosity) -> tuple[bytes, str]:
        self.verbosity = min(cmd.level, MAX_VERBOSITY_LEVEL)
        return r.OK, "ok"

    def cache_memlimit(self, cmd: c.CacheMemlimit) -> tuple[bytes, str]:
        """The backend's byte budget (a memory cache evicts down to it); a backend
        without one answers as memcached does when it cannot adjust."""
        resized = self._dispatcher._call("resize", self._dispatcher.backend.resize, cmd.megabytes * 1024 * 1024)
        if resized:
            return r.OK, "ok"
        return b"MEMLIMIT_ADJUST_FAILED out of bounds or unable to adjust\r\n", "refused"

    def admin(self, cmd: c.Admin) -> tuple[bytes, str]:
        return getattr(self, "_" + cmd.name)(cmd.args)  # type: ignore[no-any-return]

    def _watch(self, args: tuple[bytes, ...]) -> tuple[bytes, str]:
        """``OK``, then nothing: the connection is a watcher (the parser reads no more
        from it), and mproxy has no log stream to send."""
        return r.OK, "ok"

    def _slabs(self, args: tuple[bytes, ...]) -> tuple[bytes, str]:
        if args[0] == b"reassign":
            src, dst = parse_i32(args[1]), parse_i32(args[2])
            largest = len(c.SLAB_CHUNK_SIZES)
            if src == dst:
                return b"SAME src and dst class are identical\r\n", "refused"
            if src == -1 or not (_GLOBAL_PAGE_POOL <= src <= largest and _GLOBAL_PAGE_POOL <= dst <= largest):  # type: ignore[operator]
                # -1 ("any class"): memcached finds none to take from
                return b"BADCLASS invalid src or dst class id\r\n", "refused"
            return b"NOSPARE source class has no spare pages\r\n", "refused"
        if args[1] == b"ratio":
            self.slab_automove_ratio = parse_double(args[2]) or 0.0
        else:
            self.slab_automove = int(args[1])
        return r.OK, "ok"

    def _lru(self, args: tuple[bytes, ...]) -> tuple[bytes, str]:
        self.hot_lru_pct, self.warm_lru_pct = parse_u32(args[1]) or 0, parse_u32(args[2]) or 0
        self.hot_max_factor, self.warm_max_factor = parse_double(args[3]) or 0.0, parse_double(args[4]) or 0.0
        return r.OK, "ok"

    def _lru_crawler(self, args: tuple[bytes, ...]) -> tuple[bytes, str]:
        what = args[0]
        if what == b"enable":
            if self.lru_crawler:
                return b"ERROR failed to start lru crawler thread\r\n", "refused"
            self.lru_crawler = True
            return r.OK, "ok"
        if what == b"disable":
            self.lru_crawler = False
            return r.OK, "ok"
        if what == b"sleep":
            self.lru_crawler_sleep = int(args[1])
            return r.OK, "ok"
        if what == b"tocrawl":
            self.lru_crawler_tocrawl = int(args[1])
            return r.OK, "ok"
        # crawl / metadump
        if not self.lru_crawler:
            return b"CLIENT_ERROR lru crawler disabled\r\n", "refused"
        if not valid_classes(args[1]):
            return b"BADCLASS invalid class id\r\n", "refused"
        if what == b"crawl":
            # nothing to do: expired items are reclaimed when looked up
            return r.OK, "ok"
        return r.END, "ok"  # metadump: mproxy lists no keys

    # -- stats <what> --------------------------------------------------------------

    def stats(self, args: tuple[bytes, ...]) -> tuple[bytes, str]:
        """``stats`` with arguments other than ``reset`` (dispatch answers ``reset``)."""
        what = args[0]
        if what == b"settings":
            return r.stats(self.settings_snapshot()), "ok"
        if what == b"detail":
            return self._detail(args[1] if len(args) > 1 else b""), "ok"
        if what == b"cachedump":
            if len(args) < 3:
                return b"CLIENT_ERROR bad command line\r\n", "error"
            clsid, limit = parse_u32(args[1]), parse_u32(args[2])
            if clsid is None or limit is None:
                return b"CLIENT_ERROR bad command line format\r\n", "error"
            if clsid >= c.MAX_NUMBER_OF_SLAB_CLASSES:
                return b"CLIENT_ERROR Illegal slab id\r\n", "error"
            return r.END, "ok"  # mproxy lists no keys
        if what in (b"sizes", b"sizes_enable", b"sizes_disable"):
            # no item-size histogram: memcached's answer when it is off
            return r.stats({"sizes_status": "disabled"}), "ok"
        if what in (b"items", b"slabs", b"conns"):
            # no slab classes (the memory backend has one LRU), no connection table here
            return r.END, "ok"
        return r.ERROR, "error"

    def _detail(self, what: bytes) -> bytes:
        if what == b"on":
            self.detail_enabled = True
            return r.OK
        if what == b"off":
            self.detail_enabled = False
            return r.OK
        if what == b"dump":
            return r.END  # no per-prefix figures are kept
        return b"CLIENT_ERROR usage: stats detail on|off|dump\r\n"

    def settings_snapshot(self) -> dict[str, object]:
        """memcached's ``stats settings`` names, with this proxy's values; only
        the settings mproxy has (in memcached's order)."""
        figures = self._dispatcher.backend.stats()
        out: dict[str, object] = {}
        if "limit_maxbytes" in figures:
            out["maxbytes"] = figures["limit_maxbytes"]
        for name in ("maxconns", "tcpport", "inter"):
            if name in self.settings:
                out[name] = self.settings[name]
        out["verbosity"] = self.verbosity
        if "limit_maxbytes" in figures:
            out["evictions"] = "on"
        out["shutdown_command"] = "no"
        out["growth_factor"] = "1.25"
        out["chunk_size"] = 48
        out["stat_key_prefix"] = ":"
        out["detail_enabled"] = "yes" if self.detail_enabled else "no"
        out["cas_enabled"] = "yes"
        out["binding_protocol"] = self.settings.get("binding_protocol", "ascii")
        out["auth_enabled_sasl"] = "no"
        out["auth_enabled_ascii"] = "no"
        if "item_size_max" in self.settings:
            out["item_size_max"] = self.settings["item_size_max"]
        out["slab_reassign"] = "yes"  # accepted; no class ever has a spare page (NOSPARE)
        out["slab_automove"] = self.slab_automove
        out["slab_automove_ratio"] = f"{self.slab_automove_ratio:.2f}"
        out["slab_chunk_max"] = c.SLAB_PAGE_SIZE // 2
        out["lru_crawler"] = "yes" if self.lru_crawler else "no"
        out["lru_crawler_sleep"] = self.lru_crawler_sleep
        out["lru_crawler_tocrawl"] = self.lru_crawler_tocrawl
        if "flush_enabled" in self.settings:
            out["flush_enabled"] = self.settings["flush_enabled"]
        out["dump_enabled"] = "yes"
        out["lru_maintainer_thread"] = "no"
        out["lru_segmented"] = "no"
        out["hot_lru_pct"] = self.hot_lru_pct
        out["warm_lru_pct"] = self.warm_lru_pct
        out["hot_max_factor"] = f"{self.hot_max_factor:.2f}"
        out["warm_max_factor"] = f"{self.warm_max_factor:.2f}"
        out["temp_lru"] = "no"
        if "idle_timeout" in self.settings:
            out["idle_timeout"] = self.settings["idle_timeout"]
        out["track_sizes"] = "no"
        return out
