"""How workers share a listening address: SO_REUSEPORT groups and shared sockets (no processes)."""

from __future__ import annotations

import socket

import pytest

from mproxy.listeners import PortGroup, SharedListener, bind

HOST = "127.0.0.1"


def accept_all(sock: socket.socket) -> int:
    sock.setblocking(False)
    n = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return n
        conn.close()
        n += 1


def test_a_group_spreads_connections_over_its_workers() -> None:
    group = PortGroup((HOST, 0), backlog=64)
    try:
        host, port = group.address
        assert host == HOST and port > 0
        one, two = group.for_worker(), group.for_worker()
        assert one.getsockname() == two.getsockname() == (HOST, port)
        clients = [socket.create_connection((HOST, port), timeout=10) for _ in range(40)]
        got = [accept_all(one), accept_all(two)]
        assert sum(got) == 40 and min(got) >= 1  # all 40 on one socket: chance 2 ** -39
        for client in clients:
            client.close()
        one.close()
        two.close()
        with pytest.raises(ConnectionRefusedError):  # no worker: refused, not queued
            socket.create_connection((HOST, port), timeout=10)
    finally:
        group.close()


def test_a_serving_group_refuses_another_and_a_taken_port_refuses_a_group() -> None:
    group = PortGroup((HOST, 0), backlog=64)
    worker = group.for_worker()
    try:
        with pytest.raises(OSError):
            bind(group.address)  # another program
        with pytest.raises(OSError):
            PortGroup(group.address, backlog=64)  # another mproxy: an error, not a silent share of the connections
    finally:
        worker.close()
        group.close()
    again = PortGroup(group.address, backlog=64)  # released
    again.close()
    taken = bind((HOST, 0))
    try:
        with pytest.raises(OSError):
            PortGroup(taken.getsockname(), backlog=64)
    finally:
        taken.close()


def test_a_shared_listener_gives_each_worker_the_same_socket() -> None:
    sock = bind((HOST, 0))
    shared = SharedListener(sock)
    copy = shared.for_worker()
    assert copy.fileno() != sock.fileno() and copy.getsockname() == sock.getsockname() == shared.address
    copy.close()  # the worker's copy: the socket stays
    with socket.create_connection(shared.address, timeout=10):
        pass
    shared.close()
