"""Domain errors. The transport maps each class to one gRPC status code (rpc/errors.py).

DomainError
 +-- InvalidArgument      bad input; carries the offending fields
 +-- NotFound             an id or name that does not exist
 +-- AlreadyExists        a unique name is taken
 +-- FailedPrecondition   the current state forbids the call
 +-- PermissionDenied     the caller may not do this (a webhook with a wrong token)
 +-- Unavailable          a dependency is down and a retry can help
 +-- ResourceExhausted    overloaded; retry later
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field: `field` is the request path, for example "direction.pixel_id"."""

    field: str
    description: str


class DomainError(Exception):
    """Root of the errors a use case raises on purpose."""

    default_reason = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})


class InvalidArgument(DomainError):
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        violations: Sequence[FieldViolation] = (),
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations = list(violations)

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        return cls(f"{field}: {description}", [FieldViolation(field, description)])


class NotFound(DomainError):
    default_reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    default_reason = "FAILED_PRECONDITION"


class PermissionDenied(DomainError):
    default_reason = "PERMISSION_DENIED"


class Unavailable(DomainError):
    default_reason = "UNAVAILABLE"


class ResourceExhausted(DomainError):
    default_reason = "RESOURCE_EXHAUSTED"
