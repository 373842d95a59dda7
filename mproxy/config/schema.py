"""The sections: one frozen dataclass per TOML section, and :class:`Config`.

Each field of a section's dataclass is an option declared with
:func:`~mproxy.config.options._option`; each field of :class:`Config` is a
section declared with :func:`_section`. :data:`SECTIONS` and :data:`OPTIONS`,
the declaration table the loader, :func:`~mproxy.config.reload`,
:func:`~mproxy.config.render` and :func:`~mproxy.config.docs_markdown` read,
are built from those declarations.

Stdlib only (with the limits of :mod:`mproxy.protocol.commands`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

from mproxy.config.kinds import (
    _BOOL,
    _CHOICE,
    _ENV,
    _HOST,
    _INT,
    _LOCAL,
    _NUMBER,
    _PORT,
    _SECONDS,
    _SERVERS,
    _STRING,
    LOCAL_EMBEDDED,
    _split_host_port,
)
from mproxy.config.options import _OPTION_KEY, Option, _option, _tls
from mproxy.protocol.commands import DEFAULT_MAX_BYTES, DEFAULT_MAX_ITEM_SIZE


#: ``[debug] log_level`` values, least severe first (also the CLI's ``--log-level`` choices).
LOG_LEVELS = ("debug", "info", "warning", "error")

#: ``[debug] log_format`` values (also the CLI's ``--log-format`` choices).
LOG_FORMATS = ("text", "json")

#: Most ``[proxy] workers`` (a sanity bound: one worker per core is the intended use).
MAX_WORKERS = 1024

#: ``[proxy] backlog``'s default: the queue of each listening socket (memcached's ``-b``).
DEFAULT_BACKLOG = 1024

#: The metadata key of a ``Config`` field that carries its :class:`Section`.
_SECTION_KEY = "mproxy.section"


# --------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """``[admin]``: the admin port (memcached-style ``stats``, ``version``)."""

    host: str = _option("127.0.0.1", _HOST, "Interface the admin port listens on.")
    port: int = _option(9999, _PORT, "Admin TCP port; 0 picks a free port (tests).")
    max_connections: int = _option(
        64,
        _INT,
        "Admin connections served at once (apart from `[proxy] max_connections`, so that "
        "clients cannot lock operators out); one more is answered `ERROR Too many open "
        "connections` and closed.",
        min=1,
        max=65535,
    )
    idle_timeout: float = _option(
        60.0,
        _SECONDS,
        "Close an admin connection that sends nothing for this long.",
        min=0.001,
    )
    command_timeout: float = _option(
        10.0,
        _SECONDS,
        "Seconds a client has to send a whole command line (or an HTTP request's line and "
        "headers) from its first byte; past it the connection is closed, so that bytes "
        "trickled one at a time cannot hold a connection.",
        min=0.001,
    )
    allow_reset: bool = _option(
        True,
        _BOOL,
        "`false` refuses `stats reset` on every port, admin and data (text and binary), with "
        "`CLIENT_ERROR stats reset not allowed` (as memcached refuses a disabled command); "
        "`true` resets as memcached does.",
        reload=True,
    )
    tls: bool = _tls("tls")
    tls_cert: str = _tls("tls_cert")
    tls_key: str = _tls("tls_key")
    tls_ca: str = _tls("tls_ca")
    tls_verify: str = _tls("tls_verify")
    tls_min_version: str = _tls("tls_min_version")
    tls_ciphers: str = _tls("tls_ciphers")


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """``[proxy]``: worker processes and process-wide limits."""

    workers: int = _option(
        0,
        _INT,
        "Worker processes serving the listeners, each with its own event loop and gRPC "
        "connections (every core: one worker per core is the usual choice). 0 = automatic: "
        "the number of CPUs this process may run on, but 1 when a cache has `backend = "
        "\"memory\"` (its store lives in one process, so it refuses more than 1). 1 = one "
        "process, no supervisor. With 2 or more, a supervisor process binds the listeners, "
        "serves the admin port and writes the audit log (see docs/operations.md).",
        min=0,
        max=MAX_WORKERS,
    )
    threads: int = _option(
        0,
        _INT,
        "momento-proxy's name for `workers`, accepted as an alias: used when `workers` is "
        "not set (or 0). When both are set, `workers` wins and a different `threads` draws a "
        "warning. The effective configuration shows the `workers` value here too.",
        min=0,
        max=MAX_WORKERS,
    )
    max_connections: int = _option(
        1024,
        _INT,
        "Client connections served at once, all listeners together (memcached "
        "`-c`); one more is answered `ERROR Too many open connections` and closed, "
        "as memcached does. With several workers each serves its share, "
        "`max_connections / workers` (at least 1). At start mproxy raises its open-file "
        "limit to the hard limit and refuses to start if these connections, the admin "
        "port's and about 64 more descriptors do not fit (docs/operations.md, Limits).",
        min=1,
    )
    backlog: int = _option(
        DEFAULT_BACKLOG,
        _INT,
        "Length of each listening socket's queue of connections not yet accepted "
        "(memcached `-b`, 1024 too): every listener mproxy binds, data and admin, and each "
        "worker's socket. The kernel caps it at `net.core.somaxconn`. A socket systemd passes "
        "keeps the `Backlog=` of its .socket unit.",
        min=1,
        max=65535,
    )
    idle_timeout: float = _option(
        0.0,
        _SECONDS,
        "Close a client connection that completes no command for this long (memcached "
        "`-o idle_timeout`; counted in the stat `idle_kicks`); 0 = never. Bytes that do "
        "not complete a command do not count: a client trickling a line or a data block "
        "is closed too (memcached leaves one in the middle of a data block open). A reply "
        "the client leaves unread this long closes it as well.",
        min=0,
    )
    graceful_timeout: float = _option(
        10.0,
        _SECONDS,
        "On a graceful stop (SIGTERM), how long connections may take to finish the "
        "command in hand; those still busy then are closed regardless.",
        min=0,
    )
    max_item_size: int = _option(
        DEFAULT_MAX_ITEM_SIZE,
        _INT,
        "Largest item accepted by a storage command, in bytes (memcached `-I`), counted as "
        "memcached counts it, on every backend: key + value + 59 bytes (63 with flags), so "
        "with 1 MiB the largest value for a 1-byte key is 1,048,516 bytes.",
        min=1024,
        max=1024**3,
    )


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """``[[cache]]``: one memcached listener and the cache behind it."""

    cache_name: str = _option(
        dataclasses.MISSING,
        _STRING,
        "Name of the Momento cache requests go to (for `backend = \"memory\"`, a label only).",
        min=1,
    )
    host: str = _option("127.0.0.1", _HOST, "Interface the memcached listener binds.")
    port: int = _option(11211, _PORT, "memcached TCP port; 0 picks a free port (tests).")
    backend: str = _option(
        "momento",
        _CHOICE,
        "`momento`: Momento Cache (the service, or the local server of `[momento] local`); "
        "`memory`: an in-process store, no gRPC at all.",
        choices=("momento", "memory"),
    )
    name: str = _option(
        "", _STRING, "Label of this listener in stats and logs; empty means `cache_name`."
    )
    protocol: str = _option(
        "memcache",
        _CHOICE,
        "Wire protocol (momento-proxy key): memcached's, text and binary alike (the first byte of a connection tells which).",
        choices=("memcache",),
    )
    default_ttl: int = _option(
        900,
        _INT,
        "Momento caches: TTL in seconds of items stored with exptime 0 (Momento has no "
        "'never expires'). A memory cache keeps such items until evicted, as memcached does.",
        min=1,
        max=4294967,
    )
    max_ttl: int = _option(
        86400,
        _INT,
        "Momento caches: longest TTL in seconds (Momento's cap); longer exptimes are "
        "clamped to it.",
        min=1,
    )
    connection_count: int = _option(
        1, _INT, "gRPC connections to Momento for this cache.", min=1, max=256
    )
    request_timeout: float = _option(
        5.0,
        _SECONDS,
        "Momento caches: deadline of one backend call; a call past it answers `SERVER_ERROR`.",
        min=0.001,
        max=3600,
    )
    max_in_flight: int = _option(
        256,
        _INT,
        "Momento caches: backend calls in progress at once for this cache; more wait their turn.",
        min=1,
    )
    flags: bool = _option(
        True,
        _BOOL,
        "Momento caches: store the memcached flags with the value. `false` stores raw values "
        "that other Momento clients can read, and flags read back as 0; the meta flags that "
        "mark items (`N`, `R`, `I`) are then refused. All proxies sharing a cache must agree.",
    )
    allow_flush: bool = _option(
        True, _BOOL, "`false` refuses `flush_all`, like memcached `-F`."
    )
    memory_cache_bytes: int = _option(
        0,
        _INT,
        "With `backend = \"momento\"`: bytes of the local memory tier in front of Momento "
        "(keys, values and per-item overhead counted), 0 = none (momento-proxy's key). With "
        "several workers each gets an equal share (at least 65536 bytes each). See docs/tiers.md. "
        "With `backend = \"memory\"`: the store's byte budget, "
        f"0 = {DEFAULT_MAX_BYTES // (1024 * 1024)} MiB (memcached's `-m` default).",
        min=0,
    )
    memory_cache_ttl_seconds: int = _option(
        0,
        _INT,
        "With `backend = \"momento\"` and a memory tier: longest life of a local copy, in "
        "seconds from when its value was read or written; 0 = no limit but the item's own TTL "
        "(momento-proxy's meaning). Writes through other proxies or other Momento clients are "
        "seen after at most this long: see docs/tiers.md. No effect with `backend = \"memory\"`.",
        min=0,
    )
    disk_cache_path: str = _option(
        "",
        _STRING,
        "With `backend = \"momento\"`: a directory for the disk tier (an SQLite file per worker, "
        "created if missing), behind the memory tier (which it needs); empty = no disk tier. "
        "It survives restarts; see docs/tiers.md.",
    )
    disk_cache_bytes: int = _option(
        1073741824,
        _INT,
        "Bytes of the disk tier (keys, values and per-row overhead counted), shared equally by "
        "the workers; at least 1048576 each.",
        min=0,
    )
    disk_cache_ttl_seconds: int = _option(
        0,
        _INT,
        "Longest life of a copy in the disk tier, in seconds from when its value was read or "
        "written; 0 = no limit but the item's own TTL.",
        min=0,
    )

    migrate_from: tuple[str, ...] = _option(
        (),
        _SERVERS,
        "Legacy memcached servers this cache migrates from (`\"host:port\"`, or "
        "`\"host:port:weight\"`), listed as the application's client lists them: keys are "
        "placed on them by `migration_hash`. Empty = no migration. Needs `backend = "
        "\"momento\"`. See docs/migration.md.",
    )
    migration_mode: str = _option(
        "warmup",
        _CHOICE,
        "With `migrate_from`: `dual_write`: the legacy servers answer reads, writes go to "
        "them and then to Momento (Momento failures counted, not answered); `shadow`: as "
        "`dual_write`, and `migration_shadow_rate` of the reads are also read from Momento "
        "and compared; `warmup`: Momento answers, its misses are read from the legacy "
        "servers and copied into Momento with their flags and remaining TTL, writes delete "
        "the legacy copy before they write Momento.",
        choices=("warmup", "dual_write", "shadow"),
    )
    migration_hash: str = _option(
        "ketama",
        _CHOICE,
        "How the application's client places keys on the `migrate_from` servers: `ketama` "
        "(libmemcached's weighted ketama, MD5: PHP memcached `OPT_LIBKETAMA_COMPATIBLE`, "
        "pylibmc `ketama_weighted`, twemproxy `distribution: ketama` with `hash: md5`); "
        "`ketama_fnv1a_64` (twemproxy's ketama with its default `hash: fnv1a_64`); `modula` "
        "(libmemcached's default: one-at-a-time hash modulo the servers); `modula_crc32` "
        "(python-memcached).",
        choices=("ketama", "ketama_fnv1a_64", "modula", "modula_crc32"),
    )
    migration_timeout: float = _option(
        1.0,
        _SECONDS,
        "Deadline of one request to a legacy server (connecting included). A warmup read "
        "past it is answered as a miss; a write past it answers `SERVER_ERROR`.",
        min=0.001,
        max=60,
    )
    migration_connections: int = _option(
        4, _INT, "Connections to each legacy server at most, per worker.", min=1, max=256
    )
    migration_shadow_rate: float = _option(
        0.01,
        _NUMBER,
        "With `migration_mode = \"shadow\"`: the share of reads also read from Momento and "
        "compared (0 = none, 1 = all).",
        min=0,
        max=1,
    )
    migration_flush_legacy: bool = _option(
        False,
        _BOOL,
        "`flush_all` through mproxy flushes the legacy servers too. `false`: Momento only "
        "(the legacy items then stay readable through warmup misses).",
    )

    def disk_cache_file(self, worker: int) -> str:
        """The disk tier's file of worker ``worker`` (0: the one process) in
        ``disk_cache_path``: ``mproxy-<name>-w<worker>.sqlite3``, the name's characters
        other than letters, digits, ``.``, ``_`` and ``-`` replaced by ``_``."""
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", self.name)
        return os.path.join(self.disk_cache_path, f"mproxy-{stem}-w{worker}.sqlite3")
    tls: bool = _tls("tls")
    tls_cert: str = _tls("tls_cert")
    tls_key: str = _tls("tls_key")
    tls_ca: str = _tls("tls_ca")
    tls_verify: str = _tls("tls_verify")
    tls_min_version: str = _tls("tls_min_version")
    tls_ciphers: str = _tls("tls_ciphers")


@dataclass(frozen=True, slots=True)
class DebugConfig:
    """``[debug]``: the process log."""

    log_level: str = _option(
        "info",
        _CHOICE,
        "Least severe level logged (case-insensitive; momento-proxy's `warn` and "
        "`trace` mean `warning` and `debug`).",
        choices=LOG_LEVELS,
        aliases={"warn": "warning", "trace": "debug"},
        reload=True,
    )
    log_file: str = _option("", _STRING, "Log file; empty = standard error.")
    log_format: str = _option(
        "text", _CHOICE, "`text` lines, or `json` (one object per line).", choices=LOG_FORMATS
    )


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """``[klog]`` (momento-proxy's name): the command (audit) log.

    One JSON line per logged command; keys are logged, values never.
    :attr:`enabled` and :attr:`backup_path` are the rules :mod:`mproxy.audit` follows.
    """

    file: str = _option(
        "",
        _STRING,
        "Audit log file; empty = no audit log. A reload may rename or empty it; turning the "
        "audit log on when it was off at start needs a restart.",
        reload=True,
    )
    backup: str = _option(
        "",
        _STRING,
        "File name of the newest rotated log (momento-proxy meaning); empty = `<file>.old`. "
        "Rotated files are `<backup>`, `<backup>.1`, ... (`backup_count` in all).",
        reload=True,
    )
    backup_count: int = _option(3, _INT, "Rotated files kept.", min=1, reload=True)
    max_size: int = _option(
        1073741824,
        _INT,
        "Rotate when the file grows past this many bytes; 0 = never.",
        min=0,
        reload=True,
    )
    sample: int = _option(
        1,
        _INT,
        "Log 1 command in N: 1 = every command, 0 = none (momento-proxy meaning).",
        min=0,
        reload=True,
    )
    queue_size: int = _option(
        10000,
        _INT,
        "Audit records waiting to be written; past it, records are dropped rather than "
        "slowing requests down.",
        min=1,
        reload=True,
    )

    @property
    def enabled(self) -> bool:
        """True when commands are logged: a ``file`` is set and ``sample`` >= 1."""
        return bool(self.file) and self.sample >= 1

    @property
    def backup_path(self) -> str:
        """The newest rotated file: ``backup``, or ``<file>.old``; ``""`` without a file."""
        if not self.file:
            return ""
        return self.backup or f"{self.file}.old"


@dataclass(frozen=True, slots=True)
class MomentoConfig:
    """``[momento]``: where caches with ``backend = "momento"`` connect."""

    local: str = _option(
        "",
        _LOCAL,
        "Empty: the Momento service, with the API key from the environment. `\"embedded\"`: "
        "start the bundled Momento-compatible local server (no account needed). "
        "`\"HOST:PORT\"`: a plaintext Momento-compatible server already running there.",
    )
    api_key_env: str = _option(
        "MOMENTO_API_KEY",
        _ENV,
        "Environment variable holding the API key (the legacy `MOMENTO_AUTHENTICATION` is "
        "also read). Never put the key itself in the file.",
        redact=True,
    )
    endpoint: str = _option(
        "", _STRING, "Momento endpoint, needed by v2 API keys; empty for v1 keys."
    )

    @property
    def local_address(self) -> tuple[str, int] | None:
        """``(host, port)`` when ``local`` is ``"HOST:PORT"``, else ``None``."""
        if self.local in ("", LOCAL_EMBEDDED):
            return None
        return _split_host_port(self.local)


@dataclass(frozen=True, slots=True)
class Section:
    """One TOML section: its name, dataclass, and the momento-proxy keys it ignores."""

    name: str
    cls: type
    help: str
    array: bool
    #: momento-proxy (pelikan) keys accepted without a warning and without effect
    legacy: tuple[str, ...]


def _section(
    name: str, cls: type, help: str, *, array: bool = False, legacy: tuple[str, ...] = ()
) -> Any:
    """Declare one section: a ``Config`` field carrying its :class:`Section`."""
    return field(metadata={_SECTION_KEY: Section(name, cls, help, array, legacy)})


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. ``source`` and ``warnings`` do not take part
    in equality: two configs are equal when they configure the same thing."""

    admin: AdminConfig = _section(
        "admin",
        AdminConfig,
        "The admin port: memcached-style `stats`, `stats reset`, `version`, `quit`.",
        legacy=("timeout", "nevent", "tw_tick", "tw_cap", "tw_ntick"),
    )
    proxy: ProxyConfig = _section(
        "proxy", ProxyConfig, "Processes and limits: workers, connections, timeouts, item size."
    )
    caches: tuple[CacheConfig, ...] = _section(
        "cache",
        CacheConfig,
        "One or more `[[cache]]` tables, each a memcached listener in front of one cache. "
        "Listeners must not share a host:port.",
        array=True,
    )
    debug: DebugConfig = _section(
        "debug",
        DebugConfig,
        "The process log.",
        legacy=("log_backup", "log_max_size", "log_queue_depth", "log_single_message_size"),
    )
    audit: AuditConfig = _section(
        "klog",
        AuditConfig,
        "The command (audit) log: one JSON line per sampled command, keys but never values. "
        "On when `file` is set and `sample` >= 1.",
        legacy=("interval", "nbuf", "queue_depth", "single_message_size"),
    )
    momento: MomentoConfig = _section(
        "momento",
        MomentoConfig,
        "Where `backend = \"momento\"` caches connect.",
    )
    source: str = field(default="<string>", compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)


def _build_tables() -> tuple[tuple[tuple[str, Section], ...], tuple[Option, ...]]:
    sections: list[tuple[str, Section]] = []
    options: list[Option] = []
    for f in dataclasses.fields(Config):
        if _SECTION_KEY not in f.metadata:
            continue
        sec: Section = f.metadata[_SECTION_KEY]
        sections.append((f.name, sec))
        for opt_field in dataclasses.fields(sec.cls):
            spec: Option = opt_field.metadata[_OPTION_KEY]
            options.append(dataclasses.replace(spec, section=sec.name, key=opt_field.name))
    return tuple(sections), tuple(options)


#: The sections in file order, as (``Config`` field name, :class:`Section`), and
#: every option in file order: the declaration table validation, render and docs read.
SECTIONS, OPTIONS = _build_tables()


def _options_of(section: Section) -> dict[str, Option]:
    return {o.key: o for o in OPTIONS if o.section == section.name}
