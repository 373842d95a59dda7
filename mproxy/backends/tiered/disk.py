"""The disk tier: items in an SQLite file, read and written off the gevent hub.

Why SQLite (the standard library's ``sqlite3``, in WAL mode): it is on every
machine Python is, needs no package, and gives what a cache file needs: a
write is one transaction, whole or not at all after a crash or a power cut
(no torn rows); in WAL mode one connection reads while another writes; a
file that turns out not to be a database, or damaged, is reported as such
(``sqlite3.DatabaseError``) rather than read as garbage. lmdb (PyPI) is
faster per read, but memory-maps the file (a page fault on a stuck disk
blocks the thread that touches the map: the hub, if a value is ever read
there) and needs a package and its map size chosen up front; rocksdb and
leveldb bindings are not well kept for Python 3.11. A cache in front of a
network call needs microseconds per read, not nanoseconds: SQLite's ~20-50 µs
per read batch is far below a Momento round trip.

Layout: one table ``items(key, value, flags, cas, expires, checksum)`` and
one ``meta(name, value)``. ``expires`` is absolute Unix time, so an entry
that expired while mproxy was stopped is never served after a restart;
``checksum`` is a CRC-32 of every other field, checked on each read: a row
that does not match (bit rot, a tampered file) is ignored, counted in
``disk_cache_corrupt`` and deleted. ``meta`` holds the schema version, the
identity of the cache the file belongs to (a file of another cache, or of
another setting of ``flags``, is emptied at open) and a ``clean`` mark:
cleared at open, set by a graceful close; a file not closed cleanly (a crash,
a kill) is emptied at the next open, as deletes queued before the crash may
not have reached it.

Bounded: the tier counts each row as its key (twice: the row and the key
index), its value and :data:`ROW_OVERHEAD`, and deletes the oldest rows (first
written, FIFO) past ``max_bytes``; the file's free pages are given back
(``auto_vacuum = INCREMENTAL``). Promotions to the memory tier are not
rewritten, so a read never costs a write.

Threads: :class:`DiskStore` is the blocking part, used only from two
``gevent.threadpool.ThreadPool`` s: :data:`MAX_READS` threads for reads and
one for writes, each thread with its own connection. :class:`DiskTier` is
the hub's side: a read waits for its thread at most ``read_timeout`` seconds
and is a miss past it (the thread finishes it later); with :data:`MAX_READS`
reads in the threads, a read is a miss at once (so a stuck disk never holds
a client: gevent's ``ThreadPool.spawn`` itself waits when its threads are
busy); writes go to a queue one greenlet drains in batches, one transaction
each, one batch in the thread at a time. A put that finds :data:`MAX_PUTS`
operations queued is dropped (counted); a delete is never dropped: past
:data:`MAX_QUEUE` the queue is replaced by one "empty the file", and nothing
is read from the file until that is done. A key with a write queued or in
flight is not read from the file (its row may be about to change).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import struct
import time
import zlib
from collections import deque
from typing import Any, Iterable, Sequence, cast

import gevent
from gevent.monkey import get_original
from gevent.threadpool import ThreadPool

from mproxy.backends.base import Item

log = logging.getLogger(__name__)

#: The OS thread's identity, even where gevent patched ``_thread``.
_thread_ident = get_original("_thread", "get_ident")

#: Bumped when the table layout changes (an older file is emptied at open).
SCHEMA_VERSION = "1"
#: Bytes a row costs besides its value and two copies of its key (the row and the
#: key index): SQLite's record and cell headers, the rowid, numbers and checksum.
ROW_OVERHEAD = 64
#: After deleting for room, the file holds at most this share of ``max_bytes``
#: (so that the next writes do not delete again at once).
EVICT_TO = 0.9
#: Read threads; reads in them, waiting or running, past which a read is a miss at once.
MAX_READS = 4
#: Queued operations past which a put is dropped.
MAX_PUTS = 4096
#: Queued operations past which the queue becomes "empty the file".
MAX_QUEUE = 65536
#: Operations per write transaction.
WRITE_BATCH = 512
#: Keys per SELECT (SQLite's default limit of host parameters is 32766 since 3.32).
READ_CHUNK = 500
#: Seconds a graceful close waits for the queue to drain.
CLOSE_TIMEOUT = 5.0

_HEADER = struct.Struct("!IQd")

_PUT, _DEL, _CLEAR = "put", "del", "clear"

#: What a read answers: items and expiries, corrupt keys, expired keys.
_Read = tuple[dict[bytes, tuple[Item, float]], list[bytes], list[bytes]]


def checksum(key: bytes, value: bytes, flags: int, cas: int, expires: float) -> int:
    """CRC-32 of a row's fields."""
    return zlib.crc32(value, zlib.crc32(key, zlib.crc32(_HEADER.pack(flags, cas & 0xFFFFFFFFFFFFFFFF, expires))))


def row_size(key: bytes, value_length: int) -> int:
    """Bytes a row is counted for against ``max_bytes``."""
    return 2 * len(key) + value_length + ROW_OVERHEAD


class DiskStore:
    """The file, with blocking calls (run them on the tier's threads). ``items`` and
    ``used_bytes`` are kept by the writing thread and read by anyone."""

    def __init__(self, path: str, max_bytes: int, identity: str) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.identity = identity
        self.items = 0
        self.used_bytes = 0
        self.evictions = 0
        #: why the file was emptied at open ("" when it was kept)
        self.emptied = ""
        self._writer: sqlite3.Connection | None = None
        #: one connection per reading thread
        self._readers: dict[int, sqlite3.Connection] = {}
        self._open = False

    # -- open and close (the writing thread) ------------------------------------------

    def open(self) -> None:
        """Open (create) the file; empty it if it is not this cache's, was not closed
        cleanly, or is damaged (then it is moved aside and made anew)."""
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        try:
            self._open_checked()
        except sqlite3.DatabaseError as err:
            aside = f"{self.path}.damaged-{int(time.time())}"
            log.warning("disk tier %s cannot be read (%s): moved aside to %s, starting empty", self.path, err, aside)
            self._close_connections()
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.replace(self.path + suffix, aside + suffix)
            self._open_checked()
            self.emptied = f"damaged ({err})"

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _open_checked(self) -> None:
        writer = self._writer = self._connect()
        writer.execute("PRAGMA auto_vacuum = INCREMENTAL")  # before the first table: a new file only
        if writer.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
            raise sqlite3.DatabaseError("cannot use write-ahead logging")
        writer.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        writer.execute(
            "CREATE TABLE IF NOT EXISTS items (key BLOB PRIMARY KEY, value BLOB NOT NULL, flags INTEGER NOT NULL, "
            "cas INTEGER NOT NULL, expires REAL NOT NULL, checksum INTEGER NOT NULL)"
        )
        meta = dict(writer.execute("SELECT name, value FROM meta").fetchall())
        why = ""
        if meta and meta.get("schema") != SCHEMA_VERSION:
            why = f"schema {meta.get('schema')} is not {SCHEMA_VERSION}"
        elif meta and meta.get("identity") != self.identity:
            why = "it belongs to another cache or setting"
        elif meta and meta.get("clean") != "1":
            why = "it was not closed cleanly (deletes may not have reached it)"
        if why:
            writer.execute("DELETE FROM items")
            writer.execute("PRAGMA incremental_vacuum")
            self.emptied = why
        writer.execute("DELETE FROM items WHERE expires <= ?", (time.time(),))
        self.items, total = writer.execute(
            "SELECT count(*), coalesce(sum(2 * length(key) + length(value)), 0) FROM items"
        ).fetchone()
        self.used_bytes = total + self.items * ROW_OVERHEAD
        writer.execute("BEGIN")
        for name, value in (("schema", SCHEMA_VERSION), ("identity", self.identity), ("clean", "0")):
            writer.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))
        writer.execute("COMMIT")
        if self.used_bytes > self.max_bytes:
            self._evict(time.time())
        self._open = True

    def close(self, clean: bool) -> None:
        """Close; ``clean``: every queued write reached the file (the next open keeps it)."""
        try:
            if clean and self._writer is not None:
                self._writer.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('clean', '1')")
                self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._close_connections()

    def _close_connections(self) -> None:
        self._open = False
        readers, self._readers = self._readers, {}
        for conn in (*readers.values(), self._writer):
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
        self._writer = None

    def _reader(self) -> sqlite3.Connection:
        """This OS thread's reading connection."""
        if not self._open:
            raise sqlite3.ProgrammingError("the disk tier is closed")
        ident = _thread_ident()
        conn = self._readers.get(ident)
        if conn is None:
            conn = self._readers[ident] = self._connect()
        return conn

    # -- reads (the reading thread) -----------------------------------------------------

    def get_many(self, keys: Sequence[bytes], now: float) -> _Read:
        """``(found, corrupt, expired)``: items and their expiry (Unix time) of the keys
        held and live at ``now``; keys whose row fails its checksum; keys whose row expired."""
        reader = self._reader()
        found: dict[bytes, tuple[Item, float]] = {}
        corrupt: list[bytes] = []
        expired: list[bytes] = []
        for start in range(0, len(keys), READ_CHUNK):
            chunk = keys[start : start + READ_CHUNK]
            rows = reader.execute(
                f"SELECT key, value, flags, cas, expires, checksum FROM items WHERE key IN ({','.join('?' * len(chunk))})",
                chunk,
            ).fetchall()
            for key, value, flags, cas, expires, check in rows:
                key, value = bytes(key), bytes(value)
                if (
                    not isinstance(flags, int)
                    or not isinstance(cas, int)
                    or not isinstance(expires, float)
                    or checksum(key, value, flags, cas, expires) != check
                ):
                    corrupt.append(key)
                elif expires <= now:
                    expired.append(key)
                else:
                    found[key] = (Item(value, flags, cas), expires)
        return found, corrupt, expired

    # -- writes (the writing thread) ----------------------------------------------------

    def apply(self, ops: Sequence[tuple[Any, ...]], now: float) -> None:
        """Apply queued operations in one transaction, then delete for room."""
        writer = self._writer
        assert writer is not None
        writer.execute("BEGIN")
        try:
            for op in ops:
                if op[0] == _PUT:
                    _, key, item, expires = op
                    self._delete_row(key)
                    writer.execute(
                        "INSERT INTO items (key, value, flags, cas, expires, checksum) VALUES (?, ?, ?, ?, ?, ?)",
                        (key, item.value, item.flags, item.cas, expires, checksum(key, item.value, item.flags, item.cas, expires)),
                    )
                    self.items += 1
                    self.used_bytes += row_size(key, len(item.value))
                elif op[0] == _DEL:
                    self._delete_row(op[1])
                else:  # _CLEAR
                    writer.execute("DELETE FROM items")
                    self.items = self.used_bytes = 0
            writer.execute("COMMIT")
        except BaseException:
            if writer.in_transaction:
                writer.execute("ROLLBACK")
            raise
        if self.used_bytes > self.max_bytes:
            self._evict(now)

    def _delete_row(self, key: bytes) -> None:
        assert self._writer is not None
        row = self._writer.execute("SELECT length(value) FROM items WHERE key = ?", (key,)).fetchone()
        if row is not None:
            self._writer.execute("DELETE FROM items WHERE key = ?", (key,))
            self.items -= 1
            self.used_bytes -= row_size(key, row[0])

    def _evict(self, now: float) -> None:
        """Delete the oldest rows until at most ``EVICT_TO`` of ``max_bytes`` is held."""
        writer = self._writer
        assert writer is not None
        target = self.max_bytes * EVICT_TO
        writer.execute("BEGIN")
        try:
            while self.used_bytes > target and self.items > 0:
                rows = writer.execute(
                    "SELECT rowid, length(key), length(value), expires FROM items ORDER BY rowid LIMIT 256"
                ).fetchall()
                if not rows:
                    break
                taken = []
                for rowid, key_length, value_length, expires in rows:
                    taken.append((rowid,))
                    self.items -= 1
                    self.used_bytes -= 2 * key_length + value_length + ROW_OVERHEAD
                    if not isinstance(expires, float) or expires > now:
                        self.evictions += 1
                    if self.used_bytes <= target:
                        break
                writer.executemany("DELETE FROM items WHERE rowid = ?", taken)
            writer.execute("COMMIT")
        except BaseException:
            if writer.in_transaction:
                writer.execute("ROLLBACK")
            raise
        writer.execute("PRAGMA incremental_vacuum")



class DiskTier:
    """The hub's side of the disk tier (see the module doc). ``store`` may be any
    object with :class:`DiskStore`'s methods (tests pass doubles)."""

    def __init__(self, store: DiskStore, read_timeout: float = 0.05) -> None:
        self.store = store
        self.read_timeout = read_timeout
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self.timeouts = 0
        self.dropped_writes = 0
        self.errors = 0
        self._reads = ThreadPool(MAX_READS)
        self._writes = ThreadPool(1)
        self._reading = 0
        self._queue: deque[tuple[Any, ...]] = deque()
        #: operations queued or in flight, per key
        self._dirty: dict[bytes, int] = {}
        #: "empty the file" operations queued or in flight: nothing is read meanwhile
        self._clearing = 0
        self._drainer: gevent.Greenlet | None = None
        self._closed = False
        self.broken = False
        self._writes.spawn(store.open).get()
        if store.emptied:
            log.info("disk tier %s: emptied at open: %s", getattr(store, "path", "?"), store.emptied)

    # -- figures ---------------------------------------------------------------------------

    @property
    def items(self) -> int:
        return int(self.store.items)

    @property
    def used_bytes(self) -> int:
        return int(self.store.used_bytes)

    @property
    def evictions(self) -> int:
        return int(self.store.evictions)

    @property
    def max_bytes(self) -> int:
        return int(self.store.max_bytes)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def readable(self, key: bytes) -> bool:
        """Whether the key's row may be read now (no write of it queued or in flight)."""
        return not self._clearing and not self.broken and key not in self._dirty

    # -- reads -----------------------------------------------------------------------------

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, tuple[Item, float]]:
        """Items and expiries (Unix time) of the keys held; a miss for a key that is
        :meth:`readable` no more, and for all when the read takes too long."""
        wanted = [key for key in keys if self.readable(key)]
        if not wanted or self._reading >= MAX_READS or self._closed:
            if wanted:
                self.timeouts += 1
            self.misses += len(keys)
            return {}
        self._reading += 1
        result = self._reads.spawn(self.store.get_many, wanted, time.time())
        result.rawlink(self._read_done)
        try:
            found, corrupt, expired = cast(_Read, result.get(timeout=self.read_timeout))
        except gevent.Timeout:
            self.timeouts += 1
            self.misses += len(keys)
            return {}
        except Exception as err:  # sqlite3.Error, OSError: the file cannot be read
            self.errors += 1
            log.warning("disk tier read failed: %s", err)
            self.misses += len(keys)
            return {}
        for key in corrupt:
            self.corrupt += 1
            self.delete(key)
        for key in expired:
            self.delete(key)
        # a write queued while the read ran: the row read may be older than it
        found = {key: hit for key, hit in found.items() if self.readable(key)}
        self.hits += len(found)
        self.misses += len(keys) - len(found)
        return found

    def _read_done(self, _result: Any) -> None:
        self._reading -= 1

    # -- writes ----------------------------------------------------------------------------

    def put(self, key: bytes, item: Item, expires: float) -> None:
        """Queue writing the key's item, to expire at ``expires`` (Unix time); dropped
        (counted) when the queue is long."""
        if self._closed or self.broken or self._clearing:
            return
        if len(self._queue) >= MAX_PUTS:
            self.dropped_writes += 1
            return
        self._enqueue((_PUT, key, item, expires), key)

    def delete(self, key: bytes) -> None:
        """Queue deleting the key's row. Never dropped (see the module doc)."""
        if self._closed or self.broken or self._clearing:
            return  # emptied before anything is read again
        if len(self._queue) >= MAX_QUEUE:
            log.warning("disk tier: %d writes queued (the disk is slow or stuck): emptying the file instead", len(self._queue))
            self.clear()
            return
        self._enqueue((_DEL, key), key)

    def hold(self, key: bytes) -> None:
        """A write of the key has started: its row is not read until :meth:`release`."""
        self._dirty[key] = self._dirty.get(key, 0) + 1

    def release(self, key: bytes, copy: tuple[Item, float] | None) -> None:
        """The write is done: queue writing ``copy`` (item, Unix expiry) as the key's row,
        or deleting the row (always, when the put cannot be queued)."""
        if copy is not None and not (self._closed or self.broken or self._clearing) and len(self._queue) < MAX_PUTS:
            self._enqueue((_PUT, key, *copy), key)
        else:
            self.delete(key)
        self._undirty(key)

    def clear(self) -> None:
        """Empty the file (queued); nothing is read from it until that is done."""
        if self._closed or self.broken:
            return
        for op in self._queue:
            if op[0] == _CLEAR:
                self._clearing -= 1
            else:
                self._undirty(op[1])
        self._queue.clear()
        self._clearing += 1
        self._enqueue((_CLEAR,), None)

    def _enqueue(self, op: tuple[Any, ...], key: bytes | None) -> None:
        if key is not None:
            self._dirty[key] = self._dirty.get(key, 0) + 1
        self._queue.append(op)
        if self._drainer is None:
            self._drainer = gevent.spawn(self._drain)

    def _undirty(self, key: bytes) -> None:
        n = self._dirty.get(key, 0) - 1
        if n > 0:
            self._dirty[key] = n
        else:
            self._dirty.pop(key, None)

    def _drain(self) -> None:
        try:
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(WRITE_BATCH, len(self._queue)))]
                try:
                    self._writes.spawn(self.store.apply, batch, time.time()).get()
                except Exception as err:  # sqlite3.Error, OSError: the file may now hold stale rows
                    self.errors += 1
                    self._failed(err, batch)
                    continue
                for op in batch:
                    if op[0] == _CLEAR:
                        self._clearing -= 1
                    else:
                        self._undirty(op[1])
        finally:
            self._drainer = None

    def _failed(self, err: Exception, batch: list[tuple[Any, ...]]) -> None:
        """A write failed: its deletes may not have happened, so the file is not to be
        read until it is emptied (queued here); if emptying fails too, the tier is off."""
        cleared = sum(1 for op in batch if op[0] == _CLEAR)
        self._clearing -= cleared
        for op in batch:
            if op[0] != _CLEAR:
                self._undirty(op[1])
        if cleared:
            log.error("disk tier: cannot empty the file (%s): the disk tier is off until restart", err)
            self.broken = True
            self._queue.clear()
            self._dirty.clear()
            self._clearing = 0
            return
        log.warning("disk tier: a write failed (%s): emptying the file", err)
        self.clear()

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Write what is queued (for at most ``timeout`` seconds), then close the file:
        clean when everything was written."""
        if self._closed:
            return
        self._closed = True
        drainer = self._drainer
        if drainer is not None:
            drainer.join(timeout=timeout)
        clean = not self._queue and self._drainer is None and not self.broken
        try:
            self._writes.spawn(self.store.close, clean).get(timeout=timeout)
        except Exception as err:  # a stuck or failing disk: the next open empties the file
            log.warning("disk tier: closing the file failed (%s)", err)
        self._reads.kill()
        self._writes.kill()


def open_tier(path: str, max_bytes: int, identity: str, read_timeout: float = 0.05) -> DiskTier:
    """A :class:`DiskTier` on an SQLite file at ``path`` (created, with its directory)."""
    return DiskTier(DiskStore(path, max_bytes, identity), read_timeout)


def identity_of(parts: Iterable[object]) -> str:
    """An identity string for :class:`DiskStore` from what decides the file's content."""
    return "|".join(str(part) for part in parts)
