"""A Momento backend from the configuration: :func:`from_config`."""

from __future__ import annotations

from typing import Callable, Protocol

from mproxy.backends.base import BackendError
from mproxy.backends.momento import embedded
from mproxy.backends.momento.backend import MomentoBackend
from mproxy.backends.momento.endpoint import Endpoint, credentials_from_env

#: How long creating the cache on a local server may wait for it to answer.
LOCAL_CONNECT_TIMEOUT_SECONDS = 10.0


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
    """What :func:`from_config` reads from ``[momento]`` (parsed by ``mproxy.config``)."""

    local: str
    api_key_env: str
    endpoint: str

    @property
    def local_address(self) -> tuple[str, int] | None: ...


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
    ``"HOST:PORT"`` (``"[v6]:PORT"``) = a plaintext Momento-compatible server.
    With a local server the cache is created if missing (the service's
    caches are not). Raises :class:`BackendError` naming what failed.
    """
    momento = config.momento
    address = momento.local_address
    on_close: Callable[[], None] | None = None
    where = ""  # a local server, named in errors
    if address is not None:
        where = f"the local Momento server at {momento.local}"
    elif momento.local:  # not HOST:PORT, so "embedded"
        try:
            server = embedded.acquire()
        except embedded.EmbeddedServerError as exc:
            raise BackendError("unavailable", str(exc)) from exc
        on_close = embedded.release
        address = server.host, server.port
        where = f"the embedded Momento server at {server.host}:{server.port}"
    try:
        if address is not None:
            endpoint = Endpoint.local(*address)
        else:
            endpoint = credentials_from_env(momento.api_key_env, momento.endpoint)
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
        except BaseException:
            backend.close()
            raise
    return backend
