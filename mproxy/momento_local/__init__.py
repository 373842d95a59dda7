"""A Momento-compatible gRPC server, in memory, for trials and tests.

It serves ``cache_client.Scs`` and ``control_client.ScsControl`` (the generated
code of ``momento-wire-types``) on one port, so the real ``momento`` SDK and raw
``ScsStub`` calls work against it. Run it in its own, un-patched process::

    mproxy-momento-local --port 0 --cache default

or in-process (not under gevent) with ``mproxy.momento_local.server.serve()``.
See ``server.py`` for the status codes, the fault spec syntax and the control
port protocol, and ``store.py`` for the data semantics.

Importing this package is cheap: it imports neither grpc nor momento.
"""
