"""Sharded batches (issue 14, domain/shards.py): one Batch run as several provider jobs.

The real server on loopback through the generated stubs, on the fakes: a batch over its
deployment's job limit is split into shards, each run as an ordinary batch, and merged back into
one output and one error file; shards stay hidden from callers."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import grpc
import pytest

from batchgate.v1 import batch_pb2, usage_pb2, usage_pb2_grpc
from tests.conftest import jsonl, request_line, serving
from tests.integration.batch_helpers import create, results, status_names, upstream_entry, watch_all, write_config


def cost_nanos(amount: str) -> int:
    whole, _, frac = amount.partition(".")
    return int(whole or 0) * 10**9 + int((frac + "0" * 9)[:9])


def chat_lines(n: int, *, model: str = "gpt-4o-mini", prefix: str = "req") -> list[dict]:
    return [request_line(f"{prefix}-{i}", model=model, content=f"question {i}") for i in range(n)]


def assert_each_once(lines: list[dict], custom_ids: list[str]) -> None:
    counts = Counter(line["custom_id"] for line in lines)
    assert set(counts) == set(custom_ids), set(counts) ^ set(custom_ids)
    assert max(counts.values()) == 1, [c for c, n in counts.items() if n > 1][:5]


@pytest.fixture
async def executor_harness(tmp_path: Path, upstream):
    """Chat on the fake OpenAI-compatible upstream, at most 4 requests a job: priced, so cost sums."""
    config = write_config(tmp_path / "models.yaml", [
        {**upstream_entry("gpt-4o-mini", upstream.base_url, max_batch_requests=4),
         "model_info": {"id": "exec-a", "input_cost_per_token": 1e-7, "output_cost_per_token": 4e-7}},
    ])
    async with serving(tmp_path / "data", config_file=config) as h:
        yield h


async def test_a_batch_over_the_job_limit_runs_as_shards_and_merges_into_one(executor_harness):
    h, a = executor_harness, executor_harness.alice
    lines = chat_lines(10)
    f = await h.upload(a, jsonl(lines))
    batch = await create(a, f.id)
    states = await watch_all(a, batch.id)
    final = states[-1]
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final
    assert [s.request_counts.total for s in final.shards] == [3, 3, 4]
    assert {s.status for s in final.shards} == {batch_pb2.BATCH_STATUS_COMPLETED}
    assert final.request_counts.total == 10 and final.request_counts.completed == 10
    out, err = await results(a, final)
    assert_each_once(out, [line["custom_id"] for line in lines])
    assert err == []
    # usage and cost: the shards' sums, exactly
    assert final.usage.input_tokens > 0
    assert cost_nanos(final.cost.amount) == sum(cost_nanos(s.cost.amount) for s in final.shards)
    assert status_names(states)[-1] == "completed"
    # shards are hidden
    for shard in final.shards:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await a.batches.GetBatch(batch_pb2.GetBatchRequest(batch_id=shard.id), metadata=a.metadata)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await a.batches.ListBatches(batch_pb2.ListBatchesRequest(), metadata=a.metadata)
    assert [b.id for b in listed.batches] == [batch.id]
    usage = usage_pb2_grpc.UsageServiceStub(h.channel)
    report = await usage.QueryUsage(usage_pb2.QueryUsageRequest(), metadata=a.metadata)
    assert report.totals.batch_count == 1
