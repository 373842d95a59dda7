"""How mproxy reaches Momento: the SDK contract, channel arguments, metadata, the connection.

The SDK contract
----------------
The only module of mproxy that imports the ``momento`` SDK (lazily, in
:func:`sdk_contract`). mproxy takes from it what it gives: credentials
(``CredentialProvider``, read by :mod:`.endpoint`), the configuration preset
``InRegion.Default.v1()`` (deadline, keepalive, message sizes and root
certificates of mproxy's channels), the control calls (CreateCache,
FlushCache: ``CacheClientAsync``, run on the transport's loop) and the retry
rule of its ``DefaultEligibilityStrategy``. The data calls go through the
generated stubs (``momento_wire_types``) with the SDK's metadata. A few facts
are copied from SDK internals (header names, the data channel arguments, the
preset's retry count); ``tests/test_backend_momento.py`` checks them against
the installed SDK and fails loudly when they move. The SDK logs failed
requests at WARNING on the ``momentosdk`` logger; mproxy leaves that logger alone.

The connection
--------------
Per ``[[cache]]``, one :class:`Connection`: an :class:`~.aio.AioTransport`
with ``connection_count`` channels to the data endpoint (each its own HTTP/2
connection), used round-robin, and the SDK's control client, made on first
use. Every channel reconnects after an outage with a backoff of at most a
second (:data:`RECONNECT_OPTIONS`).

Retries
-------
The RPCs of :data:`IDEMPOTENT_RPCS` are retried up to :data:`SDK_MAX_RETRIES`
times, at once, on ``UNAVAILABLE``/``INTERNAL`` (the SDK's rule), each attempt
with what is left of the RPC's deadline (:mod:`.aio`).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
from momento_wire_types import cacheclient_pb2_grpc as pb_grpc

from mproxy.backends.momento.aio import AioTransport
from mproxy.backends.momento.bridge import Call

#: The SDK's gRPC message size limit (its ``DEFAULT_MAX_MESSAGE_SIZE``).
SDK_MAX_MESSAGE_BYTES = 5_243_000
#: The SDK's fixed deadline of control calls (FlushCache, CreateCache): its
#: ``_scs_control_client._DEADLINE_SECONDS``, named in their timeout errors.
SDK_CONTROL_TIMEOUT_SECONDS = 60.0
#: Retries of a failed idempotent RPC (``InRegion.Default.v1()``'s ``FixedCountRetryStrategy``).
SDK_MAX_RETRIES = 3
#: RPCs the SDK retries (``momento.retry.default_eligibility_strategy.RETRYABLE_REQUEST_TYPES``)
#: that mproxy sends; the canary test checks the SDK still lists them.
SDK_RETRIED_RPCS = frozenset(("Get", "GetBatch", "Set", "SetBatch", "Delete", "KeysExist", "ItemGetTtl"))
#: RPCs mproxy retries: the SDK's, plus two the SDK never sends that are idempotent
#: as mproxy uses them (GetWithHash reads; UpdateTtl is only sent with ``overwrite_to``).
IDEMPOTENT_RPCS = SDK_RETRIED_RPCS | {"GetWithHash", "UpdateTtl"}

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
#: Momento is back).
RECONNECT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


# ---- the SDK contract (the only SDK access) ------------------------------------------


@dataclass(frozen=True)
class SdkContract:
    """What mproxy takes from the momento SDK at run time (public API, but the
    retry rule's two sets, which the canary test pins)."""

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
    #: ``momento.CacheClientAsync(configuration, credential_provider, default_ttl)``:
    #: ``create_cache``, ``flush_cache``; closed by ``__aexit__`` (no ``close()`` in 1.29)
    cache_client_async: Any
    #: ``momento.Configurations`` (``InRegion.Default.v1()``)
    configurations: Any
    #: response families of ``momento.responses``
    cache_flush: Any  # Success / Error
    create_cache: Any  # Success / CacheAlreadyExists / Error
    #: gRPC statuses and full method names the SDK retries
    retryable_status_codes: frozenset[grpc.StatusCode]
    retryable_request_types: frozenset[str]


def sdk_contract() -> SdkContract:
    """Import the SDK and gather what mproxy uses of it (the only SDK access).

    Raises ``ImportError``/``AttributeError`` naming the missing piece when
    the SDK moved.
    """
    import momento
    from momento.errors import SdkException
    from momento.responses import CacheFlush, CreateCache
    from momento.retry import default_eligibility_strategy as eligibility

    return SdkContract(
        version=momento.__version__,
        credential_provider=momento.CredentialProvider,
        sdk_exception=SdkException,
        cache_client_async=momento.CacheClientAsync,
        configurations=momento.Configurations,
        cache_flush=CacheFlush,
        create_cache=CreateCache,
        retryable_status_codes=frozenset(eligibility.RETRYABLE_STATUS_CODES),
        retryable_request_types=frozenset(eligibility.RETRYABLE_REQUEST_TYPES),
    )


def sdk_configuration(sdk: SdkContract, request_timeout: float) -> Any:
    """The SDK ``Configuration`` mproxy's channels follow: ``InRegion.Default.v1()``
    with ``request_timeout`` as its deadline."""
    return sdk.configurations.InRegion.Default.v1().with_client_timeout(timedelta(seconds=request_timeout))


def channel_options(grpc_config: Any) -> list[tuple[str, int]]:
    """The channel arguments the SDK gives a data channel of ``grpc_config``
    (``momento.internal._utilities._grpc_channel_options.
    grpc_data_channel_options_from_grpc_config``), then :data:`RECONNECT_OPTIONS`."""
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


def data_metadata(sdk: SdkContract, cache_name: str, auth_token: str) -> tuple[tuple[str, str], ...]:
    """The metadata of every data call, as the SDK sends it."""
    return (
        (CACHE_HEADER, cache_name),
        (AUTHORIZATION_HEADER, auth_token),
        (AGENT_HEADER, f"python:cache:{sdk.version}"),
        (RUNTIME_VERSION_HEADER, f"python {platform.python_version()}"),
    )


# ---- the connection ------------------------------------------------------------------


class Connection:
    """The data channels of one cache and the SDK's control client (module docstring).

    ``endpoint`` is an :class:`~.endpoint.Endpoint` (its ``credentials`` the
    ``CredentialProvider`` the control client needs). Starts the transport:
    create it in the serving process (after any fork).
    """

    def __init__(self, sdk: SdkContract, endpoint: Any, count: int, request_timeout: float, default_ttl: int) -> None:
        self._sdk = sdk
        self._credentials = endpoint.credentials
        self._configuration = sdk_configuration(sdk, request_timeout)
        self._default_ttl = default_ttl
        grpc_config = self._configuration.get_transport_strategy().get_grpc_configuration()
        credentials = None
        if endpoint.secure:
            credentials = grpc.ssl_channel_credentials(root_certificates=grpc_config.get_root_certificates_pem())
        self.transport = AioTransport(
            endpoint.data_target,
            pb_grpc.ScsStub,
            options=channel_options(grpc_config),
            credentials=credentials,
            channels=count,
        )
        self.submit = self.transport.submit
        self._control: Any = None
        self.transport.start()

    def control(self, method: str, cache_name: str) -> Any:
        """``await CacheClientAsync.<method>(cache_name)`` on the transport's loop
        (the SDK's fixed control deadline); the SDK's response."""

        async def run() -> Any:
            if self._control is None:  # made on the loop, so that its channels belong to it
                self._control = self._sdk.cache_client_async(
                    self._configuration, self._credentials, timedelta(seconds=self._default_ttl)
                )
            return await getattr(self._control, method)(cache_name)

        return self.transport.submit_coroutine(run).get()

    def wait_ready(self, timeout: float) -> bool:
        """Whether the first data channel connects within ``timeout`` seconds."""
        return self.transport.wait_ready(timeout)

    def close(self, grace: float | None = None) -> None:
        """Close the control client, then the channels (see :meth:`.aio.AioTransport.close`)."""
        control, self._control = self._control, None
        if control is not None:

            async def close_control() -> None:
                await control.__aexit__(None, None, None)  # momento 1.29 has no close()

            call: Call = self.transport.submit_coroutine(close_control)
            call.wait(grace if grace else 1.0)
        self.transport.close(grace)
