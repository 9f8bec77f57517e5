"""Typed errors: every failed call raises a BatchgateError subclass chosen by its gRPC code, carrying
what the server put in the google.rpc details of the status.

    try:
        bg.upload_file("requests.jsonl")
    except batchgate.InvalidArgumentError as err:
        print(err.reason)                  # "INVALID_BATCH_FILE"
        for v in err.violations:           # BadRequest field violations
            print(v.line, v.description)   # 12 "missing_custom_id: …"

`reason` is a plain string (the ErrorInfo reason, UPPER_SNAKE, in `domain` "batchgate.dev"); the
contract lists every reason as the proto enum batchgate.v1.ErrorReason, here `ErrorReason`, a str enum
equal to those strings (`err.reason == ErrorReason.FILE_NOT_FOUND`); `err.reason_enum` is the member,
or None for a reason this client does not know yet (a newer server). The errors are `grpc.RpcError`s too, with the
usual `code()`, `details()` and `trailing_metadata()`: code written against the bare stubs still works.
"""

from __future__ import annotations

import datetime
import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2

from batchgate.v1 import error_reason_pb2

__all__ = [
    "BatchgateError", "InvalidArgumentError", "NotFoundError", "AlreadyExistsError", "FailedPreconditionError",
    "UnauthenticatedError", "PermissionDeniedError", "ResourceExhaustedError", "DeadlineExceededError",
    "UnavailableError", "CancelledError", "InternalError", "UnimplementedError", "Violation", "from_rpc_error",
    "ErrorReason", "DOMAIN",
]

DOMAIN = "batchgate.dev"  # ErrorInfo.domain of every batchgate error

# The trailer in which gRPC servers send the whole google.rpc.Status (the gRPC spec's name).
STATUS_DETAILS_KEY = "grpc-status-details-bin"
OMITTED_VIOLATIONS = "omitted_violations"  # ErrorInfo metadata: violations the server left out
_LINE = re.compile(r"^line (\d+)$")


class _Reason(str, enum.Enum):
    """An ErrorInfo reason of batchgate.v1.ErrorReason: a str equal to the reason as sent."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def number(self) -> int:
        """The value's number in the proto enum."""
        return error_reason_pb2.ErrorReason.Value(self.value)


ErrorReason = _Reason("ErrorReason", {v.name: v.name for v in error_reason_pb2.ErrorReason.DESCRIPTOR.values
                                      if v.number != 0}, module=__name__)


@dataclass(frozen=True)
class Violation:
    """A BadRequest field violation. For a batch file `field` is "line 12" and `line` is 12."""

    field: str
    description: str

    @property
    def line(self) -> int | None:
        match = _LINE.match(self.field)
        return int(match.group(1)) if match else None


class BatchgateError(grpc.RpcError):
    """A call that failed. `code()` is the grpc.StatusCode; `reason`, `domain` and `metadata` come
    from the ErrorInfo detail, `violations` from BadRequest, `retry_delay` from RetryInfo."""

    status_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    #: what a person can do about this kind of error (a CLI prints it under the message)
    hint = ""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, reason: str = "", domain: str = "",
                 metadata: dict[str, str] | None = None, violations: Sequence[Violation] = (),
                 retry_delay: datetime.timedelta | None = None, rpc_error: grpc.RpcError | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.status_code = code
        self.reason = reason
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.violations = list(violations)
        self.retry_delay = retry_delay
        self.rpc_error = rpc_error

    # grpc.Call's accessors, so that code written for the bare stubs keeps working.
    def code(self) -> grpc.StatusCode:
        return self.status_code

    def details(self) -> str:
        return self.message

    def trailing_metadata(self):
        return self.rpc_error.trailing_metadata() if self.rpc_error is not None else ()

    @property
    def reason_enum(self) -> "ErrorReason | None":
        """`reason` as an ErrorReason member; None when there is none or this client does not know it."""
        try:
            return ErrorReason(self.reason)
        except ValueError:
            return None

    @property
    def lines(self) -> list[int]:
        """The JSONL line numbers the violations name, in order."""
        return [v.line for v in self.violations if v.line is not None]

    @property
    def omitted_violations(self) -> int:
        """How many more violations there were than the server sent (it bounds an error's size)."""
        return int(self.metadata.get(OMITTED_VIOLATIONS, "0") or 0)

    def __str__(self) -> str:
        head = f"{self.status_code.name}"
        if self.reason:
            head += f" {self.reason}"
        text = f"{head}: {self.message}"
        for v in self.violations:
            text += f"\n  {v.field}: {v.description}"
        if self.omitted_violations:
            text += f"\n  … and {self.omitted_violations} more"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status_code.name}, reason={self.reason!r}, message={self.message!r})"


class InvalidArgumentError(BatchgateError):
    status_code = grpc.StatusCode.INVALID_ARGUMENT
    hint = "fix the request (for a batch file: the lines listed) and send it again"


class NotFoundError(BatchgateError):
    status_code = grpc.StatusCode.NOT_FOUND
    hint = "check the id; files and batches are visible only to the project of the key that created them"


class AlreadyExistsError(BatchgateError):
    status_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(BatchgateError):
    status_code = grpc.StatusCode.FAILED_PRECONDITION
    hint = "the resource is not in a state that allows this; see the reason and metadata"


class UnauthenticatedError(BatchgateError):
    status_code = grpc.StatusCode.UNAUTHENTICATED
    hint = "set BATCHGATE_API_KEY (or --api-key) to a valid key"


class PermissionDeniedError(BatchgateError):
    status_code = grpc.StatusCode.PERMISSION_DENIED
    hint = "this needs a key with more rights (the master key sees every project)"


class ResourceExhaustedError(BatchgateError):
    status_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    hint = "a limit was reached: wait (see retry_delay) or send less at once"


class DeadlineExceededError(BatchgateError):
    status_code = grpc.StatusCode.DEADLINE_EXCEEDED
    hint = "the call took too long; try again, or raise the client timeout"


class UnavailableError(BatchgateError):
    status_code = grpc.StatusCode.UNAVAILABLE
    hint = "is the server running at that address (BATCHGATE_ADDRESS), and do both ends agree on TLS?"


class CancelledError(BatchgateError):
    status_code = grpc.StatusCode.CANCELLED


class InternalError(BatchgateError):
    status_code = grpc.StatusCode.INTERNAL
    hint = "a server bug: its log has the traceback"


class UnimplementedError(BatchgateError):
    status_code = grpc.StatusCode.UNIMPLEMENTED
    hint = "the server does not offer this call: is it an older version?"


_BY_CODE: dict[grpc.StatusCode, type[BatchgateError]] = {
    cls.status_code: cls for cls in (
        InvalidArgumentError, NotFoundError, AlreadyExistsError, FailedPreconditionError, UnauthenticatedError,
        PermissionDeniedError, ResourceExhaustedError, DeadlineExceededError, UnavailableError, CancelledError,
        InternalError, UnimplementedError)
}


def _rich_status(err: grpc.RpcError) -> status_pb2.Status | None:
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == STATUS_DETAILS_KEY:
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except Exception:  # a garbled trailer is no reason to hide the error itself
                return None
            return status
    return None


def from_rpc_error(err: grpc.RpcError) -> BatchgateError:
    """The typed error for a failed call, its details decoded (an error without them keeps its code
    and message)."""
    if isinstance(err, BatchgateError):
        return err
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = (err.details() if hasattr(err, "details") else "") or str(code.name if code else "")
    reason = domain = ""
    metadata: dict[str, str] = {}
    violations: list[Violation] = []
    retry_delay = None
    status = _rich_status(err)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(Violation(v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_delay = retry.retry_delay.ToTimedelta()
    cls = _BY_CODE.get(code, BatchgateError)
    typed = cls(message, code=code, reason=reason, domain=domain, metadata=metadata, violations=violations,
                retry_delay=retry_delay, rpc_error=err)
    typed.__cause__ = err
    return typed
