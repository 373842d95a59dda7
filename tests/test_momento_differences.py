"""mproxy on Momento: one test per documented difference from memcached.

``docs/compatibility.md`` lists where mproxy with ``backend = "momento"`` cannot
answer as memcached 1.6 does. The differential corpus (``tests/differential``)
skips or splits the sessions that run into those differences; each test here pins
one of them as documented, over TCP, against mproxy on the Momento backend
(started by ``mproxy_factory`` from ``tests/conftest.py``). Each docstring says what
memcached answers instead.

Two kinds of proxy are used:

* ``embedded``: ``[momento] local = "embedded"``, the configuration of the
  differential ``momento`` target (mproxy starts the bundled local server).
* ``shared_a`` / ``shared_b``: two proxies on one local Momento server that this
  module starts itself, so a test can see one cache through two proxies and read
  the stored items' TTLs with Momento's ``ItemGetTtl`` (nothing here waits for an
  item to expire: the TTL Momento holds is what expiry follows).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator

import grpc
import pytest
from momento_wire_types import cacheclient_pb2 as pb
from momento_wire_types import cacheclient_pb2_grpc as pb_grpc

from mproxy.momento_local.control import control_request
from tests.conftest import MAX_ITEM_SIZE, MOMENTO_CACHE_NAME, MOMENTO_MAX_TTL, MproxyFactory
from tests.servers import HOST, LocalMomento, RawSession, Server, start_local_momento

pytestmark = pytest.mark.e2e

#: ``default_ttl`` of the shared proxies: distinct from ``max_ttl`` so a test can tell them apart.
SHARED_DEFAULT_TTL = 600
#: Bound on the time between a command and reading the TTL it set (ms): a loaded CI machine.
TTL_SLACK_MS = 3000
#: The flags header mproxy puts in front of values with non-zero flags (compatibility.md, "Flags").
FLAGS_MAGIC = b"\xffMCF"


def exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` (whole commands) on a fresh connection, return every reply before ``MN``."""
    with RawSession(port) as conn:
        conn.send(data + b"mn\r\n")
        reply, complete = conn.recv_until_terminator(b"MN\r\n")
    assert complete, f"no complete reply to {data[:80]!r}: {reply[:200]!r}"
    return reply[: -len(b"MN\r\n")]


def gets_unique(port: int, key: bytes) -> int:
    """The CAS unique ``gets key`` shows (the key must exist)."""
    reply = exchange(port, b"gets " + key + b"\r\n")
    header = reply.split(b"\r\n", 1)[0].split(b" ")
    assert header[:2] == [b"VALUE", key] and len(header) == 5, reply[:200]
    return int(header[4])


def content_unique(stored: bytes) -> int:
    """compatibility.md: the low 63 bits of the stored bytes' 8-byte BLAKE2b digest, never 0."""
    return (int.from_bytes(hashlib.blake2b(stored, digest_size=8).digest(), "big") & (2**63 - 1)) or 1


@pytest.fixture(scope="module")
def embedded(mproxy_factory: MproxyFactory) -> Server:
    """mproxy as the differential ``momento`` target runs it (embedded local server)."""
    return mproxy_factory("momento")


@pytest.fixture(scope="module")
def local_momento(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMomento]:
    server = start_local_momento(tmp_path_factory.mktemp("momento-local"), MOMENTO_CACHE_NAME)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def shared_a(mproxy_factory: MproxyFactory, local_momento: LocalMomento) -> Server:
    return mproxy_factory("momento", local=f"{HOST}:{local_momento.port}", default_ttl=SHARED_DEFAULT_TTL)


@pytest.fixture(scope="module")
def shared_b(mproxy_factory: MproxyFactory, local_momento: LocalMomento) -> Server:
    return mproxy_factory("momento", local=f"{HOST}:{local_momento.port}", default_ttl=SHARED_DEFAULT_TTL)


@pytest.fixture(scope="module")
def momento_stub(local_momento: LocalMomento) -> Iterator[pb_grpc.ScsStub]:
    """A raw Momento data client of the shared cache (another client of the same cache)."""
    channel = grpc.insecure_channel(f"{HOST}:{local_momento.port}")
    try:
        yield pb_grpc.ScsStub(channel)
    finally:
        channel.close()


METADATA = (("cache", MOMENTO_CACHE_NAME),)


def remaining_ttl_ms(stub: pb_grpc.ScsStub, key: bytes) -> int:
    """The item's remaining TTL as Momento holds it (the key must exist)."""
    response = stub.ItemGetTtl(pb._ItemGetTtlRequest(cache_key=key), metadata=METADATA, timeout=5)
    assert response.WhichOneof("result") == "found", f"{key!r} is missing"
    return int(response.found.remaining_ttl_millis)


@pytest.fixture(autouse=True)
def _fresh_caches(request: pytest.FixtureRequest) -> None:
    """Every test starts from empty caches (flush_all through each proxy it uses)."""
    for name in ("embedded", "shared_a"):
        if name in request.fixturenames:
            server: Server = request.getfixturevalue(name)
            assert exchange(server.port, b"flush_all\r\n") == b"OK\r\n"


# ---- CAS uniques are content hashes ---------------------------------------------


def test_cas_unique_is_a_hash_of_the_stored_bytes(embedded: Server) -> None:
    """Same content (value + flags) = same unique, on any key; below 2**63.

    memcached: every item gets its own number from a counter.
    """
    exchange(embedded.port, b"set a 0 0 1\r\nx\r\nset b 0 0 1\r\nx\r\nset c 7 0 1\r\nx\r\n")
    unique_a, unique_b, unique_c = (gets_unique(embedded.port, key) for key in (b"a", b"b", b"c"))
    assert unique_a == unique_b == content_unique(b"x")
    assert unique_c == content_unique(FLAGS_MAGIC + (7).to_bytes(4, "big") + b"x") != unique_a
    assert 0 < max(unique_a, unique_c) < 2**63


def test_identical_set_keeps_the_cas_unique(embedded: Server) -> None:
    """Re-setting the same value and flags keeps the unique, so a cas on it still succeeds.

    memcached: the second set issues a new unique and the cas answers ``EXISTS``.
    """
    exchange(embedded.port, b"set a 3 0 1\r\nx\r\n")
    before = gets_unique(embedded.port, b"a")
    assert exchange(embedded.port, b"set a 3 0 1\r\nx\r\n") == b"STORED\r\n"
    assert gets_unique(embedded.port, b"a") == before
    assert exchange(embedded.port, b"cas a 3 0 1 %d\r\ny\r\n" % before) == b"STORED\r\n"
    # the cas wrote other content: a new unique, and the old one is refused
    assert gets_unique(embedded.port, b"a") != before
    assert exchange(embedded.port, b"cas a 3 0 1 %d\r\nz\r\n" % before) == b"EXISTS\r\n"


def test_cas_after_a_to_b_to_a_succeeds(embedded: Server) -> None:
    """ABA: the item changes A -> B -> A between gets and cas; the old unique is valid again.

    memcached: ``EXISTS`` (the unique changed twice).
    """
    exchange(embedded.port, b"set a 0 0 1\r\nA\r\n")
    unique = gets_unique(embedded.port, b"a")
    assert exchange(embedded.port, b"set a 0 0 1\r\nB\r\n") == b"STORED\r\n"
    assert exchange(embedded.port, b"cas a 0 0 1 %d\r\nC\r\n" % unique) == b"EXISTS\r\n"
    assert exchange(embedded.port, b"set a 0 0 1\r\nA\r\n") == b"STORED\r\n"
    assert exchange(embedded.port, b"cas a 0 0 1 %d\r\nC\r\n" % unique) == b"STORED\r\n"
    assert exchange(embedded.port, b"get a\r\n") == b"VALUE a 0 1\r\nC\r\nEND\r\n"


def test_cas_unique_is_the_same_on_every_proxy(shared_a: Server, shared_b: Server) -> None:
    """A unique from one proxy is valid on another proxy of the same cache.

    memcached: uniques are per server (there is no sharing to compare with).
    """
    exchange(shared_a.port, b"set k 5 0 2\r\nvv\r\n")
    unique = gets_unique(shared_a.port, b"k")
    assert gets_unique(shared_b.port, b"k") == unique
    assert exchange(shared_b.port, b"cas k 5 0 1 %d\r\nw\r\n" % unique) == b"STORED\r\n"
    assert exchange(shared_a.port, b"get k\r\n") == b"VALUE k 5 1\r\nw\r\nEND\r\n"


# ---- expiry ------------------------------------------------------------------


def test_exptime_zero_gets_the_default_ttl(shared_a: Server, momento_stub: pb_grpc.ScsStub) -> None:
    """No "never expires": exptime 0 stores the item for ``default_ttl`` seconds (here 600).

    memcached: exptime 0 never expires (only eviction removes the item).
    """
    assert exchange(shared_a.port, b"set forever 0 0 1\r\nf\r\n") == b"STORED\r\n"
    ttl = remaining_ttl_ms(momento_stub, b"forever")
    assert SHARED_DEFAULT_TTL * 1000 - TTL_SLACK_MS < ttl <= SHARED_DEFAULT_TTL * 1000
    # the same for every command that takes an exptime
    exchange(shared_a.port, b"set t 0 100 1\r\nt\r\n")
    assert exchange(shared_a.port, b"touch t 0\r\n") == b"TOUCHED\r\n"
    assert SHARED_DEFAULT_TTL * 1000 - TTL_SLACK_MS < remaining_ttl_ms(momento_stub, b"t")


def test_exptime_above_max_ttl_is_clamped(shared_a: Server, momento_stub: pb_grpc.ScsStub) -> None:
    """exptimes beyond ``max_ttl`` (Momento's cap, 86400 s) become ``max_ttl``.

    memcached: honours any exptime (30 days relative, or any absolute time).
    """
    cap = MOMENTO_MAX_TTL * 1000
    in_ten_days = int(time.time()) + 10 * 86400
    commands = b"set rel 0 2592000 1\r\nr\r\nset abs 0 %d 1\r\na\r\n" % in_ten_days
    commands += b"set t 0 10 1\r\nt\r\ntouch t 2592000\r\nset g 0 10 1\r\ng\r\n"
    assert exchange(shared_a.port, commands) == b"STORED\r\n" * 3 + b"TOUCHED\r\nSTORED\r\n"
    assert exchange(shared_a.port, b"gat %d g\r\n" % in_ten_days) == b"VALUE g 0 1\r\ng\r\nEND\r\n"
    for key in (b"rel", b"abs", b"t", b"g"):
        assert cap - TTL_SLACK_MS < remaining_ttl_ms(momento_stub, key) <= cap, key


def test_expiry_has_millisecond_precision(shared_a: Server, momento_stub: pb_grpc.ScsStub) -> None:
    """A relative exptime of N s is a TTL of exactly N * 1000 ms from the command; append and
    incr keep the remaining TTL (read just before their write, so expiry moves at most about a
    round trip later).

    memcached: expiry follows its once-a-second clock (an exptime of 1 may expire in well
    under a second, as ``tests/differential/expiry_sleep.txt`` allows for).
    """
    before = time.monotonic()
    assert exchange(shared_a.port, b"set k 0 3 1\r\n1\r\n") == b"STORED\r\n"
    ttl = remaining_ttl_ms(momento_stub, b"k")
    elapsed_ms = (time.monotonic() - before) * 1000
    assert 3000 - elapsed_ms - 1 <= ttl <= 3000
    assert exchange(shared_a.port, b"append k 0 0 1\r\n0\r\nincr k 5\r\n") == b"STORED\r\n15\r\n"
    assert 3000 - TTL_SLACK_MS < remaining_ttl_ms(momento_stub, b"k") <= ttl


# ---- flush_all scope -----------------------------------------------------------


def test_flush_all_empties_the_whole_momento_cache(
    shared_a: Server, shared_b: Server, momento_stub: pb_grpc.ScsStub
) -> None:
    """flush_all through one proxy removes every item of the cache: those written through
    other proxies and by other Momento clients too.

    memcached: flush_all invalidates the items of that one server.
    """
    assert exchange(shared_a.port, b"set a 0 0 1\r\na\r\n") == b"STORED\r\n"
    momento_stub.Set(pb._SetRequest(cache_key=b"other", cache_body=b"o", ttl_milliseconds=60_000), metadata=METADATA)
    assert exchange(shared_b.port, b"get a other\r\n") == b"VALUE a 0 1\r\na\r\nVALUE other 0 1\r\no\r\nEND\r\n"
    assert exchange(shared_b.port, b"flush_all\r\n") == b"OK\r\n"
    assert exchange(shared_a.port, b"get a other\r\n") == b"END\r\n"
    response = momento_stub.Get(pb._GetRequest(cache_key=b"other"), metadata=METADATA)
    assert response.result == pb.Miss


# ---- item size accounting -------------------------------------------------------


def test_item_size_limit_is_memcacheds_on_momento_too(embedded: Server) -> None:
    """With ``max_item_size`` = 1 MiB (memcached ``-I 1m``) the limit covers the whole item as
    memcached counts it (about 60 bytes of header, the key and the value): for key ``k`` the
    largest value is 1048516 bytes, on Momento as on memcached
    (``tests/differential/item_size_boundary.txt``); a value of exactly 1 MiB is refused, and
    a too-large ``set`` drops the old value."""
    largest = b"x" * 1048516
    assert exchange(embedded.port, b"set k 0 0 %d\r\n%s\r\n" % (len(largest), largest)) == b"STORED\r\n"
    assert exchange(embedded.port, b"get k\r\n") == b"VALUE k 0 %d\r\n%s\r\nEND\r\n" % (len(largest), largest)
    value = b"x" * MAX_ITEM_SIZE
    too_large = b"set k 0 0 %d\r\n%s\r\n" % (len(value), value)
    assert exchange(embedded.port, too_large) == b"SERVER_ERROR object too large for cache\r\n"
    assert exchange(embedded.port, b"get k\r\n") == b"END\r\n"  # a too-large set drops the old value


# ---- backend failures ----------------------------------------------------------


def test_failed_backend_call_answers_server_error(shared_a: Server, local_momento: LocalMomento) -> None:
    """A Momento call that fails answers one ``SERVER_ERROR momento <reason> on <command>``
    line and the connection stays usable.

    memcached: has no backend; such errors do not occur.
    """
    assert exchange(shared_a.port, b"set k 0 0 1\r\nv\r\n") == b"STORED\r\n"
    # every call fails until cleared, whichever RPC the proxy uses and however often it tries
    assert control_request(HOST, local_momento.control_port, "fault *:error=UNAVAILABLE") == "OK"
    with RawSession(shared_a.port) as conn:
        try:
            conn.send(b"get k\r\n")
            reply, _ = conn.recv_until(lambda buf: buf.endswith(b"\r\n"))
        finally:
            control_request(HOST, local_momento.control_port, "clear")
        assert reply.startswith(b"SERVER_ERROR momento unavailable on get"), reply
        assert reply.count(b"\r\n") == 1
        conn.send(b"get k\r\n")
        reply, _ = conn.recv_until(lambda buf: buf.endswith(b"END\r\n"))
        assert reply == b"VALUE k 0 1\r\nv\r\nEND\r\n"


# ---- meta commands: where Momento's answers differ -------------------------------------


def test_t_shows_the_ttl_momento_holds(embedded: Server) -> None:
    """``t`` is ItemGetTtl's remaining TTL, in whole seconds rounded up; exptime 0 has the
    default TTL there (Momento has no "never expires"), so it shows that.

    memcached: ``t-1`` for exptime 0.
    """
    exchange(embedded.port, b"set k 0 0 1\r\nx\r\nset j 0 100 1\r\ny\r\n")
    reply = exchange(embedded.port, b"mg k t\r\nmg j t v\r\n")
    first, second = reply.split(b"\r\n", 1)
    assert MOMENTO_MAX_TTL - 3 <= int(first.removeprefix(b"HD t")) <= MOMENTO_MAX_TTL
    assert second.startswith(b"VA 1 t") and 97 <= int(second[len(b"VA 1 t") :].split(b"\r\n")[0]) <= 100


def test_vivify_and_stale_marks_over_the_wire(embedded: Server) -> None:
    """N, R, md I and ms I answer W, Z and X as memcached does (the marks are stored in the
    item: compatibility.md, "Meta commands"); a classic get reads the item's value."""
    assert exchange(embedded.port, b"mg v N30 s v\r\n") == b"VA 0 s0 W\r\n\r\n"
    assert exchange(embedded.port, b"mg v N30 s v\r\n") == b"VA 0 s0 Z\r\n\r\n"
    assert exchange(embedded.port, b"get v\r\n") == b"VALUE v 0 0\r\n\r\nEND\r\n"
    exchange(embedded.port, b"set k 0 100 1\r\nx\r\n")
    assert exchange(embedded.port, b"mg k R30 v\r\nmg k R200 v\r\nmg k R200 v\r\n") == (
        b"VA 1\r\nx\r\nVA 1 W\r\nx\r\nVA 1 Z\r\nx\r\n"
    )
    assert exchange(embedded.port, b"md k I T30\r\nmg k v\r\nmg k v\r\n") == (
        b"HD\r\nVA 1 X W\r\nx\r\nVA 1 Z X\r\nx\r\n"
    )
    assert exchange(embedded.port, b"get k\r\n") == b"VALUE k 0 1\r\nx\r\nEND\r\n"


def test_md_invalidate_of_a_stale_item_keeps_its_cas(embedded: Server) -> None:
    """The CAS unique is the content's: marking an item stale changes it once, marking it
    stale again (same value, flags, marks) does not.

    memcached: every ``md … I`` gives a new CAS.
    """
    exchange(embedded.port, b"set k 0 100 1\r\nx\r\n")
    first = exchange(embedded.port, b"md k I\r\nmg k c\r\n")
    second = exchange(embedded.port, b"md k I\r\nmg k c\r\n")
    assert first.startswith(b"HD\r\nHD c") and first == second
    assert b" c%d " % content_unique(b"x") not in first


def test_ms_invalidate_stores_any_other_cas_stale(embedded: Server) -> None:
    """``ms … C<cas> I`` with a CAS other than the item's stores the value marked stale:
    content uniques have no order, so "lower" cannot be told from "higher".

    memcached: stale only for a lower CAS; a higher one answers ``EX``.
    """
    exchange(embedded.port, b"set k 0 100 1\r\nx\r\n")
    higher = content_unique(b"x") + 1
    assert exchange(embedded.port, b"ms k 1 C%d I\r\ny\r\nmg k v\r\n" % higher) == b"HD\r\nVA 1 X W\r\ny\r\n"


def test_h_and_l_are_what_this_proxy_saw(shared_a: Server, shared_b: Server) -> None:
    """``h`` and ``l`` come from each proxy process's record of the meta commands it
    served: a key fetched through another proxy (or another worker) is new to this one.

    memcached: ``h1`` once any client fetched the item.
    """
    # a key no other test uses: a flush through shared_a does not clear shared_b's record
    exchange(shared_a.port, b"ms hl 1\r\nx\r\n")
    assert exchange(shared_a.port, b"mg hl h l\r\nmg hl h l\r\n") == b"HD h0 l0\r\nHD h1 l0\r\n"
    assert exchange(shared_b.port, b"mg hl h l\r\n") == b"HD h0 l0\r\n"


def test_md_c_reads_then_deletes(shared_a: Server, momento_stub: pb_grpc.ScsStub) -> None:
    """``md … C<cas>`` is GetWithHash, then Delete (Momento has no conditional delete): the
    compare holds against writes through this proxy, not against other clients' writes
    between the two calls.

    memcached: one step under the item lock.
    """
    exchange(shared_a.port, b"set k 0 0 1\r\nx\r\n")
    cas = content_unique(b"x")
    assert exchange(shared_a.port, b"md k C%d\r\n" % (cas + 1)) == b"EX\r\n"
    assert exchange(shared_a.port, b"md k C%d q\r\nmg k\r\n" % cas) == b"EN\r\n"
    response = momento_stub.Get(pb._GetRequest(cache_key=b"k"), metadata=METADATA)
    assert response.result == pb.Miss


def test_meta_key_echo_follows_the_request(embedded: Server) -> None:
    """``k`` echoes the key base64 when the request came base64 (``b``), not by how it was stored.

    memcached: base64 when the item was stored by an ms with ``b``, whatever the mg sends.
    """
    exchange(embedded.port, b"ms Zm9v 1 b\r\nx\r\n")
    assert exchange(embedded.port, b"mg foo k v\r\n") == b"VA 1 kfoo\r\nx\r\n"
    assert exchange(embedded.port, b"mg Zm9v b k\r\n") == b"HD kZm9v b\r\n"


def test_me_shows_the_figures_momento_has(embedded: Server) -> None:
    """``me`` shows the TTL Momento holds (ItemGetTtl), the access time and fetch bit of this
    proxy's record (as ``h`` and ``l``) and the content unique; no slab class or size.

    memcached: ``ME k exp=-1 la=0 cas=7 fetch=no cls=1 size=61``.
    """
    # a key no test read before: each worker process keeps its own record
    exchange(embedded.port, b"set me-k 0 100 1\r\nx\r\n")
    reply = exchange(embedded.port, b"me me-k\r\n")
    assert reply.startswith(b"ME me-k exp=-")
    exp = int(reply.split(b" ")[2].removeprefix(b"exp="))
    assert -100 <= exp <= -97
    assert reply.endswith(b" la=0 cas=%d fetch=no\r\n" % content_unique(b"x"))
    assert exchange(embedded.port, b"me nothere\r\n") == b"EN\r\n"


def test_ms_c_is_the_content_unique(embedded: Server) -> None:
    """``ms ... c`` answers the unique gets will show, known without a read (a content digest).

    memcached: a new number from its counter.
    """
    assert exchange(embedded.port, b"ms k 2 c F3\r\nab\r\n") == b"HD c%d\r\n" % content_unique(
        FLAGS_MAGIC + (3).to_bytes(4, "big") + b"ab"
    )
    assert gets_unique(embedded.port, b"k") == content_unique(FLAGS_MAGIC + (3).to_bytes(4, "big") + b"ab")


def test_ma_t_sets_the_ttl_with_the_incr(shared_a: Server, momento_stub: pb_grpc.ScsStub) -> None:
    """``ma ... T`` writes the new number and TTL in one SetIfHash (as memcached, one step)."""
    exchange(shared_a.port, b"set n 0 0 1\r\n1\r\n")
    assert exchange(shared_a.port, b"ma n T100 v\r\n") == b"VA 1\r\n2\r\n"
    assert 100_000 - TTL_SLACK_MS < remaining_ttl_ms(momento_stub, b"n") <= 100_000


def test_cache_memlimit_cannot_adjust(embedded: Server) -> None:
    """A Momento cache has no byte budget of mproxy's to set.

    memcached: ``OK`` (its item memory becomes N MiB).
    """
    assert exchange(embedded.port, b"cache_memlimit 64\r\n") == (
        b"MEMLIMIT_ADJUST_FAILED out of bounds or unable to adjust\r\n"
    )
