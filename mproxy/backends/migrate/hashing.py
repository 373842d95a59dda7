"""Which legacy memcached server holds a key, as the common clients place keys.

Stdlib only, no I/O. A :class:`Ring` is built from the ``[[cache]] migrate_from``
servers (``host:port`` or ``host:port:weight``, in the order the application's
client lists them: modula placement depends on it) and a scheme name
(``migration_hash``):

``ketama``           libmemcached's weighted ketama (``MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED``,
                     as PHP memcached's ``OPT_LIBKETAMA_COMPATIBLE`` and pylibmc's
                     ``ketama_weighted`` set it) = twemproxy ``distribution: ketama`` with
                     ``hash: md5``: 160 points per server (scaled by weight), four per MD5
                     digest of ``"<host>-<i>"`` (``"<host>:<port>-<i>"`` when the port is not
                     11211); a key's MD5 (its first four bytes, little-endian) goes to the
                     first point at or after it, wrapping around.
``ketama_fnv1a_64``  the same continuum with twemproxy's default key hash, ``fnv1a_64``
                     (computed on 32 bits, as twemproxy and libhashkit do).
``modula``           libmemcached's ``MEMCACHED_DISTRIBUTION_MODULA`` with its default hash
                     (Jenkins one-at-a-time): ``hash % len(servers)``; weights ignored.
``modula_crc32``     python-memcached's placement: ``((crc32 >> 16) & 0x7fff) or 1`` modulo
                     the servers, each repeated ``weight`` times.

Key bytes are hashed as C ``char``, which is signed on the platforms these clients
run on: a byte above 0x7f enters one-at-a-time and FNV sign-extended, as there.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

#: The scheme names of ``migration_hash``.
SCHEMES = ("ketama", "ketama_fnv1a_64", "modula", "modula_crc32")

#: libmemcached ``MEMCACHED_POINTS_PER_SERVER_KETAMA``, twemproxy ``KETAMA_POINTS_PER_SERVER``.
KETAMA_POINTS_PER_SERVER = 160
#: Points one MD5 digest gives (libmemcached ``pointer_per_hash`` when weighted).
POINTS_PER_HASH = 4
#: The port libmemcached and twemproxy leave out of a server's point names.
DEFAULT_PORT = 11211

_MASK32 = 0xFFFFFFFF
_FNV_64_INIT = 0xCBF29CE484222325
_FNV_64_PRIME = 0x100000001B3


@dataclass(frozen=True, slots=True)
class Server:
    """One legacy server: where it listens and its share of the keys."""

    host: str
    port: int
    weight: int = 1

    @property
    def address(self) -> str:
        """``host:port`` (``[v6]:port`` for an IPv6 address)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_server(text: str) -> Server:
    """``"host:port"`` or ``"host:port:weight"`` (``"[v6]:port[:weight]"``). Raises ValueError."""
    weight = 1
    rest = text
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: an IPv6 address needs its closing ']'")
        host, tail = rest[1:end], rest[end + 1 :]
        parts = tail.split(":")[1:] if tail.startswith(":") else None
        if not parts:
            raise ValueError(f"{text!r}: expected [v6]:port")
    else:
        host, *parts = rest.split(":")
    if not host or not 1 <= len(parts) <= 2:
        raise ValueError(f"{text!r}: expected host:port or host:port:weight")
    if not all(p.isascii() and p.isdigit() for p in parts):
        raise ValueError(f"{text!r}: the port and weight are decimal numbers")
    port = int(parts[0])
    if len(parts) == 2:
        weight = int(parts[1])
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is not 1-65535")
    if weight < 1:
        raise ValueError(f"{text!r}: weight {weight} is below 1")
    return Server(host, port, weight)


def _signed(byte: int) -> int:
    """A C ``char`` (signed) converted to ``uint32_t``."""
    return byte if byte < 0x80 else (byte - 0x100) & _MASK32


def md5_hash(key: bytes) -> int:
    """libhashkit ``hashkit_md5`` / twemproxy ``hash_md5``: the digest's first 4 bytes, little-endian."""
    digest = hashlib.md5(key).digest()
    return int.from_bytes(digest[:4], "little")


def fnv1a_64(key: bytes) -> int:
    """twemproxy ``hash_fnv1a_64`` (and libhashkit's, truncated): FNV-1a on 32 bits."""
    value = _FNV_64_INIT & _MASK32
    prime = _FNV_64_PRIME & _MASK32
    for byte in key:
        value = ((value ^ _signed(byte)) * prime) & _MASK32
    return value


def one_at_a_time(key: bytes) -> int:
    """libhashkit ``hashkit_one_at_a_time`` (libmemcached's default hash)."""
    value = 0
    for byte in key:
        value = (value + _signed(byte)) & _MASK32
        value = (value + (value << 10)) & _MASK32
        value ^= value >> 6
    value = (value + (value << 3)) & _MASK32
    value ^= value >> 11
    value = (value + (value << 15)) & _MASK32
    return value


def crc32_python_memcached(key: bytes) -> int:
    """python-memcached's ``cmemcache_hash``: ``((crc32(key) >> 16) & 0x7fff) or 1``."""
    return ((zlib.crc32(key) & _MASK32) >> 16) & 0x7FFF or 1


def _f32(number: float) -> float:
    """``number`` rounded to a C ``float``."""
    result: float = struct.unpack("f", struct.pack("f", number))[0]
    return result


def ketama_points(servers: Sequence[Server]) -> list[tuple[int, int]]:
    """The continuum: sorted (point, server index), as libmemcached's ``update_continuum``
    builds it when weighted (the same arithmetic in C ``float``)."""
    total = sum(server.weight for server in servers)
    live = len(servers)
    points: list[tuple[int, int]] = []
    for index, server in enumerate(servers):
        pct = _f32(_f32(server.weight) / _f32(total))
        scaled = _f32(_f32(_f32(pct * KETAMA_POINTS_PER_SERVER) / POINTS_PER_HASH) * _f32(live))
        per_server = int(_f32(scaled + 0.0000000001) // 1) * POINTS_PER_HASH
        name = server.host if server.port == DEFAULT_PORT else f"{server.host}:{server.port}"
        for i in range(per_server // POINTS_PER_HASH):
            digest = hashlib.md5(f"{name}-{i}".encode()).digest()
            for x in range(POINTS_PER_HASH):
                points.append((int.from_bytes(digest[4 * x : 4 * x + 4], "little"), index))
    points.sort(key=lambda point: point[0])  # stable: equal points keep server order
    return points


class Ring:
    """Key -> index of the server holding it, for one scheme of :data:`SCHEMES`."""

    def __init__(self, servers: Sequence[Server], scheme: str = "ketama") -> None:
        if not servers:
            raise ValueError("a ring needs at least one server")
        if scheme not in SCHEMES:
            raise ValueError(f"unknown migration_hash {scheme!r}; expected one of {', '.join(SCHEMES)}")
        self.servers = tuple(servers)
        self.scheme = scheme
        self._hash: Callable[[bytes], int]
        self._values: list[int] = []
        self._owners: list[int] = []
        self._slots: list[int] = []
        if scheme.startswith("ketama"):
            self._hash = md5_hash if scheme == "ketama" else fnv1a_64
            continuum = ketama_points(self.servers)
            self._values = [value for value, _ in continuum]
            self._owners = [owner for _, owner in continuum]
        elif scheme == "modula":
            self._hash = one_at_a_time
            self._slots = list(range(len(self.servers)))
        else:
            self._hash = crc32_python_memcached
            self._slots = [i for i, server in enumerate(self.servers) for _ in range(server.weight)]

    def index(self, key: bytes) -> int:
        """The index (in the servers given) of the server holding ``key``."""
        if len(self.servers) == 1:
            return 0
        value = self._hash(key)
        if self._slots:
            return self._slots[value % len(self._slots)]
        at = bisect.bisect_left(self._values, value)
        return self._owners[at if at < len(self._values) else 0]

    def server(self, key: bytes) -> Server:
        return self.servers[self.index(key)]
