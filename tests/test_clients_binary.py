"""Real client libraries that speak only the binary protocol, against mproxy on both
backends, each compared with what it gets from the real memcached.

* ``python-binary-memcached`` (``bmemcached``): pipelines quiet sets and gets
  (``setq``/``getkq`` then ``noop``) for its multi-key calls, reads the CAS of a
  write's answer (``set(..., get_cas=True)``) and uses it for ``cas``.
* Node's ``memjs``: sends an initial value and expiry with every increment (so a
  missing counter is created), and has no multi-get (concurrent gets instead).

And counters created under concurrency: many clients incrementing one missing
counter with an initial value each get a distinct value, on both backends.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.servers import HOST, Server
from tests.test_clients import proxy  # noqa: F401  (a fixture: mproxy on each backend)

try:
    import bmemcached
except ImportError:  # pragma: no cover - installed by the [test] extra
    bmemcached = None

pytestmark = pytest.mark.e2e


def _bmemcached(port: int) -> Any:
    if bmemcached is None:
        if os.environ.get("CI"):
            pytest.fail("bmemcached missing: pip install -e '.[test]' installs python-binary-memcached")
        pytest.skip("python-binary-memcached is not installed")
    return bmemcached.Client((f"{HOST}:{port}",), socket_timeout=10)


def _outcome(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """The call's result, or the name and status of the error it raised."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - the error is the result being compared
        return f"{type(err).__name__} {getattr(err, 'code', '')}"


def bmemcached_scenario(port: int) -> dict[str, Any]:
    client = _bmemcached(port)
    r: dict[str, Any] = {}
    try:
        r["flush"] = client.flush_all()
        r["set"] = client.set("py:a", "alpha")
        r["get"] = client.get("py:a")
        r["get_missing"] = client.get("py:missing")
        r["add_existing"] = client.add("py:a", "x")
        r["add_new"] = client.add("py:b", b"\x00bytes\xff")
        r["get_bytes"] = client.get("py:b")
        r["replace"] = client.replace("py:a", "beta")
        r["replace_missing"] = client.replace("py:nope", "x")
        r["set_object"] = client.set("py:obj", {"n": 1, "list": [1, "two", 3.0]})
        r["object_back"] = client.get("py:obj")
        r["int_back"] = (client.set("py:int", 2**40), client.get("py:int"))
        # the CAS a write answers is the item's: gets agrees, and cas accepts it
        stored, cas = client.set("py:c", "v1", get_cas=True)
        r["set_cas"] = (stored, cas > 0)
        value, gets_cas = client.gets("py:c")
        r["gets_agrees"] = (value, gets_cas == cas)
        r["cas"] = client.cas("py:c", "v2", cas)
        r["cas_stale"] = client.cas("py:c", "v3", cas)
        r["cas_missing"] = client.cas("py:nope", "v3", 12345)
        r["after_cas"] = client.get("py:c")
        r["delete_stale_cas"] = client.delete("py:c", cas=cas)
        r["incr_create"] = client.incr("py:n", 5, default=10)
        r["incr"] = client.incr("py:n", 5)
        r["decr"] = client.decr("py:n", 100)
        r["counter_text"] = client.get("py:n")
        client.set("py:text", "abc")
        r["incr_text"] = _outcome(client.incr, "py:text", 1)
        r["delete"] = client.delete("py:a")
        r["delete_again"] = client.delete("py:a")
        r["get_deleted"] = client.get("py:a")
        data = {f"py:m{i}": f"value {i}" for i in range(300)}
        r["set_multi"] = client.set_multi(data)
        r["get_multi"] = client.get_multi([*data, "py:absent"]) == data
        r["get_multi_cas"] = len(client.get_multi(list(data)[:5], get_cas=True))
        r["delete_multi"] = client.delete_multi(list(data)[:10])
        r["get_multi_after"] = len(client.get_multi(list(data)))
        (stats,) = client.stats().values()
        r["stats"] = {name in stats for name in ("cmd_get", "get_hits", "curr_connections")}
        r["flush_then_get"] = (client.flush_all(), client.get("py:b"))
    finally:
        client.disconnect_all()
    return r


def test_bmemcached_sees_what_memcached_answers(proxy: Server, memcached_server: Server) -> None:
    expected = bmemcached_scenario(memcached_server.port)
    assert expected["get"] == "alpha" and expected["get_multi"] is True and expected["set_cas"] == (True, True)
    assert bmemcached_scenario(proxy.port) == expected


NODE_DIR = Path(__file__).resolve().parent / "clients" / "node"


def _memjs_results(port: int) -> dict[str, object]:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "memjs").is_dir():
        if os.environ.get("CI"):
            pytest.fail("node or tests/clients/node/node_modules missing: .ci/run installs them")
        pytest.skip("the memjs check needs node and `npm ci --prefix tests/clients/node`")
    proc = subprocess.run(
        [node, str(NODE_DIR / "check_memjs.js"), f"{HOST}:{port}"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    results: dict[str, object] = json.loads(proc.stdout)
    return results


def test_memjs_sees_what_memcached_answers(proxy: Server, memcached_server: Server) -> None:
    expected = _memjs_results(memcached_server.port)
    assert expected["get"] == ["alpha", "\0\0\0\0"] and expected["multi_count"] == 200  # the script itself works
    assert _memjs_results(proxy.port) == expected


#: Connections racing on one counter. On Momento an increment is a read then a
#: conditional write, retried when another write lands in between, 8 attempts at most
#: (then SERVER_ERROR contention, documented): with 6 clients one creates the counter
#: and each of the 5 others can lose at most 4 times, so every one succeeds.
CLIENTS = 6
ROUNDS = 5


def test_concurrent_increments_with_an_initial_value_each_get_their_own(proxy: Server) -> None:
    """Each round, CLIENTS connections at once increment one missing counter by 1 with
    initial value 100: one creates it (and reads 100), every other one increments."""
    clients = [_bmemcached(proxy.port) for _ in range(CLIENTS)]
    try:
        for round_ in range(ROUNDS):
            key = f"py:race{round_}"
            results: list[int] = []
            lock = threading.Lock()
            start = threading.Barrier(CLIENTS)

            def bump(client: Any) -> None:
                start.wait()
                value = client.incr(key, 1, default=100)
                with lock:
                    results.append(value)

            threads = [threading.Thread(target=bump, args=(client,)) for client in clients]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            assert sorted(results) == list(range(100, 100 + CLIENTS)), results
            assert int(clients[0].get(key)) == 100 + CLIENTS - 1
    finally:
        for client in clients:
            client.disconnect_all()
