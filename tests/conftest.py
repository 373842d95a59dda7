"""Shared fixtures: the real memcached (the reference) and mproxy subprocesses.

Fixtures
--------
``memcached_server``  (module scope) a fresh real memcached; skips when the binary
                      is missing, except under ``CI`` where that is a failure.
``mproxy_factory``    (module scope) ``factory(backend) -> Server`` starting
                      ``python -m mproxy -c CONFIG`` with the config built by
                      ``MPROXY_CONFIGS[backend]``; every server is stopped at teardown.

To run the same integration tests against another backend, add a config builder
to ``MPROXY_CONFIGS`` (for instance ``"momento"``) and select it with
``MPROXY_DIFF_TARGET`` (see ``tests/test_differential.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.servers import Server, free_port, memcached_binary, start_memcached, start_mproxy

#: memcached 1.6's default item size limit (``-I 1m``), mirrored in every mproxy config.
MAX_ITEM_SIZE = 1024 * 1024


def memory_config(port: int, admin_port: int) -> str:
    """TOML config: one cache served from the in-process memory backend."""
    return f"""\
[proxy]
max_item_size = {MAX_ITEM_SIZE}

[admin]
host = "127.0.0.1"
port = {admin_port}

[[cache]]
host = "127.0.0.1"
port = {port}
cache_name = "differential"
backend = "memory"
"""


#: Backend name -> builder of the mproxy TOML config from (data port, admin port).
MPROXY_CONFIGS: dict[str, Callable[[int, int], str]] = {"memory": memory_config}

MproxyFactory = Callable[[str], Server]


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
    server = start_memcached(tmp_path_factory.mktemp("memcached"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mproxy_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MproxyFactory]:
    """Start mproxy subprocesses by backend name; all are stopped after the module."""
    started: list[Server] = []

    def factory(backend: str) -> Server:
        if backend not in MPROXY_CONFIGS:
            known = sorted(MPROXY_CONFIGS)
            raise ValueError(f"no mproxy config for backend {backend!r}; known: {known}")
        port = free_port()
        admin_port = free_port()
        while admin_port == port:
            admin_port = free_port()
        tmp_path: Path = tmp_path_factory.mktemp(f"mproxy-{backend}")
        server = start_mproxy(MPROXY_CONFIGS[backend](port, admin_port), tmp_path, port)
        started.append(server)
        return server

    try:
        yield factory
    finally:
        for server in started:
            server.stop()
