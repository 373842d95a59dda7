"""MigratingBackend: a cache moving from a legacy memcached fleet to Momento.

``inner`` is the cache's own backend (Momento, or the local tiers in front of
it); ``legacy`` the servers it migrates from (:class:`~.legacy.LegacyClient`,
or anything with its methods). Three modes (``docs/migration.md``):

``dual_write``
    Reads are answered by the legacy servers (CAS uniques are theirs). Every
    write goes to them first (their answer is the client's), then to Momento:
    a stored set/add/replace/cas is set there too, a touch touched, a delete
    deleted; an append, prepend, incr or decr drops Momento's copy (warmup
    fills it again). A failed Momento write is counted, not answered, and the
    key's Momento copy is dropped if it can be.
``shadow``
    As ``dual_write``, and a sampled share (``shadow_rate``) of the reads is
    also read from Momento, after the answer: differences are counted.
``warmup``
    Reads go to Momento; the keys it misses are read from the legacy servers
    and answered from there, and each hit is copied into Momento (a backfill)
    with its flags and remaining TTL, with add-if-absent semantics, after the
    answer (gets and meta gets: before it, so that the CAS unique answered is
    Momento's). Writes invalidate the legacy copy (delete) and then write
    Momento, so that no later miss can bring back a value older than the write;
    a write whose outcome depends on the current item (add, replace, append,
    prepend, cas, incr, decr, touch, gat) first copies the legacy item into
    Momento if Momento lacks it.

Why a backfill never overwrites a write (the write wins):

* in this process, a write marks its keys before anything else; a backfill
  that has not started its add yet is dropped, and the write waits for one that
  has (its add lands before the write's calls start);
* against a write through another process (worker or proxy), which deletes
  the legacy copy before it writes Momento: the backfill reads the legacy item
  again after its add; when the item is gone or changed (a write's delete came
  between), the backfill deletes what it added, if Momento still holds that
  value. When it is unchanged, the write's legacy delete, and so its Momento
  write, came after the add.

``flush_all`` flushes Momento, and the legacy servers only with
``flush_legacy`` (``migration_flush_legacy``): their items then stay readable
through warmup misses.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from typing import Any, Callable, Mapping, Protocol, Sequence

import gevent
from gevent.event import Event

from mproxy.backends.base import (
    ANSWERED_BY,
    REALTIME_MAXDELTA,
    Backend,
    BackendError,
    Item,
    MetaArith,
    MetaArithResult,
    MetaDelete,
    MetaGet,
    MetaItem,
    MetaStatus,
    MetaStore,
    MetaUnsupported,
    StoreResult,
    ValueTooLarge,
)
from mproxy.backends.migrate.legacy import LegacyItem
from mproxy.protocol.commands import StoreMode

log = logging.getLogger(__name__)

WARMUP, DUAL_WRITE, SHADOW = "warmup", "dual_write", "shadow"
#: The values of ``migration_mode``.
MODES = (WARMUP, DUAL_WRITE, SHADOW)

#: What :data:`~mproxy.backends.base.ANSWERED_BY` says of a read the legacy servers answered.
LEGACY = "legacy"

#: Backfills waiting past which new ones are dropped (counted).
MAX_PENDING_BACKFILLS = 8192
#: Keys one backfill batch handles (one legacy read to verify them).
BACKFILL_BATCH = 64
#: Keys remembered as gone from the legacy servers (warmup asks no more about them).
MAX_GONE_KEYS = 65536
#: Shadow reads of Momento under way past which reads are not sampled.
MAX_SHADOW_READS = 64
#: Width in seconds of a bucket of the read window (``stats migration``).
WINDOW_SECONDS = 10
#: Buckets kept: 15 minutes.
WINDOW_BUCKETS = 90

_PLAIN_GET = MetaGet()
_WITH_TTL_GET = MetaGet(with_ttl=True)


class Legacy(Protocol):
    """What the migration needs of the legacy servers (:class:`~.legacy.LegacyClient`)."""

    timeout: float

    def get_many(self, keys: Sequence[bytes], failed: list[bytes] | None = None) -> dict[bytes, LegacyItem]: ...

    def delete(self, key: bytes) -> bool: ...

    def store(self, mode: StoreMode, key: bytes, value: bytes, flags: int, exptime: int, cas_unique: int = 0) -> StoreResult: ...

    def incr_decr(self, key: bytes, delta: int, incr: bool) -> int | None: ...

    def touch(self, key: bytes, exptime: int) -> bool: ...

    def flush_all(self, delay: int = 0) -> None: ...

    def close(self) -> None: ...


def backfill_exptime(ttl: int | None) -> int | None:
    """The exptime a backfill gives Momento for a legacy item with ``ttl`` seconds left:
    0 (the cache's default TTL) when it is not known or the item never expires; one
    second less than the legacy server says (its clock ticks once a second, so its
    remaining TTL may be up to a second long); None when it expires within 1 s."""
    if ttl is None or ttl < 0:
        return 0
    if ttl <= 1:
        return None
    return min(ttl - 1, REALTIME_MAXDELTA)


class ReadWindow:
    """Reads by who answered them, in :data:`WINDOW_SECONDS` buckets of Unix time (so
    that the buckets of several workers add up)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._buckets: dict[int, list[int]] = {}

    def add(self, momento: int, legacy: int, misses: int) -> None:
        start = int(self._clock()) // WINDOW_SECONDS * WINDOW_SECONDS
        bucket = self._buckets.get(start)
        if bucket is None:
            bucket = self._buckets[start] = [0, 0, 0]
            oldest = start - WINDOW_SECONDS * WINDOW_BUCKETS
            for old in [s for s in self._buckets if s <= oldest]:
                del self._buckets[old]
        bucket[0] += momento
        bucket[1] += legacy
        bucket[2] += misses

    def export(self) -> list[list[int]]:
        """``[start, momento, legacy, misses]`` per bucket, oldest first."""
        return [[start, *counts] for start, counts in sorted(self._buckets.items())]


class MigratingBackend:
    """:class:`~mproxy.backends.base.Backend` migrating ``inner`` from ``legacy`` (module doc).

    ``default_ttl`` and ``max_ttl`` are those of ``inner`` (a legacy item without a
    known TTL gets ``default_ttl``). ``shadow_rate``: the share of reads compared in
    ``shadow`` mode. ``clock`` (Unix time), ``sample`` (``random.random``) and ``spawn``
    (``gevent.spawn``) are injected by tests."""

    #: The other workers' messages of local tiers in ``inner`` (see ``TieredBackend``), when it has them.
    set_peers: Callable[[Any], None]
    apply_remote: Callable[[Any], None]

    def __init__(
        self,
        inner: Backend,
        legacy: Legacy,
        mode: str = WARMUP,
        *,
        shadow_rate: float = 0.0,
        flush_legacy: bool = False,
        clock: Callable[[], float] = time.time,
        sample: Callable[[], float] = random.random,
        spawn: Callable[..., Any] = gevent.spawn,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown migration_mode {mode!r}; expected one of {', '.join(MODES)}")
        self.inner = inner
        self.legacy = legacy
        self.mode = mode
        self.kind: str = inner.kind
        self.max_batch_keys: int = inner.max_batch_keys
        self.blocking = True
        self._shadow_rate = shadow_rate
        self._flush_legacy = flush_legacy
        self._sample = sample
        self._spawn = spawn
        self.window = ReadWindow(clock)
        for name in ("set_peers", "apply_remote"):
            method = getattr(inner, name, None)
            if callable(method):
                setattr(self, name, method)
        # warmup: per-key state (module doc)
        self._seq = 0
        self._written: dict[bytes, int] = {}
        self._prune_at = 4096
        self._cleared = 0
        #: legacy reads under way: the keys they ask
        self._reads: dict[int, list[bytes]] = {}
        self._read_ids = itertools.count()
        self._writing: dict[bytes, int] = {}
        self._filling: dict[bytes, Event] = {}
        self._pending: dict[bytes, tuple[LegacyItem, int]] = {}
        self._filler: Any = None
        self._comparing = 0
        #: keys known absent from the legacy servers, oldest first (warmup)
        self._gone: dict[bytes, None] = {}
        self._closed = False
        # counters (stats)
        self.reads_momento = 0
        self.reads_legacy = 0
        self.read_misses = 0
        self.backfills = 0
        self.backfill_races = 0
        self.backfill_undone = 0
        self.backfill_errors = 0
        self.backfills_dropped = 0
        self.invalidations = 0
        self.shadow_reads = 0
        self.shadow_mismatches = 0
        self.shadow_momento_misses = 0
        self.momento_write_errors = 0
        self.legacy_errors = 0

    def __repr__(self) -> str:
        return f"MigratingBackend({self.inner!r}, {self.legacy!r}, {self.mode})"

    # -- reads -------------------------------------------------------------------------

    def get_many(self, keys: Sequence[bytes], with_cas: bool = False) -> dict[bytes, Item]:
        if self.mode != WARMUP:
            return self._legacy_read(keys)
        found = self.inner.get_many(keys, with_cas)
        unique = dict.fromkeys(keys)
        missing = [key for key in unique if key not in found]
        momento = len(unique) - len(missing)
        if not missing:
            self._count(momento, 0, 0)
            return found
        got = self._legacy_get(missing, self._seq)
        if got:
            ANSWERED_BY.set(LEGACY)
            if with_cas:  # the CAS unique a later cas compares must be Momento's
                self._backfill(got)
                again = self._quiet(lambda: self.inner.get_many(list(got), True)) or {}
            else:
                again = {}
                self._queue(got)
            for key, (legacy_item, _) in got.items():
                found[key] = again.get(key) or Item(legacy_item.value, legacy_item.flags, 0)
        self._count(momento, len(got), len(missing) - len(got))
        return found

    def _legacy_get(self, keys: list[bytes], start: int) -> dict[bytes, tuple[LegacyItem, int]]:
        """Warmup's read of the keys Momento missed, but those known gone from the legacy
        servers: legacy failures are misses (counted)."""
        gone = self._gone
        ask = [key for key in keys if key not in gone]
        if not ask:
            return {}
        failed: list[bytes] = []
        read = next(self._read_ids)
        self._reads[read] = ask
        try:
            got = self.legacy.get_many(ask, failed)
        except BackendError as err:
            self.legacy_errors += 1
            log.debug("legacy read of %d keys: %s", len(ask), err)
            return {}
        finally:
            del self._reads[read]
        if failed:
            self.legacy_errors += 1
        unanswered = set(failed)
        for key in ask:
            if key not in got and key not in unanswered:
                self._mark_gone(key)
        return {key: (item, start) for key, item in got.items()}

    def _mark_gone(self, key: bytes) -> None:
        """The legacy servers do not hold ``key`` and, in warmup, will not again (only
        mproxy writes, and it writes Momento): no more legacy requests for it."""
        gone = self._gone
        gone[key] = None
        if len(gone) > MAX_GONE_KEYS:
            del gone[next(iter(gone))]

    def _legacy_read(self, keys: Sequence[bytes]) -> dict[bytes, Item]:
        """dual_write and shadow: the legacy servers answer (their failure is the read's)."""
        try:
            got = self.legacy.get_many(keys)
        except BackendError:
            self.legacy_errors += 1
            raise
        ANSWERED_BY.set(LEGACY)
        unique = list(dict.fromkeys(keys))
        self._count(0, len(got), len(unique) - len(got))
        if (
            self.mode == SHADOW
            and self._shadow_rate > 0
            and self._comparing < MAX_SHADOW_READS
            and self._sample() < self._shadow_rate
        ):
            self._comparing += 1
            self._spawn(self._compare, unique, got)
        return {key: Item(item.value, item.flags, item.cas) for key, item in got.items()}

    def _compare(self, keys: list[bytes], legacy: Mapping[bytes, LegacyItem]) -> None:
        """shadow: read ``keys`` from Momento and count the differences from ``legacy``."""
        try:
            momento = self.inner.get_many(keys, False)
        except Exception as err:  # BackendError and the like: nothing compared
            log.debug("shadow read of %d keys: %s", len(keys), err)
            return
        finally:
            self._comparing -= 1
        for key in keys:
            self.shadow_reads += 1
            ours, theirs = momento.get(key), legacy.get(key)
            if ours is None and theirs is None:
                continue
            if ours is None:
                self.shadow_momento_misses += 1
            elif theirs is None or ours.value != theirs.value or ours.flags != theirs.flags:
                self.shadow_mismatches += 1

    def _count(self, momento: int, legacy: int, misses: int) -> None:
        self.reads_momento += momento
        self.reads_legacy += legacy
        self.read_misses += misses
        self.window.add(momento, legacy, misses)

    def touch_many(self, keys: Sequence[bytes], exptime: int, with_cas: bool = False) -> dict[bytes, Item]:
        unique = list(dict.fromkeys(keys))
        if self.mode == WARMUP:
            result: dict[bytes, Item] = self._write(unique, lambda: self.inner.touch_many(keys, exptime, with_cas), True)
            return result
        touched = [key for key in unique if self._legacy_touch(key, exptime)]
        found = self._legacy_read(touched) if touched else {}
        self._mirror(unique, lambda: self.inner.touch_many(touched, exptime, False) if touched else None)
        return found

    def _legacy_touch(self, key: bytes, exptime: int) -> bool:
        touched: bool = self._legacy_call(lambda: self.legacy.touch(key, exptime))
        return touched

    def meta_get(self, key: bytes, request: MetaGet) -> MetaItem | None:
        if self.mode != WARMUP:
            if request not in (_PLAIN_GET, _WITH_TTL_GET):
                raise MetaUnsupported(f"this meta get while migrating in {self.mode} mode (only plain gets and t)")
            try:
                item = self.legacy.get_many([key]).get(key)
            except BackendError:
                self.legacy_errors += 1
                raise
            ANSWERED_BY.set(LEGACY)
            self._count(0, item is not None, item is None)
            if item is None:
                return None
            ttl = item.ttl if request.with_ttl else None
            if request.with_ttl and ttl is None:
                raise MetaUnsupported("remaining TTL: the legacy server does not speak meta")
            return MetaItem(item.value, item.flags, item.cas, ttl=ttl, new_ttl=ttl, binary_key=None)
        if request.touch is not None or request.vivify is not None:
            result: MetaItem | None = self._write((key,), lambda: self.inner.meta_get(key, request), True)
            return result
        found = self.inner.meta_get(key, request)
        if found is not None:
            self._count(1, 0, 0)
            return found
        got = self._legacy_get([key], self._seq)
        if not got:
            self._count(0, 0, 1)
            return None
        ANSWERED_BY.set(LEGACY)
        self._count(0, 1, 0)
        self._backfill(got)
        again = self._quiet(lambda: self.inner.meta_get(key, request))
        if again is not None:
            return again  # type: ignore[no-any-return]
        legacy_item = got[key][0]
        return MetaItem(legacy_item.value, legacy_item.flags, 0, binary_key=None)

    # -- backfills (warmup) --------------------------------------------------------------

    def _fill_ok(self, key: bytes, start: int) -> bool:
        """Whether an item read from the legacy server when the sequence was at ``start``
        may still be added to Momento: no write of the key began since (nor a flush)."""
        return key not in self._writing and self._written.get(key, 0) <= start and self._cleared <= start

    def _queue(self, got: Mapping[bytes, tuple[LegacyItem, int]]) -> None:
        pending = self._pending
        for key, entry in got.items():
            if len(pending) >= MAX_PENDING_BACKFILLS:
                self.backfills_dropped += 1
                continue
            pending[key] = entry
        if pending and self._filler is None and not self._closed:
            self._filler = self._spawn(self._drain)

    def _drain(self) -> None:
        pending = self._pending
        try:
            while pending and not self._closed:
                batch = {}
                for key in list(pending)[:BACKFILL_BATCH]:
                    batch[key] = pending.pop(key)
                self._backfill(batch)
        finally:
            self._filler = None

    def _backfill(self, batch: Mapping[bytes, tuple[LegacyItem, int]]) -> None:
        """Add the legacy items of ``batch`` to Momento (if absent), concurrently, then
        verify them (module doc). Writes of these keys in this process wait until then."""
        events: dict[bytes, Event] = {}
        todo: list[tuple[bytes, LegacyItem, int]] = []
        for key, (item, start) in batch.items():  # no yield in this loop: see _write
            exptime = backfill_exptime(item.ttl)
            if exptime is None or key in self._filling:
                continue
            if not self._fill_ok(key, start):
                self.backfill_races += 1
                continue
            events[key] = self._filling[key] = Event()
            todo.append((key, item, exptime))
        try:
            if not todo:
                return
            if len(todo) == 1:
                results = [self._add(*todo[0])]
            else:
                jobs = [gevent.spawn(self._add, *entry) for entry in todo]
                gevent.joinall(jobs)
                results = [job.value for job in jobs]
            added: dict[bytes, LegacyItem] = {}
            for (key, item, _), stored in zip(todo, results):
                if stored is StoreResult.STORED:
                    added[key] = item
                elif stored is not None:
                    self.backfill_races += 1  # Momento had it: a write (or another backfill) came first
            if added:
                self._verify(added)
        finally:
            for key, event in events.items():
                if self._filling.get(key) is event:
                    del self._filling[key]
                event.set()

    def _add(self, key: bytes, item: LegacyItem, exptime: int) -> StoreResult | None:
        """One backfill's add; None when it failed (counted) or does not fit."""
        try:
            return self.inner.store(StoreMode.ADD, key, item.value, item.flags, exptime)
        except ValueTooLarge:
            return None
        except Exception as err:  # BackendError and the like: not backfilled
            self.backfill_errors += 1
            log.debug("backfill: %s", err)
            return None

    def _verify(self, added: Mapping[bytes, LegacyItem]) -> None:
        """Undo the backfills whose legacy item changed or went since it was read."""
        try:
            now = self.legacy.get_many(list(added))
        except BackendError as err:
            self.legacy_errors += 1
            log.debug("backfill check of %d keys: %s", len(added), err)
            now = {}  # not known: undo them all (a miss later is safe, an old value is not)
        for key, item in added.items():
            current = now.get(key)
            if current is not None and _same(current, item):
                self.backfills += 1
                continue
            self.backfill_races += 1
            self._undo(key, item)

    def _undo(self, key: bytes, item: LegacyItem) -> None:
        """Delete the backfilled item if Momento still holds its value (a CAS-guarded delete)."""
        try:
            held = self.inner.get_many([key], True).get(key)
            if held is not None and held.value == item.value and held.flags == item.flags:
                self.inner.store(StoreMode.CAS, key, b"", 0, -1, held.cas)
            self.backfill_undone += 1
        except Exception as err:
            self.backfill_errors += 1
            log.warning("backfill of a key raced a write elsewhere and could not be undone: %s", err)

    # -- writes ------------------------------------------------------------------------

    def _write(
        self, keys: Sequence[bytes], call: Callable[[], Any], needs_item: bool, had: dict[bytes, bool] | None = None
    ) -> Any:
        """Warmup's write protocol: mark the keys (no backfill starts), wait for the
        backfills under way, copy the legacy item into Momento when the write depends on
        it, delete the legacy copy, then ``call()`` (the write to ``inner``). ``had``: filled
        with whether the legacy server had each key."""
        self._seq += 1
        writing = self._writing
        for key in keys:
            writing[key] = writing.get(key, 0) + 1
            self._written[key] = self._seq
            if self._pending.pop(key, None) is not None:
                self.backfill_races += 1
        try:
            for key in keys:
                event = self._filling.get(key)
                if event is not None:
                    event.wait(self.legacy.timeout * 2 + 1.0)
            for key in keys:
                present = self._take_over(key) if needs_item else self._invalidate(key)
                if had is not None:
                    had[key] = present
            return call()
        finally:
            self._seq += 1  # a legacy read begun while this write ran may not fill either
            for key in keys:
                self._written[key] = self._seq
                n = writing[key] - 1
                if n:
                    writing[key] = n
                else:
                    del writing[key]
            if len(self._written) > self._prune_at:
                self._prune()

    def _prune(self) -> None:
        """Forget the writes of keys that no legacy read under way asks and no backfill
        waits for: a later read of such a key starts after them, they reject nothing."""
        wanted = set(self._pending)
        for keys in self._reads.values():
            wanted.update(keys)
        self._written = {k: s for k, s in self._written.items() if k in wanted}
        self._prune_at = max(4096, 2 * len(self._written))

    def _take_over(self, key: bytes) -> bool:
        """Before a write that depends on the item: the legacy item into Momento (unless
        Momento has one), then out of the legacy server."""
        if key in self._gone:
            return False
        try:
            got = self.legacy.get_many([key])
        except BackendError:
            self.legacy_errors += 1
            raise
        item = got.get(key)
        if item is None:
            self._mark_gone(key)
            return False
        exptime = backfill_exptime(item.ttl)
        if exptime is not None:
            try:
                if self.inner.store(StoreMode.ADD, key, item.value, item.flags, exptime) is StoreResult.STORED:
                    self.backfills += 1
            except ValueTooLarge:
                pass
        return self._invalidate(key)

    def _invalidate(self, key: bytes) -> bool:
        """Delete the legacy copy (unless known gone); whether there was one."""
        if key in self._gone:
            return False
        try:
            deleted = self.legacy.delete(key)
        except BackendError:
            self.legacy_errors += 1
            raise
        if deleted:
            self.invalidations += 1
        self._mark_gone(key)
        return deleted

    def _legacy_call(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except BackendError:
            self.legacy_errors += 1
            raise

    def _mirror(self, keys: Sequence[bytes], call: Callable[[], Any]) -> None:
        """dual_write/shadow: the Momento side of a write; a failure is counted and the
        keys' Momento copies dropped (if that fails too, they may be stale: see the runbook)."""
        try:
            call()
        except Exception as err:
            self.momento_write_errors += 1
            log.debug("momento side of a dual write: %s", err)
            for key in keys:
                try:
                    self.inner.delete(key)
                except Exception as again:
                    log.debug("momento side of a dual write, dropping the copy: %s", again)

    def _quiet(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except Exception as err:
            log.debug("migration: %s", err)
            return None

    def store(
        self, mode: StoreMode, key: bytes, value: bytes, flags: int, exptime: int, cas_unique: int = 0
    ) -> StoreResult:
        if self.mode == WARMUP:
            result: StoreResult = self._write(
                (key,), lambda: self.inner.store(mode, key, value, flags, exptime, cas_unique), mode is not StoreMode.SET
            )
            return result
        stored: StoreResult = self._legacy_call(lambda: self.legacy.store(mode, key, value, flags, exptime, cas_unique))
        if stored is StoreResult.STORED:
            if mode in (StoreMode.APPEND, StoreMode.PREPEND):
                self._mirror((key,), lambda: self.inner.delete(key))
            else:
                self._mirror((key,), lambda: self.inner.store(StoreMode.SET, key, value, flags, exptime))
        return stored

    def stored_cas(self, value: bytes, flags: int) -> int:
        """Momento's unique in warmup (it answers the reads); 0 otherwise: the
        legacy server's unique is read back."""
        return self.inner.stored_cas(value, flags) if self.mode == WARMUP else 0

    def delete(self, key: bytes) -> bool:
        if self.mode == WARMUP:
            had: dict[bytes, bool] = {}
            result: bool = self._write((key,), lambda: self.inner.delete(key) or had[key], False, had)
            return result
        gone: bool = self._legacy_call(lambda: self.legacy.delete(key))
        self._mirror((key,), lambda: self.inner.delete(key))
        return gone

    def incr_decr(self, key: bytes, delta: int, incr: bool) -> int | None:
        if self.mode == WARMUP:
            result: int | None = self._write((key,), lambda: self.inner.incr_decr(key, delta, incr), True)
            return result
        number: int | None = self._legacy_call(lambda: self.legacy.incr_decr(key, delta, incr))
        if number is not None:
            self._mirror((key,), lambda: self.inner.delete(key))
        return number

    def touch(self, key: bytes, exptime: int) -> bool:
        if self.mode == WARMUP:
            result: bool = self._write((key,), lambda: self.inner.touch(key, exptime), True)
            return result
        touched: bool = self._legacy_call(lambda: self.legacy.touch(key, exptime))
        if touched:
            self._mirror((key,), lambda: self.inner.touch(key, exptime))
        return touched

    def flush_all(self, delay: int = 0) -> None:
        """Momento's flush; the legacy servers' only with ``flush_legacy`` (module doc)."""
        self._seq += 1
        self._cleared = self._seq
        self._pending.clear()
        self.inner.flush_all(delay)
        if self._flush_legacy:
            self._legacy_call(lambda: self.legacy.flush_all(delay))

    # -- meta writes -------------------------------------------------------------------

    def meta_store(self, key: bytes, value: bytes, request: MetaStore) -> tuple[StoreResult, int]:
        if self.mode == WARMUP:
            plain = request.mode is StoreMode.SET and request.compare_cas is None and not request.invalidate
            result: tuple[StoreResult, int] = self._write((key,), lambda: self.inner.meta_store(key, value, request), not plain)
            return result
        if request.invalidate or request.with_cas or (request.compare_cas and request.mode is not StoreMode.CAS):
            raise MetaUnsupported(f"this meta set while migrating in {self.mode} mode (no I, no c, C only with ms MS)")
        cas = (request.compare_cas or 0) if request.mode is StoreMode.CAS else 0
        return self.store(request.mode, key, value, request.flags, request.exptime, cas), 0

    def meta_delete(self, key: bytes, request: MetaDelete) -> MetaStatus:
        if self.mode == WARMUP:
            if request == MetaDelete():
                return MetaStatus.DONE if self.delete(key) else MetaStatus.NOT_FOUND
            result: MetaStatus = self._write((key,), lambda: self.inner.meta_delete(key, request), True)
            return result
        if request != MetaDelete():
            raise MetaUnsupported(f"this meta delete while migrating in {self.mode} mode (no C, no I)")
        return MetaStatus.DONE if self.delete(key) else MetaStatus.NOT_FOUND

    def meta_arith(self, key: bytes, request: MetaArith) -> MetaArithResult:
        if self.mode == WARMUP:
            result: MetaArithResult = self._write((key,), lambda: self.inner.meta_arith(key, request), True)
            return result
        if request.vivify is not None or request.compare_cas or request.with_ttl or request.with_cas:
            raise MetaUnsupported(f"this meta arithmetic while migrating in {self.mode} mode (no N, C, t or c)")
        number = self.incr_decr(key, request.delta, request.incr)
        if number is None:
            return MetaArithResult(MetaStatus.NOT_FOUND)
        if request.touch is not None:
            self.touch(key, request.touch)
        return MetaArithResult(MetaStatus.DONE, number)

    # -- the rest ----------------------------------------------------------------------

    def resize(self, max_bytes: int) -> bool:
        return self.inner.resize(max_bytes)

    def remaining_ttl(self, keys: Sequence[bytes]) -> dict[bytes, float | None]:
        own = getattr(self.inner, "remaining_ttl", None)
        return dict(own(keys)) if callable(own) else {}

    def stats(self) -> dict[str, int]:
        out = dict(self.inner.stats())
        out.update(
            migration_reads_momento=self.reads_momento,
            migration_reads_legacy=self.reads_legacy,
            migration_read_misses=self.read_misses,
            migration_backfills=self.backfills,
            migration_backfill_races=self.backfill_races,
            migration_backfill_undone=self.backfill_undone,
            migration_backfill_errors=self.backfill_errors,
            migration_backfills_dropped=self.backfills_dropped,
            migration_invalidations=self.invalidations,
            migration_shadow_reads=self.shadow_reads,
            migration_shadow_mismatches=self.shadow_mismatches,
            migration_shadow_momento_misses=self.shadow_momento_misses,
            migration_momento_write_errors=self.momento_write_errors,
            migration_legacy_errors=self.legacy_errors,
        )
        return out

    def migration_window(self) -> dict[str, Any]:
        """The mode and the read window's buckets (``stats migration``; plain data)."""
        return {"mode": self.mode, "seconds": WINDOW_SECONDS, "buckets": self.window.export()}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._filler is not None:
            self._filler.kill(block=False)
        try:
            self.legacy.close()
        finally:
            self.inner.close()


def _same(now: LegacyItem, then: LegacyItem) -> bool:
    """Whether the legacy server still holds the item read before (CAS unique when known)."""
    if now.cas and then.cas:
        return now.cas == then.cas
    return now.value == then.value and now.flags == then.flags
