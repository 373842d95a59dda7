"""TOML configuration -> frozen dataclasses.

Every option is declared exactly once, as a dataclass field made by
:func:`~mproxy.config.options._option` (default, kind, help text, choices /
bounds). The declaration table :data:`OPTIONS`, validation in :func:`loads`,
:func:`render` and :func:`docs_markdown` are all derived from those
declarations: there is no second list of keys.

The file format is a superset of the Rust Momento Proxy's
(``momento-proxy``, built on pelikan) so its configs load unchanged: ports
may be strings, and its tuning keys that mean nothing here are accepted and
ignored (see ``legacy`` in each section). Unknown keys and sections are not
errors: they are returned as one-line strings in :attr:`Config.warnings`.
Errors raise :class:`ConfigError`, whose message is one line naming the
file, the dotted key, the offending value and what was expected.

A value that looks like a Momento API key is refused in any known key (and
never shown): the key belongs in the environment.

Stdlib only (with :mod:`mproxy.tls`, stdlib too). I/O only in :func:`load`:
the file, and the files it names (each listener's TLS files, read by
:func:`mproxy.tls.context`; the modes of files holding secrets, which draw
warnings when others may read them).

The package, each module importing only those above it:

- :mod:`~mproxy.config.kinds`: value kinds (coercion of a TOML value, its
  description), host/port syntax, TOML literals;
- :mod:`~mproxy.config.options`: :class:`Option` and the helpers that declare one;
- :mod:`~mproxy.config.schema`: the sections' dataclasses, :class:`Config`,
  :data:`SECTIONS` and :data:`OPTIONS`;
- :mod:`~mproxy.config.loader`: :func:`loads`, :func:`load`, :func:`reload`,
  :class:`ConfigError` and the checks across keys;
- :mod:`~mproxy.config.render`: :func:`render` and :func:`docs_markdown`.

Importers use this package's names (``from mproxy.config import X``).
"""

from __future__ import annotations

from mproxy.config.kinds import LOCAL_EMBEDDED
from mproxy.config.loader import (
    MIN_DISK_TIER_BYTES,
    MIN_TIER_BYTES,
    ConfigError,
    cpu_count,
    listener_tables,
    load,
    loads,
    reload,
)
from mproxy.config.options import Option
from mproxy.config.render import docs_markdown, render
from mproxy.config.schema import (
    DEFAULT_BACKLOG,
    LOG_FORMATS,
    LOG_LEVELS,
    MAX_WORKERS,
    OPTIONS,
    SECTIONS,
    AdminConfig,
    AuditConfig,
    CacheConfig,
    Config,
    DebugConfig,
    MomentoConfig,
    ProxyConfig,
    Section,
)

__all__ = [
    "AdminConfig",
    "AuditConfig",
    "CacheConfig",
    "Config",
    "ConfigError",
    "DebugConfig",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "LOCAL_EMBEDDED",
    "MomentoConfig",
    "OPTIONS",
    "Option",
    "SECTIONS",
    "Section",
    "docs_markdown",
    "listener_tables",
    "load",
    "loads",
    "reload",
    "render",
]
