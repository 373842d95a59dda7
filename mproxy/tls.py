"""TLS of a listener, memcached's ``-Z`` and ``ssl_*`` options: the ``tls_*`` keys of a
``[[cache]]`` or ``[admin]`` table as an :class:`ssl.SSLContext`.

=================== =========================== ==============================
mproxy key          memcached 1.6 option        meaning
=================== =========================== ==============================
``tls``             ``-Z``                      serve TLS
``tls_cert``        ``ssl_chain_cert``          certificate chain, PEM
``tls_key``         ``ssl_key``                 its private key, PEM
``tls_ca``          ``ssl_ca_cert``             CAs client certificates are checked against
``tls_verify``      ``ssl_verify_mode`` 0, 1, 2 ``none``, ``optional``, ``require``
``tls_min_version`` ``ssl_min_version``         ``1.2`` or ``1.3``
``tls_ciphers``     ``ssl_ciphers``             OpenSSL cipher list (TLS 1.2)
=================== =========================== ==============================

:func:`context` is the one reading of those keys. ``config.load`` calls it to
check the files (a bad one is a one-line error naming the key and the file,
at start, in ``--check-config`` and on reload); :mod:`mproxy.handshake` calls
it, with gevent's ``SSLContext`` class, for the context a listener serves with.

Stdlib only.
"""

from __future__ import annotations

import json
import ssl
from typing import NoReturn, Protocol

#: Seconds a client has to complete its handshake (:mod:`mproxy.handshake`).
HANDSHAKE_TIMEOUT = 10.0
#: ``tls_verify`` -> whether a client must show a certificate (memcached's ``ssl_verify_mode``).
VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "require": ssl.CERT_REQUIRED}
#: ``tls_min_version`` -> the oldest protocol version accepted.
MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TlsSettings(Protocol):
    """The ``tls_*`` keys of a listener's table (``CacheConfig``, ``AdminConfig``; read-only)."""

    @property
    def tls(self) -> bool: ...
    @property
    def tls_cert(self) -> str: ...
    @property
    def tls_key(self) -> str: ...
    @property
    def tls_ca(self) -> str: ...
    @property
    def tls_verify(self) -> str: ...
    @property
    def tls_min_version(self) -> str: ...
    @property
    def tls_ciphers(self) -> str: ...


class TlsError(ValueError):
    """Settings a context cannot be made of. ``str(err)`` is one line naming the key
    (with the table's ``where`` prefix, e.g. ``cache[0].tls_key``), its file and the
    problem; ``key`` is that dotted key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(message)


def context(settings: TlsSettings, where: str = "", cls: type[ssl.SSLContext] | None = None) -> ssl.SSLContext:
    """A server context of ``settings`` (which have ``tls`` on), made by ``cls``: by
    default ``ssl.SSLContext`` as it is when called (gevent's, once gevent patched ssl:
    the stdlib's class used after patching recurses without end in its setters).

    ``where`` prefixes the keys in errors (``"cache[0]."``). Raises
    :class:`TlsError` for a missing or unreadable file, a file that holds no
    certificate (``tls_cert``, ``tls_ca``), a key that is not the
    certificate's or is encrypted, a ``tls_verify`` without ``tls_ca``, or
    ciphers OpenSSL does not know.
    """

    cls = cls or ssl.SSLContext

    def fail(key: str, problem: str) -> NoReturn:
        raise TlsError(f"{where}{key}", f"{where}{key} = {json.dumps(getattr(settings, key))}: {problem}")

    if not (settings.tls_cert and settings.tls_key):
        raise TlsError(
            f"{where}tls",
            f"{where}tls = true: expected {where}tls_cert and {where}tls_key too "
            "(the certificate chain and its private key, PEM files)",
        )
    if settings.tls_verify != "none" and not settings.tls_ca:
        fail("tls_verify", f"expected {where}tls_ca too (the CA certificates client certificates are checked against)")
    for key in ("tls_cert", "tls_key", "tls_ca"):
        path = getattr(settings, key)
        try:
            if path:
                open(path, "rb").close()
        except OSError as err:
            fail(key, f"cannot read: {err.strerror or err}")
    try:
        cls(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=settings.tls_cert)
    except ssl.SSLError:
        fail("tls_cert", "holds no PEM certificate")

    def encrypted() -> bytes:
        fail("tls_key", "is encrypted: mproxy needs the key unencrypted (as memcached does), protected by its file mode")

    ctx = cls(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSIONS[settings.tls_min_version]
    try:
        ctx.load_cert_chain(settings.tls_cert, settings.tls_key, password=encrypted)
    except ssl.SSLError as err:
        if err.reason == "KEY_VALUES_MISMATCH":
            fail("tls_key", f"is not the private key of {where}tls_cert = {json.dumps(settings.tls_cert)}")
        fail("tls_key", "holds no PEM private key")
    if settings.tls_ca:
        try:
            ctx.load_verify_locations(cafile=settings.tls_ca)
        except ssl.SSLError:
            fail("tls_ca", "holds no PEM certificate")
    ctx.verify_mode = VERIFY[settings.tls_verify]
    if settings.tls_ciphers:
        try:
            ctx.set_ciphers(settings.tls_ciphers)
        except ssl.SSLError:
            fail("tls_ciphers", "selects no cipher: expected an OpenSSL cipher list (as `openssl ciphers` takes)")
    return ctx
