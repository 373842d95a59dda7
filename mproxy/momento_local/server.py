"""gRPC servicers of the local Momento-compatible server, fault injection and ``serve()``.

One plain ``grpc.server`` (thread pool, never gevent-patched) serves both
``cache_client.Scs`` (data) and ``control_client.ScsControl`` (control) on the
same insecure port, built on the generated code of ``momento-wire-types``.
RPCs not implemented here (collections, signing keys, indexes) answer
UNIMPLEMENTED through the generated base classes.

Every call goes through the same gate, in this order: statistics, faults,
authorization (``authorization`` metadata, only when a token is configured),
then the ``cache`` metadata header for data calls, then validation:

=====================================  ===========================================
condition                              gRPC status (SDK error code)
=====================================  ===========================================
missing/wrong ``authorization``        UNAUTHENTICATED (AUTHENTICATION_ERROR)
missing ``cache`` header               INVALID_ARGUMENT (INVALID_ARGUMENT_ERROR)
unknown cache                          NOT_FOUND (NOT_FOUND_ERROR)
TTL of 0 ms or above the maximum       INVALID_ARGUMENT (INVALID_ARGUMENT_ERROR)
key + value above MAX_ITEM_SIZE_BYTES  RESOURCE_EXHAUSTED, trailer
                                       ``err: item_size_limit_exceeded``
                                       (LIMIT_EXCEEDED_ERROR, "Item size limit")
Increment of a non-integer / overflow  FAILED_PRECONDITION (FAILED_PRECONDITION_ERROR)
CreateCache of an existing cache       ALREADY_EXISTS (SDK: CacheAlreadyExists)
=====================================  ===========================================

Fault spec syntax (``--fault`` and the control port's ``fault`` command)::

    RPC[:delay=SECONDS][:error=STATUS][:count=N][:message=TEXT]

``RPC`` is a method name of either service (``Get``, ``SetBatch``,
``CreateCache``...) or ``*`` for all. ``delay`` sleeps before answering;
``error`` is a ``grpc.StatusCode`` name (``UNAVAILABLE``, case-insensitive)
answered instead of the result, with ``message`` as details (default: a
description of the fault; ``message`` must come last and may contain ``:``).
``count`` limits the rule to the next N matching calls (default: forever).
Rules apply in the order added; every matching rule consumes one of its calls,
delays add up and the first error wins. Faults act before authorization.

Control port: a line-based TCP side channel (loopback by default), one command
per line, one reply line per command, several commands per connection:

- ``fault SPEC`` -> ``OK`` (adds a rule)
- ``clear``      -> ``OK`` (removes every rule)
- ``stats``      -> JSON ``{"calls": {RPC: n}, "keys": {RPC: n}}``: calls per
  RPC and keys touched per RPC (items of a batch, keys of KeysExist, else 1)
- ``reset``      -> ``OK`` (zeroes the statistics)
- anything else  -> ``ERROR <reason>``

:func:`control_request` sends one command and returns the reply line.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import socket
import socketserver
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from momento_wire_types import cacheclient_pb2 as cache_pb
from momento_wire_types import cacheclient_pb2_grpc as cache_grpc
from momento_wire_types import controlclient_pb2 as control_pb
from momento_wire_types import controlclient_pb2_grpc as control_grpc

from mproxy.momento_local.store import (
    CacheExistsError,
    CacheNotFoundError,
    Condition,
    IncrementOverflowError,
    NotAnIntegerError,
    Store,
    StoreError,
    TtlUpdate,
    TtlUpdateResult,
    value_hash,
)

_LOG = logging.getLogger("mproxy.momento_local")

#: Momento's documented item size limit is 5 MB; the SDK caps whole messages at
#: 5,243,000 bytes (momento/internal/_utilities/_grpc_channel_options.py). This
#: server limits key + value to 5 MiB, which any SDK-sent message can reach.
MAX_ITEM_SIZE_BYTES = 5 * 1024 * 1024
#: Momento's documented maximum TTL for on-demand caches (24 h).
DEFAULT_MAX_TTL_SECONDS = 86_400
#: The server accepts messages far above the item limit so that the item limit,
#: not gRPC's 4 MiB default, decides (SetBatch carries many items).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: Worker threads of the gRPC server: the number of RPCs served at once
#: (delayed calls hold a thread while they sleep).
DEFAULT_MAX_WORKERS = 32
#: How often the control port's accept loop checks for shutdown (bounds stop()).
_CONTROL_POLL_SECONDS = 0.05
#: Longest command line the control port reads.
_CONTROL_LINE_LIMIT = 4096

DATA_RPCS = (
    "Get",
    "GetWithHash",
    "GetBatch",
    "Set",
    "SetBatch",
    "SetIf",
    "SetIfHash",
    "SetIfNotExists",
    "Delete",
    "KeysExist",
    "Increment",
    "UpdateTtl",
    "ItemGetTtl",
    "ItemGetType",
)
CONTROL_RPCS = ("CreateCache", "DeleteCache", "ListCaches", "FlushCache")
#: Names a fault rule may target, besides ``*``.
RPC_NAMES = frozenset(DATA_RPCS + CONTROL_RPCS)


# ---- fault injection ---------------------------------------------------------


class FaultSpecError(ValueError):
    """A fault spec that does not parse; carries the offending spec."""

    def __init__(self, spec: str, reason: str) -> None:
        super().__init__(f"bad fault spec {spec!r}: {reason}")
        self.spec = spec


@dataclass(slots=True)
class Fault:
    """One fault rule: for calls of ``rpc`` (or ``*``), sleep ``delay`` and/or fail with ``code``.

    ``remaining`` is the number of calls still affected, ``None`` for forever.
    """

    rpc: str
    delay: float = 0.0
    code: grpc.StatusCode | None = None
    message: str = ""
    remaining: int | None = None

    def matches(self, rpc: str) -> bool:
        """Whether this rule applies to a call of ``rpc`` now."""
        return (self.rpc == "*" or self.rpc == rpc) and self.remaining != 0


def parse_fault(spec: str) -> Fault:
    """Parse ``RPC[:delay=S][:error=STATUS][:count=N][:message=TEXT]`` (see module docstring)."""
    rpc, _, rest = spec.strip().partition(":")
    if rpc != "*" and rpc not in RPC_NAMES:
        raise FaultSpecError(spec, f"unknown RPC {rpc!r}")
    fault = Fault(rpc)
    while rest:
        option, _, value = rest.partition("=")
        if option == "message":
            fault.message = value
            break
        value, _, rest = value.partition(":")
        if option == "delay":
            fault.delay = _option_value(spec, option, value, float)
            if not 0.0 <= fault.delay < 3600.0:
                raise FaultSpecError(spec, "delay must be in [0, 3600) seconds")
        elif option == "count":
            fault.remaining = _option_value(spec, option, value, int)
            if fault.remaining < 1:
                raise FaultSpecError(spec, "count must be at least 1")
        elif option == "error":
            code = grpc.StatusCode.__members__.get(value.upper())
            if code is None or code is grpc.StatusCode.OK:
                raise FaultSpecError(spec, f"error must name a grpc.StatusCode other than OK, got {value!r}")
            fault.code = code
        else:
            raise FaultSpecError(spec, f"unknown option {option!r}")
    if fault.code is None and fault.delay == 0.0:
        raise FaultSpecError(spec, "needs delay=SECONDS or error=STATUS")
    if fault.code is not None and not fault.message:
        fault.message = f"injected fault: {fault.code.name} on {rpc}"
    return fault


_Number = TypeVar("_Number", int, float)


def _option_value(spec: str, option: str, value: str, kind: Callable[[str], _Number]) -> _Number:
    try:
        return kind(value)
    except ValueError as exc:
        raise FaultSpecError(spec, f"bad value for {option!r}: {value!r}") from exc


class FaultInjector:
    """Thread-safe ordered list of :class:`Fault` rules."""

    def __init__(self, faults: Iterable[Fault] = ()) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = list(faults)

    def add(self, fault: Fault | str) -> None:
        """Add a rule, given as a :class:`Fault` or a spec string."""
        rule = parse_fault(fault) if isinstance(fault, str) else fault
        with self._lock:
            self._faults.append(rule)

    def clear(self) -> None:
        """Remove every rule."""
        with self._lock:
            self._faults.clear()

    def take(self, rpc: str) -> tuple[float, Fault | None]:
        """Consume one call of every rule matching ``rpc``; return total delay and first error rule."""
        delay, error = 0.0, None
        with self._lock:
            for fault in self._faults:
                if not fault.matches(rpc):
                    continue
                if fault.remaining is not None:
                    fault.remaining -= 1
                delay += fault.delay
                if error is None and fault.code is not None:
                    error = fault
            self._faults = [f for f in self._faults if f.remaining != 0]
        return delay, error


class CallStats:
    """Per-RPC call and key counters (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: Counter[str] = Counter()
        self._keys: Counter[str] = Counter()

    def record(self, rpc: str, keys: int) -> None:
        """Count one call of ``rpc`` touching ``keys`` keys."""
        with self._lock:
            self._calls[rpc] += 1
            self._keys[rpc] += keys

    def snapshot(self) -> dict[str, dict[str, int]]:
        """``{"calls": {rpc: n}, "keys": {rpc: n}}``."""
        with self._lock:
            return {"calls": dict(self._calls), "keys": dict(self._keys)}

    def reset(self) -> None:
        """Zero every counter."""
        with self._lock:
            self._calls.clear()
            self._keys.clear()


# ---- the gate every call passes ---------------------------------------------


class _Rejection(Exception):
    """A call answered with a non-OK status; raised anywhere below a handler, sent by ``_rpc``."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailers = trailers


def _store_rejection(error: StoreError) -> _Rejection:
    """Momento's status for a store error."""
    if isinstance(error, CacheNotFoundError):
        return _Rejection(grpc.StatusCode.NOT_FOUND, f"Cache not found: {error.cache}")
    if isinstance(error, CacheExistsError):
        return _Rejection(grpc.StatusCode.ALREADY_EXISTS, f"Cache already exists: {error.cache}")
    if isinstance(error, (NotAnIntegerError, IncrementOverflowError)):
        return _Rejection(grpc.StatusCode.FAILED_PRECONDITION, str(error))
    return _Rejection(grpc.StatusCode.INTERNAL, "internal store error")


class _Gate:
    """Statistics, faults, authorization and limits shared by both servicers."""

    def __init__(
        self, store: Store, faults: FaultInjector, stats: CallStats, auth_token: str | None, max_ttl_seconds: int
    ) -> None:
        self.store = store
        self.faults = faults
        self.stats = stats
        self.max_ttl_seconds = max_ttl_seconds
        self._auth_token = auth_token.encode() if auth_token is not None else None

    def admit(self, context: grpc.ServicerContext, rpc: str, keys: int) -> dict[str, str]:
        """Count, inject faults, check authorization; return the call's metadata."""
        self.stats.record(rpc, keys)
        delay, error = self.faults.take(rpc)
        if delay:
            time.sleep(delay)
        if error is not None and error.code is not None:
            raise _Rejection(error.code, error.message)
        metadata = {item.key: item.value for item in context.invocation_metadata() if isinstance(item.value, str)}
        if self._auth_token is not None and not hmac.compare_digest(
            metadata.get("authorization", "").encode(), self._auth_token
        ):
            raise _Rejection(grpc.StatusCode.UNAUTHENTICATED, "Invalid or missing authorization token")
        return metadata

    def check_ttl(self, ttl_ms: int) -> None:
        """Reject a TTL of 0 or above the maximum with INVALID_ARGUMENT."""
        if ttl_ms <= 0:
            raise _Rejection(grpc.StatusCode.INVALID_ARGUMENT, "ttl_milliseconds must be greater than 0")
        if ttl_ms > self.max_ttl_seconds * 1000:
            raise _Rejection(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"TTL of {ttl_ms} ms exceeds the cache's maximum TTL of {self.max_ttl_seconds} seconds",
            )

    @staticmethod
    def check_size(key: bytes, value: bytes) -> None:
        """Reject an item above the size limit as Momento does (RESOURCE_EXHAUSTED + ``err`` trailer)."""
        size = len(key) + len(value)
        if size > MAX_ITEM_SIZE_BYTES:
            raise _Rejection(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Item size limit exceeded: {size} bytes, limit {MAX_ITEM_SIZE_BYTES} bytes",
                (("err", "item_size_limit_exceeded"),),
            )


def _one(_request: Any) -> int:
    return 1


def _rpc(
    name: str, keys: Callable[[Any], int] = _one, data: bool = True
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a servicer method: gate the call, pass the cache name (data calls), send rejections."""

    def decorate(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def handler(self: _Servicer, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                metadata = self.gate.admit(context, name, keys(request))
                args: tuple[str, ...] = ()
                if data:
                    cache = metadata.get("cache")
                    if not cache:
                        raise _Rejection(grpc.StatusCode.INVALID_ARGUMENT, "Missing cache name: set the 'cache' header")
                    args = (cache,)
                try:
                    return method(self, request, context, *args)
                except StoreError as error:
                    raise _store_rejection(error) from error
            except _Rejection as rejection:
                if rejection.trailers:
                    context.set_trailing_metadata(rejection.trailers)
                context.abort(rejection.code, rejection.details)

        return handler

    return decorate


class _Servicer:
    def __init__(self, gate: _Gate) -> None:
        self.gate = gate
        self.store = gate.store


def _present(current: bytes | None) -> bool:
    return current is not None


def _absent(current: bytes | None) -> bool:
    return current is None


def _set_if_condition(request: cache_pb._SetIfRequest) -> Condition:
    kind = request.WhichOneof("condition")
    if kind == "present":
        return _present
    if kind == "absent":
        return _absent
    if kind == "equal":
        expected = request.equal.value_to_check
        return lambda current: current == expected
    if kind == "not_equal":
        other = request.not_equal.value_to_check
        return lambda current: current != other
    if kind == "present_and_not_equal":
        other = request.present_and_not_equal.value_to_check
        return lambda current: current is not None and current != other
    if kind == "absent_or_equal":
        expected = request.absent_or_equal.value_to_check
        return lambda current: current is None or current == expected
    raise _Rejection(grpc.StatusCode.INVALID_ARGUMENT, "SetIf needs a condition")


def _set_if_hash_condition(request: cache_pb._SetIfHashRequest) -> Condition:
    kind = request.WhichOneof("condition")
    if kind == "unconditional":
        return lambda current: True
    if kind == "present_and_hash_equal":
        wanted = request.present_and_hash_equal.hash_to_check
        return lambda current: current is not None and value_hash(current) == wanted
    if kind == "present_and_not_hash_equal":
        other = request.present_and_not_hash_equal.hash_to_check
        return lambda current: current is not None and value_hash(current) != other
    if kind == "absent_or_hash_equal":
        wanted = request.absent_or_hash_equal.hash_to_check
        return lambda current: current is None or value_hash(current) == wanted
    if kind == "absent_or_not_hash_equal":
        other = request.absent_or_not_hash_equal.hash_to_check
        return lambda current: current is None or value_hash(current) != other
    raise _Rejection(grpc.StatusCode.INVALID_ARGUMENT, "SetIfHash needs a condition")


_TTL_MODES = {
    "increase_to_milliseconds": TtlUpdate.INCREASE_TO,
    "decrease_to_milliseconds": TtlUpdate.DECREASE_TO,
    "overwrite_to_milliseconds": TtlUpdate.OVERWRITE_TO,
}


class DataServicer(_Servicer, cache_grpc.ScsServicer):
    """``cache_client.Scs``: scalar data RPCs over a :class:`Store`."""

    @_rpc("Get")
    def Get(self, request: cache_pb._GetRequest, context: grpc.ServicerContext, cache: str) -> cache_pb._GetResponse:
        return _get_response(self.store.get(cache, request.cache_key))

    @_rpc("GetWithHash")
    def GetWithHash(
        self, request: cache_pb._GetWithHashRequest, context: grpc.ServicerContext, cache: str
    ) -> cache_pb._GetWithHashResponse:
        found = self.store.get_with_hash(cache, request.cache_key)
        if found is None:
            return cache_pb._GetWithHashResponse(missing=cache_pb._GetWithHashResponse._Missing())
        value, digest = found
        return cache_pb._GetWithHashResponse(found=cache_pb._GetWithHashResponse._Found(value=value, hash=digest))

    @_rpc("GetBatch", keys=lambda request: len(request.items))
    def GetBatch(
        self, request: cache_pb._GetBatchRequest, context: grpc.ServicerContext, cache: str
    ) -> Iterator[cache_pb._GetResponse]:
        values = self.store.get_many(cache, [item.cache_key for item in request.items])
        return iter([_get_response(value) for value in values])

    @_rpc("Set")
    def Set(self, request: cache_pb._SetRequest, context: grpc.ServicerContext, cache: str) -> cache_pb._SetResponse:
        self._check_item(request)
        self.store.set(cache, request.cache_key, request.cache_body, request.ttl_milliseconds)
        return cache_pb._SetResponse(result=cache_pb.Ok)

    @_rpc("SetBatch", keys=lambda request: len(request.items))
    def SetBatch(
        self, request: cache_pb._SetBatchRequest, context: grpc.ServicerContext, cache: str
    ) -> Iterator[cache_pb._SetResponse]:
        for item in request.items:
            self._check_item(item)
        self.store.set_many(cache, [(i.cache_key, i.cache_body, i.ttl_milliseconds) for i in request.items])
        return iter([cache_pb._SetResponse(result=cache_pb.Ok) for _ in request.items])

    @_rpc("SetIf")
    def SetIf(
        self, request: cache_pb._SetIfRequest, context: grpc.ServicerContext, cache: str
    ) -> cache_pb._SetIfResponse:
        if self._set_if(cache, request, _set_if_condition(request)):
            return cache_pb._SetIfResponse(stored=cache_pb._SetIfResponse._Stored())
        return cache_pb._SetIfResponse(not_stored=cache_pb._SetIfResponse._NotStored())

    @_rpc("SetIfHash")
    def SetIfHash(
        self, request: cache_pb._SetIfHashRequest, context: grpc.ServicerContext, cache: str
    ) -> cache_pb._SetIfHashResponse:
        if self._set_if(cache, request, _set_if_hash_condition(request)):
            stored = cache_pb._SetIfHashResponse._Stored(new_hash=value_hash(request.cache_body))
            return cache_pb._SetIfHashResponse(stored=stored)
        return cache_pb._SetIfHashResponse(not_stored=cache_pb._SetIfHashResponse._NotStored())

    @_rpc("SetIfNotExists")
    def SetIfNotExists(
        self, request: cache_pb._SetIfNotExistsRequest, context: grpc.ServicerContext, cache: str
    ) -> cache_pb._SetIfNotExistsResponse:
        if self._set_if(cache, request, _absent):
            return cache_pb._SetIfNotExistsResponse(stored=cache_pb._SetIfNotExistsResponse._Stored())
        return cache_pb._SetIfNotExistsResponse(not_stored=cache_pb._SetIfNotExistsResponse._NotStored())

    @_rpc("Delete")
    def Delete(
        self, request: cache_pb._DeleteRequest, context: grpc.ServicerContext, cache: str
    ) -> cache_pb._DeleteResponse:
        self.store.delete(cache, request.cache_key)
        return cache_pb._DeleteResponse()

    @_rpc("KeysExist", keys=lambda request: len(request.cache_keys))
    def KeysExist(
        self, request: cache_pb._KeysExistRequest, context: grpc.ServicerContext, cache: str
    ) -> cache_pb._KeysExistResponse:
        return cache_pb._KeysExistResponse(exists=self.store.keys_exist(cache, request.cache_keys))

    @_rpc("Increment")
    def Increment(
        self, request: cache_pb._IncrementRequest, context: grpc.ServicerContext, cache: str
    ) -> cache_pb._IncrementResponse:
        self.gate.check_ttl(request.ttl_milliseconds)
        value = self.store.increment(cache, request.cache_key, request.amount, request.ttl_milliseconds)
        return cache_pb._IncrementResponse(value=value)

    @_rpc("UpdateTtl")
    def UpdateTtl(
        self, request: cache_pb._UpdateTtlRequest, context: grpc.ServicerContext, cache: str
    ) -> cache_pb._UpdateTtlResponse:
        kind = request.WhichOneof("update_ttl")
        if kind is None:
            raise _Rejection(grpc.StatusCode.INVALID_ARGUMENT, "UpdateTtl needs increase_to/decrease_to/overwrite_to")
        ttl_ms: int = getattr(request, kind)
        self.gate.check_ttl(ttl_ms)
        result = self.store.update_ttl(cache, request.cache_key, _TTL_MODES[kind], ttl_ms)
        if result is TtlUpdateResult.SET:
            return cache_pb._UpdateTtlResponse(set=cache_pb._UpdateTtlResponse._Set())
        if result is TtlUpdateResult.NOT_SET:
            return cache_pb._UpdateTtlResponse(not_set=cache_pb._UpdateTtlResponse._NotSet())
        return cache_pb._UpdateTtlResponse(missing=cache_pb._UpdateTtlResponse._Missing())

    @_rpc("ItemGetTtl")
    def ItemGetTtl(
        self, request: cache_pb._ItemGetTtlRequest, context: grpc.ServicerContext, cache: str
    ) -> cache_pb._ItemGetTtlResponse:
        remaining = self.store.remaining_ttl_ms(cache, request.cache_key)
        if remaining is None:
            return cache_pb._ItemGetTtlResponse(missing=cache_pb._ItemGetTtlResponse._Missing())
        found = cache_pb._ItemGetTtlResponse._Found(remaining_ttl_millis=remaining)
        return cache_pb._ItemGetTtlResponse(found=found)

    @_rpc("ItemGetType")
    def ItemGetType(
        self, request: cache_pb._ItemGetTypeRequest, context: grpc.ServicerContext, cache: str
    ) -> cache_pb._ItemGetTypeResponse:
        if not self.store.keys_exist(cache, (request.cache_key,))[0]:
            return cache_pb._ItemGetTypeResponse(missing=cache_pb._ItemGetTypeResponse._Missing())
        found = cache_pb._ItemGetTypeResponse._Found(item_type=cache_pb._ItemGetTypeResponse.SCALAR)
        return cache_pb._ItemGetTypeResponse(found=found)

    def _check_item(self, request: Any) -> None:
        self.gate.check_ttl(request.ttl_milliseconds)
        self.gate.check_size(request.cache_key, request.cache_body)

    def _set_if(self, cache: str, request: Any, condition: Condition) -> bool:
        """Check the request's item, then store it if ``condition`` holds; whether it did."""
        self._check_item(request)
        return self.store.set_if(cache, request.cache_key, request.cache_body, request.ttl_milliseconds, condition)


def _get_response(value: bytes | None) -> cache_pb._GetResponse:
    if value is None:
        return cache_pb._GetResponse(result=cache_pb.Miss)
    return cache_pb._GetResponse(result=cache_pb.Hit, cache_body=value)


class ControlServicer(_Servicer, control_grpc.ScsControlServicer):
    """``control_client.ScsControl``: cache lifecycle."""

    @_rpc("CreateCache", data=False)
    def CreateCache(
        self, request: control_pb._CreateCacheRequest, context: grpc.ServicerContext
    ) -> control_pb._CreateCacheResponse:
        if not request.cache_name:
            raise _Rejection(grpc.StatusCode.INVALID_ARGUMENT, "Cache name must not be empty")
        self.store.create_cache(request.cache_name)
        return control_pb._CreateCacheResponse()

    @_rpc("DeleteCache", data=False)
    def DeleteCache(
        self, request: control_pb._DeleteCacheRequest, context: grpc.ServicerContext
    ) -> control_pb._DeleteCacheResponse:
        self.store.delete_cache(request.cache_name)
        return control_pb._DeleteCacheResponse()

    @_rpc("ListCaches", data=False)
    def ListCaches(
        self, request: control_pb._ListCachesRequest, context: grpc.ServicerContext
    ) -> control_pb._ListCachesResponse:
        limits = control_pb._CacheLimits(
            max_item_size_kb=MAX_ITEM_SIZE_BYTES // 1024, max_ttl_seconds=self.gate.max_ttl_seconds
        )
        caches = [control_pb._Cache(cache_name=name, cache_limits=limits) for name in self.store.list_caches()]
        return control_pb._ListCachesResponse(cache=caches, next_token="")

    @_rpc("FlushCache", data=False)
    def FlushCache(
        self, request: control_pb._FlushCacheRequest, context: grpc.ServicerContext
    ) -> control_pb._FlushCacheResponse:
        self.store.flush_cache(request.cache_name)
        return control_pb._FlushCacheResponse()


# ---- control port ------------------------------------------------------------


class _ControlHandler(socketserver.StreamRequestHandler):
    server: _ControlServer

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


class _ControlServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, host: str, port: int, faults: FaultInjector, stats: CallStats) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.faults = faults
        self.stats = stats
        super().__init__((host, port), _ControlHandler)

    def execute(self, line: str) -> str:
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


# ---- server ------------------------------------------------------------------


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class LocalServer:
    """A running local Momento server: gRPC port, control port, store, faults and stats."""

    def __init__(
        self,
        grpc_server: grpc.Server,
        control: _ControlServer,
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
    ``authorization``; ``faults`` are rules or spec strings (module docstring).
    Raises ``OSError`` when a port cannot be bound.
    """
    if max_ttl_seconds <= 0:
        raise ValueError(f"max_ttl_seconds must be positive, got {max_ttl_seconds}")
    store = Store()
    for name in dict.fromkeys(caches):
        store.create_cache(name)
    injector = FaultInjector(parse_fault(f) if isinstance(f, str) else f for f in faults)
    stats = CallStats()
    gate = _Gate(store, injector, stats, auth_token, max_ttl_seconds)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="momento-local"),
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
        control = _ControlServer(host, control_port, injector, stats)
    except OSError:
        server.stop(None)
        raise
    server.start()
    _LOG.info("momento-local serving on %s", _address(host, bound))
    return LocalServer(server, control, host, bound, store, injector, stats)
