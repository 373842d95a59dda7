"""Binary protocol requests on the :class:`~mproxy.dispatch.Dispatcher`.

:func:`binary_handlers` gives the dispatcher one handler per record type of
:mod:`mproxy.protocol.binary` (``handler(cmd) -> (frame, outcome)``). They go
through the dispatcher's shared helpers (``store_item``, ``delete_item``,
``arith_value``, ...), so counters, the too-large rule and CAS outcomes are
the text protocol's; only the replies differ: response frames echoing the
request's opcode and opaque, with memcached 1.6.18's statuses and error texts
(``proto_bin.c``). Quiet requests answer ``b""`` where memcached sends
nothing (a success, a get miss) and their errors all the same.

Beyond the text commands:

* a set/add/replace with a CAS is a ``cas``; an append, prepend, delete,
  increment or decrement with one first checks it (:meth:`Dispatcher.check_cas`);
* increment/decrement create a missing counter with the request's initial
  value and expiry (unless the expiry is ``0xffffffff``):
  :meth:`Dispatcher.arith_or_create` (where memcached answers ``Not stored.``
  to an add lost to a concurrent creator, it increments the new counter);
* successful writes answer the CAS unique of the item written: for
  set/add/replace/cas the backend's :meth:`~mproxy.backends.base.Backend.stored_cas`
  when it knows it without a call (Momento's content uniques), else read back
  from the backend (:meth:`_Handlers._written_cas`), as ``store`` does not return it;
* backend failures answer ``Out of memory`` (status 0x82) with the reason as
  the body: memcached's binary form of its ``SERVER_ERROR`` lines (the
  dispatcher's one net for failures, ``Dispatcher._execute``, forms them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from mproxy.backends.base import Item, NonNumericValue, StoreResult
from mproxy.protocol import binary as b
from mproxy.protocol.binary import NO_CREATE, Opcode, Status
from mproxy.protocol.commands import StoreMode
from mproxy.protocol.replies import stat_text

if TYPE_CHECKING:
    from mproxy.dispatch.core import Dispatcher

Handler = Callable[[Any], tuple[bytes, str]]

#: stat groups memcached's binary protocol serves besides "", "reset" and "settings"
#: (``get_stats``): others answer Not found even where the text protocol has them.
_STAT_GROUPS = frozenset((b"items", b"slabs", b"sizes", b"sizes_enable", b"sizes_disable"))

_CONDITIONAL = (StoreMode.SET, StoreMode.ADD, StoreMode.REPLACE)
_CONCAT = (StoreMode.APPEND, StoreMode.PREPEND)

#: a store's result -> status when it is not stored (complete_update_bin)
_STORE_STATUS = {
    StoreResult.EXISTS: (Status.KEY_EEXISTS, "exists"),
    StoreResult.NOT_FOUND: (Status.KEY_ENOENT, "not_found"),
}
_NOT_STORED_STATUS = {StoreMode.ADD: Status.KEY_EEXISTS, StoreMode.REPLACE: Status.KEY_ENOENT}
#: arith_or_create's failures -> status
_ARITH_STATUS = {"exists": Status.KEY_EEXISTS, "not_found": Status.KEY_ENOENT, "not_stored": Status.NOT_STORED}


def binary_handlers(d: Dispatcher, version_text: str) -> dict[type, Handler]:
    """The handlers of the binary records, for ``Dispatcher._handlers``."""
    handlers = _Handlers(d, version_text)
    return {
        b.BinTouch: handlers.touch,
        b.BinStore: handlers.store,
        b.BinTooLarge: handlers.too_large,
        b.BinDelete: handlers.delete,
        b.BinArith: handlers.arith,
        b.BinFlush: handlers.flush,
        b.BinSimple: handlers.simple,
        b.BinStat: handlers.stat,
    }


def binary_get_group(d: Dispatcher) -> Callable[[list[b.BinGet]], list[tuple[bytes, str]]]:
    """The handler of a run of binary gets (``getkq ... getk``, or one get): one backend
    read for all their keys, one frame each (a failure: the dispatcher answers each its
    error frame)."""
    handlers = _Handlers(d, "")

    def get_group(cmds: list[b.BinGet]) -> list[tuple[bytes, str]]:
        found = d.read_items(tuple(cmd.key for cmd in cmds))
        return [handlers.get(cmd, found) for cmd in cmds]

    return get_group


class _Handlers:
    __slots__ = ("d", "version")

    def __init__(self, d: Dispatcher, version_text: str) -> None:
        self.d = d
        self.version = version_text.encode()

    def get(self, cmd: b.BinGet, found: dict[bytes, Item]) -> tuple[bytes, str]:
        """One get of a run read together (:func:`binary_get_group`)."""
        outcome = self.d.count_gets(cmd.keys, found)
        item = found.get(cmd.key)
        if item is not None:
            key = cmd.key if cmd.with_key else b""
            return b.item(cmd.opcode, cmd.opaque, item.flags, item.cas, key, item.value), outcome
        return _miss(cmd), outcome

    def touch(self, cmd: b.BinTouch) -> tuple[bytes, str]:
        _, found, _ = self.d.touch_items((cmd.key,), cmd.exptime, True)
        item = found.get(cmd.key)
        if item is not None:
            key = cmd.key if cmd.with_key else b""
            value = item.value if cmd.with_value else b""
            return b.item(cmd.opcode, cmd.opaque, item.flags, item.cas, key, value), "hit"
        return _miss(cmd), "miss"

    def store(self, cmd: b.BinStore) -> tuple[bytes, str]:
        mode = cmd.mode
        if cmd.cas and mode in _CONDITIONAL:
            mode = StoreMode.CAS  # as memcached: any of the three with a CAS is a cas
        result = self.d.store_item(mode, cmd.key, cmd.value, cmd.flags, cmd.exptime, cmd.cas)
        if result is None:
            if cmd.mode is StoreMode.SET and mode is StoreMode.CAS:
                self.d.refuse_too_large(StoreMode.SET, cmd.key)  # memcached looks at the opcode
            return b.error(cmd.opcode, cmd.opaque, Status.E2BIG), "too_large"
        if result is StoreResult.STORED:
            if cmd.quiet:
                return b"", "stored"
            cas = 0 if mode in _CONCAT else self.d.backend.stored_cas(cmd.value, cmd.flags)
            return b.response(cmd.opcode, cmd.opaque, cas=cas or self._written_cas(cmd.key)), "stored"
        status, outcome = _STORE_STATUS.get(result) or (_NOT_STORED_STATUS.get(mode, Status.NOT_STORED), "not_stored")
        return b.error(cmd.opcode, cmd.opaque, status), outcome

    def too_large(self, cmd: b.BinTooLarge) -> tuple[bytes, str]:
        self.d.refuse_too_large(cmd.mode, cmd.key)
        return b.error(cmd.opcode, cmd.opaque, Status.E2BIG), "too_large"

    def delete(self, cmd: b.BinDelete) -> tuple[bytes, str]:
        outcome = self.d.delete_item(cmd.key, cmd.cas)
        if outcome == "deleted":
            return (b"" if cmd.quiet else b.response(cmd.opcode, cmd.opaque)), outcome
        status = Status.KEY_EEXISTS if outcome == "exists" else Status.KEY_ENOENT
        return b.error(cmd.opcode, cmd.opaque, status), outcome

    def arith(self, cmd: b.BinArith) -> tuple[bytes, str]:
        initial = None if cmd.exptime == NO_CREATE else cmd.initial
        try:
            outcome, value = self.d.arith_or_create(cmd.key, cmd.delta, cmd.incr, initial, cmd.exptime, cmd.cas)
        except NonNumericValue:
            return b.error(cmd.opcode, cmd.opaque, Status.DELTA_BADVAL), "non_numeric"
        if outcome == "ok" or outcome == "created":
            if cmd.quiet:
                return b"", outcome
            return b.counter(cmd.opcode, cmd.opaque, value, self._written_cas(cmd.key)), outcome
        return b.error(cmd.opcode, cmd.opaque, _ARITH_STATUS[outcome]), outcome

    def flush(self, cmd: b.BinFlush) -> tuple[bytes, str]:
        if not self.d.flush(cmd.delay):
            return b.error(cmd.opcode, cmd.opaque, Status.AUTH_ERROR), "refused"
        return (b"" if cmd.quiet else b.response(cmd.opcode, cmd.opaque)), "ok"

    def simple(self, cmd: b.BinSimple) -> tuple[bytes, str]:
        if cmd.opcode == Opcode.VERSION:
            return b.response(cmd.opcode, cmd.opaque, value=self.version), "ok"
        if cmd.opcode == Opcode.QUITQ:
            return b"", "ok"
        return b.response(cmd.opcode, cmd.opaque), "ok"  # noop, quit

    def stat(self, cmd: b.BinStat) -> tuple[bytes, str]:
        key = cmd.key
        # memcached compares "reset" and "settings" as prefixes, the other groups exactly
        if key.startswith(b"reset"):
            if not self.d.reset_stats():  # [admin] allow_reset = false: refused as a refused flush is
                return b.error(cmd.opcode, cmd.opaque, Status.AUTH_ERROR), "refused"
            pairs: Any = {}
        elif key.startswith(b"settings"):
            pairs = self.d.stats_section((b"settings",))
        elif not key or key in _STAT_GROUPS:
            pairs = self.d.stats_section((key,) if key else ())
        else:
            pairs = None
        if pairs is None:
            return b.error(cmd.opcode, cmd.opaque, Status.KEY_ENOENT), "error"
        frames = [b.stat(cmd.opcode, cmd.opaque, name.encode(), stat_text(v).encode()) for name, v in pairs.items()]
        frames.append(b.stat(cmd.opcode, cmd.opaque, b"", b""))
        return b"".join(frames), "ok"

    # -- helpers -------------------------------------------------------------------

    def _written_cas(self, key: bytes) -> int:
        """The CAS unique of the item a write just made: read back from the backend
        (0 if it is already gone). Exact on the memory backend; on a remote one a
        concurrent write between the two calls gives that write's unique."""
        item = self.d.read_item(key)
        return item.cas if item is not None else 0


def _miss(cmd: b.BinGet | b.BinTouch) -> bytes:
    """A get/gat/touch miss: nothing for quiet forms, the key echoed for the k forms."""
    if cmd.quiet:
        return b""
    if cmd.with_key:
        return b.response(cmd.opcode, cmd.opaque, Status.KEY_ENOENT, key=cmd.key)
    return b.error(cmd.opcode, cmd.opaque, Status.KEY_ENOENT)
