"""The gate every call of the local Momento server passes, and its call statistics.

A servicer method decorated with :func:`rpc` goes through the gate in this
order: statistics, faults, authorization (``authorization`` metadata, only when
a token is configured), then the ``cache`` metadata header for data calls,
then validation. A refusal anywhere below the handler is a :class:`Rejection`:

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
"""

from __future__ import annotations

import functools
import hmac
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc

from mproxy.momento_local.faults import FaultInjector
from mproxy.momento_local.store import (
    CacheExistsError,
    CacheNotFoundError,
    IncrementOverflowError,
    NotAnIntegerError,
    Store,
    StoreError,
)

#: Momento's documented item size limit is 5 MB; the SDK caps whole messages at
#: 5,243,000 bytes (momento/internal/_utilities/_grpc_channel_options.py). This
#: server limits key + value to 5 MiB, which any SDK-sent message can reach.
MAX_ITEM_SIZE_BYTES = 5 * 1024 * 1024
#: Momento's documented maximum TTL for on-demand caches (24 h).
DEFAULT_MAX_TTL_SECONDS = 86_400


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


class Rejection(Exception):
    """A call answered with a non-OK status; raised anywhere below a handler, sent by :func:`rpc`."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailers = trailers


def _store_rejection(error: StoreError) -> Rejection:
    """Momento's status for a store error."""
    if isinstance(error, CacheNotFoundError):
        return Rejection(grpc.StatusCode.NOT_FOUND, f"Cache not found: {error.cache}")
    if isinstance(error, CacheExistsError):
        return Rejection(grpc.StatusCode.ALREADY_EXISTS, f"Cache already exists: {error.cache}")
    if isinstance(error, (NotAnIntegerError, IncrementOverflowError)):
        return Rejection(grpc.StatusCode.FAILED_PRECONDITION, str(error))
    return Rejection(grpc.StatusCode.INTERNAL, "internal store error")


class Gate:
    """Statistics, faults, authorization and limits shared by both services."""

    def __init__(
        self,
        store: Store,
        faults: FaultInjector,
        stats: CallStats,
        auth_token: str | None,
        max_ttl_seconds: int,
        wait: Callable[[float], None] = time.sleep,
    ) -> None:
        """``wait`` sleeps out a fault's delay (the server's :meth:`~.pool.CallPool.wait`)."""
        self.store = store
        self._wait = wait
        self.faults = faults
        self.stats = stats
        self.max_ttl_seconds = max_ttl_seconds
        self._auth_token = auth_token.encode() if auth_token is not None else None

    def admit(self, context: grpc.ServicerContext, rpc: str, keys: int) -> dict[str, str]:
        """Count, inject faults, check authorization; return the call's metadata."""
        self.stats.record(rpc, keys)
        delay, error = self.faults.take(rpc)
        if delay:
            self._wait(delay)
        if error is not None and error.code is not None:
            raise Rejection(error.code, error.message)
        metadata = {key: value for key, value in context.invocation_metadata() if isinstance(value, str)}
        if self._auth_token is not None and not hmac.compare_digest(
            metadata.get("authorization", "").encode(), self._auth_token
        ):
            raise Rejection(grpc.StatusCode.UNAUTHENTICATED, "Invalid or missing authorization token")
        return metadata

    def check_item(self, request: Any) -> None:
        """Reject a request's item (``cache_key``, ``cache_body``, ``ttl_milliseconds``)
        whose TTL or size Momento would refuse."""
        self.check_ttl(request.ttl_milliseconds)
        size = len(request.cache_key) + len(request.cache_body)
        if size > MAX_ITEM_SIZE_BYTES:
            raise Rejection(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Item size limit exceeded: {size} bytes, limit {MAX_ITEM_SIZE_BYTES} bytes",
                (("err", "item_size_limit_exceeded"),),
            )

    def check_ttl(self, ttl_ms: int) -> None:
        """Reject a TTL of 0 or above the maximum with INVALID_ARGUMENT."""
        if ttl_ms <= 0:
            raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "ttl_milliseconds must be greater than 0")
        if ttl_ms > self.max_ttl_seconds * 1000:
            raise Rejection(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"TTL of {ttl_ms} ms exceeds the cache's maximum TTL of {self.max_ttl_seconds} seconds",
            )


class Servicer:
    """Base of both services: the gate and its store."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.store = gate.store


def _one(_request: Any) -> int:
    return 1


def rpc(
    name: str, keys: Callable[[Any], int] = _one, data: bool = True
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make a servicer method the gRPC handler of RPC ``name``, behind the gate.

    The method takes ``(request, cache)`` for a data call (the ``cache``
    header, required) or ``(request)`` for a control call, and returns the
    response. ``keys`` counts the keys of a request for the statistics.
    :class:`Rejection` and store errors become the call's status.
    """

    def decorate(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def handler(self: Servicer, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                metadata = self.gate.admit(context, name, keys(request))
                args: tuple[str, ...] = ()
                if data:
                    cache = metadata.get("cache")
                    if not cache:
                        raise Rejection(grpc.StatusCode.INVALID_ARGUMENT, "Missing cache name: set the 'cache' header")
                    args = (cache,)
                try:
                    return method(self, request, *args)
                except StoreError as error:
                    raise _store_rejection(error) from error
            except Rejection as rejection:
                if rejection.trailers:
                    context.set_trailing_metadata(rejection.trailers)
                context.abort(rejection.code, rejection.details)

        return handler

    return decorate
