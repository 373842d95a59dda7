"""The meta operations of the Momento backend, on its classic operations.

:class:`MomentoMeta` is a mixin of :class:`~.backend.MomentoBackend`: each meta
operation is served by the backend's public Backend methods (``get_many``,
``touch_many``, ``store``, ``delete``, ``incr_decr``, ``touch``), so it costs
the calls the classic command costs. What those cannot serve honestly is
refused with :class:`~mproxy.backends.base.MetaUnsupported` before any call
(the client gets memcached's answer to an unknown flag); the Momento call each
refusal will map to is in ``docs/compatibility.md`` ("Meta commands"):

* remaining TTL (``t``) and the recache window (``R``): ItemGetTtl;
* vivify on miss (``N`` of mg and ma): SetIfNotExists;
* stale items (``I`` of md and ms) and the win/token flags they carry: a marker
  in the stored item, written with SetIfHash;
* CAS compare on md, ma, and ms append/prepend, and ``c`` of ma and of ms
  append/prepend: GetWithHash with the conditional write;
* hit-before and last access (``h``, ``l``): Momento keeps neither.
"""

from __future__ import annotations

from typing import Protocol, Sequence

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
    StoreResult,
)
from mproxy.backends.momento import codec
from mproxy.protocol.commands import StoreMode


class _Classic(Protocol):
    """The classic operations the mixin is served by (MomentoBackend's)."""

    _with_flags: bool

    def get_many(self, keys: Sequence[bytes], with_cas: bool = False) -> dict[bytes, Item]: ...

    def touch_many(self, keys: Sequence[bytes], exptime: int, with_cas: bool = False) -> dict[bytes, Item]: ...

    def store(
        self, mode: StoreMode, key: bytes, value: bytes, flags: int, exptime: int, cas_unique: int = 0
    ) -> StoreResult: ...

    def delete(self, key: bytes) -> bool: ...

    def incr_decr(self, key: bytes, delta: int, incr: bool) -> int | None: ...

    def touch(self, key: bytes, exptime: int) -> bool: ...


_CONCAT = (StoreMode.APPEND, StoreMode.PREPEND)


class MomentoMeta:
    """Meta operations of :class:`~.backend.MomentoBackend` (see the module docstring)."""

    def meta_get(self: _Classic, key: bytes, request: MetaGet) -> MetaItem | None:
        if request.with_ttl:
            raise MetaUnsupported("remaining TTL: not yet on Momento (ItemGetTtl)")
        if request.recache is not None:
            raise MetaUnsupported("recache window: not yet on Momento (ItemGetTtl)")
        if request.vivify is not None:
            raise MetaUnsupported("vivify on miss: not yet on Momento (SetIfNotExists)")
        if request.with_access:
            raise MetaUnsupported("hit-before and last access: Momento keeps neither")
        if request.touch is not None:
            found = self.touch_many([key], request.touch, with_cas=True)  # UpdateTtl with the read
        else:
            found = self.get_many([key], with_cas=True)
        item = found.get(key)
        if item is None:
            return None
        return MetaItem(item.value, item.flags, item.cas, binary_key=None)

    def meta_store(self: _Classic, key: bytes, value: bytes, request: MetaStore) -> tuple[StoreResult, int]:
        concat = request.mode in _CONCAT
        if request.invalidate:
            raise MetaUnsupported("stale items: not yet on Momento (a marker written with SetIfHash)")
        if concat and request.compare_cas:
            raise MetaUnsupported("CAS compare on append/prepend: not yet on Momento (GetWithHash + SetIfHash)")
        if concat and request.with_cas:
            raise MetaUnsupported("CAS of an appended item: not yet on Momento (GetWithHash)")
        cas_unique = (request.compare_cas or 0) if request.mode is StoreMode.CAS else 0
        result = self.store(request.mode, key, value, request.flags, request.exptime, cas_unique)
        cas = 0
        if result is StoreResult.STORED and request.with_cas:
            # the CAS unique is a digest of the stored bytes, known without a read
            cas = codec.cas_unique(codec.encode(value, request.flags, self._with_flags))
        return result, cas

    def meta_delete(self: _Classic, key: bytes, request: MetaDelete) -> MetaStatus:
        if request.invalidate:
            raise MetaUnsupported("stale items: not yet on Momento (a marker written with SetIfHash)")
        if request.compare_cas is not None:
            raise MetaUnsupported("CAS compare on delete: not yet on Momento (GetWithHash, then Delete)")
        # a touch without invalidate does nothing in memcached either
        return MetaStatus.DONE if self.delete(key) else MetaStatus.NOT_FOUND

    def meta_arith(self: _Classic, key: bytes, request: MetaArith) -> MetaArithResult:
        if request.vivify is not None:
            raise MetaUnsupported("vivify on miss: not yet on Momento (SetIfNotExists)")
        if request.compare_cas:
            raise MetaUnsupported("CAS compare on incr/decr: not yet on Momento (GetWithHash + SetIfHash)")
        if request.with_ttl:
            raise MetaUnsupported("remaining TTL: not yet on Momento (ItemGetTtl)")
        if request.with_cas:
            raise MetaUnsupported("CAS of a counter: not yet on Momento (GetWithHash)")
        number = self.incr_decr(key, request.delta, request.incr)
        if number is None:
            return MetaArithResult(MetaStatus.NOT_FOUND)
        if request.touch is not None:
            # UpdateTtl after the write (not atomic with it: a write in between keeps this TTL)
            self.touch(key, request.touch)
        return MetaArithResult(MetaStatus.DONE, number)

    def resize(self, max_bytes: int) -> bool:
        """A Momento cache has no byte budget set by mproxy."""
        return False
