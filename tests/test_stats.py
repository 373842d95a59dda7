"""Stats: counters, histogram percentiles, snapshots and the Prometheus rendering."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mproxy import __version__
from mproxy.stats import (
    CALL_FIGURES,
    COUNTERS,
    FIGURES,
    HELP,
    UPPER_BOUNDS,
    WORKER_FIGURES,
    Histogram,
    Stats,
    prometheus_text,
    sum_exports,
    without_gauges,
)


class FakeAudit:
    def __init__(self) -> None:
        self.lines_written = 0
        self.lines_dropped = 0


def scripted() -> Stats:
    stats = Stats()
    a, b = stats.cache("a"), stats.cache("b")
    a.cmd_get += 3
    a.get_hits += 2
    a.get_misses += 1
    a.curr_connections += 2
    b.cmd_get += 1
    b.get_hits += 1
    b.bytes_read += 100
    for _ in range(4):
        a.observe("get_many", 0.001)
    a.observe("set", 0.002, "timeout")
    b.observe("get_many", 0.003, "unavailable")
    b.observe("get_many", 0.003, "timeout")
    return stats


def test_every_counter_has_help() -> None:
    assert set(HELP) == set(COUNTERS)


def test_snapshot_totals_and_order() -> None:
    stats = scripted()
    stats.sdk_warnings = 7
    snap = stats.snapshot()
    keys = list(snap)
    assert keys[:4] == ["pid", "uptime", "time", "version"]
    assert snap["version"] == __version__
    # memcached's counters in COUNTERS order before any of ours.
    assert keys[keys.index("curr_connections") : keys.index("curr_connections") + len(COUNTERS)] == list(COUNTERS)
    assert keys.index("bytes_written") < keys.index("backend_get_many_requests")
    assert snap["cmd_get"] == 4
    assert snap["get_hits"] == 3
    assert snap["get_misses"] == 1
    assert snap["curr_connections"] == 2
    assert snap["bytes_read"] == 100
    assert snap["backend_get_many_requests"] == 6
    assert snap["backend_set_requests"] == 1
    assert snap["backend_errors"] == 3
    assert snap["backend_errors_timeout"] == 2
    assert snap["backend_errors_unavailable"] == 1
    assert snap["sdk_warnings"] == 7
    assert snap["audit_lines_written"] == 0
    # 4 of 6 get_many calls took 1 ms, 2 took 3 ms.
    assert snap["backend_get_many_p50_us"] == pytest.approx(1000, rel=0.1)
    assert snap["backend_get_many_p99_us"] == pytest.approx(3000, rel=0.1)
    assert list(snap)[-3:] == ["sdk_warnings", "audit_lines_written", "audit_lines_dropped"]


def test_cache_snapshot_is_per_cache() -> None:
    snap = scripted().cache_snapshot()
    assert snap["a:cmd_get"] == 3
    assert snap["b:cmd_get"] == 1
    assert snap["a:backend_get_many_requests"] == 4
    assert snap["b:backend_errors_timeout"] == 1
    assert "b:backend_set_requests" not in snap
    assert list(snap)[0] == "a:curr_connections"


def test_reset_keeps_connections_and_moves_audit_baseline() -> None:
    stats = scripted()
    audit = FakeAudit()
    stats.attach_audit(audit)
    audit.lines_written, audit.lines_dropped = 10, 2
    assert (stats.snapshot()["audit_lines_written"], stats.snapshot()["audit_lines_dropped"]) == (10, 2)
    stats.sdk_warnings = 3
    stats.reset()
    snap = stats.snapshot()
    assert snap["curr_connections"] == 2
    assert snap["cmd_get"] == 0
    assert snap["sdk_warnings"] == 0
    assert "backend_get_many_requests" not in snap
    assert (snap["audit_lines_written"], snap["audit_lines_dropped"]) == (0, 0)
    audit.lines_written += 5
    assert stats.snapshot()["audit_lines_written"] == 5


def test_histogram_percentiles_of_known_latencies() -> None:
    hist = Histogram()
    for ms in range(1, 1001):
        hist.observe(ms / 1000)
    assert hist.count == 1000
    assert hist.sum == pytest.approx(500.5)
    width = 2 ** (1 / 8)  # one bucket's relative width
    for q, expected in ((0.5, 0.5), (0.9, 0.9), (0.99, 0.99), (0.999, 0.999)):
        got = hist.quantile(q)
        assert expected / width <= got <= expected * width, (q, got)


def test_histogram_bounds() -> None:
    hist = Histogram()
    assert hist.quantile(0.5) == 0.0
    hist.observe(0.0)
    hist.observe(5e-7)
    hist.observe(1e-6)  # exactly the first upper bound: bucket 0 (le is inclusive)
    hist.observe(UPPER_BOUNDS[10])
    hist.observe(3600.0)
    assert hist.counts[0] == 3
    assert hist.counts[10] == 1
    assert hist.counts[-1] == 1
    assert hist.quantile(1.0) == UPPER_BOUNDS[-1]
    assert UPPER_BOUNDS[-1] >= 60.0
    cumulative = hist.cumulative(8)
    assert cumulative[-1] == (math.inf, 5)
    assert [le for le, _ in cumulative[:3]] == [UPPER_BOUNDS[0], UPPER_BOUNDS[8], UPPER_BOUNDS[16]]
    assert cumulative[0][1] == 3
    assert cumulative[2][1] == 4  # UPPER_BOUNDS[10] <= UPPER_BOUNDS[16]


def test_histogram_merge() -> None:
    one, two = Histogram(), Histogram()
    one.observe(0.001)
    two.observe(0.002)
    two.observe(0.002)
    one.merge(two)
    assert one.count == 3
    assert one.quantile(1.0) == pytest.approx(0.002, rel=0.1)


def test_prometheus_text_parses() -> None:
    stats = scripted()
    stats.cache('we"ird\\').cmd_set += 1
    stats.sdk_warnings = 2
    families = {f.name: f for f in text_string_to_metric_families(prometheus_text(stats))}

    cmd_get = families["mproxy_cmd_get"]
    assert cmd_get.type == "counter"
    assert {s.labels["cache"]: s.value for s in cmd_get.samples} == {"a": 3, "b": 1, 'we"ird\\': 0}
    assert families["mproxy_curr_connections"].type == "gauge"
    assert families["mproxy_sdk_warnings"].samples[0].value == 2
    by_code = {(s.labels["cache"], s.labels["code"]): s.value for s in families["mproxy_backend_errors_by_code"].samples}
    assert by_code == {("a", "timeout"): 1, ("b", "timeout"): 1, ("b", "unavailable"): 1}

    latency = families["mproxy_backend_latency_seconds"]
    assert latency.type == "histogram"
    a_get = [s for s in latency.samples if s.labels["cache"] == "a" and s.labels["op"] == "get_many"]
    buckets = [(float(s.labels["le"]), s.value) for s in a_get if s.name.endswith("_bucket")]
    assert buckets == sorted(buckets)  # cumulative: never decreasing
    assert buckets[-1] == (math.inf, 4)
    assert max(v for le, v in buckets if le < 0.001 / 1.1) == 0
    assert min(v for le, v in buckets if le >= 0.001 * 1.1) == 4
    count = [s.value for s in a_get if s.name.endswith("_count")]
    total = [s.value for s in a_get if s.name.endswith("_sum")]
    assert count == [4] and total == [pytest.approx(0.004)]


def test_operations_guide_documents_every_stat() -> None:
    guide = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    stats = scripted()
    stats.worker_figures = dict.fromkeys(WORKER_FIGURES, 0)
    names = [k for k in stats.snapshot() if not k.startswith("backend_") or k == "backend_errors"]
    missing = [name for name in names if f"| `{name}` |" not in guide]
    assert missing == []
    for pattern in ("backend_<op>_requests", "backend_<op>_p50_us", "backend_errors_<code>"):
        assert f"`{pattern}`" in guide


# -- figures a backend keeps itself (memory caches) ---------------------------------------


class FakeBackend:
    def __init__(self, **figures: int) -> None:
        self.figures = figures

    def stats(self) -> dict[str, int]:
        return dict(self.figures)


def with_backends() -> tuple[Stats, FakeBackend, FakeBackend]:
    stats = scripted()
    a = FakeBackend(curr_items=3, bytes=180, limit_maxbytes=1000, evictions=1, get_expired=2, get_flushed=4)
    b = FakeBackend(curr_items=1, bytes=60, limit_maxbytes=500, evictions=0, get_expired=1, get_flushed=0)
    stats.cache("a").attach_backend(a.stats)
    stats.cache("b").attach_backend(b.stats)
    stats.cache("remote")  # a backend that keeps no figures of its own
    return stats, a, b


def test_every_figure_has_a_kind_and_help() -> None:
    assert all(kind in ("counter", "gauge") and text for kind, text in FIGURES.values())
    assert not set(FIGURES) & set(COUNTERS)


def test_backend_figures_in_stats_summed_and_per_cache() -> None:
    stats, _, _ = with_backends()
    snap = stats.snapshot()
    assert {k: snap[k] for k in FIGURES} == {
        "get_expired": 3, "get_flushed": 4, "curr_items": 4, "bytes": 240, "limit_maxbytes": 1500, "evictions": 1,
    }
    keys = list(snap)
    assert keys.index("backend_errors") < keys.index("get_expired") < keys.index("backend_get_many_requests")
    per_cache = stats.cache_snapshot()
    assert (per_cache["a:curr_items"], per_cache["b:get_expired"]) == (3, 1)
    assert not [k for k in per_cache if k.startswith("remote:") and k.split(":")[1] in FIGURES]
    alone = Stats()
    alone.cache("remote")
    assert not set(FIGURES) & set(alone.snapshot())


def test_reset_zeroes_figure_counters_not_gauges() -> None:
    stats, a, _ = with_backends()
    stats.reset()
    snap = stats.cache("a").snapshot()
    assert (snap["get_expired"], snap["get_flushed"], snap["evictions"]) == (0, 0, 0)
    assert (snap["curr_items"], snap["bytes"], snap["limit_maxbytes"]) == (3, 180, 1000)
    a.figures["get_expired"] += 5
    assert stats.cache("a").snapshot()["get_expired"] == 5


def test_backend_figures_in_prometheus() -> None:
    stats, _, _ = with_backends()
    families = {f.name: f for f in text_string_to_metric_families(prometheus_text(stats))}
    assert families["mproxy_curr_items"].type == "gauge"
    assert {s.labels["cache"]: s.value for s in families["mproxy_curr_items"].samples} == {"a": 3, "b": 1}
    expired = families["mproxy_get_expired"]
    assert expired.type == "counter"
    assert {s.labels["cache"]: s.value for s in expired.samples if s.name.endswith("_total")} == {"a": 2, "b": 1}
    assert families["mproxy_limit_maxbytes"].samples[0].value == 1000


def test_a_memory_backend_reports_every_figure() -> None:
    from mproxy.backends.memory import MemoryBackend

    assert set(MemoryBackend().stats()) == set(FIGURES)


def test_operations_guide_documents_every_backend_figure() -> None:
    guide = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    assert [name for name in FIGURES if f"| `{name}` |" not in guide] == []


# -- figures of a remote backend's calls (Momento caches) --------------------------------------

CALLS = {
    "backend_rpc_get_calls": 5, "backend_rpc_get_keys": 5, "backend_rpc_get_batch_calls": 2,
    "backend_rpc_get_batch_keys": 40, "backend_rpc_retries": 1, "backend_rpc_in_flight": 3,
    "backend_rpc_writes_in_flight": 1, "not_a_figure": 9,
}  # fmt: skip


def test_call_figures_in_stats_after_the_memory_figures_and_reset() -> None:
    stats = scripted()
    backend = FakeBackend(**CALLS)
    stats.cache("a").attach_backend(backend.stats)
    snap = stats.cache("a").snapshot()
    shown = [k for k in snap if k in CALLS]
    assert shown == [
        "backend_rpc_retries", "backend_rpc_in_flight", "backend_rpc_writes_in_flight", "backend_rpc_get_batch_calls",
        "backend_rpc_get_batch_keys", "backend_rpc_get_calls", "backend_rpc_get_keys",
    ]  # fmt: skip
    assert "not_a_figure" not in snap and stats.snapshot()["backend_rpc_get_batch_keys"] == 40
    stats.reset()
    snap = stats.cache("a").snapshot()
    assert (snap["backend_rpc_get_calls"], snap["backend_rpc_retries"]) == (0, 0)  # counters
    assert (snap["backend_rpc_in_flight"], snap["backend_rpc_writes_in_flight"]) == (3, 1)  # gauges
    backend.figures["backend_rpc_get_calls"] += 4
    assert stats.cache("a").snapshot()["backend_rpc_get_calls"] == 4
    families = {f.name: f for f in text_string_to_metric_families(prometheus_text(stats))}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("mproxy_backend_rpc_calls_total", (("cache", "a"), ("rpc", "get")))] == 4
    assert samples[("mproxy_backend_rpc_keys_total", (("cache", "a"), ("rpc", "get_batch")))] == 0
    assert samples[("mproxy_backend_rpc_in_flight", (("cache", "a"),))] == 3
    exported = without_gauges(stats.export())["caches"]["a"]["figures"]
    assert "backend_rpc_in_flight" not in exported and exported["backend_rpc_get_calls"] == 4


def test_operations_guide_documents_the_call_figures() -> None:
    guide = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    assert [name for name in CALL_FIGURES if f"| `{name}` |" not in guide] == []
    for pattern in ("backend_rpc_<rpc>_calls", "backend_rpc_<rpc>_keys"):
        assert f"| `{pattern}` |" in guide


# -- several workers: export, exact sums, per-worker views --------------------------------


def test_export_is_plain_data_and_round_trips() -> None:
    import json
    import marshal

    stats, _, _ = with_backends()
    stats.sdk_warnings = 2
    audit = FakeAudit()
    audit.lines_written, audit.lines_dropped = 9, 1
    stats.attach_audit(audit)
    data = stats.export()
    assert marshal.loads(marshal.dumps(data)) == data
    assert json.loads(json.dumps(data)) == json.loads(json.dumps(data))  # JSON-able too
    again = Stats.from_export(data)
    expected, got = stats.snapshot(), again.snapshot()
    for volatile in ("uptime", "time", "rusage_user", "rusage_system"):
        expected.pop(volatile), got.pop(volatile)
    assert got == expected
    assert again.cache_snapshot() == stats.cache_snapshot()
    assert prometheus_text(again).replace(repr(again.started), "T") == prometheus_text(stats).replace(repr(stats.started), "T")


def test_from_export_shows_the_exported_process() -> None:
    data = scripted().export()
    data.update(pid=4242, started=1000.0, rusage=(1.5, 0.25))
    snap = Stats.from_export(data).snapshot()
    assert (snap["pid"], snap["rusage_user"], snap["rusage_system"]) == (4242, 1.5, 0.25)
    assert snap["uptime"] == int(snap["time"]) - 1000


def test_sum_of_exports_is_exact() -> None:
    one, two = scripted(), scripted()
    two.cache("c").cmd_set += 5
    two.cache("a").observe("get_many", 2.0)
    one.sdk_warnings, two.sdk_warnings = 1, 2
    audit_one, audit_two = FakeAudit(), FakeAudit()
    audit_one.lines_written, audit_two.lines_written, audit_two.lines_dropped = 3, 4, 7
    one.attach_audit(audit_one)
    two.attach_audit(audit_two)
    parts = [one.export(), two.export()]
    parts[0]["rusage"], parts[1]["rusage"] = (1.0, 0.5), (2.0, 0.25)
    total = Stats.from_export(sum_exports(parts, pid=7, started=100.0))
    snap = total.snapshot()
    assert snap["pid"] == 7 and (snap["rusage_user"], snap["rusage_system"]) == (3.0, 0.75)
    assert snap["cmd_get"] == 8 and snap["curr_connections"] == 4 and snap["cmd_set"] == 5
    assert snap["backend_get_many_requests"] == 13 and snap["backend_errors_timeout"] == 4
    assert (snap["sdk_warnings"], snap["audit_lines_written"], snap["audit_lines_dropped"]) == (3, 7, 7)
    hist = total.caches["a"].latency["get_many"]
    assert hist.count == 9 and sum(hist.counts) == 9
    assert hist.quantile(1.0) == pytest.approx(2.0, rel=0.1)
    merged = Histogram()
    for part in (one, two):
        merged.merge(part.caches["a"].latency["get_many"])
    assert hist.counts == merged.counts and hist.sum == pytest.approx(merged.sum)
    assert total.cache_snapshot()["c:cmd_set"] == 5


def test_sum_of_figures_and_without_gauges() -> None:
    stats, _, _ = with_backends()
    part = stats.export()
    total = Stats.from_export(sum_exports([part, part], pid=1, started=0.0)).snapshot()
    assert (total["curr_items"], total["evictions"], total["limit_maxbytes"]) == (8, 2, 3000)
    gone = Stats.from_export(sum_exports([without_gauges(part)], pid=1, started=0.0)).snapshot()
    assert gone["curr_connections"] == 0 and gone["cmd_get"] == 4
    assert gone["evictions"] == 1 and "curr_items" not in gone and "limit_maxbytes" not in gone


def test_worker_figures_only_when_set() -> None:
    stats = scripted()
    assert "workers" not in stats.snapshot() and "mproxy_workers" not in prometheus_text(stats)
    stats.worker_figures = {"workers": 2, "worker_restarts": 1}
    snap = stats.snapshot()
    assert list(snap)[-2:] == ["workers", "worker_restarts"] and snap["workers"] == 2
    families = {f.name: f for f in text_string_to_metric_families(prometheus_text(stats))}
    assert families["mproxy_workers"].type == "gauge" and families["mproxy_workers"].samples[0].value == 2
    assert families["mproxy_worker_restarts"].type == "counter"


def test_one_process_is_worker_1() -> None:
    stats = scripted()
    per_worker = stats.workers_snapshot()
    assert per_worker["1:cmd_get"] == 4 and "1:pid" in per_worker
