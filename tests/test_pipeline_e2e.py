"""Pipelines on the Momento path, end to end (see tests/test_momento_e2e.py for the stack).

Issue 8: the commands of one read run concurrently on a remote backend, so a stalled
backend costs a pipeline one timeout, not one per command; replies keep their order,
and commands on one key keep theirs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.servers import RawSession
from tests.test_momento_e2e import REQUEST_TIMEOUT, Stack, assert_works, stack_factory  # noqa: F401  (a fixture)

pytestmark = pytest.mark.e2e

#: Sets in the stalled pipeline: one after the other they would take 20 timeouts.
SETS = 20


def test_pipelined_sets_against_a_stalled_backend_wait_one_timeout_not_twenty(
    stack_factory: Callable[..., Stack],  # noqa: F811
) -> None:
    stack = stack_factory(REQUEST_TIMEOUT)
    with RawSession(stack.port) as session:
        assert_works(session, b"before", b"v")
        assert stack.momento.control("fault *:delay=3") == "OK"  # past the 0.5 s timeout
        start = time.monotonic()
        assert session.send(b"".join(b"set k%d 0 0 1\r\n%d\r\n" % (i, i % 10) for i in range(SETS)))
        data, complete = session.recv_until(lambda buf: buf.count(b"\r\n") == SETS, timeout=60)
        elapsed = time.monotonic() - start
        assert stack.momento.control("clear") == "OK"
        lines = data.split(b"\r\n")[:-1]
        assert complete and len(lines) == SETS and all(line.startswith(b"SERVER_ERROR ") for line in lines), data
        print(f"{SETS} stalled sets answered in {elapsed:.2f} s (timeout {REQUEST_TIMEOUT} s)")
        # one after the other: SETS * REQUEST_TIMEOUT = 10 s; together about one timeout
        assert elapsed < SETS * REQUEST_TIMEOUT / 2
        assert_works(session, b"after", b"v")


def test_a_pipeline_keeps_its_order_per_key_on_momento(stack_factory: Callable[..., Stack]) -> None:  # noqa: F811
    stack = stack_factory(5.0)
    with RawSession(stack.port) as session:
        pipeline = (
            b"set n 0 0 2\r\n10\r\n" + b"incr n 1\r\n" * 5 + b"get n\r\nset m 0 0 1\r\nx\r\nappend m 0 0 1\r\ny\r\n"
            b"get m n\r\ndelete n\r\nget n\r\n"
        )
        assert session.send(pipeline)
        data, complete = session.recv_until(lambda buf: buf.count(b"END\r\n") == 3, timeout=30)
    assert complete and data == (
        b"STORED\r\n11\r\n12\r\n13\r\n14\r\n15\r\nVALUE n 0 2\r\n15\r\nEND\r\nSTORED\r\nSTORED\r\n"
        b"VALUE m 0 2\r\nxy\r\nVALUE n 0 2\r\n15\r\nEND\r\nDELETED\r\nEND\r\n"
    )
