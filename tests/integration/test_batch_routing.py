"""CreateBatch's routing plan through the real server (core/shard_plan.py): mixed files, model_map
with model names and deployment ids, minimums (Bedrock's 100 records) rerouted or refused, spread,
and the errors that name the lines at fault: what CreateBatch answers, and that the batch it plans
runs where it was planned (how a sharded batch runs is tests/integration/test_sharded_batches.py's)."""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
import pytest

from batchgate.v1 import batch_pb2
from tests.conftest import error_details, jsonl, request_line, serving
from tests.integration.batch_helpers import create, results, watch_all, write_config

CHAT, EMBED = "/v1/chat/completions", "/v1/embeddings"

def bedrock(name: str, **params) -> dict:
    """A Bedrock deployment configured enough for CreateBatch (nothing here reaches AWS); its jobs
    take at least 100 records, Bedrock's minimum."""
    return {"model_name": name, "litellm_params": {
        "model": "bedrock/anthropic.claude-3-haiku-20240307-v1:0", "aws_region_name": "us-east-1",
        "s3_bucket_name": "batches", "aws_batch_role_arn": "arn:aws:iam::123456789012:role/batch",
        "aws_access_key_id": "testing", "aws_secret_access_key": "testing", **params}}

def simulated(name: str, dep_id: str, **params) -> dict:
    return {"model_name": name, "litellm_params": {"model": "simulated/echo", "latency_ms": 1, **params},
            "model_info": {"id": dep_id}}

@pytest.fixture
async def h(tmp_path):
    config = write_config(tmp_path / "models.yaml", [
        bedrock("claude"), simulated("claude", "claude-local"),  # Bedrock first: the least loaded on a tie
        bedrock("bedrock-only"),
        simulated("pool", "pool-1"), simulated("pool", "pool-2", weight=3),
    ])
    async with serving(tmp_path / "data", config_file=config, http_address="127.0.0.1:0") as harness:
        yield harness

def lines(*groups: tuple[str, str, int]) -> bytes:
    """A file of `groups` (url, model, count), in that order."""
    out, n = [], 0
    for url, model, count in groups:
        for _ in range(count):
            out.append(request_line(f"r{n}", model=model, url=url, content=f"line {n + 1}"))
            n += 1
    return jsonl(out)

async def refused(call) -> tuple[grpc.StatusCode, object, list[tuple[str, str]], str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    info, bad = error_details(err.value)
    return err.value.code(), info, [(v.field, v.description) for v in (bad.field_violations if bad else [])], \
        err.value.details()

async def nothing_created(h) -> bool:
    listed = await h.alice.batches.ListBatches(batch_pb2.ListBatchesRequest(), metadata=h.alice.metadata)
    return list(listed.batches) == []

async def test_an_endpoint_the_file_does_not_only_use_names_the_lines_that_differ(h):
    f = await h.upload(h.alice, lines((CHAT, "simulated", 2), (EMBED, "simulated", 3), (CHAT, "simulated", 1)))
    code, info, violations, message = await refused(create(h.alice, f.id, endpoint=CHAT))
    assert (code, info.reason, info.metadata["file_endpoint"]) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                    "ENDPOINT_MISMATCH", EMBED)
    assert violations == [("endpoint", "lines 3, 4, 5: url /v1/embeddings")]
    assert "lines 3, 4, 5" in message
    assert await nothing_created(h)

async def test_every_model_without_a_route_is_named_with_its_lines_in_one_error(h):
    f = await h.upload(h.alice, lines((CHAT, "simulated", 1), (CHAT, "ghost", 2), (CHAT, "simulated", 1),
                                      (CHAT, "phantom", 1), (CHAT, "mapped", 1)))
    code, info, violations, message = await refused(create(h.alice, f.id, model_map={"mapped": "nowhere"}))
    assert (code, info.reason, info.metadata["model"]) == (grpc.StatusCode.INVALID_ARGUMENT, "MODEL_NOT_FOUND",
                                                          "ghost,phantom,nowhere")
    assert violations == [("input_file.model", "lines 2, 3: no deployment serves model 'ghost'"),
                          ("input_file.model", "line 5: no deployment serves model 'phantom'"),
                          ("model_map[mapped]", "line 6: no deployment serves model 'nowhere'")]
    assert "configured model names: bedrock-only, claude, pool, simulated" in message
    assert await nothing_created(h)

async def test_model_map_to_a_deployment_id_runs_the_file_there_as_one_job(h):
    f = await h.upload(h.alice, lines((CHAT, "house-model", 4)))
    batch = await create(h.alice, f.id, model_map={"house-model": "claude-local"})
    assert (batch.model, batch.provider, batch.endpoint) == ("claude", "openai_compatible", CHAT)
    final = (await watch_all(h.alice, batch.id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED and final.request_counts.completed == 4
    assert list(final.shards) == []  # today's single job

async def test_a_batch_below_bedrocks_minimum_runs_on_another_deployment_of_its_model(h):
    f = await h.upload(h.alice, lines((CHAT, "claude", 5)))
    batch = await create(h.alice, f.id)
    assert (batch.model, batch.provider) == ("claude", "openai_compatible")
    assert (await watch_all(h.alice, batch.id))[-1].status == batch_pb2.BATCH_STATUS_COMPLETED

async def test_below_the_minimum_with_no_other_deployment_is_refused_with_the_numbers(h):
    f = await h.upload(h.alice, lines((CHAT, "bedrock-only", 42)))
    code, info, _, message = await refused(create(h.alice, f.id))
    assert (code, info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "BATCH_TOO_SMALL")
    assert (info.metadata["minimum"], info.metadata["line_count"], info.metadata["model"]) == ("100", "42",
                                                                                               "bedrock-only")
    assert info.metadata["lines"] == "lines 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 and 32 more"
    assert "at least 100" in message
    assert await nothing_created(h)

async def test_a_mixed_or_spread_batch_is_created_as_one_batch_with_what_its_parts_share(h):
    mixed = await h.upload(h.alice, lines((CHAT, "simulated", 2), (EMBED, "house-embed", 3)))
    batch = await create(h.alice, mixed.id, endpoint="", model_map={"house-embed": "pool-2"})
    # Two endpoints: no one endpoint to show; models and deployments differ, one provider.
    assert (batch.endpoint, batch.model, batch.provider) == ("", "", "openai_compatible")
    final = (await watch_all(h.alice, batch.id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED and final.request_counts.completed == 5
    assert sorted((s.endpoint, s.model, s.deployment_id, s.request_counts.total) for s in final.shards) == [
        (CHAT, "simulated", "builtin-simulated", 2), (EMBED, "pool", "pool-2", 3)]
    out, err = await results(h.alice, final)
    assert sorted(line["custom_id"] for line in out) == [f"r{i}" for i in range(5)] and err == []
    homogeneous = await h.upload(h.alice, lines((CHAT, "pool", 8)))
    spread = await create(h.alice, homogeneous.id, spread=True, request_id="spread-1")
    assert (spread.endpoint, spread.model, spread.provider) == (CHAT, "pool", "openai_compatible")
    again = await create(h.alice, homogeneous.id, spread=True, request_id="spread-1")
    assert again.id == spread.id
    code, info, _, _ = await refused(create(h.alice, homogeneous.id, request_id="spread-1"))
    assert (code, info.reason, info.metadata["field"]) == (grpc.StatusCode.FAILED_PRECONDITION, "REQUEST_ID_REUSED",
                                                           "spread")

async def test_http_leaves_the_endpoint_out_only_for_a_file_that_mixes_endpoints(h):
    mixed = await h.upload(h.alice, lines((CHAT, "simulated", 1), (EMBED, "simulated", 1)))
    single = await h.upload(h.alice, lines((CHAT, "simulated", 1)))
    key = dict(h.alice.metadata)["authorization"]
    async with aiohttp.ClientSession(headers={"Authorization": key}) as http:
        async def post(body: dict) -> tuple[int, dict]:
            async with http.post(f"http://127.0.0.1:{h.server.http_port}/v1/batches",
                                 json={"completion_window": "24h", **body}) as r:
                return r.status, await r.json()
        status, batch = await post({"input_file_id": mixed.id})
        assert (status, batch["endpoint"], batch["model"]) == (200, "", "simulated")
        status, answer = await post({"input_file_id": single.id})
        assert (status, answer["error"]["code"], answer["error"]["param"]) == (400, "missing_endpoint", "endpoint")
        status, answer = await post({"input_file_id": mixed.id, "endpoint": EMBED})
        assert (status, answer["error"]["code"]) == (400, "endpoint_mismatch")
        assert "line 1" in answer["error"]["message"]

@pytest.fixture
async def slow_pool(tmp_path):
    """Three deployments of "pool" (weights 1, 1, 2) slow enough that batches on them stay queued."""
    config = write_config(tmp_path / "models.yaml", [
        simulated("pool", "pool-1", latency_ms=60_000, max_concurrency=1),
        simulated("pool", "pool-2", latency_ms=60_000, max_concurrency=1),
        simulated("pool", "pool-3", latency_ms=60_000, max_concurrency=1, weight=2),
    ])
    async with serving(tmp_path / "data", config_file=config) as harness:
        yield harness

async def test_spread_cuts_by_weight_counting_the_load_already_queued(slow_pool):
    h = slow_pool
    busy = await create(h.alice, (await h.upload(h.alice, lines((CHAT, "pool", 40)))).id,
                        model_map={"pool": "pool-3"})
    # Queued per weight: pool-1 0, pool-2 0, pool-3 40/2 = 20. 80 more fill every one to 30 per weight.
    f = await h.upload(h.alice, lines((CHAT, "pool", 80)))
    spread = await create(h.alice, f.id, spread=True)
    async for event in h.alice.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=spread.id),
                                                  metadata=h.alice.metadata, timeout=60):
        if event.WhichOneof("event") == "batch" and event.batch.shards:
            shards = {s.deployment_id: s.request_counts.total for s in event.batch.shards}
            break
    assert shards == {"pool-1": 30, "pool-2": 30, "pool-3": 20}
    for batch_id in (busy.id, spread.id):
        await h.alice.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch_id), metadata=h.alice.metadata)

@pytest.fixture
async def twin_pool(tmp_path):
    """Two equal deployments of "pool", slow enough that batches on them stay queued."""
    config = write_config(tmp_path / "models.yaml", [
        simulated("pool", "pool-a", latency_ms=60_000, max_concurrency=1),
        simulated("pool", "pool-b", latency_ms=60_000, max_concurrency=1),
    ])
    async with serving(tmp_path / "data", config_file=config) as harness:
        yield harness

async def first_shards(h, batch_id: str) -> dict[str, int]:
    async for event in h.alice.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=batch_id),
                                                  metadata=h.alice.metadata, timeout=60):
        if event.WhichOneof("event") == "batch" and event.batch.shards:
            return {s.deployment_id: s.request_counts.total for s in event.batch.shards}
    raise AssertionError("the batch was never split")

async def test_a_spread_create_sees_the_load_of_one_created_just_before_it_is_split(twin_pool):
    h = twin_pool
    n = 20_001  # a split that takes a moment: the second create comes while the first is still splitting
    big = await h.upload(h.alice, lines((CHAT, "pool", n)))
    small = await h.upload(h.alice, lines((CHAT, "pool", 1)))
    first = await create(h.alice, big.id, spread=True)
    second = await create(h.alice, small.id, spread=True)
    assert await first_shards(h, first.id) == {"pool-a": 10_001, "pool-b": 10_000}  # a tie goes to the first
    # pool-a holds one request more: the one-line batch goes to pool-b (it would to pool-a on an empty pool)
    assert await first_shards(h, second.id) == {"pool-b": 1}
    assert h.server.router.queued("pool-a") == 10_001 and h.server.router.queued("pool-b") == 10_001
    for batch_id in (first.id, second.id):
        await h.alice.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch_id), metadata=h.alice.metadata)
        await watch_all(h.alice, batch_id)
    async with asyncio.timeout(10):  # every runner has ended: nothing stays reserved
        while h.server.router.queued("pool-a") or h.server.router.queued("pool-b"):
            await asyncio.sleep(0.02)
