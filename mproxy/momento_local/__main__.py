"""Console script ``mproxy-momento-local``: run the local Momento server until SIGTERM/SIGINT.

On start it prints exactly one line to stdout, then flushes::

    mproxy-momento-local listening on HOST:PORT control HOST:CPORT

(IPv6 hosts in brackets) so a parent process can read both ports. It exits 0
after a graceful stop on SIGTERM or SIGINT, 1 when a port cannot be bound, 2 on
bad arguments (argparse).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

#: Seconds in-flight RPCs get to finish when the server stops.
STOP_GRACE_SECONDS = 2.0
#: gRPC core experiments of this process, unless ``GRPC_EXPERIMENTS`` is set:
#: iomgr's TCP listener instead of the EventEngine's, so that the thread
#: waiting on the completion queue reads and writes the connections itself, a
#: thread hop less per event: about 20 % less CPU per call (docs/momento-local.md).
#: A gRPC release without this experiment logs "Unknown experiment" and serves
#: as without it.
GRPC_EXPERIMENTS = "-event_engine_listener"


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    from mproxy.momento_local.gate import DEFAULT_MAX_TTL_SECONDS
    from mproxy.momento_local.server import DEFAULT_MAX_WORKERS

    parser = argparse.ArgumentParser(
        prog="mproxy-momento-local",
        description="In-memory Momento-compatible gRPC server for trials and tests (plaintext).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="gRPC port; 0 picks a free one (default: %(default)s)")
    parser.add_argument(
        "--control-port",
        type=int,
        default=0,
        help="fault/stats control port; 0 picks a free one (default: %(default)s)",
    )
    parser.add_argument(
        "--cache", action="append", default=[], metavar="NAME", help="create this cache at start (repeatable)"
    )
    parser.add_argument(
        "--auth-token",
        default=None,
        metavar="TOKEN",
        help="require 'authorization: TOKEN' metadata on every call (default: accept any)",
    )
    parser.add_argument(
        "--max-ttl-seconds",
        type=int,
        default=DEFAULT_MAX_TTL_SECONDS,
        help="larger TTLs are rejected with INVALID_ARGUMENT (default: %(default)s)",
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="fault rule RPC[:delay=S][:error=STATUS][:count=N][:message=TEXT] (repeatable)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_MAX_WORKERS,
        help="threads serving RPCs at once; an RPC asleep in a fault's delay holds none (default: %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; return the process exit status."""
    os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)  # before anything imports grpc
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from mproxy.momento_local.faults import FaultSpecError, parse_fault
    from mproxy.momento_local.server import serve

    try:
        faults = [parse_fault(spec) for spec in args.fault]
    except FaultSpecError as exc:
        print(f"mproxy-momento-local: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        server = serve(
            host=args.host,
            port=args.port,
            caches=args.cache,
            auth_token=args.auth_token,
            max_ttl_seconds=args.max_ttl_seconds,
            faults=faults,
            control_port=args.control_port,
            max_workers=args.workers,
        )
    except (OSError, ValueError) as exc:
        print(f"mproxy-momento-local: {exc}", file=sys.stderr)
        return 1
    print(f"mproxy-momento-local listening on {server.address} control {server.control_address}", flush=True)
    stop.wait()
    server.stop(STOP_GRACE_SECONDS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
