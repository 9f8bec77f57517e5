"""Maps domain errors onto gRPC statuses with google.rpc rich details.

Every handler runs inside `translate_errors`, so bad input becomes
INVALID_ARGUMENT / NOT_FOUND / … with ErrorInfo (+ BadRequest, RetryInfo), and
only a genuine bug surfaces as INTERNAL (logged with its traceback).
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from batchgate_server.core import errors

log = logging.getLogger(__name__)

DOMAIN = "batchgate.dev"

_CODES: list[tuple[type[errors.ApiError], grpc.StatusCode, int]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, code_pb2.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND, code_pb2.NOT_FOUND),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION, code_pb2.FAILED_PRECONDITION),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, code_pb2.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, code_pb2.PERMISSION_DENIED),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, code_pb2.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE, code_pb2.UNAVAILABLE),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED, code_pb2.DEADLINE_EXCEEDED),
]


# A client drops a response whose metadata exceeds its limit (gRPC's default: 8 KiB; between 8
# and 16 KiB at random, always beyond) and reports RESOURCE_EXHAUSTED "Stream removed" instead.
# An error travels in the trailers twice: its message in grpc-message (percent-encoded, up to three
# characters a byte) and the whole google.rpc.Status, base64-encoded, in grpc-status-details-bin.
# These bounds keep the two under 6.5 KiB together, whatever the caller sent us to echo.
MAX_MESSAGE_BYTES = 512
MAX_STATUS_BYTES = 3584
MAX_METADATA_BYTES = 1536  # all ErrorInfo metadata values together
MAX_METADATA_VALUE_BYTES = 256
MAX_KEY_BYTES = 64
MAX_FIELD_BYTES = 128
MAX_DESCRIPTION_BYTES = 384
OMITTED_VIOLATIONS = "omitted_violations"  # ErrorInfo metadata: how many violations were left out


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _error_info(err: errors.ApiError, extra: dict[str, str]) -> error_details_pb2.ErrorInfo:
    metadata = {**err.metadata, **extra}
    value_bytes = min(MAX_METADATA_VALUE_BYTES, MAX_METADATA_BYTES // max(1, len(metadata)))
    return error_details_pb2.ErrorInfo(reason=errors.clip(err.reason, MAX_KEY_BYTES), domain=DOMAIN, metadata={
        errors.clip(k, MAX_KEY_BYTES): errors.clip(v, value_bytes) for k, v in metadata.items()})


def _violations_that_fit(err: errors.ApiError, budget: int) -> list[error_details_pb2.BadRequest.FieldViolation]:
    """The first of the error's violations (clipped) whose BadRequest packs into `budget` bytes."""
    kept, used = [], _pack(error_details_pb2.BadRequest()).ByteSize() + 8  # + framing in Any and Status
    for v in err.violations:
        violation = error_details_pb2.BadRequest.FieldViolation(field=errors.clip(v.field, MAX_FIELD_BYTES),
                                                                description=errors.clip(v.description,
                                                                                        MAX_DESCRIPTION_BYTES))
        used += violation.ByteSize() + 3  # tag and length
        if used > budget:
            break
        kept.append(violation)
    return kept


def to_status(err: errors.ApiError) -> grpc.Status:
    """The rich status of `err`, bounded (see MAX_STATUS_BYTES): echoed values are cut with a
    marker, and of the field violations the first that fit are kept, ErrorInfo saying how many
    more there were."""
    rpc_code = next(code for cls, _, code in _CODES if isinstance(err, cls))
    message = errors.clip(err.message, MAX_MESSAGE_BYTES)
    trailing = []
    if isinstance(err, errors.RetryLater):
        seconds = max(err.retry_after, 0.0)
        trailing.append(_pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
            seconds=int(seconds), nanos=int((seconds % 1) * 1e9)))))
    # Sized as if violations were left out, so the count always has room.
    reserve = {OMITTED_VIOLATIONS: str(len(err.violations))} if err.violations else {}
    fixed = status_pb2.Status(code=rpc_code, message=message,
                              details=[_pack(_error_info(err, reserve)), *trailing]).ByteSize()
    violations = _violations_that_fit(err, MAX_STATUS_BYTES - fixed)
    omitted = len(err.violations) - len(violations)
    details = [_pack(_error_info(err, {OMITTED_VIOLATIONS: str(omitted)} if omitted else {}))]
    if violations:
        details.append(_pack(error_details_pb2.BadRequest(field_violations=violations)))
    return rpc_status.to_status(status_pb2.Status(code=rpc_code, message=message,
                                                  details=details + trailing))


async def abort_with(context: grpc.aio.ServicerContext, err: errors.ApiError) -> None:
    await context.abort_with_status(to_status(err))
