"""The meta operations of the Momento backend.

:class:`MomentoMeta` is a mixin of :class:`~.backend.MomentoBackend`. A meta
command that asks nothing beyond its classic twin costs that command's calls
(``mg k v`` is a ``get``, ``ms`` a ``set``, ...). The rest map to Momento
calls as ``docs/compatibility.md`` ("Meta commands") tabulates:

* remaining TTL (``t`` of mg and ma, ``exp=`` of me) and the recache window
  (``R``): ItemGetTtl, concurrently with a GetWithHash of the item;
* vivify on miss (``N`` of mg and ma): SetIfNotExists of the new item (an empty
  one carrying the recache token for mg, the initial number for ma);
* stale items (``I`` of md and ms) and the recache token (``W``, ``Z``,
  ``X``): marks stored in the item (:mod:`.codec`), written with SetIfHash
  on the hash just read, so exactly one client wins a token;
* CAS compares (md, ma, ms append/prepend) and ``c`` of ma and of ms
  append/prepend: GetWithHash, then the conditional write (SetIfHash; md:
  Delete, as Momento has no conditional delete);
* hit-before and last access (``h``, ``l``, ``fetch=`` and ``la=`` of me):
  Momento keeps neither, so they come from this process's own bounded record
  of the reads and writes it served (:class:`Accesses`).

Marks need the flags encoding: with ``flags = false`` the flags that write
them (mg ``N``, ``R``; ``I`` of md and ms) are refused with
:class:`~mproxy.backends.base.MetaUnsupported` before any call.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import replace
from functools import cached_property
from typing import Any, Iterable, Protocol, Sequence

from momento_wire_types import cacheclient_pb2 as pb

from mproxy.backends.base import (
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
from mproxy.backends.counters import apply_delta
from mproxy.backends.momento import codec
from mproxy.protocol.commands import StoreMode

#: Keys :class:`Accesses` remembers per process (the least recently seen go first).
ACCESS_RECORD_KEYS = 65536
#: Attempts of a meta command whose conditional write lost to a concurrent writer.
META_ATTEMPTS = 8


class Accesses:
    """This process's bounded record of the keys it served: whether a read (get,
    gat, touch, mg) fetched the key since it was stored (``h``) and when it was
    last read or written (``l``).

    Momento keeps neither figure, so this is what *this proxy process* saw: a
    key read or written only through other proxies or other workers, or
    forgotten (more than :data:`ACCESS_RECORD_KEYS` keys since), answers
    ``h0 l0``, as an item just stored does in memcached. A delete or flush_all
    through this process forgets it; an item expiring does not."""

    def __init__(self, capacity: int = ACCESS_RECORD_KEYS) -> None:
        self._capacity = capacity
        #: key -> (monotonic time of the last access, fetched since stored)
        self._seen: OrderedDict[bytes, tuple[float, bool]] = OrderedDict()

    def look(self, key: bytes, now: float) -> tuple[bool, int]:
        """``(hit_before, seconds since the last access)`` of ``key``."""
        seen = self._seen.get(key)
        if seen is None:
            return False, 0
        return seen[1], int(now - seen[0])

    def record(self, key: bytes, now: float, fetched: bool) -> None:
        """A read (``fetched``) or a write (the fetch bit starts over) of ``key``."""
        seen = self._seen
        seen[key] = (now, fetched)
        seen.move_to_end(key)
        if len(seen) > self._capacity:
            seen.popitem(last=False)

    def fetched(self, keys: Iterable[bytes]) -> None:
        """Classic reads (get, gat, touch) of these keys, now."""
        now = time.monotonic()
        for key in keys:
            self.record(key, now, True)

    def written(self, key: bytes) -> None:
        """A classic write of ``key`` stored, now."""
        self.record(key, time.monotonic(), False)

    def forget(self, key: bytes) -> None:
        self._seen.pop(key, None)

    def clear(self) -> None:
        """flush_all: every item is new again."""
        self._seen.clear()


class _Backend(Protocol):
    """What the mixin uses of :class:`~.backend.MomentoBackend`."""

    _with_flags: bool
    _order: Any
    _gets: Any

    @property
    def _accesses(self) -> Accesses: ...

    def store(
        self, mode: StoreMode, key: bytes, value: bytes, flags: int, exptime: int, cas_unique: int = 0
    ) -> StoreResult: ...

    def delete(self, key: bytes) -> bool: ...

    def incr_decr(self, key: bytes, delta: int, incr: bool) -> int | None: ...

    def _touch_stored(self, keys: Sequence[bytes], exptime: int) -> dict[bytes, bytes]: ...

    def _budget(self, op: str) -> Any: ...

    def _rpc(self, method: str, request: Any, budget: Any, turns: Any = None) -> Any: ...

    def _outcome(self, call: Any, budget: Any) -> Any: ...

    def _read_for_update(self, key: bytes, budget: Any) -> tuple[Any, int] | None: ...

    def _get_with_hash(self, key: bytes, budget: Any) -> Any: ...

    def _set_if_hash(self, key: bytes, stored: bytes, ttl_ms: int, expected: bytes, budget: Any, turns: Any) -> bool: ...

    def _add(self, key: bytes, stored: bytes, ttl_ms: int, budget: Any, turns: Any) -> StoreResult: ...

    def _delete(self, key: bytes, budget: Any, turns: Any) -> None: ...

    def _concatenate(
        self, key: bytes, data: bytes, append: bool, budget: Any, turns: Any, cas_unique: int = 0
    ) -> tuple[StoreResult, bytes]: ...

    def _too_large(self, key: bytes, value: bytes, flags: int, stored: bytes) -> str: ...

    def _ttl_ms(self, exptime: int) -> int: ...

    def _contention(self, budget: Any) -> Exception: ...

    def _item(self, stored: bytes, with_cas: bool = True) -> Item: ...

    # the mixin's own helpers, seen from the Protocol-typed self

    def _meta_read(self, key: bytes, request: MetaGet, now: float) -> MetaItem | None: ...

    def _update_ttl(self, key: bytes, ttl_ms: int, budget: Any, turns: Any) -> None: ...

    def _write_marked(self, key: bytes, stored: bytes, ttl_ms: int, expected: bytes, budget: Any, turns: Any) -> bool: ...


_CONCAT = (StoreMode.APPEND, StoreMode.PREPEND)


def _seconds(ttl_ms: int) -> int:
    """A Momento TTL in whole seconds, rounded up as memcached's ``t`` shows it."""
    return math.ceil(ttl_ms / 1000)


def _needs_marks(backend: _Backend, what: str) -> None:
    if not backend._with_flags:
        raise MetaUnsupported(f"{what}: needs marks in the stored item, which need [[cache]] flags = true")


class MomentoMeta:
    """Meta operations of :class:`~.backend.MomentoBackend` (see the module docstring)."""

    @cached_property
    def _accesses(self) -> Accesses:
        """This process's record of accesses (``h``, ``l``)."""
        return Accesses()

    # -- mg / me ---------------------------------------------------------------

    def meta_get(self: _Backend, key: bytes, request: MetaGet) -> MetaItem | None:
        if request.vivify is not None:
            _needs_marks(self, "vivify on miss")
        if request.recache is not None:
            _needs_marks(self, "recache window")
        now = time.monotonic()
        item: MetaItem | None = None
        if not (request.with_ttl or request.vivify is not None or request.recache is not None):
            # the classic calls: Get (batched), or UpdateTtl ‖ Get
            if request.touch is not None:
                found = self._touch_stored([key], request.touch)
            else:
                found = self._gets.read((key,), self._budget("get"))
            stored = found.get(key)
            if stored is None:
                return None
            value, flags, marks = codec.decode_marked(stored, self._with_flags)
            if not marks & codec.STALE or marks & codec.TOKEN:
                item = MetaItem(
                    value,
                    flags,
                    codec.cas_unique(stored),
                    stale=bool(marks & codec.STALE),
                    token_sent=bool(marks & codec.TOKEN),
                    binary_key=None,
                )
            # else a stale item whose token is still to win: the full read below
        if item is None:
            item = self._meta_read(key, request, now)
            if item is None:
                return None
        accesses = self._accesses
        if request.with_access:
            hit_before, last_access = accesses.look(key, now) if not item.created else (False, 0)
            item = replace(item, hit_before=hit_before, last_access=last_access)
        if not request.no_bump:
            accesses.record(key, now, fetched=not item.created)
        return item

    def _meta_read(self: _Backend, key: bytes, request: MetaGet, now: float) -> MetaItem | None:
        """mg with TTL, vivify, recache or a token to win: GetWithHash ‖ ItemGetTtl,
        then the write the flags ask (SetIfNotExists, SetIfHash, UpdateTtl)."""
        budget = self._budget("mg")
        with self._order.take((key,), budget) as turns:
            for _ in range(META_ATTEMPTS):
                read = self._read_for_update(key, budget)
                if read is None:
                    if request.vivify is None:
                        return None
                    exptime = request.vivify if request.touch is None else request.touch
                    ttl_ms = self._ttl_ms(exptime)
                    stored = codec.encode(b"", 0, True, codec.TOKEN)
                    if ttl_ms and self._add(key, stored, ttl_ms, budget, turns) is not StoreResult.STORED:
                        continue  # another client created it: read it
                    return MetaItem(
                        b"", 0, codec.cas_unique(stored), ttl=-1, new_ttl=_seconds(ttl_ms),
                        won=True, created=True, binary_key=None,
                    )
                found, ttl_ms = read
                value, flags, marks = codec.decode_marked(found.stored, self._with_flags)
                new_ttl_ms = ttl_ms if request.touch is None else self._ttl_ms(request.touch)
                token_sent = bool(marks & codec.TOKEN)
                won = False
                if request.recache is not None and not token_sent:
                    threshold = ttl_seconds(request.recache)
                    won = threshold is not None and 0 < threshold and new_ttl_ms < threshold * 1000
                if marks & codec.STALE and not token_sent:
                    won = True
                if won:
                    marked = codec.encode(value, flags, True, marks | codec.TOKEN)
                    if not self._write_marked(key, marked, new_ttl_ms, found.hash, budget, turns):
                        continue  # the item changed: another client may have won
                elif request.touch is not None:
                    self._update_ttl(key, new_ttl_ms, budget, turns)
                return MetaItem(
                    value,
                    flags,
                    codec.cas_unique(found.stored),
                    ttl=_seconds(ttl_ms),
                    new_ttl=_seconds(new_ttl_ms),
                    stale=bool(marks & codec.STALE),
                    won=won,
                    token_sent=token_sent,
                    binary_key=None,
                )
            raise self._contention(budget)

    def _update_ttl(self: _Backend, key: bytes, ttl_ms: int, budget: Any, turns: Any) -> None:
        """UpdateTtl, or Delete for a TTL in the past."""
        if ttl_ms == 0:
            self._delete(key, budget, turns)
            return
        request = pb._UpdateTtlRequest(cache_key=key, overwrite_to_milliseconds=ttl_ms)
        self._outcome(self._rpc("UpdateTtl", request, budget, turns), budget)

    def _write_marked(
        self: _Backend, key: bytes, stored: bytes, ttl_ms: int, expected: bytes, budget: Any, turns: Any
    ) -> bool:
        """SetIfHash of ``stored`` on the hash read (True: written); a TTL in the past
        deletes the item instead, once the hash still holds."""
        if ttl_ms == 0:
            found = self._get_with_hash(key, budget)
            if found is None or found.hash != expected:
                return False
            self._delete(key, budget, turns)
            return True
        return self._set_if_hash(key, stored, ttl_ms, expected, budget, turns)

    # -- ms ----------------------------------------------------------------------

    def meta_store(self: _Backend, key: bytes, value: bytes, request: MetaStore) -> tuple[StoreResult, int]:
        concat = request.mode in _CONCAT
        if request.invalidate:
            _needs_marks(self, "stale items")
        stored = codec.encode(value, request.flags, self._with_flags)
        now = time.monotonic()
        if request.invalidate or (concat and (request.compare_cas or request.with_cas)):
            too_large = self._too_large(key, value, request.flags, stored)
            if too_large:
                raise ValueTooLarge(too_large)
            budget = self._budget(request.mode.value)
            with self._order.take((key,), budget) as turns:
                if concat:
                    result, new = self._concatenate(
                        key, value, request.mode is StoreMode.APPEND, budget, turns, request.compare_cas or 0
                    )
                else:
                    result, new = _store_invalidating(self, key, value, request, budget, turns)
        else:
            cas_unique = (request.compare_cas or 0) if request.mode is StoreMode.CAS else 0
            result = self.store(request.mode, key, value, request.flags, request.exptime, cas_unique)
            new = stored  # the CAS unique is a digest of the stored bytes, known without a read
        if result is not StoreResult.STORED:
            return result, 0
        self._accesses.record(key, now, fetched=False)
        return result, codec.cas_unique(new) if request.with_cas else 0

    # -- md ----------------------------------------------------------------------

    def meta_delete(self: _Backend, key: bytes, request: MetaDelete) -> MetaStatus:
        if request.invalidate:
            _needs_marks(self, "stale items")
        elif request.compare_cas is None:
            # a touch without invalidate does nothing in memcached either
            return MetaStatus.DONE if self.delete(key) else MetaStatus.NOT_FOUND
        budget = self._budget("md")
        with self._order.take((key,), budget) as turns:
            for _ in range(META_ATTEMPTS):
                if not request.invalidate:
                    # GetWithHash, then Delete: Momento has no conditional delete
                    found = self._get_with_hash(key, budget)
                    if found is None:
                        return MetaStatus.NOT_FOUND
                    if codec.cas_unique(found.stored) != request.compare_cas:
                        return MetaStatus.EXISTS
                    self._delete(key, budget, turns)
                    self._accesses.forget(key)
                    return MetaStatus.DONE
                read = self._read_for_update(key, budget)
                if read is None:
                    return MetaStatus.NOT_FOUND
                found, ttl_ms = read
                if request.compare_cas is not None and codec.cas_unique(found.stored) != request.compare_cas:
                    return MetaStatus.EXISTS
                value, flags, _ = codec.decode_marked(found.stored, True)
                stale = codec.encode(value, flags, True, codec.STALE)  # the token is out again
                new_ttl_ms = ttl_ms if request.touch is None else self._ttl_ms(request.touch)
                if self._write_marked(key, stale, new_ttl_ms, found.hash, budget, turns):
                    return MetaStatus.DONE
            raise self._contention(budget)

    # -- ma ----------------------------------------------------------------------

    def meta_arith(self: _Backend, key: bytes, request: MetaArith) -> MetaArithResult:
        if not (
            request.vivify is not None or request.compare_cas or request.with_ttl or request.with_cas
            or request.touch is not None
        ):
            number = self.incr_decr(key, request.delta, request.incr)
            if number is None:
                return MetaArithResult(MetaStatus.NOT_FOUND)
            return MetaArithResult(MetaStatus.DONE, number)
        budget = self._budget("incr" if request.incr else "decr")
        with self._order.take((key,), budget) as turns:
            for _ in range(META_ATTEMPTS):
                read = self._read_for_update(key, budget)
                if read is None:
                    if request.vivify is None:
                        return MetaArithResult(MetaStatus.NOT_FOUND)
                    stored = codec.encode(b"%d" % request.initial, 0, self._with_flags)
                    exptime = request.vivify if request.touch is None else request.touch
                    ttl_ms = self._ttl_ms(exptime)
                    if ttl_ms and self._add(key, stored, ttl_ms, budget, turns) is not StoreResult.STORED:
                        continue  # another client created it: incr that
                    return MetaArithResult(
                        MetaStatus.DONE, request.initial, codec.cas_unique(stored), -1, _seconds(ttl_ms), created=True
                    )
                found, ttl_ms = read
                value, flags = codec.decode(found.stored, self._with_flags)
                if not value:
                    raise NonNumericValue("cannot increment or decrement non-numeric value")
                if request.compare_cas and codec.cas_unique(found.stored) != request.compare_cas:
                    return MetaArithResult(MetaStatus.EXISTS)
                number, value = apply_delta(value, request.delta, request.incr)
                new = codec.encode(value, flags, self._with_flags)
                # the new TTL goes with the write: one atomic step, as in memcached
                new_ttl_ms = ttl_ms if request.touch is None else self._ttl_ms(request.touch)
                if self._write_marked(key, new, new_ttl_ms, found.hash, budget, turns):
                    return MetaArithResult(
                        MetaStatus.DONE, number, codec.cas_unique(new), _seconds(ttl_ms), _seconds(new_ttl_ms)
                    )
            raise self._contention(budget)

    def resize(self, max_bytes: int) -> bool:
        """A Momento cache has no byte budget set by mproxy."""
        return False


def _store_invalidating(
    backend: _Backend, key: bytes, value: bytes, request: MetaStore, budget: Any, turns: Any
) -> tuple[StoreResult, bytes]:
    """``ms … C<cas> I``: the CAS matches: a plain cas; it does not: the value is
    stored marked stale, keeping the item's TTL and recache token (memcached does
    that for a *lower* CAS only; content uniques have no order, so any other one)."""
    for _ in range(META_ATTEMPTS):
        read = backend._read_for_update(key, budget)
        if read is None:
            return StoreResult.NOT_FOUND, b""
        found, ttl_ms = read
        if codec.cas_unique(found.stored) == request.compare_cas:
            new = codec.encode(value, request.flags, True)
            ttl_ms = backend._ttl_ms(request.exptime)
        else:
            _, _, marks = codec.decode_marked(found.stored, True)
            new = codec.encode(value, request.flags, True, codec.STALE | (marks & codec.TOKEN))
        if backend._write_marked(key, new, ttl_ms, found.hash, budget, turns):
            return StoreResult.STORED, new
    raise backend._contention(budget)

