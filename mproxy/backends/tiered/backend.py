"""TieredBackend: a memory tier, and optionally a disk tier, in front of another backend.

Reads: the memory tier (:class:`~.memory.MemoryTier`), then the disk tier
(:class:`~.disk.DiskTier`, its hits promoted to memory), then the backend
behind, the keys missing from one read of it; concurrent misses of one key
share that read (single-flight). A backend hit is answered at once; the copy
is kept (filled) afterwards, for no longer than the item's own TTL (asked of
the backend, ``remaining_ttl``, when this proxy did not write it) nor the
tier's TTL, and only when no write or invalidation of the key came since the
read began (per-key invalidation sequence numbers).

Writes (every Backend method that can change an item) go to the backend
always. Before the call the key is marked as written: no fill and no disk
read of it until the outcome is known (the memory copy, if any, still answers
reads concurrent with the write: the write is not acknowledged yet). After
the backend confirms, the new item replaces the copy in place (its place in
the eviction queues stays) when it is known exactly (set, add, replace and
cas, with the CAS unique the backend gives; the items a gat returns), else
the key's copies are dropped (append, prepend, incr, decr, touch, delete); a
failed or timed-out write drops them and blocks fills of the key for
``quarantine`` seconds (a timed-out write may still land). Then,
with several worker processes, the other workers drop their copies
(:meth:`set_peers`), and only then does the write return: a client that
wrote through mproxy never reads the value its write replaced, through any
worker. ``docs/tiers.md`` has the consistency model.

No method of the tiers yields; the backend calls, the disk reads (on a
thread, bounded by a timeout) and the remaining-TTL calls (in a greenlet of
their own, after the answer) do.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from typing import Any, Callable, Mapping, Sequence, cast

import gevent
from gevent.event import AsyncResult

from mproxy.backends.base import (
    ANSWERED_BY,
    Backend,
    BackendError,
    FlushDisabled,
    Item,
    MetaArith,
    MetaArithResult,
    MetaDelete,
    MetaGet,
    MetaItem,
    MetaStatus,
    MetaStore,
    MetaUnsupported,
    NonNumericValue,
    StoreResult,
    ValueTooLarge,
    ttl_seconds,
)
from mproxy.backends.tiered.disk import DiskTier
from mproxy.backends.tiered.memory import MemoryTier
from mproxy.protocol.commands import StoreMode

log = logging.getLogger(__name__)

#: Keys one remaining-TTL call asks about.
FILL_BATCH = 256
#: Fills waiting for their remaining TTL past which new ones are dropped.
MAX_PENDING_FILLS = 8192
#: Least memory tier ``cache_memlimit`` sets (per worker).
MIN_MEMORY_BYTES = 65536

#: The tiers named in :data:`~mproxy.backends.base.ANSWERED_BY` (the audit log's ``tier``).
MEMORY, DISK, BACKEND = "memory", "disk", "backend"

#: Errors after which nothing was written (or, for ValueTooLarge, at most the key deleted):
#: the outcome is known, so no quarantine.
_DEFINITE = (MetaUnsupported, NonNumericValue, ValueTooLarge, FlushDisabled)

#: A message to the other workers: ``("inv", keys, quarantine seconds)``,
#: ``("flush", Unix time or 0)``, ``("resize", bytes per worker)``.
PeerMessage = tuple[Any, ...]

_PLAIN_GET = MetaGet()
_INSTALLED_MODES = (StoreMode.SET, StoreMode.ADD, StoreMode.REPLACE, StoreMode.CAS)


class _Flight(AsyncResult):  # type: ignore[misc]  # gevent's AsyncResult is untyped
    """One backend read that concurrent misses of its keys share."""


class TieredBackend:
    """:class:`~mproxy.backends.base.Backend` with local tiers in front of ``inner``.

    ``memory_ttl`` / ``disk_ttl``: longest life of a copy, seconds from when its
    value was known (0: none, the item's own TTL only: momento-proxy's meaning).
    ``default_ttl`` / ``max_ttl``: what ``inner`` gives an exptime of 0 (None: no
    expiry) and the longest TTL it keeps (None: no cap). ``keeps_flags``: False
    when ``inner`` reads flags back as 0 (Momento with ``flags = false``).
    ``ttl_lookup``: the remaining-TTL function (``inner.remaining_ttl`` by default;
    None: copies are kept of what this proxy writes only). ``second_miss``: a key
    read from the backend is kept only on its second miss within the ghost
    filter's memory (saves a remaining-TTL call per one-off read).
    ``quarantine``: seconds fills of a key stay blocked after a failed write.
    ``workers``: how many processes share the memory budget (``resize``).
    ``clock`` / ``wall`` / ``later``: monotonic time, Unix time, and
    ``gevent.spawn_later`` (a delayed flush), injected by tests.
    """

    def __init__(
        self,
        inner: Backend,
        memory: MemoryTier,
        *,
        memory_ttl: float = 0.0,
        disk: DiskTier | None = None,
        disk_ttl: float = 0.0,
        default_ttl: float | None = None,
        max_ttl: float | None = None,
        keeps_flags: bool = True,
        ttl_lookup: Callable[[Sequence[bytes]], Mapping[bytes, float | None]] | None = None,
        use_remaining_ttl: bool = True,
        second_miss: bool = True,
        quarantine: float = 5.0,
        workers: int = 1,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        later: Callable[[float, Callable[[], None]], Any] = gevent.spawn_later,
    ) -> None:
        self.inner = inner
        self.kind: str = inner.kind
        self.max_batch_keys: int = inner.max_batch_keys
        #: calls wait on I/O: dispatch runs a read's commands concurrently
        self.blocking: bool = bool(getattr(inner, "blocking", True)) or disk is not None
        self.memory = memory
        self.disk = disk
        self._memory_ttl = memory_ttl
        self._disk_ttl = disk_ttl
        self._default_ttl = default_ttl
        self._max_ttl = max_ttl
        self._keeps_flags = keeps_flags
        if ttl_lookup is None and use_remaining_ttl:
            ttl_lookup = getattr(inner, "remaining_ttl", None)
        self._ttl_lookup = ttl_lookup
        self._second_miss = second_miss
        self._quarantine_seconds = quarantine
        self._workers = max(1, workers)
        self._clock = clock
        self._wall = wall
        self._later = later
        self._peers: Callable[[PeerMessage], None] | None = None
        # per-key state (see the module doc)
        self._seq = 0
        self._invalidated: dict[bytes, int] = {}
        self._prune_at = 1024
        self._cleared = 0
        self._pending: dict[bytes, int] = {}
        self._quarantined: dict[bytes, float] = {}
        self._flights: dict[bytes, _Flight] = {}
        self._read_ids = itertools.count(1)
        self._reads: dict[int, int] = {}
        self._fills: dict[bytes, tuple[Item, int, float]] = {}
        self._filler: gevent.Greenlet | None = None
        self._flush_timer: Any = None
        self._closed = False
        # counters (stats)
        self.fills = 0
        self.ttl_lookups = 0
        self.ttl_lookup_errors = 0
        self.dropped_fills = 0

    def __repr__(self) -> str:
        return f"TieredBackend({self.inner!r}, memory={self.memory.max_bytes}, disk={self.disk is not None})"

    def set_peers(self, peers: Callable[[PeerMessage], None] | None) -> None:
        """How the other worker processes are told to drop copies: ``peers(message)``
        returns once every other worker has applied ``message`` (:meth:`apply_remote`),
        and raises when that cannot be confirmed."""
        self._peers = peers

    # -- reads -------------------------------------------------------------------------

    def get_many(self, keys: Sequence[bytes], with_cas: bool = False) -> dict[bytes, Item]:
        now = self._clock()
        get = self.memory.get
        found: dict[bytes, Item] = {}
        need: list[bytes] | None = None
        for key in keys:
            item = get(key, now)
            if item is not None:
                found[key] = item
            elif need is None:
                need = [key]
            else:
                need.append(key)
        if need is None:
            ANSWERED_BY.set(MEMORY)
            return found
        ANSWERED_BY.set(self._fetch(need, found))
        return found

    def _fetch(self, need: list[bytes], found: dict[bytes, Item]) -> str:
        """Read ``need`` (missed by the memory tier) from the disk tier, then the backend,
        into ``found``; returns the deepest tier that answered."""
        need = list(dict.fromkeys(need))
        start = self._seq
        read = self._begin_read(start)
        try:
            tier = MEMORY
            if self.disk is not None:
                tier = DISK
                hits = self.disk.get_many(need)
                if hits:
                    self._promote(hits, start)
                    for key, (item, _) in hits.items():
                        found[key] = item
                    need = [key for key in need if key not in hits]
            if need:
                tier = BACKEND
                self._from_backend(need, found, start)
            return tier
        finally:
            self._reads.pop(read, None)

    def _promote(self, hits: Mapping[bytes, tuple[Item, float]], start: int) -> None:
        now, wall = self._clock(), self._wall()
        for key, (item, expires) in hits.items():
            if self._fill_ok(key, start, now):
                exp = now + (expires - wall) if expires != math.inf else math.inf
                if self._memory_ttl:
                    exp = min(exp, now + self._memory_ttl)
                if exp > now:
                    self.memory.put(key, item, exp, now)

    def _from_backend(self, need: list[bytes], found: dict[bytes, Item], start: int) -> None:
        flights = self._flights
        own: list[bytes] = []
        waits: list[tuple[bytes, _Flight]] = []
        for key in need:
            flight = flights.get(key)
            if flight is None:
                own.append(key)
            else:
                waits.append((key, flight))
        if own:
            flight = _Flight()
            for key in own:
                flights[key] = flight
            read_at = self._clock()
            try:
                got = self.inner.get_many(own, True)
            except BaseException as err:
                flight.set_exception(err if isinstance(err, BackendError) else BackendError("internal", "the shared read was interrupted"))
                raise
            finally:
                for key in own:
                    if flights.get(key) is flight:
                        del flights[key]
            flight.set(got)
            found.update(got)
            if got:
                self._want_fills(got, start, read_at)
        for key, flight in waits:
            item = cast("dict[bytes, Item]", flight.get()).get(key)
            if item is not None:
                found[key] = item

    def touch_many(self, keys: Sequence[bytes], exptime: int, with_cas: bool = False) -> dict[bytes, Item]:
        unique = tuple(dict.fromkeys(keys))

        def install(found: dict[bytes, Item], at: float) -> dict[bytes, tuple[Item, float]]:
            exp = self._item_expiry(exptime, at)
            if exp is None:
                return {}
            return {key: (item, exp) for key, item in found.items()}

        result: dict[bytes, Item] = self._write(
            unique, lambda: self.inner.touch_many(keys, exptime, True), install, changed=bool
        )
        return result

    def meta_get(self, key: bytes, request: MetaGet) -> MetaItem | None:
        """Served by the tiers when it asks nothing but the item (``mg`` with ``v f k c s O
        q b``); a touch or vivify is a write; any other flag reads the backend."""
        if request == _PLAIN_GET:
            item = self.get_many((key,), True).get(key)
            return None if item is None else MetaItem(item.value, item.flags, item.cas, binary_key=None)
        if request.touch is not None or request.vivify is not None:
            result: MetaItem | None = self._write((key,), lambda: self.inner.meta_get(key, request))
            return result
        ANSWERED_BY.set(BACKEND)
        return self.inner.meta_get(key, request)

    # -- writes ------------------------------------------------------------------------

    def store(
        self, mode: StoreMode, key: bytes, value: bytes, flags: int, exptime: int, cas_unique: int = 0
    ) -> StoreResult:
        if mode not in _INSTALLED_MODES:  # append/prepend: the new value is not known here
            result: StoreResult = self._write(
                (key,), lambda: self.inner.store(mode, key, value, flags, exptime, cas_unique), changed=_stored
            )
            return result
        request = MetaStore(
            mode=mode, flags=flags, exptime=exptime, compare_cas=cas_unique if mode is StoreMode.CAS else None, with_cas=True
        )
        stored, _ = self._meta_store(key, value, request)
        return stored

    def meta_store(self, key: bytes, value: bytes, request: MetaStore) -> tuple[StoreResult, int]:
        if request.mode not in _INSTALLED_MODES or request.invalidate:
            result: tuple[StoreResult, int] = self._write(
                (key,), lambda: self.inner.meta_store(key, value, request), changed=lambda r: _stored(r[0])
            )
            return result
        if not request.with_cas:  # the CAS unique of what is stored: to keep the copy
            request = MetaStore(
                request.mode, request.flags, request.exptime, request.compare_cas, request.invalidate,
                request.binary_key, with_cas=True,
            )  # fmt: skip
        return self._meta_store(key, value, request)

    def _meta_store(self, key: bytes, value: bytes, request: MetaStore) -> tuple[StoreResult, int]:
        def install(result: tuple[StoreResult, int], at: float) -> dict[bytes, tuple[Item, float]]:
            stored, cas = result
            exp = self._item_expiry(request.exptime, at)
            if stored is not StoreResult.STORED or not cas or exp is None:
                return {}
            return {key: (Item(value, request.flags if self._keeps_flags else 0, cas), exp)}

        result: tuple[StoreResult, int] = self._write(
            (key,), lambda: self.inner.meta_store(key, value, request), install, changed=lambda r: _stored(r[0])
        )
        return result

    def delete(self, key: bytes) -> bool:
        result: bool = self._write((key,), lambda: self.inner.delete(key), changed=bool)
        return result

    def incr_decr(self, key: bytes, delta: int, incr: bool) -> int | None:
        result: int | None = self._write(
            (key,), lambda: self.inner.incr_decr(key, delta, incr), changed=lambda r: r is not None
        )
        return result

    def touch(self, key: bytes, exptime: int) -> bool:
        result: bool = self._write((key,), lambda: self.inner.touch(key, exptime), changed=bool)
        return result

    def meta_delete(self, key: bytes, request: MetaDelete) -> MetaStatus:
        result: MetaStatus = self._write(
            (key,), lambda: self.inner.meta_delete(key, request), changed=lambda r: r is MetaStatus.DONE
        )
        return result

    def meta_arith(self, key: bytes, request: MetaArith) -> MetaArithResult:
        result: MetaArithResult = self._write(
            (key,), lambda: self.inner.meta_arith(key, request), changed=lambda r: r.status is MetaStatus.DONE
        )
        return result

    def flush_all(self, delay: int = 0) -> None:
        """The backend's flush, then the tiers' (now, or at the same moment as the
        backend's delayed one), here and in the other workers."""
        ANSWERED_BY.set(BACKEND)
        seconds = ttl_seconds(delay, self._wall())
        at = 0.0 if seconds is None or seconds <= 0 else self._wall() + seconds
        try:
            self.inner.flush_all(delay)
        except FlushDisabled:
            raise
        except BaseException:
            self._flush_local(at)  # it may have happened
            self._tell_peers_quietly(("flush", at))
            raise
        self._flush_local(at)
        self._tell_peers(("flush", at))

    def resize(self, max_bytes: int) -> bool:
        """``cache_memlimit``: the memory tier's budget (the whole proxy's, shared by the
        workers), evicting down to it at once, here and in the other workers."""
        share = max_bytes // self._workers
        if share < MIN_MEMORY_BYTES:
            return False
        self.memory.resize(share)
        self._tell_peers(("resize", share))
        return True

    # -- the write protocol ------------------------------------------------------------

    def _write(
        self,
        keys: Sequence[bytes],
        call: Callable[[], Any],
        install: Callable[[Any, float], dict[bytes, tuple[Item, float]]] | None = None,
        changed: Callable[[Any], bool] | None = None,
    ) -> Any:
        """Run ``call`` (the backend's write of ``keys``) under the write protocol (module
        doc). ``install(result, at)``: the copies to keep, as (item, monotonic expiry of the
        item itself), ``at`` being when the write started; ``changed(result)``: False when
        the result says the backend changed nothing (the other workers are then not told)."""
        ANSWERED_BY.set(BACKEND)
        at = self._clock()
        marks = self._begin(keys)
        try:
            result = call()
        except _DEFINITE:
            self._end(keys, marks, {}, failed=False)
            self._tell_peers_quietly(("inv", tuple(keys), 0.0))
            raise
        except BaseException:
            self._end(keys, marks, {}, failed=True)
            self._tell_peers_quietly(("inv", tuple(keys), self._quarantine_seconds))
            raise
        copies = install(result, at) if install is not None else {}
        self._end(keys, marks, copies, failed=False)
        if changed is None or changed(result):
            self._tell_peers(("inv", tuple(keys), 0.0))
        return result

    def _begin(self, keys: Sequence[bytes]) -> list[int]:
        """A write of ``keys`` starts: fills and disk reads blocked (the memory copy stays).
        Returns each key's invalidation mark (to tell, at the end, whether anything
        else invalidated it meanwhile)."""
        pending = self._pending
        marks = []
        for key in keys:
            pending[key] = pending.get(key, 0) + 1
            self._invalidate(key, memory=False, disk=False)
            if self.disk is not None:
                self.disk.hold(key)
            marks.append(self._seq)
        return marks

    def _end(
        self, keys: Sequence[bytes], marks: list[int], copies: Mapping[bytes, tuple[Item, float]], failed: bool
    ) -> None:
        """The write's outcome is known: keep the copies given (unless another write or
        invalidation of the key overlapped this one, or it is quarantined), block fills
        that read before now, quarantine the keys of a failed write."""
        pending = self._pending
        now = self._clock()
        for key, mark in zip(keys, marks):
            n = pending[key] - 1
            if n:
                pending[key] = n
            else:
                del pending[key]
            alone = not n and self._invalidated.get(key) == mark and not self._quarantined_now(key, now)
            copy = copies.get(key) if alone else None
            self._invalidate(key, memory=copy is None, disk=False)
            disk_copy = None
            if failed:
                self._quarantined[key] = now + self._quarantine_seconds
            elif copy is not None:
                disk_copy = self._keep(key, copy[0], copy[1], now, now)
            if self.disk is not None:
                self.disk.release(key, disk_copy)

    def _invalidate(self, key: bytes, memory: bool = True, disk: bool = True) -> None:
        """Reject fills that read the key before now, let no later read join a read of it
        from before now, and drop its copies (``memory``, ``disk``)."""
        self._seq += 1
        self._invalidated[key] = self._seq
        self._flights.pop(key, None)
        if memory:
            self.memory.drop(key)
        if disk and self.disk is not None:
            self.disk.delete(key)
        if len(self._invalidated) > self._prune_at:
            self._prune()

    def _prune(self) -> None:
        """Forget invalidations older than every read in flight (they reject nothing more)."""
        oldest = min(self._reads.values(), default=self._seq)
        pending = self._pending  # a write in flight compares its mark at the end
        self._invalidated = {key: seq for key, seq in self._invalidated.items() if seq > oldest or key in pending}
        now = self._clock()
        self._quarantined = {key: until for key, until in self._quarantined.items() if until > now}
        self._prune_at = max(1024, 2 * len(self._invalidated))

    def _quarantined_now(self, key: bytes, now: float) -> bool:
        until = self._quarantined.get(key)
        if until is None:
            return False
        if until > now:
            return True
        del self._quarantined[key]
        return False

    def _fill_ok(self, key: bytes, start: int, now: float) -> bool:
        """Whether a copy read when the sequence was at ``start`` may be kept now."""
        return (
            key not in self._pending
            and self._invalidated.get(key, 0) <= start
            and self._cleared <= start
            and not self._quarantined_now(key, now)
        )

    def _begin_read(self, start: int) -> int:
        read = next(self._read_ids)
        self._reads[read] = start
        return read

    # -- keeping copies ----------------------------------------------------------------

    def _item_expiry(self, exptime: int, at: float) -> float | None:
        """Monotonic expiry of an item the backend took with ``exptime`` at ``at`` (before
        the call: never later than the backend's own); None when already expired."""
        seconds = ttl_seconds(exptime, self._wall())
        if seconds is None:
            seconds = self._default_ttl
            if seconds is None:
                return math.inf
        elif seconds <= 0:
            return None
        if self._max_ttl is not None:
            seconds = min(seconds, self._max_ttl)
        return at + seconds

    def _keep(self, key: bytes, item: Item, expires: float, known_at: float, now: float) -> tuple[Item, float] | None:
        """Keep a copy in memory, valid since ``known_at``, expiring with the item at
        ``expires`` (monotonic) or with the tier's TTL; returns the disk copy to write
        (item, Unix expiry), or None."""
        exp = expires
        if self._memory_ttl:
            exp = min(exp, known_at + self._memory_ttl)
        if exp > now:
            self.memory.put(key, item, exp, now)  # in place when held: its queue and frequency stay
        else:
            self.memory.drop(key)
        if self.disk is None:
            return None
        exp = expires
        if self._disk_ttl:
            exp = min(exp, known_at + self._disk_ttl)
        if exp <= now:
            return None
        return item, (self._wall() + (exp - now)) if exp != math.inf else math.inf

    def _want_fills(self, got: Mapping[bytes, Item], start: int, read_at: float) -> None:
        """Backend hits to keep, once their remaining TTL is known (after the answer)."""
        if self._ttl_lookup is None:
            return
        fills = self._fills
        memory = self.memory
        for key, item in got.items():
            if self._second_miss and not memory.seen(key):
                memory.remember(key)  # kept on its next miss, if it comes soon
                continue
            if len(fills) >= MAX_PENDING_FILLS:
                self.dropped_fills += 1
                continue
            fills[key] = (item, start, read_at)
        if fills and self._filler is None and not self._closed:
            self._filler = gevent.spawn(self._fill)

    def _fill(self) -> None:
        """Ask the remaining TTL of the waiting fills, a batch per call, and keep those
        no write or invalidation overtook."""
        fills = self._fills
        try:
            while fills and not self._closed:
                keys = list(itertools.islice(fills, FILL_BATCH))
                batch = [(key, *fills.pop(key)) for key in keys]
                read = self._begin_read(min(start for _, _, start, _ in batch))
                asked = self._clock()
                try:
                    self.ttl_lookups += 1
                    assert self._ttl_lookup is not None
                    ttls = self._ttl_lookup(keys)
                except Exception as err:  # BackendError and the like: the copies are not kept
                    self.ttl_lookup_errors += 1
                    log.debug("remaining TTL of %d keys: %s", len(keys), err)
                    continue
                finally:
                    self._reads.pop(read, None)
                now = self._clock()
                for key, item, start, read_at in batch:
                    if key not in ttls or not self._fill_ok(key, start, now):
                        continue
                    seconds = ttls[key]
                    expires = math.inf if seconds is None else asked + seconds
                    disk_copy = self._keep(key, item, expires, read_at, now)
                    self.fills += 1
                    if disk_copy is not None and self.disk is not None:
                        self.disk.put(key, *disk_copy)
        finally:
            self._filler = None

    # -- flush, peers ------------------------------------------------------------------

    def _flush_local(self, at: float) -> None:
        """Drop every copy now (``at`` 0) or at Unix time ``at`` (replacing a pending one)."""
        timer, self._flush_timer = self._flush_timer, None
        if timer is not None:
            timer.kill(block=False)
        delay = at - self._wall() if at else 0.0
        if delay <= 0:
            self._clear()
        else:
            self._flush_timer = self._later(delay, self._clear)

    def _clear(self) -> None:
        self._seq += 1
        self._cleared = self._seq
        self.memory.clear()
        self._flights.clear()
        self._fills.clear()
        if self.disk is not None:
            self.disk.clear()

    def apply_remote(self, message: PeerMessage) -> None:
        """A message of another worker (:meth:`set_peers`)."""
        kind = message[0]
        if kind == "inv":
            _, keys, quarantine = message
            now = self._clock()
            for key in keys:
                self._invalidate(key)
                if quarantine:
                    self._quarantined[key] = now + quarantine
        elif kind == "flush":
            self._flush_local(message[1])
        elif kind == "resize":
            self.memory.resize(message[1])
        else:
            raise ValueError(f"unknown tier message {kind!r}")

    def _tell_peers(self, message: PeerMessage) -> None:
        peers = self._peers
        if peers is None:
            return
        try:
            peers(message)
        except Exception as err:
            raise BackendError(
                "invalidation",
                f"the other workers did not confirm dropping their copies ({err}); the write was applied",
            ) from err

    def _tell_peers_quietly(self, message: PeerMessage) -> None:
        """As :meth:`_tell_peers`, when the write failed already (its error is the answer)."""
        try:
            self._tell_peers(message)
        except BackendError as err:
            log.warning("%s", err)

    # -- the rest ----------------------------------------------------------------------

    def stored_cas(self, value: bytes, flags: int) -> int:
        """The backend's: a copy shows the unique the backend answered."""
        return self.inner.stored_cas(value, flags)

    def remaining_ttl(self, keys: Sequence[bytes]) -> dict[bytes, float | None]:
        lookup = self._ttl_lookup
        return dict(lookup(keys)) if lookup is not None else {}

    def stats(self) -> dict[str, int]:
        out = dict(self.inner.stats())
        memory = self.memory
        out.update(
            memory_cache_hits=memory.hits,
            memory_cache_misses=memory.misses,
            memory_cache_evictions=memory.evictions,
            memory_cache_fills=self.fills,
            memory_cache_ttl_lookups=self.ttl_lookups,
            memory_cache_items=memory.items,
            memory_cache_bytes=memory.used_bytes,
            memory_cache_limit_bytes=memory.max_bytes,
        )
        disk = self.disk
        if disk is not None:
            out.update(
                disk_cache_hits=disk.hits,
                disk_cache_misses=disk.misses,
                disk_cache_evictions=disk.evictions,
                disk_cache_corrupt=disk.corrupt,
                disk_cache_timeouts=disk.timeouts,
                disk_cache_dropped_writes=disk.dropped_writes,
                disk_cache_errors=disk.errors,
                disk_cache_items=disk.items,
                disk_cache_bytes=disk.used_bytes,
                disk_cache_limit_bytes=disk.max_bytes,
            )
        return out

    def close(self) -> None:
        """Stop the fills and the delayed flush, write out and close the disk tier, close the backend."""
        if self._closed:
            return
        self._closed = True
        for greenlet in (self._filler, self._flush_timer):
            if greenlet is not None:
                greenlet.kill(block=False)
        self._flush_timer = None
        try:
            if self.disk is not None:
                self.disk.close()
        finally:
            self.inner.close()


def _stored(result: StoreResult) -> bool:
    return result is StoreResult.STORED
