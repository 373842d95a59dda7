"""Loading: TOML text or a file -> a checked :class:`~mproxy.config.Config`.

:func:`loads` parses and validates text, :func:`load` reads a file and also
checks the files it names (TLS certificates and keys, the modes of files
holding secrets), :func:`reload` works out what a reload (SIGHUP) changes.
Errors raise :class:`ConfigError`; warnings end up in ``Config.warnings``.
A value that looks like a Momento API key is refused in any known key (and
never shown).

Stdlib only (with :mod:`mproxy.tls`, stdlib too). I/O only in :func:`load`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from typing import Any, Collection

from mproxy import tls
from mproxy.config.kinds import _Invalid, _split_server, _toml_value
from mproxy.config.options import Option
from mproxy.config.schema import SECTIONS, AdminConfig, CacheConfig, Config, ProxyConfig, Section, _options_of
from mproxy.protocol.commands import DEFAULT_MAX_BYTES

#: Longest rendering of an offending value inside an error message.
_MAX_SHOWN_VALUE = 60

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


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


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
