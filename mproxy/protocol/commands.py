"""Commands of the memcached text protocol as frozen, slotted records.

This module is also the memcached vocabulary shared by the wire layer and the
backends (:class:`StoreMode`, the limits): backends may import it, and it
imports only the standard library.

Limits are named constants citing their source (memcached 1.6 ``proto_text.c``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: memcached ``KEY_MAX_LENGTH``.
KEY_MAX_LENGTH = 250
#: memcached closes a connection holding this many bytes without a newline
#: (unless the line is a multi-get), ``try_read_command_ascii``.
MAX_LINE_LENGTH = 2048
#: Our bound on a multi-get line (memcached's is unbounded): enough for
#: thousands of maximal keys, small enough to bound a connection's memory.
MAX_GET_LINE_LENGTH = 4 * 1024 * 1024
#: memcached ``MAX_TOKENS``: a line is split into at most 23 tokens + a rest.
MAX_TOKENS = 24
#: memcached ``-I`` default: largest item accepted (``[proxy] max_item_size``).
DEFAULT_MAX_ITEM_SIZE = 1024 * 1024
#: memcached ``-m 64`` default: bytes of items a cache holds (its ``limit_maxbytes``);
#: the budget of a ``backend = "memory"`` cache unless ``memory_cache_bytes`` says otherwise.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


class StoreMode(enum.Enum):
    """The six storage commands; the value is the command's name."""

    SET = "set"
    ADD = "add"
    REPLACE = "replace"
    APPEND = "append"
    PREPEND = "prepend"
    CAS = "cas"


@dataclass(frozen=True, slots=True)
class Get:
    """get / gets (``cas`` true for gets)."""

    keys: tuple[bytes, ...]
    cas: bool = False
    noreply = False

    @property
    def name(self) -> str:
        return "gets" if self.cas else "get"


@dataclass(frozen=True, slots=True)
class Gat:
    """gat / gats: get and touch."""

    exptime: int
    keys: tuple[bytes, ...]
    cas: bool = False
    noreply = False

    @property
    def name(self) -> str:
        return "gats" if self.cas else "gat"


@dataclass(frozen=True, slots=True)
class Store:
    """set / add / replace / append / prepend / cas, with the value read."""

    mode: StoreMode
    key: bytes
    flags: int
    exptime: int
    value: bytes
    cas_unique: int = 0
    noreply: bool = False

    @property
    def name(self) -> str:
        return self.mode.value


@dataclass(frozen=True, slots=True)
class TooLarge:
    """A store whose value exceeds the item size limit; its data was swallowed.

    memcached answers ``SERVER_ERROR object too large for cache`` and, for
    ``set``, also removes the key's old value."""

    mode: StoreMode
    key: bytes
    flags: int
    exptime: int
    nbytes: int
    noreply: bool = False

    @property
    def name(self) -> str:
        return self.mode.value


@dataclass(frozen=True, slots=True)
class Delete:
    key: bytes
    noreply: bool = False
    name = "delete"


@dataclass(frozen=True, slots=True)
class Arith:
    """incr / decr."""

    key: bytes
    delta: int
    incr: bool
    noreply: bool = False

    @property
    def name(self) -> str:
        return "incr" if self.incr else "decr"


@dataclass(frozen=True, slots=True)
class Touch:
    key: bytes
    exptime: int
    noreply: bool = False
    name = "touch"


@dataclass(frozen=True, slots=True)
class FlushAll:
    delay: int = 0
    noreply: bool = False
    name = "flush_all"


@dataclass(frozen=True, slots=True)
class Version:
    noreply = False
    name = "version"


@dataclass(frozen=True, slots=True)
class Verbosity:
    level: int
    noreply: bool = False
    name = "verbosity"


@dataclass(frozen=True, slots=True)
class Quit:
    noreply = False
    name = "quit"


@dataclass(frozen=True, slots=True)
class Stats:
    """``stats [args...]``: on the data port, the proxy's own counters."""

    args: tuple[bytes, ...] = ()
    noreply = False
    name = "stats"


@dataclass(frozen=True, slots=True)
class MetaNoop:
    """``mn``: meta no-op, answered ``MN`` (clients use it to end a pipeline)."""

    noreply = False
    name = "mn"


Command = Get | Gat | Store | TooLarge | Delete | Arith | Touch | FlushAll | Version | Verbosity | Quit | Stats | MetaNoop
