"""How mproxy reaches Momento: the SDK contract, gevent, channels, call slots.

The SDK contract
----------------
The only module of mproxy that imports the ``momento`` SDK (lazily, in
:func:`sdk_contract`). The SDK facts mproxy relies on are gathered there; the
few copied from SDK internals (header names, data channel arguments, the
channel option builder it wraps) are checked against the installed SDK by
``tests/test_backend_momento.py``, which fails loudly when they move. The SDK
logs failed requests at WARNING on the ``momentosdk`` logger; mproxy leaves
that logger alone.

Connections
-----------
Per ``[[cache]]``, ``connection_count`` ``CacheClient`` objects and as many raw
channels, used round-robin (:class:`Connections`). gRPC's global subchannel
pool shares one TCP connection between channels whose channel arguments are
identical, so client ``i`` is configured with a gRPC message size limit
``SDK_MAX_MESSAGE_BYTES + id`` (``id`` unique in the process:
:func:`take_channel_ids`), which makes every client its own HTTP/2
connection. Raw channel ``i`` uses exactly client ``i``'s channel arguments,
so on a plaintext endpoint it shares that client's connection
(``connection_count`` = N gives N data connections); TLS channels never share
(each has its own credentials object), so on the Momento service it is 2N.

Deadlines
---------
The SDK has one deadline per client (``request_timeout``; it retries
INTERNAL/UNAVAILABLE of idempotent calls up to :data:`SDK_MAX_RETRIES` times
within that deadline: :func:`sdk_configuration`); raw calls use what is left
of the command's :class:`Budget`. Both run inside a slot of ``max_in_flight``
(:class:`CallSlots`: callers wait for a slot within ``request_timeout``).
Control calls (FlushCache, CreateCache) have the SDK's fixed
:data:`SDK_CONTROL_TIMEOUT_SECONDS` deadline.

gevent
------
gRPC cooperates with gevent only after ``init_gevent`` (:func:`prepare_gevent`,
done once, before the first channel of the process).
"""

from __future__ import annotations

import importlib
import itertools
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable, Protocol

import grpc
from momento_wire_types import cacheclient_pb2_grpc as pb_grpc

from mproxy.backends.momento.errors import timeout_error

#: The SDK's gRPC message size limit (its ``DEFAULT_MAX_MESSAGE_SIZE``): client
#: ``i`` sends at most this + its channel id (see :func:`sdk_configuration`).
SDK_MAX_MESSAGE_BYTES = 5_243_000
#: The SDK's fixed deadline of control calls (FlushCache, CreateCache): its
#: ``_scs_control_client._DEADLINE_SECONDS``, named in their timeout errors.
SDK_CONTROL_TIMEOUT_SECONDS = 60.0
#: Retries of a failed SDK call (``InRegion.Default.v1()``'s ``FixedCountRetryStrategy``).
SDK_MAX_RETRIES = 3
#: Least time left for which a failed SDK call is still retried.
_MIN_RETRY_SECONDS = 0.001

#: Metadata of every data call, as the SDK builds it
#: (``momento.internal.synchronous._utilities.make_metadata``).
CACHE_HEADER = "cache"
#: Headers the SDK's interceptors add to every call
#: (``momento.internal.synchronous._scs_grpc_manager._interceptors``).
AUTHORIZATION_HEADER = "authorization"
AGENT_HEADER = "agent"
RUNTIME_VERSION_HEADER = "runtime-version"

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


# ---- gevent ----------------------------------------------------------------------

_gevent_prepared = False


def prepare_gevent() -> None:
    """Make gRPC cooperate with gevent (``grpc.experimental.gevent.init_gevent``).

    Call once, after ``gevent.monkey.patch_all()`` and before any gRPC channel
    exists (the CLI does; the backend does it too when it finds the socket
    module patched and this was not called). Idempotent.
    """
    global _gevent_prepared
    if not _gevent_prepared:
        from grpc.experimental import gevent as grpc_gevent

        grpc_gevent.init_gevent()
        _gevent_prepared = True


def gevent_patched() -> bool:
    """Whether gevent has monkey-patched this process (without importing gevent)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


# ---- the SDK contract (the only SDK access) ------------------------------------------


@dataclass(frozen=True)
class SdkContract:
    """What mproxy takes from the momento SDK at run time (all public API).

    The header names above and the data channel arguments of
    :func:`channel_options` are copied from SDK internals instead;
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


def _shorten_sdk_reconnect_backoff() -> None:
    """Give the SDK's data channels :data:`RECONNECT_OPTIONS` too.

    The SDK takes no channel arguments, so its option builder is wrapped in
    the module that calls it (idempotent). This is the one use of SDK
    internals at run time; ``tests/test_backend_momento.py`` fails loudly if
    the function moves.
    """
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


def sdk_configuration(sdk: SdkContract, request_timeout: float, channel_id: int) -> Any:
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


def sdk_ttl(ttl_ms: int) -> timedelta:
    """A TTL in ms as the SDK wants it. The SDK truncates ``total_seconds() *
    1000``, which loses a millisecond for about 1 % of values; half a
    millisecond more makes it exact."""
    return timedelta(milliseconds=ttl_ms, microseconds=500)


# ---- channels ----------------------------------------------------------------------


def channel_options(grpc_config: Any) -> list[tuple[str, int]]:
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


def _data_channel(target: str, secure: bool, grpc_config: Any) -> grpc.Channel:
    """A raw data channel built as the SDK builds a ``CacheClient``'s (same target,
    credentials and arguments), so it can share that client's connection."""
    options = channel_options(grpc_config)
    if secure:
        credentials = grpc.ssl_channel_credentials(root_certificates=grpc_config.get_root_certificates_pem())
        return grpc.secure_channel(target, credentials, options=options)
    return grpc.insecure_channel(target, options=options)


_channel_ids_lock = threading.Lock()
_channel_ids: set[int] = set()


def take_channel_ids(count: int) -> list[int]:
    """``count`` channel ids no live backend of this process uses (smallest first)."""
    with _channel_ids_lock:
        taken = list(itertools.islice((i for i in itertools.count() if i not in _channel_ids), count))
        _channel_ids.update(taken)
    return taken


def release_channel_ids(ids: Sequence[int]) -> None:
    with _channel_ids_lock:
        _channel_ids.difference_update(ids)


class Connections:
    """``count`` SDK ``CacheClient`` objects and as many raw ``ScsStub`` objects,
    pair ``i`` on channel id ``i`` (module docstring), used round-robin.

    ``credentials`` is the ``momento.CredentialProvider`` of ``data_target``
    (TLS when ``secure``); ``default_ttl`` is the clients' default TTL in
    seconds (mproxy's calls pass their own). Nothing connects before the
    first call.
    """

    def __init__(
        self,
        sdk: SdkContract,
        credentials: Any,
        data_target: str,
        secure: bool,
        count: int,
        request_timeout: float,
        default_ttl: int,
    ) -> None:
        self.channel_ids = take_channel_ids(count)
        self.clients: list[Any] = []
        self._channels: list[grpc.Channel] = []
        try:
            for channel_id in self.channel_ids:
                configuration = sdk_configuration(sdk, request_timeout, channel_id)
                grpc_config = configuration.get_transport_strategy().get_grpc_configuration()
                self.clients.append(sdk.cache_client(configuration, credentials, timedelta(seconds=default_ttl)))
                self._channels.append(_data_channel(data_target, secure, grpc_config))
        except BaseException:
            self.close()
            raise
        self.next_client: Callable[[], Any] = itertools.cycle(self.clients).__next__
        self.next_stub: Callable[[], Any] = itertools.cycle(
            [pb_grpc.ScsStub(channel) for channel in self._channels]
        ).__next__

    def wait_ready(self, timeout: float) -> bool:
        """Whether the first raw channel connects within ``timeout`` seconds."""
        ready = grpc.channel_ready_future(self._channels[0])
        try:
            ready.result(timeout=timeout)
        except grpc.FutureTimeoutError:
            ready.cancel()  # else it keeps watching the channel
            return False
        return True

    def close(self) -> None:
        """Close the clients and channels; release the channel ids."""
        try:
            for client in self.clients:
                client.__exit__(None, None, None)  # momento 1.29 has no close(): __exit__ closes
            for channel in self._channels:
                channel.close()
        finally:
            release_channel_ids(self.channel_ids)
            self.channel_ids = []


# ---- call slots and budgets ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Budget:
    """The time one backend command may take: ``op`` names the command in
    errors, ``deadline`` (``time.monotonic()``) is when it must be done,
    ``timeout`` the seconds it was given (named in timeout errors)."""

    op: str
    deadline: float
    timeout: float

    def remaining(self) -> float:
        """Seconds left; raises the command's timeout :class:`BackendError` when none are."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise timeout_error(self.op, self.timeout)
        return left


class _Semaphore(Protocol):
    def acquire(self, blocking: bool = ..., timeout: float | None = ...) -> bool: ...

    def release(self) -> None: ...


class CallSlots:
    """At most ``size`` commands in flight; each gets ``timeout`` seconds,
    waiting for its slot included. A gevent semaphore when gevent has patched
    the process, else a thread one."""

    def __init__(self, size: int, timeout: float) -> None:
        self.timeout = timeout
        self._semaphore: _Semaphore
        if gevent_patched():
            from gevent.lock import BoundedSemaphore

            self._semaphore = BoundedSemaphore(size)
        else:
            self._semaphore = threading.BoundedSemaphore(size)

    @contextmanager
    def take(self, op: str) -> Iterator[Budget]:
        """Hold a slot for the command ``op``; its :class:`Budget` starts before the wait."""
        budget = Budget(op, time.monotonic() + self.timeout, self.timeout)
        if not self._semaphore.acquire(timeout=self.timeout):
            raise timeout_error(op, self.timeout, "waiting for a free call slot")
        try:
            yield budget
        finally:
            self._semaphore.release()
