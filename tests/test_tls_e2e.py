"""TLS end to end: ``python -m mproxy`` with ``tls = true``, real TLS clients.

pymemcache (text) and python-binary-memcached (binary) with a ``tls_context``,
``urllib`` for HTTPS ``/metrics``, Python's ``ssl`` for raw checks. The
handshake, its deadline and client certificates case by case are tested
in-process in ``test_tls.py``; here what only the whole process shows: both
backends, one process and two workers, plaintext and stalled clients against a
real listener, the admin port, SIGHUP rotating the certificate, start errors.
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import bmemcached
import pytest
from pymemcache.client.base import Client

from tests.certs import Pki, client_context, make_pki, peer_serial, serial
from tests.servers import HOST, RawSession, Server, start_mproxy
from tests.test_ops_e2e import wait_for

pytestmark = pytest.mark.e2e

DEADLINE = 30.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def mproxy(tmp_path: Path) -> Iterator[Callable[[str], Server]]:
    started: list[Server] = []

    def start(text: str) -> Server:
        started.append(start_mproxy(text, tmp_path))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def tls_keys(cert: Path, key: Path, extra: str = "") -> str:
    return f'tls = true\ntls_cert = "{cert}"\ntls_key = "{key}"\n{extra}'


def config(cache: str, admin: str = "", proxy: str = "", backend: str = "memory") -> str:
    momento = '[momento]\nlocal = "embedded"\n' if backend == "momento" else ""
    return f"""
[proxy]
{proxy}

[admin]
host = "{HOST}"
port = 0
{admin}

[[cache]]
host = "{HOST}"
port = 0
cache_name = "tls"
backend = "{backend}"
{cache}

{momento}"""


def connect_with(ctx: ssl.SSLContext) -> Callable[..., socket.socket]:
    """A ``connect`` for :class:`RawSession` that does a TLS handshake with ``ctx``."""

    def connect(address: tuple[str, int], timeout: float) -> socket.socket:
        return ctx.wrap_socket(socket.create_connection(address, timeout=timeout), server_hostname=HOST)

    return connect


def admin_stats(port: int, ctx: ssl.SSLContext, command: bytes = b"stats") -> dict[str, str]:
    with RawSession(port, connect=connect_with(ctx)) as s:
        s.send(command + b"\r\n")
        data, complete = s.recv_until_terminator(b"END\r\n")
    assert complete, data
    return dict(line.split(" ", 2)[1:] for line in data.decode().splitlines()[:-1])  # type: ignore[misc]


def set_and_get(port: int, ctx: ssl.SSLContext, key: str) -> None:
    text = Client((HOST, port), tls_context=ctx, timeout=10, connect_timeout=10)
    binary = bmemcached.Client([f"{HOST}:{port}"], tls_context=ctx, socket_timeout=10)
    try:
        assert text.set(key, b"over tls", noreply=False) is True
        assert text.get(key) == b"over tls"
        assert binary.get(key) == "over tls"  # the binary protocol, after the handshake (flags 0: text)
        assert binary.set(key, b"binary") is True
        assert text.get(key) == b"binary"
    finally:
        text.close()
        binary.disconnect_all()


def test_memory_backend_plaintext_and_stalled_clients_and_https_metrics(mproxy, pki: Pki) -> None:
    admin_tls = tls_keys(pki.server_cert, pki.server_key, f'tls_ca = "{pki.ca}"\ntls_verify = "require"\n')
    server = mproxy(config(tls_keys(pki.server_cert, pki.server_key), admin_tls))
    ctx = client_context(pki)
    scraper = client_context(pki, pki.client_cert, pki.client_key)
    # 20 clients that connect and say nothing: each counts once, at its deadline or when it closes
    stalled = [socket.create_connection((HOST, server.port)) for _ in range(20)]
    try:
        set_and_get(server.port, ctx, "k")  # while 20 handshakes wait
        started = time.monotonic()
        with RawSession(server.port) as plaintext:
            plaintext.send(b"get k\r\n")
            assert plaintext.recv_until_closed() == (b"", True)
        assert time.monotonic() - started < 5.0  # closed at once, not at the handshake deadline
        with urllib.request.urlopen(f"https://{HOST}:{server.admin_port}/metrics", context=scraper, timeout=10) as page:
            metrics = page.read().decode()
        (line,) = [ln for ln in metrics.splitlines() if ln.startswith("mproxy_ssl_handshake_errors_total ")]
        assert 1 <= int(line.split()[1]) <= 21  # the plaintext client (and stalled ones past 10 s)
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            with urllib.request.urlopen(f"https://{HOST}:{server.admin_port}/metrics", context=ctx, timeout=10) as page:
                page.read()  # no client certificate: refused
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://{HOST}:{server.admin_port}/metrics", timeout=10)
    finally:
        for sock in stalled:
            sock.close()
    wait_for(lambda: admin_stats(server.admin_port, scraper)["ssl_handshake_errors"] == "23", "23 failed handshakes")
    assert admin_stats(server.admin_port, scraper)["cmd_set"] == "2"
    assert "Traceback" not in server.output()


def test_momento_backend_two_workers_and_sighup_rotates_the_certificate(mproxy, pki: Pki, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    server = mproxy(config(tls_keys(cert, key), proxy="workers = 2", backend="momento"))
    ctx = client_context(pki)
    served_by: set[str] = set()
    for i in range(200):  # until each worker has served one (the kernel spreads connections by hash)
        set_and_get(server.port, ctx, f"k{i}")
        per = _plain_stats(server.admin_port, b"stats workers")
        served_by = {n for n in ("1", "2") if int(per[f"{n}:cmd_set"]) > 0}
        if served_by == {"1", "2"}:
            break
    assert served_by == {"1", "2"}
    with RawSession(server.port, connect=connect_with(ctx)) as before:
        assert peer_serial(before.sock) == serial(pki.server_cert)  # type: ignore[arg-type]
        shutil.copy(pki.rotated_cert, cert)  # renewed in place, as certbot does
        shutil.copy(pki.rotated_key, key)
        server.process.send_signal(signal.SIGHUP)
        deadline, in_a_row = time.monotonic() + DEADLINE, 0
        while in_a_row < 10:  # ten new connections in a row (both workers, likely) show the new one
            assert time.monotonic() < deadline, "the renewed certificate was not served"
            with RawSession(server.port, connect=connect_with(ctx)) as after:
                in_a_row = in_a_row + 1 if peer_serial(after.sock) == serial(pki.rotated_cert) else 0  # type: ignore[arg-type]
        before.send(b"version\r\n")  # a connection of before the reload goes on
        assert before.recv_until_terminator(b"\r\n")[1]
    assert _plain_stats(server.admin_port)["ssl_handshake_errors"] == "0"
    assert "Traceback" not in server.output()  # the reload ran in every worker without an error


def _plain_stats(port: int, command: bytes = b"stats") -> dict[str, str]:
    with RawSession(port) as s:
        s.send(command + b"\r\n")
        data, complete = s.recv_until_terminator(b"END\r\n")
    assert complete, data
    return dict(line.split(" ", 2)[1:] for line in data.decode().splitlines()[:-1])  # type: ignore[misc]


def test_a_bad_tls_file_stops_check_config_and_the_start_with_one_line(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(config(tls_keys(pki.server_cert, pki.client_key)))
    expected = (
        f'mproxy: {path}: cache[0].tls_key = "{pki.client_key}": is not the private key of '
        f'cache[0].tls_cert = "{pki.server_cert}"\n'
    )
    for extra in (["--check-config"], []):
        done = subprocess.run(
            [sys.executable, "-m", "mproxy", "-c", str(path), *extra], capture_output=True, text=True, timeout=60
        )
        assert (done.returncode, done.stdout, done.stderr) == (2, "", expected)
