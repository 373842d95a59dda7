"""systemd integration, stdlib only: ``sd_notify`` and socket activation.

``notify("READY=1")`` once the listeners are up (the unit is ``Type=notify``;
sent by :mod:`mproxy.cli`) and ``notify("STOPPING=1")`` when a graceful stop
begins (sent by :mod:`mproxy.app`). A SIGHUP reload sends nothing: the unit's
``ExecReload`` only delivers the signal. Outside systemd (``$NOTIFY_SOCKET``
unset) every call is a no-op that answers False.

Socket activation: :func:`listen_fds` takes the listening sockets systemd
passed (a ``.socket`` unit), and :func:`take_listener` hands each listener of
the configuration the one bound to its address (see docs/operations.md).
"""

from __future__ import annotations

import ipaddress
import os
import socket

#: The first file descriptor systemd passes (``SD_LISTEN_FDS_START``).
LISTEN_FDS_START = 3


def notify(state: str) -> bool:
    """Send ``state`` (``"READY=1"``, ``"STATUS=..."``, ...) to ``$NOTIFY_SOCKET``.

    The socket is a filesystem path or, with a leading ``@``, an abstract
    socket. Returns True if the datagram was sent, False when not under
    systemd or the send failed (the service must run the same either way).
    """
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), addr)
    except OSError:
        return False
    return True


def listen_fds(unset_environment: bool = True) -> list[socket.socket]:
    """The listening sockets systemd passed to this process (socket activation).

    Empty unless ``$LISTEN_PID`` is this process. Sockets come in fd order
    from 3, as the ``.socket`` unit lists them. With ``unset_environment``
    the ``LISTEN_*`` variables are removed so that children do not take them.
    """
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if unset_environment:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if pid != os.getpid():
        return []
    socks = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


def take_listener(socks: list[socket.socket], host: str, port: int) -> socket.socket | None:
    """The stream socket of ``socks`` bound to ``host:port``, removed from ``socks``; None if none is.

    ``host`` is resolved as for binding. The unspecified addresses ``0.0.0.0``
    and ``::`` match each other: a ``.socket`` unit's ``ListenStream=11211``
    binds ``[::]:11211``, which also serves IPv4, where a config says ``0.0.0.0``.
    """
    if not socks or port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return None  # binding it will say what is wrong
    wanted = {_ip(str(info[4][0])) for info in infos}
    any_address = any(ip.is_unspecified for ip in wanted)
    for sock in socks:
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
            continue
        bound_host, bound_port = sock.getsockname()[:2]
        ip = _ip(bound_host)
        if bound_port == port and (ip in wanted or (any_address and ip.is_unspecified)):
            socks.remove(sock)
            return sock
    return None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text.partition("%")[0])  # without an IPv6 scope
