"""The Momento backend: memcached semantics on Momento Cache's gRPC protocol.

Every data call is an RPC of the generated ``momento_wire_types`` stubs on
the cache's :class:`~.transport.Connection` (``grpc.aio`` on a real thread,
bridged to the hub: :mod:`.aio`), with the metadata the SDK sends; the SDK
serves credentials, configuration and the control calls (FlushCache,
CreateCache). Per command:

* gets, one key or many, from every connection go through one
  :class:`~.batcher.GetBatcher` (coalesced into ``GetBatch`` calls,
  single-flight per key); plain sets through one :class:`~.batcher.SetBatcher`
  (``SetBatch``); every other command makes its own calls;
* a command has one :class:`~.flow.Budget` (``request_timeout``) for all its
  waits; each RPC holds a call slot of ``max_in_flight`` until it ends;
* a command that writes takes its turn on each key it writes
  (:class:`~.flow.KeyOrder`) first: it starts once every earlier write of the
  key has ended at the RPC level, and its write RPCs run to their own
  deadline (:attr:`MomentoBackend.write_timeout`) even if its client gave up;
  when they end, later gets of the key no longer join a read sent before.

Layout of items (flags header, CAS uniques, TTLs): :mod:`.codec`. Command by
command RPC mapping, atomicity and differences from memcached:
``docs/compatibility.md``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

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
from mproxy.backends.momento import codec
from mproxy.backends.momento.batcher import GetBatcher, SetBatcher
from mproxy.backends.momento.bridge import PendingCall
from mproxy.backends.momento.endpoint import Endpoint
from mproxy.backends.momento.errors import rpc_error, sdk_error, timeout_error, unexpected_response
from mproxy.backends.momento.flow import Budget, KeyOrder, Slots, Turns
from mproxy.backends.momento.meta import MomentoMeta
from mproxy.backends.momento.transport import (
    IDEMPOTENT_RPCS,
    SDK_CONTROL_TIMEOUT_SECONDS,
    SDK_MAX_RETRIES,
    Connection,
    data_metadata,
    sdk_contract,
)
from mproxy.protocol.commands import DEFAULT_MAX_ITEM_SIZE, StoreMode, item_size

log = logging.getLogger(__name__)

#: Largest key + stored value sent to Momento (documented limit: 5 MB item).
#: Larger items raise :class:`ValueTooLarge` without a call; the service's own
#: answer (RESOURCE_EXHAUSTED, item size) is mapped to the same error.
MOMENTO_MAX_ITEM_BYTES = 5 * 1024 * 1024
#: Batches of gets (and of sets) in flight at once per data connection: while
#: that many are in flight, new keys wait and leave together in the next one.
BATCHES_PER_CONNECTION = 2
#: Keys waiting to leave in each batcher, at most (callers wait for room).
MAX_PENDING_KEYS = 2000
#: Bytes of values one SetBatch carries at most; a larger item goes alone (Set).
SET_BATCH_MAX_BYTES = 1024 * 1024
#: Per-key calls (UpdateTtl, Delete of gat/gats) in flight at once for one command.
FAN_OUT_WINDOW = 64
#: Attempts of a read-modify-write (append, prepend, incr, decr) whose
#: conditional write lost to a concurrent writer, before giving up.
MAX_ATTEMPTS = 8
#: A write RPC's own gRPC deadline: this many seconds, or twice ``request_timeout``
#: if longer. Its client still gets its answer within ``request_timeout``; the RPC
#: runs on, and the next write of the key waits for it (docs/compatibility.md).
WRITE_TIMEOUT_SECONDS = 10.0
#: How long closing the backend lets RPCs in flight finish before cancelling them.
CLOSE_GRACE_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class _Found:
    """A GetWithHash hit: stored bytes and the server's hash of them."""

    stored: bytes
    hash: bytes


class MomentoBackend(MomentoMeta):
    """:class:`mproxy.backends.base.Backend` on one Momento cache.

    ``endpoint`` says where; ``default_ttl``/``max_ttl`` in seconds;
    ``connection_count`` data connections; ``max_in_flight`` RPCs at once;
    ``with_flags`` selects the flags encoding (:mod:`.codec`);
    ``max_value_size`` is memcached's ``-I`` (the proxy's ``max_item_size``);
    ``on_close`` runs once when the backend is closed (releases a shared
    embedded server). Create it in the serving process: it starts gRPC.
    """

    kind = "momento"
    #: Keys one GetBatch call carries; a larger multi-get spans several batches.
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
        self.request_timeout = request_timeout
        #: the gRPC deadline of a write RPC (see :data:`WRITE_TIMEOUT_SECONDS`)
        self.write_timeout = max(WRITE_TIMEOUT_SECONDS, 2 * request_timeout)
        self._default_ttl = min(default_ttl, max_ttl)
        self._max_ttl = max_ttl
        self._with_flags = with_flags
        self._allow_flush = allow_flush
        self._max_value_size = max_value_size
        self._on_close = on_close
        self._closed = False
        self._flush_timer: threading.Timer | None = None
        self._endpoint = endpoint
        sdk = sdk_contract()
        self._metadata = data_metadata(sdk, cache_name, endpoint.auth_token)
        self._flushed = sdk.cache_flush.Success
        self._created = (sdk.create_cache.Success, sdk.create_cache.CacheAlreadyExists)
        self._sdk_errors = (sdk.cache_flush.Error, sdk.create_cache.Error)
        #: RPCs sent and keys they carried, by RPC name (:meth:`stats`)
        self.rpc_calls: dict[str, int] = {}
        self.rpc_keys: dict[str, int] = {}
        self._slots = Slots(max_in_flight)
        window = BATCHES_PER_CONNECTION * connection_count
        self._gets = GetBatcher(self._submit, self._slots, window, self.max_batch_keys, MAX_PENDING_KEYS)
        self._sets = SetBatcher(
            self._submit, self._slots, window, self.max_batch_keys, MAX_PENDING_KEYS, SET_BATCH_MAX_BYTES,
            self.write_timeout,
        )
        self._order = KeyOrder(self._gets.forget)
        self._connection = Connection(sdk, endpoint, connection_count, request_timeout, self._default_ttl)

    def __repr__(self) -> str:
        return f"MomentoBackend(cache={self.cache_name!r}, connections={self._connection.transport.channel_count})"

    # -- Backend ------------------------------------------------------------

    def get_many(self, keys: Sequence[bytes], with_cas: bool = False) -> dict[bytes, Item]:
        """Through the get batcher (single-flight, coalesced). The CAS unique
        (a hash of the stored bytes) is computed for gets only."""
        budget = self._budget("get")
        found = self._gets.read(keys if len(keys) == 1 else list(dict.fromkeys(keys)), budget)
        self._accesses.fetched(found)
        return {key: self._item(stored, with_cas) for key, stored in found.items()}

    def touch_many(self, keys: Sequence[bytes], exptime: int, with_cas: bool = False) -> dict[bytes, Item]:
        """UpdateTtl (overwrite) per key, concurrently with the read; the keys
        both found are returned. A past exptime: the read, then Delete each key
        found (returned once, then gone, as memcached does)."""
        found = self._touch_stored(keys, exptime)
        self._accesses.fetched(found)
        return {key: self._item(stored, with_cas) for key, stored in found.items()}

    def _touch_stored(self, keys: Sequence[bytes], exptime: int) -> dict[bytes, bytes]:
        """:meth:`touch_many`'s calls: the stored bytes of the keys touched."""
        unique = list(dict.fromkeys(keys))
        ttl_ms = self._ttl_ms(exptime)
        budget = self._budget("touch")
        with self._order.take(unique, budget) as turns:
            if ttl_ms == 0:
                found = self._gets.read(unique, budget)
                self._fan_out("Delete", [pb._DeleteRequest(cache_key=key) for key in found], budget, turns)
            else:
                requests = [pb._UpdateTtlRequest(cache_key=key, overwrite_to_milliseconds=ttl_ms) for key in unique]
                # the first window of updates travels with the read: one round trip for a typical gat
                first = [self._rpc("UpdateTtl", request, budget, turns) for request in requests[:FAN_OUT_WINDOW]]
                found = self._gets.read(unique, budget)
                touched = [self._outcome(call, budget) for call in first]
                touched += self._fan_out("UpdateTtl", requests[FAN_OUT_WINDOW:], budget, turns)
                found = {
                    key: stored
                    for key, response in zip(unique, touched)
                    if response.WhichOneof("result") != "missing" and (stored := found.get(key)) is not None
                }
        return found

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
        result = self._store(mode, key, value, flags, exptime, cas_unique)
        if result is StoreResult.STORED:
            self._accesses.written(key)
        return result

    def _store(
        self, mode: StoreMode, key: bytes, value: bytes, flags: int, exptime: int, cas_unique: int
    ) -> StoreResult:
        stored = codec.encode(value, flags, self._with_flags)
        too_large = self._too_large(key, value, flags, stored)
        if too_large:
            raise ValueTooLarge(too_large)
        budget = self._budget(mode.value)
        with self._order.take((key,), budget) as turns:
            if mode is StoreMode.APPEND or mode is StoreMode.PREPEND:
                return self._concatenate(key, value, mode is StoreMode.APPEND, budget, turns)[0]
            ttl_ms = self._ttl_ms(exptime)
            if mode is StoreMode.SET:
                if ttl_ms == 0:
                    self._delete(key, budget, turns)
                else:
                    self._sets.write(key, stored, ttl_ms, turns, budget)
                return StoreResult.STORED
            if mode is StoreMode.ADD:
                return self._add(key, stored, ttl_ms, budget, turns)
            if mode is StoreMode.REPLACE:
                return self._replace(key, stored, ttl_ms, budget, turns)
            return self._cas(key, stored, ttl_ms, cas_unique, budget, turns)

    def stored_cas(self, value: bytes, flags: int) -> int:
        """The content unique of the stored bytes (:mod:`.codec`): no call."""
        return codec.cas_unique(codec.encode(value, flags, self._with_flags))

    def delete(self, key: bytes) -> bool:
        """KeysExist, then Delete if present (two calls: see docs/compatibility.md)."""
        budget = self._budget("delete")
        with self._order.take((key,), budget) as turns:
            if not self._exists(key, budget):
                return False
            self._delete(key, budget, turns)
            self._accesses.forget(key)
            return True

    def incr_decr(self, key: bytes, delta: int, incr: bool) -> int | None:
        """Read (GetWithHash + ItemGetTtl), compute as memcached, write back with
        SetIfHash on the read hash and the remaining TTL; retried on conflict."""
        if not 0 <= delta <= COUNTER_MAX:
            raise ValueError(f"delta must be a u64, got {delta}")
        budget = self._budget("incr" if incr else "decr")
        with self._order.take((key,), budget) as turns:
            for _ in range(MAX_ATTEMPTS):
                read = self._read_for_update(key, budget)
                if read is None:
                    return None
                found, ttl_ms = read
                value, flags = codec.decode(found.stored, self._with_flags)
                number, value = apply_delta(value, delta, incr)
                new = codec.encode(value, flags, self._with_flags)
                if self._set_if_hash(key, new, ttl_ms, found.hash, budget, turns):
                    return number
            raise self._contention(budget)

    def touch(self, key: bytes, exptime: int) -> bool:
        """UpdateTtl (overwrite). A past exptime: KeysExist, then Delete."""
        ttl_ms = self._ttl_ms(exptime)
        budget = self._budget("touch")
        with self._order.take((key,), budget) as turns:
            if ttl_ms == 0:
                if not self._exists(key, budget):
                    return False
                self._delete(key, budget, turns)
                return True
            request = pb._UpdateTtlRequest(cache_key=key, overwrite_to_milliseconds=ttl_ms)
            response = self._outcome(self._rpc("UpdateTtl", request, budget, turns), budget)
            touched = response.WhichOneof("result") != "missing"
            if touched:
                self._accesses.fetched((key,))
            return touched

    def remaining_ttl(self, keys: Sequence[bytes]) -> dict[bytes, float | None]:
        """Seconds each present key has left (never None: every Momento item
        expires), changing nothing; absent keys are left out. ItemGetTtl per key,
        :data:`FAN_OUT_WINDOW` at a time, on call slots, within one command's budget
        (op ``ttl`` in errors)."""
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        budget = self._budget("ttl")
        responses = self._fan_out("ItemGetTtl", [pb._ItemGetTtlRequest(cache_key=key) for key in unique], budget)
        return {
            key: response.found.remaining_ttl_millis / 1000.0
            for key, response in zip(unique, responses)
            if response.WhichOneof("result") == "found"
        }

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
        """The calls made (no item figures: Momento does not say how many items or
        bytes a cache holds): per RPC name ``backend_rpc_<name>_calls`` and
        ``_keys``, ``backend_rpc_retries``, and the gauges
        ``backend_rpc_in_flight`` (RPCs holding a call slot) and
        ``backend_rpc_writes_in_flight`` (keys with a write in flight or waiting
        for an earlier one)."""
        out: dict[str, int] = {}
        for name, calls in self.rpc_calls.items():
            snake = _snake(name)
            out[f"backend_rpc_{snake}_calls"] = calls
            out[f"backend_rpc_{snake}_keys"] = self.rpc_keys.get(name, 0)
        out["backend_rpc_retries"] = self._connection.transport.retries
        out["backend_rpc_in_flight"] = self._slots.in_flight
        out["backend_rpc_writes_in_flight"] = self._order.keys_held
        return out

    def close(self) -> None:
        """Cancel a pending flush, close the connection (RPCs in flight get
        :data:`CLOSE_GRACE_SECONDS` to end), release an embedded server."""
        if self._closed:
            return
        self._closed = True
        self._cancel_flush()
        try:
            self._connection.close(CLOSE_GRACE_SECONDS)
        finally:
            if self._on_close is not None:
                self._on_close()

    # -- setup --------------------------------------------------------------

    def create_cache(self, timeout: float) -> None:
        """The SDK's ``create_cache`` (an existing cache is fine), after waiting
        up to ``timeout`` seconds for the server to come up (when control and
        data share the endpoint: local servers). Used with local servers only."""
        op = "create_cache"
        if self._endpoint.control_target == self._endpoint.data_target and not self._connection.wait_ready(timeout):
            raise timeout_error(op, timeout)
        response = self._connection.control("create_cache", self.cache_name)
        if not isinstance(response, self._created):
            raise self._sdk_failure(response, op)

    # -- the operations of store() ------------------------------------------

    def _add(self, key: bytes, stored: bytes, ttl_ms: int, budget: Budget, turns: Turns) -> StoreResult:
        if ttl_ms == 0:
            return StoreResult.NOT_STORED if self._exists(key, budget) else StoreResult.STORED
        request = pb._SetIfNotExistsRequest(cache_key=key, cache_body=stored, ttl_milliseconds=ttl_ms)
        response = self._outcome(self._rpc("SetIfNotExists", request, budget, turns), budget)
        return StoreResult.STORED if response.WhichOneof("result") == "stored" else StoreResult.NOT_STORED

    def _replace(self, key: bytes, stored: bytes, ttl_ms: int, budget: Budget, turns: Turns) -> StoreResult:
        if ttl_ms == 0:
            if not self._exists(key, budget):
                return StoreResult.NOT_STORED
            self._delete(key, budget, turns)
            return StoreResult.STORED
        request = pb._SetIfRequest(
            cache_key=key, cache_body=stored, ttl_milliseconds=ttl_ms, present=common_pb2.Present()
        )
        response = self._outcome(self._rpc("SetIf", request, budget, turns), budget)
        return StoreResult.STORED if response.WhichOneof("result") == "stored" else StoreResult.NOT_STORED

    def _cas(
        self, key: bytes, stored: bytes, ttl_ms: int, cas_unique: int, budget: Budget, turns: Turns
    ) -> StoreResult:
        found = self._get_with_hash(key, budget)
        if found is None:
            return StoreResult.NOT_FOUND
        if codec.cas_unique(found.stored) != cas_unique:
            return StoreResult.EXISTS
        if ttl_ms == 0:
            self._delete(key, budget, turns)
            return StoreResult.STORED
        if self._set_if_hash(key, stored, ttl_ms, found.hash, budget, turns):
            return StoreResult.STORED
        return StoreResult.EXISTS if self._exists(key, budget) else StoreResult.NOT_FOUND

    def _concatenate(
        self, key: bytes, data: bytes, append: bool, budget: Budget, turns: Turns, cas_unique: int = 0
    ) -> tuple[StoreResult, bytes]:
        """Append or prepend (compared with ``cas_unique`` unless 0): the result and
        the stored bytes written (``b""`` when not stored)."""
        for _ in range(MAX_ATTEMPTS):
            read = self._read_for_update(key, budget)
            if read is None:
                return StoreResult.NOT_STORED, b""
            found, ttl_ms = read
            if cas_unique and codec.cas_unique(found.stored) != cas_unique:
                return StoreResult.EXISTS, b""
            value, flags = codec.decode(found.stored, self._with_flags)
            value = value + data if append else data + value
            new = codec.encode(value, flags, self._with_flags)
            if self._too_large(key, value, flags, new):
                return StoreResult.NOT_STORED, b""  # memcached: an append that would not fit
            if self._set_if_hash(key, new, ttl_ms, found.hash, budget, turns):
                return StoreResult.STORED, new
        raise self._contention(budget)

    # -- reads and conditional writes -------------------------------------------

    def _read_for_update(self, key: bytes, budget: Budget) -> tuple[_Found, int] | None:
        """GetWithHash and ItemGetTtl, concurrently: the item and its remaining
        TTL in ms, or None if missing. If the item changes between the two
        reads, the conditional write that follows fails and is retried."""
        ttl_call = self._rpc("ItemGetTtl", pb._ItemGetTtlRequest(cache_key=key), budget)
        try:
            found = self._get_with_hash(key, budget)
        except BaseException:
            ttl_call.cancel()
            raise
        ttl_response = self._outcome(ttl_call, budget)
        if found is None or ttl_response.WhichOneof("result") != "found":
            return None
        return found, max(1, ttl_response.found.remaining_ttl_millis)

    def _get_with_hash(self, key: bytes, budget: Budget) -> _Found | None:
        call = self._rpc("GetWithHash", pb._GetWithHashRequest(cache_key=key), budget)
        response = self._outcome(call, budget)
        if response.WhichOneof("result") != "found":
            return None
        return _Found(response.found.value, response.found.hash)

    def _set_if_hash(
        self, key: bytes, stored: bytes, ttl_ms: int, expected: bytes, budget: Budget, turns: Turns
    ) -> bool:
        request = pb._SetIfHashRequest(
            cache_key=key,
            cache_body=stored,
            ttl_milliseconds=ttl_ms,
            present_and_hash_equal=common_pb2.PresentAndHashEqual(hash_to_check=expected),
        )
        response = self._outcome(self._rpc("SetIfHash", request, budget, turns), budget)
        return bool(response.WhichOneof("result") == "stored")

    def _exists(self, key: bytes, budget: Budget) -> bool:
        response = self._outcome(self._rpc("KeysExist", pb._KeysExistRequest(cache_keys=[key]), budget), budget)
        return bool(response.exists and response.exists[0])

    def _delete(self, key: bytes, budget: Budget, turns: Turns) -> None:
        self._outcome(self._rpc("Delete", pb._DeleteRequest(cache_key=key), budget, turns), budget)

    # -- calls -------------------------------------------------------------------

    def _budget(self, op: str) -> Budget:
        """The :class:`Budget` of one backend command."""
        if self._closed:
            raise BackendError("unavailable", f"momento unavailable on {op}: the backend is closed")
        return Budget(op, time.monotonic() + self.request_timeout, self.request_timeout)

    def _submit(self, method: str, request: Any, keys: int, deadline: float) -> PendingCall:
        """Start one RPC (counted, with its keys; idempotent ones retried). The caller holds a slot."""
        calls = self.rpc_calls
        calls[method] = calls.get(method, 0) + 1
        counts = self.rpc_keys
        counts[method] = counts.get(method, 0) + keys
        retry = SDK_MAX_RETRIES if method in IDEMPOTENT_RPCS else 0
        call = self._connection.submit(method, request, self._metadata, deadline, retry)
        assert isinstance(call, PendingCall), "the backend is used from the thread that created it"
        return call

    def _rpc(self, method: str, request: Any, budget: Budget, turns: Turns | None = None) -> PendingCall:
        """Start one RPC on a call slot (waited for within ``budget``). A read
        gets the command's deadline; a write (``turns`` given) its own
        :attr:`write_timeout`, and the command's turns last until it ends."""
        self._slots.acquire(budget)
        try:
            deadline = budget.deadline if turns is None else time.monotonic() + self.write_timeout
            call = self._submit(method, request, 1, deadline)
        except BaseException:
            self._slots.release()
            raise
        call.add_done_callback(self._release_slot)
        if turns is not None:
            turns.track(call)
        return call

    def _release_slot(self, _call: PendingCall) -> None:
        self._slots.release()

    def _outcome(self, call: PendingCall, budget: Budget) -> Any:
        """The response of a started RPC, waited for within ``budget`` (a read
        ends at the same deadline; a write runs on to its own). Raises mproxy's error."""
        if not call.wait(budget.left()):
            raise budget.expired()
        try:
            return call.result()
        except Exception as err:
            raise rpc_error(err, budget.op, budget.timeout) from None

    def _fan_out(self, method: str, requests: list[Any], budget: Budget, turns: Turns | None = None) -> list[Any]:
        """Responses of one call per request, :data:`FAN_OUT_WINDOW` in flight at a
        time: writes when ``turns`` is given (see :meth:`_rpc`), else reads."""
        responses: list[Any] = []
        for start in range(0, len(requests), FAN_OUT_WINDOW):
            window = [self._rpc(method, request, budget, turns) for request in requests[start : start + FAN_OUT_WINDOW]]
            responses += [self._outcome(call, budget) for call in window]
        return responses

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
        op = "flush_all"
        if self._closed:
            raise BackendError("unavailable", f"momento unavailable on {op}: the backend is closed")
        try:
            response = self._connection.control("flush_cache", self.cache_name)  # the SDK's control deadline
        except Exception as err:
            raise rpc_error(err, op, SDK_CONTROL_TIMEOUT_SECONDS) from None
        if not isinstance(response, self._flushed):
            raise self._sdk_failure(response, op)
        self._accesses.clear()  # the meta commands' record of accesses (.meta)

    def _sdk_failure(self, response: Any, op: str) -> BackendError | ValueTooLarge:
        if isinstance(response, self._sdk_errors):
            return sdk_error(response, op, SDK_CONTROL_TIMEOUT_SECONDS)
        return unexpected_response(response, op)

    def _delayed_flush(self) -> None:
        try:
            self._flush()
        except BackendError as err:
            log.warning("delayed flush_all of cache %s failed: %s", self.cache_name, err)

    def _cancel_flush(self) -> None:
        timer, self._flush_timer = self._flush_timer, None
        if timer is not None:
            timer.cancel()


def _snake(rpc: str) -> str:
    """``GetBatch`` -> ``get_batch``: an RPC name as a stat name."""
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(rpc))
