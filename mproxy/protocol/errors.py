"""Protocol errors. Each maps to exactly one wire reply and knows if it is fatal.

The parser raises these from ``next_command()``; the connection writes
``err.reply`` (empty when the command carried ``noreply``: memcached suppresses
error lines too in that case) and closes the connection when ``err.fatal``.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class: ``reply`` is the exact bytes to send (may be empty)."""

    fatal = False

    def __init__(self, reply: bytes, detail: str = "") -> None:
        self.reply = reply
        super().__init__(detail or reply.decode("ascii", "replace").strip())


class CommandError(ProtocolError):
    """Unknown command or wrong number of tokens: memcached's ``ERROR``."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(b"ERROR\r\n", detail or "ERROR")


class ClientError(ProtocolError):
    """``CLIENT_ERROR <message>``; suppressed (empty reply) under noreply."""

    def __init__(self, message: str, noreply: bool = False) -> None:
        self.message = message
        super().__init__(b"" if noreply else b"CLIENT_ERROR " + message.encode() + b"\r\n",
                         "CLIENT_ERROR " + message)


class ConnectionClosed(ProtocolError):
    """Input after which memcached drops the connection (no reply)."""

    fatal = True

    def __init__(self, detail: str) -> None:
        super().__init__(b"", detail)


class RequestTooLarge(ProtocolError):
    """A request larger than the connection may hold (a get line over
    ``MAX_GET_LINE_LENGTH``): memcached's answer when it cannot grow its input buffer
    for a request (``try_read_network``), then the connection closes."""

    fatal = True

    def __init__(self, detail: str) -> None:
        super().__init__(b"SERVER_ERROR out of memory reading request\r\n", detail)
