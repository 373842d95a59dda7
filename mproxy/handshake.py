"""The TLS handshake of each connection a listener accepts, in that connection's greenlet.

A listener (:class:`~mproxy.server.CacheServer`, :class:`~mproxy.admin.AdminServer`)
hands its connection handler to :meth:`ListenerTls.serve`. gevent's
``StreamServer`` spawns the handler's greenlet before anything is read, so the
accept loop never waits for a client; with a context set (``tls = true``) the
greenlet first runs the handshake, bounded by :data:`~mproxy.tls.HANDSHAKE_TIMEOUT`
as a whole (a client that trickles its hello does not extend it), then hands the
handler the TLS socket: it reads and writes plaintext as before, so the first
byte after the handshake still tells the binary protocol from the text one. A
handshake that fails or runs out of time (a plaintext client, a certificate
refused, a stalled client) closes the connection and counts in
``ssl_handshake_errors``.

A reload replaces :attr:`ListenerTls.context` (:meth:`ListenerTls.configure`):
connections accepted after it use the new certificate and settings; those
already open keep theirs.
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any, Callable

import gevent
from gevent import ssl as gevent_ssl

from mproxy import tls
from mproxy.server import address_text
from mproxy.stats import Stats

log = logging.getLogger(__name__)

#: A listener's connection handler: ``handle(sock, address)``.
Handler = Callable[[socket.socket, Any], None]


def server_context(settings: tls.TlsSettings, where: str) -> ssl.SSLContext | None:
    """The context a listener with ``settings`` serves with; None when ``tls`` is off.
    Raises :class:`~mproxy.tls.TlsError` (``where`` prefixes its keys, ``"cache[0]."``)."""
    if not settings.tls:
        return None
    return tls.context(settings, where, gevent_ssl.SSLContext)


class ListenerTls:
    """The TLS of one listener: its context (None: plaintext), swapped by reloads."""

    def __init__(self, stats: Stats, context: ssl.SSLContext | None = None, timeout: float = tls.HANDSHAKE_TIMEOUT) -> None:
        #: where failed handshakes are counted (``ssl_handshake_errors``)
        self.stats = stats
        self.context = context
        self.timeout = timeout

    def configure(self, settings: tls.TlsSettings, where: str) -> None:
        """Serve new connections with ``settings`` (raises :class:`~mproxy.tls.TlsError`,
        leaving the context as it was)."""
        self.context = server_context(settings, where)

    def serve(self, handle: Handler) -> Handler:
        """``handle``, behind the handshake when a context is set."""

        def accept(sock: socket.socket, address: Any) -> None:
            context = self.context
            if context is None:
                handle(sock, address)
                return
            secured = self._handshake(context, sock, address)
            if secured is not None:
                handle(secured, address)

        return accept

    def _handshake(self, context: ssl.SSLContext, sock: socket.socket, address: Any) -> ssl.SSLSocket | None:
        """The TLS socket once the handshake is done; None (counted, closed) if it is not."""
        secured: ssl.SSLSocket | None = None
        try:
            with gevent.Timeout(self.timeout, TimeoutError(f"no TLS handshake within {self.timeout:g} s")):
                secured = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                secured.do_handshake()
        except OSError as err:  # ssl.SSLError, a reset, the deadline
            self.stats.ssl_handshake_errors += 1
            log.debug("TLS handshake with %s failed: %s", address_text(address), err)
            (secured or sock).close()
            return None
        return secured
