"""Domain records as OpenAI's JSON objects (openai.types.FileObject, Batch, FileDeleted, the cursor
list), field for field. What batchgate adds lives in one nested `batchgate` object, a name OpenAI's
objects do not use. No logic beyond field mapping."""

from __future__ import annotations

from batchgate_server.api.convert import MAX_SHOWN_FIELD_BYTES
from batchgate_server.core.errors import clip
from batchgate_server.domain.models import BatchError, BatchRecord, Cost, FileRecord, RequestCounts, ShardSummary


def _seconds(value: float | None) -> int | None:
    return None if value is None else int(value)


def file_object(f: FileRecord) -> dict:
    return {
        "id": f.id, "object": "file", "bytes": f.bytes, "created_at": int(f.created_at),
        "filename": clip(f.filename, MAX_SHOWN_FIELD_BYTES), "purpose": f.purpose.value,
        # A stored file has been validated: OpenAI's "processed".
        "status": "processed", "status_details": None, "expires_at": _seconds(f.expires_at),
        "batchgate": {"sha256": f.sha256, "line_count": f.line_count,
                      "endpoint": clip(f.endpoint, MAX_SHOWN_FIELD_BYTES),
                      "model": clip(f.model, MAX_SHOWN_FIELD_BYTES)},
    }


def file_deleted(file_id: str) -> dict:
    return {"id": file_id, "object": "file", "deleted": True}


_TIMESTAMPS = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
               "expired_at", "cancelling_at", "cancelled_at")


def batch_object(b: BatchRecord) -> dict:
    usage = None
    if b.usage is not None:
        usage = {"input_tokens": b.usage.input_tokens,
                 "input_tokens_details": {"cached_tokens": b.usage.cached_tokens,
                                          "cache_creation_tokens": b.usage.cache_creation_tokens,
                                          "cache_creation_1h_tokens": b.usage.cache_creation_1h_tokens},
                 "output_tokens": b.usage.output_tokens,
                 "output_tokens_details": {"reasoning_tokens": b.usage.reasoning_tokens},
                 "total_tokens": b.usage.total_tokens}
    errors = {"object": "list", "data": _errors(b.errors)} if b.errors else None
    return {
        "id": b.id, "object": "batch", "endpoint": b.endpoint, "errors": errors, "input_file_id": b.input_file_id,
        "completion_window": b.completion_window, "status": b.status.value,
        "output_file_id": b.output_file_id or None, "error_file_id": b.error_file_id or None,
        **{name: _seconds(getattr(b, name)) for name in _TIMESTAMPS},
        "request_counts": _counts(b.request_counts),
        "metadata": b.metadata, "model": b.model or None, "usage": usage,
        "batchgate": {
            "provider": b.provider, "revision": b.revision,
            "cost": _cost(b.cost),
            # The provider jobs of a batch run as several (domain/shards.py); [] for one job.
            "shards": [_shard(s) for s in b.shards],
        },
    }


def _errors(errors: list[BatchError]) -> list[dict]:
    return [{"code": e.code, "message": e.message, "param": e.param or None, "line": e.line} for e in errors]


def _counts(c: RequestCounts) -> dict:
    return {"total": c.total, "completed": c.completed, "failed": c.failed}


def _cost(c: Cost) -> dict:
    return {"status": c.status, "currency": c.currency, "amount": c.amount, "input_amount": c.input_amount,
            "output_amount": c.output_amount, "reason": c.reason, "price_source": c.price_source}


def _shard(s: ShardSummary) -> dict:
    return {"id": s.id, "endpoint": s.endpoint, "model": clip(s.model, MAX_SHOWN_FIELD_BYTES), "provider": s.provider,
            "deployment_id": s.deployment_id, "provider_job_id": s.provider_job_id or None,
            "status": s.status.value, "request_counts": _counts(s.request_counts), "errors": _errors(s.errors),
            "cost": _cost(s.cost)}


def list_object(data: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}
