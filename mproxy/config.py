"""TOML configuration -> frozen dataclasses.

Every option is declared exactly once, as a dataclass field made by
:func:`_option` (default, kind, help text, choices / bounds). The
declaration table :data:`OPTIONS`, validation in :func:`loads`,
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
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping

from mproxy import tls
from mproxy.protocol.commands import DEFAULT_MAX_BYTES, DEFAULT_MAX_ITEM_SIZE

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

#: ``[debug] log_level`` values, least severe first (also the CLI's ``--log-level`` choices).
LOG_LEVELS = ("debug", "info", "warning", "error")

#: ``[debug] log_format`` values (also the CLI's ``--log-format`` choices).
LOG_FORMATS = ("text", "json")

#: ``[momento] local`` value that starts the bundled local server.
LOCAL_EMBEDDED = "embedded"

#: Longest rendering of an offending value inside an error message.
_MAX_SHOWN_VALUE = 60

#: Most ``[proxy] workers`` (a sanity bound: one worker per core is the intended use).
MAX_WORKERS = 1024

#: ``[proxy] backlog``'s default: the queue of each listening socket (memcached's ``-b``).
DEFAULT_BACKLOG = 1024

#: Least memory tier per worker (``memory_cache_bytes`` / workers), when there is one.
MIN_TIER_BYTES = 65536
#: Least disk tier per worker (``disk_cache_bytes`` / workers), when there is one.
MIN_DISK_TIER_BYTES = 1048576


class ConfigError(ValueError):
    """A configuration that cannot be used.

    ``str(err)`` is one line: ``<source>: <key> = <value>: expected <what>``
    (or ``<source>: <problem>`` when no single key is at fault). ``source``
    is the file name (or the ``source`` given to :func:`loads`), ``key`` the
    dotted key such as ``cache[1].port``, or ``None``.
    """

    def __init__(self, source: str, message: str, key: str | None = None) -> None:
        self.source = source
        self.key = key
        super().__init__(f"{source}: {message}")


class _Invalid(Exception):
    """Raised by a kind's coercion; the loader turns it into a ConfigError."""


# --------------------------------------------------------------------------
# Kinds: how a TOML value becomes a Python value, and how it is described.
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Kind:
    """A value kind: its coercion (raising :class:`_Invalid`), what a valid value
    looks like (error messages) and its type column in the reference."""

    coerce: Callable[[object, Option], object]
    expected: Callable[[Option], str]
    type_doc: Callable[[Option], str]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_range(number: float, option: Option) -> None:
    if option.min is not None and number < option.min:
        raise _Invalid
    if option.max is not None and number > option.max:
        raise _Invalid


def _coerce_str(value: object, option: Option) -> str:
    if not isinstance(value, str) or (option.min is not None and len(value) < option.min):
        raise _Invalid
    return value


def _coerce_int(value: object, option: Option) -> int:
    if not _is_int(value):
        raise _Invalid
    assert isinstance(value, int)
    _check_range(value, option)
    return value


def _coerce_number(value: object, option: Option) -> float:
    if not (_is_int(value) or isinstance(value, float)):
        raise _Invalid
    assert isinstance(value, (int, float))
    number = float(value)
    if not math.isfinite(number):
        raise _Invalid
    _check_range(number, option)
    return number


def _coerce_bool(value: object, option: Option) -> bool:
    if not isinstance(value, bool):
        raise _Invalid
    return value


def _coerce_port(value: object, option: Option) -> int:
    # momento-proxy (pelikan) declares ports as strings: accept "11211" too.
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if not _is_int(value):
        raise _Invalid
    assert isinstance(value, int)
    if not 0 <= value <= 65535:
        raise _Invalid
    return value


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?$")


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return bool(_HOSTNAME.match(host))
    return True


def _coerce_host(value: object, option: Option) -> str:
    if not isinstance(value, str) or not _valid_host(value):
        raise _Invalid
    return value


def _coerce_choice(value: object, option: Option) -> str:
    if not isinstance(value, str):
        raise _Invalid
    word = value.lower()
    word = option.aliases.get(word, word)
    if word not in option.choices:
        raise _Invalid
    return word


def _split_host_port(text: str) -> tuple[str, int] | None:
    """``"HOST:PORT"`` (``"[v6]:PORT"`` for IPv6) -> (host, port), or None."""
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()):
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    elif ":" in host or not _valid_host(host):
        return None
    number = int(port)
    if not 1 <= number <= 65535:
        return None
    return host, number


def _coerce_local(value: object, option: Option) -> str:
    if not isinstance(value, str):
        raise _Invalid
    if value in ("", LOCAL_EMBEDDED) or _split_host_port(value) is not None:
        return value
    raise _Invalid


def _split_server(text: str) -> tuple[str, int, int] | None:
    """``"HOST:PORT"`` or ``"HOST:PORT:WEIGHT"`` (a memcached client's server entry) ->
    (host, port, weight), or None."""
    place = _split_host_port(text)
    if place is not None:
        return place[0], place[1], 1
    head, sep, weight = text.rpartition(":")
    place = _split_host_port(head) if sep and weight.isascii() and weight.isdigit() else None
    if place is None or int(weight) < 1:
        return None
    return place[0], place[1], int(weight)


def _coerce_servers(value: object, option: Option) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and _split_server(v) for v in value):
        raise _Invalid
    return tuple(value)


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _coerce_env_name(value: object, option: Option) -> str:
    if not isinstance(value, str) or not _ENV_NAME.match(value):
        raise _Invalid
    return value


def _bounds(option: Option) -> str:
    """`` 1-10``, `` >= 1``, `` <= 10`` or ``""``: the option's range."""
    lo, hi = option.min, option.max
    fmt = (lambda n: f"{n:g}") if option.kind in (_SECONDS, _NUMBER) else (lambda n: f"{int(n)}")
    if lo is not None and hi is not None:
        return f" {fmt(lo)}-{fmt(hi)}"
    if lo is not None:
        return f" >= {fmt(lo)}"
    if hi is not None:
        return f" <= {fmt(hi)}"
    return ""


def _fixed(text: str) -> Callable[[Option], str]:
    return lambda option: text


_STRING = _Kind(
    _coerce_str,
    lambda o: "a non-empty string" if o.min else "a string",
    lambda o: "non-empty string" if o.min else "string",
)
_INT = _Kind(_coerce_int, lambda o: "an integer" + _bounds(o), lambda o: "integer" + _bounds(o))
_SECONDS = _Kind(
    _coerce_number,
    lambda o: "a number of seconds" + _bounds(o),
    lambda o: "seconds (number)" + _bounds(o),
)
_NUMBER = _Kind(_coerce_number, lambda o: "a number" + _bounds(o), lambda o: "number" + _bounds(o))
_BOOL = _Kind(_coerce_bool, _fixed("true or false"), _fixed("boolean"))
_SERVERS = _Kind(
    _coerce_servers,
    _fixed('a list of "HOST:PORT" or "HOST:PORT:WEIGHT" strings'),
    _fixed('list of `"HOST:PORT"` or `"HOST:PORT:WEIGHT"`'),
)
_PORT = _Kind(
    _coerce_port, _fixed("an integer port 0-65535"), _fixed("port 0-65535 (integer or string)")
)
_HOST = _Kind(_coerce_host, _fixed("a host name or IP address"), _fixed("host name or IP address"))
_CHOICE = _Kind(
    _coerce_choice,
    lambda o: "one of " + ", ".join(f'"{c}"' for c in o.choices),
    lambda o: " \\| ".join(f'`"{c}"`' for c in o.choices),
)
_LOCAL = _Kind(
    _coerce_local,
    _fixed('"" (the Momento service), "embedded" or "HOST:PORT"'),
    _fixed('`""` \\| `"embedded"` \\| `"HOST:PORT"`'),
)
_ENV = _Kind(
    _coerce_env_name,
    _fixed("an environment variable name (letters, digits, _)"),
    _fixed("environment variable name"),
)

# --------------------------------------------------------------------------
# The declaration: Option records carried by dataclass fields.
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Option:
    """One configuration key, as declared on its dataclass field.

    ``section`` and ``key`` are filled in when :data:`OPTIONS` is built;
    ``default`` is ``dataclasses.MISSING`` for a required key.
    """

    kind: _Kind
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)
    min: float | None = None
    max: float | None = None
    #: never echo the value in errors (it may be a secret typed in the wrong place)
    redact: bool = False
    #: a reload (SIGHUP) applies a new value at once; otherwise it waits for a restart
    #: (see :func:`reload`; ``mproxy.app`` applies the running configuration)
    reload: bool = False
    section: str = ""
    key: str = ""

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    def expected(self) -> str:
        """What a valid value looks like, for error messages."""
        return self.kind.expected(self)

    def type_doc(self) -> str:
        """The type column of the reference (Markdown)."""
        return self.kind.type_doc(self)


_OPTION_KEY = "mproxy.option"
_SECTION_KEY = "mproxy.section"


def _option(
    default: Any,
    kind: _Kind,
    help: str,
    *,
    choices: tuple[str, ...] = (),
    aliases: Mapping[str, str] | None = None,
    min: float | None = None,
    max: float | None = None,
    redact: bool = False,
    reload: bool = False,
) -> Any:
    """Declare one option: a dataclass field carrying its :class:`Option`."""
    spec = Option(kind, default, help, choices, dict(aliases or {}), min, max, redact, reload)
    if default is dataclasses.MISSING:
        return field(metadata={_OPTION_KEY: spec})
    return field(default=default, metadata={_OPTION_KEY: spec})


#: The TLS keys of a listener (memcached's ``-Z`` and ``ssl_*`` options, see
#: :mod:`mproxy.tls`), declared once for ``[[cache]]`` and ``[admin]``: :func:`_tls`.
_TLS_OPTIONS: dict[str, Option] = {
    "tls": Option(
        _BOOL,
        False,
        "Serve TLS on this listener (memcached `-Z`); needs `tls_cert` and `tls_key`. The "
        "handshake runs in the connection's own greenlet: one that fails, or is not done "
        f"within {tls.HANDSHAKE_TIMEOUT:g} s (a plaintext client, a stalled one), closes that "
        "connection and counts in the stat `ssl_handshake_errors`.",
        reload=True,
    ),
    "tls_cert": Option(
        _STRING,
        "",
        "PEM file: the listener's certificate, then any intermediate certificates (memcached "
        "`ssl_chain_cert`). Every reload (SIGHUP) reads the TLS files again: renew them in "
        "place, then reload; connections made after it get the new certificate.",
        reload=True,
    ),
    "tls_key": Option(
        _STRING,
        "",
        "PEM file: the certificate's private key, unencrypted (memcached `ssl_key`). mproxy "
        "warns at start if others may read it (or its group, unless root owns it).",
        reload=True,
    ),
    "tls_ca": Option(
        _STRING,
        "",
        "PEM file: the CA certificates client certificates are checked against (memcached "
        "`ssl_ca_cert`); needed when `tls_verify` is not `none`.",
        reload=True,
    ),
    "tls_verify": Option(
        _CHOICE,
        "none",
        "Client certificates (memcached `ssl_verify_mode` 0, 1, 2): `none`: not asked for; "
        "`optional`: asked for, and one that does not verify against `tls_ca` is refused; "
        "`require`: a client without a valid one is refused.",
        choices=tuple(tls.VERIFY),
        reload=True,
    ),
    "tls_min_version": Option(
        _CHOICE,
        "1.2",
        "Oldest TLS version accepted (memcached `ssl_min_version`; its `tlsv1.2`, `tlsv1.3` "
        "are accepted too).",
        choices=tuple(tls.MIN_VERSIONS),
        aliases={f"tlsv{v}": v for v in tls.MIN_VERSIONS},
        reload=True,
    ),
    "tls_ciphers": Option(
        _STRING,
        "",
        "OpenSSL cipher list for TLS 1.2 (memcached `ssl_ciphers`); empty = OpenSSL's "
        "default. TLS 1.3 uses OpenSSL's TLS 1.3 suites.",
        reload=True,
    ),
}


def _tls(key: str) -> Any:
    """The field of TLS key ``key`` (:data:`_TLS_OPTIONS`)."""
    spec = _TLS_OPTIONS[key]
    return field(default=spec.default, metadata={_OPTION_KEY: spec})


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


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def _toml_value(value: object) -> str:
    """A scalar as a TOML literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        out = ['"']
        for ch in value:
            if ch == '"' or ch == "\\":
                out.append("\\" + ch)
            elif ch == "\t":
                out.append(ch)
            elif ord(ch) < 0x20 or ord(ch) == 0x7F:
                out.append(f"\\u{ord(ch):04X}")
            else:
                out.append(ch)
        out.append('"')
        return "".join(out)
    raise TypeError(f"not a TOML scalar: {type(value).__name__}")


def _show(value: object, option: Option | None = None) -> str:
    """An offending value for an error message: TOML-like, one line, bounded."""
    if option is not None and option.redact:
        size = len(value) if isinstance(value, str) else 0
        return f"<{size} characters, not shown>"
    if isinstance(value, dict):
        text = "{...}"
    elif isinstance(value, list):
        text = "[...]"
    elif isinstance(value, (bool, int, float, str)):
        text = _toml_value(value)
    else:  # dates and times
        text = str(value)
    if len(text) > _MAX_SHOWN_VALUE:
        text = text[: _MAX_SHOWN_VALUE - 3] + "..."
    return text


#: What a Momento API key looks like: every kind (legacy token, v1 key, v2 key) is
#: base64 of JSON (``eyJ`` is ``{"``), alone or as the segments of a JWT, and long.
_API_KEY_SHAPE = re.compile(r"\s*eyJ[A-Za-z0-9+/=_.-]{40,}\s*")


def _api_keys(value: object, path: str) -> list[str]:
    """The dotted paths, in ``value`` found at ``path``, of strings that look like an API key."""
    if isinstance(value, str):
        return [path] if _API_KEY_SHAPE.fullmatch(value) else []
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _api_keys(v, f"{path}.{k}" if path else k)]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _api_keys(v, f"{path}[{i}]")]
    return []


def _exposure(path: str) -> str:
    """``"others (mode 0644)"`` or ``"its group (mode 0640)"`` when others, or the file's
    group, may read the file at ``path``; ``""`` when neither may (or it cannot be
    looked at). Group read is fine for a file root owns: a root-owned 0640 file is how
    a secret is shared with a service's group (PostgreSQL's rule for its key file)."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    mode = st.st_mode & 0o7777
    if mode & 0o004:
        return f"others (mode {mode:04o})"
    if mode & 0o040 and st.st_uid != 0:
        return f"its group (mode {mode:04o})"
    return ""


class _Loader:
    """One pass over a parsed document; collects warnings, raises on errors."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.warnings: list[str] = []
        #: where the document holds values that look like an API key (ignored keys only:
        #: a known key with such a value is an error)
        self.api_keys: list[str] = []

    def error(
        self, path: str, value: object, expected: str, option: Option | None = None
    ) -> ConfigError:
        shown = _show(value, option)
        return ConfigError(self.source, f"{path} = {shown}: expected {expected}", path)

    def warn(self, message: str) -> None:
        self.warnings.append(f"{self.source}: {message}")

    def table(self, section: Section, raw: dict[str, Any], path: str) -> Any:
        options = _options_of(section)
        values: dict[str, object] = {}
        for key, value in raw.items():
            option = options.get(key)
            if option is None:
                if key not in section.legacy:
                    self.warn(f"unknown key {path}.{key} (ignored)")
                self.api_keys += _api_keys(value, f"{path}.{key}")
                continue
            if _api_keys(value, key):
                raise ConfigError(
                    self.source,
                    f"{path}.{key} = <what looks like a Momento API key, not shown>: expected "
                    f"{option.expected()}; the key belongs in the environment (the variable "
                    "[momento] api_key_env names), never in the file",
                    f"{path}.{key}",
                )
            try:
                values[key] = option.kind.coerce(value, option)
            except _Invalid:
                raise self.error(f"{path}.{key}", value, option.expected(), option) from None
        for option in options.values():
            if option.required and option.key not in values:
                raise ConfigError(
                    self.source,
                    f"{path}.{option.key} is missing: expected {option.expected()}",
                    f"{path}.{option.key}",
                )
        return section.cls(**values)

    def section(self, section: Section, raw: object) -> Any:
        if section.array:
            if raw is None:
                raise ConfigError(
                    self.source, f"no [[{section.name}]] table: expected at least one", section.name
                )
            if not isinstance(raw, list) or not raw or not all(isinstance(t, dict) for t in raw):
                raise self.error(
                    section.name, raw, f"at least one [[{section.name}]] table"
                )
            return tuple(
                self.table(section, t, f"{section.name}[{i}]") for i, t in enumerate(raw)
            )
        if raw is None:
            return section.cls()
        if not isinstance(raw, dict):
            raise self.error(section.name, raw, f"a [{section.name}] table")
        return self.table(section, raw, section.name)

    def text(self, text: str) -> Config:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(self.source, f"invalid TOML: {exc}") from None
        return self.document(doc)

    def document(self, doc: dict[str, Any]) -> Config:
        known = {sec.name for _, sec in SECTIONS}
        for key, value in doc.items():
            if key in known:
                continue
            self.api_keys += _api_keys(value, key)
            if isinstance(value, dict):
                self.warn(f"unknown section [{key}] (ignored)")
            elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
                self.warn(f"unknown section [[{key}]] (ignored)")
            else:
                self.warn(f"unknown key {key} (ignored)")
        parts = {attr: self.section(sec, doc.get(sec.name)) for attr, sec in SECTIONS}
        parts["caches"] = tuple(self.resolve_cache(c) for c in parts["caches"])
        parts["proxy"] = self.resolve_workers(parts["proxy"], parts["caches"])
        config = Config(**parts, source=self.source)
        self.check_listeners(config)
        self.check_caches(config.caches, config.proxy.workers)
        self.check_tls_off(config)
        return dataclasses.replace(config, warnings=tuple(self.warnings))

    def check_tls_off(self, config: Config) -> None:
        """A listener with TLS files set but ``tls`` off serves plaintext: say so."""
        for where, listener in listener_tables(config):
            files = [key for key in ("tls_cert", "tls_key", "tls_ca") if getattr(listener, key)]
            if files and not listener.tls:
                self.warn(f"{where}.{', '.join(files)} set but {where}.tls = false: this listener serves plaintext")

    def check_files(self, config: Config) -> Config:
        """What :func:`load` adds to :func:`loads`: the TLS files of every listener with
        TLS on are read and checked (:func:`mproxy.tls.context`), and a file holding a
        secret that others may read is warned about (see :func:`_exposure`)."""
        exposed = _exposure(self.source) if self.api_keys else ""
        if exposed:
            self.warnings.append(
                f"{self.source} is readable by {exposed} and holds what looks like a Momento API key "
                f"({', '.join(self.api_keys)}): delete it from the file (mproxy reads the key from the "
                "environment only, and ignores it there)"
            )
        for where, listener in listener_tables(config):
            if not listener.tls:
                continue
            try:
                tls.context(listener, f"{where}.")
            except tls.TlsError as err:
                raise ConfigError(self.source, str(err), err.key) from None
            exposed = _exposure(listener.tls_key)
            if exposed:
                self.warn(
                    f"{where}.tls_key = {_toml_value(listener.tls_key)}: the private key is readable by "
                    f"{exposed}: chmod 600 it (or 640 with root as its owner, to share it with a group)"
                )
        return dataclasses.replace(config, warnings=tuple(self.warnings))

    @staticmethod
    def resolve_cache(cache: CacheConfig) -> CacheConfig:
        """Fill the defaults that depend on other keys."""
        if not cache.name:
            cache = dataclasses.replace(cache, name=cache.cache_name)
        if cache.backend == "memory" and cache.memory_cache_bytes == 0:
            cache = dataclasses.replace(cache, memory_cache_bytes=DEFAULT_MAX_BYTES)
        return cache

    def resolve_workers(self, proxy: ProxyConfig, caches: tuple[CacheConfig, ...]) -> ProxyConfig:
        """``workers`` from ``workers``, its alias ``threads``, or the automatic default;
        a memory cache allows only 1 (its store cannot be split across processes)."""
        key, workers = "workers", proxy.workers
        if proxy.threads and not workers:
            key, workers = "threads", proxy.threads
        elif proxy.threads and proxy.threads != workers:
            self.warn(f"proxy.threads = {proxy.threads} and proxy.workers = {workers} differ: "
                      f"threads is momento-proxy's name for workers; using workers = {workers}")
        memory = next((i for i, cache in enumerate(caches) if cache.backend == "memory"), None)
        if not workers:
            workers = 1 if memory is not None else cpu_count()
        elif workers > 1 and memory is not None:
            raise ConfigError(
                self.source,
                f"proxy.{key} = {workers}: expected 1 when cache[{memory}].backend = \"memory\": "
                f"the memory backend is one process's store, and {workers} workers would split it "
                f"into {workers} stores that do not see each other's items (leave {key} out: "
                "it defaults to 1 with a memory cache)",
                f"proxy.{key}",
            )
        return dataclasses.replace(proxy, workers=workers, threads=workers)

    def check_listeners(self, config: Config) -> None:
        """No two listeners may bind the same address (port 0 is always free)."""
        wildcards = {"0.0.0.0", "::"}
        seen: list[tuple[str, str, int]] = []
        for path, table in listener_tables(config):
            host, port = table.host, table.port
            if port == 0:
                continue
            for other_path, other_host, other_port in seen:
                if port == other_port and (
                    host == other_host or host in wildcards or other_host in wildcards
                ):
                    raise ConfigError(
                        self.source,
                        f"{path}.port = {port}: expected a host:port no other listener uses, "
                        f"but {other_path} listens on {other_host}:{other_port}",
                        f"{path}.port",
                    )
            seen.append((path, host, port))

    def check_caches(self, caches: tuple[CacheConfig, ...], workers: int) -> None:
        names: dict[str, int] = {}
        for i, cache in enumerate(caches):
            if cache.default_ttl > cache.max_ttl:
                self.warn(
                    f"cache[{i}].default_ttl = {cache.default_ttl} is above "
                    f"max_ttl = {cache.max_ttl}: items get max_ttl"
                )
            if cache.name in names:
                self.warn(
                    f"cache[{i}].name = {_toml_value(cache.name)} is also the name of "
                    f"cache[{names[cache.name]}]: their stats are hard to tell apart "
                    "(set name)"
                )
            names.setdefault(cache.name, i)
            self.check_tiers(i, cache, workers)
            self.check_migration(i, cache)
        disks: dict[tuple[str, str], int] = {}
        for i, cache in enumerate(caches):
            if cache.disk_cache_path:
                place = (os.path.normpath(cache.disk_cache_path), cache.disk_cache_file(1))
                if place in disks:
                    raise ConfigError(
                        self.source,
                        f"cache[{i}].disk_cache_path = {_toml_value(cache.disk_cache_path)}: expected a directory "
                        f"cache[{disks[place]}] does not use under the same name (set name or another directory)",
                        f"cache[{i}].disk_cache_path",
                    )
                disks[place] = i

    def check_migration(self, i: int, cache: CacheConfig) -> None:
        """``migrate_from``: in front of Momento, each server once."""
        where = f"cache[{i}]"
        if not cache.migrate_from:
            return
        if cache.backend != "momento":
            raise ConfigError(
                self.source,
                f"{where}.migrate_from = {_show(list(cache.migrate_from))}: expected [] with "
                f"backend = {_toml_value(cache.backend)} (a migration warms a Momento cache)",
                f"{where}.migrate_from",
            )
        seen: set[tuple[str, int]] = set()
        for text in cache.migrate_from:
            server = _split_server(text)
            assert server is not None  # checked by its kind
            if server[:2] in seen:
                raise ConfigError(
                    self.source,
                    f"{where}.migrate_from: {_toml_value(text)} is listed twice: expected each server once",
                    f"{where}.migrate_from",
                )
            seen.add(server[:2])

    def check_tiers(self, i: int, cache: CacheConfig, workers: int) -> None:
        """The local tiers' keys: only in front of Momento, a disk tier behind a memory
        tier, and shares that are worth having."""
        where = f"cache[{i}]"
        if cache.backend == "memory":
            if cache.disk_cache_path:
                raise ConfigError(
                    self.source,
                    f"{where}.disk_cache_path = {_toml_value(cache.disk_cache_path)}: expected \"\" with "
                    "backend = \"memory\" (the local tiers are in front of Momento; a memory cache is local already)",
                    f"{where}.disk_cache_path",
                )
            return
        if cache.memory_cache_bytes and cache.memory_cache_bytes // workers < MIN_TIER_BYTES:
            raise ConfigError(
                self.source,
                f"{where}.memory_cache_bytes = {cache.memory_cache_bytes}: expected 0 (no memory tier) or at least "
                f"{MIN_TIER_BYTES * workers} ({MIN_TIER_BYTES} per worker, {workers} workers)",
                f"{where}.memory_cache_bytes",
            )
        if not cache.disk_cache_path:
            return
        if not cache.memory_cache_bytes:
            raise ConfigError(
                self.source,
                f"{where}.disk_cache_path = {_toml_value(cache.disk_cache_path)}: expected \"\" when "
                "memory_cache_bytes = 0 (the disk tier is behind the memory tier, which its hits are promoted to)",
                f"{where}.disk_cache_path",
            )
        if cache.disk_cache_bytes // workers < MIN_DISK_TIER_BYTES:
            raise ConfigError(
                self.source,
                f"{where}.disk_cache_bytes = {cache.disk_cache_bytes}: expected at least "
                f"{MIN_DISK_TIER_BYTES * workers} ({MIN_DISK_TIER_BYTES} per worker, {workers} workers)",
                f"{where}.disk_cache_bytes",
            )


def listener_tables(config: Config) -> list[tuple[str, AdminConfig | CacheConfig]]:
    """Every listener's table with its dotted name: ``admin``, ``cache[0]``, ..."""
    return [("admin", config.admin), *((f"cache[{i}]", cache) for i, cache in enumerate(config.caches))]


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one): the
    automatic ``[proxy] workers``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def loads(text: str, source: str = "<string>") -> Config:
    """Parse and validate TOML ``text``; ``source`` names it in messages.

    Raises :class:`ConfigError`; unknown keys end up in ``Config.warnings``.
    No file is read: :func:`load` checks the files the configuration names.
    """
    return _Loader(source).text(text)


def load(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate the TOML file at ``path``, and check the files it names
    (:meth:`_Loader.check_files`: TLS certificates and keys, secrets others may read)."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ConfigError(source, "no such file") from None
    except OSError as exc:
        raise ConfigError(source, f"cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(source, f"not UTF-8 text (byte {exc.start})") from None
    loader = _Loader(source)
    return loader.check_files(loader.text(text))


def reload(old: Config, new: Config, overridden: Collection[str] = ()) -> tuple[Config, list[str]]:
    """What a reload (SIGHUP) of ``new`` does to the running ``old``, from the declarations.

    Returns the configuration to run with: ``old`` with the value of every
    ``reload=True`` option taken from ``new``; and the changes left for a
    restart, each as ``"[section]"`` for a section none of whose options
    reloads, else as ``"[section] key"``. ``overridden`` names options set by
    the command line (``"debug.log_format"``): their file value does not
    matter, so their changes are not reported.
    """
    parts: dict[str, Any] = {}
    pending: list[str] = []
    for attr, section in SECTIONS:
        header = f"[[{section.name}]]" if section.array else f"[{section.name}]"
        before, after = getattr(old, attr), getattr(new, attr)
        if not section.array:
            before, after = (before,), (after,)
        if len(before) != len(after):
            pending.append(header)  # tables added or removed: the running ones stay as they are
            continue
        options = _options_of(section).values()
        live = [o.key for o in options if o.reload]
        changed = [
            o.key
            for o in options
            if not o.reload
            and f"{o.section}.{o.key}" not in overridden
            and any(getattr(b, o.key) != getattr(a, o.key) for b, a in zip(before, after))
        ]
        if changed:
            pending += [f"{header} {key}" for key in changed] if live else [header]
        tables = tuple(dataclasses.replace(b, **{k: getattr(a, k) for k in live}) for b, a in zip(before, after))
        parts[attr] = tables if section.array else tables[0]
    return dataclasses.replace(old, **parts), pending


# --------------------------------------------------------------------------
# Rendering and docs
# --------------------------------------------------------------------------


def render(config: Config) -> str:
    """The effective configuration as TOML; ``loads(render(c)) == c``."""
    source = " ".join(config.source.splitlines())
    lines = [f"# mproxy effective configuration (from {source})"]
    for attr, section in SECTIONS:
        value = getattr(config, attr)
        tables = value if section.array else (value,)
        for table in tables:
            lines.append("")
            lines.append(f"[[{section.name}]]" if section.array else f"[{section.name}]")
            for f in dataclasses.fields(table):
                lines.append(f"{f.name} = {_toml_value(getattr(table, f.name))}")
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def docs_markdown() -> str:
    """The configuration reference (``docs/configuration.md``), from :data:`OPTIONS`."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated from mproxy/config.py by `python scripts/gen_config_docs.py`; "
        "do not edit. -->",
        "",
        "mproxy reads one TOML file. Its format is a superset of "
        "the Rust Momento Proxy's (`momento-proxy`): those files load unchanged, ports may "
        "be integers or strings, and momento-proxy tuning keys that mean nothing here are "
        "accepted and ignored (listed under each section).",
        "",
        "- An invalid value stops the start with one line naming the file, the key, the "
        "value and what was expected, e.g. "
        '`proxy.toml: cache[0].port = "abc": expected an integer port 0-65535`.',
        "- Unknown sections and keys are not errors: each is logged as a warning naming "
        "the file and the key.",
        "- `SIGHUP` re-reads the file. Keys marked *live* in the Reload column take their "
        "new value at once; a changed key marked *restart* is logged as a warning and keeps "
        "its running value until the next start. A file that does not load is logged and "
        "changes nothing.",
        "- `config/proxy.toml` is a commented template with every key; `config/local.toml` "
        "runs on the bundled local Momento-compatible server, `config/memory.toml` on an "
        "in-process store.",
        "",
    ]
    for _, section in SECTIONS:
        header = f"[[{section.name}]]" if section.array else f"[{section.name}]"
        out += [f"## `{header}`", "", section.help, ""]
        out += ["| Key | Type | Default | Reload | Description |", "| --- | --- | --- | --- | --- |"]
        for option in OPTIONS:
            if option.section != section.name:
                continue
            default = "required" if option.required else f"`{_toml_value(option.default)}`"
            reload = "live" if option.reload else "restart"
            out.append(
                f"| `{option.key}` | {option.type_doc()} | {default} | {reload} | {_md_cell(option.help)} |"
            )
        if section.legacy:
            keys = ", ".join(f"`{k}`" for k in section.legacy)
            out += ["", f"Accepted from momento-proxy configs and ignored: {keys}."]
        out.append("")
    return "\n".join(out)
