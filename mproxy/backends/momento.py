"""The Momento backend: memcached semantics on Momento Cache's gRPC protocol.

The only module of mproxy that imports the ``momento`` SDK (lazily: see
:func:`_sdk`). It is imported lazily by the backend registry, after the CLI
has monkey-patched gevent and called :func:`prepare_gevent`.

What the SDK is used for, and what not
--------------------------------------
The SDK (1.29.1) resolves credentials (:class:`momento.CredentialProvider`:
v1/legacy keys carry their endpoints, v2 keys need ``endpoint``). Data and
control calls go through channels of our own and the generated
``momento_wire_types`` stubs, with the metadata the SDK sends
(``cache``, ``authorization``, ``agent``, ``runtime-version``), because

* ten of the thirteen RPCs mproxy needs (SetIf*, GetWithHash, GetBatch,
  KeysExist, UpdateTtl, ItemGetTtl, ...) are not wrapped by the SDK;
* the SDK accepts no channel options: with it ``connection_count`` clients
  would share one TCP connection (gRPC's global subchannel pool) and the
  reconnect backoff could not be shortened;
* one code path gives one error mapping and one deadline per backend call,
  and the raw stub costs less CPU per call than the SDK wrapper.

The SDK facts this relies on are gathered in :func:`sdk_contract` (a test
fails loudly when they move). Notable difference from the SDK: no automatic
retries of failed calls (the SDK retries INTERNAL/UNAVAILABLE up to 3 times
for idempotent calls); gRPC's own transparent retries still apply, and a
failed call answers ``SERVER_ERROR`` so the memcached client decides.

Per ``[[cache]]``: ``connection_count`` separate HTTP/2 connections
(channels with a local subchannel pool, used round-robin), a deadline of
``request_timeout`` per backend call (the semaphore wait and every RPC of the
call share it), and at most ``max_in_flight`` backend calls at once (callers
wait for a slot; no queue beyond the waiting callers).

Layout of items (flags header, CAS uniques, TTLs): :mod:`momento_codec`.
Command by command RPC mapping, atomicity and differences from memcached:
``docs/compatibility.md``.
"""

from __future__ import annotations

import itertools
import logging
import os
import platform
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import grpc
from momento_wire_types import cacheclient_pb2 as pb
from momento_wire_types import cacheclient_pb2_grpc as pb_grpc
from momento_wire_types import common_pb2
from momento_wire_types import controlclient_pb2 as control_pb
from momento_wire_types import controlclient_pb2_grpc as control_grpc

from mproxy.backends import momento_codec as codec
from mproxy.backends import momento_embedded
from mproxy.backends.base import (
    COUNTER_MAX,
    BackendError,
    FlushDisabled,
    Item,
    NonNumericValue,
    StoreMode,
    StoreResult,
    ValueTooLarge,
    ttl_seconds,
)
from mproxy.backends.memory import parse_counter

log = logging.getLogger(__name__)

#: Largest key + stored value sent to Momento (documented limit: 5 MB item).
#: Larger items raise :class:`ValueTooLarge` without a call; the service's own
#: answer (RESOURCE_EXHAUSTED, item size) is mapped to the same error.
MOMENTO_MAX_ITEM_BYTES = 5 * 1024 * 1024
#: gRPC message size limits of our channels: an item plus protobuf framing.
MAX_MESSAGE_BYTES = MOMENTO_MAX_ITEM_BYTES + 64 * 1024
#: Keys per GetBatch call; larger multi-gets send several batches concurrently.
GET_BATCH_SIZE = 100
#: GetBatch calls in flight at once for one multi-get.
GET_BATCH_WINDOW = 8
#: Per-key calls (UpdateTtl, Delete of gat/gats) in flight at once for one command.
FAN_OUT_WINDOW = 64
#: Attempts of a read-modify-write (append, prepend, incr, decr) whose
#: conditional write lost to a concurrent writer, before giving up.
MAX_ATTEMPTS = 8
#: The legacy environment variable of Momento API keys, always read too.
LEGACY_API_KEY_ENV = "MOMENTO_AUTHENTICATION"
#: How long creating the cache on a local server may wait for it to answer.
LOCAL_CONNECT_TIMEOUT_SECONDS = 10.0

#: Channel options (cf. the SDK's grpc_data_channel_options_from_grpc_config,
#: whose keepalive defaults these mirror). A local subchannel pool makes every
#: channel its own TCP connection; short reconnect backoff bounds recovery
#: after an outage to about a second instead of gRPC's default 120 s cap.
DATA_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.service_config_disable_resolution", 1),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 1000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
CONTROL_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.service_config_disable_resolution", 1),
    ("grpc.max_reconnect_backoff_ms", 1000),
)

#: gRPC status -> BackendError code (stats word; also the message's words).
_STATUS_CODES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.DEADLINE_EXCEEDED: "timeout",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "limit_exceeded",
    grpc.StatusCode.UNAUTHENTICATED: "authentication",
    grpc.StatusCode.PERMISSION_DENIED: "permission_denied",
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.INVALID_ARGUMENT: "invalid_argument",
    grpc.StatusCode.FAILED_PRECONDITION: "failed_precondition",
    grpc.StatusCode.ALREADY_EXISTS: "already_exists",
    grpc.StatusCode.CANCELLED: "cancelled",
    grpc.StatusCode.UNIMPLEMENTED: "unimplemented",
    grpc.StatusCode.OUT_OF_RANGE: "invalid_argument",
}
#: Longest part of a server's error details repeated in a message.
_DETAILS_LIMIT = 160

_gevent_prepared = False


def prepare_gevent() -> None:
    """Make gRPC cooperate with gevent (``grpc.experimental.gevent.init_gevent``).

    Call once, after ``gevent.monkey.patch_all()`` and before any gRPC channel
    exists (the CLI does; :func:`from_config` does it too when it finds the
    socket module patched and this was not called). Idempotent.
    """
    global _gevent_prepared
    if not _gevent_prepared:
        from grpc.experimental import gevent as grpc_gevent

        grpc_gevent.init_gevent()
        _gevent_prepared = True


def _gevent_patched() -> bool:
    """Whether gevent has monkey-patched this process (without importing gevent)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


# ---- the SDK contract (the only SDK access) ------------------------------------


#: Metadata of every data call, as the SDK builds it
#: (``momento.internal.synchronous._utilities.make_metadata``).
CACHE_HEADER = "cache"
#: Headers the SDK's interceptors add to every call
#: (``momento.internal.synchronous._scs_grpc_manager._interceptors``).
AUTHORIZATION_HEADER = "authorization"
AGENT_HEADER = "agent"
RUNTIME_VERSION_HEADER = "runtime-version"


@dataclass(frozen=True)
class SdkContract:
    """What mproxy takes from the momento SDK at run time (all public API).

    The header names above are copied from SDK internals instead;
    ``tests/test_backend_momento.py`` checks both against the installed SDK
    and fails loudly when they move.
    """

    #: ``momento.__version__``, sent in the ``agent`` header as the SDK does
    version: str
    #: ``momento.CredentialProvider``: a dataclass with ``auth_token``,
    #: ``cache_endpoint``, ``control_endpoint``, ``port`` (443 = TLS, any
    #: other port plaintext), built by ``from_string`` (v1/legacy keys),
    #: ``from_api_key_v2`` and ``for_momento_local``
    credential_provider: Any
    #: ``momento.errors.SdkException``: what credential parsing raises
    sdk_exception: type[Exception]


def sdk_contract() -> SdkContract:
    """Import the SDK and gather what mproxy uses of it (the only SDK access).

    Raises ``ImportError``/``AttributeError`` naming the missing piece when
    the SDK moved.
    """
    import momento
    from momento.errors import SdkException

    return SdkContract(
        version=momento.__version__,
        credential_provider=momento.CredentialProvider,
        sdk_exception=SdkException,
    )


# ---- where to connect ----------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where and how a backend connects: data and control targets, TLS, token."""

    data_target: str
    control_target: str
    secure: bool
    auth_token: str = ""

    @classmethod
    def from_credentials(cls, provider: Any) -> Endpoint:
        """From a ``momento.CredentialProvider`` (the SDK's transport rule: port 443 = TLS)."""
        if provider.port == 443:
            return cls(provider.cache_endpoint, provider.control_endpoint, True, provider.auth_token)
        return cls(
            f"{provider.cache_endpoint}:{provider.port}",
            f"{provider.control_endpoint}:{provider.port}",
            False,
            provider.auth_token,
        )

    @classmethod
    def local(cls, host: str, port: int) -> Endpoint:
        """A plaintext Momento-compatible server (``CredentialProvider.for_momento_local``)."""
        return cls.from_credentials(sdk_contract().credential_provider.for_momento_local(host, port))

    def __repr__(self) -> str:  # never show the token
        return f"Endpoint({self.data_target!r}, secure={self.secure})"


def credentials_from_env(api_key_env: str, endpoint: str, environ: dict[str, str] | None = None) -> Endpoint:
    """The Momento service endpoint and key from the environment.

    Reads ``api_key_env`` then the legacy ``MOMENTO_AUTHENTICATION``. With
    ``endpoint`` set the key must be a v2 key; without it, a v1 or legacy key
    (those carry their endpoints). Raises :class:`BackendError`
    (``authentication``) naming the variables, never the key.
    """
    env = os.environ if environ is None else environ
    names = list(dict.fromkeys((api_key_env, LEGACY_API_KEY_ENV)))
    found = next(((name, env[name].strip()) for name in names if env.get(name, "").strip()), None)
    if found is None:
        raise BackendError(
            "authentication", f"no Momento API key: set the environment variable {' or '.join(names)}"
        )
    name, key = found
    sdk = sdk_contract()
    try:
        if endpoint:
            provider = sdk.credential_provider.from_api_key_v2(key, endpoint)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # v1 keys have no non-deprecated parser
                provider = sdk.credential_provider.from_string(key)
    except (sdk.sdk_exception, ValueError, KeyError) as exc:
        hint = (
            "[momento] endpoint is set, so a v2 API key is expected (v1 keys carry their endpoint: "
            "leave endpoint empty)"
            if endpoint
            else "v2 API keys need [momento] endpoint"
        )
        raise BackendError("authentication", f"invalid Momento API key in {name}: {hint}") from exc
    return Endpoint.from_credentials(provider)


# ---- the backend ---------------------------------------------------------------


class _Slots(Protocol):
    def acquire(self, blocking: bool = ..., timeout: float | None = ...) -> bool: ...

    def release(self) -> None: ...


def _bounded_semaphore(size: int) -> _Slots:
    """A gevent semaphore when gevent has patched the process, else a thread one."""
    if _gevent_patched():
        from gevent.lock import BoundedSemaphore

        slots: _Slots = BoundedSemaphore(size)
        return slots
    return threading.BoundedSemaphore(size)


@dataclass(frozen=True, slots=True)
class _Found:
    """A GetWithHash hit: stored bytes and the server's hash of them."""

    stored: bytes
    hash: bytes


class MomentoBackend:
    """:class:`mproxy.backends.base.Backend` on one Momento cache.

    ``endpoint`` says where; ``default_ttl``/``max_ttl`` in seconds;
    ``with_flags`` selects the flags encoding (:mod:`momento_codec`);
    ``max_value_size`` is memcached's ``-I`` (the proxy's ``max_item_size``);
    ``on_close`` runs once when the backend is closed (releases a shared
    embedded server).
    """

    kind = "momento"

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
        max_value_size: int = 1024 * 1024,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        if connection_count < 1 or max_in_flight < 1 or request_timeout <= 0:
            raise ValueError("connection_count and max_in_flight must be >= 1, request_timeout > 0")
        if default_ttl < 1 or max_ttl < 1:
            raise ValueError("default_ttl and max_ttl must be at least 1 second")
        self.cache_name = cache_name
        self._default_ttl = min(default_ttl, max_ttl)
        self._max_ttl = max_ttl
        self._timeout = request_timeout
        self._with_flags = with_flags
        self._allow_flush = allow_flush
        self._max_value_size = max_value_size
        self._on_close = on_close
        self._closed = False
        self._flush_timer: threading.Timer | None = None
        self._slots = _bounded_semaphore(max_in_flight)
        headers = (
            (AUTHORIZATION_HEADER, endpoint.auth_token),
            (AGENT_HEADER, f"python:cache:{sdk_contract().version}"),
            (RUNTIME_VERSION_HEADER, f"python {platform.python_version()}"),
        )
        self._data_metadata = ((CACHE_HEADER, cache_name), *headers)
        self._control_metadata = headers
        self._channels = [
            _channel(endpoint, endpoint.data_target, DATA_CHANNEL_OPTIONS) for _ in range(connection_count)
        ]
        self._stubs = [pb_grpc.ScsStub(channel) for channel in self._channels]
        self._next_stub = itertools.cycle(self._stubs).__next__
        self._control_channel = _channel(endpoint, endpoint.control_target, CONTROL_CHANNEL_OPTIONS)
        self._control = control_grpc.ScsControlStub(self._control_channel)

    def __repr__(self) -> str:
        return f"MomentoBackend(cache={self.cache_name!r}, connections={len(self._channels)})"

    # -- Backend ------------------------------------------------------------

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, Item]:
        """Get for one key, GetBatch (concurrent batches of :data:`GET_BATCH_SIZE`) for more."""
        with self._call("get") as deadline:
            found = self._get_values(list(dict.fromkeys(keys)), deadline, "get")
        return {key: self._item(stored) for key, stored in found.items()}

    def touch_many(self, keys: Sequence[bytes], exptime: int) -> dict[bytes, Item]:
        """UpdateTtl (overwrite) per key, concurrently with one GetBatch; the
        keys both found are returned. A past exptime: GetBatch, then Delete
        each key found (returned once, then gone, as memcached does)."""
        unique = list(dict.fromkeys(keys))
        ttl_ms = self._ttl_ms(exptime)
        with self._call("touch") as deadline:
            if ttl_ms == 0:
                found = self._get_values(unique, deadline, "touch")
                self._fan_out("Delete", [pb._DeleteRequest(cache_key=key) for key in found], deadline, "touch")
            else:
                requests = [pb._UpdateTtlRequest(cache_key=key, overwrite_to_milliseconds=ttl_ms) for key in unique]
                # the first window of updates travels with the read: one round trip for a typical gat
                first = [self._start("UpdateTtl", request, deadline) for request in requests[:FAN_OUT_WINDOW]]
                found = self._get_values(unique, deadline, "touch")
                touched = self._gather(first, "touch")
                touched += self._fan_out("UpdateTtl", requests[FAN_OUT_WINDOW:], deadline, "touch")
                found = {
                    key: stored
                    for key, response in zip(unique, touched)
                    if response.WhichOneof("result") != "missing" and (stored := found.get(key)) is not None
                }
        return {key: self._item(stored) for key, stored in found.items()}

    def store(
        self,
        mode: StoreMode,
        key: bytes,
        value: bytes,
        flags: int,
        exptime: int,
        cas_unique: int = 0,
    ) -> StoreResult:
        op = mode.value
        stored = codec.encode(value, flags, self._with_flags)
        if len(value) > self._max_value_size or len(key) + len(stored) > MOMENTO_MAX_ITEM_BYTES:
            if mode is StoreMode.SET:
                # memcached drops the old value when a set is too large (no stale data).
                with self._call(op) as deadline:
                    self._unary("Delete", pb._DeleteRequest(cache_key=key), deadline, op)
            raise ValueTooLarge(f"item of {len(key) + len(stored)} bytes is above the item size limit")
        with self._call(op) as deadline:
            if mode is StoreMode.APPEND or mode is StoreMode.PREPEND:
                return self._concatenate(key, value, mode is StoreMode.APPEND, deadline, op)
            ttl_ms = self._ttl_ms(exptime)
            if mode is StoreMode.SET:
                return self._set(key, stored, ttl_ms, deadline, op)
            if mode is StoreMode.ADD:
                return self._add(key, stored, ttl_ms, deadline, op)
            if mode is StoreMode.REPLACE:
                return self._replace(key, stored, ttl_ms, deadline, op)
            return self._cas(key, stored, ttl_ms, cas_unique, deadline, op)

    def delete(self, key: bytes) -> bool:
        """KeysExist, then Delete if present (two calls: see docs/compatibility.md)."""
        with self._call("delete") as deadline:
            if not self._exists(key, deadline, "delete"):
                return False
            self._unary("Delete", pb._DeleteRequest(cache_key=key), deadline, "delete")
            return True

    def incr_decr(self, key: bytes, delta: int, incr: bool) -> int | None:
        """Read (GetWithHash + ItemGetTtl), compute as memcached, write back with
        SetIfHash on the read hash and the remaining TTL; retried on conflict."""
        if not 0 <= delta <= COUNTER_MAX:
            raise ValueError(f"delta must be a u64, got {delta}")
        op = "incr" if incr else "decr"
        with self._call(op) as deadline:
            for _ in range(MAX_ATTEMPTS):
                read = self._read_for_update(key, deadline, op)
                if read is None:
                    return None
                found, ttl_ms = read
                value, flags = codec.decode(found.stored, self._with_flags)
                current = parse_counter(value)
                if current is None:
                    raise NonNumericValue("cannot increment or decrement non-numeric value")
                if incr:
                    number = (current + delta) & COUNTER_MAX
                else:
                    number = current - delta if current > delta else 0
                # memcached rewrites a counter in place, space-padded, when the digits fit.
                new = codec.encode((b"%d" % number).ljust(len(value)), flags, self._with_flags)
                if self._set_if_hash(key, new, ttl_ms, found.hash, deadline, op):
                    return number
            raise self._contention(op)

    def touch(self, key: bytes, exptime: int) -> bool:
        """UpdateTtl (overwrite). A past exptime: KeysExist, then Delete."""
        ttl_ms = self._ttl_ms(exptime)
        with self._call("touch") as deadline:
            if ttl_ms == 0:
                if not self._exists(key, deadline, "touch"):
                    return False
                self._unary("Delete", pb._DeleteRequest(cache_key=key), deadline, "touch")
                return True
            request = pb._UpdateTtlRequest(cache_key=key, overwrite_to_milliseconds=ttl_ms)
            return self._unary("UpdateTtl", request, deadline, "touch").WhichOneof("result") != "missing"

    def flush_all(self, delay: int = 0) -> None:
        """FlushCache on the control API, now or from a timer ``delay`` seconds
        from now. A later flush_all replaces a pending delayed one."""
        if not self._allow_flush:
            raise FlushDisabled("flush_all is disabled for this cache")
        seconds = ttl_seconds(delay)
        self._cancel_flush()
        if seconds is None or seconds <= 0:
            self._flush("flush_all")
            return
        timer = threading.Timer(seconds, self._delayed_flush)
        timer.daemon = True
        self._flush_timer = timer
        timer.start()

    def close(self) -> None:
        """Cancel a pending flush, close the channels, release an embedded server."""
        if self._closed:
            return
        self._closed = True
        self._cancel_flush()
        for channel in (*self._channels, self._control_channel):
            channel.close()
        if self._on_close is not None:
            self._on_close()

    # -- setup --------------------------------------------------------------

    def create_cache(self, timeout: float) -> None:
        """CreateCache (an existing cache is fine), waiting up to ``timeout``
        seconds for the server to come up. Used with local servers only."""
        request = control_pb._CreateCacheRequest(cache_name=self.cache_name)
        try:
            self._control.CreateCache(request, metadata=self._control_metadata, timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as err:
            if err.code() is not grpc.StatusCode.ALREADY_EXISTS:
                raise _error(err, "create_cache", timeout) from None

    # -- the operations of store() ------------------------------------------

    def _set(self, key: bytes, stored: bytes, ttl_ms: int, deadline: float, op: str) -> StoreResult:
        if ttl_ms == 0:
            self._unary("Delete", pb._DeleteRequest(cache_key=key), deadline, op)
        else:
            self._unary("Set", pb._SetRequest(cache_key=key, cache_body=stored, ttl_milliseconds=ttl_ms), deadline, op)
        return StoreResult.STORED

    def _add(self, key: bytes, stored: bytes, ttl_ms: int, deadline: float, op: str) -> StoreResult:
        if ttl_ms == 0:
            return StoreResult.NOT_STORED if self._exists(key, deadline, op) else StoreResult.STORED
        request = pb._SetIfNotExistsRequest(cache_key=key, cache_body=stored, ttl_milliseconds=ttl_ms)
        response = self._unary("SetIfNotExists", request, deadline, op)
        return StoreResult.STORED if response.WhichOneof("result") == "stored" else StoreResult.NOT_STORED

    def _replace(self, key: bytes, stored: bytes, ttl_ms: int, deadline: float, op: str) -> StoreResult:
        if ttl_ms == 0:
            if not self._exists(key, deadline, op):
                return StoreResult.NOT_STORED
            self._unary("Delete", pb._DeleteRequest(cache_key=key), deadline, op)
            return StoreResult.STORED
        request = pb._SetIfRequest(
            cache_key=key, cache_body=stored, ttl_milliseconds=ttl_ms, present=common_pb2.Present()
        )
        response = self._unary("SetIf", request, deadline, op)
        return StoreResult.STORED if response.WhichOneof("result") == "stored" else StoreResult.NOT_STORED

    def _cas(self, key: bytes, stored: bytes, ttl_ms: int, cas_unique: int, deadline: float, op: str) -> StoreResult:
        found = self._get_with_hash(key, deadline, op)
        if found is None:
            return StoreResult.NOT_FOUND
        if codec.cas_unique(found.stored) != cas_unique:
            return StoreResult.EXISTS
        if ttl_ms == 0:
            self._unary("Delete", pb._DeleteRequest(cache_key=key), deadline, op)
            return StoreResult.STORED
        if self._set_if_hash(key, stored, ttl_ms, found.hash, deadline, op):
            return StoreResult.STORED
        return StoreResult.EXISTS if self._exists(key, deadline, op) else StoreResult.NOT_FOUND

    def _concatenate(self, key: bytes, data: bytes, append: bool, deadline: float, op: str) -> StoreResult:
        for _ in range(MAX_ATTEMPTS):
            read = self._read_for_update(key, deadline, op)
            if read is None:
                return StoreResult.NOT_STORED
            found, ttl_ms = read
            value, flags = codec.decode(found.stored, self._with_flags)
            value = value + data if append else data + value
            new = codec.encode(value, flags, self._with_flags)
            if len(value) > self._max_value_size or len(key) + len(new) > MOMENTO_MAX_ITEM_BYTES:
                return StoreResult.NOT_STORED  # memcached: an append that would not fit
            if self._set_if_hash(key, new, ttl_ms, found.hash, deadline, op):
                return StoreResult.STORED
        raise self._contention(op)

    # -- RPC helpers ----------------------------------------------------------

    def _read_for_update(self, key: bytes, deadline: float, op: str) -> tuple[_Found, int] | None:
        """GetWithHash and ItemGetTtl, concurrently: the item and its remaining
        TTL in ms, or None if missing. If the item changes between the two
        reads, the conditional write that follows fails and is retried."""
        ttl_call = self._start("ItemGetTtl", pb._ItemGetTtlRequest(cache_key=key), deadline)
        try:
            found = self._get_with_hash(key, deadline, op)
        except BackendError:
            ttl_call.cancel()
            raise
        ttl_response = self._gather([ttl_call], op)[0]
        if found is None or ttl_response.WhichOneof("result") != "found":
            return None
        return found, max(1, ttl_response.found.remaining_ttl_millis)

    def _get_with_hash(self, key: bytes, deadline: float, op: str) -> _Found | None:
        response = self._unary("GetWithHash", pb._GetWithHashRequest(cache_key=key), deadline, op)
        if response.WhichOneof("result") != "found":
            return None
        return _Found(response.found.value, response.found.hash)

    def _set_if_hash(self, key: bytes, stored: bytes, ttl_ms: int, expected: bytes, deadline: float, op: str) -> bool:
        request = pb._SetIfHashRequest(
            cache_key=key,
            cache_body=stored,
            ttl_milliseconds=ttl_ms,
            present_and_hash_equal=common_pb2.PresentAndHashEqual(hash_to_check=expected),
        )
        return bool(self._unary("SetIfHash", request, deadline, op).WhichOneof("result") == "stored")

    def _exists(self, key: bytes, deadline: float, op: str) -> bool:
        response = self._unary("KeysExist", pb._KeysExistRequest(cache_keys=[key]), deadline, op)
        return bool(response.exists and response.exists[0])

    def _get_values(self, keys: list[bytes], deadline: float, op: str) -> dict[bytes, bytes]:
        """Stored bytes of the present keys (``keys`` without duplicates)."""
        if not keys:
            return {}
        if len(keys) == 1:
            return _hits(keys, [self._unary("Get", pb._GetRequest(cache_key=keys[0]), deadline, op)], op)
        batches = [keys[i : i + GET_BATCH_SIZE] for i in range(0, len(keys), GET_BATCH_SIZE)]
        found: dict[bytes, bytes] = {}
        for start in range(0, len(batches), GET_BATCH_WINDOW):
            window = batches[start : start + GET_BATCH_WINDOW]
            streams = [
                self._next_stub().GetBatch(
                    pb._GetBatchRequest(items=[pb._GetRequest(cache_key=key) for key in batch]),
                    metadata=self._data_metadata,
                    timeout=self._remaining(deadline, op),
                )
                for batch in window
            ]
            for batch, stream in zip(window, streams):
                try:
                    responses = list(stream)
                except grpc.RpcError as err:
                    for other in streams:
                        other.cancel()
                    raise _error(err, op, self._timeout) from None
                if len(responses) != len(batch):
                    raise BackendError(
                        "internal",
                        f"momento internal error on {op}: GetBatch answered {len(responses)} of {len(batch)} keys",
                    )
                found.update(_hits(batch, responses, op))
        return found

    def _unary(self, method: str, request: Any, deadline: float, op: str) -> Any:
        """One blocking unary call on the next connection."""
        try:
            return getattr(self._next_stub(), method)(
                request, metadata=self._data_metadata, timeout=self._remaining(deadline, op)
            )
        except grpc.RpcError as err:
            raise _error(err, op, self._timeout) from None

    def _start(self, method: str, request: Any, deadline: float) -> Any:
        """Start a unary call without waiting (a ``grpc.Future``); see :meth:`_gather`."""
        remaining = max(deadline - time.monotonic(), 0.001)
        return getattr(self._next_stub(), method).future(request, metadata=self._data_metadata, timeout=remaining)

    def _fan_out(self, method: str, requests: list[Any], deadline: float, op: str) -> list[Any]:
        """Results of one call per request, :data:`FAN_OUT_WINDOW` in flight at a time."""
        results: list[Any] = []
        for start in range(0, len(requests), FAN_OUT_WINDOW):
            window = requests[start : start + FAN_OUT_WINDOW]
            results += self._gather([self._start(method, request, deadline) for request in window], op)
        return results

    def _gather(self, futures: list[Any], op: str) -> list[Any]:
        """Results of started calls; on the first failure cancel the rest and raise."""
        try:
            return [future.result() for future in futures]
        except grpc.RpcError as err:
            for future in futures:
                future.cancel()
            raise _error(err, op, self._timeout) from None

    def _remaining(self, deadline: float, op: str) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BackendError("timeout", f"momento timeout after {self._timeout:g}s on {op}")
        return remaining

    @contextmanager
    def _call(self, op: str) -> Iterator[float]:
        """One backend call: a slot of ``max_in_flight`` and the call's deadline."""
        if self._closed:
            raise BackendError("unavailable", f"momento unavailable on {op}: the backend is closed")
        deadline = time.monotonic() + self._timeout
        if not self._slots.acquire(timeout=self._timeout):
            raise BackendError(
                "timeout", f"momento timeout after {self._timeout:g}s on {op} waiting for a free call slot"
            )
        try:
            yield deadline
        finally:
            self._slots.release()

    def _item(self, stored: bytes) -> Item:
        value, flags = codec.decode(stored, self._with_flags)
        return Item(value, flags, codec.cas_unique(stored))

    def _ttl_ms(self, exptime: int) -> int:
        return codec.ttl_milliseconds(exptime, self._default_ttl, self._max_ttl)

    def _contention(self, op: str) -> BackendError:
        return BackendError(
            "contention", f"momento contention on {op}: the item kept changing, gave up after {MAX_ATTEMPTS} attempts"
        )

    # -- flush ---------------------------------------------------------------

    def _flush(self, op: str) -> None:
        with self._call(op) as deadline:
            request = control_pb._FlushCacheRequest(cache_name=self.cache_name)
            try:
                self._control.FlushCache(
                    request, metadata=self._control_metadata, timeout=self._remaining(deadline, op)
                )
            except grpc.RpcError as err:
                raise _error(err, op, self._timeout) from None

    def _delayed_flush(self) -> None:
        try:
            self._flush("flush_all")
        except BackendError as err:
            log.warning("delayed flush_all of cache %s failed: %s", self.cache_name, err)

    def _cancel_flush(self) -> None:
        timer, self._flush_timer = self._flush_timer, None
        if timer is not None:
            timer.cancel()


def _channel(endpoint: Endpoint, target: str, options: tuple[tuple[str, int], ...]) -> grpc.Channel:
    if endpoint.secure:
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(), options=options)
    return grpc.insecure_channel(target, options=options)


def _hits(keys: Sequence[bytes], responses: Sequence[Any], op: str) -> dict[bytes, bytes]:
    found: dict[bytes, bytes] = {}
    for key, response in zip(keys, responses):
        if response.result == pb.Hit:
            found[key] = response.cache_body
        elif response.result != pb.Miss:
            raise BackendError("internal", f"momento internal error on {op}: unexpected get result {response.result}")
    return found


def _error(err: grpc.RpcError, op: str, timeout: float) -> BackendError | ValueTooLarge:
    """A failed RPC as mproxy's error: one line naming the failure, never a key or value."""
    status = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = " ".join(((err.details() if isinstance(err, grpc.Call) else None) or "").split())[:_DETAILS_LIMIT]
    code = _STATUS_CODES.get(status, "internal")
    if status is grpc.StatusCode.RESOURCE_EXHAUSTED and _item_too_large(err, details):
        return ValueTooLarge(f"Momento refused the item as too large: {details}")
    if code == "timeout":
        return BackendError(code, f"momento timeout after {timeout:g}s on {op}")
    words = code.replace("_", " ")
    return BackendError(code, f"momento {words} on {op}: {details}" if details else f"momento {words} on {op}")


def _item_too_large(err: grpc.RpcError, details: str) -> bool:
    """Momento marks its item size refusals with trailer ``err: item_size_limit_exceeded``."""
    trailers = err.trailing_metadata() if isinstance(err, grpc.Call) else None
    if any(key == "err" and value == "item_size_limit_exceeded" for key, value in trailers or ()):
        return True
    return "item size" in details.lower()


# ---- construction from the configuration --------------------------------------


class _CacheSettings(Protocol):
    """What :func:`from_config` reads from a ``[[cache]]`` section."""

    cache_name: str
    default_ttl: int
    max_ttl: int
    connection_count: int
    request_timeout: float
    max_in_flight: int
    flags: bool
    allow_flush: bool


class _MomentoSettings(Protocol):
    local: str
    api_key_env: str
    endpoint: str


class _ProxySettings(Protocol):
    max_item_size: int


class _Settings(Protocol):
    @property
    def momento(self) -> _MomentoSettings: ...

    @property
    def proxy(self) -> _ProxySettings: ...


def from_config(cache: _CacheSettings, config: _Settings) -> MomentoBackend:
    """The backend of one ``[[cache]]`` with ``backend = "momento"``.

    ``[momento] local``: ``""`` = the Momento service with the key from the
    environment; ``"embedded"`` = the shared bundled server child process;
    ``"HOST:PORT"`` = a plaintext Momento-compatible server. With a local
    server the cache is created if missing (the service's caches are not).
    Raises :class:`BackendError` naming what failed.
    """
    if _gevent_patched():
        prepare_gevent()
    local = config.momento.local
    on_close: Callable[[], None] | None = None
    if local == "embedded":
        try:
            server = momento_embedded.acquire()
        except momento_embedded.EmbeddedServerError as exc:
            raise BackendError("unavailable", str(exc)) from exc
        endpoint = Endpoint.local(server.host, server.port)
        where = f"the embedded Momento server at {server.host}:{server.port}"
        on_close = momento_embedded.release
    elif local:
        host, port = _split_host_port(local)
        endpoint, where = Endpoint.local(host, port), f"the local Momento server at {local}"
    else:
        endpoint, where = credentials_from_env(config.momento.api_key_env, config.momento.endpoint), ""
    try:
        backend = MomentoBackend(
            endpoint,
            cache.cache_name,
            default_ttl=cache.default_ttl,
            max_ttl=cache.max_ttl,
            connection_count=cache.connection_count,
            request_timeout=cache.request_timeout,
            max_in_flight=cache.max_in_flight,
            with_flags=cache.flags,
            allow_flush=cache.allow_flush,
            max_value_size=config.proxy.max_item_size,
            on_close=on_close,
        )
    except BaseException:
        if on_close is not None:
            on_close()
        raise
    if where:
        try:
            backend.create_cache(LOCAL_CONNECT_TIMEOUT_SECONDS)
        except BackendError as err:
            backend.close()
            raise BackendError(err.code, f"cannot reach {where} to create cache {cache.cache_name!r}: {err}") from None
    return backend


def _split_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 hosts stay bracketed: they are used in a gRPC target)."""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise BackendError("invalid_argument", f"[momento] local must be \"embedded\" or HOST:PORT, got {value!r}")
    return host, int(port)
