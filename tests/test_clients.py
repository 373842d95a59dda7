"""Real client libraries against mproxy over TCP, on both backends.

pymemcache is covered in ``test_e2e_cli.py``; here pylibmc (libmemcached, the
C client behind PHP's and many other bindings) speaks the ASCII protocol with
its own framing, pipelining of noreply writes and multi-get, and Node's
``memcached`` package runs one script against real memcached and mproxy.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MPROXY_CONFIGS
from tests.servers import HOST, Server, start_mproxy

try:
    import pylibmc
except ImportError:  # no wheel for this platform: setup.cfg installs it on x86_64 only
    pylibmc = None

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=sorted(MPROXY_CONFIGS))
def proxy(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_mproxy(MPROXY_CONFIGS[request.param](), tmp_path_factory.mktemp("clients"))
    yield server
    server.stop()


@pytest.fixture()
def mc(proxy: Server) -> Iterator[object]:
    if pylibmc is None:
        if os.environ.get("CI") and platform.machine() == "x86_64":
            pytest.fail("pylibmc missing: pip install -e '.[test]' installs it on x86_64")
        pytest.skip("pylibmc has no wheel for this platform")
    client = pylibmc.Client([f"{HOST}:{proxy.port}"], binary=False, behaviors={"cas": True, "tcp_nodelay": True})
    client.flush_all()
    yield client
    client.disconnect_all()


def test_pylibmc_storage_commands(mc: object) -> None:
    assert mc.set("a", "1")
    assert mc.get("a") == "1"
    assert mc.add("a", "x") is False
    assert mc.add("b", b"bytes") is True
    assert mc.replace("a", "10") is True
    assert mc.replace("zz", "10") is False
    assert mc.append("a", "0") is True
    assert mc.prepend("a", "9") is True
    assert mc.get("a") == "9100"
    assert mc.delete("b") is True
    assert mc.delete("b") is False
    assert mc.get("b") is None


def test_pylibmc_serialised_values_keep_their_flags(mc: object) -> None:
    values = {"int": 42, "long": 2**40, "list": [1, "two", 3.0], "dict": {"k": "v"}, "bytes": b"\x00\xff", "str": "h\u00e9"}
    for key, value in values.items():
        assert mc.set(key, value)
    assert mc.get_multi(list(values)) == values


def test_pylibmc_counters(mc: object) -> None:
    mc.set("n", "10")
    assert mc.incr("n") == 11
    assert mc.incr("n", 100) == 111
    assert mc.decr("n", 1000) == 0
    with pytest.raises(pylibmc.NotFound):
        mc.incr("missing")
    mc.set("text", "abc")
    with pytest.raises(pylibmc.Error):
        mc.incr("text")


def test_pylibmc_cas_touch_and_multi(mc: object) -> None:
    mc.set("c", "v1")
    value, cas = mc.gets("c")
    assert value == "v1"
    assert mc.cas("c", "v2", cas) is True
    assert mc.cas("c", "v3", cas) is False
    assert mc.get("c") == "v2"
    assert mc.touch("c", 100) is True
    assert mc.touch("nope", 100) is False
    data = {f"key:{i}": f"value {i}" for i in range(500)}
    assert mc.set_multi(data) == []
    assert mc.get_multi(list(data) + ["absent"]) == data
    assert mc.delete_multi(list(data)[:10]) is True
    assert len(mc.get_multi(list(data))) == 490


NODE_CHECK = Path(__file__).resolve().parent / "clients" / "node" / "check.js"


def _node_results(port: int) -> dict[str, object]:
    node = shutil.which("node")
    installed = (NODE_CHECK.parent / "node_modules" / "memcached").is_dir()
    if node is None or not installed:
        if os.environ.get("CI"):
            pytest.fail("node or tests/clients/node/node_modules missing: .ci/run installs them")
        pytest.skip("the Node client check needs node and `npm ci --prefix tests/clients/node`")
    proc = subprocess.run([node, str(NODE_CHECK), f"{HOST}:{port}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_node_memcached_client_sees_what_memcached_answers(proxy: Server, memcached_server: Server) -> None:
    """The 'memcached' npm client (ASCII): the same script against real memcached and
    mproxy gives the same results."""
    expected = _node_results(memcached_server.port)
    assert expected["get"] == "alpha" and expected["multi_count"] == 200  # the script itself works
    assert _node_results(proxy.port) == expected
