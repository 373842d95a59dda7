"""Control of the local Momento server: the ``ScsControl`` gRPC service and the control port.

``control_client.ScsControl`` (:class:`ControlServicer`) is Momento's cache
lifecycle API. The control port (:class:`ControlPort`) is the test side
channel: a line-based TCP server (loopback by default), one command per line,
one reply line per command, several commands per connection:

- ``fault SPEC`` -> ``OK`` (adds a rule: :mod:`.faults`)
- ``clear``      -> ``OK`` (removes every rule)
- ``stats``      -> JSON ``{"calls": {RPC: n}, "keys": {RPC: n}}``: calls per
  RPC and keys touched per RPC (items of a batch, keys of KeysExist, else 1)
- ``reset``      -> ``OK`` (zeroes the statistics)
- anything else  -> ``ERROR <reason>``

:func:`control_request` sends one command and returns the reply line.
"""

from __future__ import annotations

import json
import socket
import socketserver

import grpc
from momento_wire_types import controlclient_pb2 as control_pb
from momento_wire_types import controlclient_pb2_grpc as control_grpc

from mproxy.momento_local.faults import FaultInjector, FaultSpecError, parse_fault
from mproxy.momento_local.gate import MAX_ITEM_SIZE_BYTES, CallStats, Rejection, Servicer, rpc

#: Longest command line the control port reads.
_CONTROL_LINE_LIMIT = 4096


class ControlServicer(Servicer, control_grpc.ScsControlServicer):
    """``control_client.ScsControl``: cache lifecycle."""

    @rpc("CreateCache", data=False)
    def CreateCache(self, request: control_pb._CreateCacheRequest) -> control_pb._CreateCacheResponse:
        if not request.cache_name:
            raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "Cache name must not be empty")
        self.store.create_cache(request.cache_name)
        return control_pb._CreateCacheResponse()

    @rpc("DeleteCache", data=False)
    def DeleteCache(self, request: control_pb._DeleteCacheRequest) -> control_pb._DeleteCacheResponse:
        self.store.delete_cache(request.cache_name)
        return control_pb._DeleteCacheResponse()

    @rpc("ListCaches", data=False)
    def ListCaches(self, request: control_pb._ListCachesRequest) -> control_pb._ListCachesResponse:
        limits = control_pb._CacheLimits(
            max_item_size_kb=MAX_ITEM_SIZE_BYTES // 1024, max_ttl_seconds=self.gate.max_ttl_seconds
        )
        caches = [control_pb._Cache(cache_name=name, cache_limits=limits) for name in self.store.list_caches()]
        return control_pb._ListCachesResponse(cache=caches, next_token="")

    @rpc("FlushCache", data=False)
    def FlushCache(self, request: control_pb._FlushCacheRequest) -> control_pb._FlushCacheResponse:
        self.store.flush_cache(request.cache_name)
        return control_pb._FlushCacheResponse()


class _ControlHandler(socketserver.StreamRequestHandler):
    server: ControlPort

    def handle(self) -> None:
        while True:
            line = self.rfile.readline(_CONTROL_LINE_LIMIT + 1)
            if not line:
                return
            if len(line) > _CONTROL_LINE_LIMIT:
                self.wfile.write(b"ERROR line too long\n")
                return
            reply = self.server.execute(line.decode("utf-8", "replace").strip())
            self.wfile.write(reply.encode("utf-8") + b"\n")
            self.wfile.flush()


class ControlPort(socketserver.ThreadingTCPServer):
    """The control port's TCP server (module docstring), bound at construction; serve it with ``serve_forever``."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, host: str, port: int, faults: FaultInjector, stats: CallStats) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.faults = faults
        self.stats = stats
        super().__init__((host, port), _ControlHandler)

    def execute(self, line: str) -> str:
        """The reply to one command line."""
        command, _, argument = line.partition(" ")
        if command == "fault":
            try:
                self.faults.add(parse_fault(argument))
            except FaultSpecError as exc:
                return f"ERROR {exc}"
            return "OK"
        if command == "clear" and not argument:
            self.faults.clear()
            return "OK"
        if command == "stats" and not argument:
            return json.dumps(self.stats.snapshot(), sort_keys=True)
        if command == "reset" and not argument:
            self.stats.reset()
            return "OK"
        return f"ERROR unknown command {command!r}: use fault SPEC, clear, stats or reset"


def control_request(host: str, port: int, command: str, timeout: float = 10.0) -> str:
    """Send one command to a control port and return its reply line (without newline)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(command.encode("utf-8") + b"\n")
        with sock.makefile("rb") as reader:
            return reader.readline(_CONTROL_LINE_LIMIT + 1).decode("utf-8").rstrip("\r\n")
