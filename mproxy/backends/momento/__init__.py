"""The Momento backend: memcached semantics on Momento Cache's gRPC protocol.

Importing this package is cheap: it imports neither grpc, the momento SDK nor
gevent (the supervisor of worker processes imports :mod:`.embedded` from it).
Its public names load their modules on first use. Modules, each importing
only those listed before it:

``codec``      how memcached items are laid out in Momento: flags header, CAS
               uniques, TTLs (stdlib only, no I/O)
``bridge``     results of RPCs handed from the gRPC thread to greenlets
               (``PendingCall``, the hub inbox, ``real_threading``)
``errors``     the error table: gRPC and SDK failures as ``BackendError`` /
               ``ValueTooLarge``
``aio``        ``grpc.aio`` on one real thread per process: channels, calls,
               deadlines and retries (``AioTransport``)
``flow``       budgets, call slots, the order of writes per key
``transport``  the SDK contract (the only import of ``momento``), channel
               arguments, metadata, the connection of one cache
``batcher``    coalescing: the get batcher (GetBatch, single-flight) and the
               set batcher (SetBatch)
``embedded``   the bundled local Momento server as a shared child process
               (stdlib only)
``endpoint``   ``Endpoint`` (targets, TLS, token) and credentials from the
               environment
``meta``       the meta commands on the classic operations (a mixin)
``backend``    ``MomentoBackend``: each memcached command as RPCs
``factory``    ``from_config``: the backend of one ``[[cache]]``
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mproxy.backends.momento.backend import MomentoBackend
    from mproxy.backends.momento.endpoint import Endpoint
    from mproxy.backends.momento.factory import from_config

#: ``sys.setswitchinterval`` of a process serving a Momento backend (the CLI
#: sets it): gRPC's thread gets the GIL back from a busy hub within 1 ms
#: instead of 5 (docs/performance.md: the p99 of gets under load halves).
SWITCH_INTERVAL_SECONDS = 0.001

_LAZY = {
    "MomentoBackend": "mproxy.backends.momento.backend",
    "Endpoint": "mproxy.backends.momento.endpoint",
    "from_config": "mproxy.backends.momento.factory",
}

__all__ = ["Endpoint", "MomentoBackend", "SWITCH_INTERVAL_SECONDS", "from_config"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
