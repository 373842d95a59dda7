"""The Dispatcher: the commands of one read against a Backend, and memcached's shared rules. No sockets.

``Dispatcher.run(commands, client)`` takes the commands of one read, in
order, and yields their exact replies in the same order (nothing under
``noreply``). Consecutive get/gets are grouped into one backend read of up to
``backend.max_batch_keys`` keys; every other command is a group of its own.
A parse error that does not end the connection (a
:class:`~mproxy.protocol.errors.ProtocolError`) arrives in its place among
the commands and answers its own reply.

Each group goes through one path: backend failures become
``SERVER_ERROR <reason>`` replies for every command of the group, never
exceptions that kill a connection; counters are bumped here (O(1) each); one
audit record per command when the audit log is on.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from mproxy import __version__
from mproxy.audit import AuditLog, NullAudit
from mproxy.backends.base import (
    ANSWERED_BY,
    Backend,
    BackendError,
    FlushDisabled,
    Item,
    NonNumericValue,
    StoreResult,
    ValueTooLarge,
    ttl_seconds,
)
from mproxy.dispatch.admin import AdminCommands
from mproxy.dispatch.binary import binary_handlers
from mproxy.dispatch.meta import MetaCommands
from mproxy.protocol import binary as b
from mproxy.protocol import commands as c
from mproxy.protocol.commands import StoreMode
from mproxy.protocol import replies as r
from mproxy.protocol.errors import ProtocolError
from mproxy.stats import CacheStats, Stats

log = logging.getLogger(__name__)

#: What ``version`` answers: the memcached protocol level we speak, then us.
#: Clients such as libmemcached parse the leading ``major.minor.micro``.
VERSION_TEXT = f"1.6.18-mproxy-{__version__}"

#: What dispatch executes: text commands and binary requests (their handlers register
#: by record type in ``Dispatcher._handlers``).
AnyCommand = c.Command | b.BinCommand

#: Attempts of :meth:`Dispatcher.arith_or_create` that keep losing the race between
#: "the counter is missing" and "create it" before giving up.
MAX_CREATE_ATTEMPTS = 8

_STORE_REPLY = {
    StoreResult.STORED: (r.STORED, "stored"),
    StoreResult.NOT_STORED: (r.NOT_STORED, "not_stored"),
    StoreResult.EXISTS: (r.EXISTS, "exists"),
    StoreResult.NOT_FOUND: (r.NOT_FOUND, "not_found"),
}


class Dispatcher:
    """Executes commands of one ``[[cache]]`` listener.

    ``settings`` are the configuration figures ``stats settings`` shows, under
    memcached's names (``maxconns``, ``tcpport``, ``item_size_max``,
    ``idle_timeout``, ``flush_enabled``, ...): see :mod:`mproxy.dispatch.admin`."""

    def __init__(
        self,
        backend: Backend,
        stats: CacheStats,
        root_stats: Stats | None = None,
        audit: AuditLog | NullAudit | None = None,
        cache_name: str = "",
        settings: Mapping[str, object] | None = None,
    ) -> None:
        self.backend = backend
        self.stats = stats
        self.root_stats = root_stats
        self.audit = audit if audit is not None else NullAudit()
        self.cache_name = cache_name or stats.name
        #: keys one backend read takes: the size of a group of pipelined gets
        self.max_batch_keys: int = backend.max_batch_keys
        self._handlers: dict[type, Callable[[Any], tuple[bytes, str]]] = {
            c.Gat: self._gat,
            c.Store: self._store,
            c.TooLarge: self._too_large,
            c.Delete: self._delete,
            c.Arith: self._arith,
            c.Touch: self._touch,
            c.FlushAll: self._flush_all,
            c.Version: lambda cmd: (r.version(VERSION_TEXT), "ok"),
            c.Stats: self._stats,
            c.MetaNoop: lambda cmd: (r.MN, "ok"),
        }
        #: memcached's admin commands (stats <what>, cache_memlimit, slabs, lru, ...),
        #: the meta commands and the binary protocol, each from its own module
        self.admin = AdminCommands(self, settings)
        self._handlers.update(self.admin.handlers())
        self._handlers.update(MetaCommands(self).handlers())
        self._handlers.update(binary_handlers(self, VERSION_TEXT))

    def run(self, commands: Iterable[AnyCommand | ProtocolError], client: str = "") -> Iterator[bytes]:
        """Replies to ``commands`` (those of one read), in order, as they are ready.

        A generator, so that the caller can send what is ready before the rest
        runs (the server flushes early past its buffer size). The read is cut
        into groups (see the module docstring); each is run by :meth:`_execute`,
        which returns its replies, one group after the other."""
        limit = self.max_batch_keys
        execute = self._execute
        Get = c.Get
        gets: list[c.Get] = []
        nkeys = 0
        for cmd in commands:
            if type(cmd) is Get:
                if gets and nkeys + len(cmd.keys) > limit:
                    yield from execute(gets, client)
                    gets, nkeys = [], 0
                gets.append(cmd)  # a get of more keys than the limit is a group of its own
                nkeys += len(cmd.keys)
                continue
            if gets:  # anything else ends the group
                yield from execute(gets, client)
                gets, nkeys = [], 0
            if isinstance(cmd, ProtocolError):
                if cmd.reply:  # empty under noreply
                    yield cmd.reply
            else:
                yield from execute((cmd,), client)
        if gets:
            yield from execute(gets, client)

    def _execute(self, group: Sequence[AnyCommand], client: str) -> list[bytes]:
        """One group: a run of get/gets (one backend read for all their keys) or
        one other command. Returns the replies to send (none under ``noreply``).
        Counters and audit lines stay per command; a failure answers every
        command of the group."""
        audit = self.audit
        start = 0.0
        if audit.enabled:
            start = time.perf_counter()
            ANSWERED_BY.set("")  # a backend with local tiers says which answered
        first = group[0]
        results: list[tuple[bytes, str]]
        try:
            if type(first) is c.Get:
                results = self._gets(group)  # type: ignore[arg-type]  # a group with a get holds only gets
            else:
                results = [self._handlers[type(first)](first)]
        except BackendError as err:
            results = [(r.server_error(str(err)), err.code)] * len(group)
        except Exception:  # a bug must cost replies, not the connection
            log.exception("internal error executing %s on cache %s", first.name, self.cache_name)
            results = [(r.server_error("internal error"), "internal")] * len(group)
        if audit.enabled:
            seconds = time.perf_counter() - start
            tier = ANSWERED_BY.get()
            for cmd, (_, outcome) in zip(group, results):
                self._audit(cmd, client, outcome, seconds, tier)
        if len(group) == 1:
            return [] if first.noreply else [results[0][0]]
        return [reply for reply, _ in results]  # a group of many is gets, never noreply

    # -- backend calls, timed and counted ----------------------------------

    def _call(self, op: str, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        try:
            result = fn(*args)
        except BackendError as err:
            self.stats.observe(op, time.perf_counter() - start, err.code)
            raise
        self.stats.observe(op, time.perf_counter() - start)
        return result

    # -- commands ------------------------------------------------------------

    def _values(self, keys: tuple[bytes, ...], found: dict[bytes, Item], with_cas: bool) -> bytes:
        parts = []
        for key in keys:
            item = found.get(key)
            if item is not None:
                parts.append(r.value(key, item.flags, item.value, item.cas if with_cas else None))
        parts.append(r.END)
        return b"".join(parts)

    def _gets(self, cmds: Sequence[c.Get]) -> list[tuple[bytes, str]]:
        if len(cmds) == 1:
            cmd = cmds[0]
            return [self._answer_get(cmd, self._call("get", self.backend.get_many, cmd.keys, cmd.cas))]
        keys = tuple(key for cmd in cmds for key in cmd.keys)
        found = self._call("get", self.backend.get_many, keys, any(cmd.cas for cmd in cmds))
        return [self._answer_get(cmd, found) for cmd in cmds]

    def _answer_get(self, cmd: c.Get, found: dict[bytes, Item]) -> tuple[bytes, str]:
        keys = cmd.keys
        outcome = self.count_gets(keys, found)
        return self._values(keys, found, cmd.cas), outcome

    def _gat(self, cmd: c.Gat) -> tuple[bytes, str]:
        keys, found, hits = self.touch_items(cmd.keys, cmd.exptime, cmd.cas)
        return self._values(keys, found, cmd.cas), _hit_outcome(hits, len(cmd.keys))

    def _store(self, cmd: c.Store) -> tuple[bytes, str]:
        result = self.store_item(cmd.mode, cmd.key, cmd.value, cmd.flags, cmd.exptime, cmd.cas_unique)
        if result is None:
            return r.TOO_LARGE, "too_large"
        return _STORE_REPLY[result]

    def _too_large(self, cmd: c.TooLarge) -> tuple[bytes, str]:
        """A store whose value the parser swallowed: over ``[proxy] max_item_size``."""
        self.refuse_too_large(cmd.mode, cmd.key)
        return r.TOO_LARGE, "too_large"

    def _delete(self, cmd: c.Delete) -> tuple[bytes, str]:
        outcome = self.delete_item(cmd.key)
        return (r.DELETED if outcome == "deleted" else r.NOT_FOUND), outcome

    def _arith(self, cmd: c.Arith) -> tuple[bytes, str]:
        try:
            value = self.arith_value(cmd.key, cmd.delta, cmd.incr)
        except NonNumericValue:
            return r.NON_NUMERIC, "non_numeric"
        if value is None:
            self.count_arith_miss(cmd.incr)
            return r.NOT_FOUND, "not_found"
        return r.number(value), "ok"

    def _touch(self, cmd: c.Touch) -> tuple[bytes, str]:
        touched = bool(self._call("touch", self.backend.touch, cmd.key, cmd.exptime))
        self.count_touches(1, int(touched))
        return (r.TOUCHED, "touched") if touched else (r.NOT_FOUND, "not_found")

    def _flush_all(self, cmd: c.FlushAll) -> tuple[bytes, str]:
        if not self.flush(cmd.delay):
            return r.FLUSH_NOT_ALLOWED, "refused"
        return r.OK, "ok"

    def _stats(self, cmd: c.Stats) -> tuple[bytes, str]:
        if cmd.args and cmd.args[0] == b"reset":
            self.reset_stats()
            return r.RESET, "ok"
        if not cmd.args:
            return r.stats(self.stats_section(cmd.args) or {}), "ok"
        return self.admin.stats(cmd.args)

    # -- memcached's semantics, shared by the text and binary handlers --------
    # Each owns one rule (what is counted, what a too-large set removes, ...);
    # the handlers only turn results into their protocol's replies.

    def count_gets(self, keys: Sequence[bytes], found: Mapping[bytes, Item]) -> str:
        """Count a get of ``keys`` that found ``found``; returns its audit outcome
        (``hit``, ``miss`` or ``partial``). On the text get path: one call does both."""
        st = self.stats
        total = len(keys)
        hits = sum(1 for key in keys if key in found)
        st.cmd_get += total
        st.get_hits += hits
        st.get_misses += total - hits
        return _hit_outcome(hits, total)

    def touch_items(
        self, keys: tuple[bytes, ...], exptime: int, with_cas: bool
    ) -> tuple[tuple[bytes, ...], dict[bytes, Item], int]:
        """gat/gats (and binary touch): new expiry, then the items, counted as touches.
        Returns the keys to answer, the items found and the hits."""
        found = self._call("touch", self.backend.touch_many, keys, exptime, with_cas) if keys else {}
        answered = keys
        seconds = ttl_seconds(exptime)
        if seconds is not None and seconds <= 0:
            # memcached: the first hit expires the item, so a repeated key then misses
            answered = tuple(dict.fromkeys(keys))
        hits = sum(1 for key in answered if key in found)
        self.count_touches(len(keys), hits)
        return answered, found, hits

    def count_touches(self, total: int, hits: int) -> None:
        """Count ``total`` keys touched (touch, gat, gats), ``hits`` of them found."""
        st = self.stats
        st.cmd_touch += total
        st.touch_hits += hits
        st.touch_misses += total - hits

    def store_item(
        self, mode: StoreMode, key: bytes, value: bytes, flags: int, exptime: int, cas_unique: int = 0
    ) -> StoreResult | None:
        """One store, counted (``cmd_set``, the CAS outcomes); None when the item is too
        large for the backend (:meth:`refuse_too_large` has applied memcached's rule).
        An append/prepend with a ``cas_unique`` first checks it (:meth:`check_cas`)."""
        st = self.stats
        st.cmd_set += 1
        if cas_unique and (mode is StoreMode.APPEND or mode is StoreMode.PREPEND):
            # memcached checks a concatenation's CAS before it concatenates
            refused = self.check_cas(key, cas_unique)
            if refused is not None:
                return StoreResult.NOT_STORED if refused is StoreResult.NOT_FOUND else refused
        # by keyword, as Backend.store's argument order is not Store's; timed here, not
        # through _call, whose **kwargs would cost a dict per command
        start = time.perf_counter()
        try:
            result = self.backend.store(
                mode=mode, key=key, value=value, flags=flags, exptime=exptime, cas_unique=cas_unique
            )
        except ValueTooLarge:
            self.refuse_too_large(mode, key)
            return None
        except BackendError as err:
            st.observe(mode.value, time.perf_counter() - start, err.code)
            raise
        st.observe(mode.value, time.perf_counter() - start)
        if mode is StoreMode.CAS:
            count_cas(st, result)
        return result

    def refuse_too_large(self, mode: StoreMode, key: bytes) -> None:
        """The one owner of memcached's rule: a set too large for the cache also
        removes the key's old value, so that it is not read stale afterwards
        (whether the parser or the backend found the value too large)."""
        if mode is StoreMode.SET:
            self._call("delete", self.backend.delete, key)

    def read_items(self, keys: tuple[bytes, ...]) -> dict[bytes, Item]:
        """The items of ``keys`` with their CAS uniques (a backend get, not counted)."""
        found: dict[bytes, Item] = self._call("get", self.backend.get_many, keys, True)
        return found

    def read_item(self, key: bytes) -> Item | None:
        """The key's item with its CAS unique, or None (a backend get, not counted)."""
        return self.read_items((key,)).get(key)

    def check_cas(self, key: bytes, cas_unique: int) -> StoreResult | None:
        """Whether a command conditioned on ``cas_unique`` may go on: None if the key
        holds that unique, else NOT_FOUND (no item) or EXISTS (another unique).

        A read, then the command: atomic on the memory backend (neither yields), a
        window on a remote one (see docs/compatibility.md)."""
        found = self.read_item(key)
        if found is None:
            return StoreResult.NOT_FOUND
        return None if found.cas == cas_unique else StoreResult.EXISTS

    def delete_item(self, key: bytes, cas_unique: int = 0) -> str:
        """delete, counted: ``deleted``, ``not_found``, or ``exists`` (``cas_unique``
        given and not the item's)."""
        if cas_unique:
            refused = self.check_cas(key, cas_unique)
            if refused is StoreResult.EXISTS:
                return "exists"
            if refused is StoreResult.NOT_FOUND:
                self.stats.delete_misses += 1
                return "not_found"
        if self._call("delete", self.backend.delete, key):
            self.stats.delete_hits += 1
            return "deleted"
        self.stats.delete_misses += 1
        return "not_found"

    def arith_value(self, key: bytes, delta: int, incr: bool) -> int | None:
        """incr/decr: the new value (a hit, counted), or None for a missing key (not
        counted: see :meth:`count_arith_miss`). Raises NonNumericValue."""
        value: int | None = self._call("incr" if incr else "decr", self.backend.incr_decr, key, delta, incr)
        if value is not None:
            if incr:
                self.stats.incr_hits += 1
            else:
                self.stats.decr_hits += 1
        return value

    def count_arith_miss(self, incr: bool) -> None:
        """An incr/decr answered as a miss (binary ones that create the key are not)."""
        if incr:
            self.stats.incr_misses += 1
        else:
            self.stats.decr_misses += 1

    def arith_or_create(
        self, key: bytes, delta: int, incr: bool, initial: int | None, exptime: int, cas_unique: int = 0
    ) -> tuple[str, int]:
        """incr/decr that creates a missing counter as ``initial`` (None: does not)
        with ``exptime``, answered as is and not counted as a set (memcached's binary
        incr/decr). Returns ``(outcome, value)``: ``ok`` (incremented), ``created``,
        ``not_found``, ``exists`` (``cas_unique`` given and not the item's) or
        ``not_stored`` (the key kept appearing and vanishing). Raises NonNumericValue.

        The backend's incr_decr, then an add on a miss: an add lost to a concurrent
        creator means the key exists now, so the increment is tried again."""
        for _ in range(MAX_CREATE_ATTEMPTS):
            value = None
            refused = self.check_cas(key, cas_unique) if cas_unique else None
            if refused is StoreResult.EXISTS:
                return "exists", 0
            if refused is None:
                value = self.arith_value(key, delta, incr)
            if value is not None:
                return "ok", value
            if initial is None:
                self.count_arith_miss(incr)
                return "not_found", 0
            store = functools.partial(
                self.backend.store, mode=StoreMode.ADD, key=key, value=b"%d" % initial, flags=0, exptime=exptime
            )
            if self._call("add", store) is StoreResult.STORED:
                return "created", initial
        return "not_stored", 0

    def flush(self, delay: int) -> bool:
        """flush_all, counted; False when the cache refuses it (``allow_flush = false``)."""
        self.stats.cmd_flush += 1
        try:
            self._call("flush", self.backend.flush_all, delay)
        except FlushDisabled:
            return False
        return True

    def stats_section(self, args: tuple[bytes, ...]) -> Mapping[str, object] | None:
        """The statistics ``stats <args>`` shows, or None when the proxy has no such group."""
        if not args:
            return self.root_stats.snapshot() if self.root_stats is not None else self.stats.snapshot()
        if args == (b"settings",):
            return self.admin.settings_snapshot()
        return None

    def reset_stats(self) -> None:
        """``stats reset``."""
        if self.root_stats is not None:
            self.root_stats.reset()
        else:
            self.stats.reset()

    # -- audit ----------------------------------------------------------------

    def _audit(self, cmd: AnyCommand, client: str, outcome: str, seconds: float, tier: str = "") -> None:
        keys: tuple[bytes, ...]
        flags = exptime = nbytes = None
        if isinstance(cmd, (c.Get, c.Gat)):
            keys = cmd.keys
        elif isinstance(cmd, (c.Store, b.BinStore)):
            keys, flags, exptime, nbytes = (cmd.key,), cmd.flags, cmd.exptime, len(cmd.value)
        elif isinstance(cmd, (c.TooLarge, b.BinTooLarge)):
            keys, flags, exptime, nbytes = (cmd.key,), cmd.flags, cmd.exptime, cmd.nbytes
        elif isinstance(cmd, c.Ms):
            keys, flags, exptime, nbytes = (cmd.key,), cmd.client_flags, cmd.exptime, len(cmd.value)
        else:
            key = getattr(cmd, "key", None)
            keys = (key,) if key is not None else ()
        self.audit.record(
            client=client,
            cache=self.cache_name,
            command=cmd.name,
            keys=keys,
            outcome=outcome,
            latency_us=int(seconds * 1e6),
            flags=flags,
            exptime=exptime,
            nbytes=nbytes,
            tier=tier,
        )


def count_cas(st: CacheStats, result: StoreResult) -> None:
    """memcached's counters of a compare-and-swap store (cas, or ms with C)."""
    if result is StoreResult.STORED:
        st.cas_hits += 1
    elif result is StoreResult.EXISTS:
        st.cas_badval += 1
    elif result is StoreResult.NOT_FOUND:
        st.cas_misses += 1


def _hit_outcome(hits: int, total: int) -> str:
    if hits == total:
        return "hit"
    return "miss" if hits == 0 else "partial"
