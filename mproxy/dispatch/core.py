"""The Dispatcher: the commands of one read against a Backend, and memcached's shared rules. No sockets.

``Dispatcher.run(commands, client)`` takes the commands of one read, in
order, and yields one reply per command in the same order: ``bytes`` (``b""``
where nothing is sent: ``noreply``, quiet binary requests), or an iterable of
``bytes`` for a reply formed as it is sent (a multi-get past
:data:`STREAM_BYTES`: its VALUE blocks are not joined, and large values are
not copied). A parse error that does not end the connection (a
:class:`~mproxy.protocol.errors.ProtocolError`) arrives in its place among the
commands and answers its own reply.

Consecutive text gets (get/gets), and consecutive binary gets (the
``getkq ... getk`` runs of binary multi-gets), are grouped into one backend
read of up to ``backend.max_batch_keys`` keys; every other command is a group
of its own. How the groups run depends on the backend (``Backend.blocking``):

* **inline** (the memory backend: no call yields): one after the other, in the
  caller's greenlet; nothing is spawned, nothing added per command;
* **concurrently** (a remote backend): the groups of one read start at once in
  greenlets, at most :data:`MAX_IN_FLIGHT` per read started and not yet
  answered, and no new one while the finished ones hold more than
  :data:`MAX_READY_BYTES`; a group waits for the earlier groups of its read
  that touch one of its keys (``cmd.keys``: ``set k`` then ``get k`` reads
  what the set wrote, five ``incr k`` apply in order), and a command naming no
  key (``keys`` None: flush_all, stats, version, mn, noop, ...) is a barrier:
  it runs alone once everything before it has finished, and what follows
  starts after it. Replies still leave in order; while the next one is not
  ready, ``run`` yields ``None`` ("flush what you have": the caller sends the
  replies that are ready). A get naming more than ``max_batch_keys`` keys runs
  alone too, reading them a batch at a time as its reply is sent, so that one
  command never holds more than one batch of values.

Each group goes through one path: backend failures become
``SERVER_ERROR <reason>`` replies (binary: an error frame) for every command
of the group, never exceptions that kill a connection, and never the replies
of another group; counters are bumped here (O(1) each); one audit record per
command when the audit log is on.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import gevent

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
from mproxy.dispatch.binary import binary_get_group, binary_handlers
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

#: One reply: its bytes, or the parts of a reply formed as it is sent.
Reply = bytes | Iterable[bytes]

#: Attempts of :meth:`Dispatcher.arith_or_create` that keep losing the race between
#: "the counter is missing" and "create it" before giving up.
MAX_CREATE_ATTEMPTS = 8

#: Groups of one read started and not yet answered, on a blocking backend (the
#: others wait): a 4 MiB pipeline never spawns more than this per connection.
MAX_IN_FLIGHT = 64
#: Bytes of finished groups' replies not yet answered past which no new group starts
#: (until the connection has sent them: the socket's back-pressure).
MAX_READY_BYTES = 4 * 1024 * 1024
#: A get's reply whose values pass this many bytes is streamed: its VALUE blocks are
#: formed as they are sent, not joined.
STREAM_BYTES = 256 * 1024
#: Values from this size on are sent as they are, not copied into a VALUE block.
BIG_VALUE = 64 * 1024

_STORED = StoreResult.STORED
_STORED_REPLY = (r.STORED, "stored")
_STORE_REPLY = {
    StoreResult.STORED: (r.STORED, "stored"),
    StoreResult.NOT_STORED: (r.NOT_STORED, "not_stored"),
    StoreResult.EXISTS: (r.EXISTS, "exists"),
    StoreResult.NOT_FOUND: (r.NOT_FOUND, "not_found"),
}

_CRLF = b"\r\n"
_Get = c.Get
_BinGet = b.BinGet
perf_counter = time.perf_counter


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
        #: False when the backend refuses flush_all (``allow_flush = false``, memcached ``-F``)
        self.allow_flush: bool = getattr(backend, "allow_flush", True)
        #: keys one backend read takes: the size of a group of pipelined gets
        self.max_batch_keys: int = backend.max_batch_keys
        #: run the groups of a read concurrently (see the module docstring)
        self.concurrent: bool = getattr(backend, "blocking", True)
        self._handlers: dict[type, Callable[[Any], tuple[Reply, str]]] = {
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
        self._bin_gets = binary_get_group(self)

    def run(self, commands: Iterable[AnyCommand | ProtocolError], client: str = "") -> Iterator[Reply | None]:
        """One reply per command of ``commands`` (those of one read), in order, as
        they are ready; ``None`` between them on a blocking backend when the next
        one is not ready yet (see the module docstring).

        A generator, so that the caller can send what is ready before the rest
        runs (the server flushes early past its buffer size)."""
        if isinstance(commands, list) and len(commands) == 1:
            cmd = commands[0]
            # a read of one command: no generator (nothing to run concurrently with it),
            # unless it is a get too large for one backend read (streamed)
            if not isinstance(cmd, ProtocolError) and not (
                self.concurrent and type(cmd) is c.Get and len(cmd.keys) > self.max_batch_keys
            ):
                return iter(self._execute(commands, client))
        if self.concurrent:
            return self._run_concurrent(commands, client)
        return self._run_inline(commands, client)

    def _run_inline(self, commands: Iterable[AnyCommand | ProtocolError], client: str) -> Iterator[Reply]:
        """The groups one after the other (a backend whose calls never yield)."""
        limit = self.max_batch_keys
        execute = self._execute
        Get, BinGet = c.Get, b.BinGet
        group: list[Any] = []
        kind: type | None = None
        nkeys = 0
        for cmd in commands:
            t = type(cmd)
            if t is Get or t is BinGet:
                n = len(cmd.keys)  # type: ignore[union-attr,arg-type]  # a get's keys are a tuple
                if group and (t is not kind or nkeys + n > limit):
                    yield from execute(group, client)
                    group, nkeys = [], 0
                group.append(cmd)  # a get of more keys than the limit is a group of its own
                kind = t
                nkeys += n
                continue
            if group:  # anything else ends the group
                yield from execute(group, client)
                group, nkeys = [], 0
            if isinstance(cmd, ProtocolError):
                yield cmd.reply  # empty under noreply
            else:
                yield from execute((cmd,), client)
        if group:
            yield from execute(group, client)

    def _run_concurrent(self, commands: Iterable[AnyCommand | ProtocolError], client: str) -> Iterator[Reply | None]:
        """The groups concurrently, in order per key (a backend whose calls wait on I/O)."""
        units = list(self._units(commands))
        window: deque[_Running] = deque()
        latest: dict[bytes, _Running] = {}  # key -> the last running group touching it
        flow = _Flow()
        last = len(units) - 1
        for index, (keys, unit) in enumerate(units):
            if type(unit) is not list:  # a parse error: its reply, in its place
                window.append(_Running.answered(unit.reply))  # type: ignore[union-attr]
                continue
            if keys is None:  # a barrier (or a get too large for one read): alone, in order
                yield from self._answer_all(window, latest, flow)
                if len(unit) == 1 and type(unit[0]) is c.Get and len(unit[0].keys) > self.max_batch_keys:
                    yield self._stream_get(unit[0], client)
                else:
                    yield from self._execute(unit, client)
                flow.unsent = True
                continue
            if not window and index == last:  # alone in the read: no greenlet needed
                yield from self._execute(unit, client)
                continue
            deps = {run for key in keys if (run := latest.get(key)) is not None and not run.finished()}
            running = _Running(keys)
            running.greenlet = gevent.spawn(self._execute_after, running, deps, unit, client, flow)
            window.append(running)
            for key in keys:
                latest[key] = running
            # answer what is ready; wait while the window is full or holds too much
            while window and (window[0].finished() or len(window) >= MAX_IN_FLIGHT or flow.ready_bytes > MAX_READY_BYTES):
                yield from self._answer(window, latest, flow)
        yield from self._answer_all(window, latest, flow)

    def _units(self, commands: Iterable[AnyCommand | ProtocolError]) -> Iterator[tuple[Any, Any]]:
        """The read cut into ``(keys, group)``: a group of gets (their keys), a command
        (its keys, or None: a barrier), a get of more keys than one read takes (None:
        it runs alone), or ``(None, error)`` for a parse error (answered in place)."""
        limit = self.max_batch_keys
        Get, BinGet = c.Get, b.BinGet
        group: list[Any] = []
        keys: list[bytes] = []
        kind: type | None = None
        for cmd in commands:
            t = type(cmd)
            if t is Get or t is BinGet:
                ckeys: tuple[bytes, ...] = cmd.keys  # type: ignore[union-attr,assignment]  # a get's: a tuple
                if group and (t is not kind or len(keys) + len(ckeys) > limit):
                    yield keys, group
                    group, keys = [], []
                if len(ckeys) > limit:  # a text get: it reads its keys a batch at a time
                    yield None, [cmd]
                    continue
                group.append(cmd)
                keys.extend(ckeys)
                kind = t
                continue
            if group:
                yield keys, group
                group, keys = [], []
            if isinstance(cmd, ProtocolError):
                yield None, cmd
            else:
                yield cmd.keys, [cmd]  # type: ignore[union-attr]
        if group:
            yield keys, group

    def _execute_after(
        self, running: _Running, deps: set[_Running], group: list[AnyCommand], client: str, flow: _Flow
    ) -> None:
        """A group's greenlet: wait for the earlier groups sharing a key, then run it."""
        for dep in deps:
            dep.wait()
        replies = self._execute(group, client)
        size = sum(map(_reply_size, replies))
        running.replies, running.size = replies, size
        flow.ready_bytes += size

    def _answer(self, window: deque[_Running], latest: dict[bytes, _Running], flow: _Flow) -> Iterator[Reply | None]:
        """The replies of the first group of the window, once it has finished."""
        running = window[0]
        if not running.finished():
            if flow.unsent:
                flow.unsent = False
                yield None  # the caller sends what is ready while this one runs
            running.wait()
        window.popleft()
        flow.ready_bytes -= running.size
        for key in running.keys:
            if latest.get(key) is running:
                del latest[key]
        flow.unsent = True
        yield from running.replies

    def _answer_all(
        self, window: deque[_Running], latest: dict[bytes, _Running], flow: _Flow
    ) -> Iterator[Reply | None]:
        while window:
            yield from self._answer(window, latest, flow)

    def _execute(self, group: Sequence[AnyCommand], client: str) -> list[Reply]:
        """One group: a run of gets (one backend read for all their keys) or one other
        command. Returns one reply per command (``b""`` under ``noreply``). Counters
        and audit lines stay per command; a failure answers every command of the group."""
        audit = self.audit
        start = 0.0
        if audit.enabled:
            start = time.perf_counter()
            ANSWERED_BY.set("")  # a backend with local tiers says which answered
        first = group[0]
        kind = type(first)
        replies: list[Reply]
        outcomes: Sequence[str] | None
        try:
            if kind is _Get:
                replies, outcomes = self._gets(group, audit.enabled)  # type: ignore[arg-type]  # only gets
            elif kind is _BinGet:
                results = self._bin_gets(group)  # type: ignore[arg-type]  # only binary gets
                replies = [frame for frame, _ in results]
                outcomes = [outcome for _, outcome in results] if audit.enabled else None
            else:
                reply, outcome = self._handlers[kind](first)
                replies = [b"" if first.noreply else reply]
                outcomes = (outcome,)
        except BackendError as err:
            replies = _failed(group, str(err))
            outcomes = (err.code,) * len(group)
        except Exception:  # a bug must cost replies, not the connection
            log.exception("internal error executing %s on cache %s", first.name, self.cache_name)
            replies = _failed(group, "internal error")
            outcomes = ("internal",) * len(group)
        if audit.enabled:
            seconds = time.perf_counter() - start
            tier = ANSWERED_BY.get()
            for cmd, outcome in zip(group, outcomes):  # type: ignore[arg-type]  # computed when audited
                self._audit(cmd, client, outcome, seconds, tier)
        return replies

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

    def _gets(self, cmds: Sequence[c.Get], outcomes: bool) -> tuple[list[Reply], list[str] | None]:
        """get/gets: one backend read for the keys of all ``cmds``; their replies, and
        each one's audit outcome when ``outcomes``. Counted as one read of all the keys."""
        if len(cmds) == 1:
            cmd = cmds[0]
            keys: Sequence[bytes] = cmd.keys
            with_cas = cmd.cas
        else:
            collected: list[bytes] = []
            with_cas = False
            for cmd in cmds:
                collected += cmd.keys
                if cmd.cas:
                    with_cas = True
            keys = tuple(collected)
        st = self.stats
        start = perf_counter()
        try:
            found = self.backend.get_many(keys, with_cas)
        except BackendError as err:
            st.observe("get", perf_counter() - start, err.code)
            raise
        st.observe("get", perf_counter() - start)
        total = len(keys)
        hits = len(found) if total == 1 else sum(map(found.__contains__, keys))
        st.cmd_get += total
        st.get_hits += hits
        st.get_misses += total - hits
        if len(cmds) == 1:  # the usual read: one get (no list comprehension's frame)
            replies = [_values(keys, found, with_cas)]  # type: ignore[arg-type]  # its keys: a tuple
        else:
            replies = [_values(cmd.keys, found, cmd.cas) for cmd in cmds]
        if not outcomes:
            return replies, None
        return replies, [_hit_outcome(sum(map(found.__contains__, cmd.keys)), len(cmd.keys)) for cmd in cmds]

    def _stream_get(self, cmd: c.Get, client: str) -> Iterator[bytes]:
        """The reply to a get of more keys than one backend read takes, on a blocking
        backend: its keys read a batch at a time as the reply is sent, so that it holds
        one batch of values at most. A failure after VALUE blocks have gone ends the
        reply with its SERVER_ERROR line (no END)."""
        start = time.perf_counter()
        keys, limit, with_cas = cmd.keys, self.max_batch_keys, cmd.cas
        hits = 0
        outcome = ""
        try:
            for i in range(0, len(keys), limit):
                batch = keys[i : i + limit]
                try:
                    found = self._call("get", self.backend.get_many, batch, with_cas)
                except BackendError as err:
                    outcome = err.code
                    yield r.server_error(str(err))
                    return
                except Exception:
                    log.exception("internal error executing %s on cache %s", cmd.name, self.cache_name)
                    outcome = "internal"
                    yield r.server_error("internal error")
                    return
                self.count_gets(batch, found)
                for key in batch:
                    item = found.get(key)
                    if item is not None:
                        hits += 1
                        yield from _value_parts(key, item, with_cas)
            outcome = _hit_outcome(hits, len(keys))
            yield r.END
        finally:
            if self.audit.enabled:
                self._audit(cmd, client, outcome or "incomplete", time.perf_counter() - start)

    def _gat(self, cmd: c.Gat) -> tuple[Reply, str]:
        keys, found, hits = self.touch_items(cmd.keys, cmd.exptime, cmd.cas)
        return _values(keys, found, cmd.cas), _hit_outcome(hits, len(cmd.keys))

    def _store(self, cmd: c.Store) -> tuple[bytes, str]:
        result = self.store_item(cmd.mode, cmd.key, cmd.value, cmd.flags, cmd.exptime, cmd.cas_unique)
        if result is _STORED:  # the usual answer without a dict lookup (an Enum hashes in Python)
            return _STORED_REPLY
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
        if cmd.delay is None:  # memcached: counted, refused under -F, else the argument's error
            self.stats.cmd_flush += 1
            if not self.allow_flush:
                return r.FLUSH_NOT_ALLOWED, "refused"
            self.stats.protocol_errors += 1
            return r.BAD_EXPTIME, "error"
        if not self.flush(cmd.delay):
            return r.FLUSH_NOT_ALLOWED, "refused"
        return r.OK, "ok"

    def _stats(self, cmd: c.Stats) -> tuple[bytes, str]:
        if cmd.args and cmd.args[0] == b"reset":
            if not self.reset_stats():
                return r.RESET_NOT_ALLOWED, "refused"
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
        hits = sum(map(found.__contains__, keys))
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
        # timed here, not through _call (a frame and *args per command); the operation's
        # name is the mode's value (_value_: .value is a Python-level descriptor)
        start = perf_counter()
        try:
            result = self.backend.store(mode, key, value, flags, exptime, cas_unique)
        except ValueTooLarge:
            self.refuse_too_large(mode, key)
            return None
        except BackendError as err:
            st.observe(mode._value_, perf_counter() - start, err.code)
            raise
        st.observe(mode._value_, perf_counter() - start)
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

    def reset_stats(self) -> bool:
        """``stats reset``; False when ``[admin] allow_reset`` refuses it."""
        if self.root_stats is not None:
            if not self.root_stats.allow_reset:
                return False
            self.root_stats.reset()
        else:
            self.stats.reset()
        return True

    # -- audit ----------------------------------------------------------------

    def _audit(self, cmd: AnyCommand, client: str, outcome: str, seconds: float, tier: str = "") -> None:
        flags = exptime = nbytes = None
        if isinstance(cmd, (c.Store, b.BinStore)):
            flags, exptime, nbytes = cmd.flags, cmd.exptime, len(cmd.value)
        elif isinstance(cmd, (c.TooLarge, b.BinTooLarge)):
            flags, exptime, nbytes = cmd.flags, cmd.exptime, cmd.nbytes
        elif isinstance(cmd, c.Ms):
            flags, exptime, nbytes = cmd.client_flags, cmd.exptime, len(cmd.value)
        self.audit.record(
            client=client,
            cache=self.cache_name,
            command=cmd.name,
            keys=cmd.keys or (),
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


def _failed(group: Sequence[AnyCommand], reason: str) -> list[Reply]:
    """The replies of a group that failed: ``SERVER_ERROR <reason>`` (``b""`` under
    noreply); for binary requests, quiet or not, memcached's binary form of it:
    ``Out of memory`` (status 0x82) with the reason as the body."""
    first = group[0]
    if isinstance(first, b.BinCommand):
        text = reason.encode("utf-8", "replace")
        return [b.error(cmd.opcode, cmd.opaque, b.Status.ENOMEM, text) for cmd in group]  # type: ignore[union-attr]
    return [b"" if first.noreply else r.server_error(reason)] * len(group)


def _hit_outcome(hits: int, total: int) -> str:
    if hits == total:
        return "hit"
    return "miss" if hits == 0 else "partial"


# -- replies of gets --------------------------------------------------------------


def _values(keys: tuple[bytes, ...], found: Mapping[bytes, Item], with_cas: bool) -> Reply:
    """A get's reply: the VALUE block of each key found, in order, then END. Joined
    into one ``bytes`` unless its values pass :data:`STREAM_BYTES`: then the blocks
    formed so far and an iterator forming the others as they are sent."""
    if len(keys) == 1:
        key = keys[0]
        item = found.get(key)
        if item is None:
            return r.END
        value = item.value
        if len(value) >= BIG_VALUE:
            return (*_value_parts(key, item, with_cas), r.END)
        if with_cas:
            return b"VALUE %b %d %d %d\r\n%b\r\nEND\r\n" % (key, item.flags, len(value), item.cas, value)
        return b"VALUE %b %d %d\r\n%b\r\nEND\r\n" % (key, item.flags, len(value), value)
    parts: list[bytes] = []
    size = 0
    for i, key in enumerate(keys):
        item = found.get(key)
        if item is not None:
            size += len(item.value)
            if size > STREAM_BYTES:
                return _Values(parts, keys[i:], found, with_cas)
            parts.append(r.value(key, item.flags, item.value, item.cas if with_cas else None))
    parts.append(r.END)
    return b"".join(parts)


def _value_parts(key: bytes, item: Item, with_cas: bool) -> tuple[bytes, ...]:
    """One VALUE block: in one piece, or a large value as it is, between its header and CRLF."""
    value = item.value
    if len(value) < BIG_VALUE:
        return (r.value(key, item.flags, value, item.cas if with_cas else None),)
    if with_cas:
        return (b"VALUE %b %d %d %d\r\n" % (key, item.flags, len(value), item.cas), value, _CRLF)
    return (b"VALUE %b %d %d\r\n" % (key, item.flags, len(value)), value, _CRLF)


class _Values:
    """The rest of a large get reply, formed as it is sent: ``parts`` already formed,
    then the VALUE blocks of ``keys`` found in ``found``, then END. ``size`` counts the
    values it holds (for :data:`MAX_READY_BYTES`)."""

    __slots__ = ("parts", "keys", "found", "with_cas", "size")

    def __init__(self, parts: list[bytes], keys: tuple[bytes, ...], found: Mapping[bytes, Item], with_cas: bool) -> None:
        self.parts, self.keys, self.found, self.with_cas = parts, keys, found, with_cas
        self.size = sum(map(len, parts)) + sum(len(item.value) for item in found.values())

    def __iter__(self) -> Iterator[bytes]:
        yield from self.parts
        found, with_cas = self.found, self.with_cas
        for key in self.keys:
            item = found.get(key)
            if item is not None:
                yield from _value_parts(key, item, with_cas)
        yield r.END


def _reply_size(reply: Reply) -> int:
    if type(reply) is bytes:
        return len(reply)
    if type(reply) is _Values:
        return reply.size
    return sum(map(len, reply))  # type: ignore[arg-type]  # a tuple of parts


# -- concurrent groups ---------------------------------------------------------------


class _Flow:
    """The state of one read's groups: bytes of replies finished and not yet answered,
    and whether replies were answered since the last "flush what you have"."""

    __slots__ = ("ready_bytes", "unsent")

    def __init__(self) -> None:
        self.ready_bytes = 0
        self.unsent = False


class _Running:
    """One group of a read running in its greenlet (or a reply known at once)."""

    __slots__ = ("keys", "greenlet", "replies", "size")

    def __init__(self, keys: Sequence[bytes]) -> None:
        self.keys = keys
        self.greenlet: gevent.Greenlet | None = None
        self.replies: list[Reply] = []
        self.size = 0

    @classmethod
    def answered(cls, reply: bytes) -> _Running:
        running = cls(())
        running.replies = [reply]
        return running

    def finished(self) -> bool:
        return self.greenlet is None or self.greenlet.dead

    def wait(self) -> None:
        if self.greenlet is not None:
            self.greenlet.join()
