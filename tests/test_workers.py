"""The supervisor's parts without processes: sums over workers, backoff, shares, specs."""

from __future__ import annotations

import os
from typing import Any

import pytest

from mproxy.config import loads
from mproxy.link import LinkError
from mproxy.stats import Stats
from mproxy.worker import ENV, WorkerSpec, WorkerStats, effective
from mproxy.workers import FleetStats, Slot, backoff, exit_text, shares, worker_environment


class FakeLink:
    """A worker's end as the supervisor sees it: answers from a Stats."""

    def __init__(self, stats: Stats, answers: bool = True) -> None:
        self.stats = stats
        self.answers = answers
        self.asked: list[str] = []

    def request(self, kind: str, payload: Any = None, timeout: float = 0.0) -> Any:
        self.asked.append(kind)
        if not self.answers:
            raise LinkError("no reply")
        if kind == "export":
            return self.stats.export()
        if kind == "reset":
            self.stats.reset()
            return None
        raise AssertionError(kind)


class FakeSupervisor:
    def __init__(self, workers: list[Stats]) -> None:
        self.stats = Stats()
        self.slots = []
        for n, stats in enumerate(workers, 1):
            slot = Slot(n)
            slot.link = FakeLink(stats)  # type: ignore[assignment]
            slot.ready.set()
            self.slots.append(slot)

    def live(self) -> list[Slot]:
        return [slot for slot in self.slots if slot.ready.is_set()]


def worker(gets: int, connections: int = 1, latency: float = 0.001) -> Stats:
    stats = Stats()
    st = stats.cache("c")
    st.cmd_get += gets
    st.curr_connections += connections
    st.total_connections += connections
    for _ in range(gets):
        st.observe("get", latency)
    return stats


def test_the_sum_is_exact_and_the_supervisors_own() -> None:
    one, two = worker(3), worker(4, connections=2, latency=0.004)
    sup = FakeSupervisor([one, two])
    fleet = FleetStats(sup)  # type: ignore[arg-type]
    snap = fleet.snapshot()
    assert (snap["cmd_get"], snap["curr_connections"], snap["backend_get_requests"]) == (7, 3, 7)
    assert snap["pid"] == os.getpid() and (snap["workers"], snap["worker_restarts"]) == (2, 0)
    assert fleet.cache_snapshot()["c:cmd_get"] == 7
    assert "mproxy_workers 2" in fleet.prometheus()
    per = fleet.workers_snapshot()
    assert (per["1:cmd_get"], per["2:cmd_get"], per["2:curr_connections"], per["1:restarts"]) == (3, 4, 2, 0)


def test_a_silent_worker_counts_with_its_last_export() -> None:
    one, two = worker(3), worker(4)
    sup = FakeSupervisor([one, two])
    fleet = FleetStats(sup)  # type: ignore[arg-type]
    assert fleet.snapshot()["cmd_get"] == 7
    two.cache("c").cmd_get += 10
    sup.slots[1].link.answers = False  # type: ignore[union-attr]
    assert fleet.snapshot()["cmd_get"] == 7  # its figures of the last answer


def test_an_exited_workers_counts_stay_without_its_connections() -> None:
    one, two = worker(3), worker(4, connections=2)
    sup = FakeSupervisor([one, two])
    fleet = FleetStats(sup)  # type: ignore[arg-type]
    fleet.snapshot()
    gone = sup.slots[1]
    assert gone.export is not None
    fleet.retire(gone.export)  # what the supervisor does when a worker exits
    gone.export = None
    gone.ready.clear()
    gone.restarts = 1
    snap = fleet.snapshot()
    assert (snap["cmd_get"], snap["curr_connections"], snap["workers"], snap["worker_restarts"]) == (7, 1, 1, 1)
    per = fleet.workers_snapshot()
    assert (per["2:pid"], per["2:restarts"]) == (0, 1) and "2:cmd_get" not in per
    fleet.retire(worker(5).export())  # a second exit adds up
    assert fleet.snapshot()["cmd_get"] == 12


def test_reset_resets_every_worker_and_the_retired() -> None:
    one, two = worker(3), worker(4)
    sup = FakeSupervisor([one, two])
    fleet = FleetStats(sup)  # type: ignore[arg-type]
    fleet.retire(worker(9).export())
    fleet.reset()
    snap = fleet.snapshot()
    assert snap["cmd_get"] == 0 and snap["curr_connections"] == 2
    assert [slot.link.asked[-2:] for slot in sup.slots] == [["reset", "export"]] * 2  # type: ignore[union-attr]


def test_backoff_doubles_up_to_a_bound() -> None:
    delays = [backoff(n) for n in range(1, 12)]
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(delays) == 30.0 and delays == sorted(delays)


@pytest.mark.parametrize(
    ("total", "workers", "expected"),
    [(1024, 2, [512, 512]), (10, 3, [4, 3, 3]), (1, 2, [1, 1]), (5, 5, [1] * 5)],
)
def test_max_connections_shares(total: int, workers: int, expected: list[int]) -> None:
    assert shares(total, workers) == expected


def test_exit_text() -> None:
    assert exit_text(1) == "exited with status 1"
    assert exit_text(-9) == "was killed by SIGKILL"


def test_spec_round_trip_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = WorkerSpec(2, "p.toml", "[[cache]]\ncache_name = 'x'\n", (5, 6), 7, None, 512, "127.0.0.1:4000")
    assert WorkerSpec.from_env(spec.to_env()) == spec
    assert spec.fds() == (5, 6, 7)
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/notify")
    env = worker_environment(spec)
    assert "NOTIFY_SOCKET" not in env and WorkerSpec.from_env(env[ENV]) == spec
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert env["PYTHONPATH"].split(os.pathsep)[0] == root


def test_a_worker_runs_on_the_supervisors_embedded_server() -> None:
    cfg = loads('[[cache]]\ncache_name = "x"\n[momento]\nlocal = "embedded"\n')
    assert effective(cfg, "127.0.0.1:4000").momento.local == "127.0.0.1:4000"
    assert effective(cfg, "") is cfg


def test_worker_stats_fall_back_to_their_own_without_a_supervisor() -> None:
    stats = WorkerStats()
    stats.cache("c").cmd_get += 2
    assert stats.snapshot()["cmd_get"] == 2  # no link yet
    stats.link = FakeLink(Stats(), answers=False)  # type: ignore[assignment]
    assert stats.snapshot()["cmd_get"] == 2
    stats.reset()
    assert stats.snapshot()["cmd_get"] == 0


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> int | None:
        return None


def test_sighup_goes_to_serving_workers_and_a_starting_one_gets_it_when_it_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker still starting has no SIGHUP handler yet (the signal would end it)."""
    import dataclasses
    import signal

    from mproxy.app import App
    from mproxy.config import render
    from mproxy.workers import Supervisor

    cfg = loads('[proxy]\nworkers = 2\n[[cache]]\ncache_name = "x"\n[momento]\nlocal = "127.0.0.1:1"\n')
    sup = Supervisor(cfg)
    monkeypatch.setattr(App, "request_reload", lambda self: None)  # this process's own reload
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    serving, starting = sup.slots
    for slot, pid in ((serving, 101), (starting, 102)):
        slot.process = FakeProcess(pid)
        slot.link = FakeLink(Stats())  # type: ignore[assignment]
        slot.config = render(cfg)
    serving.ready.set()
    sup.request_reload()
    assert sent == [(101, signal.SIGHUP)]
    sup.cfg = dataclasses.replace(cfg, debug=dataclasses.replace(cfg.debug, log_level="debug"))  # reloaded
    sup._on_message(starting, "ready", None)
    assert sent == [(101, signal.SIGHUP), (102, signal.SIGHUP)]
    sent.clear()
    starting.config = render(sup.cfg)  # started after the reload: nothing to catch up
    sup._on_message(starting, "ready", None)
    assert sent == []
