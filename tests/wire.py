"""Bytes through the parser and a Dispatcher, as a connection passes them, without sockets."""

from __future__ import annotations

from collections.abc import Iterable

from mproxy.dispatch import Dispatcher
from mproxy.protocol.errors import ProtocolError
from mproxy.protocol.parser import NEED_DATA, Parser


def replies(dispatcher: Dispatcher, data: bytes) -> bytes:
    """Every reply to ``data`` (whole commands), parse errors answered in their place."""
    parser = Parser()
    parser.feed(data)
    commands: list[object] = []
    while True:
        try:
            cmd = parser.next_command()
        except ProtocolError as err:
            commands.append(err)
            continue
        if cmd is NEED_DATA:
            break
        commands.append(cmd)
    return b"".join(answers(dispatcher.run(commands, "test:1")))  # type: ignore[arg-type]


def answers(replies: Iterable[bytes | Iterable[bytes] | None]) -> list[bytes]:
    """What ``Dispatcher.run`` yields, one ``bytes`` per command: a reply in parts
    joined, the ``None`` of "flush now" left out."""
    return [reply if isinstance(reply, bytes) else b"".join(reply) for reply in replies if reply is not None]
