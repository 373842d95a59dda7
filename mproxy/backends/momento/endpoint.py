"""Where a Momento backend connects: :class:`Endpoint`, and credentials from the environment."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from mproxy.backends.base import BackendError
from mproxy.backends.momento.transport import sdk_contract

#: The legacy environment variable of Momento API keys, always read too.
LEGACY_API_KEY_ENV = "MOMENTO_AUTHENTICATION"


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
        """A plaintext Momento-compatible server (``CredentialProvider.for_momento_local``).

        An IPv6 ``host`` (``::1``) is bracketed: the SDK and :meth:`from_credentials`
        make the gRPC target ``f"{host}:{port}"``.
        """
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
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
        problem = (
            "does not hold a Momento v2 API key, which [momento] endpoint expects (v1 keys and "
            "legacy tokens carry their endpoint: leave endpoint empty for them)"
            if endpoint
            else "does not hold a Momento API key (neither a v1 key nor a legacy token); "
            "a v2 key also needs [momento] endpoint"
        )
        raise BackendError("authentication", f"{name} {problem}") from exc
    return Endpoint.from_credentials(provider)
