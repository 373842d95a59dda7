"""sd_notify to a datagram socket bound by the test; socket activation from LISTEN_FDS."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mproxy import systemd


def test_notify_without_systemd_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_notify_path_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert systemd.notify("READY=1\nSTATUS=serving") is True
        assert server.recv(1024) == b"READY=1\nSTATUS=serving"


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"mproxy-test-{os.getpid()}-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("STOPPING=1") is True
        assert server.recv(1024) == b"STOPPING=1"


def test_notify_to_a_missing_socket_fails_quietly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "absent"))
    assert systemd.notify("READY=1") is False


def test_listen_fds_ignores_another_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert systemd.listen_fds() == []
    assert "LISTEN_FDS" not in os.environ


def test_listen_fds_without_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LISTEN_PID", raising=False)
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    assert systemd.listen_fds() == []


def test_listen_fds_takes_fd_3(monkeypatch: pytest.MonkeyPatch) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:  # fd 3 may belong to someone else in this process: keep it
        saved: int | None = os.dup(systemd.LISTEN_FDS_START)
    except OSError:
        saved = None
    try:
        os.dup2(listener.fileno(), systemd.LISTEN_FDS_START)
        monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
        monkeypatch.setenv("LISTEN_FDS", "1")
        [sock] = systemd.listen_fds()
        assert sock.getsockname() == listener.getsockname()
        assert "LISTEN_PID" not in os.environ
        sock.detach()  # fd 3 is restored below, not closed
    finally:
        if saved is None:
            os.close(systemd.LISTEN_FDS_START)
        else:
            os.dup2(saved, systemd.LISTEN_FDS_START)
            os.close(saved)
        listener.close()


@pytest.fixture
def bound() -> Iterator[Callable[..., socket.socket]]:
    """``bound(host, family=AF_INET, port=0) -> socket``: a listening socket, closed after the test."""
    socks: list[socket.socket] = []

    def make(host: str, family: socket.AddressFamily = socket.AF_INET, port: int = 0) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        socks.append(sock)
        sock.bind((host, port))
        sock.listen()
        return sock

    yield make
    for sock in socks:
        sock.close()


def test_take_listener_matches_the_bound_address(bound: Callable[..., socket.socket]) -> None:
    a, b = bound("127.0.0.1"), bound("127.0.0.1")
    passed = [a, b]
    port_b = b.getsockname()[1]
    assert systemd.take_listener(passed, "127.0.0.1", port_b) is b and passed == [a]
    assert systemd.take_listener(passed, "127.0.0.1", port_b) is None  # taken once
    assert systemd.take_listener(passed, "127.0.0.2", a.getsockname()[1]) is None  # another address
    assert systemd.take_listener(passed, "localhost", a.getsockname()[1]) is a and passed == []
    assert systemd.take_listener([bound("127.0.0.1")], "127.0.0.1", 0) is None  # port 0: bind a new one


def test_take_listener_wildcards_match_each_other(bound: Callable[..., socket.socket]) -> None:
    """``ListenStream=PORT`` binds [::]:PORT (dual stack) where a config says 0.0.0.0."""
    v6 = bound("::", socket.AF_INET6)
    port = v6.getsockname()[1]
    assert systemd.take_listener([v6], "0.0.0.0", port) is v6
    v4 = bound("0.0.0.0")
    assert systemd.take_listener([v4], "::", v4.getsockname()[1]) is v4
    loopback = bound("127.0.0.1")
    assert systemd.take_listener([loopback], "0.0.0.0", loopback.getsockname()[1]) is None  # not a wildcard
