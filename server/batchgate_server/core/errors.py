"""Domain errors. Core raises these; the API layer maps them onto gRPC statuses
with google.rpc rich details. Never raised for a bug: those stay INTERNAL."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FieldViolation:
    field: str
    description: str


@dataclass
class ApiError(Exception):
    message: str
    reason: str  # UPPER_SNAKE ErrorInfo.reason, e.g. "FILE_NOT_FOUND"
    metadata: dict[str, str] = field(default_factory=dict)
    violations: list[FieldViolation] = field(default_factory=list)

    def __str__(self) -> str:
        return self.message


class InvalidArgument(ApiError):
    pass


class NotFound(ApiError):
    pass


class FailedPrecondition(ApiError):
    pass


class Unauthenticated(ApiError):
    pass


class PermissionDenied(ApiError):
    pass


class DeadlineExceeded(ApiError):
    pass


class ResourceExhausted(ApiError):
    def __init__(self, message: str, reason: str, retry_after: float = 1.0, **kw) -> None:
        super().__init__(message, reason, **kw)
        self.retry_after = retry_after


def not_found(kind: str, resource_id: str) -> NotFound:
    return NotFound(
        f"{kind} {resource_id!r} not found",
        f"{kind.upper()}_NOT_FOUND",
        {f"{kind}_id": resource_id},
    )
