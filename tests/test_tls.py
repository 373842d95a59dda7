"""TLS on the listeners, in-process: the handshake in the connection's greenlet,
its deadline, what fails and is counted, reloads; and the ``tls_*`` keys at load.

The servers run on gevent in the test's own process and the clients use gevent's
sockets and SSL (as ``test_server.py`` does); the whole process, with real TLS
clients, is ``test_tls_e2e.py``. Certificates come from :mod:`tests.certs`.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.socket
import gevent.ssl
import pytest

from mproxy import config as cfg
from mproxy.admin import AdminServer
from mproxy.backends.memory import MemoryBackend
from mproxy.dispatch import Dispatcher
from mproxy.handshake import ListenerTls
from mproxy.server import CacheServer
from mproxy.stats import Stats
from tests.certs import Pki, make_pki, new_key, peer_serial, serial, write_key
from tests.servers import HOST, RawSession

#: Bound for a condition the server reaches on its own.
DEADLINE = 10.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def settings(pki: Pki, **keys: Any) -> cfg.CacheConfig:
    """A ``[[cache]]`` table with TLS on, the test certificate, and ``keys``."""
    base: dict[str, Any] = {
        "cache_name": "t", "tls": True, "tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key),
    }  # fmt: skip
    return cfg.CacheConfig(**{**base, **keys})


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        gevent.sleep(0.001)  # a turn of the hub, bounded by the deadline


class Served:
    """A CacheServer over a memory backend with TLS, in this process."""

    def __init__(self, tls: ListenerTls, stats: Stats) -> None:
        self.tls = tls
        self.stats = stats
        cache = stats.cache("t")
        self.server = CacheServer((HOST, 0), Dispatcher(MemoryBackend(), cache, stats), cache, tls=tls)
        self.server.start()

    @property
    def port(self) -> int:
        return self.server.address[1]


@pytest.fixture
def serve(pki: Pki) -> Iterator[Callable[..., Served]]:
    """``serve(timeout=..., **tls keys) -> Served``: stopped at the end."""
    started: list[Served] = []

    def serve(timeout: float = 10.0, **keys: Any) -> Served:
        stats = Stats()
        tls = ListenerTls(stats, timeout=timeout)
        tls.configure(settings(pki, **keys), "cache[0].")
        started.append(Served(tls, stats))
        return started[-1]

    yield serve
    for served in started:
        served.server.stop(timeout=1.0)


def tls_connect(pki: Pki, cert: Path | None = None, key: Path | None = None) -> Callable[..., socket.socket]:
    """A ``connect`` for :class:`RawSession`: gevent TCP, then a TLS handshake trusting the test CA."""
    ctx = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # gevent's: the handshake must yield to the server
    ctx.load_verify_locations(cafile=str(pki.ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))

    def connect(address: tuple[str, int], timeout: float) -> socket.socket:
        return ctx.wrap_socket(gevent.socket.create_connection(address, timeout=timeout), server_hostname=HOST)

    return connect


# -- serving ------------------------------------------------------------------------------


def test_text_and_binary_commands_over_tls(serve: Callable[..., Served], pki: Pki) -> None:
    served = serve()
    with RawSession(served.port, connect=tls_connect(pki)) as s:
        s.send(b"set k 5 0 5\r\nhello\r\nget k\r\n")
        assert s.recv_until_terminator(b"END\r\n")[0] == b"STORED\r\nVALUE k 5 5\r\nhello\r\nEND\r\n"
    # the first byte after the handshake picks the protocol: a binary GET (magic 0x80) of k
    request = bytes([0x80, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]) + bytes(8) + b"k"
    with RawSession(served.port, connect=tls_connect(pki)) as s:
        s.send(request)
        reply, complete = s.recv_until(lambda buf: len(buf) >= 24 + 4 + 5)
    assert complete and reply[0] == 0x81 and reply[6:8] == b"\x00\x00" and reply[-5:] == b"hello"
    assert served.stats.ssl_handshake_errors == 0


def test_a_plaintext_client_is_closed_at_once_and_counted(serve: Callable[..., Served]) -> None:
    served = serve()
    with RawSession(served.port, connect=gevent.socket.create_connection) as s:
        s.send(b"version\r\n")
        got, closed = s.recv_until_closed()
    assert closed and got == b""
    wait_until(lambda: served.stats.ssl_handshake_errors == 1, "the failed handshake counted")
    assert served.stats.cache("t").total_connections == 0  # never reached the connection loop


def test_a_stalled_handshake_stalls_no_one_else_and_ends_at_its_deadline(serve: Callable[..., Served], pki: Pki) -> None:
    served = serve(timeout=0.5)
    with RawSession(served.port, connect=gevent.socket.create_connection) as stalled:
        with RawSession(served.port, connect=tls_connect(pki)) as good:  # while the other says nothing
            good.send(b"set a 0 0 1\r\n1\r\nget a\r\n")
            assert good.recv_until_terminator(b"END\r\n")[1]
        assert served.stats.ssl_handshake_errors == 0
        got, closed = stalled.recv_until_closed()
    assert closed and got == b""
    assert served.stats.ssl_handshake_errors == 1


def test_the_deadline_is_for_the_whole_handshake_not_for_each_read(serve: Callable[..., Served]) -> None:
    served = serve(timeout=0.5)
    hello = bytes([0x16, 0x03, 0x01, 0x02, 0x00]) + bytes(512)  # a TLS record header, then a trickle
    started = time.monotonic()
    with RawSession(served.port, connect=gevent.socket.create_connection) as s:
        for byte in hello:
            if not s.send(bytes([byte])) or time.monotonic() - started > DEADLINE:
                break
            gevent.sleep(0.05)  # a trickle: one byte per 50 ms, each well within the deadline
            if served.stats.ssl_handshake_errors:
                break
    assert served.stats.ssl_handshake_errors == 1
    assert time.monotonic() - started < DEADLINE


# -- client certificates ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verify", "client", "served_ok"),
    [
        ("require", "client", True),
        ("require", None, False),
        ("require", "stranger", False),
        ("optional", None, True),
        ("optional", "client", True),
        ("optional", "stranger", False),
        ("none", "stranger", True),
    ],
)
def test_client_certificates(
    serve: Callable[..., Served], pki: Pki, verify: str, client: str | None, served_ok: bool
) -> None:
    served = serve(tls_verify=verify, tls_ca=str(pki.ca))
    cert, key = {None: (None, None), "client": (pki.client_cert, pki.client_key), "stranger": (pki.stranger_cert, pki.stranger_key)}[client]
    try:
        with RawSession(served.port, connect=tls_connect(pki, cert, key)) as s:
            # TLS 1.3: the server's verdict on the client's certificate arrives after the client's handshake
            s.send(b"version\r\n")
            got, _ = s.recv_until_terminator(b"\r\n")
    except (ssl.SSLError, OSError):
        got = b""
    assert got.startswith(b"VERSION ") is served_ok
    assert served.stats.ssl_handshake_errors == (0 if served_ok else 1)


# -- reloads ------------------------------------------------------------------------------------


def test_reconfigure_serves_new_connections_with_the_new_certificate(serve: Callable[..., Served], pki: Pki) -> None:
    served = serve()
    with RawSession(served.port, connect=tls_connect(pki)) as before:
        assert peer_serial(before.sock) == serial(pki.server_cert)  # type: ignore[arg-type]
        served.tls.configure(settings(pki, tls_cert=str(pki.rotated_cert), tls_key=str(pki.rotated_key)), "cache[0].")
        with RawSession(served.port, connect=tls_connect(pki)) as after:
            assert peer_serial(after.sock) == serial(pki.rotated_cert)  # type: ignore[arg-type]
        before.send(b"version\r\n")  # the connection made before keeps going
        assert before.recv_until_terminator(b"\r\n")[1]
    served.tls.configure(settings(pki, tls=False), "cache[0].")
    assert served.tls.context is None
    with RawSession(served.port, connect=gevent.socket.create_connection) as plain:
        plain.send(b"version\r\n")
        assert plain.recv_until_terminator(b"\r\n")[0].startswith(b"VERSION ")


def test_graceful_stop_closes_an_idle_tls_connection(serve: Callable[..., Served], pki: Pki) -> None:
    served = serve()
    with RawSession(served.port, connect=tls_connect(pki)) as s:
        s.send(b"version\r\n")
        assert s.recv_until_terminator(b"\r\n")[1]
        stopper = gevent.spawn(served.server.stop, 5.0)
        got, closed = s.recv_until_closed()
        assert closed and got == b""
        assert stopper.get(timeout=DEADLINE) is None


def test_admin_port_over_tls(pki: Pki) -> None:
    stats = Stats()
    tls = ListenerTls(stats)
    tls.configure(settings(pki), "admin.")
    admin = AdminServer((HOST, 0), stats, "1.2.3", tls=tls)
    admin.start()
    try:
        with RawSession(admin.address[1], connect=tls_connect(pki)) as s:
            s.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            got, closed = s.recv_until_closed()
        assert closed and got.startswith(b"HTTP/1.1 200 OK\r\n") and b"mproxy_ssl_handshake_errors_total 0" in got
        with RawSession(admin.address[1], connect=gevent.socket.create_connection) as s:
            s.send(b"stats\r\n")
            assert s.recv_until_closed() == (b"", True)
        wait_until(lambda: stats.ssl_handshake_errors == 1, "the plaintext admin client counted")
    finally:
        admin.stop()


# -- the tls_* keys at load ----------------------------------------------------------------------


def write_config(tmp_path: Path, cache_keys: str, admin_keys: str = "") -> Path:
    path = tmp_path / "proxy.toml"
    path.write_text(f'[admin]\nport = 0\n{admin_keys}\n[[cache]]\ncache_name = "c"\nport = 0\n{cache_keys}\n')
    os.chmod(path, 0o600)
    return path


def tls_keys(cert: Path | str, key: Path | str, extra: str = "") -> str:
    return f'tls = true\ntls_cert = "{cert}"\ntls_key = "{key}"\n{extra}'


def test_load_accepts_good_files_and_memcached_spellings(tmp_path: Path, pki: Pki) -> None:
    path = write_config(tmp_path, tls_keys(pki.server_cert, pki.server_key, f'tls_ca = "{pki.ca}"\ntls_verify = "require"\ntls_min_version = "TLSv1.3"\n'))
    loaded = cfg.load(path)
    assert loaded.caches[0].tls_min_version == "1.3" and loaded.warnings == ()


def test_load_names_the_key_and_the_file_of_each_tls_problem(tmp_path: Path, pki: Pki) -> None:
    encrypted = write_key(tmp_path / "encrypted.key", new_key(), b"secret")
    cases = {
        tls_keys(tmp_path / "missing.pem", pki.server_key):
            f'cache[0].tls_cert = "{tmp_path}/missing.pem": cannot read: No such file or directory',
        tls_keys(pki.server_key, pki.server_key): f'cache[0].tls_cert = "{pki.server_key}": holds no PEM certificate',
        tls_keys(pki.server_cert, pki.client_key):
            f'cache[0].tls_key = "{pki.client_key}": is not the private key of cache[0].tls_cert = "{pki.server_cert}"',
        tls_keys(pki.server_cert, pki.server_cert): f'cache[0].tls_key = "{pki.server_cert}": holds no PEM private key',
        tls_keys(pki.server_cert, encrypted):
            f'cache[0].tls_key = "{encrypted}": is encrypted: mproxy needs the key unencrypted (as memcached does), '
            "protected by its file mode",
        tls_keys(pki.server_cert, pki.server_key, 'tls_verify = "optional"\n'):
            'cache[0].tls_verify = "optional": expected cache[0].tls_ca too (the CA certificates client '
            "certificates are checked against)",
        tls_keys(pki.server_cert, pki.server_key, f'tls_verify = "require"\ntls_ca = "{pki.server_key}"\n'):
            f'cache[0].tls_ca = "{pki.server_key}": holds no PEM certificate',
        tls_keys(pki.server_cert, pki.server_key, 'tls_ciphers = "NO-SUCH-CIPHER"\n'):
            'cache[0].tls_ciphers = "NO-SUCH-CIPHER": selects no cipher: expected an OpenSSL cipher list '
            "(as `openssl ciphers` takes)",
        "tls = true\n": "cache[0].tls = true: expected cache[0].tls_cert and cache[0].tls_key too (the certificate "
        "chain and its private key, PEM files)",
    }  # fmt: skip
    for keys, message in cases.items():
        path = write_config(tmp_path, keys)
        with pytest.raises(cfg.ConfigError) as err:
            cfg.load(path)
        assert str(err.value) == f"{path}: {message}"
        assert err.value.key == message.split(" ", 1)[0]
    path = write_config(tmp_path, "", admin_keys=tls_keys(pki.server_cert, pki.client_key))
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load(path)
    assert err.value.key == "admin.tls_key"
    cfg.loads(path.read_text())  # loads reads no file: the checks are load's


def test_tls_files_with_tls_off_are_warned_about(tmp_path: Path, pki: Pki) -> None:
    loaded = cfg.load(write_config(tmp_path, f'tls_cert = "{pki.server_cert}"\ntls_key = "{pki.server_key}"\n'))
    assert loaded.warnings == (
        f"{tmp_path}/proxy.toml: cache[0].tls_cert, tls_key set but cache[0].tls = false: this listener serves plaintext",
    )


def test_a_tls_key_others_may_read_is_warned_about(tmp_path: Path, pki: Pki) -> None:
    key = tmp_path / "exposed.key"
    key.write_bytes(pki.server_key.read_bytes())
    path = write_config(tmp_path, tls_keys(pki.server_cert, key))
    for mode, warned in ((0o644, "others (mode 0644)"), (0o604, "others (mode 0604)"), (0o600, ""), (0o400, "")):
        os.chmod(key, mode)
        expected = (
            (f'{path}: cache[0].tls_key = "{key}": the private key is readable by {warned}: chmod 600 it '
             "(or 640 with root as its owner, to share it with a group)",)
            if warned else ()
        )  # fmt: skip
        assert cfg.load(path).warnings == expected
    os.chmod(key, 0o640)
    group = cfg.load(path).warnings
    assert group == () if os.stat(key).st_uid == 0 else "its group (mode 0640)" in group[0]
