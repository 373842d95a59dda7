"""libmemcached's own conformance checker (``memccapable -a`` and ``-b``) against mproxy.

``memccapable`` ships in Debian's ``libmemcached-tools``; CI installs it. It
drives every classic ASCII command, with and without noreply, and every binary
opcode with its quiet form, the way libmemcached (and so pylibmc, PHP's
memcached, ...) speaks them; in binary it also checks the CAS fields (set on
every write's answer, and usable for the next conditional write).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import MPROXY_CONFIGS
from tests.servers import HOST, start_mproxy

pytestmark = pytest.mark.e2e

BINARY = shutil.which("memccapable")


@pytest.mark.parametrize("protocol", ["-a", "-b"], ids=["ascii", "binary"])
@pytest.mark.parametrize("backend", sorted(MPROXY_CONFIGS))
def test_memccapable_passes(backend: str, protocol: str, tmp_path: Path) -> None:
    if BINARY is None:
        if os.environ.get("CI"):
            pytest.fail("memccapable missing: .ci/run installs libmemcached-tools")
        pytest.skip("memccapable not installed (apt-get install libmemcached-tools)")
    server = start_mproxy(MPROXY_CONFIGS[backend](), tmp_path)
    try:
        proc = subprocess.run([BINARY, protocol, "-h", HOST, "-p", str(server.port)], capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "All tests passed" in proc.stdout, proc.stdout
