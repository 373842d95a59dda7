"""The bench's direct-SDK baseline: an application calling ``momento.CacheClient`` itself.

    .venv/bin/python scripts/direct_sdk.py --port P [--cache bench] [the loadgen's load options]

What an application would do instead of running mproxy: one synchronous
``CacheClient`` under gevent (``monkey.patch_all()``, then
``grpc.experimental.gevent.init_gevent()``, then ``import momento``), one
greenlet per connection of the load shape, against a Momento-compatible server
(the bench starts the bundled ``mproxy-momento-local`` for it).

It produces the load of ``scripts/loadgen.c`` itself (same options, same key
and value choice, same closed loop of batches) and speaks the same protocol on
stdout and stdin: ``ready``, wait for a line; ``stop``, wait for the end of
stdin; then one JSON object with the same fields. The
one translation: a batch of D requests is D requests issued at once (one
greenlet each), and a multi-get of K keys is K concurrent ``CacheClient.get``
calls; a request's latency runs from its batch's start to its last call's
answer. Percentiles here are exact (nearest rank); loadgen's are histogram
buckets (about 3 %).
"""

from __future__ import annotations

# gevent first, then gRPC made cooperative, then the SDK (the order mproxy's CLI uses)
from gevent import monkey

monkey.patch_all()

import os  # noqa: E402

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import grpc.experimental.gevent  # noqa: E402

grpc.experimental.gevent.init_gevent()

import argparse  # noqa: E402
import bisect  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import timedelta  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import momento  # noqa: E402
from momento.responses import CacheGet, CacheSet  # noqa: E402

#: The deadline of one call: mproxy's default ``request_timeout``.
REQUEST_TIMEOUT = timedelta(seconds=5)
DEFAULT_TTL = timedelta(seconds=900)
#: Seconds without a single answer after which the run is abandoned.
STALL_SECONDS = 30.0


@dataclass
class Counts:
    """What the timed phase did (as loadgen counts it)."""

    ops: int = 0
    gets: int = 0
    keys: int = 0
    hits: int = 0
    misses: int = 0
    sets: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    per_conn: list[int] = field(default_factory=list)  # ops each greenlet completed


class Load:
    """Key, value and request choice, as loadgen makes them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        pool_len = args.value_max * 4 + 4096
        self.pool = self.rng.randbytes(pool_len)
        self.cdf: list[float] | None = None
        if args.zipf > 0:
            weights = itertools.accumulate(1.0 / (i + 1) ** args.zipf for i in range(args.keys))
            cumulative = list(weights)
            self.cdf = [w / cumulative[-1] for w in cumulative]

    def key(self, index: int) -> str:
        return f"{self.args.prefix}{index}"

    def key_index(self) -> int:
        if self.cdf is None:
            return int(self.rng.randrange(self.args.keys))
        return min(bisect.bisect_left(self.cdf, self.rng.random()), int(self.args.keys) - 1)

    def value(self) -> bytes:
        size = self.rng.randint(self.args.value_min, self.args.value_max)
        at = self.rng.randrange(len(self.pool) - size + 1)
        return self.pool[at : at + size]

    def request(self) -> tuple[str, list[str]]:
        """("set", [key]) or ("get", [K keys])."""
        if self.rng.randrange(self.args.sets + self.args.gets) < self.args.sets:
            return "set", [self.key(self.key_index())]
        return "get", [self.key(self.key_index()) for _ in range(self.args.mget)]


class Runner:
    """The closed loop of batches, and its counts."""

    def __init__(self, client: Any, cache: str, load: Load) -> None:
        self.client = client
        self.cache = cache
        self.load = load
        self.counts = Counts()
        self.last_answer = time.monotonic()

    def call(self, kind: str, key: str) -> tuple[str, float]:
        """One SDK call: its outcome ("hit", "miss", "stored", "error") and when it answered."""
        result: Any
        if kind == "set":
            result = self.client.set(self.cache, key, self.load.value())
            outcome = "stored" if isinstance(result, CacheSet.Success) else "error"
        else:
            result = self.client.get(self.cache, key)
            outcome = "hit" if isinstance(result, CacheGet.Hit) else "miss" if isinstance(result, CacheGet.Miss) else "error"
        self.last_answer = time.monotonic()
        return outcome, self.last_answer

    def batch(self, requests: list[tuple[str, list[str]]], record: bool) -> None:
        """Issue every call of the batch at once; a request is done when its last call answered."""
        start = time.monotonic()
        calls = [(kind, key) for kind, keys in requests for key in keys]
        if len(calls) == 1:  # nothing to overlap: call inline
            answers = [self.call(*calls[0])]
        else:
            greenlets = [gevent.spawn(self.call, kind, key) for kind, key in calls]
            gevent.joinall(greenlets, raise_error=True)
            answers = [g.get() for g in greenlets]
        if not record:
            if any(outcome == "error" for outcome, _ in answers):
                args = self.load.args
                raise SystemExit(f"direct_sdk: prefill: a set failed against {args.host}:{args.port}")
            return
        c = self.counts
        at = 0
        for kind, keys in requests:
            mine = answers[at : at + len(keys)]
            at += len(keys)
            outcomes = [outcome for outcome, _ in mine]
            c.ops += 1
            if kind == "set":
                c.sets += 1
            else:
                c.gets += 1
                c.keys += len(keys)
            if "error" in outcomes:
                c.errors += 1
            elif kind == "get":
                c.hits += outcomes.count("hit")
                c.misses += outcomes.count("miss")
            c.latencies.append(max(done for _, done in mine) - start)

    def prefill(self, conns: int, depth: int) -> int:
        """Set every key once, ``conns`` greenlets issuing ``depth`` sets at a time."""
        keys: Iterator[int] = iter(range(self.load.args.keys))

        def worker() -> None:
            while chunk := list(itertools.islice(keys, depth)):
                self.batch([("set", [self.load.key(i)]) for i in chunk], record=False)

        gevent.joinall([gevent.spawn(worker) for _ in range(conns)], raise_error=True)
        return int(self.load.args.keys)

    def timed(self, conns: int, depth: int, duration: float) -> float:
        """Run the load for ``duration`` seconds (the last batches finish); the elapsed seconds."""
        until = time.monotonic() + duration

        def worker() -> None:
            done = 0
            while time.monotonic() < until:
                self.batch([self.load.request() for _ in range(depth)], record=True)
                done += depth
            self.counts.per_conn.append(done)

        start = time.monotonic()
        watchdog = gevent.spawn(self.watch)
        try:
            gevent.joinall([gevent.spawn(worker) for _ in range(conns)], raise_error=True)
        finally:
            watchdog.kill()
        return time.monotonic() - start

    def watch(self) -> None:
        """Abandon the run when no call has answered for ``STALL_SECONDS``."""
        while True:
            gevent.sleep(1.0)
            if time.monotonic() - self.last_answer > STALL_SECONDS:
                print(f"direct_sdk: no answer for {STALL_SECONDS:.0f} s", file=sys.stderr, flush=True)
                os._exit(1)


def quantile_ms(sorted_seconds: list[float], q: float) -> float:
    """The nearest-rank quantile, in ms."""
    if not sorted_seconds:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_seconds)))
    return sorted_seconds[rank - 1] * 1e3


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="the Momento-compatible server's port")
    p.add_argument("--cache", default="bench", help="cache name (the server must have it)")
    p.add_argument("--conns", type=int, default=1, help="greenlets, one per connection of the shape")
    p.add_argument("--depth", type=int, default=1, help="requests issued at once per greenlet")
    p.add_argument("--sets", type=int, default=1)
    p.add_argument("--gets", type=int, default=10)
    p.add_argument("--mget", type=int, default=1, help="keys per get (concurrent CacheClient.get calls)")
    p.add_argument("--keys", type=int, default=10000)
    p.add_argument("--zipf", type=float, default=0.0)
    p.add_argument("--value-min", type=int, default=32)
    p.add_argument("--value-max", type=int, default=100)
    p.add_argument("--prefill", action="store_true")
    p.add_argument("--prefill-conns", type=int, default=16)
    p.add_argument("--prefill-depth", type=int, default=32)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--prefix", default="key:")
    return p


def main() -> int:
    args = parser().parse_args()
    logging.getLogger("momentosdk").setLevel(logging.CRITICAL)  # a failed call is counted, not logged
    configuration = momento.Configurations.InRegion.Default.v1().with_client_timeout(REQUEST_TIMEOUT)
    credentials = momento.CredentialProvider.for_momento_local(args.host, args.port)
    with momento.CacheClient(configuration, credentials, DEFAULT_TTL) as client:
        # the client connects lazily: one call now, so a server that is not there fails here, clearly
        probe = client.get(args.cache, f"{args.prefix}probe")
        if isinstance(probe, CacheGet.Error):
            print(f"direct_sdk: cannot use cache {args.cache!r} at {args.host}:{args.port}: {probe.message}", file=sys.stderr)
            return 1
        runner = Runner(client, args.cache, Load(args))
        prefilled = runner.prefill(args.prefill_conns, args.prefill_depth) if args.prefill else 0
        print("ready", flush=True)
        sys.stdin.readline()  # the handshake: see scripts/loadgen.c
        elapsed = max(runner.timed(args.conns, args.depth, args.duration), 1e-9)
        print("stop", flush=True)
        sys.stdin.read()
    c = runner.counts
    latencies = sorted(c.latencies)
    summary = {
        "ops": c.ops, "gets": c.gets, "keys": c.keys, "hits": c.hits, "misses": c.misses,
        "sets": c.sets, "errors": c.errors, "prefill_sets": prefilled, "elapsed_s": elapsed,
        "ops_per_s": c.ops / elapsed, "keys_per_s": (c.keys + c.sets) / elapsed,
        "p50_ms": quantile_ms(latencies, 0.50), "p90_ms": quantile_ms(latencies, 0.90),
        "p99_ms": quantile_ms(latencies, 0.99), "p999_ms": quantile_ms(latencies, 0.999),
        "mean_ms": sum(latencies) / len(latencies) * 1e3 if latencies else 0.0,
        "max_ms": latencies[-1] * 1e3 if latencies else 0.0,
        "conn_ops_min": min(c.per_conn, default=0), "conn_ops_max": max(c.per_conn, default=0),
        "conns": args.conns, "depth": args.depth, "mget": args.mget,
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
