"""The Momento backend: memcached semantics on Momento Cache's gRPC protocol.

Imported lazily by the backend registry, after the CLI has monkey-patched
gevent and called :func:`prepare_gevent`. Modules, each importing only those
listed before it:

``codec``      how memcached items are laid out in Momento: flags header, CAS
               uniques, TTLs (stdlib only, no I/O)
``errors``     the error table: gRPC and SDK failures as ``BackendError`` /
               ``ValueTooLarge``
``transport``  the SDK contract (the only import of ``momento``), gevent
               preparation, SDK configuration and retries, channels and
               channel ids, connections, call slots and per-command budgets
``embedded``   the bundled local Momento server as a shared child process
               (stdlib only)
``endpoint``   ``Endpoint`` (targets, TLS, token) and credentials from the
               environment
``backend``    ``MomentoBackend``: each memcached command as SDK and raw calls
``factory``    ``from_config``: the backend of one ``[[cache]]``
"""

from mproxy.backends.momento.backend import MomentoBackend
from mproxy.backends.momento.endpoint import Endpoint
from mproxy.backends.momento.factory import from_config
from mproxy.backends.momento.transport import prepare_gevent

__all__ = ["Endpoint", "MomentoBackend", "from_config", "prepare_gevent"]
