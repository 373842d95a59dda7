"""Faults on the Momento path with generous bounds (``tests/chaos.py``; figures: ``scripts/faults``).

Error bursts, delays past the timeout and the server killed and restarted answer
``SERVER_ERROR`` within the timeout and recover; in a delay storm the proxy's in-flight
work stays bounded: greenlets and RSS return to their baseline once the delayed calls
have ended, and stay within a per-connection bound meanwhile. Bounds are loose (2
shared cores in CI); the measured figures are printed and reported by ``scripts/faults``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import chaos
from tests.servers import RawSession

pytestmark = pytest.mark.e2e

REQUEST_TIMEOUT = 0.5
#: Slack on the timeout for a SERVER_ERROR reply on a busy CI machine.
REPLY_SLACK = 1.5
#: Recovery bound after the server listens again (the target, 1 s, is what scripts/faults reports).
RECOVERY_BOUND = 5.0
STORM_CLIENTS = 30


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[chaos.Stack]:
    with chaos.stack(tmp_path_factory.mktemp("chaos"), REQUEST_TIMEOUT) as st:
        yield st


def test_an_error_burst_answers_at_once_and_ends(stack: chaos.Stack) -> None:
    figures = chaos.error_burst(stack, count=20)
    print(figures)
    assert figures["server_errors"] >= 1 and figures["max_error_reply_s"] < REQUEST_TIMEOUT + REPLY_SLACK


def test_a_delay_past_the_timeout_answers_at_the_timeout(stack: chaos.Stack) -> None:
    figures = chaos.delay_past_timeout(stack, delay=3.0)
    print(figures)
    assert REQUEST_TIMEOUT * 0.9 <= figures["min_timeout_reply_s"]
    assert figures["max_timeout_reply_s"] < REQUEST_TIMEOUT + REPLY_SLACK


def test_the_server_killed_then_restarted_is_served_again(stack: chaos.Stack) -> None:
    figures = chaos.kill_and_restart(stack)
    print(figures)
    assert figures["down_max_error_reply_s"] < REQUEST_TIMEOUT + REPLY_SLACK
    assert figures["recovery_from_listening_s"] < RECOVERY_BOUND


def test_in_flight_work_is_bounded_in_a_delay_storm(stack: chaos.Stack) -> None:
    figures = chaos.delay_storm(stack, clients=STORM_CLIENTS, seconds=4.0, delay=8.0)
    print(figures)
    assert figures["commands_answered"] >= STORM_CLIENTS  # each client got SERVER_ERRORs back
    # meanwhile: a few greenlets per connection at most, not one per command sent
    assert figures["greenlets_max_in_storm"] <= figures["greenlets_base"] + 4 * STORM_CLIENTS + 50, figures
    # afterwards: back near the baseline (gRPC's own pools may keep a few), memory flat
    assert figures["greenlets_after"] <= figures["greenlets_base"] + 40, figures  # a pool warms up: +14 here
    assert figures["rss_after_kib"] - figures["rss_base_kib"] < 64 * 1024, figures


def test_a_timed_out_set_does_not_land_after_a_later_acknowledged_one(stack: chaos.Stack) -> None:
    # found by scripts/soak ("reordered"); the server applies a delayed write after its delay
    with RawSession(stack.mproxy.port) as session:
        assert chaos.request(session, b"set late 0 0 2\r\nv0\r\n")[0] == b"STORED\r\n"
        assert stack.momento.control("fault Set:delay=1.5") == "OK"
        assert chaos.request(session, b"set late 0 0 2\r\nv1\r\n")[0].startswith(b"SERVER_ERROR")
        assert stack.momento.control("clear") == "OK"
        # v2 waits for v1's call, which runs on (each try up to its own timeout): it is
        # acknowledged only once v1 has ended (docs/compatibility.md, "The order of writes")
        for _ in range(40):
            reply = chaos.request(session, b"set late 0 0 2\r\nv2\r\n")[0]
            if reply == b"STORED\r\n":
                break
            assert b"waiting for an earlier write of the same key" in reply, reply
        else:
            pytest.fail("v2 was never stored")
        time.sleep(2.0)  # past the delayed set's landing (a bound, not a synchronisation)
        assert chaos.request(session, b"get late\r\n")[0] == b"VALUE late 0 2\r\nv2\r\nEND\r\n"
