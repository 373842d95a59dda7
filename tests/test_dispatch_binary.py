"""Binary requests through the Dispatcher, without sockets: frames in, exact frames and
counters out (the differential test checks the same frames against memcached)."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from mproxy.backends.base import StoreResult
from mproxy.backends.memory import MemoryBackend
from mproxy.dispatch import VERSION_TEXT, Dispatcher
from mproxy.protocol import binary as b
from mproxy.protocol import commands as c
from mproxy.protocol.binary import BinaryParser, Opcode, Status
from mproxy.protocol.errors import ProtocolError
from mproxy.protocol.parser import NEED_DATA
from mproxy.stats import Stats
from tests.wire import answers
from tests.test_binary_parser import Frame, arith_req, req, split_frames, store_req
from tests.test_dispatch import Failing


def frames(data: bytes) -> list[Frame]:
    out, rest = split_frames(data)
    assert rest == b""
    return out


def run(d: Dispatcher, data: bytes) -> list[Frame]:
    p = BinaryParser()
    p.feed(data)
    commands: list[Any] = []
    while True:
        try:
            cmd = p.next_command()
        except ProtocolError as err:
            commands.append(err)
            continue
        if cmd is NEED_DATA or isinstance(cmd, c.Quit):
            break
        commands.append(cmd)
    return frames(b"".join(answers(d.run(commands, "test:1"))))


def make(backend: Any = None) -> tuple[Dispatcher, Stats]:
    stats = Stats()
    return Dispatcher(backend or MemoryBackend(), stats.cache("c"), stats), stats


def ok(opcode: int, **kw: Any) -> Frame:
    fields = dict(status=0, extras=b"", key=b"", value=b"", opaque=0xDEADBEEF, cas=0)
    fields.update(kw)
    return Frame(opcode, **fields)


def error(opcode: int, status: int, text: bytes | None = None) -> Frame:
    return ok(opcode, status=status, value=b.ERROR_TEXT[status] if text is None else text)


def flags(n: int) -> bytes:
    return struct.pack(">I", n)


def test_gets_hit_and_miss_in_every_form() -> None:
    d, _ = make()
    (stored,) = run(d, store_req(Opcode.SET, b"a", b"hello", 5))
    assert stored.status == 0 and stored.cas > 0
    cas = stored.cas
    assert run(d, req(Opcode.GET, b"a") + req(Opcode.GETK, b"a") + req(Opcode.GETQ, b"a") + req(Opcode.GETKQ, b"a")) == [
        ok(Opcode.GET, extras=flags(5), value=b"hello", cas=cas),
        ok(Opcode.GETK, extras=flags(5), key=b"a", value=b"hello", cas=cas),
        ok(Opcode.GETQ, extras=flags(5), value=b"hello", cas=cas),
        ok(Opcode.GETKQ, extras=flags(5), key=b"a", value=b"hello", cas=cas),
    ]
    assert run(d, req(Opcode.GET, b"z") + req(Opcode.GETK, b"z") + req(Opcode.GETQ, b"z") + req(Opcode.GETKQ, b"z")) == [
        error(Opcode.GET, Status.KEY_ENOENT),
        ok(Opcode.GETK, status=Status.KEY_ENOENT, key=b"z"),
    ]


def test_the_cas_a_write_answers_is_the_items() -> None:
    d, _ = make()
    for frame in (store_req(Opcode.SET, b"a", b"1"), req(Opcode.APPEND, b"a", value=b"0"), arith_req(Opcode.INCREMENT, b"a", 1)):
        (written,) = run(d, frame)
        (got,) = run(d, req(Opcode.GET, b"a"))
        assert written.cas == got.cas != 0
    (incremented,) = run(d, arith_req(Opcode.INCREMENT, b"a", 0))
    assert incremented.value == struct.pack(">Q", 11)


def test_storage_statuses() -> None:
    d, _ = make()
    replies = run(
        d,
        store_req(Opcode.ADD, b"a", b"1")
        + store_req(Opcode.ADD, b"a", b"2")
        + store_req(Opcode.REPLACE, b"z", b"2")
        + req(Opcode.APPEND, b"z", value=b"x")
        + req(Opcode.PREPEND, b"z", value=b"x")
        + store_req(Opcode.ADDQ, b"a", b"2")
        + store_req(Opcode.SETQ, b"q", b"2")
        + store_req(Opcode.REPLACEQ, b"q", b"3"),
    )
    assert replies[0].status == 0 and replies[0].cas
    assert replies[1:] == [
        error(Opcode.ADD, Status.KEY_EEXISTS),
        error(Opcode.REPLACE, Status.KEY_ENOENT),
        error(Opcode.APPEND, Status.NOT_STORED),
        error(Opcode.PREPEND, Status.NOT_STORED),
        error(Opcode.ADDQ, Status.KEY_EEXISTS),  # quiet commands answer their errors
    ]
    assert run(d, req(Opcode.GET, b"q"))[0].value == b"3"


def test_cas_on_every_write() -> None:
    d, stats = make()
    (stored,) = run(d, store_req(Opcode.SET, b"a", b"v"))
    good, bad = stored.cas, stored.cas + 1000
    assert run(
        d,
        store_req(Opcode.SET, b"a", b"w", cas=bad)
        + store_req(Opcode.SET, b"zz", b"w", cas=5)
        + store_req(Opcode.ADD, b"zz", b"w", cas=5)
        + store_req(Opcode.ADD, b"a", b"w", cas=bad)
        + store_req(Opcode.REPLACE, b"a", b"w", cas=bad)
        + req(Opcode.APPEND, b"a", value=b"x", cas=bad)
        + req(Opcode.PREPEND, b"zz", value=b"x", cas=5)
        + req(Opcode.DELETE, b"a", cas=bad)
        + req(Opcode.DELETE, b"zz", cas=5)
        + arith_req(Opcode.INCREMENT, b"a", 1, cas=bad),
    ) == [
        error(Opcode.SET, Status.KEY_EEXISTS),
        error(Opcode.SET, Status.KEY_ENOENT),
        error(Opcode.ADD, Status.KEY_ENOENT),
        error(Opcode.ADD, Status.KEY_EEXISTS),
        error(Opcode.REPLACE, Status.KEY_EEXISTS),
        error(Opcode.APPEND, Status.KEY_EEXISTS),
        error(Opcode.PREPEND, Status.NOT_STORED),
        error(Opcode.DELETE, Status.KEY_EEXISTS),
        error(Opcode.DELETE, Status.KEY_ENOENT),
        error(Opcode.INCREMENT, Status.KEY_EEXISTS),
    ]
    st = stats.cache("c")
    assert (st.cas_badval, st.cas_misses, st.cas_hits) == (3, 2, 0)
    (appended,) = run(d, req(Opcode.APPEND, b"a", value=b"x", cas=good))
    assert appended.status == 0
    (replaced,) = run(d, store_req(Opcode.REPLACE, b"a", b"y", cas=appended.cas))
    assert replaced.status == 0 and st.cas_hits == 1
    assert run(d, req(Opcode.DELETEQ, b"a", cas=replaced.cas) + req(Opcode.GET, b"a")) == [error(Opcode.GET, Status.KEY_ENOENT)]


def test_counters_with_initial_value_and_expiry() -> None:
    d, stats = make()
    replies = run(
        d,
        arith_req(Opcode.INCREMENT, b"n", 5, 10)  # created as 10
        + arith_req(Opcode.INCREMENT, b"n", 5, 10)  # 15
        + arith_req(Opcode.DECREMENT, b"n", 100)  # floors at 0
        + arith_req(Opcode.INCREMENT, b"m", 1, 0, b.NO_CREATE)
        + arith_req(Opcode.INCREMENTQ, b"n", 1)
        + store_req(Opcode.SETQ, b"s", b"abc")
        + arith_req(Opcode.INCREMENT, b"s", 1)
        + arith_req(Opcode.DECREMENTQ, b"s", 1),
    )
    assert [(f.opcode, f.status, f.value) for f in replies] == [
        (Opcode.INCREMENT, 0, struct.pack(">Q", 10)),
        (Opcode.INCREMENT, 0, struct.pack(">Q", 15)),
        (Opcode.DECREMENT, 0, struct.pack(">Q", 0)),
        (Opcode.INCREMENT, Status.KEY_ENOENT, b"Not found"),
        (Opcode.INCREMENT, Status.DELTA_BADVAL, b"Non-numeric server-side value for incr or decr"),
        (Opcode.DECREMENTQ, Status.DELTA_BADVAL, b"Non-numeric server-side value for incr or decr"),
    ]
    assert all(f.cas for f in replies[:3])
    assert run(d, req(Opcode.GET, b"n"))[0].value == b"1 "  # rewritten in place, as memcached
    st = stats.cache("c")
    # created counters count neither a miss nor a set (as memcached)
    assert (st.incr_hits, st.incr_misses, st.decr_hits, st.cmd_set) == (2, 1, 1, 1)


class LosesTheCreateRace(MemoryBackend):
    """A concurrent client creates the counter between our incr miss and our add."""

    def __init__(self) -> None:
        super().__init__()
        self.raced = False

    def incr_decr(self, key: bytes, delta: int, incr: bool) -> int | None:
        if not self.raced:
            self.raced = True
            result = super().incr_decr(key, delta, incr)
            super().store(mode=c.StoreMode.SET, key=key, value=b"100", flags=0, exptime=0)
            return result
        return super().incr_decr(key, delta, incr)


def test_a_lost_create_race_increments_the_new_counter() -> None:
    d, _ = make(LosesTheCreateRace())
    (reply,) = run(d, arith_req(Opcode.INCREMENT, b"n", 1, 10))
    assert reply.value == struct.pack(">Q", 101)


class NeverSettles(MemoryBackend):
    def incr_decr(self, key: bytes, delta: int, incr: bool) -> int | None:
        return None

    def store(self, *args: Any, **kw: Any) -> StoreResult:  # type: ignore[override]
        return StoreResult.NOT_STORED


def test_a_counter_that_never_settles_is_not_stored() -> None:
    d, _ = make(NeverSettles())
    assert run(d, arith_req(Opcode.INCREMENT, b"n", 1, 10)) == [error(Opcode.INCREMENT, Status.NOT_STORED)]


def test_touch_and_gat_forms() -> None:
    d, stats = make()
    run(d, store_req(Opcode.SETQ, b"a", b"v", 7))
    cas = run(d, req(Opcode.GET, b"a"))[0].cas
    exp = struct.pack(">I", 100)
    assert run(
        d,
        req(Opcode.TOUCH, b"a", exp)
        + req(Opcode.GAT, b"a", exp)
        + req(Opcode.GATK, b"a", exp)
        + req(Opcode.GATQ, b"a", exp)
        + req(Opcode.GATQ, b"z", exp)
        + req(Opcode.GATKQ, b"z", exp)
        + req(Opcode.GATK, b"z", exp)
        + req(Opcode.TOUCH, b"z", exp),
    ) == [
        ok(Opcode.TOUCH, extras=flags(7), cas=cas),
        ok(Opcode.GAT, extras=flags(7), value=b"v", cas=cas),
        ok(Opcode.GATK, extras=flags(7), key=b"a", value=b"v", cas=cas),
        ok(Opcode.GATQ, extras=flags(7), value=b"v", cas=cas),
        ok(Opcode.GATK, status=Status.KEY_ENOENT, key=b"z"),
        error(Opcode.TOUCH, Status.KEY_ENOENT),
    ]
    st = stats.cache("c")
    assert (st.cmd_touch, st.touch_hits, st.touch_misses) == (8, 4, 4)


def test_too_large_values() -> None:
    d, _ = make(MemoryBackend(max_item_size=1024))
    run(d, store_req(Opcode.SETQ, b"a", b"old") + store_req(Opcode.SETQ, b"b", b"old"))
    big = b"x" * 1000  # under the parser's limit, over the backend's once sized
    cas = run(d, req(Opcode.GET, b"b"))[0].cas
    assert run(
        d,
        store_req(Opcode.SET, b"a", big)
        + store_req(Opcode.SETQ, b"b", big, cas=cas)
        + req(Opcode.APPEND, b"zz", value=big)
        + req(Opcode.GET, b"a")
        + req(Opcode.GET, b"b"),
    ) == [
        error(Opcode.SET, Status.E2BIG),
        error(Opcode.SETQ, Status.E2BIG),
        error(Opcode.APPEND, Status.E2BIG),
        error(Opcode.GET, Status.KEY_ENOENT),  # a too-large set drops the old value,
        error(Opcode.GET, Status.KEY_ENOENT),  # a set with a CAS too (memcached looks at the opcode)
    ]
    run(d, store_req(Opcode.SETQ, b"a", b"old"))
    too_large = b.BinTooLarge(Opcode.SETQ, 1, c.StoreMode.SET, b"a", 0, 0, 10**7, quiet=True)
    assert frames(b"".join(answers(d.run([too_large])))) == [ok(Opcode.SETQ, status=Status.E2BIG, value=b"Too large.", opaque=1)]
    assert run(d, req(Opcode.GET, b"a")) == [error(Opcode.GET, Status.KEY_ENOENT)]


def test_flush_noop_version_quit() -> None:
    d, _ = make()
    run(d, store_req(Opcode.SETQ, b"a", b"v"))
    assert run(d, req(Opcode.FLUSHQ) + req(Opcode.GET, b"a") + req(Opcode.FLUSH) + req(Opcode.NOOP) + req(Opcode.VERSION)) == [
        error(Opcode.GET, Status.KEY_ENOENT),
        ok(Opcode.FLUSH),
        ok(Opcode.NOOP),
        ok(Opcode.VERSION, value=VERSION_TEXT.encode()),
    ]
    assert run(d, req(Opcode.QUIT)) == [ok(Opcode.QUIT)]
    assert run(d, req(Opcode.QUITQ)) == []
    refused, _ = make(MemoryBackend(allow_flush=False))
    assert run(refused, req(Opcode.FLUSHQ)) == [error(Opcode.FLUSHQ, Status.AUTH_ERROR)]


def test_stat_groups() -> None:
    d, stats = make()
    run(d, req(Opcode.GETQ, b"a"))
    general = run(d, req(Opcode.STAT))
    assert general[-1] == ok(Opcode.STAT)
    named = {f.key: f.value for f in general[:-1]}
    assert named[b"cmd_get"] == b"1" and all(f.status == 0 and f.cas == 0 for f in general)
    assert run(d, req(Opcode.STAT, b"resetting")) == [ok(Opcode.STAT)]  # memcached: a prefix
    assert stats.cache("c").cmd_get == 0
    assert run(d, req(Opcode.STAT, b"foo")) == [error(Opcode.STAT, Status.KEY_ENOENT)]
    assert run(d, req(Opcode.STAT, b"conns")) == [error(Opcode.STAT, Status.KEY_ENOENT)]  # text-only in memcached


def test_backend_errors_answer_out_of_memory_with_the_reason() -> None:
    d, stats = make(Failing())
    reason = b"momento timeout after 5.0s on "
    assert run(d, req(Opcode.GETQ, b"a") + store_req(Opcode.SETQ, b"a", b"v") + req(Opcode.DELETEQ, b"a")) == [
        error(Opcode.GETQ, Status.ENOMEM, reason + b"get_many"),
        error(Opcode.SETQ, Status.ENOMEM, reason + b"store"),
        error(Opcode.DELETEQ, Status.ENOMEM, reason + b"delete"),
    ]
    assert stats.cache("c").snapshot()["backend_errors_timeout"] == 3


class Buggy(MemoryBackend):
    def get_many(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bug")


def test_a_bug_answers_a_binary_frame(caplog: pytest.LogCaptureFixture) -> None:
    d, _ = make(Buggy())
    assert run(d, req(Opcode.GETK, b"a")) == [error(Opcode.GETK, Status.ENOMEM, b"internal error")]
    assert "internal error executing getk" in caplog.text


def test_protocol_errors_answer_their_frame() -> None:
    d, _ = make()
    assert run(d, req(Opcode.SASL_LIST_MECHS) + req(Opcode.NOOP)) == [
        error(Opcode.SASL_LIST_MECHS, Status.UNKNOWN_COMMAND),
        ok(Opcode.NOOP),
    ]


def test_opaque_is_echoed() -> None:
    d, _ = make()
    replies = run(d, req(Opcode.GETK, b"a", opaque=1) + req(Opcode.NOOP, opaque=0xFFFFFFFF))
    assert [f.opaque for f in replies] == [1, 0xFFFFFFFF]


def test_exact_counters_after_a_scripted_workload() -> None:
    d, stats = make()
    run(
        d,
        store_req(Opcode.SET, b"a", b"1")
        + req(Opcode.GETKQ, b"a")
        + req(Opcode.GETKQ, b"b")
        + arith_req(Opcode.INCREMENT, b"a", 1)
        + arith_req(Opcode.INCREMENT, b"zz", 1, 0, b.NO_CREATE)
        + arith_req(Opcode.DECREMENT, b"a", 1)
        + req(Opcode.DELETE, b"a")
        + req(Opcode.DELETE, b"a")
        + req(Opcode.TOUCH, b"a", struct.pack(">I", 1))
        + store_req(Opcode.ADD, b"b", b"x")
        + req(Opcode.GAT, b"b", struct.pack(">I", 0))
        + req(Opcode.FLUSH)
        + store_req(Opcode.SET, b"b", b"y", cas=1),
    )
    st = stats.cache("c")
    assert (st.cmd_get, st.get_hits, st.get_misses) == (2, 1, 1)
    assert st.cmd_set == 3
    assert (st.incr_hits, st.incr_misses, st.decr_hits, st.decr_misses) == (1, 1, 1, 0)
    assert (st.delete_hits, st.delete_misses) == (1, 1)
    assert (st.cmd_touch, st.touch_hits, st.touch_misses) == (2, 1, 1)
    assert st.cmd_flush == 1
    assert st.cas_misses == 1


def test_audit_records_binary_commands() -> None:
    records: list[dict[str, Any]] = []

    class Audit:
        enabled = True

        def record(self, **kw: Any) -> None:
            records.append(kw)

    stats = Stats()
    d = Dispatcher(MemoryBackend(), stats.cache("c"), stats, audit=Audit())  # type: ignore[arg-type]
    run(d, store_req(Opcode.SETQ, b"a", b"vv", 3, 9) + req(Opcode.GETK, b"a"))
    assert [(r["command"], r["keys"], r["outcome"], r["flags"], r["nbytes"]) for r in records] == [
        ("setq", (b"a",), "stored", 3, 2),
        ("getk", (b"a",), "hit", None, None),
    ]


def test_a_write_already_expired_answers_cas_0() -> None:
    """Documented difference (docs/compatibility.md): the CAS of a write is read back,
    and an item stored already expired is not there to read (memcached answers the
    unique of the invisible item)."""
    d, _ = make()
    past = 2592001  # above 30 days: a Unix time, long past
    assert run(d, store_req(Opcode.SET, b"a", b"v", exptime=past) + arith_req(Opcode.INCREMENT, b"n", 1, 5, past)) == [
        ok(Opcode.SET),
        ok(Opcode.INCREMENT, value=struct.pack(">Q", 5)),
    ]


def _tiered() -> Any:
    from mproxy.backends.tiered import TieredBackend
    from mproxy.backends.tiered.memory import MemoryTier

    return TieredBackend(MemoryBackend(), MemoryTier(1 << 20), default_ttl=900.0, max_ttl=86400.0, second_miss=False)


def _migrating() -> Any:
    from tests.test_migrate import Rig

    return Rig().backend


@pytest.mark.parametrize("backend", [_tiered, _migrating], ids=["tiered", "migrating"])
def test_a_binary_write_through_a_wrapping_backend_answers_the_items_cas(backend: Any) -> None:
    """The local tiers and the migration wrap another backend: a binary set's CAS is
    the one the next get shows, as on the backend inside (a bug: they lacked stored_cas)."""
    d, _ = make(backend())
    (stored,) = run(d, store_req(Opcode.SET, b"a", b"hello", 5))
    (got,) = run(d, req(Opcode.GET, b"a"))
    assert stored.status == 0 and got.status == 0
    assert stored.cas == got.cas != 0
