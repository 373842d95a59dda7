"""The Momento backend: memcached semantics on Momento Cache's gRPC protocol.

A hybrid of the SDK and the wire protocol:

* The calls the SDK's synchronous ``CacheClient`` (1.29.1) has go through it:
  Get (single key), Set, Delete, SetIfNotExists, FlushCache, CreateCache.
  Its response objects (``CacheGet.Hit``/``Miss``/``Error``, ...) and
  ``Error.error_code`` map to the same :class:`BackendError` codes and
  messages as the raw path (:mod:`.errors`).
* The RPCs the SDK does not wrap (GetBatch, SetIf, SetIfHash, GetWithHash,
  KeysExist, UpdateTtl, ItemGetTtl) go through channels of our own and the
  generated ``momento_wire_types`` stubs, with the metadata the SDK sends
  (``cache``, ``authorization``, ``agent``, ``runtime-version``). Per-key
  Deletes fanned out concurrently (``gat`` with a past exptime) stay there
  too: the synchronous SDK has no futures.

Every command holds one call slot and one :class:`~.transport.Budget` (its
name and deadline) from start to end, however many calls it makes.
Connections, deadlines and the SDK contract: :mod:`.transport`. Layout of
items (flags header, CAS uniques, TTLs): :mod:`.codec`. Command by command RPC
mapping, atomicity and differences from memcached: ``docs/compatibility.md``.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable

import grpc
from momento_wire_types import cacheclient_pb2 as pb
from momento_wire_types import common_pb2

from mproxy.backends.base import (
    COUNTER_MAX,
    BackendError,
    FlushDisabled,
    Item,
    StoreResult,
    ValueTooLarge,
    ttl_seconds,
)
from mproxy.backends.counters import apply_delta
from mproxy.protocol.commands import DEFAULT_MAX_ITEM_SIZE, StoreMode, item_size
from mproxy.backends.momento import codec
from mproxy.backends.momento.endpoint import Endpoint
from mproxy.backends.momento.errors import rpc_error, sdk_error, timeout_error, unexpected_response
from mproxy.backends.momento.meta import MomentoMeta
from mproxy.backends.momento.transport import (
    AGENT_HEADER,
    AUTHORIZATION_HEADER,
    CACHE_HEADER,
    RUNTIME_VERSION_HEADER,
    SDK_CONTROL_TIMEOUT_SECONDS,
    Budget,
    CallSlots,
    Connections,
    gevent_patched,
    prepare_gevent,
    sdk_contract,
    sdk_ttl,
)

log = logging.getLogger(__name__)

#: Largest key + stored value sent to Momento (documented limit: 5 MB item).
#: Larger items raise :class:`ValueTooLarge` without a call; the service's own
#: answer (RESOURCE_EXHAUSTED, item size) is mapped to the same error.
MOMENTO_MAX_ITEM_BYTES = 5 * 1024 * 1024
#: GetBatch calls in flight at once for one multi-get.
GET_BATCH_WINDOW = 8
#: Per-key calls (UpdateTtl, Delete of gat/gats) in flight at once for one command.
FAN_OUT_WINDOW = 64
#: Attempts of a read-modify-write (append, prepend, incr, decr) whose
#: conditional write lost to a concurrent writer, before giving up.
MAX_ATTEMPTS = 8
#: Least timeout given to a call started while others run (it then fails as a timeout).
_MIN_CALL_SECONDS = 0.001


@dataclass(frozen=True, slots=True)
class _Found:
    """A GetWithHash hit: stored bytes and the server's hash of them."""

    stored: bytes
    hash: bytes


class MomentoBackend(MomentoMeta):
    """:class:`mproxy.backends.base.Backend` on one Momento cache.

    ``endpoint`` says where; ``default_ttl``/``max_ttl`` in seconds;
    ``with_flags`` selects the flags encoding (:mod:`.codec`);
    ``max_value_size`` is memcached's ``-I`` (the proxy's ``max_item_size``);
    ``on_close`` runs once when the backend is closed (releases a shared
    embedded server).
    """

    kind = "momento"
    #: Keys one GetBatch call carries; a larger multi-get sends several
    #: batches, :data:`GET_BATCH_WINDOW` at a time.
    max_batch_keys = 100

    def __init__(
        self,
        endpoint: Endpoint,
        cache_name: str,
        *,
        default_ttl: int = 900,
        max_ttl: int = 86400,
        connection_count: int = 1,
        request_timeout: float = 5.0,
        max_in_flight: int = 256,
        with_flags: bool = True,
        allow_flush: bool = True,
        max_value_size: int = DEFAULT_MAX_ITEM_SIZE,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        if connection_count < 1 or max_in_flight < 1 or request_timeout <= 0:
            raise ValueError("connection_count and max_in_flight must be >= 1, request_timeout > 0")
        if default_ttl < 1 or max_ttl < 1:
            raise ValueError("default_ttl and max_ttl must be at least 1 second")
        if endpoint.credentials is None:
            raise ValueError("the endpoint carries no CredentialProvider: build it with Endpoint.from_credentials")
        self.cache_name = cache_name
        self._default_ttl = min(default_ttl, max_ttl)
        self._max_ttl = max_ttl
        self._with_flags = with_flags
        self._allow_flush = allow_flush
        self._max_value_size = max_value_size
        self._on_close = on_close
        self._closed = False
        self._flush_timer: threading.Timer | None = None
        self._slots = CallSlots(max_in_flight, request_timeout)
        if gevent_patched():
            prepare_gevent()  # before the first channel of this process
        sdk = sdk_contract()
        self._data_metadata = (
            (CACHE_HEADER, cache_name),
            (AUTHORIZATION_HEADER, endpoint.auth_token),
            (AGENT_HEADER, f"python:cache:{sdk.version}"),
            (RUNTIME_VERSION_HEADER, f"python {platform.python_version()}"),
        )
        self._endpoint = endpoint
        # the SDK's response classes, looked up once (hot path)
        self._get_hit, self._get_miss = sdk.cache_get.Hit, sdk.cache_get.Miss
        self._stored, self._not_stored = sdk.cache_set_if_not_exists.Stored, sdk.cache_set_if_not_exists.NotStored
        self._success = (sdk.cache_set.Success, sdk.cache_delete.Success, sdk.cache_flush.Success)
        self._created = (sdk.create_cache.Success, sdk.create_cache.CacheAlreadyExists)
        self._sdk_errors = tuple(
            family.Error
            for family in (
                sdk.cache_get, sdk.cache_set, sdk.cache_set_if_not_exists, sdk.cache_delete, sdk.cache_flush,
                sdk.create_cache,
            )
        )
        self._connections = Connections(
            sdk,
            endpoint.credentials,
            endpoint.data_target,
            endpoint.secure,
            connection_count,
            request_timeout,
            self._default_ttl,
        )
        self._next_client = self._connections.next_client
        self._next_stub = self._connections.next_stub

    def __repr__(self) -> str:
        return f"MomentoBackend(cache={self.cache_name!r}, connections={len(self._connections.clients)})"

    # -- Backend ------------------------------------------------------------

    def get_many(self, keys: Sequence[bytes], with_cas: bool = False) -> dict[bytes, Item]:
        """Get for one key, GetBatch (concurrent batches of :attr:`max_batch_keys`) for more.
        The CAS unique (a hash of the stored bytes) is computed for gets only."""
        with self._call("get") as budget:
            found = self._get_values(list(dict.fromkeys(keys)), budget)
        return {key: self._item(stored, with_cas) for key, stored in found.items()}

    def touch_many(self, keys: Sequence[bytes], exptime: int, with_cas: bool = False) -> dict[bytes, Item]:
        """UpdateTtl (overwrite) per key, concurrently with one GetBatch; the
        keys both found are returned. A past exptime: GetBatch, then Delete
        each key found (returned once, then gone, as memcached does)."""
        unique = list(dict.fromkeys(keys))
        ttl_ms = self._ttl_ms(exptime)
        with self._call("touch") as budget:
            if ttl_ms == 0:
                found = self._get_values(unique, budget)
                self._fan_out("Delete", [pb._DeleteRequest(cache_key=key) for key in found], budget)
            else:
                requests = [pb._UpdateTtlRequest(cache_key=key, overwrite_to_milliseconds=ttl_ms) for key in unique]
                # the first window of updates travels with the read: one round trip for a typical gat
                first = [self._start("UpdateTtl", request, budget) for request in requests[:FAN_OUT_WINDOW]]
                try:
                    found = self._get_values(unique, budget)
                except BaseException:
                    for future in first:
                        future.cancel()
                    raise
                touched = self._gather(first, budget)
                touched += self._fan_out("UpdateTtl", requests[FAN_OUT_WINDOW:], budget)
                found = {
                    key: stored
                    for key, response in zip(unique, touched)
                    if response.WhichOneof("result") != "missing" and (stored := found.get(key)) is not None
                }
        return {key: self._item(stored, with_cas) for key, stored in found.items()}

    def store(
        self,
        mode: StoreMode,
        key: bytes,
        value: bytes,
        flags: int,
        exptime: int,
        cas_unique: int = 0,
    ) -> StoreResult:
        """Raises :class:`ValueTooLarge` (saying which limit) without a call
        when the value or the stored item does not fit."""
        stored = codec.encode(value, flags, self._with_flags)
        too_large = self._too_large(key, value, flags, stored)
        if too_large:
            raise ValueTooLarge(too_large)
        with self._call(mode.value) as budget:
            if mode is StoreMode.APPEND or mode is StoreMode.PREPEND:
                return self._concatenate(key, value, mode is StoreMode.APPEND, budget)
            ttl_ms = self._ttl_ms(exptime)
            if mode is StoreMode.SET:
                return self._set(key, stored, ttl_ms, budget)
            if mode is StoreMode.ADD:
                return self._add(key, stored, ttl_ms, budget)
            if mode is StoreMode.REPLACE:
                return self._replace(key, stored, ttl_ms, budget)
            return self._cas(key, stored, ttl_ms, cas_unique, budget)

    def delete(self, key: bytes) -> bool:
        """KeysExist, then the SDK's delete if present (two calls: see docs/compatibility.md)."""
        with self._call("delete") as budget:
            if not self._exists(key, budget):
                return False
            self._sdk_delete(key, budget)
            return True

    def incr_decr(self, key: bytes, delta: int, incr: bool) -> int | None:
        """Read (GetWithHash + ItemGetTtl), compute as memcached, write back with
        SetIfHash on the read hash and the remaining TTL; retried on conflict."""
        if not 0 <= delta <= COUNTER_MAX:
            raise ValueError(f"delta must be a u64, got {delta}")
        with self._call("incr" if incr else "decr") as budget:
            for _ in range(MAX_ATTEMPTS):
                read = self._read_for_update(key, budget)
                if read is None:
                    return None
                found, ttl_ms = read
                value, flags = codec.decode(found.stored, self._with_flags)
                number, value = apply_delta(value, delta, incr)
                new = codec.encode(value, flags, self._with_flags)
                if self._set_if_hash(key, new, ttl_ms, found.hash, budget):
                    return number
            raise self._contention(budget)

    def touch(self, key: bytes, exptime: int) -> bool:
        """UpdateTtl (overwrite). A past exptime: KeysExist, then Delete."""
        ttl_ms = self._ttl_ms(exptime)
        with self._call("touch") as budget:
            if ttl_ms == 0:
                if not self._exists(key, budget):
                    return False
                self._sdk_delete(key, budget)
                return True
            request = pb._UpdateTtlRequest(cache_key=key, overwrite_to_milliseconds=ttl_ms)
            return self._unary("UpdateTtl", request, budget).WhichOneof("result") != "missing"

    @property
    def allow_flush(self) -> bool:
        """False when ``flush_all`` is refused (``allow_flush = false``, memcached ``-F``)."""
        return self._allow_flush

    def flush_all(self, delay: int = 0) -> None:
        """FlushCache on the control API, now or from a timer ``delay`` seconds
        from now. A later flush_all replaces a pending delayed one."""
        if not self._allow_flush:
            raise FlushDisabled("flush_all is disabled for this cache")
        seconds = ttl_seconds(delay)
        self._cancel_flush()
        if seconds is None or seconds <= 0:
            self._flush()
            return
        timer = threading.Timer(seconds, self._delayed_flush)
        timer.daemon = True
        self._flush_timer = timer
        timer.start()

    def stats(self) -> dict[str, int]:
        """No item figures: Momento does not say how many items or bytes a cache holds."""
        return {}

    def close(self) -> None:
        """Cancel a pending flush, close the clients and channels, release an embedded server."""
        if self._closed:
            return
        self._closed = True
        self._cancel_flush()
        self._connections.close()
        if self._on_close is not None:
            self._on_close()

    # -- setup --------------------------------------------------------------

    def create_cache(self, timeout: float) -> None:
        """The SDK's ``create_cache`` (an existing cache is fine), after waiting
        up to ``timeout`` seconds for the server to come up (when control and
        data share the endpoint: local servers). Used with local servers only."""
        op = "create_cache"
        if self._endpoint.control_target == self._endpoint.data_target and not self._connections.wait_ready(timeout):
            raise timeout_error(op, timeout)
        response = self._connections.clients[0].create_cache(self.cache_name)
        if not isinstance(response, self._created):
            raise self._sdk_failure(response, op, SDK_CONTROL_TIMEOUT_SECONDS)

    # -- the operations of store() ------------------------------------------

    def _set(self, key: bytes, stored: bytes, ttl_ms: int, budget: Budget) -> StoreResult:
        if ttl_ms == 0:
            self._sdk_delete(key, budget)
        else:
            self._sdk_call("set", budget, key, stored, sdk_ttl(ttl_ms))
        return StoreResult.STORED

    def _add(self, key: bytes, stored: bytes, ttl_ms: int, budget: Budget) -> StoreResult:
        if ttl_ms == 0:
            return StoreResult.NOT_STORED if self._exists(key, budget) else StoreResult.STORED
        response = self._sdk_call("set_if_not_exists", budget, key, stored, sdk_ttl(ttl_ms))
        if isinstance(response, self._stored):
            return StoreResult.STORED
        if isinstance(response, self._not_stored):
            return StoreResult.NOT_STORED
        raise unexpected_response(response, budget.op)

    def _replace(self, key: bytes, stored: bytes, ttl_ms: int, budget: Budget) -> StoreResult:
        if ttl_ms == 0:
            if not self._exists(key, budget):
                return StoreResult.NOT_STORED
            self._sdk_delete(key, budget)
            return StoreResult.STORED
        request = pb._SetIfRequest(
            cache_key=key, cache_body=stored, ttl_milliseconds=ttl_ms, present=common_pb2.Present()
        )
        response = self._unary("SetIf", request, budget)
        return StoreResult.STORED if response.WhichOneof("result") == "stored" else StoreResult.NOT_STORED

    def _cas(self, key: bytes, stored: bytes, ttl_ms: int, cas_unique: int, budget: Budget) -> StoreResult:
        found = self._get_with_hash(key, budget)
        if found is None:
            return StoreResult.NOT_FOUND
        if codec.cas_unique(found.stored) != cas_unique:
            return StoreResult.EXISTS
        if ttl_ms == 0:
            self._sdk_delete(key, budget)
            return StoreResult.STORED
        if self._set_if_hash(key, stored, ttl_ms, found.hash, budget):
            return StoreResult.STORED
        return StoreResult.EXISTS if self._exists(key, budget) else StoreResult.NOT_FOUND

    def _concatenate(self, key: bytes, data: bytes, append: bool, budget: Budget) -> StoreResult:
        for _ in range(MAX_ATTEMPTS):
            read = self._read_for_update(key, budget)
            if read is None:
                return StoreResult.NOT_STORED
            found, ttl_ms = read
            value, flags = codec.decode(found.stored, self._with_flags)
            value = value + data if append else data + value
            new = codec.encode(value, flags, self._with_flags)
            if self._too_large(key, value, flags, new):
                return StoreResult.NOT_STORED  # memcached: an append that would not fit
            if self._set_if_hash(key, new, ttl_ms, found.hash, budget):
                return StoreResult.STORED
        raise self._contention(budget)

    # -- reads and conditional writes -------------------------------------------

    def _read_for_update(self, key: bytes, budget: Budget) -> tuple[_Found, int] | None:
        """GetWithHash and ItemGetTtl, concurrently: the item and its remaining
        TTL in ms, or None if missing. If the item changes between the two
        reads, the conditional write that follows fails and is retried."""
        ttl_call = self._start("ItemGetTtl", pb._ItemGetTtlRequest(cache_key=key), budget)
        try:
            found = self._get_with_hash(key, budget)
        except BaseException:
            ttl_call.cancel()
            raise
        ttl_response = self._gather([ttl_call], budget)[0]
        if found is None or ttl_response.WhichOneof("result") != "found":
            return None
        return found, max(1, ttl_response.found.remaining_ttl_millis)

    def _get_with_hash(self, key: bytes, budget: Budget) -> _Found | None:
        response = self._unary("GetWithHash", pb._GetWithHashRequest(cache_key=key), budget)
        if response.WhichOneof("result") != "found":
            return None
        return _Found(response.found.value, response.found.hash)

    def _set_if_hash(self, key: bytes, stored: bytes, ttl_ms: int, expected: bytes, budget: Budget) -> bool:
        request = pb._SetIfHashRequest(
            cache_key=key,
            cache_body=stored,
            ttl_milliseconds=ttl_ms,
            present_and_hash_equal=common_pb2.PresentAndHashEqual(hash_to_check=expected),
        )
        return bool(self._unary("SetIfHash", request, budget).WhichOneof("result") == "stored")

    def _exists(self, key: bytes, budget: Budget) -> bool:
        response = self._unary("KeysExist", pb._KeysExistRequest(cache_keys=[key]), budget)
        return bool(response.exists and response.exists[0])

    def _get_values(self, keys: list[bytes], budget: Budget) -> dict[bytes, bytes]:
        """Stored bytes of the present keys (``keys`` without duplicates)."""
        if not keys:
            return {}
        if len(keys) == 1:
            value = self._sdk_get(keys[0], budget)
            return {} if value is None else {keys[0]: value}
        size = self.max_batch_keys
        batches = [keys[i : i + size] for i in range(0, len(keys), size)]
        found: dict[bytes, bytes] = {}
        for start in range(0, len(batches), GET_BATCH_WINDOW):
            window = batches[start : start + GET_BATCH_WINDOW]
            streams = [
                self._next_stub().GetBatch(
                    pb._GetBatchRequest(items=[pb._GetRequest(cache_key=key) for key in batch]),
                    metadata=self._data_metadata,
                    timeout=budget.remaining(),
                )
                for batch in window
            ]
            try:
                for batch, stream in zip(window, streams):
                    found.update(_hits(batch, list(stream), budget.op))
            except BaseException as exc:
                for stream in streams:
                    stream.cancel()
                if isinstance(exc, grpc.RpcError):
                    raise rpc_error(exc, budget.op, budget.timeout) from None
                raise
        return found

    # -- calls -------------------------------------------------------------------

    def _call(self, op: str) -> AbstractContextManager[Budget]:
        """One backend command: a slot of ``max_in_flight`` and the command's :class:`Budget`."""
        if self._closed:
            raise BackendError("unavailable", f"momento unavailable on {op}: the backend is closed")
        return self._slots.take(op)

    def _sdk_call(self, method: str, budget: Budget, *args: Any) -> Any:
        """One call of the next ``CacheClient``; its ``Error`` response raised as ours."""
        budget.remaining()  # the slot wait may have used the whole budget
        response = getattr(self._next_client(), method)(self.cache_name, *args)
        if isinstance(response, self._sdk_errors):
            raise sdk_error(response, budget.op, budget.timeout)
        return response

    def _sdk_get(self, key: bytes, budget: Budget) -> bytes | None:
        response = self._sdk_call("get", budget, key)
        if isinstance(response, self._get_hit):
            value: bytes = response.value_bytes
            return value
        if isinstance(response, self._get_miss):
            return None
        raise unexpected_response(response, budget.op)

    def _sdk_delete(self, key: bytes, budget: Budget) -> None:
        response = self._sdk_call("delete", budget, key)
        if not isinstance(response, self._success):
            raise unexpected_response(response, budget.op)

    def _sdk_failure(self, response: Any, op: str, timeout: float) -> BackendError | ValueTooLarge:
        if isinstance(response, self._sdk_errors):
            return sdk_error(response, op, timeout)
        return unexpected_response(response, op)

    def _unary(self, method: str, request: Any, budget: Budget) -> Any:
        """One blocking unary call on the next connection."""
        try:
            return getattr(self._next_stub(), method)(
                request, metadata=self._data_metadata, timeout=budget.remaining()
            )
        except grpc.RpcError as err:
            raise rpc_error(err, budget.op, budget.timeout) from None

    def _start(self, method: str, request: Any, budget: Budget) -> Any:
        """Start a unary call without waiting (a ``grpc.Future``); see :meth:`_gather`.
        A call started after the deadline fails as a timeout when gathered."""
        timeout = max(budget.deadline - time.monotonic(), _MIN_CALL_SECONDS)
        return getattr(self._next_stub(), method).future(request, metadata=self._data_metadata, timeout=timeout)

    def _fan_out(self, method: str, requests: list[Any], budget: Budget) -> list[Any]:
        """Results of one call per request, :data:`FAN_OUT_WINDOW` in flight at a time."""
        results: list[Any] = []
        for start in range(0, len(requests), FAN_OUT_WINDOW):
            window = requests[start : start + FAN_OUT_WINDOW]
            results += self._gather([self._start(method, request, budget) for request in window], budget)
        return results

    def _gather(self, futures: list[Any], budget: Budget) -> list[Any]:
        """Results of started calls; on the first failure cancel the rest and raise."""
        try:
            return [future.result() for future in futures]
        except grpc.RpcError as err:
            for future in futures:
                future.cancel()
            raise rpc_error(err, budget.op, budget.timeout) from None

    # -- items -------------------------------------------------------------------

    def _item(self, stored: bytes, with_cas: bool = True) -> Item:
        value, flags = codec.decode(stored, self._with_flags)
        return Item(value, flags, codec.cas_unique(stored) if with_cas else 0)

    def _too_large(self, key: bytes, value: bytes, flags: int, stored: bytes) -> str:
        """Why an item does not fit (``max_item_size``, counted as memcached counts an item, or
        Momento's item limit), or ``""``."""
        size = item_size(key, len(value), flags)
        if size > self._max_value_size:
            return f"item of {size} bytes (memcached's count) is above max_item_size ({self._max_value_size} bytes)"
        if len(key) + len(stored) > MOMENTO_MAX_ITEM_BYTES:
            return f"item of {len(key) + len(stored)} bytes is above Momento's {MOMENTO_MAX_ITEM_BYTES}-byte item limit"
        return ""

    def _ttl_ms(self, exptime: int) -> int:
        return codec.ttl_milliseconds(exptime, self._default_ttl, self._max_ttl)

    @staticmethod
    def _contention(budget: Budget) -> BackendError:
        return BackendError(
            "contention",
            f"momento contention on {budget.op}: the item kept changing, gave up after {MAX_ATTEMPTS} attempts",
        )

    # -- flush ---------------------------------------------------------------

    def _flush(self) -> None:
        with self._call("flush_all") as budget:
            budget.remaining()
            response = self._connections.clients[0].flush_cache(self.cache_name)  # the SDK's control deadline
            if not isinstance(response, self._success):
                raise self._sdk_failure(response, budget.op, SDK_CONTROL_TIMEOUT_SECONDS)

    def _delayed_flush(self) -> None:
        try:
            self._flush()
        except BackendError as err:
            log.warning("delayed flush_all of cache %s failed: %s", self.cache_name, err)

    def _cancel_flush(self) -> None:
        timer, self._flush_timer = self._flush_timer, None
        if timer is not None:
            timer.cancel()


def _hits(keys: Sequence[bytes], responses: Sequence[Any], op: str) -> dict[bytes, bytes]:
    """Stored bytes of the hits among one GetBatch's answers (one per key, in order)."""
    if len(responses) != len(keys):
        raise BackendError(
            "internal", f"momento internal error on {op}: GetBatch answered {len(responses)} of {len(keys)} keys"
        )
    found: dict[bytes, bytes] = {}
    for key, response in zip(keys, responses):
        if response.result == pb.Hit:
            found[key] = response.cache_body
        elif response.result != pb.Miss:
            raise BackendError("internal", f"momento internal error on {op}: unexpected get result {response.result}")
    return found
