"""Local tiers in front of another backend: memory, then disk (``docs/tiers.md``).

Modules, each importing only those listed before it:

``memory``   :class:`~.memory.MemoryTier`: items bounded in bytes, S3-FIFO eviction
             (and :class:`~.memory.LruTier`, least recently used, for comparison)
``disk``     :class:`~.disk.DiskTier`: an SQLite file read and written on threads
             of their own, never on the gevent hub
``backend``  :class:`~.backend.TieredBackend`: the read path (tiers, single-flight,
             fills), the write protocol (invalidation, quarantine, the other workers)

:func:`wrap` puts the tiers a ``[[cache]]`` asks for in front of its backend; the
registry (:func:`mproxy.backends.create`) calls it.
"""

from __future__ import annotations

import secrets
from typing import Any, Callable, Protocol, Sequence

from mproxy.backends.base import Backend
from mproxy.backends.tiered.backend import TieredBackend
from mproxy.backends.tiered.disk import identity_of, open_tier
from mproxy.backends.tiered.memory import MemoryTier

__all__ = ["TieredBackend", "wants_tiers", "wrap"]


class _CacheSettings(Protocol):
    """What :func:`wrap` reads from a ``[[cache]]`` section (``mproxy.config.CacheConfig``)."""

    backend: str
    cache_name: str
    default_ttl: int
    max_ttl: int
    request_timeout: float
    flags: bool
    memory_cache_bytes: int
    memory_cache_ttl_seconds: int
    disk_cache_path: str
    disk_cache_bytes: int
    disk_cache_ttl_seconds: int

    def disk_cache_file(self, worker: int) -> str: ...


class _MomentoSettings(Protocol):
    local: str
    endpoint: str


class _ProxySettings(Protocol):
    workers: int


class _Settings(Protocol):
    @property
    def momento(self) -> _MomentoSettings: ...

    @property
    def proxy(self) -> _ProxySettings: ...


#: Least seconds fills of a key stay blocked after a write of it failed or timed out
#: (twice ``request_timeout`` when that is longer): a timed-out write may still land.
QUARANTINE_SECONDS = 5.0

#: ``[momento] local`` of the bundled server started with mproxy: its data does not
#: outlive it, so neither may a disk tier's.
_EMBEDDED = "embedded"


def wants_tiers(cache: _CacheSettings) -> bool:
    """Whether the ``[[cache]]`` asks for a local tier in front of its backend."""
    return cache.backend != "memory" and cache.memory_cache_bytes > 0


def wrap(
    inner: Backend,
    cache: _CacheSettings,
    config: _Settings,
    worker: int = 0,
    ttl_lookup: Callable[[Sequence[bytes]], Any] | None = None,
) -> TieredBackend:
    """``inner`` behind the tiers ``cache`` asks for, as worker ``worker`` (0: the one
    process) of ``config.proxy.workers``, which share the budgets equally.

    The disk file belongs to the Momento cache, the server and the ``flags``
    setting (:func:`~.disk.identity_of`): a file of another is emptied at open, as
    is one of the bundled embedded server (whose data is gone after a restart)."""
    workers = max(1, config.proxy.workers)
    disk = None
    if cache.disk_cache_path:
        where = config.momento.local or config.momento.endpoint or "momento"
        nonce = secrets.token_hex(8) if config.momento.local == _EMBEDDED else ""
        identity = identity_of((cache.backend, cache.cache_name, where, f"flags={cache.flags}", nonce))
        disk = open_tier(cache.disk_cache_file(max(1, worker)), cache.disk_cache_bytes // workers, identity)
    try:
        return TieredBackend(
            inner,
            MemoryTier(cache.memory_cache_bytes // workers),
            memory_ttl=float(cache.memory_cache_ttl_seconds),
            disk=disk,
            disk_ttl=float(cache.disk_cache_ttl_seconds),
            default_ttl=float(min(cache.default_ttl, cache.max_ttl)),
            max_ttl=float(cache.max_ttl),
            keeps_flags=cache.flags,
            ttl_lookup=ttl_lookup,
            quarantine=max(QUARANTINE_SECONDS, 2 * cache.request_timeout),
            workers=workers,
        )
    except BaseException:
        if disk is not None:
            disk.close()
        raise
