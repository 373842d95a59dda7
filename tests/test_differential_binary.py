r"""Differential tests of the binary protocol: sessions replayed against memcached and mproxy.

The binary twin of ``tests/test_differential.py`` (read it first: targets, headers,
``send``/``send-close``/``reconnect``/``sleep`` steps and escapes are the same). Each
file in ``tests/differential_binary/*.txt`` is one session; every step's response
frames must be identical after normalisation.

Requests
--------
A send step holds requests separated by a ``;`` token. A request is an opcode name
(memcached's, lower case: ``get getq getk getkq set setq add ... gatkq stat``) or
``0xNN``, then ``field=value`` tokens; values take the escapes and ``{rep:N:TEXT}``
of the text corpus (``\s`` for a space: tokens are split on white space)::

    send: set k=a v=hello flags=5 exp=0 ; getk k=a ; getkq k=missing

Fields: ``k`` key, ``v`` value, ``flags``, ``exp`` (set/add/replace, touch/gat,
incr/decr, flush: a flush carries extras only when ``exp`` is given), ``delta``,
``initial``, ``cas`` (a number, or ``{cas}``: the last non-zero CAS this server
answered in this session), ``opaque`` (default: the request's number in the session,
so replies out of order show). Overrides that make malformed requests: ``extras``
(bytes), ``extlen``, ``keylen``, ``bodylen``, ``magic``. The pseudo-request
``raw b=BYTES`` sends bytes as they are.

Reading rule: after a send step the harness sends a ``noop`` with opaque
:data:`SENTINEL_OPAQUE` and reads frames until that noop's answer; a ``send-close``
step reads until the server closes.

Normalisation: CAS values become ``<cas#N>`` numbered by first appearance per server
(0 stays 0), so the pattern of equal and distinct uniques must match; the body of
``version`` becomes ``<version>``; consecutive ``stat`` frames with a key become one
``STAT <...>`` line (the terminator stays). Every session starts with ``flush`` and
``noop``.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mproxy.protocol import binary as b
from tests.servers import RawSession, Server
from tests.test_binary_parser import Frame, split_frames
from tests.test_differential import (  # noqa: F401  (diff_target is a fixture)
    _BACKENDS_HEADER,
    _SKIP_HEADER,
    _STEP_LINE,
    MAX_SLEEP,
    SHOWN_MISMATCHES,
    STEP_KINDS,
    STEP_TIMEOUT,
    CorpusError,
    Mismatch,
    Target,
    decode_payload,
    diff_target,
    run_session,
    skip_unless_for,
)

pytestmark = pytest.mark.e2e

CORPUS_DIR = Path(__file__).parent / "differential_binary"
SENTINEL_OPAQUE = 0x5E471E1
SENTINEL = b.HEADER.pack(0x80, b.Opcode.NOOP, 0, 0, 0, 0, 0, SENTINEL_OPAQUE, 0)
RESET = b.HEADER.pack(0x80, b.Opcode.FLUSH, 0, 0, 0, 0, 0, 0, 0)

_OPCODES = {name: value for value, name in b.OPCODE_NAMES.items()}
_CAS_REF = "{cas}"
_FIELDS = frozenset(
    ("k", "v", "flags", "exp", "delta", "initial", "cas", "opaque", "extras", "extlen", "keylen", "bodylen", "magic", "b")
)


@dataclass(frozen=True)
class Request:
    """One request of a step; ``cas_ref`` when its CAS is ``{cas}`` (resolved per server)."""

    fields: dict[str, bytes]
    line: int

    def encode(self, cas: int) -> bytes:
        f = self.fields
        name = f["op"].decode()
        if name == "raw":
            return f.get("b", b"")
        opcode = int(name, 16) if name.startswith("0x") else _OPCODES[name]
        base = b.QUIET_FORMS.get(opcode, opcode)
        key, value = f.get("k", b""), f.get("v", b"")
        number = lambda name, default=0: int(f[name], 0) if name in f else default  # noqa: E731
        if "extras" in f:
            extras = f["extras"]
        elif base in (b.Opcode.SET, b.Opcode.ADD, b.Opcode.REPLACE):
            extras = struct.pack(">II", number("flags"), number("exp"))
        elif base in (b.Opcode.INCREMENT, b.Opcode.DECREMENT):
            extras = struct.pack(">QQI", number("delta"), number("initial"), number("exp"))
        elif base in (b.Opcode.TOUCH, b.Opcode.GAT, b.Opcode.GATK) or (base == b.Opcode.FLUSH and "exp" in f):
            extras = struct.pack(">I", number("exp"))
        else:
            extras = b""
        bodylen = number("bodylen", len(extras) + len(key) + len(value))
        return b.HEADER.pack(
            number("magic", 0x80), opcode, number("keylen", len(key)), number("extlen", len(extras)), 0, 0,
            bodylen, number("opaque"), cas if f.get("cas") == _CAS_REF.encode() else number("cas"),
        ) + extras + key + value


@dataclass(frozen=True)
class Step:
    kind: str
    line: int
    requests: tuple[Request, ...] = ()
    seconds: float = 0.0


@dataclass(frozen=True)
class Session:
    path: Path
    steps: tuple[Step, ...]
    backends: frozenset[str] | None
    skip_on: dict[str, str]


def parse_requests(text: str, line: int, numbering: Iterator[int]) -> tuple[Request, ...]:
    requests: list[Request] = []
    for chunk in re.split(r"\s;\s|\s;$|^;\s", f" {text} "):
        tokens = chunk.split()
        if not tokens:
            continue
        name = tokens[0]
        if name not in _OPCODES and name != "raw" and not re.fullmatch(r"0x[0-9a-fA-F]{1,2}", name):
            raise ValueError(f"unknown request {name!r}")
        fields = {"op": name.encode(), "opaque": str(next(numbering)).encode()}
        for token in tokens[1:]:
            key, sep, value = token.partition("=")
            if not sep or key not in _FIELDS:
                raise ValueError(f"expected field=value with a field of {sorted(_FIELDS)}, got {token!r}")
            fields[key] = value.encode() if value == _CAS_REF else decode_payload(value)
        requests.append(Request(fields, line))
    if not requests:
        raise ValueError("a send step needs at least one request")
    return tuple(requests)


def parse_session(path: Path) -> Session:
    steps: list[Step] = []
    backends: frozenset[str] | None = None
    skip_on: dict[str, str] = {}
    numbering = iter(range(1, 2**31))
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if line.startswith("#"):
            if header := _BACKENDS_HEADER.fullmatch(line):
                backends = frozenset(name.strip() for name in header[1].split(",") if name.strip())
            elif header := _SKIP_HEADER.fullmatch(line):
                skip_on[header[1]] = header[2]
            continue
        try:
            match = _STEP_LINE.fullmatch(line)
            if match is None or match[1] not in STEP_KINDS or match[1] == "send-partial":
                raise ValueError("expected send:, send-close:, reconnect: or sleep:")
            kind, text = match[1], match[2]
            if kind == "sleep":
                seconds = float(text)
                if not 0 < seconds <= MAX_SLEEP:
                    raise ValueError(f"sleep must be in (0, {MAX_SLEEP}] seconds")
                steps.append(Step(kind, number, seconds=seconds))
            elif kind == "reconnect":
                steps.append(Step(kind, number))
            else:
                steps.append(Step(kind, number, parse_requests(text, number, numbering)))
        except (ValueError, KeyError) as exc:
            raise CorpusError(f"{path.name}:{number}: {exc}") from None
    if not steps:
        raise CorpusError(f"{path.name}: no steps")
    return Session(path, tuple(steps), backends, skip_on)


# -- reading and normalising frames ---------------------------------------------------


def _is_sentinel(frame: Frame) -> bool:
    return frame.opcode == b.Opcode.NOOP and frame.opaque == SENTINEL_OPAQUE


@dataclass
class Normaliser:
    cas_ids: dict[int, int] = field(default_factory=dict)

    def __call__(self, frames: list[Frame]) -> bytes:
        lines: list[str] = []
        for f in frames:
            if f.opcode == b.Opcode.STAT and f.status == 0 and f.key:
                if not lines or lines[-1] != "STAT <...>":
                    lines.append("STAT <...>")
                continue
            cas = "0" if f.cas == 0 else f"<cas#{self.cas_ids.setdefault(f.cas, len(self.cas_ids) + 1)}>"
            value = b"<version>" if f.opcode == b.Opcode.VERSION and f.status == 0 else f.value
            name = b.OPCODE_NAMES.get(f.opcode, f"0x{f.opcode:02x}")
            lines.append(
                f"{name} status=0x{f.status:02x} opaque={f.opaque} cas={cas} extras={f.extras!r} key={f.key!r} value={value!r}"
            )
        return "".join(line + "\n" for line in lines).encode()


@dataclass(frozen=True)
class Outcome:
    reply: bytes
    complete: bool


class Conversation:
    """One server's side of a session."""

    def __init__(self, label: str, port: int, *, strict: bool = False) -> None:
        # strict: the text harness's flag for unresolved CAS references; here {cas}
        # is 0 until the server answered one, on both servers alike
        self.label = label
        self.port = port
        self.normalise = Normaliser()
        self.last_cas = 0
        self.conn: RawSession | None = RawSession(port)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def reset(self) -> None:
        assert self.conn is not None
        self.conn.send(RESET + SENTINEL)
        data, complete = self.conn.recv_until(self._ended)
        frames, rest = split_frames(data)
        if not complete or [(f.opcode, f.status) for f in frames] != [(b.Opcode.FLUSH, 0), (b.Opcode.NOOP, 0)]:
            raise AssertionError(f"{self.label}: session reset answered {data!r}")

    @staticmethod
    def _ended(buffer: bytes) -> bool:
        frames, rest = split_frames(buffer)
        return not rest and bool(frames) and _is_sentinel(frames[-1])

    def _render(self, frames: list[Frame], rest: bytes, marker: bytes = b"") -> bytes:
        for f in frames:
            if f.cas:
                self.last_cas = f.cas
        tail = b"<incomplete frame %r>\n" % rest if rest else b""
        return self.normalise(frames) + tail + marker

    def run(self, step: Step) -> Outcome:
        if step.kind == "reconnect":
            self.close()
            self.conn = RawSession(self.port)
            return Outcome(b"<reconnected>", True)
        if self.conn is None:
            return Outcome(b"<connection already closed>", False)
        payload = b"".join(request.encode(self.last_cas) for request in step.requests)
        if step.kind == "send-close":
            self.conn.send(payload)
            data, closed = self.conn.recv_until_closed(STEP_TIMEOUT)
            self.close()
            frames, rest = split_frames(data)
            return Outcome(self._render(frames, rest, b"<closed>" if closed else b"<still open>"), closed)
        self.conn.send(payload + SENTINEL)
        data, complete = self.conn.recv_until(self._ended, STEP_TIMEOUT)
        frames, rest = split_frames(data)
        if complete:
            return Outcome(self._render(frames[:-1], rest), True)
        closed = self.conn.closed_by_peer
        self.close()
        return Outcome(self._render(frames, rest, b"<closed>" if closed else b"<no reply to the sentinel>"), False)


def describe(session: Session, target_name: str, mismatches: list[Mismatch]) -> str:
    lines = [f"{session.path.name}: {len(mismatches)} step(s) differ from memcached"]
    for mismatch in mismatches[:SHOWN_MISMATCHES]:
        lines += [
            f"--- line {mismatch.step.line} ({mismatch.step.kind})",
            "  memcached:\n" + mismatch.reference.decode(errors="replace"),
            f"  {target_name}:\n" + mismatch.target.decode(errors="replace"),
        ]
    if len(mismatches) > SHOWN_MISMATCHES:
        lines.append("... and the steps at lines " + ", ".join(str(m.step.line) for m in mismatches[SHOWN_MISMATCHES:]))
    return "\n".join(lines)


SESSION_FILES = sorted(CORPUS_DIR.glob("*.txt"))


@pytest.mark.memcached
@pytest.mark.parametrize("session_file", SESSION_FILES, ids=lambda path: path.stem)
def test_session(session_file: Path, memcached_server: Server, diff_target: Target) -> None:
    """Every step of the session gets the same frames from the target as from memcached."""
    session = parse_session(session_file)
    skip_unless_for(diff_target.name, session.backends, session.skip_on)
    mismatches = run_session(session, memcached_server.port, diff_target, Conversation)  # type: ignore[arg-type]
    if mismatches:
        pytest.fail(describe(session, diff_target.name, mismatches), pytrace=False)


# Tests of the harness itself (no servers).


def test_requests_encode_as_memcached_reads_them() -> None:
    numbering = iter(range(1, 100))
    set_a, getk, raw = parse_requests(r"set k=a v=hi\s! flags=5 exp=9 ; getk k=a opaque=7 ; raw b=\x80", 1, numbering)
    assert set_a.encode(0) == b.HEADER.pack(0x80, 1, 1, 8, 0, 0, 13, 1, 0) + struct.pack(">II", 5, 9) + b"ahi !"
    assert getk.encode(0) == b.HEADER.pack(0x80, 0x0C, 1, 0, 0, 0, 1, 7, 0) + b"a"
    assert raw.encode(0) == b"\x80"
    (incr,) = parse_requests("incrementq k=n delta=2 initial=10 exp=0xffffffff cas={cas}", 1, numbering)
    assert incr.encode(42) == (
        b.HEADER.pack(0x80, 0x15, 1, 20, 0, 0, 21, 4, 42) + struct.pack(">QQI", 2, 10, 0xFFFFFFFF) + b"n"
    )
    (flush,) = parse_requests("flushq", 1, numbering)
    assert flush.encode(0) == b.HEADER.pack(0x80, 0x18, 0, 0, 0, 0, 0, 5, 0)
    with pytest.raises(ValueError):
        parse_requests("bogus k=a", 1, numbering)


def test_normaliser_numbers_cas_and_collapses_stats() -> None:
    frames = [
        Frame(0, 0, b"\0\0\0\0", b"", b"x", 1, 77),
        Frame(0, 0, b"\0\0\0\0", b"", b"x", 2, 77),
        Frame(1, 0, b"", b"", b"", 3, 0),
        Frame(0x10, 0, b"", b"pid", b"1", 4, 0),
        Frame(0x10, 0, b"", b"uptime", b"2", 4, 0),
        Frame(0x10, 0, b"", b"", b"", 4, 0),
        Frame(0x0B, 0, b"", b"", b"1.6.18", 5, 0),
    ]
    text = Normaliser()(frames).decode()
    assert text.count("cas=<cas#1>") == 2 and "cas=0" in text
    assert "STAT <...>\nstat status=0x00 opaque=4" in text and "<version>" in text
