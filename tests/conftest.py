"""Shared fixtures: the real memcached (the reference) and mproxy subprocesses.

Fixtures
--------
``memcached_server``  (module scope) a fresh real memcached; skips when the binary
                      is missing, except under ``CI`` where that is a failure.
``mproxy_factory``    (module scope) ``factory(backend, **options) -> Server``
                      starting ``python -m mproxy -c CONFIG`` with the config built by
                      ``MPROXY_CONFIGS[backend](**options)`` (ports picked by mproxy);
                      every server is stopped at teardown.

Backends: ``memory`` and ``momento`` (the latter on the bundled local Momento
server, ``[momento] local = "embedded"``). The differential tests run against the
targets named by ``MPROXY_DIFF_TARGET`` (see ``tests/test_differential.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mproxy.protocol.commands import DEFAULT_MAX_ITEM_SIZE as MAX_ITEM_SIZE
from tests.servers import Server, memcached_binary, start_memcached, start_mproxy

# MAX_ITEM_SIZE: memcached 1.6's default item size limit (``-I 1m``), mirrored in every mproxy config.


def _config(cache_keys: str) -> str:
    """TOML config: memcached's item size limit, the admin port, one ``[[cache]]``;
    port 0 everywhere (mproxy picks, ``start_mproxy`` reads what it picked)."""
    return f"""\
[proxy]
max_item_size = {MAX_ITEM_SIZE}

[admin]
host = "127.0.0.1"
port = 0

[[cache]]
host = "127.0.0.1"
port = 0
{cache_keys}"""


def memory_config() -> str:
    """TOML config: one cache served from the in-process memory backend."""
    return _config('cache_name = "differential"\nbackend = "memory"\n')


#: Options of every reference memcached. ``no_lru_maintainer`` turns off the segmented
#: LRU, whose background thread takes extra references on recently read items: with it,
#: whether ``incr``/``decr`` rewrites a value in place (space-padded) or as a new item
#: depends on thread timing (``incr_decr.txt`` differed between two runs of memcached
#: itself, about 1 run in 3). Without it an item is only re-linked after 60 s idle, which
#: no test reaches, so memcached answers deterministically.
MEMCACHED_ARGS: tuple[str, ...] = ("-o", "no_lru_maintainer")

#: Momento's maximum TTL on the bundled local server (its on-demand cap, 24 h). Used as
#: both ``max_ttl`` and ``default_ttl``: exptime 0 ("never expires" in memcached) gets
#: the longest life Momento allows, which is as close to memcached as it can be.
MOMENTO_MAX_TTL = 86400
#: Cache name used by the ``momento`` target.
MOMENTO_CACHE_NAME = "differential"


def momento_config(
    *,
    local: str = "embedded",
    default_ttl: int = MOMENTO_MAX_TTL,
    max_ttl: int = MOMENTO_MAX_TTL,
) -> str:
    """TOML config: one cache on the Momento backend, against a local Momento server.

    ``local = "embedded"`` (the default) makes mproxy start the bundled
    Momento-compatible server as its child process (stopped with it);
    ``"HOST:PORT"`` uses a server the test started (so several proxies can share
    one cache, and the test can look at the items directly). The defaults are the
    settings closest to memcached: memcached's item size limit, the longest TTL
    Momento allows for exptime 0, flags stored with the value, flush_all allowed.
    """
    return _config(
        f"""\
cache_name = "{MOMENTO_CACHE_NAME}"
backend = "momento"
default_ttl = {default_ttl}
max_ttl = {max_ttl}
flags = true
allow_flush = true

[momento]
local = "{local}"
""",
    )


#: Backend name -> builder of the mproxy TOML config from backend-specific keyword options.
MPROXY_CONFIGS: dict[str, Callable[..., str]] = {
    "memory": memory_config,
    "momento": momento_config,
}

#: ``factory(backend, **options) -> Server``; options go to the backend's config builder.
MproxyFactory = Callable[..., Server]


def require_memcached() -> None:
    """Skip the test when memcached is not installed; fail instead when ``CI`` is set."""
    if memcached_binary() is not None:
        return
    reason = "the memcached binary is not installed (Debian package 'memcached')"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must install it", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def memcached_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A fresh real memcached 1.6 on a free loopback port, stopped after the module."""
    require_memcached()
    server = start_memcached(tmp_path_factory.mktemp("memcached"), MEMCACHED_ARGS)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mproxy_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MproxyFactory]:
    """Start mproxy subprocesses by backend name; all are stopped after the module."""
    started: list[Server] = []

    def factory(backend: str, **options: object) -> Server:
        if backend not in MPROXY_CONFIGS:
            known = sorted(MPROXY_CONFIGS)
            raise ValueError(f"no mproxy config for backend {backend!r}; known: {known}")
        tmp_path: Path = tmp_path_factory.mktemp(f"mproxy-{backend}")
        server = start_mproxy(MPROXY_CONFIGS[backend](**options), tmp_path)
        started.append(server)
        return server

    try:
        yield factory
    finally:
        for server in started:
            server.stop()
