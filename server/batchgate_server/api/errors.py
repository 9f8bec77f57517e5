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
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED, code_pb2.DEADLINE_EXCEEDED),
]


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(err: errors.ApiError) -> grpc.Status:
    rpc_code = next(code for cls, _, code in _CODES if isinstance(err, cls))
    details = [_pack(error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata))]
    if err.violations:
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in err.violations
        ])))
    if isinstance(err, errors.ResourceExhausted):
        seconds = max(err.retry_after, 0.0)
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
            seconds=int(seconds), nanos=int((seconds % 1) * 1e9)))))
    return rpc_status.to_status(status_pb2.Status(code=rpc_code, message=err.message, details=details))


async def abort_with(context: grpc.aio.ServicerContext, err: errors.ApiError) -> None:
    await context.abort_with_status(to_status(err))
