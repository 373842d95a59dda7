"""How memcached items are laid out in Momento: flags, CAS uniques, TTLs.

Stdlib only, no I/O: what :mod:`.backend` stores and reads back.

Flags encoding (``[[cache]] flags = true``)
-------------------------------------------
Momento stores one opaque byte string per key; memcached items also carry
32-bit client flags. A stored value is either

* the client's value itself, when the flags are 0 and the value does not
  start with :data:`FLAGS_MAGIC` (so plain text and decimal counters stay
  readable, and incrementable, by any other Momento client), or
* ``FLAGS_MAGIC`` (4 bytes) + the flags (4 bytes, big-endian) + the value.

``FLAGS_MAGIC`` starts with ``0xFF``, a byte that never occurs in UTF-8 text,
so no text value is ever mistaken for a header. A value with flags 0 that does
start with the magic is stored with a header too, so decoding is unambiguous
for everything mproxy writes. With ``flags = false`` values are stored raw and
read back with flags 0.

Marks (meta commands)
---------------------
An item the meta commands marked (``md … I`` and ``ms … I``: stale; ``mg … N``
and ``R``, or the first read of a stale item: the recache token is out) is
stored as

* ``MARKS_MAGIC`` (4 bytes) + one byte of :data:`STALE` / :data:`TOKEN` bits
  + the flags (4 bytes, big-endian) + the value.

Every read decodes it (classic ``get``/``gets`` see the value and flags; the
meta commands also the marks). Any write that is not a meta write of marks
(set, append, incr, ...) stores the item unmarked, as memcached clears them.
A value with flags 0 that starts with either magic is stored with a header.
Marks need the header, so with ``flags = false`` they are not available (the
meta flags that write them are refused).

CAS uniques
-----------
Momento has no per-item version counter; it has a content hash
(GetWithHash / SetIfHash). mproxy's CAS unique is derived from the *stored
bytes* (value and flags header) by :func:`cas_unique`: the low 63 bits of an
8-byte BLAKE2b digest, never 0. It is deterministic, so every proxy computes
the same unique for the same item and a plain ``get`` batch can fill it
without asking the server for a hash. Consequences: writing A, then B, then A
again makes an old unique valid again (ABA), and two different contents share
a unique with probability 2**-63. Kept below 2**63 for clients that parse
CAS uniques as signed 64-bit integers.
"""

from __future__ import annotations

import hashlib
import math

from mproxy.backends.base import ttl_seconds

#: First bytes of a stored value that carries flags (see module docstring).
FLAGS_MAGIC = b"\xffMCF"
#: Bytes of the magic plus the big-endian u32 flags.
FLAGS_HEADER_LENGTH = len(FLAGS_MAGIC) + 4
#: First bytes of a stored value that carries marks and flags (see module docstring).
MARKS_MAGIC = b"\xffMCM"
#: Bytes of the magic, the marks byte and the big-endian u32 flags.
MARKS_HEADER_LENGTH = len(MARKS_MAGIC) + 1 + 4
#: Mark: the item is stale (``md … I``, ``ms … I``): ``X`` to readers.
STALE = 1
#: Mark: a client won the right to recache the item (``W`` once, ``Z`` after).
TOKEN = 2

_CAS_MASK = 2**63 - 1


def encode(value: bytes, flags: int, with_flags: bool, marks: int = 0) -> bytes:
    """The bytes stored in Momento for a memcached value, its flags and marks
    (``marks`` needs ``with_flags``)."""
    if marks:
        if not with_flags:
            raise ValueError("marks need the flags encoding")
        return MARKS_MAGIC + bytes((marks,)) + flags.to_bytes(4, "big") + value
    if not with_flags or (flags == 0 and not value.startswith((FLAGS_MAGIC, MARKS_MAGIC))):
        return value
    return FLAGS_MAGIC + flags.to_bytes(4, "big") + value


def decode(stored: bytes, with_flags: bool) -> tuple[bytes, int]:
    """``(value, flags)`` of bytes read from Momento (inverse of :func:`encode`)."""
    value, flags, _ = decode_marked(stored, with_flags)
    return value, flags


def decode_marked(stored: bytes, with_flags: bool) -> tuple[bytes, int, int]:
    """``(value, flags, marks)`` of bytes read from Momento."""
    if with_flags and stored[:1] == b"\xff":
        if len(stored) >= FLAGS_HEADER_LENGTH and stored.startswith(FLAGS_MAGIC):
            return stored[FLAGS_HEADER_LENGTH:], int.from_bytes(stored[len(FLAGS_MAGIC) : FLAGS_HEADER_LENGTH], "big"), 0
        if len(stored) >= MARKS_HEADER_LENGTH and stored.startswith(MARKS_MAGIC):
            flags = int.from_bytes(stored[len(MARKS_MAGIC) + 1 : MARKS_HEADER_LENGTH], "big")
            return stored[MARKS_HEADER_LENGTH:], flags, stored[len(MARKS_MAGIC)]
    return stored, 0, 0


def cas_unique(stored: bytes) -> int:
    """The CAS unique of an item, from its stored bytes: in ``[1, 2**63)``.

    The :data:`TOKEN` mark does not count (memcached's CAS does not change when
    a client wins the recache token: an item with only that mark has the unique
    of the same item unmarked); :data:`STALE` does (``md … I`` gives the item a
    new unique)."""
    if stored.startswith(MARKS_MAGIC):
        value, flags, marks = decode_marked(stored, True)
        if marks & TOKEN:
            stored = encode(value, flags, True, marks & ~TOKEN)
    digest = hashlib.blake2b(stored, digest_size=8).digest()
    return (int.from_bytes(digest, "big") & _CAS_MASK) or 1


def ttl_milliseconds(exptime: int, default_ttl: int, max_ttl: int, now: float | None = None) -> int:
    """The Momento TTL for a memcached exptime, in milliseconds; 0 = already expired.

    exptime 0 (memcached: never expires) becomes ``default_ttl`` seconds;
    anything longer than ``max_ttl`` seconds is clamped to it (Momento has a
    maximum TTL and no "never expires"); a partial millisecond rounds up so a
    live item never gets a TTL of 0.
    """
    seconds = ttl_seconds(exptime, now)
    if seconds is None:
        seconds = default_ttl
    if seconds <= 0:
        return 0
    return max(1, min(math.ceil(seconds * 1000), max_ttl * 1000))
