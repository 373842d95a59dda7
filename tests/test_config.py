"""mproxy.config: defaults, momento-proxy compatibility, errors, warnings, render, docs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mproxy import config as cfg
from mproxy.config import (
    AdminConfig,
    CacheConfig,
    Config,
    ConfigError,
    DebugConfig,
    AuditConfig,
    MomentoConfig,
    ProxyConfig,
    docs_markdown,
    load,
    loads,
    render,
)
from mproxy.protocol.commands import DEFAULT_MAX_BYTES

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = '[[cache]]\ncache_name = "c"\n'

# A faithful copy of momentohq/momento-proxy config/momento_proxy.toml (ports are
# strings there: pelikan declares them as String), split around its third
# listener, which speaks RESP (Redis) and is tested separately below.
LEGACY_HEAD = """\
[admin]
# interfaces listening on
host = "0.0.0.0"
# port listening on
port = "9999"

[proxy]
# restrict the number of threads to use, defaults to number of CPUs
# threads = 1

# One or more caches must be specified. Each listens on its own port and directs
# requests to a specific Momento cache.

[[cache]]
# interfaces listening on
host = "0.0.0.0"
# port listening on
port = "11211"
# the name of the Momento cache to direct requests to
cache_name = "users"
# the TTL, in seconds, to use when items are set as 'no expiry' (TTL is zero)
# NOTE: accepted values are between 1 and 4_294_967 (inclusive)
default_ttl = 900
# The number of connections to the service for this cache.
# Defaults to 4
# connection_count = 4
# The amount of ram to try to use locally caching get results (only supported on memcached currently)
# 0 to disable
# memory_cache_bytes = 0
# How long to keep get results in memory (only supported on memcached currently)
# 0 means no expiration
# memory_cache_ttl_seconds = 0
# the protocol can be "memcache" or "resp" (Redis), the default is memcache
# protocol = "memcache"

# For compatibility reasons, by default memcache flags are stored with the value. If you are
# __certain__ you do not need this, you can opt-out and save 4 bytes per stored value. If any
# clients rely on the flags, or if multiple instances of the proxy disagree on this setting,
# you __will__ see weird errors and potentially have data corruption.
# flags = true

[[cache]]
# interfaces listening on
host = "0.0.0.0"
# port listening on
port = "11212"
# the name of the Momento cache to direct requests to
cache_name = "products"
# the TTL, in seconds, to use when items are set as 'no expiry' (TTL is zero)
# NOTE: accepted values are between 1 and 4_294_967 (inclusive)
default_ttl = 1800
# The number of connections to the service for this cache.
# Defaults to 4
# connection_count = 4
# the protocol can be "memcache" or "resp" (Redis), the default is memcache
protocol = "memcache"

# For compatibility reasons, by default memcache flags are stored with the value. If you are
# __certain__ you do not need this, you can opt-out and save 4 bytes per stored value. If any
# clients rely on the flags, or if multiple instances of the proxy disagree on this setting,
# you __will__ see weird errors and potentially have data corruption.
# flags = true
"""

LEGACY_RESP_CACHE = """\

[[cache]]
# interfaces listening on
host = "0.0.0.0"
# port listening on
port = "6379"
# the name of the Momento cache to direct requests to
cache_name = "ratings"
# the TTL, in seconds, to use when items are set as 'no expiry' (TTL is zero)
# NOTE: accepted values are between 1 and 4_294_967 (inclusive)
default_ttl = 300
# The number of connections to the service for this cache.
# Defaults to 4
# connection_count = 4
# the protocol can be "memcache" or "resp" (Redis), the default is memcache
protocol = "resp"
"""

LEGACY_TAIL = """\

# Configure the proxy's logging

[debug]
# choose from: error, warn, info, debug, trace
log_level = "info"
# optionally, log to the file below instead of standard out
# log_file = "momento-proxy.log"
# backup file name for use with log rotation
log_backup = "momento-proxy.log.old"
# trigger log rotation when the file grows beyond this size (in bytes). Set this
# option to '0' to disable log rotation.
log_max_size = 1073741824

# Configure the logging of commands

[klog]
# optionally, log commands to the file below
# file = "momento-proxy.cmd"
# backup file name for use with log rotation
backup = "momento-proxy.cmd.old"
# trigger log rotation when the file grows beyond this size (in bytes). Set this
# option to '0' to disable log rotation.
max_size = 1073741824
# specify the sampling ratio, 1 in N commands will be logged. Setting to '0'
# will disable command logging.
sample = 100
"""


def test_defaults() -> None:
    c = loads(MINIMAL)
    assert c.admin == AdminConfig(host="127.0.0.1", port=9999)
    workers = cfg.cpu_count()
    assert c.proxy == ProxyConfig(
        workers=workers, threads=workers, max_connections=1024, idle_timeout=0.0, max_item_size=1048576
    )
    (cache,) = c.caches
    assert (cache.host, cache.port, cache.backend) == ("127.0.0.1", 11211, "momento")
    assert cache.name == "c"
    assert (cache.default_ttl, cache.max_ttl, cache.connection_count) == (900, 86400, 1)
    assert (cache.request_timeout, cache.max_in_flight) == (5.0, 256)
    assert cache.flags is True and cache.allow_flush is True
    assert (cache.memory_cache_bytes, cache.memory_cache_ttl_seconds) == (0, 0)
    assert c.debug == DebugConfig(log_level="info", log_file="", log_format="text")
    assert c.audit == AuditConfig(
        file="", backup="", backup_count=3, max_size=1073741824, sample=1, queue_size=10000
    )
    assert not c.audit.enabled and c.audit.backup_path == ""
    assert c.momento == MomentoConfig(local="", api_key_env="MOMENTO_API_KEY", endpoint="")
    assert c.source == "<string>" and c.warnings == ()


def test_memory_backend_gets_a_usable_budget() -> None:
    c = loads(MINIMAL + 'backend = "memory"\n')
    assert c.caches[0].memory_cache_bytes == DEFAULT_MAX_BYTES == 64 * 1024 * 1024
    c = loads(MINIMAL + 'backend = "memory"\nmemory_cache_bytes = 1000\n')
    assert c.caches[0].memory_cache_bytes == 1000


def test_legacy_momento_proxy_config_loads_unchanged() -> None:
    c = loads(LEGACY_HEAD + LEGACY_TAIL, "momento_proxy.toml")
    assert c.warnings == ()
    assert (c.admin.host, c.admin.port) == ("0.0.0.0", 9999)
    assert [(x.host, x.port, x.cache_name, x.default_ttl) for x in c.caches] == [
        ("0.0.0.0", 11211, "users", 900),
        ("0.0.0.0", 11212, "products", 1800),
    ]
    assert c.caches[1].protocol == "memcache"
    assert c.debug.log_level == "info"
    assert c.audit.backup == "momento-proxy.cmd.old"
    assert c.audit.max_size == 1073741824 and c.audit.sample == 100
    assert not c.audit.enabled  # no file


def test_legacy_resp_listener_is_refused_by_name() -> None:
    with pytest.raises(ConfigError) as err:
        loads(LEGACY_HEAD + LEGACY_RESP_CACHE + LEGACY_TAIL, "momento_proxy.toml")
    assert str(err.value) == (
        'momento_proxy.toml: cache[2].protocol = "resp": expected one of "memcache"'
    )
    assert err.value.key == "cache[2].protocol"


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("warn", "warning"),
        ("WARN", "warning"),
        ("trace", "debug"),
        ("Error", "error"),
        ("debug", "debug"),
    ],
)
def test_log_level_aliases(text: str, normalised: str) -> None:
    assert loads(MINIMAL + f'[debug]\nlog_level = "{text}"\n').debug.log_level == normalised


def test_klog_legacy_meanings() -> None:
    c = loads(MINIMAL + '[klog]\nfile = "a.cmd"\nsample = 0\n')
    assert not c.audit.enabled
    c = loads(MINIMAL + '[klog]\nfile = "a.cmd"\n')
    assert c.audit.enabled and c.audit.backup_path == "a.cmd.old"
    c = loads(MINIMAL + '[klog]\nfile = "a.cmd"\nbackup = "b.old"\n')
    assert c.audit.backup_path == "b.old"


@pytest.mark.parametrize(
    ("local", "address"),
    [
        ("", None),
        ("embedded", None),
        ("127.0.0.1:9000", ("127.0.0.1", 9000)),
        ("[::1]:9000", ("::1", 9000)),
        ("momento-local:443", ("momento-local", 443)),
    ],
)
def test_momento_local(local: str, address: tuple[str, int] | None) -> None:
    assert loads(MINIMAL + f'[momento]\nlocal = "{local}"\n').momento.local_address == address


BAD = '[[cache]]\ncache_name = "c"\nport = 11211\n'
PORT = "expected an integer port 0-65535"
LOCAL = 'expected "" (the Momento service), "embedded" or "HOST:PORT"'
LEVELS = 'expected one of "debug", "info", "warning", "error"'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[cache]]\ncache_name = "c"\nport = "abc"\n', f'cache[0].port = "abc": {PORT}'),
        (BAD + '[[cache]]\ncache_name = "d"\nport = 70000\n', f"cache[1].port = 70000: {PORT}"),
        (MINIMAL + "port = true\n", f"cache[0].port = true: {PORT}"),
        ("[admin]\nport = -1\n" + MINIMAL, f"admin.port = -1: {PORT}"),
        (
            '[admin]\nhost = "not a host"\n' + MINIMAL,
            'admin.host = "not a host": expected a host name or IP address',
        ),
        ("[proxy]\nthreads = -1\n" + MINIMAL, "proxy.threads = -1: expected an integer 0-1024"),
        ('[proxy]\nthreads = "2"\n' + MINIMAL, 'proxy.threads = "2": expected an integer 0-1024'),
        ("[proxy]\nworkers = 1025\n" + MINIMAL, "proxy.workers = 1025: expected an integer 0-1024"),
        (
            "[proxy]\nmax_item_size = 10\n" + MINIMAL,
            "proxy.max_item_size = 10: expected an integer 1024-1073741824",
        ),
        (
            "[proxy]\nidle_timeout = -1.5\n" + MINIMAL,
            "proxy.idle_timeout = -1.5: expected a number of seconds >= 0",
        ),
        (
            MINIMAL + "request_timeout = 0\n",
            "cache[0].request_timeout = 0: expected a number of seconds 0.001-3600",
        ),
        (
            MINIMAL + "request_timeout = inf\n",
            "cache[0].request_timeout = inf: expected a number of seconds 0.001-3600",
        ),
        (
            MINIMAL + 'backend = "redis"\n',
            'cache[0].backend = "redis": expected one of "momento", "memory"',
        ),
        (MINIMAL + 'flags = "yes"\n', 'cache[0].flags = "yes": expected true or false'),
        (MINIMAL + "default_ttl = 0\n", "cache[0].default_ttl = 0: expected an integer 1-4294967"),
        ('[[cache]]\ncache_name = ""\n', 'cache[0].cache_name = "": expected a non-empty string'),
        ("[[cache]]\nport = 1\n", "cache[0].cache_name is missing: expected a non-empty string"),
        (MINIMAL + "[debug]\nlog_level = 3\n", f"debug.log_level = 3: {LEVELS}"),
        (MINIMAL + "[klog]\nsample = -1\n", "klog.sample = -1: expected an integer >= 0"),
        (MINIMAL + '[momento]\nlocal = "localhost"\n', f'momento.local = "localhost": {LOCAL}'),
        (MINIMAL + '[momento]\nlocal = "h:0"\n', f'momento.local = "h:0": {LOCAL}'),
        ("admin = 5\n" + MINIMAL, "admin = 5: expected a [admin] table"),
        ('[cache]\ncache_name = "c"\n', "cache = {...}: expected at least one [[cache]] table"),
        ("cache = []\n", "cache = [...]: expected at least one [[cache]] table"),
        ("[admin]\n", "no [[cache]] table: expected at least one"),
        (  # long values are cut short
            MINIMAL + 'port = "' + "9" * 100 + '"\n',
            'cache[0].port = "' + "9" * 56 + f"...: {PORT}",
        ),
    ],
)
def test_errors_are_one_line_naming_file_key_and_value(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        loads(text, "config/x.toml")
    assert str(err.value) == f"config/x.toml: {message}"
    assert "\n" not in str(err.value)
    assert err.value.source == "config/x.toml"


def test_api_key_env_error_never_echoes_the_value() -> None:
    secret = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0.c2lnbmF0dXJl"
    with pytest.raises(ConfigError) as err:
        loads(MINIMAL + f'[momento]\napi_key_env = "{secret}"\n', "p.toml")
    assert secret not in str(err.value)
    assert str(err.value) == (
        f"p.toml: momento.api_key_env = <{len(secret)} characters, not shown>: "
        "expected an environment variable name (letters, digits, _)"
    )


def test_toml_syntax_error_names_file_and_position() -> None:
    with pytest.raises(ConfigError) as err:
        loads('[admin]\nport = = 1\n', "config/x.toml")
    text = str(err.value)
    assert text.startswith("config/x.toml: invalid TOML: ")
    assert "line 2" in text and "column" in text and "\n" not in text


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as err:
        load(missing)
    assert str(err.value) == f"{missing}: no such file"


def test_non_utf8_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bin.toml"
    path.write_bytes(b'[[cache]]\ncache_name = "\xff"\n')
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(err.value).startswith(f"{path}: not UTF-8 text")


def test_load_names_the_source(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(MINIMAL + "[extra]\n", encoding="utf-8")
    c = load(path)
    assert c.source == str(path)
    assert c.warnings == (f"{path}: unknown section [extra] (ignored)",)


def test_unknown_keys_and_sections_warn() -> None:
    text = (
        "top = 1\n[admin]\nbogus = 1\nnevent = 1024\n"
        + MINIMAL
        + 'colour = "red"\n[debug]\nlog_backup = "x.old"\n[klog]\nqueue_depth = 4096\n'
        + "[[extras]]\na = 1\n[api]\nkey = 1\n"
    )
    c = loads(text, "w.toml")
    assert c.warnings == (
        "w.toml: unknown key top (ignored)",
        "w.toml: unknown section [[extras]] (ignored)",
        "w.toml: unknown section [api] (ignored)",
        "w.toml: unknown key admin.bogus (ignored)",
        "w.toml: unknown key cache[0].colour (ignored)",
    )


def test_warnings_never_carry_values() -> None:
    c = loads(MINIMAL + '[momento]\napi_key = "sekrit-key-value"\n')
    assert c.warnings == ("<string>: unknown key momento.api_key (ignored)",)


def test_ttl_above_cap_and_shared_names_warn() -> None:
    c = loads(
        '[[cache]]\ncache_name = "a"\nport = 1\ndefault_ttl = 100000\n'
        '[[cache]]\ncache_name = "a"\nport = 2\n',
        "t.toml",
    )
    assert c.warnings == (
        "t.toml: cache[0].default_ttl = 100000 is above max_ttl = 86400: items get max_ttl",
        't.toml: cache[1].name = "a" is also the name of cache[0]: '
        "their stats are hard to tell apart (set name)",
    )


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        ("127.0.0.1", "127.0.0.1", "but cache[0] listens on 127.0.0.1:11211"),
        ("0.0.0.0", "127.0.0.1", "but cache[0] listens on 0.0.0.0:11211"),
        ("::1", "::", "but cache[0] listens on ::1:11211"),
    ],
)
def test_duplicate_listeners_error_naming_both(first: str, second: str, message: str) -> None:
    text = (
        f'[[cache]]\ncache_name = "a"\nhost = "{first}"\nport = 11211\n'
        f'[[cache]]\ncache_name = "b"\nhost = "{second}"\nport = "11211"\n'
    )
    with pytest.raises(ConfigError) as err:
        loads(text, "d.toml")
    assert str(err.value) == (
        "d.toml: cache[1].port = 11211: expected a host:port no other listener uses, " + message
    )


def test_admin_and_cache_listener_clash() -> None:
    clash = r"cache\[0\]\.port = 9999: .* but admin listens on 127\.0\.0\.1:9999$"
    with pytest.raises(ConfigError, match=clash):
        loads(MINIMAL + "port = 9999\n")


def test_distinct_and_ephemeral_listeners_are_fine() -> None:
    c = loads(
        '[admin]\nport = 0\n'
        '[[cache]]\ncache_name = "a"\nport = 0\n[[cache]]\ncache_name = "b"\nport = 0\n'
        '[[cache]]\ncache_name = "c"\nhost = "127.0.0.1"\nport = 5\n'
        '[[cache]]\ncache_name = "d"\nhost = "127.0.0.2"\nport = 5\n'
    )
    assert [x.port for x in c.caches] == [0, 0, 5, 5]


def test_frozen_and_replace() -> None:
    c = loads(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.caches[0].port = 1  # type: ignore[misc]
    changed = dataclasses.replace(c, caches=(dataclasses.replace(c.caches[0], port=0),))
    assert changed.caches[0].port == 0 and c.caches[0].port == 11211
    assert dataclasses.replace(c.proxy, threads=4).threads == 4


def test_equality_ignores_source_and_warnings() -> None:
    assert loads(MINIMAL, "a.toml") == loads(MINIMAL + "[zzz]\n", "b.toml")
    assert loads(MINIMAL) != loads(MINIMAL + "port = 1\n")


def _every_key_changed() -> str:
    return (
        '[admin]\nhost = "::1"\nport = "0"\n'
        "[proxy]\nworkers = 1\nthreads = 1\nmax_connections = 7\nidle_timeout = 2.5\nmax_item_size = 2048\n"
        '[[cache]]\ncache_name = "tab\\there \\"q\\" \\u007f é"\nhost = "0.0.0.0"\nport = 1\n'
        'backend = "memory"\nname = "n"\nprotocol = "memcache"\ndefault_ttl = 10\nmax_ttl = 20\n'
        "connection_count = 2\nrequest_timeout = 0.25\nmax_in_flight = 3\nflags = false\n"
        "allow_flush = false\nmemory_cache_bytes = 5\nmemory_cache_ttl_seconds = 6\n"
        '[[cache]]\ncache_name = "second"\nport = 2\n'
        '[debug]\nlog_level = "WARN"\nlog_file = "/var/log/m.log"\nlog_format = "json"\n'
        '[klog]\nfile = "a"\nbackup = "b"\nbackup_count = 1\nmax_size = 0\nsample = 7\n'
        "queue_size = 9\n"
        '[momento]\nlocal = "[::1]:4000"\napi_key_env = "KEY_VAR"\n'
        'endpoint = "cell-1.example.com"\n'
    )


@pytest.mark.parametrize("text", [MINIMAL, LEGACY_HEAD + LEGACY_TAIL, _every_key_changed()])
def test_render_round_trip(text: str) -> None:
    c = loads(text, "rt.toml")
    rendered = render(c)
    again = loads(rendered, "rt.toml")
    assert again == c
    assert again.warnings == ()
    assert render(again) == rendered


def test_every_option_is_rendered_and_documented() -> None:
    rendered = render(loads(MINIMAL))
    docs = docs_markdown()
    for option in cfg.OPTIONS:
        assert f"\n{option.key} = " in rendered
        assert f"| `{option.key}` |" in docs
    assert len({(o.section, o.key) for o in cfg.OPTIONS}) == len(cfg.OPTIONS)


def test_nondefault_values_survive_round_trip() -> None:
    c = loads(_every_key_changed())
    cache = c.caches[0]
    assert cache.cache_name == 'tab\there "q" \x7f é'
    assert (cache.flags, cache.allow_flush, cache.memory_cache_bytes) == (False, False, 5)
    assert c.debug.log_level == "warning"
    assert c.momento.local_address == ("::1", 4000)
    assert c.caches[1].name == "second"


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load_cleanly(path: Path) -> None:
    c = load(path)
    assert c.warnings == ()
    assert isinstance(c, Config) and all(isinstance(x, CacheConfig) for x in c.caches)


def test_shipped_defaults_are_what_new_users_need() -> None:
    local = load(ROOT / "config" / "local.toml")
    assert (local.admin.host, local.admin.port) == ("127.0.0.1", 9999)
    assert [(x.host, x.port, x.backend, x.cache_name) for x in local.caches] == [
        ("127.0.0.1", 11211, "momento", "default-cache")
    ]
    assert local.momento.local == "embedded"
    memory = load(ROOT / "config" / "memory.toml")
    assert memory.caches[0].backend == "memory"
    # workers: the CPU count on the Momento backend, 1 on the memory backend (its store is one process's)
    assert local.proxy.workers == cfg.cpu_count() and memory.proxy.workers == 1
    assert memory == dataclasses.replace(
        local,
        proxy=dataclasses.replace(local.proxy, workers=1, threads=1),
        caches=(dataclasses.replace(
            local.caches[0], backend="memory", memory_cache_bytes=DEFAULT_MAX_BYTES
        ),),
        momento=MomentoConfig(),  # no [momento] section: nothing uses it
    )


MEMORY_CACHE = '[[cache]]\ncache_name = "m"\nbackend = "memory"\n'


def test_workers_default_to_the_cpu_count_and_to_1_with_a_memory_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cfg.loader, "cpu_count", lambda: 6)  # where the loader looks it up
    assert loads(MINIMAL).proxy.workers == 6
    assert loads("[proxy]\nworkers = 0\n" + MINIMAL).proxy.workers == 6  # 0 = automatic
    assert loads(MEMORY_CACHE).proxy.workers == 1
    assert loads(MINIMAL + MEMORY_CACHE.replace('"m"', '"m2"') + "port = 11212\n").proxy.workers == 1
    assert loads("[proxy]\nworkers = 1\n" + MEMORY_CACHE).proxy.workers == 1


def test_threads_is_an_alias_of_workers_and_workers_wins() -> None:
    only_threads = loads("[proxy]\nthreads = 3\n" + MINIMAL)
    assert (only_threads.proxy.workers, only_threads.proxy.threads, only_threads.warnings) == (3, 3, ())
    both = loads("[proxy]\nthreads = 3\nworkers = 2\n" + MINIMAL, "p.toml")
    assert (both.proxy.workers, both.proxy.threads) == (2, 2)
    assert both.warnings == (
        "p.toml: proxy.threads = 3 and proxy.workers = 2 differ: threads is momento-proxy's name "
        "for workers; using workers = 2",
    )
    assert loads("[proxy]\nthreads = 2\nworkers = 2\n" + MINIMAL).warnings == ()


@pytest.mark.parametrize("key", ["workers", "threads"])
def test_several_workers_refuse_a_memory_cache(key: str) -> None:
    text = f"[proxy]\n{key} = 2\n" + MINIMAL + MEMORY_CACHE + "port = 11212\n"
    with pytest.raises(ConfigError) as info:
        loads(text, "w.toml")
    assert info.value.key == f"proxy.{key}"
    assert str(info.value) == (
        f'w.toml: proxy.{key} = 2: expected 1 when cache[1].backend = "memory": the memory backend '
        "is one process's store, and 2 workers would split it into 2 stores that do not see each "
        f"other's items (leave {key} out: it defaults to 1 with a memory cache)"
    )


def test_production_template_shows_every_key() -> None:
    text = (ROOT / "config" / "proxy.toml").read_text(encoding="utf-8")
    keys = {
        line.split("=", 1)[0].strip()
        for line in text.splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert {o.key for o in cfg.OPTIONS} <= keys
    assert load(ROOT / "config" / "proxy.toml").momento.local == ""


def test_docs_up_to_date() -> None:
    docs = ROOT / "docs" / "configuration.md"
    current = docs.read_text(encoding="utf-8") if docs.exists() else ""
    assert current == docs_markdown(), (
        "docs/configuration.md is out of date with mproxy/config/: "
        "run `python scripts/gen_config_docs.py`"
    )


def test_local_tier_keys_load_and_are_checked() -> None:
    cfg = loads(
        '[proxy]\nworkers = 2\n[[cache]]\ncache_name = "c d"\nmemory_cache_bytes = 1048576\nmemory_cache_ttl_seconds = 30\n'
        'disk_cache_path = "/var/cache/mproxy"\ndisk_cache_bytes = 4194304\ndisk_cache_ttl_seconds = 600\n',
        source="t.toml",
    )
    cache = cfg.caches[0]
    assert cfg.warnings == ()  # the tiers exist now: no "not built yet"
    assert (cache.memory_cache_bytes, cache.memory_cache_ttl_seconds) == (1048576, 30)
    assert (cache.disk_cache_path, cache.disk_cache_bytes, cache.disk_cache_ttl_seconds) == ("/var/cache/mproxy", 4194304, 600)
    assert cache.disk_cache_file(2) == "/var/cache/mproxy/mproxy-c_d-w2.sqlite3"


@pytest.mark.parametrize(
    "keys, key, expected",
    [
        ("memory_cache_bytes = 100000\n", "cache[0].memory_cache_bytes", "at least 131072 (65536 per worker, 2 workers)"),
        ('disk_cache_path = "d"\n', "cache[0].disk_cache_path", "when memory_cache_bytes = 0"),
        ('memory_cache_bytes = 1048576\ndisk_cache_path = "d"\ndisk_cache_bytes = 1048576\n', "cache[0].disk_cache_bytes",
         "at least 2097152"),
        ('backend = "memory"\ndisk_cache_path = "d"\n', "cache[0].disk_cache_path", "a memory cache is local already"),
    ],
)
def test_local_tier_keys_refuse_what_cannot_work(keys: str, key: str, expected: str) -> None:
    workers = "[proxy]\nworkers = 1\n" if "memory\"" in keys else "[proxy]\nworkers = 2\n"
    with pytest.raises(ConfigError) as err:
        loads(workers + '[[cache]]\ncache_name = "c"\n' + keys, source="t.toml")
    assert err.value.key == key and expected in str(err.value), str(err.value)


def test_two_caches_may_not_share_a_disk_tier_file() -> None:
    text = (
        '[[cache]]\ncache_name = "a"\nport = 1\nmemory_cache_bytes = 4194304\ndisk_cache_path = "d"\n'
        '[[cache]]\ncache_name = "a"\nport = 2\nmemory_cache_bytes = 4194304\ndisk_cache_path = "d/"\n'
    )
    with pytest.raises(ConfigError, match="cache\\[1\\].disk_cache_path"):
        loads(text)
    loads(text.replace('port = 2\n', 'port = 2\nname = "b"\n'))  # another name: another file


# -- reload (SIGHUP): what applies and what waits, from the declarations ----------------

RELOAD_BASE = '[admin]\nport = 9000\n[debug]\nlog_level = "info"\n[klog]\nfile = "a.log"\n[[cache]]\ncache_name = "c"\n'


def test_reloadable_options_are_the_log_level_the_audit_log_and_tls() -> None:
    live = {f"{o.section}.{o.key}" for o in cfg.OPTIONS if o.reload}
    tls_keys = {f.name for f in dataclasses.fields(cfg.AdminConfig) if f.name.startswith("tls")}
    assert tls_keys == {"tls", "tls_cert", "tls_key", "tls_ca", "tls_verify", "tls_min_version", "tls_ciphers"}
    assert live == (
        {"debug.log_level"}
        | {f"klog.{f.name}" for f in dataclasses.fields(AuditConfig)}
        | {f"{section}.{key}" for section in ("admin", "cache") for key in tls_keys}
        | {"admin.allow_reset"}
    )


def test_reload_applies_live_options_and_reports_the_rest() -> None:
    old = loads(RELOAD_BASE, "r.toml")
    changed = (
        RELOAD_BASE.replace("9000", "9001")
        .replace('log_level = "info"', 'log_level = "debug"\nlog_file = "m.log"\nlog_format = "json"')
        .replace('"a.log"', '"b.log"')
    )
    new = loads(changed + 'port = 11300\n[proxy]\nmax_connections = 7\n[momento]\nendpoint = "e"\n', "r.toml")
    running, pending = cfg.reload(old, new)
    assert running.debug.log_level == "debug" and running.audit == new.audit
    assert running.admin == old.admin and running.proxy == old.proxy and running.caches == old.caches
    assert running.debug.log_file == "" and running.momento == old.momento
    assert pending == ["[admin] port", "[proxy]", "[[cache]] port", "[debug] log_file", "[debug] log_format", "[momento]"]
    # the next reload of the same file reports the same pending changes
    assert cfg.reload(running, new)[1] == pending


def test_reload_leaves_out_what_the_command_line_sets_and_keeps_the_source() -> None:
    old = loads(RELOAD_BASE, "r.toml")
    new = dataclasses.replace(old, debug=dataclasses.replace(old.debug, log_format="json", log_level="error"))
    running, pending = cfg.reload(old, new, overridden=("debug.log_format", "debug.log_level"))
    assert pending == [] and running.debug.log_level == "error" and running.debug.log_format == "text"
    assert running.source == "r.toml"
    assert cfg.reload(old, old) == (old, [])


def test_reload_of_added_or_removed_cache_tables_waits_for_a_restart() -> None:
    old = loads(RELOAD_BASE, "r.toml")
    new = loads(RELOAD_BASE + '[[cache]]\ncache_name = "d"\nport = 11300\n', "r.toml")
    running, pending = cfg.reload(old, new)
    assert pending == ["[[cache]]"] and running.caches == old.caches


def test_docs_mark_each_option_live_or_restart() -> None:
    docs = docs_markdown()
    for option in cfg.OPTIONS:
        mark = "live" if option.reload else "restart"
        assert f"| `{option.key}` | {option.type_doc()} |" in docs
        assert any(line.startswith(f"| `{option.key}` |") and f"| {mark} |" in line for line in docs.splitlines())
