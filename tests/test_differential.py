r"""Differential tests: replay scripted sessions against memcached and mproxy, compare bytes.

Each file in ``tests/differential/*.txt`` is one session, run in lockstep on two
connections: one to a real memcached 1.6 (the reference, started with
``tests.conftest.MEMCACHED_ARGS`` so that its answers do not depend on its
background LRU thread) and one to the target
(mproxy with a backend, or a second memcached to test this harness itself).
The replies of every step must be identical byte for byte after normalisation.

Corpus format
-------------
One step per line; blank lines and lines starting with ``#`` are ignored::

    send: get a\r\n          send the bytes, then read the reply (see below)
    + get b\r\n              continue the previous step's bytes (one space after + dropped)
    send-partial: set a 0    send the bytes, read nothing (the next send step reads
                             the replies); splits a command across TCP writes
    send-close: quit\r\n     send the bytes; the server must close the connection
    reconnect:               close the connection and open a fresh one
    sleep: 2.1               wait (only in sessions about expiry; keep them rare)

The text after ``KIND:`` (one space dropped) is sent verbatim, UTF-8 encoded, with
escapes ``\r \n \t \s`` (space: makes trailing spaces visible) ``\\`` and ``\xHH``
(one raw byte), and with placeholders:

* ``{rep:N:TEXT}`` is TEXT repeated N times; ``$i`` in TEXT becomes the repetition
  index 0..N-1 (``get{rep:3: k$i}`` is ``get k0 k1 k2``). TEXT has no braces.
* ``{cas}`` is the CAS unique of the last ``VALUE`` line carrying one, or of the last
  meta reply carrying a ``c`` flag, that the same server sent in an earlier step of
  this session; ``{cas:KEY}`` the last one for KEY (a meta reply names its key by
  its ``k`` flag, as sent: base64 for a binary key). Substituted per server, so each
  server is sent its own CAS.

Reading rule: after a ``send`` step's bytes the harness sends the meta no-op
``mn\r\n`` and reads until the reply holds one ``MN\r\n`` line more than the
step's own ``mn\r\n`` lines (a step may end a pipeline of quiet meta commands
with ``mn``): that is deterministic whatever the step sends, as long as the step
leaves the server at a command boundary (not inside a data block). Hence the corpus
must not send ``mn`` with arguments (also answered ``MN``) nor store values whose
data is or ends with a line ``MN``. If the reference memcached does not answer the
sentinel (or does not close on ``send-close``), the session file is wrong and the
test fails with a corpus error.

Header comments (anywhere in the file):

* ``# backends: memory, momento`` run this session only against these mproxy backends.
* ``# skip-on: momento (reason)`` skip it on that backend, stating why (the hook for
  documented, intended differences of a backend).

The memcached self-test target ignores both headers and runs every session.

Normalisation: CAS uniques in ``VALUE`` lines, in the ``c`` flag of meta replies
(``VA HD NS EX NF EN``) and in the ``cas=`` of ``me`` become ``<cas#N>`` numbered by
first appearance per server (so equal/unequal CAS patterns must match, a bijection);
figures that depend on the second the server's clock ticks (a meta reply's ``t`` and
``l`` flags, ``me``'s ``exp`` and ``la``) become ``t<ttl>``, ``l<la>``, ``exp=<exp>``,
``la=<la>``, except a TTL of -1 (no expiry), which is compared; their values are
checked by ``tests/test_meta.py`` on a settable clock. Consecutive ``STAT`` lines
become one ``STAT <...>`` line (only the shape of stats output is compared);
``VERSION x`` becomes ``VERSION <version>``. A ``VA <size>`` line, like a ``VALUE``
line, is one unit with its data block. Every session starts with ``flush_all`` on
both servers.

Targets: env ``MPROXY_DIFF_TARGET`` is a comma-separated list of mproxy backends
(keys of ``tests.conftest.MPROXY_CONFIGS``; default ``memory,momento``: both backends,
one mproxy each for the whole module) or ``memcached`` to run the corpus against a
second memcached (validates the harness and corpus). The ``momento`` target runs
mproxy on the bundled local Momento server (``[momento] local = "embedded"``); its
deliberate differences from memcached (``docs/compatibility.md``) are pinned one by
one in ``tests/test_momento_differences.py``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import MEMCACHED_ARGS, MproxyFactory
from tests.servers import RawSession, Server, start_memcached

pytestmark = pytest.mark.e2e

CORPUS_DIR = Path(__file__).parent / "differential"
TARGET_ENV = "MPROXY_DIFF_TARGET"
#: Targets run when ``MPROXY_DIFF_TARGET`` is unset: every mproxy backend.
DEFAULT_TARGETS = "memory,momento"
#: Target name that runs a second real memcached instead of mproxy.
SELF_TEST_TARGET = "memcached"

SENTINEL = b"mn\r\n"
SENTINEL_REPLY = b"MN\r\n"
RESET = b"flush_all\r\n"
RESET_REPLY = b"OK\r\n"
#: Bound on reading one step's reply (the sentinel or the close).
STEP_TIMEOUT = 10.0
#: Longest ``sleep:`` step accepted in the corpus.
MAX_SLEEP = 3.0
#: Mismatching steps shown in full in a failure message.
SHOWN_MISMATCHES = 5

STEP_KINDS = ("send", "send-partial", "send-close", "reconnect", "sleep")

_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|.?)", re.DOTALL)
_SIMPLE_ESCAPES = {"r": b"\r", "n": b"\n", "t": b"\t", "s": b" ", "\\": b"\\"}
_REPEAT = re.compile(r"\{rep:(\d+):([^{}]*)\}")
_CAS_REF = re.compile(rb"\{cas(?::([^}\s]+))?\}")
_STEP_LINE = re.compile(r"([a-z-]+):(?: ?)(.*)")
_BACKENDS_HEADER = re.compile(r"#\s*backends:\s*(.*)")
_SKIP_HEADER = re.compile(r"#\s*skip-on:\s*([\w-]+)\s*\((.+)\)\s*$")


class CorpusError(Exception):
    """A session file is malformed, or the reference memcached disagrees with its intent."""


@dataclass(frozen=True)
class Step:
    """One step of a session; ``payload`` may still contain ``{cas}`` references."""

    kind: str
    line: int
    payload: bytes = b""
    seconds: float = 0.0


@dataclass(frozen=True)
class Session:
    """A parsed session file."""

    path: Path
    steps: tuple[Step, ...]
    backends: frozenset[str] | None
    skip_on: Mapping[str, str]


def decode_payload(text: str) -> bytes:
    """Expand ``{rep:N:TEXT}`` and escapes; ``{cas...}`` references are kept as is."""

    def repeat(match: re.Match[str]) -> str:
        count, unit = int(match[1]), match[2]
        if "$i" not in unit:
            return unit * count
        return "".join(unit.replace("$i", str(i)) for i in range(count))

    expanded = _REPEAT.sub(repeat, text)
    out = bytearray()
    pos = 0
    for match in _ESCAPE.finditer(expanded):
        out += expanded[pos : match.start()].encode()
        escape = match[1]
        if escape.startswith("x") and len(escape) == 3:
            out.append(int(escape[1:], 16))
        elif escape in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[escape]
        else:
            raise ValueError(f"unknown escape \\{escape!s} in {text[:80]!r}")
        pos = match.end()
    out += expanded[pos:].encode()
    return bytes(out)


def parse_session(path: Path) -> Session:
    """Parse one corpus file (format in the module docstring)."""
    steps: list[Step] = []
    backends: frozenset[str] | None = None
    skip_on: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        where = f"{path.name}:{number}"
        if not line.strip():
            continue
        if line.startswith("#"):
            if header := _BACKENDS_HEADER.fullmatch(line):
                backends = frozenset(name.strip() for name in header[1].split(",") if name.strip())
            elif header := _SKIP_HEADER.fullmatch(line):
                skip_on[header[1]] = header[2]
            continue
        try:
            if line.startswith("+"):
                if not steps or steps[-1].kind not in ("send", "send-partial", "send-close"):
                    raise ValueError("'+' continues a send step, but none precedes it")
                last = steps[-1]
                extra = decode_payload(line[2:] if line.startswith("+ ") else line[1:])
                steps[-1] = Step(last.kind, last.line, last.payload + extra)
                continue
            match = _STEP_LINE.fullmatch(line)
            if match is None or match[1] not in STEP_KINDS:
                raise ValueError(f"expected one of {STEP_KINDS} followed by ':'")
            kind, text = match[1], match[2]
            if kind == "sleep":
                seconds = float(text)
                if not 0 < seconds <= MAX_SLEEP:
                    raise ValueError(f"sleep must be in (0, {MAX_SLEEP}] seconds")
                steps.append(Step(kind, number, seconds=seconds))
            elif kind == "reconnect":
                if text.strip():
                    raise ValueError("reconnect takes no argument")
                steps.append(Step(kind, number))
            else:
                steps.append(Step(kind, number, decode_payload(text)))
        except ValueError as exc:
            raise CorpusError(f"{where}: {exc}") from None
    if not steps:
        raise CorpusError(f"{path.name}: no steps")
    return Session(path, tuple(steps), backends, skip_on)


def _value_header(unit: bytes) -> list[bytes] | None:
    """The fields of ``unit``'s first line if it is ``VALUE key flags bytes [cas]``, else None."""
    if not unit.startswith(b"VALUE "):
        return None
    fields = unit[: unit.find(b"\n")].rstrip(b"\r").split(b" ")
    if len(fields) in (4, 5) and fields[3].isdigit():
        return fields
    return None


#: Return codes of meta replies whose flags are normalised (``VA`` carries a data block).
META_CODES = (b"VA ", b"HD", b"NS", b"EX", b"NF", b"EN")


def _meta_fields(unit: bytes) -> list[bytes] | None:
    """The fields of ``unit``'s first line if it is a meta reply (``VA 3 c5 k...``), else None."""
    if not unit.startswith(META_CODES):
        return None
    fields = unit[: unit.find(b"\n")].rstrip(b"\r").split(b" ")
    if len(fields[0]) != 2 or (fields[0] == b"VA" and (len(fields) < 2 or not fields[1].isdigit())):
        return None
    return fields


def _data_length(unit: bytes) -> int | None:
    """Bytes of the data block following ``unit``'s first line (VALUE or VA), or None."""
    fields = _value_header(unit)
    if fields is not None:
        return int(fields[3])
    fields = _meta_fields(unit)
    if fields is not None and fields[0] == b"VA":
        return int(fields[1])
    return None


def value_cas(units: list[bytes]) -> Iterator[tuple[bytes | None, bytes]]:
    """``(key, cas unique)`` of every VALUE unit that carries a CAS, and of every
    meta reply with a ``c`` flag (its key from its ``k`` flag, else None)."""
    for unit in units:
        fields = _value_header(unit)
        if fields is not None and len(fields) == 5:
            yield fields[1], fields[4]
            continue
        fields = _meta_fields(unit)
        if fields is None:
            continue
        cas = next((f[1:] for f in fields[1:] if f[:1] == b"c" and f[1:].isdigit()), None)
        if cas is not None:
            yield next((f[1:] for f in fields[1:] if f[:1] == b"k"), None), cas


def split_units(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Split a reply stream into units: a line, or a VALUE line with its data block.

    Returns the complete units and the incomplete rest.
    """
    units: list[bytes] = []
    pos = 0
    while (end := buffer.find(b"\n", pos)) != -1:
        line_end = end + 1
        length = _data_length(buffer[pos:line_end])
        if length is not None:
            line_end += length + 2
            if line_end > len(buffer):
                break
        units.append(buffer[pos:line_end])
        pos = line_end
    return units, buffer[pos:]


_ME_CAS = re.compile(rb"(?<= )cas=(\d+)")
_ME_CLOCK = re.compile(rb"(?<= )(exp=(?!-1 )-?\d+|la=\d+)")


@dataclass
class Normaliser:
    """Per-server reply normalisation; CAS numbering persists for a whole session."""

    cas_ids: dict[bytes, int] = field(default_factory=dict)

    def cas_id(self, cas: bytes) -> bytes:
        return b"<cas#%d>" % self.cas_ids.setdefault(cas, len(self.cas_ids) + 1)

    def _meta_flag(self, flag: bytes) -> bytes:
        letter, rest = flag[:1], flag[1:]
        if letter == b"c" and rest.isdigit():
            return b"c" + self.cas_id(rest)
        if letter == b"t" and rest.isdigit():
            return b"t<ttl>"
        if letter == b"l" and rest.isdigit():
            return b"l<la>"
        return flag

    def __call__(self, units: list[bytes]) -> bytes:
        out: list[bytes] = []
        for unit in units:
            fields = _value_header(unit)
            meta = None if fields is not None else _meta_fields(unit)
            if fields is not None and len(fields) == 5:
                header_len = unit.index(b"\n") + 1
                ending = b"\r\n" if unit[header_len - 2 : header_len] == b"\r\n" else b"\n"
                header = b" ".join([*fields[:4], self.cas_id(fields[4])]) + ending
                out.append(header + unit[header_len:])
            elif meta is not None:
                header_len = unit.index(b"\n") + 1
                ending = b"\r\n" if unit[header_len - 2 : header_len] == b"\r\n" else b"\n"
                skip = 2 if meta[0] == b"VA" else 1
                header = b" ".join([*meta[:skip], *(self._meta_flag(f) for f in meta[skip:])]) + ending
                out.append(header + unit[header_len:])
            elif unit.startswith(b"ME "):
                unit = _ME_CAS.sub(lambda m: b"cas=" + self.cas_id(m[1]), unit)
                out.append(_ME_CLOCK.sub(lambda m: (name := m[1].split(b"=")[0]) + b"=<" + name + b">", unit))
            elif unit.startswith(b"STAT "):
                if not out or out[-1] != b"STAT <...>\r\n":
                    out.append(b"STAT <...>\r\n")
            elif unit.startswith(b"VERSION "):
                out.append(b"VERSION <version>\r\n")
            else:
                out.append(unit)
        return b"".join(out)


@dataclass(frozen=True)
class Outcome:
    """A step's normalised reply (with ``<...>`` markers); ``complete`` if it ended as expected."""

    reply: bytes
    complete: bool


class Conversation:
    """One server's side of a session: its connection, CAS memory and normaliser."""

    def __init__(self, label: str, port: int, *, strict: bool) -> None:
        self.label = label
        #: The reference is strict: a ``{cas}`` it cannot resolve is a corpus error.
        self.strict = strict
        self.port = port
        self.normalise = Normaliser()
        self.cas_by_key: dict[bytes, bytes] = {}
        self.last_cas: bytes | None = None
        self.conn: RawSession | None = RawSession(port)

    def close(self) -> None:
        """Close the connection, if open."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def reset(self) -> None:
        """Empty the cache at session start; raise if the server does not say OK."""
        assert self.conn is not None
        self.conn.send(RESET + SENTINEL)
        reply, _ = self.conn.recv_until_terminator(SENTINEL_REPLY, STEP_TIMEOUT)
        if reply != RESET_REPLY + SENTINEL_REPLY:
            raise AssertionError(f"{self.label}: session reset {RESET!r} got {reply!r}")

    def _substitute(self, payload: bytes) -> bytes:
        def cas(match: re.Match[bytes]) -> bytes:
            found = self.last_cas if match[1] is None else self.cas_by_key.get(match[1])
            if found is not None:
                return found
            if self.strict:
                raise CorpusError(f"{match[0]!r} used before any gets reply provided it")
            return b"<no-cas-seen>"

        return _CAS_REF.sub(cas, payload)

    def _remember_cas(self, units: list[bytes]) -> None:
        for key, cas in value_cas(units):
            self.last_cas = cas
            if key is not None:
                self.cas_by_key[key] = cas

    def _render(self, units: list[bytes], rest: bytes = b"") -> bytes:
        self._remember_cas(units)
        return self.normalise(units) + rest

    def run(self, step: Step) -> Outcome:
        """Perform a non-sleep step on this server."""
        if step.kind == "reconnect":
            self.close()
            self.conn = RawSession(self.port)
            return Outcome(b"<reconnected>", True)
        if self.conn is None:
            return Outcome(b"<connection already closed>", False)
        payload = self._substitute(step.payload)
        if step.kind == "send-partial":
            sent = self.conn.send(payload)
            return Outcome(b"" if sent else b"<closed>", sent)
        if step.kind == "send-close":
            self.conn.send(payload)
            buffer, closed = self.conn.recv_until_closed(STEP_TIMEOUT)
            self.close()
            units, rest = split_units(buffer)
            marker = b"<closed>" if closed else b"<still open>"
            return Outcome(self._render(units, rest) + marker, closed)
        self.conn.send(payload + SENTINEL)
        expected = own_noops(payload) + 1
        buffer, complete = self.conn.recv_until(
            lambda buf: buf.endswith(SENTINEL_REPLY) and split_units(buf)[0].count(SENTINEL_REPLY) >= expected,
            STEP_TIMEOUT,
        )
        units, rest = split_units(buffer)
        if complete and units and units[-1] == SENTINEL_REPLY and not rest:
            return Outcome(self._render(units[:-1]), True)
        if complete:
            return Outcome(self._render(units, rest) + b"<framing error>", False)
        closed = self.conn.closed_by_peer
        self.close()
        marker = b"<closed>" if closed else b"<no reply to the sentinel>"
        return Outcome(self._render(units, rest) + marker, False)


def own_noops(payload: bytes) -> int:
    """The ``mn`` commands a step sends itself (lines ``mn`` exactly)."""
    return len(re.findall(rb"(?<![^\n])mn\r?\n", payload))


@dataclass(frozen=True)
class Mismatch:
    """A step where the two servers' normalised replies differ."""

    step: Step
    reference: bytes
    target: bytes


def run_session(
    session: Session, reference_port: int, target: Target, conversation: Callable[..., Conversation] | None = None
) -> list[Mismatch]:
    """Run ``session`` in lockstep on both servers; return the differing steps.
    ``conversation`` makes each server's side (the binary harness passes its own)."""
    make = conversation or Conversation
    ref = make("memcached", reference_port, strict=True)
    tgt = make(target.name, target.port, strict=False)
    try:
        ref.reset()
        tgt.reset()
        mismatches: list[Mismatch] = []
        for step in session.steps:
            if step.kind == "sleep":
                time.sleep(step.seconds)  # the session is about expiry
                continue
            try:
                expected = ref.run(step)
            except CorpusError as exc:
                raise CorpusError(f"{session.path.name}:{step.line}: {exc}") from None
            if not expected.complete:
                raise CorpusError(
                    f"{session.path.name}:{step.line}: reference memcached did not complete "
                    f"the {step.kind} step (reply {_show(expected.reply)})"
                )
            actual = tgt.run(step)
            if actual.reply != expected.reply:
                mismatches.append(Mismatch(step, expected.reply, actual.reply))
        return mismatches
    finally:
        ref.close()
        tgt.close()


def _show(data: bytes, limit: int = 200) -> str:
    """``repr`` of ``data``, shortened in the middle when long."""
    if len(data) <= limit:
        return repr(data)
    half = limit // 2
    return f"{data[:half]!r} ...<{len(data) - limit} bytes>... {data[-half:]!r}"


def describe(session: Session, target_name: str, mismatches: list[Mismatch]) -> str:
    """A readable report of the differing steps."""
    lines = [f"{session.path.name}: {len(mismatches)} step(s) differ from memcached"]
    for mismatch in mismatches[:SHOWN_MISMATCHES]:
        prefix = os.path.commonprefix([mismatch.reference, mismatch.target])
        lines += [
            f"--- line {mismatch.step.line} ({mismatch.step.kind}), "
            f"replies agree on the first {len(prefix)} bytes",
            f"  sent:      {_show(mismatch.step.payload)}",
            f"  memcached: {_show(mismatch.reference)}",
            f"  {target_name + ':':<10} {_show(mismatch.target)}",
        ]
    if len(mismatches) > SHOWN_MISMATCHES:
        rest = ", ".join(str(m.step.line) for m in mismatches[SHOWN_MISMATCHES:])
        lines.append(f"... and the steps at lines {rest}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    """The server under test: ``name`` is an mproxy backend or ``memcached``."""

    name: str
    port: int


def _target_names() -> list[str]:
    names = os.environ.get(TARGET_ENV, DEFAULT_TARGETS).split(",")
    return [name.strip() for name in names if name.strip()]


@pytest.fixture(scope="module", params=_target_names())
def diff_target(
    request: pytest.FixtureRequest,
    mproxy_factory: MproxyFactory,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Target]:
    """The server the corpus is compared against (see ``MPROXY_DIFF_TARGET``)."""
    name: str = request.param
    if name != SELF_TEST_TARGET:
        yield Target(name, mproxy_factory(name).port)
        return
    server: Server = start_memcached(tmp_path_factory.mktemp("memcached-target"), MEMCACHED_ARGS)
    try:
        yield Target(name, server.port)
    finally:
        server.stop()


def skip_unless_for(target: str, backends: frozenset[str] | None, skip_on: Mapping[str, str]) -> None:
    """Skip a session whose headers exclude this mproxy backend (the self-test target runs all)."""
    if target == SELF_TEST_TARGET:
        return
    if backends is not None and target not in backends:
        pytest.skip(f"session is only for backends {sorted(backends)}")
    if target in skip_on:
        pytest.skip(skip_on[target])


SESSION_FILES = sorted(CORPUS_DIR.glob("*.txt"))


@pytest.mark.memcached
@pytest.mark.parametrize("session_file", SESSION_FILES, ids=lambda path: path.stem)
def test_session(session_file: Path, memcached_server: Server, diff_target: Target) -> None:
    """Every step of the session gets the same reply from the target as from memcached."""
    session = parse_session(session_file)
    skip_unless_for(diff_target.name, session.backends, session.skip_on)
    mismatches = run_session(session, memcached_server.port, diff_target)
    if mismatches:
        pytest.fail(describe(session, diff_target.name, mismatches), pytrace=False)


# Tests of the harness itself (no servers).


def test_decode_payload_escapes_and_repeats() -> None:
    assert decode_payload(r"set k\x01\s0 0 1\r\nx\\\r\n") == b"set k\x01 0 0 1\r\nx\\\r\n"
    assert decode_payload("get{rep:3: k$i}") == b"get k0 k1 k2"
    assert decode_payload("{rep:4:ab}é") == b"abababab\xc3\xa9"
    assert decode_payload("cas a 0 0 1 {cas:a}") == b"cas a 0 0 1 {cas:a}"
    with pytest.raises(ValueError):
        decode_payload(r"bad \q escape")


def test_split_units_keeps_value_blocks_whole() -> None:
    stream = b"VALUE k 0 5 7\r\nMN\r\nx\r\nEND\r\nMN\r\nVALUE k 0 9\r\npart"
    units, rest = split_units(stream)
    assert units == [b"VALUE k 0 5 7\r\nMN\r\nx\r\n", b"END\r\n", b"MN\r\n"]
    assert rest == b"VALUE k 0 9\r\npart"
    assert list(value_cas(units)) == [(b"k", b"7")]


def test_meta_replies_are_units_and_normalised() -> None:
    stream = b"VA 4 c17 t30 kfoo O1\r\nMN\r\n\r\nHD c0 l5 t-1\r\nME k exp=-7 la=3 cas=17 fetch=no cls=1\r\nMN\r\n"
    units, rest = split_units(stream)
    assert rest == b"" and units[0] == b"VA 4 c17 t30 kfoo O1\r\nMN\r\n\r\n"
    assert list(value_cas(units)) == [(b"foo", b"17"), (None, b"0")]
    assert Normaliser()(units) == (
        b"VA 4 c<cas#1> t<ttl> kfoo O1\r\nMN\r\n\r\nHD c<cas#2> l<la> t-1\r\n"
        b"ME k exp=<exp> la=<la> cas=<cas#1> fetch=no cls=1\r\nMN\r\n"
    )
    assert Normaliser()([b"ME k exp=-1 la=0 cas=1\r\n"]) == b"ME k exp=-1 la=<la> cas=<cas#1>\r\n"
    assert own_noops(b"mg a q\r\nmn\r\nmn\r\nmg b\r\nmn foo\r\n") == 2
    assert own_noops(b"mn\r\n") == 1


def test_normaliser_requires_the_same_cas_pattern() -> None:
    same_twice = [b"VALUE a 0 1 5\r\nx\r\n", b"VALUE b 0 1 5\r\nx\r\n"]
    distinct = [b"VALUE a 0 1 8\r\nx\r\n", b"VALUE b 0 1 9\r\nx\r\n"]
    assert Normaliser()(same_twice) != Normaliser()(distinct)
    assert Normaliser()(same_twice).count(b"<cas#1>") == 2
    renumbered = [b"VALUE a 0 1 1\r\nx\r\n", b"VALUE b 0 1 2\r\nx\r\n"]
    assert Normaliser()(distinct) == Normaliser()(renumbered)
    stats = [b"STAT pid 1\r\n", b"STAT uptime 2\r\n", b"END\r\n", b"VERSION 1.6.18\r\n"]
    assert Normaliser()(stats) == b"STAT <...>\r\nEND\r\nVERSION <version>\r\n"
