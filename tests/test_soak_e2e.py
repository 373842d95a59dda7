"""A short run of ``scripts/soak`` (``tests/soak.py``): nothing acknowledged lost on the Momento path.

8 connections for :data:`SECONDS` seconds with the fault cycle and a graceful restart in
the middle; the 60 s run and longer ones are ``scripts/soak``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import soak

pytestmark = pytest.mark.e2e

SECONDS = 8.0
CLIENTS = 8


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> soak.Figures:
    return soak.Soak(tmp_path_factory.mktemp("soak"), CLIENTS, SECONDS, seed=5).run()


def test_nothing_acknowledged_is_lost_and_every_accepted_command_is_answered(figures: soak.Figures) -> None:
    print(soak.summary(figures))
    assert not figures.lost and not figures.unanswered and not figures.bad_replies, soak.summary(figures)
    assert figures.keys_verified + figures.keys_unknown == figures.keys == CLIENTS * (soak.STRING_KEYS + soak.COUNTER_KEYS)
    # the run did what it is for: writes acknowledged, faults answered, the restart went through
    assert figures.acked_writes > 100 and figures.server_errors > 0 and figures.reconnects >= CLIENTS, figures
    assert figures.faults_injected and figures.restart_seconds > 0


def test_a_timed_out_write_never_lands_after_a_later_acknowledged_one(figures: soak.Figures) -> None:
    assert not figures.reordered, soak.summary(figures)


def test_the_model_allows_exactly_the_values_a_late_write_may_leave() -> None:
    m = soak.KeyModel(counter=False)
    m.acked(b"a")
    assert m.certain and m.possible() == [b"a"]
    m.unacked(b"ab")  # an append that timed out
    m.unacked(b"c")  # the set that followed, timed out too
    assert not m.certain and m.possible() == [b"a", b"ab", b"c"] and m.may_land()
    m.acked(b"d")
    assert m.certain and m.possible() == [b"d"] and m.older == [b"ab", b"c"]
