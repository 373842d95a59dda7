"""TieredBackend in front of the real Momento backend, against the bundled server in-process.

What only the Momento backend can show: the copies it keeps are exactly what a
Momento read gives (flags encoding, content CAS uniques, ``flags = false``),
the remaining TTL comes from ItemGetTtl (MomentoBackend.remaining_ttl), and the
gets/cas cycle with a stale copy ends in one retry. Concurrency through
mproxy itself (single-flight, two workers, faults) is in test_tiers_e2e.py.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import pytest

from mproxy.backends import momento as mb
from mproxy.backends.tiered import TieredBackend
from mproxy.backends.tiered.memory import MemoryTier
from mproxy.momento_local.server import LocalServer, serve
from mproxy.protocol.commands import StoreMode

HOST = "127.0.0.1"
_names = itertools.count()
S = StoreMode


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    srv = serve(host=HOST, port=0, max_workers=8)
    try:
        yield srv
    finally:
        srv.stop(None)


@pytest.fixture
def cache(server: LocalServer) -> str:
    name = f"tier-{next(_names)}"
    server.store.create_cache(name)
    return name


def backend(server: LocalServer, cache: str, **kwargs: object) -> mb.MomentoBackend:
    return mb.MomentoBackend(mb.Endpoint.local(HOST, server.port), cache, **kwargs)  # type: ignore[arg-type]


def tiered(inner: mb.MomentoBackend, **kwargs: object) -> TieredBackend:
    return TieredBackend(
        inner,
        MemoryTier(1 << 20),
        default_ttl=900.0,
        max_ttl=86400.0,
        ttl_lookup=inner.remaining_ttl,
        second_miss=False,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("flags", [True, False], ids=["flags", "no-flags"])
def test_the_kept_copy_is_what_momento_answers(server: LocalServer, cache: str, flags: bool) -> None:
    inner = backend(server, cache, with_flags=flags)
    tier = tiered(inner, keeps_flags=flags)
    try:
        for mode, value, fl in ((S.SET, b"plain", 0), (S.SET, b"flagged", 77), (S.REPLACE, b"\xffMCFx", 0)):
            assert tier.store(mode, b"k", value, fl, 0)
            assert tier.memory.get(b"k", 0.0) == inner.get_many([b"k"], True)[b"k"]
        cas = inner.get_many([b"k"], True)[b"k"].cas
        assert tier.store(S.CAS, b"k", b"swapped", 5, 0, cas)
        assert tier.memory.get(b"k", 0.0) == inner.get_many([b"k"], True)[b"k"]
    finally:
        tier.close()


def test_a_backend_hit_is_kept_with_its_momento_ttl(server: LocalServer, cache: str) -> None:
    other = backend(server, cache)
    inner = backend(server, cache)
    tier = tiered(inner, memory_ttl=600.0)
    try:
        other.store(S.SET, b"k", b"v", 3, 30)
        server.stats.reset()
        assert tier.get_many([b"k"]) == other.get_many([b"k"], True)
        filler = tier._filler  # the fill: one ItemGetTtl, after the answer (it may have run already)
        if filler is not None:
            filler.join()
        assert tier.fills == 1
        expires = tier.memory.expires_at(b"k")
        assert expires is not None and expires - time.monotonic() <= 30  # the item's 30 s, not the tier's 600
        calls = server.stats.snapshot()["calls"]
        assert calls.get("ItemGetTtl") == 1
    finally:
        tier.close()
        other.close()


def test_gets_and_cas_with_a_stale_copy_take_one_retry(server: LocalServer, cache: str) -> None:
    other = backend(server, cache)
    inner = backend(server, cache)
    tier = tiered(inner, memory_ttl=600.0)
    try:
        tier.store(S.SET, b"k", b"mine", 0, 0)
        other.store(S.SET, b"k", b"theirs", 0, 0)  # another client: the copy is stale
        stale = tier.get_many([b"k"], True)[b"k"]
        assert stale.value == b"mine"  # within memory_cache_ttl_seconds, as documented
        assert tier.store(S.CAS, b"k", b"next", 0, 0, stale.cas) is mb.backend.StoreResult.EXISTS
        fresh = tier.get_many([b"k"], True)[b"k"]  # the EXISTS dropped the copy: read from Momento
        assert fresh.value == b"theirs"
        assert tier.store(S.CAS, b"k", b"next", 0, 0, fresh.cas) is mb.backend.StoreResult.STORED
    finally:
        tier.close()
        other.close()
