"""Domain errors. Core raises these; the API layer maps them onto gRPC statuses
with google.rpc rich details. Never raised for a bug: those stay INTERNAL."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from batchgate_server.store.errors import StorageError, StorageFull, StorageUnavailable

P = ParamSpec("P")
T = TypeVar("T")

# What RetryInfo suggests to a caller that met a full disk: space comes back when an operator (or
# a DeleteFile, or an expiry sweep) frees it, not within milliseconds.
STORAGE_FULL_RETRY_AFTER = 30.0
# A database or bucket that is busy, restarting or unreachable usually is back within seconds.
STORAGE_UNAVAILABLE_RETRY_AFTER = 2.0


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


class RetryLater(ApiError):
    """An error the caller should retry after `retry_after` seconds (sent as RetryInfo / Retry-After)."""

    def __init__(self, message: str, reason: str, retry_after: float = 1.0, **kw) -> None:
        super().__init__(message, reason, **kw)
        self.retry_after = retry_after


class ResourceExhausted(RetryLater):
    pass


class Unavailable(RetryLater):
    pass


def is_utf8_text(text: str) -> bool:
    """False for a string holding a surrogate: no UTF-8 can encode it, nor SQLite store it. gRPC
    strings never do; an HTTP header's undecodable bytes come out so (and JSON's "\\ud800")."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def clip(text: str, max_bytes: int) -> str:
    """`text` in at most `max_bytes` bytes of UTF-8, ending in a marker when it had to be cut.
    Always encodable: a lone surrogate (valid in JSON, not in UTF-8) becomes "?"."""
    data = text.encode("utf-8", "replace")
    if len(data) <= max_bytes:
        return data.decode()
    marker = f"…[truncated, {len(data)} bytes]"
    return data[:max(0, max_bytes - len(marker.encode()))].decode("utf-8", "ignore") + marker


def echo(value: str, max_bytes: int = 120) -> str:
    """A caller's value quoted for an error message, cut when long: messages name what was sent
    without carrying all of it (an error must fit gRPC's metadata limits, see api/errors.py)."""
    return clip(repr(value), max_bytes)


def not_found(kind: str, resource_id: str) -> NotFound:
    return NotFound(
        f"{kind} {echo(resource_id)} not found",
        f"{kind.upper()}_NOT_FOUND",
        {f"{kind}_id": resource_id},
    )


def storage_full() -> ResourceExhausted:
    return ResourceExhausted("the server's storage is full; retry once space has been freed (deleting files"
                             " frees it)", "STORAGE_FULL", retry_after=STORAGE_FULL_RETRY_AFTER)


def storage_unavailable() -> Unavailable:
    return Unavailable("the server's storage (database or blob store) is unavailable for the moment; retry"
                       " shortly", "STORAGE_UNAVAILABLE", retry_after=STORAGE_UNAVAILABLE_RETRY_AFTER)


def from_storage(err: StorageError) -> ApiError | None:
    """What a caller is told of a storage failure, None for one that is a bug of ours (INTERNAL):
    a full store is RESOURCE_EXHAUSTED STORAGE_FULL, a busy or unreachable one UNAVAILABLE
    STORAGE_UNAVAILABLE, both with a delay to retry after. Both API surfaces' error boundaries
    (api/handlers.py, api/http/errors.py) and the write use cases below call it."""
    if isinstance(err, StorageFull):
        return storage_full()
    if isinstance(err, StorageUnavailable):
        return storage_unavailable()
    return None


def exhausted_when_full(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """For use cases that write: a full store is RESOURCE_EXHAUSTED STORAGE_FULL, an unavailable
    one UNAVAILABLE STORAGE_UNAVAILABLE (see from_storage)."""
    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except StorageError as err:
            mapped = from_storage(err)
            if mapped is None:
                raise
            raise mapped from err

    return wrapper
