"""Faults on the Momento path, measured: the harness of ``scripts/faults`` and ``tests/test_faults_e2e.py``.

The stack is the one of ``tests/test_momento_e2e.py``: ``python -m mproxy`` (one process,
``[proxy] workers = 1``) in front of the bundled local Momento server, which a scenario
drives through its control port (``fault SPEC``, ``clear``) or kills and restarts on the
same port. mproxy runs under a *sampler* (:data:`_SAMPLER`): the real ``mproxy.cli.main``,
plus one greenlet, spawned right after gevent's monkey-patching, that appends every
:data:`SAMPLE_INTERVAL` seconds ``monotonic-time rss-KiB greenlets`` to a file (greenlets
counted with ``gc.get_objects()``: those started and not dead; no production code is
involved).

Scenarios (each returns a dict of figures; the bounds are the caller's):

* :func:`error_burst`: ``*:error=UNAVAILABLE:count=N``; every command answers
  ``SERVER_ERROR`` at once, and the first command after the burst succeeds;
* :func:`delay_past_timeout`: every call delayed past ``request_timeout``: ``SERVER_ERROR``
  within the timeout plus slack;
* :func:`kill_and_restart`: the server SIGKILLed: ``SERVER_ERROR`` within the timeout; then
  restarted on the same port: seconds until a ``set`` is ``STORED`` again (probed every
  :data:`PROBE_INTERVAL`), from the restart and from the server's first listening line;
* :func:`delay_storm`: ``clients`` connections sending commands without pause while every
  call is delayed far past the timeout, for ``seconds``: RSS and greenlets sampled during
  the storm and after ``clear``: in-flight work must stay bounded (answered work must not
  pile up behind the delayed calls).
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.servers import LocalMomento, RawSession, Server, _spawn, start_local_momento
from tests.test_momento_e2e import CACHE
from tests.test_momento_e2e import mproxy_config as e2e_config

#: Seconds between two samples of the proxy's RSS and greenlets.
SAMPLE_INTERVAL = 0.25
#: Seconds between two probes while waiting for recovery (a poll, not a synchronisation).
PROBE_INTERVAL = 0.02
#: Commands of the scenarios: one per path of the backend (SDK Get and Set, GetBatch,
#: KeysExist + Delete, GetWithHash + SetIfHash for incr).
COMMANDS = (b"get fk\r\n", b"set fk 0 0 1\r\nx\r\n", b"get fk fk2\r\n", b"delete fk\r\n", b"incr fk 1\r\n")

_SAMPLER = """\
import gc, sys, time
from greenlet import greenlet
import mproxy.cli as cli

path, interval = sys.argv[1], float(sys.argv[2])
sys.argv = ["mproxy", *sys.argv[3:]]
patch = cli._patch

def sample():
    import gevent
    with open(path, "a", buffering=1) as out:
        while True:
            count = sum(1 for o in gc.get_objects() if isinstance(o, greenlet) and o)  # alive: started, not dead
            with open("/proc/self/status") as status:
                rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
            out.write(f"{time.monotonic():.3f} {rss} {count}\\n")
            gevent.sleep(interval)

def patched(*args, **kwargs):
    patch(*args, **kwargs)
    import gevent
    gevent.spawn(sample)

cli._patch = patched
cli.main()
"""


def mproxy_config(momento_port: int, request_timeout: float) -> str:
    """``tests/test_momento_e2e.py``'s config, in one process (the sampler sees every greenlet)."""
    return "[proxy]\nworkers = 1\n\n" + e2e_config(momento_port, request_timeout)


@dataclass
class Sample:
    at: float
    rss_kib: int
    greenlets: int


@dataclass
class Stack:
    """The local server, mproxy under the sampler, and where they write."""

    momento: LocalMomento
    mproxy: Server
    samples_path: Path
    tmp_path: Path
    request_timeout: float

    def samples(self, since: float = 0.0) -> list[Sample]:
        out = []
        for line in self.samples_path.read_text().splitlines():
            at, rss, greenlets = line.split()
            if float(at) >= since:
                out.append(Sample(float(at), int(rss), int(greenlets)))
        return out

    def latest(self) -> Sample:
        """The next sample taken from now on (waits for it)."""
        now = time.monotonic()
        deadline = now + 30 * SAMPLE_INTERVAL + 10
        while time.monotonic() < deadline:
            fresh = self.samples(since=now)
            if fresh:
                return fresh[0]
            time.sleep(SAMPLE_INTERVAL / 2)
        raise AssertionError(f"no sample from the proxy in {deadline - now:.0f} s; log:\n{self.mproxy.output()}")


@contextmanager
def stack(tmp_path: Path, request_timeout: float = 0.5) -> Iterator[Stack]:
    """Start the local server and mproxy (sampled); stop both at the end."""
    momento = start_local_momento(tmp_path, CACHE, workers=16)
    proxy: Server | None = None
    current: Stack | None = None
    try:
        config = tmp_path / f"chaos-{momento.port}.toml"
        config.write_text(mproxy_config(momento.port, request_timeout))
        ready = tmp_path / f"chaos-{momento.port}.ready.json"
        samples = tmp_path / f"chaos-{momento.port}.samples"
        argv = [sys.executable, "-c", _SAMPLER, str(samples), str(SAMPLE_INTERVAL),
                "-c", str(config), "--ready-file", str(ready)]

        def is_ready(server: Server) -> bool:
            if not ready.exists():
                return False
            report = json.loads(ready.read_text())
            server.port = report["caches"][0]["port"]
            server.admin_port = report["admin"]["port"]
            return True

        proxy = _spawn("mproxy", argv, tmp_path / f"chaos-{momento.port}.log", is_ready)
        current = Stack(momento, proxy, samples, tmp_path, request_timeout)
        yield current
    finally:
        if proxy is not None:
            proxy.stop()
        momento.kill()
        if current is not None:  # a scenario may have restarted the server
            current.momento.kill()


def request(session: RawSession, command: bytes, timeout: float = 30.0) -> tuple[bytes, float]:
    """Send one command, read its whole reply (``END`` for gets, else one line)."""
    retrieval = command.startswith(b"get")
    start = time.monotonic()
    assert session.send(command), f"connection closed before {command!r}"

    def done(buf: bytes) -> bool:
        if retrieval and not buf.startswith((b"SERVER_ERROR", b"CLIENT_ERROR", b"ERROR")):
            return buf.endswith(b"END\r\n")
        return buf.endswith(b"\r\n")

    reply, complete = session.recv_until(done, timeout)
    elapsed = time.monotonic() - start
    assert complete, f"{command!r}: no complete reply in {timeout} s, got {reply!r}"
    return reply, elapsed


def _server_errors(st: Stack, session: RawSession) -> list[float]:
    """Each of :data:`COMMANDS` once; all must answer SERVER_ERROR; their latencies."""
    latencies = []
    for command in COMMANDS:
        reply, elapsed = request(session, command)
        assert reply.startswith(b"SERVER_ERROR ") and reply.count(b"\r\n") == 1, (command, reply)
        latencies.append(elapsed)
    return latencies


def _works(session: RawSession, value: bytes = b"v") -> None:
    reply, _ = request(session, b"set ok 0 0 %d\r\n%s\r\n" % (len(value), value))
    assert reply == b"STORED\r\n", reply
    reply, _ = request(session, b"get ok\r\n")
    assert reply == b"VALUE ok 0 %d\r\n%s\r\nEND\r\n" % (len(value), value), reply


def error_burst(st: Stack, count: int = 20) -> dict[str, float]:
    with RawSession(st.mproxy.port) as session:
        _works(session)
        assert st.momento.control(f"fault *:error=UNAVAILABLE:count={count}") == "OK"
        latencies: list[float] = []
        answered = 0
        start = time.monotonic()
        while True:  # until the burst is used up (the SDK retries some calls: fewer commands)
            reply, elapsed = request(session, COMMANDS[answered % len(COMMANDS)])
            answered += 1
            if not reply.startswith(b"SERVER_ERROR"):
                break
            latencies.append(elapsed)
            assert time.monotonic() - start < 60, "the burst never ended"
        _works(session, b"after")
    return {"burst_calls": count, "server_errors": len(latencies), "max_error_reply_s": max(latencies),
            "median_error_reply_s": statistics.median(latencies)}


def delay_past_timeout(st: Stack, delay: float = 3.0) -> dict[str, float]:
    with RawSession(st.mproxy.port) as session:
        _works(session)
        assert st.momento.control(f"fault *:delay={delay}") == "OK"
        latencies = _server_errors(st, session)
        assert st.momento.control("clear") == "OK"
        _works(session, b"after")
    return {"delay_s": delay, "request_timeout_s": st.request_timeout, "min_timeout_reply_s": min(latencies),
            "max_timeout_reply_s": max(latencies)}


def kill_and_restart(st: Stack) -> dict[str, float]:
    port = st.momento.port
    with RawSession(st.mproxy.port) as session:
        _works(session)
        st.momento.kill()
        latencies = _server_errors(st, session)
        restart = time.monotonic()
        st.momento = start_local_momento(st.tmp_path, CACHE, port=port, workers=16)
        listening = time.monotonic()
        probes = 0
        while True:
            probes += 1
            reply, _ = request(session, b"set ok 0 0 1\r\nx\r\n")
            if reply == b"STORED\r\n":
                break
            assert reply.startswith(b"SERVER_ERROR"), reply
            assert time.monotonic() - restart < 60, f"no recovery in 60 s: {reply!r}"
            time.sleep(PROBE_INTERVAL)
        recovered = time.monotonic()
        _works(session, b"after")
    return {"down_max_error_reply_s": max(latencies), "recovery_from_listening_s": recovered - listening,
            "recovery_from_restart_s": recovered - restart, "server_start_s": listening - restart,
            "probes": probes}


def delay_storm(
    st: Stack, clients: int = 50, seconds: float = 10.0, delay: float = 30.0, pipeline: int = 1
) -> dict[str, float]:
    """``clients`` connections send :data:`COMMANDS` in turn without pause (``pipeline`` at a
    time, in one write) while every call is delayed ``delay`` s (far past the timeout) for
    ``seconds``; then ``clear``."""
    with RawSession(st.mproxy.port) as session:
        _works(session)
    time.sleep(1.0)  # let start-up garbage settle before the baseline (a measurement, not a sync)
    base = st.latest()
    assert st.momento.control(f"fault *:delay={delay}") == "OK"
    stop = threading.Event()
    answered = [0] * clients
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            with RawSession(st.mproxy.port) as s:
                n = 0
                while not stop.is_set():
                    if pipeline == 1:
                        reply, _ = request(s, COMMANDS[n % len(COMMANDS)])
                        assert reply.startswith(b"SERVER_ERROR"), reply
                    else:  # sets and deletes: one reply line each
                        assert s.send(b"".join(COMMANDS[1 + (n + k) % 2 * 2] for k in range(pipeline)))
                        reply, complete = s.recv_until(lambda b: b.count(b"\r\n") >= pipeline, timeout=60)
                        assert complete and reply.count(b"SERVER_ERROR") == pipeline, reply[:200]
                    n += pipeline
                answered[i] = n
        except BaseException as exc:  # noqa: BLE001  (reported by the caller)
            errors.append(exc)

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(seconds)  # the storm's length (a measurement window)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    storm = st.samples(since=start)
    assert st.momento.control("clear") == "OK"
    with RawSession(st.mproxy.port) as session:
        _works(session, b"after")
    # the delayed calls the proxy gave up on end on the server ``delay`` after they were sent,
    # the last ones ``seconds`` in: wait past that (a bound, not a synchronisation)
    time.sleep(max(0.0, seconds + delay - (time.monotonic() - start)) + 2.0)
    after = st.latest()
    assert not errors, errors[:3]
    assert storm, "no sample during the storm"
    return {
        "clients": clients, "pipeline": pipeline, "storm_s": seconds, "server_delay_s": delay, "commands_answered": sum(answered),
        "rss_base_kib": base.rss_kib, "rss_max_in_storm_kib": max(s.rss_kib for s in storm),
        "rss_after_kib": after.rss_kib, "greenlets_base": base.greenlets,
        "greenlets_max_in_storm": max(s.greenlets for s in storm), "greenlets_after": after.greenlets,
    }
