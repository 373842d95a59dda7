"""The open-file limit (``RLIMIT_NOFILE``) a process needs for the connections it serves.

Every client connection is a file descriptor. Past the soft limit ``accept``
fails with ``EMFILE``: new clients wait in the listen queue with no answer,
and nothing else (a log file, a gRPC reconnect) can open either. At start a
process raises its soft limit to its hard limit (what an unprivileged process
may do; systemd's default soft limit is 1,024, its hard limit much higher),
then checks that what its configuration may open fits: :func:`ensure` raises
:class:`FdLimitError` otherwise, and the process refuses to start, as memcached
does when ``-c`` does not fit. Each worker of a supervisor is a process with
its own descriptor table and inherits the raised limit.

Stdlib only.
"""

from __future__ import annotations

import resource

#: Descriptors a process needs beyond its client connections: listening sockets, the log
#: and audit files, a supervisor's links to its workers, the embedded server's pipes, gRPC's
#: own (its event fds, a control channel), with room to spare.
HEADROOM = 64
#: Descriptors per gRPC connection to Momento (a connection, TLS channels two: see
#: docs/compatibility.md, "Concurrency and connections").
PER_BACKEND_CONNECTION = 2


class FdLimitError(Exception):
    """The open-file limit is below what the configuration needs (the message says how to raise it)."""

    def __init__(self, needed: int, soft: int, hard: int) -> None:
        self.needed = needed
        self.soft = soft
        self.hard = hard
        super().__init__(f"open-file limit {soft} (hard limit {limit_text(hard)}) is below the {needed} needed")


def limit_text(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)


def raise_soft_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (or, when that is unlimited, as far as
    the kernel allows); the (soft, hard) limits afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft == hard:
        return soft, hard
    targets = [hard] if hard != resource.RLIM_INFINITY else []
    targets.append(_nr_open())
    for target in targets:
        if target <= soft:
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        return target, hard
    return soft, hard


def _nr_open() -> int:
    """The kernel's cap on a process's descriptors (Linux ``fs.nr_open``), or 1,048,576."""
    try:
        with open("/proc/sys/fs/nr_open") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 1024 * 1024


def ensure(needed: int) -> tuple[int, int, int]:
    """Raise the soft limit (:func:`raise_soft_limit`); (soft before, soft, hard) when
    ``needed`` descriptors fit, else :class:`FdLimitError`."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    soft, hard = raise_soft_limit()
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise FdLimitError(needed, soft, hard)
    return before, soft, hard
