"""The meta commands (``mg ms md ma me``) on a Backend: memcached 1.6.18's replies.

Each handler has dispatch's signature ``handler(cmd) -> (reply, outcome)``;
:meth:`MetaCommands.handlers` gives the table :class:`~mproxy.dispatch.Dispatcher`
adds to its own. A reply echoes the request's flags in the order sent, as
``proto_text.c`` builds it; ``q`` silences the nominal reply of each command
(``EN`` of mg; ``HD`` of ms, md and ma), never an error.

What a backend cannot serve it refuses with :class:`~.backends.base.MetaUnsupported`
before doing anything; the client then gets memcached's answer to a flag it
does not know (``CLIENT_ERROR invalid flag`` for mg and ms, ``CLIENT_ERROR
invalid or duplicate flag`` for md and ma).

memcached applies ``T``, ``N`` and ``R`` of one mg in the order they are sent;
the backends apply them in one order (vivify, touch, then the recache check on
the new TTL), and ``t`` shows the TTL before or after them as memcached does
for the usual orders (``docs/compatibility.md``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from mproxy.backends.base import (
    MetaArith,
    MetaDelete,
    MetaGet,
    MetaItem,
    MetaStatus,
    MetaStore,
    MetaUnsupported,
    NonNumericValue,
    StoreResult,
    ValueTooLarge,
)
from mproxy.protocol import commands as c
from mproxy.protocol import replies as r
from mproxy.protocol.commands import StoreMode
from mproxy.protocol.meta import b64encode

if TYPE_CHECKING:
    from mproxy.dispatch.core import Dispatcher

_T, _N, _O, _k, _c, _t, _s, _f, _l, _h = b"TNOkctsflh"

INVALID_FLAG = b"CLIENT_ERROR invalid flag\r\n"
INVALID_OR_DUPLICATE = b"CLIENT_ERROR invalid or duplicate flag\r\n"
OPAQUE_TOO_LONG = b"CLIENT_ERROR opaque token too long\r\n"

_STORE_CODE = {
    StoreResult.STORED: (b"HD", "stored"),
    StoreResult.NOT_STORED: (b"NS", "not_stored"),
    StoreResult.EXISTS: (b"EX", "exists"),
    StoreResult.NOT_FOUND: (b"NF", "not_found"),
}


def _has(flags: tuple[bytes, ...], letter: int) -> bool:
    return any(token[0] == letter for token in flags)


def _before(flags: tuple[bytes, ...], letter: int, end: int) -> bool:
    """A flag ``letter`` among the first ``end`` flags."""
    return any(token[0] == letter for token in flags[:end])


def _key(key: bytes, binary: bool) -> bytes:
    """memcached's ``META_KEY``: `` k<key>``, base64 and `` b`` for a binary key."""
    return b" k" + b64encode(key) + b" b" if binary else b" k" + key


def _ttl(seconds: int | None) -> bytes:
    return b"-1" if seconds is None or seconds == -1 else b"%d" % seconds


def _echo(flags: tuple[bytes, ...], key: bytes, binary: bool) -> bytes:
    """The ``O`` and ``k`` flags of a reply without an item (miss, NF, EX, md)."""
    out = b""
    for token in flags:
        if token[0] == _O:
            out += b" " + token
        elif token[0] == _k:
            out += _key(key, binary)
    return out


class MetaCommands:
    """The meta commands of one :class:`~mproxy.dispatch.Dispatcher` (its backend,
    counters and timed calls)."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        from mproxy.dispatch.core import count_cas  # core imports this module first

        self._dispatcher = dispatcher
        self._count_cas = count_cas
        self.backend = dispatcher.backend
        self.stats = dispatcher.stats

    def handlers(self) -> dict[type, Callable[[Any], tuple[bytes, str]]]:
        return {
            c.Mg: self.mg,
            c.Ms: self.ms,
            c.MsTooLarge: self.ms_too_large,
            c.Md: self.md,
            c.Ma: self.ma,
            c.Me: self.me,
        }

    # -- mg ------------------------------------------------------------------

    def mg(self, cmd: c.Mg) -> tuple[bytes, str]:
        flags = cmd.flags
        long_opaque = cmd.long_opaque
        touch = cmd.touch
        if long_opaque >= 0:
            # memcached stops at the long O: a T after it is not applied, nor the delayed bump
            if not _before(flags, _T, long_opaque):
                touch = None
            request = MetaGet(touch=touch, vivify=cmd.vivify, no_bump=cmd.no_update or cmd.locked)
        else:
            request = MetaGet(
                touch=touch,
                vivify=cmd.vivify,
                recache=cmd.recache,
                no_bump=cmd.no_update,
                with_ttl=_has(flags, _t),
                with_access=_has(flags, _h) or _has(flags, _l),
            )
        try:
            item = self._dispatcher._call("mg", self.backend.meta_get, cmd.key, request)
        except MetaUnsupported:
            return INVALID_FLAG, "refused"
        if long_opaque >= 0:
            return OPAQUE_TOO_LONG, "error"
        st = self.stats
        if item is None:
            st.cmd_get += 1
            st.get_misses += 1
            if cmd.quiet:
                return b"", "miss"
            return b"EN" + _echo(flags, cmd.key, cmd.binary) + b"\r\n", "miss"
        if touch is not None:
            st.cmd_touch += 1
            st.touch_hits += 1
        else:
            st.cmd_get += 1
            st.get_hits += 1
        return self._hit(cmd, item), "hit"

    def _hit(self, cmd: c.Mg, item: MetaItem) -> bytes:
        value = item.value
        out = [b"VA %d" % len(value) if cmd.value else b"HD"]
        changed = False  # a T, or an N that created the item, came before: t shows the new TTL
        for token in cmd.flags:
            f = token[0]
            if f == _T or (f == _N and item.created):
                changed = True
            elif f == _s:
                out.append(b" s%d" % len(value))
            elif f == _t:
                out.append(b" t" + _ttl(item.new_ttl if changed else item.ttl))
            elif f == _c:
                out.append(b" c%d" % item.cas)
            elif f == _f:
                out.append(b" f%d" % item.flags)
            elif f == _l:
                out.append(b" l%d" % (item.last_access or 0))
            elif f == _h:
                out.append(b" h1" if item.hit_before else b" h0")
            elif f == _O:
                out.append(b" " + token)
            elif f == _k:
                out.append(_key(cmd.key, cmd.binary if item.binary_key is None else item.binary_key))
        if item.token_sent:
            out.append(b" Z")
        if item.stale:
            out.append(b" X")
        if item.won:
            out.append(b" W")
        out.append(b"\r\n")
        if cmd.value:
            out.append(value)
            out.append(b"\r\n")
        return b"".join(out)

    # -- ms ------------------------------------------------------------------

    def ms(self, cmd: c.Ms) -> tuple[bytes, str]:
        st = self.stats
        st.cmd_set += 1
        request = MetaStore(
            mode=cmd.mode,
            flags=cmd.client_flags,
            exptime=cmd.exptime,
            compare_cas=cmd.compare_cas,
            invalidate=cmd.invalidate and cmd.mode is StoreMode.CAS,
            binary_key=cmd.binary,
            with_cas=_has(cmd.flags, _c),
        )
        try:
            result, cas = self._dispatcher._call("ms", self.backend.meta_store, cmd.key, cmd.value, request)
        except MetaUnsupported:
            return INVALID_FLAG, "refused"
        except ValueTooLarge:
            return self._too_large(cmd.key)
        if cmd.mode is StoreMode.CAS:
            self._count_cas(st, result)
        code, outcome = _STORE_CODE[result]
        if result is StoreResult.STORED and cmd.quiet:
            return b"", outcome
        out = [code]
        for token in cmd.flags:
            f = token[0]
            if f == _O:
                out.append(b" " + token)
            elif f == _k:
                out.append(_key(cmd.key, cmd.binary))
            elif f == _c:
                out.append(b" c%d" % cas)
        out.append(b"\r\n")
        return b"".join(out), outcome

    def ms_too_large(self, cmd: c.MsTooLarge) -> tuple[bytes, str]:
        """An ms the parser found over the item size limit (its data swallowed)."""
        return self._too_large(cmd.key)

    def _too_large(self, key: bytes) -> tuple[bytes, str]:
        # memcached's ms removes the key's item whatever the mode ("only if SET mode?" it asks)
        self._dispatcher._call("delete", self.backend.delete, key)
        return r.TOO_LARGE, "too_large"

    # -- md ------------------------------------------------------------------

    def md(self, cmd: c.Md) -> tuple[bytes, str]:
        request = MetaDelete(compare_cas=cmd.compare_cas, invalidate=cmd.invalidate, touch=cmd.touch)
        try:
            status = self._dispatcher._call("md", self.backend.meta_delete, cmd.key, request)
        except MetaUnsupported:
            return INVALID_OR_DUPLICATE, "refused"
        st = self.stats
        if status is MetaStatus.DONE:
            if not cmd.invalidate:
                st.delete_hits += 1
            if cmd.quiet:
                return b"", "deleted"
            code, outcome = b"HD", "deleted"
        else:
            st.delete_misses += 1
            code, outcome = (b"NF", "not_found") if status is MetaStatus.NOT_FOUND else (b"EX", "exists")
        return code + _echo(cmd.flags, cmd.key, cmd.binary) + b"\r\n", outcome

    # -- ma ------------------------------------------------------------------

    def ma(self, cmd: c.Ma) -> tuple[bytes, str]:
        flags = cmd.flags
        touch = cmd.touch
        if cmd.long_opaque >= 0 and not _before(flags, _T, cmd.long_opaque):
            touch = None
        request = MetaArith(
            incr=cmd.incr,
            delta=cmd.delta,
            compare_cas=cmd.compare_cas,
            vivify=cmd.vivify,
            initial=cmd.initial,
            touch=touch,
            with_ttl=_has(flags, _t),
            with_cas=_has(flags, _c),
        )
        try:
            result = self._dispatcher._call("ma", self.backend.meta_arith, cmd.key, request)
        except MetaUnsupported:
            return INVALID_OR_DUPLICATE, "refused"
        except NonNumericValue:
            return r.NON_NUMERIC, "non_numeric"
        if cmd.long_opaque >= 0:
            return OPAQUE_TOO_LONG, "error"
        st = self.stats
        if result.status is MetaStatus.NOT_FOUND:
            if cmd.incr:
                st.incr_misses += 1
            else:
                st.decr_misses += 1
            return b"NF" + _echo(flags, cmd.key, cmd.binary) + b"\r\n", "not_found"
        if result.status is MetaStatus.EXISTS:
            return b"EX" + _echo(flags, cmd.key, cmd.binary) + b"\r\n", "exists"
        if not result.created:
            if cmd.incr:
                st.incr_hits += 1
            else:
                st.decr_hits += 1
            if cmd.quiet:  # memcached 1.6.18 silences only an update, not a creation
                return b"", "ok"
        number = b"%d" % result.number
        out = [b"VA %d" % len(number) if cmd.value else b"HD"]
        changed = False
        for token in flags:
            f = token[0]
            if f == _T or (f == _N and result.created):
                changed = True
            elif f == _c:
                out.append(b" c%d" % result.cas)
            elif f == _t:
                out.append(b" t" + _ttl(result.new_ttl if changed else result.ttl))
            elif f == _O:
                out.append(b" " + token)
            elif f == _k:
                out.append(_key(cmd.key, cmd.binary))
        if cmd.value:
            out.append(b"\r\n" + number)
        out.append(b"\r\n")
        return b"".join(out), "created" if result.created else "ok"

    # -- me ------------------------------------------------------------------

    def me(self, cmd: c.Me) -> tuple[bytes, str]:
        """memcached's debug line (``exp`` is the negated remaining TTL, as
        memcached prints it); a backend that does not keep a figure leaves it out."""
        request = MetaGet(no_bump=True, with_ttl=True, with_access=True)
        item = self._dispatcher._call("me", self.backend.meta_get, cmd.key, request)
        if item is None:
            return b"EN\r\n", "miss"
        binary = cmd.binary if item.binary_key is None else item.binary_key
        out = [b"ME ", b64encode(cmd.key) if binary else cmd.key]
        fields: list[bytes] = []
        if item.ttl is not None:
            fields.append(b"exp=%d" % (-1 if item.ttl == -1 else -item.ttl))
        if item.last_access is not None:
            fields.append(b"la=%d" % item.last_access)
        fields.append(b"cas=%d" % item.cas)
        if item.hit_before is not None:
            fields.append(b"fetch=yes" if item.hit_before else b"fetch=no")
        if item.slab_class is not None:
            fields.append(b"cls=%d" % item.slab_class)
        if item.size is not None:
            fields.append(b"size=%d" % item.size)
        out.append(b" " + b" ".join(fields))
        out.append(b"\r\n")
        return b"".join(out), "hit"
