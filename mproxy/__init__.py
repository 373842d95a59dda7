"""mproxy: a memcached-compatible proxy for Momento Cache.

This module holds the version only: importing ``mproxy`` must stay cheap
(no gevent, no grpc, no momento) so that ``cli.py`` can patch first.
"""

__version__ = "0.1.0"
