"""Bytes through the parser and a Dispatcher, as a connection passes them, without sockets."""

from __future__ import annotations

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
    return b"".join(dispatcher.run(commands, "test:1"))  # type: ignore[arg-type]
