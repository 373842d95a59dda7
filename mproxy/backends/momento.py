"""The Momento backend: memcached semantics on Momento Cache's gRPC protocol.

The only module of mproxy that imports the ``momento`` SDK (lazily: see
:func:`sdk_contract`). It is imported lazily by the backend registry, after the
CLI has monkey-patched gevent and called :func:`prepare_gevent`.

A hybrid of the SDK and the wire protocol
-----------------------------------------
* The calls the SDK's synchronous ``CacheClient`` (1.29.1) has go through it:
  Get (single key), Set, Delete, SetIfNotExists, FlushCache, CreateCache.
  Its response objects (``CacheGet.Hit``/``Miss``/``Error``, ...) and
  ``Error.error_code`` map to the same :class:`BackendError` codes and
  messages as the raw path (:data:`_ERROR_TABLE`).
* The RPCs the SDK does not wrap (GetBatch, SetIf, SetIfHash, GetWithHash,
  KeysExist, UpdateTtl, ItemGetTtl) go through channels of our own and the
  generated ``momento_wire_types`` stubs, with the metadata the SDK sends
  (``cache``, ``authorization``, ``agent``, ``runtime-version``). Per-key
  Deletes fanned out concurrently (``gat`` with a past exptime) stay there
  too: the synchronous SDK has no futures.

Connections: per ``[[cache]]``, ``connection_count`` ``CacheClient`` objects,
used round-robin. gRPC's global subchannel pool shares one TCP connection
between channels whose channel arguments are identical, so client ``i`` is
configured with a gRPC message size limit ``SDK_MAX_MESSAGE_BYTES + id``
(``id`` unique in the process: :func:`_take_channel_ids`), which makes every
client its own HTTP/2 connection. Raw channel ``i`` uses exactly client
``i``'s channel arguments, so on a plaintext endpoint it shares that client's
connection (``connection_count`` = N gives N data connections); TLS channels
never share (each has its own credentials object), so on the Momento service
it is 2N.

Deadlines: the SDK has one deadline per client (``request_timeout`` here; it
retries INTERNAL/UNAVAILABLE of idempotent calls up to 3 times within that
deadline), our own calls use what is left of the backend call's deadline. Both
run inside a slot of ``max_in_flight`` (callers wait for a slot within
``request_timeout``). Control calls (FlushCache, CreateCache) have the SDK's
fixed 60 s deadline.

The SDK facts this relies on are gathered in :func:`sdk_contract` (a test
fails loudly when they move). The SDK logs failed requests at WARNING on the
``momentosdk`` logger; this module leaves that logger alone.

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
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, Protocol

import grpc
from momento_wire_types import cacheclient_pb2 as pb
from momento_wire_types import cacheclient_pb2_grpc as pb_grpc
from momento_wire_types import common_pb2

from mproxy.backends import momento_codec as codec
from mproxy.backends import momento_embedded
from mproxy.backends.base import (
    COUNTER_MAX,
    BackendError,
    FlushDisabled,
    Item,
    StoreMode,
    StoreResult,
    ValueTooLarge,
    ttl_seconds,
)
from mproxy.backends.memory import apply_delta

log = logging.getLogger(__name__)

#: Largest key + stored value sent to Momento (documented limit: 5 MB item).
#: Larger items raise :class:`ValueTooLarge` without a call; the service's own
#: answer (RESOURCE_EXHAUSTED, item size) is mapped to the same error.
MOMENTO_MAX_ITEM_BYTES = 5 * 1024 * 1024
#: The SDK's gRPC message size limit (its ``DEFAULT_MAX_MESSAGE_SIZE``): client
#: ``i`` sends at most this + its channel id (see :func:`_sdk_configuration`).
SDK_MAX_MESSAGE_BYTES = 5_243_000
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
#: The SDK's fixed deadline of control calls (FlushCache, CreateCache): its
#: ``_scs_control_client._DEADLINE_SECONDS``, named in their timeout errors.
SDK_CONTROL_TIMEOUT_SECONDS = 60.0

#: One row per :class:`BackendError` code: the gRPC statuses (raw path) and the
#: SDK's ``MomentoErrorCode`` names (SDK path, when an error carries no gRPC
#: status) that become it. Everything else is ``internal``.
_ERROR_TABLE: tuple[tuple[str, tuple[grpc.StatusCode, ...], tuple[str, ...]], ...] = (
    ("timeout", (grpc.StatusCode.DEADLINE_EXCEEDED,), ("TIMEOUT_ERROR",)),
    ("unavailable", (grpc.StatusCode.UNAVAILABLE,), ("SERVER_UNAVAILABLE", "CONNECTION_ERROR")),
    ("limit_exceeded", (grpc.StatusCode.RESOURCE_EXHAUSTED,), ("LIMIT_EXCEEDED_ERROR", "CLIENT_RESOURCE_EXHAUSTED")),
    ("authentication", (grpc.StatusCode.UNAUTHENTICATED,), ("AUTHENTICATION_ERROR",)),
    ("permission_denied", (grpc.StatusCode.PERMISSION_DENIED,), ("PERMISSION_ERROR",)),
    ("not_found", (grpc.StatusCode.NOT_FOUND,), ("NOT_FOUND_ERROR",)),
    (
        "invalid_argument",
        (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE),
        ("INVALID_ARGUMENT_ERROR", "BAD_REQUEST_ERROR"),
    ),
    ("failed_precondition", (grpc.StatusCode.FAILED_PRECONDITION,), ("FAILED_PRECONDITION_ERROR",)),
    ("already_exists", (grpc.StatusCode.ALREADY_EXISTS,), ("ALREADY_EXISTS_ERROR",)),
    ("cancelled", (grpc.StatusCode.CANCELLED,), ("CANCELLED_ERROR",)),
    ("unimplemented", (grpc.StatusCode.UNIMPLEMENTED,), ()),
)
#: gRPC status -> BackendError code (stats word; also the message's words).
_STATUS_CODES: dict[grpc.StatusCode, str] = {status: code for code, statuses, _ in _ERROR_TABLE for status in statuses}
#: ``MomentoErrorCode`` name -> BackendError code.
_SDK_ERROR_CODES: dict[str, str] = {name: code for code, _, names in _ERROR_TABLE for name in names}
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

    The header names above and the data channel arguments of
    :func:`_channel_options` are copied from SDK internals instead;
    ``tests/test_backend_momento.py`` checks them against the installed SDK
    and fails loudly when they move.
    """

    #: ``momento.__version__``, sent in the ``agent`` header as the SDK does
    version: str
    #: ``momento.CredentialProvider``: a dataclass with ``auth_token``,
    #: ``cache_endpoint``, ``control_endpoint``, ``port`` (443 = TLS, any
    #: other port plaintext), built by ``from_string`` (v1/legacy keys),
    #: ``from_api_key_v2`` and ``for_momento_local``
    credential_provider: Any
    #: ``momento.errors.SdkException``: what credential parsing raises; an SDK
    #: ``Error`` response's ``inner_exception``, with ``transport_details``
    #: (``.grpc.code``/``.details``/``.metadata``) when the server answered
    sdk_exception: type[Exception]
    #: ``momento.CacheClient(configuration, credential_provider, default_ttl)``:
    #: ``get``, ``set``, ``delete``, ``set_if_not_exists``, ``flush_cache``,
    #: ``create_cache``; no ``close()`` in 1.29 (``__exit__`` closes)
    cache_client: Any
    #: ``momento.Configurations`` (``InRegion.Default.v1()``) and the
    #: ``StaticGrpcConfiguration``/``StaticTransportStrategy`` it is built of
    configurations: Any
    static_grpc_configuration: Any
    static_transport_strategy: Any
    #: response families of ``momento.responses``
    cache_get: Any  # Hit(value_bytes) / Miss / Error
    cache_set: Any  # Success / Error
    cache_set_if_not_exists: Any  # Stored / NotStored / Error
    cache_delete: Any  # Success / Error
    cache_flush: Any  # Success / Error
    create_cache: Any  # Success / CacheAlreadyExists / Error
    #: ``momento.retry.RetryStrategy`` (``determine_when_to_retry(props)``,
    #: ``calculate_retry_deadline(overall_deadline)``) and the preset's
    #: ``DefaultEligibilityStrategy`` (INTERNAL/UNAVAILABLE of idempotent RPCs)
    retry_strategy: Any
    eligibility_strategy: Any


#: gRPC reconnect backoff after an outage (gRPC's default grows to 120 s, so
#: after a long outage a channel could refuse calls for two minutes after
#: Momento is back). Added to every data channel, the SDK's and ours alike,
#: so that both keep sharing one connection (identical channel arguments).
RECONNECT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)

#: The SDK module whose ``grpc_data_channel_options_from_grpc_config`` builds
#: a ``CacheClient``'s channel arguments (private: the canary test pins it).
SDK_CHANNEL_OPTIONS_MODULE = "momento.internal.synchronous._scs_grpc_manager"
SDK_CHANNEL_OPTIONS_FUNCTION = "grpc_data_channel_options_from_grpc_config"


def _shorten_sdk_reconnect_backoff() -> None:
    """Give the SDK's data channels :data:`RECONNECT_OPTIONS` too.

    The SDK takes no channel arguments, so its option builder is wrapped in
    the module that calls it (idempotent). This is the one use of SDK
    internals at run time; ``tests/test_backend_momento.py`` fails loudly if
    the function moves.
    """
    import importlib

    module = importlib.import_module(SDK_CHANNEL_OPTIONS_MODULE)
    original = getattr(module, SDK_CHANNEL_OPTIONS_FUNCTION)
    if getattr(original, "mproxy_reconnect_backoff", False):
        return

    def with_reconnect_backoff(grpc_config: Any) -> list[tuple[str, Any]]:
        return [*original(grpc_config), *RECONNECT_OPTIONS]

    with_reconnect_backoff.mproxy_reconnect_backoff = True  # type: ignore[attr-defined]
    setattr(module, SDK_CHANNEL_OPTIONS_FUNCTION, with_reconnect_backoff)


def sdk_contract() -> SdkContract:
    """Import the SDK and gather what mproxy uses of it (the only SDK access).

    Raises ``ImportError``/``AttributeError`` naming the missing piece when
    the SDK moved.
    """
    _shorten_sdk_reconnect_backoff()
    import momento
    from momento.config.transport.transport_strategy import StaticGrpcConfiguration, StaticTransportStrategy
    from momento.errors import SdkException
    from momento.responses import CacheDelete, CacheFlush, CacheGet, CacheSet, CacheSetIfNotExists, CreateCache
    from momento.retry import DefaultEligibilityStrategy, RetryStrategy

    return SdkContract(
        version=momento.__version__,
        credential_provider=momento.CredentialProvider,
        sdk_exception=SdkException,
        cache_client=momento.CacheClient,
        configurations=momento.Configurations,
        static_grpc_configuration=StaticGrpcConfiguration,
        static_transport_strategy=StaticTransportStrategy,
        cache_get=CacheGet,
        cache_set=CacheSet,
        cache_set_if_not_exists=CacheSetIfNotExists,
        cache_delete=CacheDelete,
        cache_flush=CacheFlush,
        create_cache=CreateCache,
        retry_strategy=RetryStrategy,
        eligibility_strategy=DefaultEligibilityStrategy,
    )


#: Retries of a failed SDK call (``InRegion.Default.v1()``'s ``FixedCountRetryStrategy``).
SDK_MAX_RETRIES = 3
#: Least time left for which a failed SDK call is still retried.
_MIN_RETRY_SECONDS = 0.001

_retry_strategy_class: Any = None


def _deadline_retry_strategy(sdk: SdkContract) -> Any:
    """The preset's retries (:data:`SDK_MAX_RETRIES` immediate retries of
    INTERNAL/UNAVAILABLE for idempotent calls), but within one deadline: a
    retry gets what is left of the first attempt's deadline, not a fresh one
    (the preset's ``FixedCountRetryStrategy`` gives every attempt the full
    deadline: 4 slow failures took 4x ``request_timeout``)."""
    global _retry_strategy_class
    if _retry_strategy_class is None:

        class DeadlineRetryStrategy(sdk.retry_strategy):  # type: ignore[name-defined,misc]
            def __init__(self) -> None:
                self._eligibility = sdk.eligibility_strategy()

            def determine_when_to_retry(self, props: Any) -> float | None:
                if props.attempt_number > SDK_MAX_RETRIES or not self._eligibility.is_eligible_for_retry(props):
                    return None
                if props.overall_deadline is not None and _seconds_until(props.overall_deadline) < _MIN_RETRY_SECONDS:
                    return None
                return 0.0

            def calculate_retry_deadline(self, overall_deadline: Any) -> float:
                return max(_seconds_until(overall_deadline), _MIN_RETRY_SECONDS)

        _retry_strategy_class = DeadlineRetryStrategy
    return _retry_strategy_class()


def _seconds_until(deadline: Any) -> float:
    """Seconds from now to a naive local ``datetime`` (the SDK's retry deadlines)."""
    return float((deadline - datetime.now()).total_seconds())


def _sdk_configuration(sdk: SdkContract, request_timeout: float, channel_id: int) -> Any:
    """The SDK ``Configuration`` of one ``CacheClient``.

    ``InRegion.Default.v1()`` with ``request_timeout`` as its deadline and its
    retries kept within that deadline (:func:`_deadline_retry_strategy`).
    ``with_client_timeout`` rebuilds the gRPC settings from defaults, so they
    are built again here, copying every setting of the preset except the
    send limit, which is ``SDK_MAX_MESSAGE_BYTES + channel_id``: distinct
    channel arguments make a distinct TCP connection (module docstring).
    """
    base = sdk.configurations.InRegion.Default.v1().with_client_timeout(timedelta(seconds=request_timeout))
    preset = base.get_transport_strategy().get_grpc_configuration()
    permit = preset.get_keepalive_permit_without_calls()
    grpc_config = sdk.static_grpc_configuration(
        deadline=preset.get_deadline(),
        root_certificates_pem=preset.get_root_certificates_pem(),
        max_send_message_length=(preset.get_max_send_message_length() or SDK_MAX_MESSAGE_BYTES) + channel_id,
        max_receive_message_length=preset.get_max_receive_message_length(),
        keepalive_permit_without_calls=None if permit is None else bool(permit),
        keepalive_time=preset.get_keepalive_time(),
        keepalive_timeout=preset.get_keepalive_timeout(),
    )
    return base.with_transport_strategy(sdk.static_transport_strategy(grpc_config)).with_retry_strategy(
        _deadline_retry_strategy(sdk)
    )


def _channel_options(grpc_config: Any) -> list[tuple[str, int]]:
    """The channel arguments the SDK gives a data channel of ``grpc_config``
    (``momento.internal._utilities._grpc_channel_options.
    grpc_data_channel_options_from_grpc_config``): a raw channel with exactly
    these shares the ``CacheClient``'s connection."""
    send = grpc_config.get_max_send_message_length()
    receive = grpc_config.get_max_receive_message_length()
    options = [
        ("grpc.max_send_message_length", SDK_MAX_MESSAGE_BYTES if send is None else send),
        ("grpc.max_receive_message_length", SDK_MAX_MESSAGE_BYTES if receive is None else receive),
        ("grpc.service_config_disable_resolution", 1),
    ]
    permit = grpc_config.get_keepalive_permit_without_calls()
    if permit is not None:
        options.append(("grpc.keepalive_permit_without_calls", permit))
    for name, value in (
        ("grpc.keepalive_time_ms", grpc_config.get_keepalive_time()),
        ("grpc.keepalive_timeout_ms", grpc_config.get_keepalive_timeout()),
    ):
        if value is not None:
            options.append((name, int(value.total_seconds() * 1000)))
    options.extend(RECONNECT_OPTIONS)
    return options


_channel_ids_lock = threading.Lock()
_channel_ids: set[int] = set()


def _take_channel_ids(count: int) -> list[int]:
    """``count`` channel ids no live backend of this process uses (smallest first)."""
    with _channel_ids_lock:
        taken = list(itertools.islice((i for i in itertools.count() if i not in _channel_ids), count))
        _channel_ids.update(taken)
    return taken


def _release_channel_ids(ids: Sequence[int]) -> None:
    with _channel_ids_lock:
        _channel_ids.difference_update(ids)


def _sdk_ttl(ttl_ms: int) -> timedelta:
    """A TTL in ms as the SDK wants it. The SDK truncates ``total_seconds() *
    1000``, which loses a millisecond for about 1 % of values; half a
    millisecond more makes it exact."""
    return timedelta(milliseconds=ttl_ms, microseconds=500)


# ---- where to connect ----------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where and how a backend connects: data and control targets, TLS, token."""

    data_target: str
    control_target: str
    secure: bool
    auth_token: str = ""
    #: the ``momento.CredentialProvider`` it came from (what ``CacheClient`` needs)
    credentials: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def from_credentials(cls, provider: Any) -> Endpoint:
        """From a ``momento.CredentialProvider`` (the SDK's transport rule: port 443 = TLS)."""
        if provider.port == 443:
            return cls(provider.cache_endpoint, provider.control_endpoint, True, provider.auth_token, provider)
        return cls(
            f"{provider.cache_endpoint}:{provider.port}",
            f"{provider.control_endpoint}:{provider.port}",
            False,
            provider.auth_token,
            provider,
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
    #: PLACEHOLDER until s7-momento lands (it owns this attribute): keys of one GetBatch
    max_batch_keys = GET_BATCH_SIZE

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
        credentials = endpoint.credentials
        if credentials is None:
            raise ValueError("the endpoint carries no CredentialProvider: build it with Endpoint.from_credentials")
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
        if _gevent_patched():
            prepare_gevent()  # before the first channel of this process
        sdk = sdk_contract()
        headers = (
            (AUTHORIZATION_HEADER, endpoint.auth_token),
            (AGENT_HEADER, f"python:cache:{sdk.version}"),
            (RUNTIME_VERSION_HEADER, f"python {platform.python_version()}"),
        )
        self._data_metadata = ((CACHE_HEADER, cache_name), *headers)
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
        self._channel_ids = _take_channel_ids(connection_count)
        self._clients: list[Any] = []
        self._channels: list[grpc.Channel] = []
        try:
            for channel_id in self._channel_ids:
                configuration = _sdk_configuration(sdk, request_timeout, channel_id)
                grpc_config = configuration.get_transport_strategy().get_grpc_configuration()
                # the constructor connects nothing (that happens on the first call)
                self._clients.append(sdk.cache_client(configuration, credentials, timedelta(seconds=self._default_ttl)))
                self._channels.append(_channel(endpoint, grpc_config))
        except BaseException:
            self._close_connections()
            raise
        self._next_client = itertools.cycle(self._clients).__next__
        self._stubs = [pb_grpc.ScsStub(channel) for channel in self._channels]
        self._next_stub = itertools.cycle(self._stubs).__next__

    def __repr__(self) -> str:
        return f"MomentoBackend(cache={self.cache_name!r}, connections={len(self._clients)})"

    # -- Backend ------------------------------------------------------------

    def get_many(self, keys: Sequence[bytes], with_cas: bool = False) -> dict[bytes, Item]:
        """Get for one key, GetBatch (concurrent batches of :data:`GET_BATCH_SIZE`) for more.
        The CAS unique (a hash of the stored bytes) is computed for gets only."""
        with self._call("get") as deadline:
            found = self._get_values(list(dict.fromkeys(keys)), deadline, "get")
        return {key: self._item(stored, with_cas) for key, stored in found.items()}

    def touch_many(self, keys: Sequence[bytes], exptime: int, with_cas: bool = False) -> dict[bytes, Item]:
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
                try:
                    found = self._get_values(unique, deadline, "touch")
                except BaseException:
                    for future in first:
                        future.cancel()
                    raise
                touched = self._gather(first, "touch")
                touched += self._fan_out("UpdateTtl", requests[FAN_OUT_WINDOW:], deadline, "touch")
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
        op = mode.value
        stored = codec.encode(value, flags, self._with_flags)
        too_large = self._too_large(key, value, stored)
        if too_large:
            if mode is StoreMode.SET:
                # memcached drops the old value when a set is too large (no stale data).
                with self._call(op) as deadline:
                    self._sdk_delete(key, deadline, op)
            raise ValueTooLarge(too_large)
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
        """KeysExist, then the SDK's delete if present (two calls: see docs/compatibility.md)."""
        with self._call("delete") as deadline:
            if not self._exists(key, deadline, "delete"):
                return False
            self._sdk_delete(key, deadline, "delete")
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
                number, value = apply_delta(value, delta, incr)
                new = codec.encode(value, flags, self._with_flags)
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
                self._sdk_delete(key, deadline, "touch")
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
        """Cancel a pending flush, close the clients and channels, release an embedded server."""
        if self._closed:
            return
        self._closed = True
        self._cancel_flush()
        self._close_connections()
        if self._on_close is not None:
            self._on_close()

    def _close_connections(self) -> None:
        try:
            for client in self._clients:
                client.__exit__(None, None, None)  # momento 1.29 has no close(): __exit__ closes
            for channel in self._channels:
                channel.close()
        finally:
            _release_channel_ids(self._channel_ids)
            self._channel_ids = []

    # -- setup --------------------------------------------------------------

    def create_cache(self, timeout: float) -> None:
        """The SDK's ``create_cache`` (an existing cache is fine), after waiting
        up to ``timeout`` seconds for the server to come up (when control and
        data share the endpoint: local servers). Used with local servers only."""
        op = "create_cache"
        if self._endpoint.control_target == self._endpoint.data_target:
            ready = grpc.channel_ready_future(self._channels[0])
            try:
                ready.result(timeout=timeout)
            except grpc.FutureTimeoutError:
                ready.cancel()  # else it keeps watching the channel
                raise BackendError("timeout", f"momento timeout after {timeout:g}s on {op}") from None
        response = self._clients[0].create_cache(self.cache_name)
        if not isinstance(response, self._created):
            raise self._sdk_failure(response, op, SDK_CONTROL_TIMEOUT_SECONDS)

    # -- the operations of store() ------------------------------------------

    def _set(self, key: bytes, stored: bytes, ttl_ms: int, deadline: float, op: str) -> StoreResult:
        if ttl_ms == 0:
            self._sdk_delete(key, deadline, op)
        else:
            self._sdk_call("set", op, deadline, key, stored, _sdk_ttl(ttl_ms))
        return StoreResult.STORED

    def _add(self, key: bytes, stored: bytes, ttl_ms: int, deadline: float, op: str) -> StoreResult:
        if ttl_ms == 0:
            return StoreResult.NOT_STORED if self._exists(key, deadline, op) else StoreResult.STORED
        response = self._sdk_call("set_if_not_exists", op, deadline, key, stored, _sdk_ttl(ttl_ms))
        if isinstance(response, self._stored):
            return StoreResult.STORED
        if isinstance(response, self._not_stored):
            return StoreResult.NOT_STORED
        raise self._unexpected(response, op)

    def _replace(self, key: bytes, stored: bytes, ttl_ms: int, deadline: float, op: str) -> StoreResult:
        if ttl_ms == 0:
            if not self._exists(key, deadline, op):
                return StoreResult.NOT_STORED
            self._sdk_delete(key, deadline, op)
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
            self._sdk_delete(key, deadline, op)
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
            if self._too_large(key, value, new):
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
        except BaseException:
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
            value = self._sdk_get(keys[0], deadline, op)
            return {} if value is None else {keys[0]: value}
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
            try:
                for batch, stream in zip(window, streams):
                    found.update(_hits(batch, list(stream), op))
            except BaseException as exc:
                for stream in streams:
                    stream.cancel()
                if isinstance(exc, grpc.RpcError):
                    raise _error(exc, op, self._timeout) from None
                raise
        return found

    def _sdk_call(self, method: str, op: str, deadline: float, *args: Any) -> Any:
        """One call of the next ``CacheClient``; its ``Error`` response raised as ours."""
        self._remaining(deadline, op)  # the slot wait may have used the whole deadline
        response = getattr(self._next_client(), method)(self.cache_name, *args)
        if isinstance(response, self._sdk_errors):
            raise _sdk_error(response, op, self._timeout)
        return response

    def _sdk_get(self, key: bytes, deadline: float, op: str) -> bytes | None:
        response = self._sdk_call("get", op, deadline, key)
        if isinstance(response, self._get_hit):
            value: bytes = response.value_bytes
            return value
        if isinstance(response, self._get_miss):
            return None
        raise self._unexpected(response, op)

    def _sdk_delete(self, key: bytes, deadline: float, op: str) -> None:
        response = self._sdk_call("delete", op, deadline, key)
        if not isinstance(response, self._success):
            raise self._unexpected(response, op)

    def _sdk_failure(self, response: Any, op: str, timeout: float) -> BackendError | ValueTooLarge:
        if isinstance(response, self._sdk_errors):
            return _sdk_error(response, op, timeout)
        return self._unexpected(response, op)

    @staticmethod
    def _unexpected(response: Any, op: str) -> BackendError:
        return BackendError(
            "internal", f"momento internal error on {op}: unexpected SDK response {type(response).__qualname__}"
        )

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

    def _item(self, stored: bytes, with_cas: bool = True) -> Item:
        value, flags = codec.decode(stored, self._with_flags)
        return Item(value, flags, codec.cas_unique(stored) if with_cas else 0)

    def _too_large(self, key: bytes, value: bytes, stored: bytes) -> str:
        """Why an item does not fit (the proxy's value limit or Momento's item limit), or ``""``."""
        if len(value) > self._max_value_size:
            return f"value of {len(value)} bytes is above max_item_size ({self._max_value_size} bytes)"
        if len(key) + len(stored) > MOMENTO_MAX_ITEM_BYTES:
            return f"item of {len(key) + len(stored)} bytes is above Momento's {MOMENTO_MAX_ITEM_BYTES}-byte item limit"
        return ""

    def _ttl_ms(self, exptime: int) -> int:
        return codec.ttl_milliseconds(exptime, self._default_ttl, self._max_ttl)

    def _contention(self, op: str) -> BackendError:
        return BackendError(
            "contention", f"momento contention on {op}: the item kept changing, gave up after {MAX_ATTEMPTS} attempts"
        )

    # -- flush ---------------------------------------------------------------

    def _flush(self, op: str) -> None:
        with self._call(op) as deadline:
            self._remaining(deadline, op)
            response = self._clients[0].flush_cache(self.cache_name)  # the SDK's control deadline
            if not isinstance(response, self._success):
                raise self._sdk_failure(response, op, SDK_CONTROL_TIMEOUT_SECONDS)

    def _delayed_flush(self) -> None:
        try:
            self._flush("flush_all")
        except BackendError as err:
            log.warning("delayed flush_all of cache %s failed: %s", self.cache_name, err)

    def _cancel_flush(self) -> None:
        timer, self._flush_timer = self._flush_timer, None
        if timer is not None:
            timer.cancel()


def _channel(endpoint: Endpoint, grpc_config: Any) -> grpc.Channel:
    """A raw data channel built as the SDK builds a ``CacheClient``'s (same target,
    credentials and arguments), so it can share that client's connection."""
    options = _channel_options(grpc_config)
    if endpoint.secure:
        credentials = grpc.ssl_channel_credentials(root_certificates=grpc_config.get_root_certificates_pem())
        return grpc.secure_channel(endpoint.data_target, credentials, options=options)
    return grpc.insecure_channel(endpoint.data_target, options=options)


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


def _error(err: grpc.RpcError, op: str, timeout: float) -> BackendError | ValueTooLarge:
    """A failed RPC of our own channels as mproxy's error."""
    if isinstance(err, grpc.Call):
        return _failure(_STATUS_CODES.get(err.code(), "internal"), err.details(), err.trailing_metadata(), op, timeout)
    return _failure("internal", "", None, op, timeout)


def _sdk_error(response: Any, op: str, timeout: float) -> BackendError | ValueTooLarge:
    """An SDK ``Error`` response as mproxy's error, exactly as :func:`_error`
    would have said it: by the gRPC status when the server answered (the
    SDK keeps it in ``inner_exception.transport_details``), else by
    ``error_code`` (failures on the client side)."""
    exc = response.inner_exception
    transport = getattr(exc, "transport_details", None)
    if transport is not None:
        details = transport.grpc
        return _failure(_STATUS_CODES.get(details.code, "internal"), details.details, details.metadata, op, timeout)
    return _failure(_SDK_ERROR_CODES.get(response.error_code.name, "internal"), exc.message, None, op, timeout)


def _failure(code: str, details: str | None, trailers: Any, op: str, timeout: float) -> BackendError | ValueTooLarge:
    """One line naming the failure, never a key or value."""
    details = " ".join((details or "").split())[:_DETAILS_LIMIT]
    if code == "limit_exceeded" and _item_too_large(trailers, details):
        return ValueTooLarge(f"Momento refused the item as too large: {details}")
    if code == "timeout":
        return BackendError(code, f"momento timeout after {timeout:g}s on {op}")
    words = code.replace("_", " ")
    return BackendError(code, f"momento {words} on {op}: {details}" if details else f"momento {words} on {op}")


def _item_too_large(trailers: Any, details: str) -> bool:
    """Momento marks its item size refusals with trailer ``err: item_size_limit_exceeded``;
    gRPC's own refusal of a too large message says "larger than max"."""
    if any(key == "err" and value == "item_size_limit_exceeded" for key, value in trailers or ()):
        return True
    lowered = details.lower()
    return "item size" in lowered or "larger than max" in lowered


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
        on_close = momento_embedded.release
        host, port, where = server.host, server.port, f"the embedded Momento server at {server.host}:{server.port}"
    elif local:
        host, port = _split_host_port(local)
        where = f"the local Momento server at {local}"
    try:
        if local:
            endpoint = Endpoint.local(host, port)
        else:
            endpoint = credentials_from_env(config.momento.api_key_env, config.momento.endpoint)
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
    if local:
        try:
            backend.create_cache(LOCAL_CONNECT_TIMEOUT_SECONDS)
        except BackendError as err:
            backend.close()
            raise BackendError(err.code, f"cannot reach {where} to create cache {cache.cache_name!r}: {err}") from None
        except BaseException:
            backend.close()
            raise
    return backend


def _split_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 hosts stay bracketed: they are used in a gRPC target)."""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise BackendError("invalid_argument", f"[momento] local must be \"embedded\" or HOST:PORT, got {value!r}")
    return host, int(port)
