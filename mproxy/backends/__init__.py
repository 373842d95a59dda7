"""Backends, chosen by name from a closed table and imported lazily
(so that the memory backend never imports grpc or momento).

:func:`create` also puts the local tiers a ``[[cache]]`` asks for
(``memory_cache_bytes``, ``disk_cache_path``: :mod:`mproxy.backends.tiered`) in
front of the backend it made, and the migration from legacy memcached servers
(``migrate_from``: :mod:`mproxy.backends.migrate`) in front of those.
"""

from __future__ import annotations

import importlib
from typing import Any

from mproxy.backends.base import Backend

#: name -> "module:factory". A factory takes (cache_config, proxy_config, **kw).
BACKENDS: dict[str, str] = {
    "memory": "mproxy.backends.memory:from_config",
    "momento": "mproxy.backends.momento:from_config",
}

def _load(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def create(name: str, *args: Any, worker: int = 0, **kwargs: Any) -> Backend:
    """The backend ``name`` from ``(cache_config, config)``, behind the local tiers the
    cache asks for; ``worker``: this process's worker number (0: the only process)."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected one of {sorted(BACKENDS)}") from None
    backend: Backend = _load(target)(*args, **kwargs)
    if len(args) < 2:
        return backend
    cache, config = args[0], args[1]
    from mproxy.backends import tiered

    try:
        if tiered.wants_tiers(cache):
            backend = tiered.wrap(backend, cache, config, worker=worker, ttl_lookup=backend.remaining_ttl)
        if getattr(cache, "migrate_from", ()):
            from mproxy.backends import migrate

            backend = migrate.wrap(backend, cache)
    except BaseException:
        backend.close()
        raise
    return backend
