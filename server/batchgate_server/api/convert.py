"""Domain records <-> proto messages. No logic beyond field mapping."""

from __future__ import annotations

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from batchgate.v1 import batch_pb2, file_pb2
from batchgate_server.core.errors import FieldViolation, InvalidArgument, clip
from batchgate_server.domain.models import (
    BatchError,
    BatchRecord,
    BatchStatus,
    Cost,
    FilePurpose,
    FileRecord,
    RequestCounts,
    ShardSummary,
)

PURPOSE_TO_PROTO = {
    FilePurpose.BATCH: file_pb2.FILE_PURPOSE_BATCH,
    FilePurpose.BATCH_OUTPUT: file_pb2.FILE_PURPOSE_BATCH_OUTPUT,
}
PURPOSE_FROM_PROTO = {v: k for k, v in PURPOSE_TO_PROTO.items()}

STATUS_TO_PROTO = {s: batch_pb2.BatchStatus.Value(f"BATCH_STATUS_{s.name}") for s in BatchStatus}
STATUS_FROM_PROTO = {v: k for k, v in STATUS_TO_PROTO.items()}

COST_STATUS_TO_PROTO = {
    "pending": batch_pb2.COST_STATUS_PENDING,
    "known": batch_pb2.COST_STATUS_KNOWN,
    "unknown": batch_pb2.COST_STATUS_UNKNOWN,
}


def timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


# The range google.protobuf.Timestamp defines: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799


def seconds_of(request: Message, name: str) -> float | None:
    """The Timestamp field `name` of `request` in seconds (None when unset), checked."""
    if not request.HasField(name):
        return None
    ts: timestamp_pb2.Timestamp = getattr(request, name)
    if not 0 <= ts.nanos < 1_000_000_000:
        raise InvalidArgument(f"{name} has nanos out of range", "INVALID_TIME_RANGE",
                              violations=[FieldViolation(name, "nanos must be 0 to 999,999,999")])
    if not MIN_TIMESTAMP_SECONDS <= ts.seconds <= MAX_TIMESTAMP_SECONDS:
        raise InvalidArgument(f"{name} is outside the years 1 to 9999 a Timestamp can hold", "INVALID_TIME_RANGE",
                              violations=[FieldViolation(name, "between 0001-01-01 and 9999-12-31")])
    return ts.seconds + ts.nanos / 1e9


# Uploads bound the free-text fields of a file far below this; a record stored before they did may
# hold megabytes (a 4.5 MB body.model), shown cut with a marker so that it still fits a message.
MAX_SHOWN_FIELD_BYTES = 4096


def file_to_proto(f: FileRecord) -> file_pb2.File:
    return file_pb2.File(
        id=f.id, filename=clip(f.filename, MAX_SHOWN_FIELD_BYTES), purpose=PURPOSE_TO_PROTO[f.purpose],
        bytes=f.bytes, sha256=f.sha256, created_at=timestamp(f.created_at), expires_at=timestamp(f.expires_at),
        line_count=f.line_count, endpoint=clip(f.endpoint, MAX_SHOWN_FIELD_BYTES),
        model=clip(f.model, MAX_SHOWN_FIELD_BYTES),
        groups=[file_pb2.FileGroup(endpoint=g.endpoint, model=clip(g.model, MAX_SHOWN_FIELD_BYTES), count=g.count,
                                   first_lines=g.first_lines) for g in f.groups],
    )


_TIMESTAMP_FIELDS = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
                     "failed_at", "expired_at", "cancelling_at", "cancelled_at")


def _counts(c: RequestCounts) -> batch_pb2.RequestCounts:
    return batch_pb2.RequestCounts(total=c.total, completed=c.completed, failed=c.failed)


def _errors(errors: list[BatchError]) -> list[batch_pb2.BatchError]:
    return [batch_pb2.BatchError(code=e.code, message=e.message, param=e.param, line=e.line) for e in errors]


def _cost(c: Cost) -> batch_pb2.Cost:
    return batch_pb2.Cost(status=COST_STATUS_TO_PROTO[c.status], currency=c.currency, amount=c.amount,
                          input_amount=c.input_amount, output_amount=c.output_amount, reason=c.reason,
                          price_source=c.price_source)


def shard_to_proto(s: ShardSummary) -> batch_pb2.BatchShard:
    return batch_pb2.BatchShard(
        id=s.id, endpoint=s.endpoint, model=clip(s.model, MAX_SHOWN_FIELD_BYTES), provider=s.provider,
        deployment_id=s.deployment_id, provider_job_id=s.provider_job_id, status=STATUS_TO_PROTO[s.status],
        request_counts=_counts(s.request_counts), errors=_errors(s.errors), cost=_cost(s.cost))


def batch_to_proto(b: BatchRecord) -> batch_pb2.Batch:
    msg = batch_pb2.Batch(
        id=b.id, endpoint=b.endpoint, input_file_id=b.input_file_id, completion_window=b.completion_window,
        status=STATUS_TO_PROTO[b.status], output_file_id=b.output_file_id, error_file_id=b.error_file_id,
        request_counts=_counts(b.request_counts), errors=_errors(b.errors),
        failures=[batch_pb2.FailureCount(code=f.code, count=f.count, retried=f.retried,
                                         sample_message=f.sample_message) for f in b.failures],
        metadata=b.metadata, model=b.model, provider=b.provider, revision=b.revision, cost=_cost(b.cost),
        shards=[shard_to_proto(s) for s in b.shards],
    )
    for name in _TIMESTAMP_FIELDS:
        value = getattr(b, name)
        if value is not None:
            getattr(msg, name).CopyFrom(timestamp(value))
    if b.usage is not None:
        msg.usage.CopyFrom(batch_pb2.Usage(
            input_tokens=b.usage.input_tokens,
            input_tokens_details=batch_pb2.InputTokensDetails(
                cached_tokens=b.usage.cached_tokens, cache_creation_tokens=b.usage.cache_creation_tokens,
                cache_creation_1h_tokens=b.usage.cache_creation_1h_tokens),
            output_tokens=b.usage.output_tokens,
            output_tokens_details=batch_pb2.OutputTokensDetails(reasoning_tokens=b.usage.reasoning_tokens),
            total_tokens=b.usage.total_tokens,
        ))
    return msg
