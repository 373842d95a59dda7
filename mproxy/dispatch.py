"""The one place memcached semantics meet a Backend. No sockets here.

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

import logging
import time
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from mproxy import __version__
from mproxy.audit import AuditLog, NullAudit
from mproxy.dispatch_admin import AdminCommands
from mproxy.dispatch_meta import MetaCommands
from mproxy.backends.base import (
    Backend,
    BackendError,
    FlushDisabled,
    Item,
    NonNumericValue,
    StoreResult,
    ValueTooLarge,
    ttl_seconds,
)
from mproxy.protocol import commands as c
from mproxy.protocol.commands import StoreMode
from mproxy.protocol import replies as r
from mproxy.protocol.errors import ProtocolError
from mproxy.stats import CacheStats, Stats

log = logging.getLogger(__name__)

#: What ``version`` answers: the memcached protocol level we speak, then us.
#: Clients such as libmemcached parse the leading ``major.minor.micro``.
VERSION_TEXT = f"1.6.18-mproxy-{__version__}"

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
    ``idle_timeout``, ``flush_enabled``, ...): see :mod:`mproxy.dispatch_admin`."""

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
        #: memcached's admin commands (stats <what>, cache_memlimit, slabs, lru, ...)
        #: and the meta commands, each from its own module
        self.admin = AdminCommands(self, settings)
        self._handlers.update(self.admin.handlers())
        self._handlers.update(MetaCommands(self).handlers())

    def run(self, commands: Iterable[c.Command | ProtocolError], client: str = "") -> Iterator[bytes]:
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

    def _execute(self, group: Sequence[c.Command], client: str) -> list[bytes]:
        """One group: a run of get/gets (one backend read for all their keys) or
        one other command. Returns the replies to send (none under ``noreply``).
        Counters and audit lines stay per command; a failure answers every
        command of the group."""
        audit = self.audit
        start = time.perf_counter() if audit.enabled else 0.0
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
            for cmd, (_, outcome) in zip(group, results):
                self._audit(cmd, client, outcome, seconds)
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
        st = self.stats
        hits = sum(1 for key in cmd.keys if key in found)
        st.cmd_get += len(cmd.keys)
        st.get_hits += hits
        st.get_misses += len(cmd.keys) - hits
        return self._values(cmd.keys, found, cmd.cas), _hit_outcome(hits, len(cmd.keys))

    def _gat(self, cmd: c.Gat) -> tuple[bytes, str]:
        found = self._call("touch", self.backend.touch_many, cmd.keys, cmd.exptime, cmd.cas) if cmd.keys else {}
        keys = cmd.keys
        seconds = ttl_seconds(cmd.exptime)
        if seconds is not None and seconds <= 0:
            # memcached: the first hit expires the item, so a repeated key then misses
            keys = tuple(dict.fromkeys(keys))
        st = self.stats
        hits = sum(1 for key in keys if key in found)
        st.cmd_touch += len(cmd.keys)
        st.touch_hits += hits
        st.touch_misses += len(cmd.keys) - hits
        return self._values(keys, found, cmd.cas), _hit_outcome(hits, len(cmd.keys))

    def _store(self, cmd: c.Store) -> tuple[bytes, str]:
        st = self.stats
        st.cmd_set += 1
        # by keyword, as Backend.store's argument order is not Store's; timed here, not
        # through _call, whose **kwargs would cost a dict per command
        start = time.perf_counter()
        try:
            result = self.backend.store(
                mode=cmd.mode, key=cmd.key, value=cmd.value, flags=cmd.flags, exptime=cmd.exptime,
                cas_unique=cmd.cas_unique,
            )
        except ValueTooLarge:
            return self._refuse_too_large(cmd.mode, cmd.key)
        except BackendError as err:
            st.observe(cmd.name, time.perf_counter() - start, err.code)
            raise
        st.observe(cmd.name, time.perf_counter() - start)
        if cmd.mode is StoreMode.CAS:
            count_cas(st, result)
        return _STORE_REPLY[result]

    def _too_large(self, cmd: c.TooLarge) -> tuple[bytes, str]:
        """A store whose value the parser swallowed: over ``[proxy] max_item_size``."""
        return self._refuse_too_large(cmd.mode, cmd.key)

    def _refuse_too_large(self, mode: StoreMode, key: bytes) -> tuple[bytes, str]:
        """The one owner of memcached's rule: a set too large for the cache also
        removes the key's old value, so that it is not read stale afterwards
        (whether the parser or the backend found the value too large)."""
        if mode is StoreMode.SET:
            self._call("delete", self.backend.delete, key)
        return r.TOO_LARGE, "too_large"

    def _delete(self, cmd: c.Delete) -> tuple[bytes, str]:
        if self._call("delete", self.backend.delete, cmd.key):
            self.stats.delete_hits += 1
            return r.DELETED, "deleted"
        self.stats.delete_misses += 1
        return r.NOT_FOUND, "not_found"

    def _arith(self, cmd: c.Arith) -> tuple[bytes, str]:
        st = self.stats
        try:
            value = self._call(cmd.name, self.backend.incr_decr, cmd.key, cmd.delta, cmd.incr)
        except NonNumericValue:
            return r.NON_NUMERIC, "non_numeric"
        if value is None:
            if cmd.incr:
                st.incr_misses += 1
            else:
                st.decr_misses += 1
            return r.NOT_FOUND, "not_found"
        if cmd.incr:
            st.incr_hits += 1
        else:
            st.decr_hits += 1
        return r.number(value), "ok"

    def _touch(self, cmd: c.Touch) -> tuple[bytes, str]:
        st = self.stats
        st.cmd_touch += 1
        if self._call("touch", self.backend.touch, cmd.key, cmd.exptime):
            st.touch_hits += 1
            return r.TOUCHED, "touched"
        st.touch_misses += 1
        return r.NOT_FOUND, "not_found"

    def _flush_all(self, cmd: c.FlushAll) -> tuple[bytes, str]:
        self.stats.cmd_flush += 1
        try:
            self._call("flush", self.backend.flush_all, cmd.delay)
        except FlushDisabled:
            return r.FLUSH_NOT_ALLOWED, "refused"
        return r.OK, "ok"

    def _stats(self, cmd: c.Stats) -> tuple[bytes, str]:
        if not cmd.args:
            source = self.root_stats.snapshot() if self.root_stats is not None else self.stats.snapshot()
            return r.stats(source), "ok"
        if cmd.args[0] == b"reset":
            if self.root_stats is not None:
                self.root_stats.reset()
            else:
                self.stats.reset()
            return r.RESET, "ok"
        return self.admin.stats(cmd.args)

    # -- audit ----------------------------------------------------------------

    def _audit(self, cmd: c.Command, client: str, outcome: str, seconds: float) -> None:
        keys: tuple[bytes, ...]
        flags = exptime = nbytes = None
        if isinstance(cmd, (c.Get, c.Gat)):
            keys = cmd.keys
        elif isinstance(cmd, c.Store):
            keys, flags, exptime, nbytes = (cmd.key,), cmd.flags, cmd.exptime, len(cmd.value)
        elif isinstance(cmd, c.TooLarge):
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
