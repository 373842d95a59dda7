"""C's number parsing as memcached's ``safe_strto*`` helpers use it (``util.c``).

Stdlib only; shared by the parser of the classic commands and of the meta commands.
"""

from __future__ import annotations

_SPACE = frozenset(b" \t\n\v\f\r")  # C isspace()
_U64 = 2**64
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


def _strto(token: bytes, unsigned: bool) -> int | None:
    """C ``strtoull``/``strtoll`` (base 10) as memcached's ``safe_strto*`` use them.

    Returns None where memcached's helper returns false: no digits, range
    error, or a character after the digits that is not white space."""
    n = len(token)
    i = 0
    while i < n and token[i] in _SPACE:
        i += 1
    negative = False
    if i < n and token[i] in b"+-":
        negative = token[i] == 45
        i += 1
    j = i
    while j < n and 48 <= token[j] <= 57:
        j += 1
    if j == i:
        return None
    if j < n and token[j] not in _SPACE:
        return None
    value = int(token[i:j])
    if unsigned:
        if value >= _U64:
            return None
        if negative:
            value = (-value) % _U64
            # safe_strtoull refuses a '-' only when the result looks negative
            if value >= 2**63:
                return None
        return value
    value = -value if negative else value
    if not _I64_MIN <= value <= _I64_MAX:
        return None
    return value


# Each parse_* first takes the usual token, plain digits short enough not to reach
# its range (``bytes.isdigit`` is ASCII digits only), with one int(); _strto does the rest.


def parse_u64(token: bytes) -> int | None:
    """memcached ``safe_strtoull``: delta, cas unique."""
    if len(token) < 20 and token.isdigit():
        return int(token)
    return _strto(token, unsigned=True)


def parse_u32(token: bytes) -> int | None:
    """memcached ``safe_strtoul`` into a ``uint32_t``: flags (truncated to 32 bits)."""
    if len(token) < 10 and token.isdigit():
        return int(token)
    value = _strto(token, unsigned=True)
    return None if value is None else value & 0xFFFFFFFF


def parse_i32(token: bytes) -> int | None:
    """memcached ``safe_strtol`` into an ``int32_t``: exptime, byte count (wraps)."""
    if len(token) < 10 and token.isdigit():
        return int(token)
    value = _strto(token, unsigned=False)
    if value is None:
        return None
    value &= 0xFFFFFFFF
    return value - 2**32 if value >= 2**31 else value
