"""Sharded batches (issue 14, domain/shards.py): one Batch run as several provider jobs.

The real server on loopback through the generated stubs, on the fakes: a batch over its
deployment's job limit is split into shards, each run as an ordinary batch, and merged back into
one output and one error file; shards stay hidden from callers."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import aiohttp
import grpc
import pytest
import yaml

from batchgate.v1 import batch_pb2, file_pb2, usage_pb2, usage_pb2_grpc
from batchgate_server.domain.models import FilePurpose, FileRecord
from tests.backends_pg import run_sql
from tests.conftest import jsonl, request_line, serving
from tests.fakes.openai_batch_api import FakeBatchAPI
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.integration.batch_helpers import (
    create,
    download_lines,
    results,
    run_batch,
    status_names,
    upstream_entry,
    watch_all,
    write_config,
)
from tests.integration.test_cli import cli, cli_env
from tests.integration.test_observability import scrape, value
from tests.integration.test_openai_provider_e2e import openai_entry, write_litellm_config
from tests.integration.test_webhooks import SECRET as WEBHOOK_SECRET
from tests.integration.test_webhooks import delivered


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
    async with serving(tmp_path / "data", config_file=config, http_address="127.0.0.1:0") as h:
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
    # shards are hidden: no call takes a shard's id, no listing shows one
    for shard in final.shards:
        for call in (a.batches.GetBatch(batch_pb2.GetBatchRequest(batch_id=shard.id), metadata=a.metadata),
                     a.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=shard.id), metadata=a.metadata),
                     watch_all(a, shard.id)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    for caller in (a, h.admin):
        listed = await caller.batches.ListBatches(batch_pb2.ListBatchesRequest(), metadata=caller.metadata)
        assert [b.id for b in listed.batches] == [batch.id]
    # the HTTP API shows the shards in its batch object, and knows no shard id either
    base, auth = f"http://127.0.0.1:{h.server.http_port}/v1/batches", {"Authorization": f"Bearer {a.api_key}"}
    async with aiohttp.ClientSession(headers=auth) as http:
        async with http.get(f"{base}/{batch.id}") as response:
            shown = (await response.json())["batchgate"]["shards"]
        assert [(s["id"], s["status"], s["request_counts"]["total"]) for s in shown] == [
            (s.id, "completed", s.request_counts.total) for s in final.shards]
        async with http.get(f"{base}/{final.shards[0].id}") as response:
            assert response.status == 404
        async with http.get(base) as response:
            assert [b["id"] for b in (await response.json())["data"]] == [batch.id]
        async with http.get(base, params={"after": final.shards[0].id}) as response:
            assert response.status == 400, "a shard id is no cursor of the listing"
    usage = usage_pb2_grpc.UsageServiceStub(h.channel)
    report = await usage.QueryUsage(usage_pb2.QueryUsageRequest(), metadata=a.metadata)
    assert report.totals.batch_count == 1
    # the CLI shows the jobs
    code, shown, _ = await cli(cli_env(h, a), "batches", "get", batch.id)
    assert code == 0
    jobs = [line.split() for line in shown.splitlines() if line.startswith("job ")]
    assert [(j[1], j[2], j[4]) for j in jobs] == [(s.id, "completed", "exec-a") for s in final.shards]
    # nothing of the batch stays in the tracker once its runner has cleaned up
    async with asyncio.timeout(10):
        while h.server.tracker.runner(batch.id) is not None:
            await asyncio.sleep(0.01)
    assert h.server.tracker._parents == {}


async def test_a_mixed_chat_and_embeddings_file_runs_on_two_executor_deployments(tmp_path, upstream):
    second = type(upstream)()
    await second.start()
    try:
        config = write_config(tmp_path / "models.yaml", [
            {**upstream_entry("chat-model", upstream.base_url), "model_info": {"id": "exec-chat"}},
            {**upstream_entry("embed-model", second.base_url), "model_info": {"id": "exec-embed"}},
        ])
        async with serving(tmp_path / "data", config_file=config) as h:
            a = h.alice
            lines = [request_line(f"chat-{i}", model="chat-model", content=f"question {i}") if i % 3 else
                     request_line(f"emb-{i}", model="embed-model", url="/v1/embeddings", content=f"text {i}")
                     for i in range(30)]
            f = await h.upload(a, jsonl(lines))
            batch = await create(a, f.id, endpoint="")
            assert batch.model == "" and batch.provider == "openai_compatible"
            final = (await watch_all(a, batch.id))[-1]
            assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final
            shards = {(s.endpoint, s.deployment_id): s.request_counts.total for s in final.shards}
            assert shards == {("/v1/chat/completions", "exec-chat"): 20, ("/v1/embeddings", "exec-embed"): 10}
            out, err = await results(a, final)
            assert err == []
            assert_each_once(out, [line["custom_id"] for line in lines])
            by_id = {x["custom_id"]: x["response"]["body"] for x in out}
            assert all(by_id[f"emb-{i}"]["object"] == "list" for i in range(0, 30, 3))
            assert all(by_id[f"chat-{i}"]["object"] == "chat.completion" for i in range(30) if i % 3)
            assert second.requests_total == 10 and upstream.requests_total == 20
    finally:
        await second.stop()


# ------------------------------------------------------------------ on the OpenAI Batch API fake

def openai_config(path: Path, fake: FakeBatchAPI, **params) -> Path:
    return write_litellm_config(path, [openai_entry("gpt-4o-mini", fake, "oai-main", key="sk-test", **params)])


def jobs_by_shard(fake: FakeBatchAPI) -> Counter:
    """How many provider jobs the fake created for each of our batch (shard) ids."""
    return Counter((b.metadata or {}).get("batchgate_batch_id") for b in fake.batches.values())


async def eventually(predicate, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


@pytest.fixture
async def oai():
    fake = FakeBatchAPI()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def manual_oai():
    """Jobs move only when the test advances them."""
    fake = FakeBatchAPI(clock="time", step_ms=10**9)
    await fake.start()
    yield fake
    await fake.stop()


async def test_120000_lines_on_openai_run_as_three_jobs_billed_as_one_batch(tmp_path, oai):
    config = openai_config(tmp_path / "models.yaml", oai)  # OpenAI's own limit: 50,000 requests a job
    async with serving(tmp_path / "data", config_file=config, max_file_lines=200_000,
                       max_file_bytes=1 << 30) as h:
        a = h.alice
        n = 120_000
        lines = chat_lines(n)
        f = await h.upload(a, jsonl(lines), chunk_size=1 << 20)
        batch = await create(a, f.id)
        final = (await watch_all(a, batch.id, timeout=170))[-1]
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final.errors
        assert [s.request_counts.total for s in final.shards] == [40_000, 40_000, 40_000]
        assert jobs_by_shard(oai) == Counter({s.id: 1 for s in final.shards})
        assert sorted(s.provider_job_id for s in final.shards) == sorted(oai.batches), "operators see the job ids"
        assert (final.request_counts.total, final.request_counts.completed) == (n, n)
        out, err = await results(a, final)
        assert_each_once(out, [line["custom_id"] for line in lines])
        assert err == []
        rows = await run_sql(h.server.store, "SELECT * FROM usage_ledger WHERE parent_batch_id=?", batch.id)
        assert sorted(r["batch_id"] for r in rows) == sorted(s.id for s in final.shards)
        assert final.usage.input_tokens == sum(r["input_tokens"] for r in rows) > 0
        assert final.usage.output_tokens == sum(r["output_tokens"] for r in rows)
        assert cost_nanos(final.cost.amount) == sum(r["cost_nanos"] for r in rows) > 0
        assert await run_sql(h.server.store, "SELECT * FROM usage_ledger WHERE batch_id=?", batch.id) == []
        usage = usage_pb2_grpc.UsageServiceStub(h.channel)
        report = await usage.QueryUsage(usage_pb2.QueryUsageRequest(), metadata=a.metadata)
        assert report.totals.batch_count == 1
        assert cost_nanos(report.totals.cost_amount) == cost_nanos(final.cost.amount)
        # the shards' own result files are gone: the merged ones are the batch's only files
        listed = await a.files.ListFiles(file_pb2.ListFilesRequest(), metadata=a.metadata)
        assert sorted(x.id for x in listed.files) == sorted([f.id, final.output_file_id])


async def test_cancel_mid_way_reaches_every_shard_and_keeps_partial_results(tmp_path, manual_oai):
    fake = manual_oai
    config = openai_config(tmp_path / "models.yaml", fake, max_batch_requests=4)
    async with serving(tmp_path / "data", config_file=config) as h:
        a = h.alice
        lines = chat_lines(12)
        f = await h.upload(a, jsonl(lines))
        batch = await create(a, f.id)
        watching = asyncio.create_task(watch_all(a, batch.id))
        await eventually(lambda: len(fake.batches) == 3)
        first, *others = sorted(fake.batches.values(), key=lambda b: b.metadata["batchgate_batch_id"])
        fake.run_to_end(first.id)
        shard_ids = sorted(b.metadata["batchgate_batch_id"] for b in fake.batches.values())

        async def first_done() -> bool:
            got = await a.batches.GetBatch(batch_pb2.GetBatchRequest(batch_id=batch.id), metadata=a.metadata)
            return got.batch.request_counts.completed == 4

        deadline = asyncio.get_running_loop().time() + 30
        while not await first_done():
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        await a.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch.id), metadata=a.metadata)
        await eventually(lambda: all(b.status == "cancelling" for b in others))
        for b in others:
            fake.advance(b.id)  # the provider ends the cancel
        states = await watching
        final = states[-1]
        assert final.status == batch_pb2.BATCH_STATUS_CANCELLED
        assert [s.status for s in states].count(batch_pb2.BATCH_STATUS_CANCELLED) == 1
        assert [s.id for s in final.shards] == shard_ids
        assert [s.status for s in final.shards] == [batch_pb2.BATCH_STATUS_COMPLETED] + \
            [batch_pb2.BATCH_STATUS_CANCELLED] * 2
        assert fake.calls_to("POST", "/cancel") == 2
        # WatchBatch on the parent showed the progress move before the cancel
        assert 4 in [s.request_counts.completed for s in states if s.status == batch_pb2.BATCH_STATUS_IN_PROGRESS]
        out, err = await results(a, final)
        assert sorted(x["custom_id"] for x in out) == sorted(line["custom_id"] for line in lines[:4])
        assert_each_once(out + err, [line["custom_id"] for line in lines])
        assert {x["error"]["code"] for x in err} == {"batch_cancelled"}
        assert (final.request_counts.completed, final.request_counts.failed) == (4, 8)
        # Ended means ended: the input is no batch's any more, shards included.
        await a.files.DeleteFile(file_pb2.DeleteFileRequest(file_id=f.id), metadata=a.metadata)


async def test_the_input_of_an_ended_sharded_batch_can_be_deleted_at_once(tmp_path, manual_oai):
    fake = manual_oai
    config = openai_config(tmp_path / "models.yaml", fake, max_batch_requests=4)
    async with serving(tmp_path / "data", config_file=config) as h:
        a = h.alice
        f = await h.upload(a, jsonl(chat_lines(12)))
        batch = await create(a, f.id)
        watching = asyncio.create_task(watch_all(a, batch.id))
        await eventually(lambda: len(fake.batches) == 3)
        for b in list(fake.batches.values()):
            fake.run_to_end(b.id)
        final = (await watching)[-1]
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final
        await a.files.DeleteFile(file_pb2.DeleteFileRequest(file_id=f.id), metadata=a.metadata)


async def test_a_shard_failing_at_its_provider_leaves_the_others_results(tmp_path, oai):
    config = openai_config(tmp_path / "models.yaml", oai, max_batch_requests=4)
    # The first job create is refused for good (401): that shard fails, the two others complete.
    oai.inject(401, 1, path_contains="/batches", method="POST")
    async with serving(tmp_path / "data", config_file=config) as h:
        a = h.alice
        lines = chat_lines(12)
        f = await h.upload(a, jsonl(lines))
        batch = await create(a, f.id)
        final = (await watch_all(a, batch.id))[-1]
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final
        statuses = Counter(batch_pb2.BatchStatus.Name(s.status) for s in final.shards)
        assert statuses == Counter({"BATCH_STATUS_COMPLETED": 2, "BATCH_STATUS_FAILED": 1})
        [failed] = [s for s in final.shards if s.status == batch_pb2.BATCH_STATUS_FAILED]
        out, err = await results(a, final)
        assert len(out) == 8 and len(err) == 4
        assert_each_once(out + err, [line["custom_id"] for line in lines])
        assert {x["error"]["code"] for x in err} == {failed.errors[0].code}
        assert (final.request_counts.completed, final.request_counts.failed) == (8, 4)


async def test_a_cancel_while_splitting_submits_nothing_and_charges_nothing(tmp_path, oai):
    config = openai_config(tmp_path / "models.yaml", oai, max_batch_requests=20_000)
    async with serving(tmp_path / "data", config_file=config, max_file_lines=60_000) as h:
        a = h.alice
        f = await h.upload(a, jsonl(chat_lines(60_000)), chunk_size=1 << 20)
        batch = await create(a, f.id)
        cancelled = (await a.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch.id),
                                                 metadata=a.metadata)).batch
        assert cancelled.status == batch_pb2.BATCH_STATUS_CANCELLING
        final = (await watch_all(a, batch.id))[-1]
        assert final.status == batch_pb2.BATCH_STATUS_CANCELLED
        assert oai.batches == {} and oai.calls_to("POST", "/files") == 0, "nothing reached the provider"
        assert final.output_file_id == "" and final.request_counts.completed == 0
        assert final.cost.status == batch_pb2.COST_STATUS_KNOWN and final.cost.amount == "0"
        rows = await run_sql(h.server.store, "SELECT cost_nanos FROM usage_ledger WHERE batch_id=? OR parent_batch_id=?",
                             batch.id, batch.id)
        assert rows and all(r["cost_nanos"] == 0 for r in rows)
        usage = usage_pb2_grpc.UsageServiceStub(h.channel)
        report = await usage.QueryUsage(usage_pb2.QueryUsageRequest(), metadata=a.metadata)
        assert report.totals.batch_count == 1


async def test_every_shard_failing_fails_the_batch(tmp_path, oai):
    config = openai_config(tmp_path / "models.yaml", oai, max_batch_requests=4)
    oai.inject(401, 3, path_contains="/batches", method="POST")
    async with serving(tmp_path / "data", config_file=config) as h:
        a = h.alice
        f = await h.upload(a, jsonl(chat_lines(12)))
        batch = await create(a, f.id)
        final = (await watch_all(a, batch.id))[-1]
        assert final.status == batch_pb2.BATCH_STATUS_FAILED
        assert len(final.errors) == 3 and final.request_counts.failed == 12
        assert final.cost.status == batch_pb2.COST_STATUS_KNOWN and final.cost.amount == "0"


async def test_metrics_count_a_sharded_batch_once_and_its_shards_tokens(tmp_path, upstream):
    config = write_config(tmp_path / "models.yaml", [
        {**upstream_entry("gpt-4o-mini", upstream.base_url, max_batch_requests=4), "model_info": {"id": "exec-a"}}])
    async with serving(tmp_path / "data", config_file=config, metrics_address="127.0.0.1:0") as h:
        a = h.alice
        f = await h.upload(a, jsonl(chat_lines(10)))
        final = (await watch_all(a, (await create(a, f.id)).id))[-1]
        assert len(final.shards) == 3
        samples = await scrape(h.server.metrics_port)
        assert value(samples, "batchgate_batches_ended_total", status="completed", project="alice") == 1
        assert value(samples, "batchgate_batch_transitions_total", to_status="completed") == 1
        assert value(samples, "batchgate_batch_transitions_total", from_status="validating",
                     to_status="in_progress") == 1
        assert value(samples, "batchgate_batches") == 0
        assert value(samples, "batchgate_tokens_total", project="alice", kind="input") == final.usage.input_tokens > 0


async def test_a_request_larger_than_a_job_fails_the_batch_with_the_numbers(tmp_path, upstream):
    config = write_config(tmp_path / "models.yaml", [
        {**upstream_entry("gpt-4o-mini", upstream.base_url, max_batch_bytes=2000), "model_info": {"id": "exec-a"}}])
    async with serving(tmp_path / "data", config_file=config) as h:
        a = h.alice
        lines = chat_lines(20)
        lines[7]["body"]["messages"][0]["content"] = "x" * 5000
        f = await h.upload(a, jsonl(lines))
        final = (await watch_all(a, (await create(a, f.id)).id))[-1]
        assert final.status == batch_pb2.BATCH_STATUS_FAILED
        [error] = final.errors
        assert error.code == "shard_limits" and "at most 2000 bytes" in error.message and "5" in error.message
        assert final.shards == [] and upstream.requests_total == 0


async def test_only_the_batch_sends_a_webhook_never_its_shards(tmp_path, upstream, monkeypatch):
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", WEBHOOK_SECRET)
    receiver = WebhookReceiver()
    await receiver.start()
    try:
        config = tmp_path / "models.yaml"
        config.write_text(yaml.safe_dump({
            "model_list": [{**upstream_entry("gpt-4o-mini", upstream.base_url, max_batch_requests=4),
                            "model_info": {"id": "exec-a"}}],
            "webhooks": [{"project": "alice", "url": receiver.url, "secret": "os.environ/TEST_WEBHOOK_SECRET"}]}))
        async with serving(tmp_path / "data", config_file=config) as h:
            a = h.alice
            f = await h.upload(a, jsonl(chat_lines(10)))
            batch = await create(a, f.id)
            final = (await watch_all(a, batch.id))[-1]
            [event] = await delivered(h, batch.id)
            assert event.event_type == "batch.completed"
            for shard in final.shards:
                assert await h.server.store.outbox_events(shard.id) == []
        assert [json.loads(r.body)["data"]["id"] for r in receiver.received] == [batch.id]
    finally:
        await receiver.stop()


async def shard_result_ids(h, batch_id: str) -> list[str]:
    """The result files the shards of `batch_id` have written so far (read from the store: callers
    never see them)."""
    shards = [await h.server.store.get_batch(s.id) for s in (await h.server.store.get_batch(batch_id)).shards]
    return [fid for s in shards for fid in (s.output_file_id, s.error_file_id) if fid]


async def test_shards_result_files_are_never_the_callers_while_the_batch_runs(executor_harness):
    h, a = executor_harness, executor_harness.alice
    lines = chat_lines(10)
    lines[9]["body"]["messages"][0]["content"] = "FAIL:hang"  # the last shard runs until cancelled
    f = await h.upload(a, jsonl(lines))
    batch = await create(a, f.id)
    async with asyncio.timeout(30):
        while len(await shard_result_ids(h, batch.id)) < 2:  # two of three shards have ended
            await asyncio.sleep(0.02)
    internal = await shard_result_ids(h, batch.id)
    assert (await a.batches.GetBatch(batch_pb2.GetBatchRequest(batch_id=batch.id),
                                     metadata=a.metadata)).batch.status == batch_pb2.BATCH_STATUS_IN_PROGRESS
    for caller in (a, h.admin):
        listed = await caller.files.ListFiles(file_pb2.ListFilesRequest(), metadata=caller.metadata)
        assert [x.id for x in listed.files] == [f.id]
        listed = await caller.files.ListFiles(file_pb2.ListFilesRequest(purpose=file_pb2.FILE_PURPOSE_BATCH_OUTPUT),
                                              metadata=caller.metadata)
        assert list(listed.files) == []
    for file_id in internal:
        for call in (a.files.GetFile(file_pb2.GetFileRequest(file_id=file_id), metadata=a.metadata),
                     a.files.DeleteFile(file_pb2.DeleteFileRequest(file_id=file_id), metadata=a.metadata),
                     download_lines(a, file_id)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    base, auth = f"http://127.0.0.1:{h.server.http_port}/v1/files", {"Authorization": f"Bearer {a.api_key}"}
    async with aiohttp.ClientSession(headers=auth) as http:
        async with http.get(base) as response:
            assert [x["id"] for x in (await response.json())["data"]] == [f.id]
        async with http.get(base, params={"after": internal[0]}) as response:
            assert response.status in (400, 404), "an internal file is no cursor of the listing"
        for file_id in internal:
            for path in (f"{base}/{file_id}", f"{base}/{file_id}/content"):
                async with http.get(path) as response:
                    assert response.status == 404
            async with http.delete(f"{base}/{file_id}") as response:
                assert response.status == 404
    # the stored-bytes quota counts the caller's upload only
    project = (await h.server.store.get_batch(batch.id)).project
    assert await h.server.store.stored_bytes(project) == f.bytes
    await a.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch.id), metadata=a.metadata)
    final = (await watch_all(a, batch.id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_CANCELLED
    out, _ = await results(a, final)
    assert len(out) == 9  # the two ended shards' results were merged
    for file_id in internal:
        assert await h.server.store.get_file(file_id) is None


async def test_shards_result_files_left_by_a_crash_after_the_parents_end_go_at_restart(tmp_path, upstream):
    config = write_config(tmp_path / "models.yaml", [upstream_entry("gpt-4o-mini", upstream.base_url,
                                                                    max_batch_requests=4)])
    async with serving(tmp_path / "data", config_file=config) as h:
        a = h.alice
        final, _, _, _ = await run_batch(h, chat_lines(10))
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
        # what a kill -9 between the parent's end and the deletion of its shards' files leaves:
        # a shard's result file (row and blob) still recorded for the ended parent
        shard = await h.server.store.get_batch(final.shards[0].id)
        leftover = FileRecord(id="file-leftover", project=shard.project, filename=f"{shard.id}_output.jsonl",
                              purpose=FilePurpose.BATCH_OUTPUT, bytes=3, sha256="", created_at=time.time(),
                              line_count=1, merged_into=final.id)
        writer = h.server.files.blobs.open_writer()
        await writer.write(b"{}\n")
        await writer.commit(leftover.id)
        await h.server.store.insert_file(leftover)
        listed = await a.files.ListFiles(file_pb2.ListFilesRequest(), metadata=a.metadata)
        own = [x.id for x in listed.files]
        assert leftover.id not in own
    async with serving(tmp_path / "data", config_file=config) as h:
        async def blob_kept() -> bool:
            return leftover.id in [k async for k in h.server.files.blobs.keys()]

        # The start's sweep deletes the row, then the blob (on S3 a moment later): both go.
        async with asyncio.timeout(10):
            while await h.server.store.get_file(leftover.id) is not None or await blob_kept():
                await asyncio.sleep(0.02)
        listed = await h.alice.files.ListFiles(file_pb2.ListFilesRequest(), metadata=h.alice.metadata)
        assert [x.id for x in listed.files] == own, "the caller's own files stay"
