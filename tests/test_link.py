"""The supervisor <-> worker link, both ends in this process (gevent sockets, no patching)."""

from __future__ import annotations

import socket
from typing import Any, Iterator

import gevent
import gevent.event
import gevent.socket
import pytest

from mproxy.link import MAX_MESSAGE, Link, LinkError

TIMEOUT = 30.0


@pytest.fixture
def pair() -> Iterator[tuple[Link, Link, list[tuple[str, str, Any]]]]:
    """(supervisor end, worker end, [(end, kind, payload) of every message handled])."""
    seen: list[tuple[str, str, Any]] = []
    released = gevent.event.Event()  # ends the "slow" handlers at teardown (no greenlet outlives the test)
    a_sock, b_sock = gevent.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    links: dict[str, Link] = {}

    def handler(end: str):  # type: ignore[no-untyped-def]
        def handle(kind: str, payload: Any) -> Any:
            seen.append((end, kind, payload))
            if kind == "echo":
                return payload
            if kind == "fail":
                raise RuntimeError("as asked")
            if kind == "ask-back":  # a handler that asks the asker: needs a greenlet per request
                return links[end].request("echo", payload, timeout=TIMEOUT)
            if kind == "slow":
                released.wait(60)
            return None

        return handle

    a = links["a"] = Link(a_sock, handler("a"), "a")
    b = links["b"] = Link(b_sock, handler("b"), "b")
    a.start()
    b.start()
    yield a, b, seen
    released.set()
    a.close()
    b.close()


def test_request_and_reply_both_ways(pair: tuple[Link, Link, list]) -> None:
    a, b, _ = pair
    payload = {"caches": {"x": {"counters": {"cmd_get": 3}, "latency": {"get": ([1, 2], 3, 0.5)}}}, "t": (1.5, None)}
    assert a.request("echo", payload, timeout=TIMEOUT) == payload
    assert b.request("echo", [1, "two", b"three"], timeout=TIMEOUT) == [1, "two", b"three"]


def test_a_handler_may_ask_the_asker(pair: tuple[Link, Link, list]) -> None:
    a, b, seen = pair
    assert b.request("ask-back", 7, timeout=TIMEOUT) == 7
    assert [(end, kind) for end, kind, _ in seen] == [("a", "ask-back"), ("b", "echo")]


def test_notices_are_handled_in_order(pair: tuple[Link, Link, list]) -> None:
    a, b, seen = pair
    for n in range(5):
        b.notify("note", n)
    assert a.request("echo", "sync", timeout=TIMEOUT) == "sync"  # b answered after reading the notices
    gevent.sleep(0)
    with gevent.Timeout(TIMEOUT):
        while len([s for s in seen if s[1] == "note"]) < 5:
            gevent.sleep(0.01)
    assert [p for end, kind, p in seen if kind == "note"] == [0, 1, 2, 3, 4]


def test_a_failing_handler_answers_an_error(pair: tuple[Link, Link, list]) -> None:
    a, _, _ = pair
    with pytest.raises(LinkError, match="fail: as asked"):
        a.request("fail", timeout=TIMEOUT)
    assert a.request("echo", 1, timeout=TIMEOUT) == 1  # the link goes on


def test_timeout(pair: tuple[Link, Link, list]) -> None:
    a, _, _ = pair
    with pytest.raises(LinkError, match="no reply to 'slow' within 0.05 s"):
        a.request("slow", timeout=0.05)


def test_the_other_end_closing_fails_waiting_requests(pair: tuple[Link, Link, list]) -> None:
    a, b, _ = pair
    waiting = gevent.spawn(a.request, "slow", None, TIMEOUT)
    gevent.sleep(0.01)
    b.close()
    with pytest.raises(LinkError):
        waiting.get(timeout=TIMEOUT)
    assert a.closed.wait(TIMEOUT)
    with pytest.raises(LinkError, match="link closed"):
        a.notify("note")


def test_large_messages_cross_in_pieces(pair: tuple[Link, Link, list]) -> None:
    a, _, _ = pair
    big = {"k%d" % i: list(range(100)) for i in range(2000)}
    assert a.request("echo", big, timeout=TIMEOUT) == big


def test_an_oversized_frame_closes_the_link() -> None:
    a_sock, b_sock = gevent.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a = Link(a_sock, lambda kind, payload: None, "a")
    a.start()
    b_sock.sendall((MAX_MESSAGE + 1).to_bytes(4, "big"))
    assert a.closed.wait(TIMEOUT)
    a.close()
    b_sock.close()
