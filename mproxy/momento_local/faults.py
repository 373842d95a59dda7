"""Fault rules of the local Momento server: :class:`Fault`, :func:`parse_fault`, :class:`FaultInjector`.

Fault spec syntax (``--fault`` and the control port's ``fault`` command)::

    RPC[:delay=SECONDS][:error=STATUS][:count=N][:message=TEXT]

``RPC`` is a method name of either service (``Get``, ``SetBatch``,
``CreateCache``...) or ``*`` for all. ``delay`` sleeps before answering;
``error`` is a ``grpc.StatusCode`` name (``UNAVAILABLE``, case-insensitive)
answered instead of the result, with ``message`` as details (default: a
description of the fault; ``message`` must come last and may contain ``:``).
``count`` limits the rule to the next N matching calls (default: forever).
Rules apply in the order added; every matching rule consumes one of its calls,
delays add up and the first error wins. Faults act before authorization.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import grpc

#: The RPCs the server answers (data, then control): the names a fault rule may target, besides ``*``.
RPC_NAMES = frozenset(
    (
        "Get",
        "GetWithHash",
        "GetBatch",
        "Set",
        "SetBatch",
        "SetIf",
        "SetIfHash",
        "SetIfNotExists",
        "Delete",
        "KeysExist",
        "Increment",
        "UpdateTtl",
        "ItemGetTtl",
        "ItemGetType",
        "CreateCache",
        "DeleteCache",
        "ListCaches",
        "FlushCache",
    )
)


class FaultSpecError(ValueError):
    """A fault spec that does not parse; carries the offending spec."""

    def __init__(self, spec: str, reason: str) -> None:
        super().__init__(f"bad fault spec {spec!r}: {reason}")
        self.spec = spec


@dataclass(slots=True)
class Fault:
    """One fault rule: for calls of ``rpc`` (or ``*``), sleep ``delay`` and/or fail with ``code``.

    ``remaining`` is the number of calls still affected, ``None`` for forever.
    """

    rpc: str
    delay: float = 0.0
    code: grpc.StatusCode | None = None
    message: str = ""
    remaining: int | None = None

    def matches(self, rpc: str) -> bool:
        """Whether this rule applies to a call of ``rpc`` now."""
        return (self.rpc == "*" or self.rpc == rpc) and self.remaining != 0


def parse_fault(spec: str) -> Fault:
    """Parse ``RPC[:delay=S][:error=STATUS][:count=N][:message=TEXT]`` (see module docstring)."""
    rpc, _, rest = spec.strip().partition(":")
    if rpc != "*" and rpc not in RPC_NAMES:
        raise FaultSpecError(spec, f"unknown RPC {rpc!r}")
    fault = Fault(rpc)
    while rest:
        option, _, value = rest.partition("=")
        if option == "message":
            fault.message = value
            break
        value, _, rest = value.partition(":")
        if option == "delay":
            fault.delay = _option_value(spec, option, value, float)
            if not 0.0 <= fault.delay < 3600.0:
                raise FaultSpecError(spec, "delay must be in [0, 3600) seconds")
        elif option == "count":
            fault.remaining = _option_value(spec, option, value, int)
            if fault.remaining < 1:
                raise FaultSpecError(spec, "count must be at least 1")
        elif option == "error":
            code = grpc.StatusCode.__members__.get(value.upper())
            if code is None or code is grpc.StatusCode.OK:
                raise FaultSpecError(spec, f"error must name a grpc.StatusCode other than OK, got {value!r}")
            fault.code = code
        else:
            raise FaultSpecError(spec, f"unknown option {option!r}")
    if fault.code is None and fault.delay == 0.0:
        raise FaultSpecError(spec, "needs delay=SECONDS or error=STATUS")
    if fault.code is not None and not fault.message:
        fault.message = f"injected fault: {fault.code.name} on {rpc}"
    return fault


_Number = TypeVar("_Number", int, float)


def _option_value(spec: str, option: str, value: str, kind: Callable[[str], _Number]) -> _Number:
    try:
        return kind(value)
    except ValueError as exc:
        raise FaultSpecError(spec, f"bad value for {option!r}: {value!r}") from exc


class FaultInjector:
    """Thread-safe ordered list of :class:`Fault` rules."""

    def __init__(self, faults: Iterable[Fault] = ()) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = list(faults)

    def add(self, fault: Fault | str) -> None:
        """Add a rule, given as a :class:`Fault` or a spec string."""
        rule = parse_fault(fault) if isinstance(fault, str) else fault
        with self._lock:
            self._faults.append(rule)

    def clear(self) -> None:
        """Remove every rule."""
        with self._lock:
            self._faults.clear()

    def take(self, rpc: str) -> tuple[float, Fault | None]:
        """Consume one call of every rule matching ``rpc``; return total delay and first error rule."""
        delay, error = 0.0, None
        with self._lock:
            for fault in self._faults:
                if not fault.matches(rpc):
                    continue
                if fault.remaining is not None:
                    fault.remaining -= 1
                delay += fault.delay
                if error is None and fault.code is not None:
                    error = fault
            self._faults = [f for f in self._faults if f.remaining != 0]
        return delay, error
