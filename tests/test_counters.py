"""memcached's incr/decr parsing of stored values (``mproxy.backends.counters``).

The memory backend's incr/decr tests (``tests/test_backend_memory.py``) replay
:data:`PARSE_TABLE` against a real memcached.
"""

from __future__ import annotations

import pytest

from mproxy.backends.base import COUNTER_MAX
from mproxy.backends.counters import parse_counter

#: stored value -> what memcached 1.6.18 reads from it (None: CLIENT_ERROR non-numeric).
PARSE_TABLE: list[tuple[bytes, int | None]] = [
    (b"12", 12),
    (b"12 ", 12),
    (b" 12", 12),
    (b"007", 7),
    (b"+5", 5),
    (b"\t5", 5),
    (b"5\t", 5),
    (b"5\r", 5),
    (b"\x0b5\x0c", 5),
    (b"  +7  ", 7),
    (b"12 3", 12),
    (b"12\x00x", 12),
    (b"1" + b" " * 25, 1),
    (b"18446744073709551615", COUNTER_MAX),
    (b"0" * 30 + b"7", 7),
    (b"-0", 0),
    (b"-18446744073709551615", 1),
    (b"-9223372036854775809", 2**63 - 1),
    (b"-9223372036854775808", None),
    (b"-5", None),
    (b"abc", None),
    (b"", None),
    (b" ", None),
    (b" \t ", None),
    (b"12abc", None),
    (b"0x10", None),
    (b"- 5", None),
    (b"+-5", None),
    (b"18446744073709551616", None),
    (b"123456789012345678901", None),
]


@pytest.mark.parametrize(("stored", "expected"), PARSE_TABLE)
def test_parse_counter(stored: bytes, expected: int | None) -> None:
    assert parse_counter(stored) == expected


def test_parse_counter_is_linear_on_hostile_values() -> None:
    # A quadratic regex would take minutes on these.
    assert parse_counter(b"0" * 2**20 + b"x") is None
    assert parse_counter(b" " * 2**20) is None
    assert parse_counter(b"1" * 2**20) is None
