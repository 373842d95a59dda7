"""How the workers of a supervisor share one listening address.

Two ways, one class each, with the same methods: :meth:`for_worker` gives
the socket a new worker inherits (the caller closes its copy once the worker
has it), :meth:`close` releases the address.

* :class:`PortGroup` (the default): one socket per worker, all bound to the
  address with ``SO_REUSEPORT``, so the kernel spreads new connections evenly
  over the workers (by a hash of the client's address and port), whichever
  worker happens to be awake. Only the worker holds its socket: when it
  exits the kernel closes it, and new connections go to the others until it
  is back with a new one (those already waiting in its queue, not accepted
  yet, are reset).
* :class:`SharedListener`: one socket every worker accepts on, for a socket
  systemd passed (socket activation binds one per address). Whichever worker
  is first to wake takes a connection: under load, one worker may take most
  of a burst (measured in docs/operations.md, "Workers").

Stdlib only; the sockets are made as gevent's StreamServer makes its own.
"""

from __future__ import annotations

import socket

def bind(address: tuple[str, int], reuse_port: bool = False, listen: bool = True, backlog: int = 0) -> socket.socket:
    """A TCP socket bound to ``address`` (``SO_REUSEADDR``; ``SO_REUSEPORT`` if asked),
    listening with a queue of ``backlog`` (``[proxy] backlog``) unless ``listen`` is False."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class SharedListener:
    """One socket that every worker accepts on."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def for_worker(self) -> socket.socket:
        """The shared socket (a duplicate: closing it leaves the socket open)."""
        return self.sock.dup()

    def close(self) -> None:
        self.sock.close()


class PortGroup:
    """One ``SO_REUSEPORT`` socket per worker on one address; see the module doc.

    The address must be free: it is first bound without ``SO_REUSEPORT`` (and
    released at once), so that a port another program listens on, or another
    mproxy's group, is an error here rather than a silent share of its
    connections. A bound socket that does not listen then holds the port for
    the group's life (port 0 becomes the free port it got): while no worker
    serves, connections are refused, not queued. It has ``SO_REUSEADDR``, as
    every listener here, so that connections of an earlier run still in
    TIME_WAIT do not stop a restart; so while no worker listens at all, a
    program using ``SO_REUSEADDR`` too could take the port.
    """

    def __init__(self, address: tuple[str, int], backlog: int) -> None:
        host, port = address
        self._backlog = backlog
        if port:
            bind(address, listen=False).close()  # EADDRINUSE if anything holds it, even a group
        self._holder = bind(address, reuse_port=True, listen=False)
        self._host = host
        self._port: int = self._holder.getsockname()[1]

    @property
    def address(self) -> tuple[str, int]:
        return self._host, self._port

    def for_worker(self) -> socket.socket:
        """A new socket of the group, listening: the new worker's own."""
        return bind((self._host, self._port), reuse_port=True, backlog=self._backlog)

    def close(self) -> None:
        """Release the port (the workers' sockets close with them)."""
        self._holder.close()
