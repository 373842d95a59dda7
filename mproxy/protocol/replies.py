"""Wire replies of the memcached text protocol (memcached 1.6, byte for byte)."""

from __future__ import annotations

from typing import Mapping

STORED = b"STORED\r\n"
NOT_STORED = b"NOT_STORED\r\n"
EXISTS = b"EXISTS\r\n"
NOT_FOUND = b"NOT_FOUND\r\n"
DELETED = b"DELETED\r\n"
TOUCHED = b"TOUCHED\r\n"
END = b"END\r\n"
OK = b"OK\r\n"
RESET = b"RESET\r\n"
#: ``stats reset`` refused (``[admin] allow_reset = false``), worded as memcached refuses its
#: disabled commands (``-F``'s flush_all, ``-X``'s stats cachedump)
RESET_NOT_ALLOWED = b"CLIENT_ERROR stats reset not allowed\r\n"
ERROR = b"ERROR\r\n"
MN = b"MN\r\n"
TOO_LARGE = b"SERVER_ERROR object too large for cache\r\n"
NON_NUMERIC = b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
FLUSH_NOT_ALLOWED = b"CLIENT_ERROR flush_all not allowed\r\n"
#: ``flush_all <not a number>`` when flush_all is allowed
BAD_EXPTIME = b"CLIENT_ERROR invalid exptime argument\r\n"
TOO_MANY_CONNECTIONS = b"ERROR Too many open connections\r\n"


def value(key: bytes, flags: int, data: bytes, cas: int | None = None) -> bytes:
    """One ``VALUE`` block of a get/gets/gat/gats answer."""
    if cas is None:
        return b"VALUE %b %d %d\r\n%b\r\n" % (key, flags, len(data), data)
    return b"VALUE %b %d %d %d\r\n%b\r\n" % (key, flags, len(data), cas, data)


def number(n: int) -> bytes:
    """incr/decr answer."""
    return b"%d\r\n" % n


def server_error(reason: str) -> bytes:
    """``SERVER_ERROR <reason>`` on one line."""
    line = " ".join(reason.split())  # never let a reason break the framing
    return b"SERVER_ERROR " + line.encode("utf-8", "replace") + b"\r\n"


def stat_text(value: object) -> str:
    """A statistic's value as memcached writes it (text and binary alike): floats
    as ``%.6f`` (rusage), anything else as is."""
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def stats(pairs: Mapping[str, object]) -> bytes:
    """``STAT name value`` lines then ``END``."""
    return "".join(f"STAT {k} {stat_text(v)}\r\n" for k, v in pairs.items()).encode() + END


def version(text: str) -> bytes:
    """``VERSION <text>``."""
    return b"VERSION " + text.encode() + b"\r\n"
