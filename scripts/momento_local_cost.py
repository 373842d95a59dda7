"""The bundled Momento server's own CPU per call and per key, under 40 concurrent callers.

    .venv/bin/python scripts/momento_local_cost.py [--rounds 3] [--seconds 4] [--callers 40]
        [--rate CALLS_PER_S] [--shapes Get/1,GetBatch/100,sdk/1] ['NAME=SRC [ARG|VAR=VALUE ...]' ...]

Each SERVER is ``python -m mproxy.momento_local`` run from source tree SRC
(default: ``here=.``) with extra console-script arguments and environment
variables; to compare with an older commit, unpack it first
(``git archive OLD | tar -x -C /tmp/old``, then ``old=/tmp/old``). This
process drives it with ``--callers`` concurrent ``grpc.aio`` callers on one
channel: unary Get and Set, GetBatch and SetBatch of 10 and 100 keys (100-byte
values, 10,000 prefilled keys), or, for the shape ``sdk``, runs the bench's
direct-SDK baseline (``scripts/direct_sdk.py``: ``momento.CacheClient`` under
gevent, one greenlet per caller, 1 set : 10 gets). The server's user+system
CPU comes from ``/proc/PID/stat`` around each timed phase. Rounds interleave
the servers, so all see the same neighbours on a shared machine; the table
gives medians and each round's CPU per call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from momento_wire_types import cacheclient_pb2 as pb
from momento_wire_types import cacheclient_pb2_grpc as pb_grpc

CACHE = "bench"
KEYS = 10_000
VALUE = b"v" * 100
TTL_MS = 900_000
TICKS = os.sysconf("SC_CLK_TCK")
SHAPES = "Get/1,Set/1,GetBatch/10,GetBatch/100,SetBatch/10,SetBatch/100,sdk/1"
DIRECT_SDK = Path(__file__).resolve().parent / "direct_sdk.py"
METADATA = (("cache", CACHE), ("authorization", ""))


@dataclass(frozen=True)
class Server:
    name: str
    src: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, spec: str) -> Server:
        first, *rest = shlex.split(spec)
        name, _, src = first.partition("=")
        env = tuple((k, v) for k, _, v in (a.partition("=") for a in rest if re.match(r"[A-Z_][A-Z0-9_]*=", a)))
        args = tuple(a for a in rest if not re.match(r"[A-Z_][A-Z0-9_]*=", a))
        return cls(name, str(Path(src or ".").resolve()), args, env)

    def start(self) -> tuple[subprocess.Popen[bytes], int]:
        env = {**os.environ, "PYTHONPATH": self.src, **dict(self.env)}
        argv = [sys.executable, "-m", "mproxy.momento_local", "--port", "0", "--control-port", "0", "--cache", CACHE]
        proc = subprocess.Popen([*argv, *self.args], cwd=self.src, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE)  # fmt: skip
        assert proc.stdout is not None
        match = re.search(r"listening on \S+:(\d+) control", proc.stdout.readline().decode())
        if match is None:
            proc.kill()
            raise SystemExit(f"{self.name}: the server did not start")
        return proc, int(match.group(1))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def request_maker(rpc: str, keys: int) -> Callable[[int], Any]:
    def key(i: int) -> bytes:
        return b"key:%d" % (i % KEYS)

    def item(i: int) -> pb._SetRequest:
        return pb._SetRequest(cache_key=key(i), cache_body=VALUE, ttl_milliseconds=TTL_MS)

    makers: dict[str, Callable[[int], Any]] = {
        "Get": lambda i: pb._GetRequest(cache_key=key(i)),
        "Set": item,
        "GetBatch": lambda i: pb._GetBatchRequest(items=[pb._GetRequest(cache_key=key(i * keys + j))
                                                         for j in range(keys)]),
        "SetBatch": lambda i: pb._SetBatchRequest(items=[item(i * keys + j) for j in range(keys)]),
    }
    return makers[rpc]


async def prefill(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ScsStub(channel)
        make = request_maker("SetBatch", 100)
        for i in range(KEYS // 100):
            [_ async for _ in stub.SetBatch(make(i), metadata=METADATA, timeout=30)]


async def drive(port: int, pid: int, rpc: str, keys: int, args: argparse.Namespace) -> dict[str, float]:
    """Timed phase of one shape with raw stubs: calls/s and CPU figures."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        method = getattr(pb_grpc.ScsStub(channel), rpc)
        make = request_maker(rpc, keys)
        requests = [make(i) for i in range(1000)]
        streaming = rpc.endswith("Batch")
        interval = args.callers / args.rate if args.rate else 0.0
        calls, stop = 0, False

        async def caller(n: int) -> None:
            nonlocal calls
            i, next_at = n, time.monotonic() + interval * n / args.callers
            while not stop:
                if interval:
                    next_at += interval
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                request = requests[i % len(requests)]
                i += args.callers
                if streaming:
                    assert len([r async for r in method(request, metadata=METADATA, timeout=30)]) == keys
                else:
                    await method(request, metadata=METADATA, timeout=30)
                calls += 1

        tasks = [asyncio.create_task(caller(n)) for n in range(args.callers)]
        await asyncio.sleep(min(1.0, args.seconds / 4))  # warm up
        calls, cpu0, own0, t0 = 0, cpu_seconds(pid), time.process_time(), time.monotonic()
        await asyncio.sleep(args.seconds)
        done, server_cpu = calls, cpu_seconds(pid) - cpu0
        own_cpu, elapsed = time.process_time() - own0, time.monotonic() - t0
        stop = True
        await asyncio.gather(*tasks)
    return figures(done, keys, server_cpu, own_cpu, elapsed)


def drive_sdk(port: int, pid: int, args: argparse.Namespace) -> dict[str, float]:
    """Timed phase of the direct-SDK baseline (one gRPC call per get or set)."""
    argv = [sys.executable, str(DIRECT_SDK), "--port", str(port), "--cache", CACHE, "--conns", str(args.callers),
            "--prefill", "--duration", str(args.seconds)]  # fmt: skip
    sdk = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert sdk.stdin is not None and sdk.stdout is not None
    assert sdk.stdout.readline().strip() == "ready"
    cpu0 = cpu_seconds(pid)
    sdk.stdin.write("go\n")
    sdk.stdin.flush()
    assert sdk.stdout.readline().strip() == "stop"
    server_cpu = cpu_seconds(pid) - cpu0
    sdk.stdin.close()
    summary = json.loads(sdk.stdout.read().strip().splitlines()[-1])
    sdk.wait()
    return figures(summary["gets"] + summary["sets"], 1, server_cpu, float("nan"), summary["elapsed_s"])


def figures(calls: int, keys: int, server_cpu: float, client_cpu: float, elapsed: float) -> dict[str, float]:
    return {
        "calls_per_s": calls / elapsed,
        "server_us_per_call": server_cpu / calls * 1e6,
        "server_us_per_key": server_cpu / (calls * keys) * 1e6,
        "client_us_per_call": client_cpu / calls * 1e6,
        "server_cores": server_cpu / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="timed phase per shape")
    parser.add_argument("--callers", type=int, default=40)
    parser.add_argument("--rate", type=float, default=0.0, help="raw-stub calls per second in all (0: closed loop)")
    parser.add_argument("--shapes", default=SHAPES, help="RPC/KEYS,... (default: %(default)s)")
    parser.add_argument("servers", nargs="*", metavar="SERVER", help="'NAME=SRC [ARG|VAR=VALUE ...]' (default: here=.)")
    args = parser.parse_args()
    servers = [Server.parse(spec) for spec in args.servers or ["here=."]]
    shapes = [(rpc, int(keys)) for rpc, _, keys in (s.partition("/") for s in args.shapes.split(","))]
    results: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    for round_no in range(1, args.rounds + 1):
        for server in servers:
            proc, port = server.start()
            try:
                asyncio.run(prefill(port))
                for rpc, keys in shapes:
                    if rpc == "sdk":
                        got = drive_sdk(port, proc.pid, args)
                    else:
                        got = asyncio.run(drive(port, proc.pid, rpc, keys, args))
                    results.setdefault((server.name, rpc, keys), []).append(got)
                    shown = " ".join(f"{k}={v:.1f}" for k, v in got.items())
                    print(f"round {round_no} {server.name} {rpc}x{keys}: {shown}", flush=True)
            finally:
                proc.terminate()
                proc.wait(10)
    print(f"\n{'server':12} {'shape':14} {'us/call':>8} {'us/key':>7} {'calls/s':>8} {'cores':>6}  us/call per round")
    for (name, rpc, keys), runs in results.items():
        med = {field: statistics.median(run[field] for run in runs) for field in runs[0]}
        print(f"{name:12} {rpc + ' x' + str(keys):14} {med['server_us_per_call']:8.0f} {med['server_us_per_key']:7.1f} "
              f"{med['calls_per_s']:8.0f} {med['server_cores']:6.2f}  {[round(r['server_us_per_call']) for r in runs]}")


if __name__ == "__main__":
    main()
