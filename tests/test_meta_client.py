"""A client library that speaks only the meta protocol, against mproxy on both backends.

``meta-memcache`` (PyPI, RevenueCat's maintained meta-only client): its basic
operations through mproxy, with its own framing, flag building and parsing.
Every call is checked against a real memcached 1.6.18 as well, so a test that
passes on memcached and fails on mproxy is a difference of mproxy's.

Its high-level ``get``/``multi_get`` ask every hit for ``t h l`` (TTL, hit
before, last access), its leases and stale reads use ``N``, ``I``, ``W``/``Z``/``X``:
the Momento backend serves them all (``docs/compatibility.md``, "Meta commands").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import MPROXY_CONFIGS
from tests.servers import HOST, Server, start_memcached, start_mproxy

meta_memcache = pytest.importorskip("meta_memcache")
from meta_memcache import (  # noqa: E402
    CacheClient,
    Key,
    LeasePolicy,
    RequestFlags,
    ServerAddress,
    StalePolicy,
    Value,
    connection_pool_factory_builder,
)

pytestmark = pytest.mark.e2e

TARGETS = ["memcached", *sorted(MPROXY_CONFIGS)]


@pytest.fixture(scope="module", params=TARGETS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Server]]:
    name: str = request.param
    tmp = tmp_path_factory.mktemp(f"meta-client-{name}")
    if name == "memcached":
        from tests.conftest import MEMCACHED_ARGS, require_memcached

        require_memcached()
        started = start_memcached(tmp, MEMCACHED_ARGS)
    else:
        started = start_mproxy(MPROXY_CONFIGS[name](), tmp)
    try:
        yield name, started
    finally:
        started.stop()


@pytest.fixture()
def client(server: tuple[str, Server]) -> Any:
    _, started = server
    cache = CacheClient.cache_client_from_servers(
        servers=[ServerAddress(host=HOST, port=started.port)],
        connection_pool_factory_fn=connection_pool_factory_builder(recv_timeout=5, connection_timeout=5),
    )
    # no flush in the meta protocol: delete what the tests use
    for key in ("a", "s", "n", "lease", "obj", "b" * 300, "stale", "n2"):
        cache.delete(key=key)
    cache.delete(key=Key("ünïcode"))
    return cache


@pytest.fixture()
def backend(server: tuple[str, Server]) -> str:
    return server[0]


def read(client: Any, key: str | Key) -> Any:
    """The value of ``key`` by the client's high-level get (asks for ``v f t h l``)."""
    return client.get(key=key)


def test_set_get_delete(client: Any, backend: str) -> None:
    assert client.set(key="a", value=1, ttl=1000)
    assert read(client, "a") == 1
    assert client.set(key="s", value="h\u00e9", ttl=100)
    assert read(client, "s") == "h\u00e9"
    assert client.set(key="obj", value={"x": [1, 2.5, "y"]}, ttl=100)
    assert read(client, "obj") == {"x": [1, 2.5, "y"]}
    assert client.delete(key="a") is True
    assert read(client, "a") is None
    assert client.touch(key="s", ttl=50) is True
    assert client.touch(key="a", ttl=50) is False


def test_binary_and_long_keys_go_base64(client: Any, backend: str) -> None:
    """Non-ASCII keys and keys over 250 bytes are sent base64 (``b``) by the client."""
    assert client.set(key=Key("ünïcode"), value=b"\x00\xff", ttl=100)
    assert read(client, Key("ünïcode")) == b"\x00\xff"
    assert client.set(key="b" * 300, value="long", ttl=100)
    assert read(client, "b" * 300) == "long"


def test_counters(client: Any, backend: str) -> None:
    assert client.delta(key="n", delta=1) is False  # a miss
    assert client.set(key="n", value="10", ttl=100)
    assert client.delta(key="n", delta=5) is True
    assert client.delta_and_get(key="n", delta=5) == 20
    assert client.delta_and_get(key="n", delta=-3) == 17
    client.delete(key="n2")
    assert client.delta_initialize(key="n2", delta=1, initial_value=10, initial_ttl=100) is True
    assert client.delta_and_get(key="n2", delta=1) == 11


def test_refill_adds_only(client: Any, backend: str) -> None:
    assert client.refill(key="s", value="first", ttl=100) is True
    assert client.refill(key="s", value="second", ttl=100) is False
    assert read(client, "s") == "first"


def test_reads_with_metadata(client: Any, backend: str) -> None:
    """The high-level reads, which ask for t h l."""
    client.set(key="a", value=7, ttl=1000)
    assert client.get(key="a") == 7
    assert client.multi_get(keys=["a", "missing"]) == {Key("a"): 7, Key("missing"): None}
    value, cas = client.get_cas(key="a")
    if backend == "momento":
        # meta-memcache 4.3 parses CAS uniques as u32: Momento's 63-bit content uniques come
        # back to it as "no CAS" (docs/compatibility.md, "Meta commands")
        assert value == 7 and cas is None
        return
    assert value == 7 and cas is not None
    assert client.set(key="a", value=8, ttl=100, cas_token=cas) is True
    assert client.set(key="a", value=9, ttl=100, cas_token=cas) is False
    assert client.get(key="a") == 8


def test_lease_and_stale(client: Any, backend: str) -> None:
    """Herd control: a lease (N, W/Z) on a miss, and deletes that mark stale (I, X/W):
    memcached's item states (on Momento: marks stored in the item)."""
    policy = LeasePolicy(ttl=30, miss_retries=1, miss_retry_wait=0.001)
    assert client.get_or_lease(key="lease", lease_policy=policy) is None  # won the lease: a miss
    assert client.set(key="lease", value="filled", ttl=100)
    assert client.get_or_lease(key="lease", lease_policy=policy) == "filled"
    assert client.set(key="stale", value="v1", ttl=100)
    assert client.invalidate(key="stale", stale_policy=StalePolicy(mark_stale_on_deletion_ttl=30)) is True
    assert client.get(key="stale") is None  # the first reader wins the recache: a miss
    assert client.get(key="stale") == "v1"  # the others get the stale value
