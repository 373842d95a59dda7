"""A Momento-compatible gRPC server, in memory, for trials and tests.

It serves ``cache_client.Scs`` and ``control_client.ScsControl`` (the generated
code of ``momento-wire-types``) on one port, so the real ``momento`` SDK and raw
``ScsStub`` calls work against it. Run it in its own, un-patched process::

    mproxy-momento-local --port 0 --cache default

or in-process (not under gevent) with ``mproxy.momento_local.server.serve()``.
Modules, each importing only those listed before it:

``store``    the caches in memory: the data semantics (no gRPC)
``faults``   fault rules: the spec syntax, ``parse_fault``, ``FaultInjector``
``gate``     what every call passes (statistics, faults, authorization, the
             ``cache`` header, limits) and the status codes of refusals
``data``     ``cache_client.Scs``: the data RPCs over the store
``control``  ``control_client.ScsControl``, and the control port (fault rules
             and statistics at run time, ``control_request``)
``pool``     the few threads calls run on; a call asleep in a fault's delay
             gives its place to another (``CallPool``)
``server``   ``serve()``: both services and the control port, started

Importing this package is cheap: it imports neither grpc nor momento.
"""
