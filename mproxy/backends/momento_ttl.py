"""``remaining_ttl`` for the Momento backend, until it has the method itself.

The tiered backend (:mod:`mproxy.backends.tiered`) keeps a copy of an item it
read but did not write no longer than the item's own TTL, which on Momento
only ItemGetTtl tells (one call per key). :class:`~mproxy.backends.base.Backend`
declares ``remaining_ttl(keys)`` for that; the Momento backend is being
rebuilt and does not have it yet. :func:`lookup` gives the tiered backend a
function that calls the backend's own ``remaining_ttl`` when it has one, else
ItemGetTtl through the present backend's call slots, budget and channels (its
``_call`` and ``_fan_out``: one command holding one slot, ItemGetTtl calls 64 at
a time), else None (the tier then fills only what this proxy writes).

Delete this module once ``MomentoBackend.remaining_ttl`` exists: the tiered
backend uses the method directly.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

#: What the tiered backend calls: keys -> seconds left (None: no expiry) of the present ones.
TtlLookup = Callable[[Sequence[bytes]], dict[bytes, "float | None"]]


def lookup(backend: Any) -> TtlLookup | None:
    """The remaining-TTL function for ``backend`` (a MomentoBackend), or None."""
    own = getattr(backend, "remaining_ttl", None)
    if callable(own):
        return own  # type: ignore[no-any-return]
    if not (callable(getattr(backend, "_call", None)) and callable(getattr(backend, "_fan_out", None))):
        return None
    from mproxy.backends.momento import backend as momento_backend

    request_type = momento_backend.pb._ItemGetTtlRequest

    def remaining_ttl(keys: Sequence[bytes]) -> dict[bytes, float | None]:
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        with backend._call("ttl") as budget:
            responses = backend._fan_out("ItemGetTtl", [request_type(cache_key=key) for key in unique], budget)
        return {
            key: response.found.remaining_ttl_millis / 1000.0
            for key, response in zip(unique, responses)
            if response.WhichOneof("result") == "found"
        }

    return remaining_ttl
