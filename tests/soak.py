"""Nothing lost: mixed commands from many connections, faults, a graceful restart, then a check.

The harness of ``scripts/soak`` and ``tests/test_soak_e2e.py``. The stack: the bundled
local Momento server (its own process, so data outlives the proxy) and ``python -m mproxy``
on it (``request_timeout`` :data:`REQUEST_TIMEOUT`). For ``seconds``:

* ``clients`` threads, one connection each, send ``set get delete incr decr append
  prepend add replace cas touch`` one at a time on keys each client owns alone (string
  keys and counter keys), so each key's history is one client's sequence;
* a fault thread cycles through the local server's fault rules (delays past the timeout,
  error bursts, quiet spells);
* in the middle, the proxy gets SIGTERM, exits, and is started again (new port); clients
  reconnect.

Per key the client keeps a model (:class:`KeyModel`): the value after the last
acknowledged write, and the writes after it that were not acknowledged (``SERVER_ERROR``,
or the connection closed before a reply): such a write may still apply, even later (the
local server applies a delayed write after its delay, as a real one may). After a write
that was not acknowledged, the client's next writes to that key are ``set`` until one is
acknowledged, so the possible values stay few and exact: the last acknowledged value,
that value with the unacknowledged write applied, and the values of the unacknowledged
``set``\\ s. At the end (faults cleared, delayed calls landed) every key is read:

* **lost**: a key reads a value outside its possible set: an acknowledged write lost,
  or an unacknowledged write older than the last acknowledged one landing after it
  (reported apart as **reordered**: issue 11 item 8's ordering);
* **unanswered**: a command sent at least :data:`ACCEPT_MARGIN` before SIGTERM that got
  no reply (the graceful stop must answer what it accepted);
* **bad replies**: a reply that is none of the command's memcached answers, or a read
  during the run that disagrees with a key whose value is certain.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers import LocalMomento, RawSession, Server, start_local_momento, start_mproxy
from tests.test_momento_e2e import CACHE, mproxy_config

REQUEST_TIMEOUT = 0.5
#: A command sent this long before SIGTERM has certainly been read by the proxy.
ACCEPT_MARGIN = 0.2
#: Keys per client: string keys and counter keys.
STRING_KEYS = 6
COUNTER_KEYS = 3
#: Faults the fault thread cycles through: (spec or None for a quiet spell, seconds).
FAULT_CYCLE: tuple[tuple[str | None, float], ...] = (
    (None, 1.5),
    ("*:delay=1.0", 1.0),  # past the timeout: SERVER_ERROR, and the writes land later
    (None, 1.0),
    ("*:error=UNAVAILABLE:count=30", 1.0),
    (None, 1.0),
    ("Set:error=INTERNAL:count=10", 1.0),
    ("SetIfHash:delay=0.3", 1.0),  # slow but within the timeout
)
#: The longest delay in :data:`FAULT_CYCLE`: how long delayed writes may take to land.
MAX_FAULT_DELAY = 1.0
#: How long after an unacknowledged write it may still land (its delay, then a
#: read-modify-write's retries, each up to a timeout): a value explained only by such a
#: write landing late is **reordered**, not lost.
LANDING_WINDOW = MAX_FAULT_DELAY + 8 * REQUEST_TIMEOUT + 1.0

Value = bytes | None  # None: the key is absent


def config(momento_port: int) -> str:
    return mproxy_config(momento_port, REQUEST_TIMEOUT)


@dataclass
class KeyModel:
    """What a key may hold (module docstring)."""

    counter: bool
    known: Value = None
    #: values the unacknowledged writes since the last acknowledged one may have left
    maybe: list[Value] = field(default_factory=list)
    #: values of unacknowledged writes *before* the last acknowledged one
    older: list[Value] = field(default_factory=list)
    acked_writes: int = 0
    #: a write sent and not answered yet: ``(value if it applies,)``, else None
    in_flight: tuple[Value] | None = None
    #: when the last unacknowledged write was sent (``-inf``: never)
    last_unacked_at: float = float("-inf")
    #: True after an older write landed late: any value until the next acknowledged write
    unknown: bool = False

    @property
    def certain(self) -> bool:
        return not self.maybe and not self.unknown

    def possible(self) -> list[Value]:
        return [self.known, *self.maybe]

    def may_land(self) -> bool:
        """Whether an unacknowledged write may still land (:data:`LANDING_WINDOW`)."""
        return time.monotonic() - self.last_unacked_at < LANDING_WINDOW

    def acked(self, value: Value) -> None:
        self.older.extend(v for v in self.maybe if v not in self.older)
        self.known, self.maybe, self.unknown = value, [], False
        self.acked_writes += 1

    def unacked(self, value: Value) -> None:
        self.last_unacked_at = time.monotonic()
        if value not in self.maybe and value != self.known:
            self.maybe.append(value)


@dataclass
class Figures:
    commands: int = 0
    acked_writes: int = 0
    unacked_writes: int = 0
    server_errors: int = 0
    reconnects: int = 0
    keys: int = 0
    keys_verified: int = 0
    keys_unknown: int = 0
    lost: list[str] = field(default_factory=list)
    reordered: list[str] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)
    unanswered_late: int = 0  # sent within ACCEPT_MARGIN of SIGTERM: may not have been read
    in_flight_at_sigterm: int = 0
    answered_after_sigterm: int = 0
    bad_replies: list[str] = field(default_factory=list)
    faults_injected: list[str] = field(default_factory=list)
    restart_seconds: float = 0.0

    def ok(self) -> bool:
        return not (self.lost or self.reordered or self.unanswered or self.bad_replies)


class _Closed(Exception):
    """The connection closed before the reply."""


class Soak:
    def __init__(self, tmp_path: Path, clients: int, seconds: float, seed: int) -> None:
        self.tmp_path = tmp_path
        self.clients = clients
        self.seconds = seconds
        self.seed = seed
        self.figures = Figures()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.port = 0
        self.port_changed = threading.Condition(self.lock)
        self.sigterm_at: float | None = None
        #: when the restarted proxy's port was published (commands sent before it may hit the old one)
        self.restarted_at = float("inf")
        self.momento: LocalMomento | None = None
        self.proxy: Server | None = None
        self.models: dict[bytes, KeyModel] = {}
        #: per client: (command, sent at) of the command awaiting its reply, or None
        self.outstanding: list[tuple[bytes, float] | None] = [None] * clients

    # ---- the run ---------------------------------------------------------------------

    def run(self, log: Callable[[str], None] = lambda _: None) -> Figures:
        self.momento = start_local_momento(self.tmp_path, CACHE, workers=32)
        try:
            self.proxy = start_mproxy(config(self.momento.port), self.tmp_path)
            self.port = self.proxy.port
            threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
            threads.append(threading.Thread(target=self._faults, daemon=True))
            for t in threads:
                t.start()
            log(f"soak: {self.clients} clients, {self.seconds:g} s, faults cycling, restart at {self.seconds / 2:g} s")
            time.sleep(self.seconds / 2)  # the first half (the run's length)
            self._restart(log)
            time.sleep(self.seconds / 2)
            self.stop.set()
            for t in threads:
                t.join(timeout=REQUEST_TIMEOUT * 4 + 30)
                if t.is_alive():
                    self.figures.bad_replies.append(f"thread {t.name} still running after the stop")
            assert self.momento.control("clear") == "OK"
            time.sleep(MAX_FAULT_DELAY + 1.0)  # delayed writes land within their delay (a bound, not a sync)
            self._verify()
            return self.figures
        finally:
            if self.proxy is not None:
                self.proxy.stop()
            self.momento.kill()

    def _restart(self, log: Callable[[str], None]) -> None:
        assert self.proxy is not None and self.momento is not None
        with self.lock:
            self.sigterm_at = time.monotonic()
            outstanding = [o for o in self.outstanding if o is not None]
        self.figures.in_flight_at_sigterm = len(outstanding)
        self.proxy.process.send_signal(signal.SIGTERM)
        code = self.proxy.process.wait(timeout=60)
        self.proxy.stop()
        down = time.monotonic()
        log(f"soak: SIGTERM with {len(outstanding)} commands awaiting replies; exit status {code} "
            f"after {down - self.sigterm_at:.2f} s")
        if code != 0:
            self.figures.bad_replies.append(f"mproxy exited {code} on SIGTERM; log:\n{self.proxy.output()[-2000:]}")
        self.proxy = start_mproxy(config(self.momento.port), self.tmp_path)
        self.figures.restart_seconds = time.monotonic() - self.sigterm_at
        with self.port_changed:
            self.port = self.proxy.port
            self.restarted_at = time.monotonic()
            self.port_changed.notify_all()
        log(f"soak: serving again {self.figures.restart_seconds:.2f} s after SIGTERM (port {self.port})")

    def _faults(self) -> None:
        assert self.momento is not None
        n = 0
        while not self.stop.is_set():
            spec, seconds = FAULT_CYCLE[n % len(FAULT_CYCLE)]
            n += 1
            if spec is not None:
                self.momento.control(f"fault {spec}")
                self.figures.faults_injected.append(spec)
            self.stop.wait(seconds)
            self.momento.control("clear")

    # ---- one client ------------------------------------------------------------------

    def _connect(self, i: int) -> RawSession:
        while True:
            port = self.port
            try:
                return RawSession(port)
            except OSError:
                with self.port_changed:
                    if self.port == port:
                        self.port_changed.wait(0.05)

    def _client(self, i: int) -> None:
        rng = random.Random(f"{self.seed}/{i}")
        keys = [b"s%d-%d" % (i, k) for k in range(STRING_KEYS)] + [b"n%d-%d" % (i, k) for k in range(COUNTER_KEYS)]
        models = {key: KeyModel(counter=key.startswith(b"n")) for key in keys}
        with self.lock:
            self.models.update(models)
        session = self._connect(i)
        seq = 0
        try:
            while not self.stop.is_set():
                seq += 1
                key = rng.choice(keys)
                try:
                    self._one(i, session, rng, key, models[key], seq)
                except _Closed:
                    m = models[key]
                    if m.in_flight is not None:  # a write without a reply may have applied
                        m.unacked(m.in_flight[0])
                        m.in_flight = None
                        with self.lock:
                            self.figures.unacked_writes += 1
                    session.close()
                    self.figures.reconnects += 1
                    if self.stop.is_set():
                        break
                    session = self._connect(i)
        finally:
            session.close()

    def _exchange(self, i: int, session: RawSession, command: bytes, done: Callable[[bytes], bool]) -> bytes:
        sent = time.monotonic()
        with self.lock:
            self.outstanding[i] = (command, sent)
        ok = session.send(command)
        reply, complete = session.recv_until(done, timeout=REQUEST_TIMEOUT * 4 + 10) if ok else (b"", False)
        with self.lock:
            self.outstanding[i] = None
            self.figures.commands += 1
            term = self.sigterm_at
            if term is not None and sent <= term and complete:
                self.figures.answered_after_sigterm += time.monotonic() >= term
            if not complete:
                if term is not None and sent < term - ACCEPT_MARGIN:
                    how = "closed" if session.closed_by_peer else "no reply and no close"
                    self.figures.unanswered.append(
                        f"client {i}: {command[:60]!r} sent {term - sent:.2f} s before SIGTERM: {how}"
                    )
                elif term is not None and sent < self.restarted_at:
                    self.figures.unanswered_late += 1  # around SIGTERM: may not have been read
                else:
                    self.figures.bad_replies.append(
                        f"client {i}: {command[:60]!r}: {'closed' if session.closed_by_peer else 'no reply'} "
                        f"outside the restart, got {reply[:80]!r}"
                    )
                raise _Closed
        return reply

    def _line(self, i: int, session: RawSession, command: bytes) -> bytes:
        return self._exchange(i, session, command, lambda b: b.endswith(b"\r\n"))

    def _get(self, i: int, session: RawSession, key: bytes, cas: bool = False) -> tuple[Value, int | None, bytes]:
        reply = self._exchange(
            i, session, b"%s %s\r\n" % (b"gets" if cas else b"get", key),
            lambda b: b.endswith(b"END\r\n") or (b.startswith((b"SERVER_ERROR", b"CLIENT_ERROR")) and b.endswith(b"\r\n")),
        )
        if reply == b"END\r\n":
            return None, None, reply
        if reply.startswith(b"VALUE "):
            header, _, rest = reply.partition(b"\r\n")
            fields = header.split(b" ")
            length = int(fields[3])
            return rest[:length], (int(fields[4]) if cas else None), reply
        return None, None, reply  # an error line: the caller looks at ``reply``

    def _one(self, i: int, session: RawSession, rng: random.Random, key: bytes, m: KeyModel, seq: int) -> None:
        tag = b"c%d.%d" % (i, seq)
        if not m.certain:
            op = "set"  # until a write is acknowledged (module docstring)
        elif m.counter:
            op = rng.choice(("set", "incr", "incr", "decr", "get", "get", "delete"))
        else:
            op = rng.choice(("set", "set", "append", "prepend", "add", "replace", "cas", "touch", "get", "get",
                             "delete"))
        if op == "get":
            value, _, reply = self._get(i, session, key)
            if reply.startswith(b"SERVER_ERROR"):
                self._count_error()
            elif m.certain and value != m.known:
                self._diverged(i, m, key, f"get read {value!r}, the model holds {m.known!r}")
            return
        if op == "set":
            new: bytes = (b"%d" % rng.randrange(10**6)) if m.counter else tag
            self._write(i, session, m, b"set %s 0 0 %d\r\n%s\r\n" % (key, len(new), new), {b"STORED\r\n": new}, new)
            return
        if op in ("incr", "decr"):
            delta = rng.randrange(1, 1000)
            current = int(m.known) if m.known is not None else None
            result: Value = None
            answers: dict[bytes, Value] = {b"NOT_FOUND\r\n": None} if m.known is None else {}
            if current is not None and m.known is not None:
                number = b"%d" % ((current + delta) % 2**64 if op == "incr" else max(current - delta, 0))
                # memcached writes a shorter number in place, padded with spaces ("100" decr 1: "99 ")
                result = number.ljust(len(m.known)) if len(number) < len(m.known) else number
                answers[number + b"\r\n"] = result
            command = b"%s %s %d\r\n" % (op.encode(), key, delta)
            self._write(i, session, m, command, answers, result if result is not None else m.known)
            return
        if op == "delete":
            answer = b"DELETED\r\n" if m.known is not None else b"NOT_FOUND\r\n"
            self._write(i, session, m, b"delete %s\r\n" % key, {answer: None}, None)
            return
        if op == "touch":
            answer = b"TOUCHED\r\n" if m.known is not None else b"NOT_FOUND\r\n"
            self._write(i, session, m, b"touch %s 0\r\n" % key, {answer: m.known}, m.known)
            return
        if op in ("append", "prepend"):
            result = None if m.known is None else (m.known + tag if op == "append" else tag + m.known)
            answer = b"NOT_STORED\r\n" if m.known is None else b"STORED\r\n"
            command = b"%s %s 0 0 %d\r\n%s\r\n" % (op.encode(), key, len(tag), tag)
            self._write(i, session, m, command, {answer: result}, result)
            return
        if op in ("add", "replace"):
            applies = (m.known is None) == (op == "add")
            answer = b"STORED\r\n" if applies else b"NOT_STORED\r\n"
            command = b"%s %s 0 0 %d\r\n%s\r\n" % (op.encode(), key, len(tag), tag)
            self._write(i, session, m, command, {answer: tag if applies else m.known}, tag if applies else m.known)
            return
        # cas: read the unique, then write with it
        value, unique, reply = self._get(i, session, key, cas=True)
        if reply.startswith(b"SERVER_ERROR"):
            self._count_error()
            return
        if value != m.known:
            self._diverged(i, m, key, f"gets read {value!r}, the model holds {m.known!r}")
            return
        stale = rng.random() < 0.2  # sometimes a wrong unique: EXISTS
        unique = (unique or 0) + (1 if stale else 0)
        command = b"cas %s 0 0 %d %d\r\n%s\r\n" % (key, len(tag), unique, tag)
        if m.known is None:
            answers = {b"NOT_FOUND\r\n": None}
        elif stale:
            answers = {b"EXISTS\r\n": m.known}
        else:
            answers = {b"STORED\r\n": tag}
        self._write(i, session, m, command, answers, tag if m.known is not None and not stale else m.known)

    def _write(
        self, i: int, session: RawSession, m: KeyModel, command: bytes, answers: dict[bytes, Value], if_applied: Value
    ) -> None:
        """Send a write; the model follows its reply (:meth:`_settle`). If the connection
        closes first, the client loop marks it unacknowledged (``in_flight``)."""
        m.in_flight = (if_applied,)
        reply = self._line(i, session, command)
        m.in_flight = None
        self._settle(m, reply, answers, if_applied, command.split(b"\r\n", 1)[0].decode(errors="replace"))

    def _settle(self, m: KeyModel, reply: bytes, answers: dict[bytes, Value], if_applied: Value, what: str) -> None:
        """Update the model from a write's reply: an expected answer acknowledges the value it
        names; SERVER_ERROR leaves the write uncertain; anything else is a bad reply."""
        if reply in answers:
            m.acked(answers[reply])
            with self.lock:
                self.figures.acked_writes += 1
            return
        if reply.startswith(b"SERVER_ERROR"):
            self._count_error()
            m.unacked(if_applied)
            with self.lock:
                self.figures.unacked_writes += 1
            return
        self._diverged(-1, m, None, f"{what}: reply {reply!r}, expected one of {sorted(answers)} or SERVER_ERROR")

    def _diverged(self, i: int, m: KeyModel, key: bytes | None, text: str) -> None:
        """The key is not what its model says: an older unacknowledged write landing late
        (reordered) if one may still land, else a bad reply. Either way the model knows
        nothing more until the next acknowledged write."""
        text = f"client {i}: {key!r}: {text}" if key is not None else text
        with self.lock:
            (self.figures.reordered if m.may_land() else self.figures.bad_replies).append(text)
        m.unknown = True

    def _count_error(self) -> None:
        with self.lock:
            self.figures.server_errors += 1

    def _bad(self, text: str) -> None:
        with self.lock:
            self.figures.bad_replies.append(text)

    # ---- the check -------------------------------------------------------------------

    def _verify(self) -> None:
        assert self.proxy is not None
        self.figures.keys = len(self.models)
        with RawSession(self.proxy.port) as session:
            for key, m in sorted(self.models.items()):
                assert session.send(b"get %s\r\n" % key)
                reply, complete = session.recv_until(
                    lambda b: b.endswith(b"END\r\n") or b.startswith(b"SERVER_ERROR"), timeout=30
                )
                assert complete and not reply.startswith(b"SERVER_ERROR"), (key, reply)
                value: Value = None
                if reply.startswith(b"VALUE "):
                    header, _, rest = reply.partition(b"\r\n")
                    value = rest[: int(header.split(b" ")[3])]
                if m.unknown:
                    self.figures.keys_unknown += 1  # diverged (reported) and never written again
                elif value in m.possible():
                    self.figures.keys_verified += 1
                elif m.older:
                    self.figures.reordered.append(
                        f"{key!r} reads {value!r}: not its last acknowledged value {m.known!r}, but an "
                        f"unacknowledged write older than that may have landed after it"
                    )
                else:
                    self.figures.lost.append(f"{key!r} reads {value!r}; possible: {m.possible()!r}")


def summary(figures: Figures) -> str:
    f = figures
    lines = [
        f"commands {f.commands}, writes acknowledged {f.acked_writes}, unacknowledged {f.unacked_writes} "
        f"(SERVER_ERROR replies {f.server_errors}), reconnects {f.reconnects}",
        f"faults injected {len(f.faults_injected)}: {', '.join(sorted(set(f.faults_injected)))}",
        f"graceful restart: {f.in_flight_at_sigterm} commands awaiting replies at SIGTERM, "
        f"{f.answered_after_sigterm} answered after it; serving again {f.restart_seconds:.2f} s after SIGTERM",
        f"keys {f.keys}: verified {f.keys_verified}, lost {len(f.lost)}, reordered {len(f.reordered)} "
        f"(keys left unknown after one {f.keys_unknown}); "
        f"unanswered commands accepted before SIGTERM {len(f.unanswered)} "
        f"(sent within {ACCEPT_MARGIN} s of it and unanswered, not counted: {f.unanswered_late}); "
        f"bad replies {len(f.bad_replies)}",
    ]
    for name in ("lost", "reordered", "unanswered", "bad_replies"):
        for item in getattr(f, name)[:10]:
            lines.append(f"  {name}: {item}")
    return "\n".join(lines)


def as_json(figures: Figures) -> str:
    data = {k: (len(v) if isinstance(v, list) else v) for k, v in vars(figures).items()}
    return json.dumps(data, sort_keys=True)

