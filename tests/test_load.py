"""Load (issue 11, Prove: Load) at CI size: an mproxy subprocess on the memory backend.

Marked ``load`` (``-m 'not load'`` skips them); ``python -m tests.load`` runs the same
scenarios at full size and prints their figures (docs/reliability.md, "Limits and load").
Timing assertions are generous medians: the CI machine has 2 shared cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import load

pytestmark = [pytest.mark.e2e, pytest.mark.load]

#: A good client's median request must stay under this, whatever the others do.
GOOD_MEDIAN_SECONDS = 0.050


def need_fds(count: int) -> None:
    too_low = load.raise_nofile(count)
    if too_low is not None:
        pytest.skip(f"the hard open-file limit here is {too_low}: this test needs {count} (ulimit -Hn)")


def test_five_thousand_connections_are_held_and_answered(tmp_path: Path) -> None:
    count = 5000
    need_fds(count + load.SPARE_FDS)  # the client ends (the server raises its own limit)
    figures = load.held_connections(count, tmp_path)
    assert figures["answered"] == count, figures
    assert figures["rss_bytes_per_connection"] < 64 * 1024, figures
    assert figures["good_client_median_ms"] < GOOD_MEDIAN_SECONDS * 1000, figures


@pytest.mark.parametrize("where", ["line", "data"])
def test_slowloris_300_does_not_slow_a_good_client(tmp_path: Path, where: str) -> None:
    need_fds(300 + load.SPARE_FDS)
    figures = load.slowloris(300, where, 2.0, tmp_path)
    assert figures["connections_open"] >= 300, figures  # they are served (held), not refused
    assert figures["good_client_median_ms"] < GOOD_MEDIAN_SECONDS * 1000, figures


def test_a_client_that_never_reads_holds_bounded_memory(tmp_path: Path) -> None:
    figures = load.never_reads(2.0, tmp_path)
    assert figures["replies_if_answered_mib"] > 256, figures  # it asked for far more than it holds
    assert figures["rss_growth_mib"] < 64, figures
    assert figures["good_client_median_ms"] < GOOD_MEDIAN_SECONDS * 1000, figures
