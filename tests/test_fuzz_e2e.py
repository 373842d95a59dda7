"""A seeded slice of the whole-server fuzz run (``tests/fuzz.py``; the full run is ``scripts/fuzz``).

Per backend: a few thousand mutated text, meta and binary inputs, each on a fresh
connection, half-closed; every one answered and closed within ``INPUT_DEADLINE``; the
proxy alive, with no traceback and no worker restart in its log, and the RSS of its
process tree grown by less than ``RSS_GROWTH_BOUND``. On the memory backend every reply is compared with memcached's.
``MPROXY_FUZZ_SEED`` picks another slice (the default is fixed, so a failure replays).
"""

from __future__ import annotations

import os

import pytest

from tests import fuzz
from tests.conftest import MproxyFactory, require_memcached
from tests.servers import Server

pytestmark = pytest.mark.e2e

#: Inputs per backend (the full 100,000 per backend run through ``scripts/fuzz``).
SLICE = {"memory": 3000, "momento": 600}
SEED = int(os.environ.get("MPROXY_FUZZ_SEED", "11"))
#: Bound on the proxy's RSS growth over a slice (it holds ~35 MB; a leak of one value per
#: input would pass 1 GB).
RSS_GROWTH_BOUND_KIB = 64 * 1024


def _check(report: fuzz.Report, proxy: Server) -> None:
    assert not report.findings, "\n".join(map(str, report.findings))
    assert proxy.process.poll() is None
    log = proxy.output()
    assert "Traceback" not in log and "restarting it" not in log, log[-3000:]  # no worker died either
    assert report.rss_growth_kib < RSS_GROWTH_BOUND_KIB, report


def test_fuzz_slice_memory_backend_matches_memcached(memcached_server: Server, mproxy_factory: MproxyFactory) -> None:
    require_memcached()
    proxy = mproxy_factory("memory")
    report = fuzz.run(proxy.port, proxy.process.pid, SEED, SLICE["memory"], memcached_server.port)
    _check(report, proxy)
    # most inputs are compared in full (the others are the classes of fuzz.PARTLY_COMPARED)
    assert report.compared > 0.8 * report.tried, report


def test_fuzz_slice_momento_backend_survives(mproxy_factory: MproxyFactory) -> None:
    proxy = mproxy_factory("momento")
    report = fuzz.run(proxy.port, proxy.process.pid, SEED, SLICE["momento"])
    _check(report, proxy)
    assert report.tried == SLICE["momento"]


def test_generated_inputs_are_fixed_per_seed_and_number() -> None:
    first = [data for _, data in fuzz.inputs(5, 50)]
    assert first == [data for _, data in fuzz.inputs(5, 50)]
    assert any(data[:1] == b"\x80" for data in first) and any(data[:1] != b"\x80" for data in first)


def test_clock_dependent_inputs_are_not_generated() -> None:
    assert fuzz._drop_clock_dependent(b"set a 0 100 1\r\nx\r\n") == b"version\r\n"
    assert fuzz._drop_clock_dependent(b"flush_all 5\r\n") == b"version\r\n"
    assert fuzz._drop_clock_dependent(b"mg a T30 v\r\n") == b"version\r\n"
    for kept in (b"set a 0 -1 1\r\nx\r\n", b"set a 0 2592001 1\r\nx\r\n", b"touch a 0\r\n", b"flush_all 0\r\n"):
        assert fuzz._drop_clock_dependent(kept) == kept
