"""Waits of the Momento backend time out after their timeout of real time, even
when the gevent hub has not run for a while (its loop's clock is then stale:
libev starts a timer from the time it last looked at the clock).

Found when a test module's first set timed out at once after earlier modules had
blocked the hub thread for seconds (a command's wait started from a clock 15 s old).
"""

from __future__ import annotations

import time

import gevent

from mproxy.backends.momento.flow import Signal

#: How long the hub is kept from running, and the wait: the stale clock is older than the wait.
STALE_SECONDS = 1.0
WAIT_SECONDS = 0.5


def _stale_hub_clock() -> None:
    gevent.sleep(0.01)  # the hub loop runs a turn, reads the clock ...
    time.sleep(STALE_SECONDS)  # ... then does not run (a real sleep blocks the thread)


def test_a_signal_wait_lasts_its_timeout_after_the_hub_was_blocked() -> None:
    _stale_hub_clock()
    started = time.monotonic()
    assert Signal().wait(WAIT_SECONDS) is False
    assert time.monotonic() - started >= WAIT_SECONDS * 0.9
