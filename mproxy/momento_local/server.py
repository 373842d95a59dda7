"""The local Momento server assembled: :func:`serve` and the running :class:`LocalServer`.

One plain ``grpc.server`` (never gevent-patched) serves both
``cache_client.Scs`` (:mod:`.data`) and ``control_client.ScsControl``
(:mod:`.control`) on the same insecure port, behind one :class:`~.gate.Gate`,
on a :class:`~.pool.CallPool` of a few threads (a call asleep in a fault's
delay does not count); a second, line-based port takes fault rules and reports
statistics (:class:`~.control.ControlPort`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

import grpc
from momento_wire_types import cacheclient_pb2_grpc as cache_grpc
from momento_wire_types import controlclient_pb2_grpc as control_grpc

from mproxy.momento_local.control import ControlPort, ControlServicer
from mproxy.momento_local.data import DataServicer
from mproxy.momento_local.faults import Fault, FaultInjector, parse_fault
from mproxy.momento_local.gate import DEFAULT_MAX_TTL_SECONDS, CallStats, Gate
from mproxy.momento_local.pool import CallPool
from mproxy.momento_local.store import Store

_LOG = logging.getLogger("mproxy.momento_local")

#: The server accepts messages far above the item limit so that the item limit,
#: not gRPC's 4 MiB default, decides (SetBatch carries many items).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: Threads serving calls at once (a call asleep in a fault's delay does not
#: count): one runs Python while the other waits on gRPC; more only add
#: context switches (docs/momento-local.md has the figures).
DEFAULT_MAX_WORKERS = 2
#: How often the control port's accept loop checks for shutdown (bounds stop()).
_CONTROL_POLL_SECONDS = 0.05


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class LocalServer:
    """A running local Momento server: gRPC port, control port, store, faults and stats."""

    def __init__(
        self,
        grpc_server: grpc.Server,
        pool: CallPool,
        control: ControlPort,
        host: str,
        port: int,
        store: Store,
        faults: FaultInjector,
        stats: CallStats,
    ) -> None:
        self.host = host
        self.port = port
        self.control_port: int = control.server_address[1]
        self.store = store
        self.faults = faults
        self.stats = stats
        self._grpc_server = grpc_server
        self._pool = pool
        self._control = control
        self._control_thread = threading.Thread(
            target=control.serve_forever, args=(_CONTROL_POLL_SECONDS,), name="momento-local-control", daemon=True
        )
        self._control_thread.start()

    @property
    def address(self) -> str:
        """``host:port`` of the gRPC endpoint (IPv6 hosts bracketed)."""
        return _address(self.host, self.port)

    @property
    def control_address(self) -> str:
        """``host:port`` of the control port (IPv6 hosts bracketed)."""
        return _address(self.host, self.control_port)

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop both ports; in-flight RPCs get ``grace`` seconds to finish."""
        self._grpc_server.stop(grace).wait()
        self._pool.shutdown(wait=False)  # a call asleep in a delay ends on its own
        self._control.shutdown()
        self._control.server_close()
        self._control_thread.join()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    caches: Iterable[str] = (),
    auth_token: str | None = None,
    max_ttl_seconds: int = DEFAULT_MAX_TTL_SECONDS,
    faults: Iterable[Fault | str] = (),
    control_port: int = 0,
    max_workers: int = DEFAULT_MAX_WORKERS,
) -> LocalServer:
    """Start a local Momento-compatible server in this (un-patched) process and return it.

    ``port``/``control_port`` 0 pick free ports (read them from the result).
    ``caches`` are created empty; ``auth_token`` None accepts any
    ``authorization``; ``faults`` are rules or spec strings (:mod:`.faults`);
    ``max_workers`` threads serve calls at once, not counting calls asleep in
    a fault's delay. Raises ``OSError`` when a port cannot be bound.
    """
    if max_ttl_seconds <= 0:
        raise ValueError(f"max_ttl_seconds must be positive, got {max_ttl_seconds}")
    store = Store()
    for name in dict.fromkeys(caches):
        store.create_cache(name)
    injector = FaultInjector(parse_fault(f) if isinstance(f, str) else f for f in faults)
    stats = CallStats()
    pool = CallPool(max_workers)
    gate = Gate(store, injector, stats, auth_token, max_ttl_seconds, pool.wait)
    server = grpc.server(
        pool,  # type: ignore[arg-type]  # typed as ThreadPoolExecutor; grpc calls only submit()
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    cache_grpc.add_ScsServicer_to_server(DataServicer(gate), server)
    control_grpc.add_ScsControlServicer_to_server(ControlServicer(gate), server)
    try:
        bound = server.add_insecure_port(_address(host, port))
    except RuntimeError as exc:
        raise OSError(f"cannot bind {_address(host, port)}: {exc}") from exc
    if bound == 0:
        raise OSError(f"cannot bind {_address(host, port)}")
    try:
        control = ControlPort(host, control_port, injector, stats)
    except OSError:
        server.stop(None)
        raise
    server.start()
    _LOG.info("momento-local serving on %s", _address(host, bound))
    return LocalServer(server, pool, control, host, bound, store, injector, stats)
