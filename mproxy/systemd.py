"""systemd integration, stdlib only: ``sd_notify`` and socket activation.

``notify("READY=1")`` once the listeners are up (the unit is ``Type=notify``;
sent by :mod:`mproxy.cli`) and ``notify("STOPPING=1")`` when a graceful stop
begins (sent by :mod:`mproxy.app`). A SIGHUP reload sends nothing: the unit's
``ExecReload`` only delivers the signal. Outside systemd (``$NOTIFY_SOCKET``
unset) every call is a no-op that answers False.

:func:`listen_fds` (socket activation) is not wired into the listeners yet.
"""

from __future__ import annotations

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
