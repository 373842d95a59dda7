"""Where memcached semantics meet a Backend. No sockets here.

* :mod:`.core`: :class:`Dispatcher`: ``run`` (the commands of one read, in
  order, grouped and answered), the classic text commands, and memcached's
  rules shared by every protocol (what is counted, what a too-large set
  removes, CAS outcomes).
* :mod:`.meta`: the meta commands (``mg ms md ma me``).
* :mod:`.binary`: the binary protocol's requests.
* :mod:`.admin`: memcached's admin commands (``stats <group>``,
  ``cache_memlimit``, ``slabs``, ``lru``, ``lru_crawler``, ``watch``, ``verbosity``).
"""

from mproxy.dispatch.core import VERSION_TEXT, Dispatcher

__all__ = ["VERSION_TEXT", "Dispatcher"]
