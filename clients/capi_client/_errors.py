"""Typed errors of the capi client: every failed RPC becomes a `CapiError` subclass.

Hierarchy (catch the narrowest you can handle)::

    CapiError                   any RPC that ended with a non-OK status
    ├── InvalidArgument         bad request; see .field_violations
    ├── NotFound                e.g. reason DIRECTION_NOT_FOUND
    ├── AlreadyExists
    ├── FailedPrecondition
    ├── PermissionDenied
    ├── Unauthenticated         missing or wrong bearer token
    ├── Unavailable             cannot connect, or the server is down
    ├── DeadlineExceeded        the per-call timeout expired
    ├── ResourceExhausted       the server is overloaded; retry later
    ├── Unimplemented
    ├── Cancelled
    ├── Aborted
    ├── Internal
    └── Unknown

The server attaches a `google.rpc.Status` in the `grpc-status-details-bin` trailer with an
`ErrorInfo` (reason, metadata) and, for bad requests, a `BadRequest`. They are decoded here
from the protobuf wire format by hand, so that the client needs neither
googleapis-common-protos nor grpcio-status.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

STATUS_DETAILS_KEY = "grpc-status-details-bin"
_ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"
_BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"


class CapiError(Exception):
    """A capi RPC failed. `code` is the gRPC status, `reason` the server's ErrorInfo.reason."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: list[tuple[str, str]] = list(field_violations)
        super().__init__(str(self))

    def __str__(self) -> str:
        # "NOT_FOUND (DIRECTION_NOT_FOUND): direction 5 not found"
        head = self.code.name + (f" ({self.reason})" if self.reason else "")
        text = f"{head}: {self.message}" if self.message else head
        # The server's message usually names the violations already; add the others.
        extra = [f"{f}: {d}" for f, d in self.field_violations if f"{f}: {d}" not in text]
        if extra:
            text += " [" + "; ".join(extra) + "]"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


class InvalidArgument(CapiError):
    """The request was rejected; `field_violations` names the bad fields."""


class NotFound(CapiError):
    """The named direction, dialog, account or connection does not exist."""


class AlreadyExists(CapiError):
    """A unique value (for example a direction's instance_name) is taken."""


class FailedPrecondition(CapiError):
    """The system is not in a state that allows the call (for example CAPI disabled)."""


class PermissionDenied(CapiError):
    """The caller is known but may not do this."""


class Unauthenticated(CapiError):
    """No bearer token, or a wrong one."""


class Unavailable(CapiError):
    """The server cannot be reached (refused, wrong target) or is shutting down."""


class DeadlineExceeded(CapiError):
    """The call did not finish within its timeout."""


class ResourceExhausted(CapiError):
    """The server sheds load; retry later with backoff."""


class Unimplemented(CapiError):
    """The server does not implement this RPC (yet)."""


class Cancelled(CapiError):
    """The call was cancelled."""


class Aborted(CapiError):
    """The call was aborted (for example a concurrency conflict)."""


class Internal(CapiError):
    """A server bug; the message says nothing more on purpose."""


class Unknown(CapiError):
    """An error without a known status."""


_CLASS_OF_CODE: dict[grpc.StatusCode, type[CapiError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.DATA_LOSS: Internal,
    grpc.StatusCode.UNKNOWN: Unknown,
}


def error_from_rpc(err: grpc.RpcError) -> CapiError:
    """The typed error for a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`)."""
    call: Any = err
    code = _call_attr(call, "code")
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    message = _call_attr(call, "details")
    details = parse_status_details(_call_attr(call, "trailing_metadata"))
    cls = _CLASS_OF_CODE.get(code, CapiError)
    return cls(
        code,
        str(message) if message else "",
        reason=details.reason,
        metadata=details.metadata,
        field_violations=details.field_violations,
    )


def _call_attr(call: Any, name: str) -> Any:
    method = getattr(call, name, None)
    if method is None:
        return None
    try:
        return method()
    except Exception:  # a broken error object must still become a CapiError
        return None


@dataclass(frozen=True, slots=True)
class StatusDetails:
    """What the client uses of a google.rpc.Status: ErrorInfo and BadRequest."""

    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    field_violations: list[tuple[str, str]] = field(default_factory=list)


def parse_status_details(trailing_metadata: Any) -> StatusDetails:
    """Decode the `grpc-status-details-bin` trailer; empty details when absent or garbled."""
    raw: bytes | None = None
    for key, value in trailing_metadata or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            raw = value
            break
    if raw is None:
        return StatusDetails()
    try:
        return _decode_status(raw)
    except ValueError:
        # A garbled trailer must not hide the status code the caller needs.
        return StatusDetails()


def _decode_status(raw: bytes) -> StatusDetails:
    # google.rpc.Status: code=1, message=2, repeated google.protobuf.Any details=3.
    # Any: type_url=1, value=2.
    reason = domain = ""
    metadata: dict[str, str] = {}
    violations: list[tuple[str, str]] = []
    for number, value in wire_fields(raw):
        if number != 3 or not isinstance(value, bytes):
            continue
        any_fields = dict(wire_fields(value))
        type_url = _text(any_fields.get(1, b""))
        payload = any_fields.get(2, b"")
        if not isinstance(payload, bytes):
            continue
        if type_url == _ERROR_INFO_TYPE:
            # ErrorInfo: reason=1, domain=2, map<string, string> metadata=3.
            for info_number, info_value in wire_fields(payload):
                if not isinstance(info_value, bytes):
                    continue
                if info_number == 1:
                    reason = _text(info_value)
                elif info_number == 2:
                    domain = _text(info_value)
                elif info_number == 3:
                    entry = dict(wire_fields(info_value))
                    metadata[_text(entry.get(1, b""))] = _text(entry.get(2, b""))
        elif type_url == _BAD_REQUEST_TYPE:
            # BadRequest: repeated FieldViolation field_violations=1 (field=1, description=2).
            for bad_number, violation in wire_fields(payload):
                if bad_number == 1 and isinstance(violation, bytes):
                    parts = dict(wire_fields(violation))
                    violations.append((_text(parts.get(1, b"")), _text(parts.get(2, b""))))
    return StatusDetails(reason, domain, metadata, violations)


def _text(value: bytes | int) -> str:
    if not isinstance(value, bytes):
        raise ValueError("expected a length-delimited field")
    return value.decode("utf-8", errors="replace")


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def wire_fields(buf: bytes) -> Iterator[tuple[int, bytes | int]]:
    """(field number, value) of a protobuf message: ints for varint/fixed, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(buf, pos)
            yield number, value
        elif wire_type == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated field")
            yield number, buf[pos : pos + length]
            pos += length
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            if pos + size > len(buf):
                raise ValueError("truncated field")
            yield number, int.from_bytes(buf[pos : pos + size], "little")
            pos += size
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
