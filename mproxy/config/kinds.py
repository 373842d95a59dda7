"""Value kinds: how a TOML value becomes a Python value, and how it is described.

A kind (:class:`_Kind`) coerces a raw TOML value for one option, raising
:class:`_Invalid` when it does not fit (:mod:`mproxy.config.loader` turns that
into a :class:`~mproxy.config.ConfigError`), and says what a valid value looks
like, for error messages and for the type column of the reference. A kind reads
only the bounds, choices and aliases of the option it checks (:class:`_Spec`,
which :class:`mproxy.config.options.Option` is). Also here: the host, port and
server-entry syntax the kinds accept, and how a value is written back as TOML.

Stdlib only.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

#: ``[momento] local`` value that starts the bundled local server.
LOCAL_EMBEDDED = "embedded"


class _Invalid(Exception):
    """Raised by a kind's coercion; the loader turns it into a ConfigError."""


class _Spec(Protocol):
    """What a kind reads of the option it checks (:class:`mproxy.config.options.Option`)."""

    @property
    def kind(self) -> _Kind: ...

    @property
    def choices(self) -> tuple[str, ...]: ...

    @property
    def aliases(self) -> Mapping[str, str]: ...

    @property
    def min(self) -> float | None: ...

    @property
    def max(self) -> float | None: ...


@dataclass(frozen=True, slots=True)
class _Kind:
    """A value kind: its coercion (raising :class:`_Invalid`), what a valid value
    looks like (error messages) and its type column in the reference."""

    coerce: Callable[[object, _Spec], object]
    expected: Callable[[_Spec], str]
    type_doc: Callable[[_Spec], str]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_range(number: float, option: _Spec) -> None:
    if option.min is not None and number < option.min:
        raise _Invalid
    if option.max is not None and number > option.max:
        raise _Invalid


def _coerce_str(value: object, option: _Spec) -> str:
    if not isinstance(value, str) or (option.min is not None and len(value) < option.min):
        raise _Invalid
    return value


def _coerce_int(value: object, option: _Spec) -> int:
    if not _is_int(value):
        raise _Invalid
    assert isinstance(value, int)
    _check_range(value, option)
    return value


def _coerce_number(value: object, option: _Spec) -> float:
    if not (_is_int(value) or isinstance(value, float)):
        raise _Invalid
    assert isinstance(value, (int, float))
    number = float(value)
    if not math.isfinite(number):
        raise _Invalid
    _check_range(number, option)
    return number


def _coerce_bool(value: object, option: _Spec) -> bool:
    if not isinstance(value, bool):
        raise _Invalid
    return value


def _coerce_port(value: object, option: _Spec) -> int:
    # momento-proxy (pelikan) declares ports as strings: accept "11211" too.
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if not _is_int(value):
        raise _Invalid
    assert isinstance(value, int)
    if not 0 <= value <= 65535:
        raise _Invalid
    return value


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?$")


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return bool(_HOSTNAME.match(host))
    return True


def _coerce_host(value: object, option: _Spec) -> str:
    if not isinstance(value, str) or not _valid_host(value):
        raise _Invalid
    return value


def _coerce_choice(value: object, option: _Spec) -> str:
    if not isinstance(value, str):
        raise _Invalid
    word = value.lower()
    word = option.aliases.get(word, word)
    if word not in option.choices:
        raise _Invalid
    return word


def _split_host_port(text: str) -> tuple[str, int] | None:
    """``"HOST:PORT"`` (``"[v6]:PORT"`` for IPv6) -> (host, port), or None."""
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()):
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    elif ":" in host or not _valid_host(host):
        return None
    number = int(port)
    if not 1 <= number <= 65535:
        return None
    return host, number


def _coerce_local(value: object, option: _Spec) -> str:
    if not isinstance(value, str):
        raise _Invalid
    if value in ("", LOCAL_EMBEDDED) or _split_host_port(value) is not None:
        return value
    raise _Invalid


def _split_server(text: str) -> tuple[str, int, int] | None:
    """``"HOST:PORT"`` or ``"HOST:PORT:WEIGHT"`` (a memcached client's server entry) ->
    (host, port, weight), or None."""
    place = _split_host_port(text)
    if place is not None:
        return place[0], place[1], 1
    head, sep, weight = text.rpartition(":")
    place = _split_host_port(head) if sep and weight.isascii() and weight.isdigit() else None
    if place is None or int(weight) < 1:
        return None
    return place[0], place[1], int(weight)


def _coerce_servers(value: object, option: _Spec) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and _split_server(v) for v in value):
        raise _Invalid
    return tuple(value)


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _coerce_env_name(value: object, option: _Spec) -> str:
    if not isinstance(value, str) or not _ENV_NAME.match(value):
        raise _Invalid
    return value


def _bounds(option: _Spec) -> str:
    """`` 1-10``, `` >= 1``, `` <= 10`` or ``""``: the option's range."""
    lo, hi = option.min, option.max
    fmt = (lambda n: f"{n:g}") if option.kind in (_SECONDS, _NUMBER) else (lambda n: f"{int(n)}")
    if lo is not None and hi is not None:
        return f" {fmt(lo)}-{fmt(hi)}"
    if lo is not None:
        return f" >= {fmt(lo)}"
    if hi is not None:
        return f" <= {fmt(hi)}"
    return ""


def _fixed(text: str) -> Callable[[_Spec], str]:
    return lambda option: text


_STRING = _Kind(
    _coerce_str,
    lambda o: "a non-empty string" if o.min else "a string",
    lambda o: "non-empty string" if o.min else "string",
)
_INT = _Kind(_coerce_int, lambda o: "an integer" + _bounds(o), lambda o: "integer" + _bounds(o))
_SECONDS = _Kind(
    _coerce_number,
    lambda o: "a number of seconds" + _bounds(o),
    lambda o: "seconds (number)" + _bounds(o),
)
_NUMBER = _Kind(_coerce_number, lambda o: "a number" + _bounds(o), lambda o: "number" + _bounds(o))
_BOOL = _Kind(_coerce_bool, _fixed("true or false"), _fixed("boolean"))
_SERVERS = _Kind(
    _coerce_servers,
    _fixed('a list of "HOST:PORT" or "HOST:PORT:WEIGHT" strings'),
    _fixed('list of `"HOST:PORT"` or `"HOST:PORT:WEIGHT"`'),
)
_PORT = _Kind(
    _coerce_port, _fixed("an integer port 0-65535"), _fixed("port 0-65535 (integer or string)")
)
_HOST = _Kind(_coerce_host, _fixed("a host name or IP address"), _fixed("host name or IP address"))
_CHOICE = _Kind(
    _coerce_choice,
    lambda o: "one of " + ", ".join(f'"{c}"' for c in o.choices),
    lambda o: " \\| ".join(f'`"{c}"`' for c in o.choices),
)
_LOCAL = _Kind(
    _coerce_local,
    _fixed('"" (the Momento service), "embedded" or "HOST:PORT"'),
    _fixed('`""` \\| `"embedded"` \\| `"HOST:PORT"`'),
)
_ENV = _Kind(
    _coerce_env_name,
    _fixed("an environment variable name (letters, digits, _)"),
    _fixed("environment variable name"),
)


def _toml_value(value: object) -> str:
    """A scalar as a TOML literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        out = ['"']
        for ch in value:
            if ch == '"' or ch == "\\":
                out.append("\\" + ch)
            elif ch == "\t":
                out.append(ch)
            elif ord(ch) < 0x20 or ord(ch) == 0x7F:
                out.append(f"\\u{ord(ch):04X}")
            else:
                out.append(ch)
        out.append('"')
        return "".join(out)
    raise TypeError(f"not a TOML scalar: {type(value).__name__}")
