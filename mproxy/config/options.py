"""The declaration: :class:`Option` records carried by dataclass fields.

Every option is declared once, as a dataclass field made by :func:`_option`
(or :func:`_tls`, for the TLS keys every listener shares): its default, kind
(:mod:`mproxy.config.kinds`), help text, choices / bounds, and whether a reload
applies it. :mod:`mproxy.config.schema` declares the sections with them.

Stdlib only (with :mod:`mproxy.tls`, for the TLS keys' choices).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from mproxy import tls
from mproxy.config.kinds import _BOOL, _CHOICE, _STRING, _Kind


@dataclass(frozen=True, slots=True)
class Option:
    """One configuration key, as declared on its dataclass field.

    ``section`` and ``key`` are filled in when :data:`~mproxy.config.schema.OPTIONS` is built;
    ``default`` is ``dataclasses.MISSING`` for a required key.
    """

    kind: _Kind
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)
    min: float | None = None
    max: float | None = None
    #: never echo the value in errors (it may be a secret typed in the wrong place)
    redact: bool = False
    #: a reload (SIGHUP) applies a new value at once; otherwise it waits for a restart
    #: (see :func:`~mproxy.config.reload`; ``mproxy.app`` applies the running configuration)
    reload: bool = False
    section: str = ""
    key: str = ""

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    def expected(self) -> str:
        """What a valid value looks like, for error messages."""
        return self.kind.expected(self)

    def type_doc(self) -> str:
        """The type column of the reference (Markdown)."""
        return self.kind.type_doc(self)


#: The metadata key of a section's dataclass field that carries its :class:`Option`.
_OPTION_KEY = "mproxy.option"


def _option(
    default: Any,
    kind: _Kind,
    help: str,
    *,
    choices: tuple[str, ...] = (),
    aliases: Mapping[str, str] | None = None,
    min: float | None = None,
    max: float | None = None,
    redact: bool = False,
    reload: bool = False,
) -> Any:
    """Declare one option: a dataclass field carrying its :class:`Option`."""
    spec = Option(kind, default, help, choices, dict(aliases or {}), min, max, redact, reload)
    if default is dataclasses.MISSING:
        return field(metadata={_OPTION_KEY: spec})
    return field(default=default, metadata={_OPTION_KEY: spec})


#: The TLS keys of a listener (memcached's ``-Z`` and ``ssl_*`` options, see
#: :mod:`mproxy.tls`), declared once for ``[[cache]]`` and ``[admin]``: :func:`_tls`.
_TLS_OPTIONS: dict[str, Option] = {
    "tls": Option(
        _BOOL,
        False,
        "Serve TLS on this listener (memcached `-Z`); needs `tls_cert` and `tls_key`. The "
        "handshake runs in the connection's own greenlet: one that fails, or is not done "
        f"within {tls.HANDSHAKE_TIMEOUT:g} s (a plaintext client, a stalled one), closes that "
        "connection and counts in the stat `ssl_handshake_errors`.",
        reload=True,
    ),
    "tls_cert": Option(
        _STRING,
        "",
        "PEM file: the listener's certificate, then any intermediate certificates (memcached "
        "`ssl_chain_cert`). Every reload (SIGHUP) reads the TLS files again: renew them in "
        "place, then reload; connections made after it get the new certificate.",
        reload=True,
    ),
    "tls_key": Option(
        _STRING,
        "",
        "PEM file: the certificate's private key, unencrypted (memcached `ssl_key`). mproxy "
        "warns at start if others may read it (or its group, unless root owns it).",
        reload=True,
    ),
    "tls_ca": Option(
        _STRING,
        "",
        "PEM file: the CA certificates client certificates are checked against (memcached "
        "`ssl_ca_cert`); needed when `tls_verify` is not `none`.",
        reload=True,
    ),
    "tls_verify": Option(
        _CHOICE,
        "none",
        "Client certificates (memcached `ssl_verify_mode` 0, 1, 2): `none`: not asked for; "
        "`optional`: asked for, and one that does not verify against `tls_ca` is refused; "
        "`require`: a client without a valid one is refused.",
        choices=tuple(tls.VERIFY),
        reload=True,
    ),
    "tls_min_version": Option(
        _CHOICE,
        "1.2",
        "Oldest TLS version accepted (memcached `ssl_min_version`; its `tlsv1.2`, `tlsv1.3` "
        "are accepted too).",
        choices=tuple(tls.MIN_VERSIONS),
        aliases={f"tlsv{v}": v for v in tls.MIN_VERSIONS},
        reload=True,
    ),
    "tls_ciphers": Option(
        _STRING,
        "",
        "OpenSSL cipher list for TLS 1.2 (memcached `ssl_ciphers`); empty = OpenSSL's "
        "default. TLS 1.3 uses OpenSSL's TLS 1.3 suites.",
        reload=True,
    ),
}


def _tls(key: str) -> Any:
    """The field of TLS key ``key`` (:data:`_TLS_OPTIONS`)."""
    spec = _TLS_OPTIONS[key]
    return field(default=spec.default, metadata={_OPTION_KEY: spec})
