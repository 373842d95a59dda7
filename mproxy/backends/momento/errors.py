"""Momento's failures as mproxy's errors: one table for RPCs and SDK control calls.

A failed RPC (a ``grpc.RpcError``: ``grpc.aio.AioRpcError`` on mproxy's
channels, :func:`rpc_error`) and an SDK ``Error`` response of a control call
(:func:`sdk_error`) become the same :class:`BackendError` code and message:
the code from :data:`ERROR_TABLE`, the message one line naming the command,
never a key or value. Momento's refusal of an item as too large becomes
:class:`ValueTooLarge`.
"""

from __future__ import annotations

from typing import Any

import grpc

from mproxy.backends.base import BackendError, ValueTooLarge
from mproxy.backends.momento.bridge import TransportClosed

#: One row per :class:`BackendError` code: the gRPC statuses (raw path) and the
#: SDK's ``MomentoErrorCode`` names (SDK path, when an error carries no gRPC
#: status) that become it. Everything else is ``internal``.
ERROR_TABLE: tuple[tuple[str, tuple[grpc.StatusCode, ...], tuple[str, ...]], ...] = (
    ("timeout", (grpc.StatusCode.DEADLINE_EXCEEDED,), ("TIMEOUT_ERROR",)),
    ("unavailable", (grpc.StatusCode.UNAVAILABLE,), ("SERVER_UNAVAILABLE", "CONNECTION_ERROR")),
    ("limit_exceeded", (grpc.StatusCode.RESOURCE_EXHAUSTED,), ("LIMIT_EXCEEDED_ERROR", "CLIENT_RESOURCE_EXHAUSTED")),
    ("authentication", (grpc.StatusCode.UNAUTHENTICATED,), ("AUTHENTICATION_ERROR",)),
    ("permission_denied", (grpc.StatusCode.PERMISSION_DENIED,), ("PERMISSION_ERROR",)),
    ("not_found", (grpc.StatusCode.NOT_FOUND,), ("NOT_FOUND_ERROR",)),
    (
        "invalid_argument",
        (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE),
        ("INVALID_ARGUMENT_ERROR", "BAD_REQUEST_ERROR"),
    ),
    ("failed_precondition", (grpc.StatusCode.FAILED_PRECONDITION,), ("FAILED_PRECONDITION_ERROR",)),
    ("already_exists", (grpc.StatusCode.ALREADY_EXISTS,), ("ALREADY_EXISTS_ERROR",)),
    ("cancelled", (grpc.StatusCode.CANCELLED,), ("CANCELLED_ERROR",)),
    ("unimplemented", (grpc.StatusCode.UNIMPLEMENTED,), ()),
)
#: gRPC status -> BackendError code (stats word; also the message's words).
STATUS_CODES: dict[grpc.StatusCode, str] = {status: code for code, statuses, _ in ERROR_TABLE for status in statuses}
#: ``MomentoErrorCode`` name -> BackendError code.
SDK_ERROR_CODES: dict[str, str] = {name: code for code, _, names in ERROR_TABLE for name in names}
#: Longest part of a server's error details repeated in a message.
_DETAILS_LIMIT = 160


def timeout_error(op: str, timeout: float, waiting: str = "") -> BackendError:
    """``momento timeout after {timeout}s on {op}`` (``waiting`` says for what, if not the server)."""
    message = f"momento timeout after {timeout:g}s on {op}"
    return BackendError("timeout", f"{message} {waiting}" if waiting else message)


def rpc_error(err: BaseException, op: str, timeout: float) -> BackendError | ValueTooLarge:
    """A failed RPC as mproxy's error. Reads ``code()``, ``details()`` and
    ``trailing_metadata()`` from any ``grpc.RpcError`` that has them
    (``grpc.aio.AioRpcError`` is not a ``grpc.Call``; its trailers are a
    ``grpc.aio.Metadata``, which iterates as pairs). The transport closing
    answers ``unavailable``."""
    code = getattr(err, "code", None)
    if isinstance(err, grpc.RpcError) and callable(code):
        trailers = err.trailing_metadata() if callable(getattr(err, "trailing_metadata", None)) else None
        details = err.details() if callable(getattr(err, "details", None)) else ""
        return _failure(STATUS_CODES.get(code(), "internal"), details, trailers, op, timeout)
    if isinstance(err, TransportClosed):
        return _failure("unavailable", "the connection to Momento is closed", None, op, timeout)
    return _failure("internal", "", None, op, timeout)


def sdk_error(response: Any, op: str, timeout: float) -> BackendError | ValueTooLarge:
    """An SDK ``Error`` response as mproxy's error, exactly as :func:`rpc_error`
    would have said it: by the gRPC status when the server answered (the
    SDK keeps it in ``inner_exception.transport_details``), else by
    ``error_code`` (failures on the client side)."""
    exc = response.inner_exception
    transport = getattr(exc, "transport_details", None)
    if transport is not None:
        details = transport.grpc
        return _failure(STATUS_CODES.get(details.code, "internal"), details.details, details.metadata, op, timeout)
    return _failure(SDK_ERROR_CODES.get(response.error_code.name, "internal"), exc.message, None, op, timeout)


def unexpected_response(response: Any, op: str) -> BackendError:
    """An SDK response of a type the call does not answer with."""
    return BackendError(
        "internal", f"momento internal error on {op}: unexpected SDK response {type(response).__qualname__}"
    )


def _failure(code: str, details: str | None, trailers: Any, op: str, timeout: float) -> BackendError | ValueTooLarge:
    """One line naming the failure, never a key or value."""
    details = " ".join((details or "").split())[:_DETAILS_LIMIT]
    if code == "limit_exceeded" and _item_too_large(trailers, details):
        return ValueTooLarge(f"Momento refused the item as too large: {details}")
    if code == "timeout":
        return timeout_error(op, timeout)
    words = code.replace("_", " ")
    return BackendError(code, f"momento {words} on {op}: {details}" if details else f"momento {words} on {op}")


def _item_too_large(trailers: Any, details: str) -> bool:
    """Momento marks its item size refusals with trailer ``err: item_size_limit_exceeded``;
    gRPC's own refusal of a too large message says "larger than max"."""
    if any(key == "err" and value == "item_size_limit_exceeded" for key, value in trailers or ()):
        return True
    lowered = details.lower()
    return "item size" in lowered or "larger than max" in lowered
