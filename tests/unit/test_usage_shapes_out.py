"""The Batch's usage as callers read it, over gRPC (api/convert.py) and HTTP (api/http/objects.py):
prompt-cache writes are parts of the input tokens, next to the cache reads."""

from __future__ import annotations

from openai.types import Batch

from batchgate_server.api.convert import batch_to_proto
from batchgate_server.api.http.objects import batch_object
from batchgate_server.domain.models import BatchRecord, BatchStatus, Usage


def ended_batch() -> BatchRecord:
    return BatchRecord(id="batch_x", project="p", endpoint="/v1/chat/completions", input_file_id="file-x",
                       completion_window="24h", status=BatchStatus.COMPLETED, created_at=1.0, expires_at=2.0,
                       usage=Usage(input_tokens=6010, cached_tokens=1000, output_tokens=8,
                                   cache_creation_tokens=5000, cache_creation_1h_tokens=3000))


def test_grpc_batch_usage_names_cache_reads_and_writes():
    details = batch_to_proto(ended_batch()).usage.input_tokens_details
    assert (details.cached_tokens, details.cache_creation_tokens, details.cache_creation_1h_tokens) == (
        1000, 5000, 3000)


def test_http_batch_usage_keeps_the_openai_shape_with_the_cache_writes():
    obj = batch_object(ended_batch())
    assert obj["usage"]["input_tokens_details"] == {"cached_tokens": 1000, "cache_creation_tokens": 5000,
                                                    "cache_creation_1h_tokens": 3000}
    assert obj["usage"]["total_tokens"] == 6018
    Batch.model_validate(obj)  # still an OpenAI Batch to the SDK
