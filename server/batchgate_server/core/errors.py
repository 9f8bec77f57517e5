"""Domain errors. Core raises these; the API layer maps them onto gRPC statuses
with google.rpc rich details. Never raised for a bug: those stay INTERNAL."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from batchgate_server.store.errors import StorageFull

P = ParamSpec("P")
T = TypeVar("T")

# What RetryInfo suggests to a caller that met a full disk: space comes back when an operator (or
# a DeleteFile, or an expiry sweep) frees it, not within milliseconds.
STORAGE_FULL_RETRY_AFTER = 30.0


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


def storage_full() -> ResourceExhausted:
    return ResourceExhausted("the server's storage is full; retry once space has been freed (deleting files"
                             " frees it)", "STORAGE_FULL", retry_after=STORAGE_FULL_RETRY_AFTER)


def exhausted_when_full(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """For use cases that write: a full disk is RESOURCE_EXHAUSTED STORAGE_FULL."""
    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except StorageFull as err:
            raise storage_full() from err

    return wrapper
