"""Migration from a live memcached fleet: Momento warmed from the legacy servers
while it serves (``docs/migration.md``).

Modules, each importing only those listed before it:

``hashing``  :class:`~.hashing.Ring`: which legacy server holds a key (ketama as
             libmemcached and twemproxy place keys, modula)
``legacy``   :class:`~.legacy.LegacyClient`: pooled connections to the legacy servers
``backend``  :class:`~.backend.MigratingBackend`: the modes (``warmup``, ``dual_write``,
             ``shadow``), backfills and their guard against writes

:func:`wrap` puts the migration a ``[[cache]]`` asks for (``migrate_from``) in front of
its backend (Momento, or the local tiers in front of it); the registry
(:func:`mproxy.backends.create`) calls it.
"""

from __future__ import annotations

from typing import Protocol

from mproxy.backends.base import Backend
from mproxy.backends.migrate.backend import MODES, MigratingBackend
from mproxy.backends.migrate.hashing import SCHEMES, Ring, parse_server
from mproxy.backends.migrate.legacy import LegacyClient

__all__ = ["MODES", "SCHEMES", "MigratingBackend", "wants_migration", "wrap"]


class _CacheSettings(Protocol):
    """What :func:`wrap` reads from a ``[[cache]]`` section (``mproxy.config.CacheConfig``)."""

    migrate_from: tuple[str, ...]
    migration_mode: str
    migration_hash: str
    migration_timeout: float
    migration_connections: int
    migration_shadow_rate: float
    migration_flush_legacy: bool


def wants_migration(cache: _CacheSettings) -> bool:
    """Whether the ``[[cache]]`` migrates from legacy memcached servers."""
    return bool(cache.migrate_from)


def wrap(inner: Backend, cache: _CacheSettings) -> MigratingBackend:
    """``inner`` behind the migration from ``cache.migrate_from``."""
    ring = Ring([parse_server(text) for text in cache.migrate_from], cache.migration_hash)
    legacy = LegacyClient(ring, timeout=cache.migration_timeout, connections=cache.migration_connections)
    return MigratingBackend(
        inner,
        legacy,
        cache.migration_mode,
        shadow_rate=cache.migration_shadow_rate,
        flush_legacy=cache.migration_flush_legacy,
    )
