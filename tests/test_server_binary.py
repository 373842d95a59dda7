"""The connection loop speaking binary, in-process (see tests/test_server.py): the
first byte of a connection picks its protocol."""

from __future__ import annotations

import struct

from mproxy.protocol.binary import RESPONSE_MAGIC, Opcode
from tests.test_binary_parser import arith_req, req, store_req
from tests.test_dispatch_binary import Frame, frames
from tests.test_server import StartServer, session, start  # noqa: F401  (start is a fixture)

NOOP = req(Opcode.NOOP, opaque=0xFEED)


def noop_ended(buf: bytes) -> bool:
    """The buffer ends with the reply to NOOP."""
    return len(buf) >= 24 and buf[-24:-16] == bytes([RESPONSE_MAGIC, Opcode.NOOP]) + b"\0" * 6 and buf[-12:-8] == b"\0\0\xfe\xed"


def test_a_binary_pipeline_in_one_write_and_byte_by_byte(start: StartServer) -> None:
    server = start()
    with session(server) as s:
        s.send(store_req(Opcode.SETQ, b"a", b"1", 3) + req(Opcode.GETKQ, b"a") + req(Opcode.GETKQ, b"b")
               + arith_req(Opcode.INCREMENT, b"a", 5) + NOOP)
        got, complete = s.recv_until(noop_ended)
        assert complete
        replies = frames(got)
        assert [(f.opcode, f.status, f.key, f.value) for f in replies] == [
            (Opcode.GETKQ, 0, b"a", b"1"),
            (Opcode.INCREMENT, 0, b"", struct.pack(">Q", 6)),
            (Opcode.NOOP, 0, b"", b""),
        ]
        for byte in req(Opcode.GET, b"a") + NOOP:
            s.send(bytes([byte]))
        got, complete = s.recv_until(noop_ended)
        assert complete and frames(got)[0].value == b"6"
    assert server.stats.cmd_get == 3 and server.stats.protocol_errors == 0


def test_text_connections_are_unchanged(start: StartServer) -> None:
    server = start()
    with session(server) as s:
        s.send(b"set a 0 0 1\r\n\x80\r\nget a\r\n")
        assert s.recv_until_terminator(b"END\r\n")[0] == b"STORED\r\nVALUE a 0 1\r\n\x80\r\nEND\r\n"


def test_quit_answers_then_closes(start: StartServer) -> None:
    server = start()
    for quit_request, answered in ((req(Opcode.QUIT), [Opcode.NOOP, Opcode.QUIT]), (req(Opcode.QUITQ), [Opcode.NOOP])):
        with session(server) as s:
            s.send(NOOP + quit_request + NOOP)
            got, closed = s.recv_until_closed()
        assert closed and [f.opcode for f in frames(got)] == answered


def test_invalid_arguments_answer_then_close(start: StartServer) -> None:
    server = start()
    with session(server) as s:
        s.send(req(Opcode.GET, b"a") + req(Opcode.GET, b"k" * 251) + NOOP)
        got, closed = s.recv_until_closed()
    assert closed
    assert [(f.opcode, f.status, f.value) for f in frames(got)] == [
        (Opcode.GET, 1, b"Not found"),
        (Opcode.GET, 4, b"Invalid arguments"),
    ]
    assert server.stats.protocol_errors == 1


def test_a_bad_magic_closes_after_the_replies_before_it(start: StartServer) -> None:
    server = start()
    with session(server) as s:
        s.send(req(Opcode.GET, b"a") + b"get a\r\n" + b"x" * 20)
        got, closed = s.recv_until_closed()
    assert closed and frames(got) == [
        Frame(Opcode.GET, 1, b"", b"", b"Not found", 0xDEADBEEF, 0),
    ]
    with session(server) as s:  # a connection that starts binary stays binary
        s.send(NOOP)
        assert s.recv_until(noop_ended)[1]
        s.send(b"version\r\n" + b" " * 15)
        assert s.recv_until_closed() == (b"", True)
