"""memcached's incr/decr arithmetic on stored values, shared by every backend.

Stdlib and :mod:`mproxy.backends.base` only, no I/O: a backend reads the stored
value, calls :func:`apply_delta`, and writes the result back its own way.
"""

from __future__ import annotations

import re

from mproxy.backends.base import COUNTER_MAX, NonNumericValue

#: Largest signed 64-bit integer: ``safe_strtoull`` rejects a value with a
#: minus sign whose (wrapped) result would be negative as an int64.
_INT64_MAX = 2**63 - 1

#: What C ``strtoull`` accepts, as memcached calls it on the stored value
#: (which is always followed by CRLF in memory, so the end of the value counts
#: as whitespace): C-locale whitespace, an optional sign, decimal digits, then
#: whitespace, a NUL byte or the end of the value.
#: Leading zeros are matched apart (without overlapping the digits, so that
#: matching stays linear) to bound the significant digits before ``int()``.
_COUNTER = re.compile(rb"[ \t\n\v\f\r]*([+-]?)0*([1-9][0-9]*|0)(?:[ \t\n\v\f\r\x00]|\Z)")


def parse_counter(value: bytes) -> int | None:
    """The u64 memcached's incr/decr read from ``value``, or None if non-numeric.

    Mirrors memcached's ``safe_strtoull``: leading whitespace and a sign are
    allowed; anything after the digits must start with whitespace or NUL
    (``"12 3"`` is 12, ``"12abc"`` is not a number); more than 20 significant
    digits or above 2**64-1 is not a number; ``"-N"`` wraps as ``strtoull``
    does and is refused when the result is above 2**63-1 (``"-5"`` is refused,
    ``"-0"`` is 0, ``"-18446744073709551615"`` is 1).
    """
    match = _COUNTER.match(value)
    if match is None:
        return None
    sign, digits = match.groups()
    if len(digits) > 20:
        return None
    number = int(digits)
    if number > COUNTER_MAX:
        return None
    if sign == b"-":
        number = -number & COUNTER_MAX
        if number > _INT64_MAX:
            return None
    return number


def apply_delta(value: bytes, delta: int, incr: bool) -> tuple[int, bytes]:
    """memcached's incr/decr of a stored value: ``(new number, new value)``.

    incr wraps at 2**64, decr floors at 0; the new value is rewritten in
    place, space-padded, when its digits fit (``"100"`` decr 1 -> ``"99 "``).
    Raises :class:`base.NonNumericValue` when :func:`parse_counter` refuses it.
    """
    current = parse_counter(value)
    if current is None:
        raise NonNumericValue("cannot increment or decrement non-numeric value")
    if incr:
        number = (current + delta) & COUNTER_MAX
    else:
        number = current - delta if current > delta else 0
    return number, (b"%d" % number).ljust(len(value))
