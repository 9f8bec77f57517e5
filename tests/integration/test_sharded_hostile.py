"""Sharded batches (issue 14) fed hostile files, through the real server on loopback.

A review of the split and merge as a user would hit them: a request near a job's byte limit among
small ones, a file of 64 groups with CRLF line ends and blank lines between requests, a group of
one line next to a large one, two file models mapped onto one deployment, a huge single line; and
the money side: the batch's cost is its shards' ledger rows, the monthly budget sees them."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import grpc
import pytest
import yaml
from batchgate.v1 import batch_pb2, file_pb2, usage_pb2, usage_pb2_grpc

from tests.conftest import jsonl, request_line, serving
from tests.fakes.openai_batch_api import FakeBatchAPI
from tests.integration.batch_helpers import create, results, watch_all
from tests.integration.test_keys_and_quotas import refused, set_quota
from tests.integration.test_sharded_batches import (
    assert_each_once,
    chat_lines,
    cost_nanos,
    eventually,
    openai_config,
)


def simulated_config(path: Path, **params) -> Path:
    """One priced simulated deployment of 'house' (fast, no network), job limits from `params`."""
    path.write_text(yaml.safe_dump({"model_list": [
        {"model_name": "house", "litellm_params": {"model": "simulated/echo", "latency_ms": 0, **params},
         "model_info": {"id": "sim-a", "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}},
    ]}))
    return path


def crlf_with_blanks(lines: list[dict]) -> bytes:
    """CRLF line ends and blank lines at the end (blank lines between requests are refused at
    upload: test_jsonl_validation), spaces around the JSON."""
    return b"".join((b" " if i % 5 == 0 else b"") + json.dumps(line).encode() + b" \r\n"
                    for i, line in enumerate(lines)) + b"\r\n   \r\n"


async def first_split(caller, batch_id: str) -> batch_pb2.Batch:
    """The batch's first state that lists its shards (the split's commit)."""
    async for event in caller.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=batch_id),
                                                 metadata=caller.metadata, timeout=60):
        if event.WhichOneof("event") == "batch" and (event.batch.shards or event.batch.status in (
                batch_pb2.BATCH_STATUS_FAILED, batch_pb2.BATCH_STATUS_CANCELLED)):
            return event.batch
    raise AssertionError("the watch ended before the split")


async def test_one_request_near_the_byte_limit_does_not_make_a_job_of_every_line(tmp_path):
    # max_batch_bytes 10,000: the large request fills a job alone; the 300 small ones (~130 bytes)
    # fit 4-5 jobs. Near-equal by lines alone made 301 jobs of one line.
    config = simulated_config(tmp_path / "models.yaml", max_batch_bytes=10_000)
    async with serving(tmp_path / "data", config_file=config) as h:
        a = h.alice
        lines = [request_line("big", model="house", content="x" * 9_800)]
        lines += [request_line(f"r-{i}", model="house", content=f"q {i}") for i in range(300)]
        f = await h.upload(a, b"".join(json.dumps(x).encode() + b"\n" for x in lines))
        batch = await create(a, f.id)
        split = await first_split(a, batch.id)
        assert split.status != batch_pb2.BATCH_STATUS_FAILED, split.errors
        assert 2 <= len(split.shards) <= 10, len(split.shards)
        final = (await watch_all(a, batch.id))[-1]
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final
        out, err = await results(a, final)
        assert err == [] and final.request_counts.completed == 301
        assert_each_once(out, [x["custom_id"] for x in lines])


async def test_64_groups_crlf_blank_lines_and_a_one_line_group_next_to_a_large_one(tmp_path):
    # 64 file models (the most a file may have), all mapped onto one deployment: 64 parts there.
    # Group m0 has 1 line, m1 has 20,000 (cut into jobs of at most 5,000), the rest 3 each; CRLF
    # ends, spaces around lines, blank lines at the end.
    config = simulated_config(tmp_path / "models.yaml", max_batch_requests=5_000)
    async with serving(tmp_path / "data", config_file=config) as h:
        a = h.alice
        lines = [request_line("only-m0", model="m0")]
        lines += [request_line(f"m1-{i}", model="m1", content=f"q {i}") for i in range(20_000)]
        lines += [request_line(f"m{g}-{i}", model=f"m{g}") for g in range(2, 64) for i in range(3)]
        # interleave the small groups into the large one's lines, so no group is one run
        small, large = lines[20_001:], lines[1:20_001]
        mixed = [lines[0]] + [x for pair in zip(large[:len(small)], small) for x in pair] + large[len(small):]
        f = await h.upload(a, crlf_with_blanks(mixed))
        batch = await create(a, f.id, model_map={f"m{g}": "house" for g in range(64)})
        final = (await watch_all(a, batch.id, timeout=120))[-1]
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final.errors
        by_model = {}
        for s in final.shards:
            by_model.setdefault(s.deployment_id, []).append(s.request_counts.total)
        assert sorted(by_model["sim-a"]).count(5_000) == 4 and sum(by_model["sim-a"]) == len(mixed)
        assert len(final.shards) == 63 + 4
        out, err = await results(a, final)
        assert err == [], err[:3]
        assert_each_once(out, [x["custom_id"] for x in mixed])
        assert final.request_counts.total == final.request_counts.completed == len(out) == len(mixed)
        # each answer is the answer to its own request (the shard read the right lines)
        assert all(x["response"]["status_code"] == 200 for x in out)


async def test_a_huge_single_line_in_a_mixed_file_is_answered_once(tmp_path):
    config = simulated_config(tmp_path / "models.yaml", max_batch_requests=3)
    async with serving(tmp_path / "data", config_file=config) as h:
        a = h.alice
        lines = [request_line(f"a-{i}", model="a") for i in range(5)]
        lines.insert(2, request_line("huge", model="b", content="y" * 4_000_000))
        lines += [request_line(f"b-{i}", model="b") for i in range(4)]
        f = await h.upload(a, crlf_with_blanks(lines))
        batch = await create(a, f.id, model_map={"a": "house", "b": "house"})
        final = (await watch_all(a, batch.id))[-1]
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final.errors
        out, err = await results(a, final)
        assert err == []
        assert_each_once(out, [x["custom_id"] for x in lines])


async def test_the_batch_costs_its_shards_ledger_rows_and_the_budget_sees_them(tmp_path):
    config = simulated_config(tmp_path / "models.yaml", max_batch_requests=4)
    async with serving(tmp_path / "data", config_file=config) as h:
        a = h.alice
        lines = [request_line(f"r-{i}", model="house", content=f"question {i}") for i in range(10)]
        f = await h.upload(a, b"".join(json.dumps(x).encode() + b"\n" for x in lines))
        final = (await watch_all(a, (await create(a, f.id)).id))[-1]
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED and len(final.shards) == 3
        shard_costs = [cost_nanos(s.cost.amount) for s in final.shards]
        assert all(c > 0 for c in shard_costs) and cost_nanos(final.cost.amount) == sum(shard_costs)
        usage = usage_pb2_grpc.UsageServiceStub(h.channel)
        report = await usage.QueryUsage(usage_pb2.QueryUsageRequest(), metadata=a.metadata)
        assert report.totals.batch_count == 1
        assert cost_nanos(report.totals.cost_amount) == sum(shard_costs)
        assert report.totals.input_tokens == final.usage.input_tokens
        assert report.totals.output_tokens == final.usage.output_tokens
        # the budget is spent by the shards' rows: at the batch's cost, the next batch is refused
        await set_quota(h, monthly_budget=final.cost.amount)
        await refused(create(a, f.id), grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_MONTHLY_BUDGET")


# ------------------------------------------------------------------ ends: expiry, cancels, watch

def assert_one_clean_watch(states: list[batch_pb2.Batch]) -> None:
    """Revisions only grow, counts never go back, exactly one terminal state and it is the last."""
    revisions = [s.revision for s in states]
    assert revisions == sorted(set(revisions)), revisions
    terminal = {batch_pb2.BATCH_STATUS_COMPLETED, batch_pb2.BATCH_STATUS_FAILED, batch_pb2.BATCH_STATUS_CANCELLED,
                batch_pb2.BATCH_STATUS_EXPIRED}
    assert [s.status in terminal for s in states].count(True) == 1 and states[-1].status in terminal
    done = [s.request_counts.completed + s.request_counts.failed for s in states]
    assert done == sorted(done), done


class ThreeJobs:
    """12 chat lines as 3 jobs of 4 on the OpenAI fake, each job moved by the test: start() uploads,
    creates, watches the batch and returns once the fake has the three jobs (first, *others)."""

    def __init__(self, h, fake: FakeBatchAPI) -> None:
        self.h, self.a, self.fake = h, h.alice, fake
        self.lines = chat_lines(12)

    async def start(self) -> None:
        self.file = await self.h.upload(self.a, jsonl(self.lines))
        self.batch = await create(self.a, self.file.id)
        self.watching = asyncio.create_task(watch_all(self.a, self.batch.id))
        await eventually(lambda: len(self.fake.batches) == 3)
        self.first, *self.others = sorted(self.fake.batches.values(),
                                          key=lambda b: b.metadata["batchgate_batch_id"])

    async def until_completed(self, n: int) -> None:
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            got = await self.a.batches.GetBatch(batch_pb2.GetBatchRequest(batch_id=self.batch.id),
                                                metadata=self.a.metadata)
            if got.batch.request_counts.completed == n:
                return
            assert asyncio.get_running_loop().time() < deadline, got.batch.request_counts
            await asyncio.sleep(0.05)

    def ids(self) -> list[str]:
        return [x["custom_id"] for x in self.lines]


@contextlib.asynccontextmanager
async def three_jobs_on(tmp_path: Path, **fake_options):
    """A server on an OpenAI fake (`fake_options`) with ThreeJobs started."""
    fake = FakeBatchAPI(**fake_options)
    await fake.start()
    try:
        config = openai_config(tmp_path / "models.yaml", fake, max_batch_requests=4)
        async with serving(tmp_path / "data", config_file=config) as h:
            jobs = ThreeJobs(h, fake)
            await jobs.start()
            yield jobs
    finally:
        await fake.stop()


async def test_one_shard_expiring_at_its_provider_keeps_the_others_and_answers_its_requests(tmp_path):
    async with three_jobs_on(tmp_path, clock="manual", lines_per_tick=1) as jobs:
        fake, h = jobs.fake, jobs.h
        fake.advance(jobs.first.id, 2)  # validating -> in_progress, one line done
        fake.expire(jobs.first.id)
        fake.advance(jobs.first.id)  # expires with 1 answered, 3 batch_expired
        for b in jobs.others:
            fake.run_to_end(b.id)
        states = await jobs.watching
        final = states[-1]
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final
        assert [s.status for s in final.shards] == [batch_pb2.BATCH_STATUS_EXPIRED] + \
            [batch_pb2.BATCH_STATUS_COMPLETED] * 2
        out, err = await results(h.alice, final)
        assert_each_once(out + err, jobs.ids())
        assert len(out) == 9 and {x["error"]["code"] for x in err} == {"batch_expired"}
        assert (final.request_counts.completed, final.request_counts.failed) == (9, 3)
        assert_one_clean_watch(states)


async def test_cancel_twice_cancels_each_shard_at_its_provider_once(tmp_path):
    async with three_jobs_on(tmp_path, clock="time", step_ms=10**9) as jobs:
        fake, h = jobs.fake, jobs.h
        a = h.alice
        request = batch_pb2.CancelBatchRequest(batch_id=jobs.batch.id)
        once = (await a.batches.CancelBatch(request, metadata=a.metadata)).batch
        twice = (await a.batches.CancelBatch(request, metadata=a.metadata)).batch
        assert once.status == twice.status == batch_pb2.BATCH_STATUS_CANCELLING
        await eventually(lambda: all(b.status == "cancelling" for b in fake.batches.values()))
        for b in fake.batches.values():
            fake.advance(b.id)
        states = await jobs.watching
        assert states[-1].status == batch_pb2.BATCH_STATUS_CANCELLED
        assert fake.calls_to("POST", "/cancel") == 3
        out, err = await results(a, states[-1])
        assert_each_once(out + err, jobs.ids())
        assert_one_clean_watch(states)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await a.batches.CancelBatch(request, metadata=a.metadata)
        assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_cancel_while_merging_ends_the_batch_once_with_every_answer(tmp_path):
    config = simulated_config(tmp_path / "models.yaml", max_batch_requests=20_000)
    async with serving(tmp_path / "data", config_file=config, max_file_lines=60_000) as h:
        a = h.alice
        lines = [request_line(f"r-{i}", model="house", content=f"q {i}") for i in range(60_000)]
        f = await h.upload(a, b"".join(json.dumps(x).encode() + b"\n" for x in lines), chunk_size=1 << 20)
        batch = await create(a, f.id)
        states = []
        cancelled = None
        async for event in a.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=batch.id),
                                                metadata=a.metadata, timeout=170):
            if event.WhichOneof("event") != "batch":
                continue
            states.append(event.batch)
            if event.batch.status == batch_pb2.BATCH_STATUS_FINALIZING and cancelled is None:
                cancelled = (await a.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch.id),
                                                         metadata=a.metadata)).batch
        assert cancelled is not None, "never saw the merge"
        final = states[-1]
        assert final.status in (batch_pb2.BATCH_STATUS_CANCELLED, batch_pb2.BATCH_STATUS_COMPLETED)
        assert_one_clean_watch(states)
        out, err = await results(a, final)
        assert_each_once(out + err, [x["custom_id"] for x in lines])
        assert final.request_counts.completed + final.request_counts.failed == 60_000


async def test_a_sharded_batch_of_unknown_cost_is_one_unknown_cost_batch(tmp_path):
    # No prices for the deployment: every shard's cost is unknown. UsageService counts the batch
    # once in batch_count, and so in unknown_cost_batches (not once per shard row).
    config = tmp_path / "models.yaml"
    config.write_text(yaml.safe_dump({"model_list": [
        {"model_name": "house", "litellm_params": {"model": "simulated/echo", "latency_ms": 0,
                                                   "max_batch_requests": 4}, "model_info": {"id": "sim-free"}}]}))
    async with serving(tmp_path / "data", config_file=config) as h:
        a = h.alice
        lines = [request_line(f"r-{i}", model="house") for i in range(10)]
        final = (await watch_all(a, (await create(a, (await h.upload(a, jsonl(lines))).id)).id))[-1]
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED and len(final.shards) == 3
        assert final.cost.status == batch_pb2.COST_STATUS_UNKNOWN, final.cost
        usage = usage_pb2_grpc.UsageServiceStub(h.channel)
        report = await usage.QueryUsage(usage_pb2.QueryUsageRequest(), metadata=a.metadata)
        assert (report.totals.batch_count, report.totals.unknown_cost_batches) == (1, 1)


async def test_a_shards_own_result_files_are_not_the_callers_to_list_or_delete(tmp_path):
    # A shard's result files are internal (merged into the batch's at its end): a caller who lists
    # files mid-way must not see them, and deleting one must not lose the batch's answers.
    async with three_jobs_on(tmp_path, clock="time", step_ms=10**9) as jobs:
        fake, h = jobs.fake, jobs.h
        a = h.alice
        fake.run_to_end(jobs.first.id)
        await jobs.until_completed(4)
        listed = await a.files.ListFiles(file_pb2.ListFilesRequest(), metadata=a.metadata)
        foreign = [x for x in listed.files if x.id != jobs.file.id]
        for x in foreign:  # what a caller cleaning up its files would do
            try:
                await a.files.DeleteFile(file_pb2.DeleteFileRequest(file_id=x.id), metadata=a.metadata)
            except grpc.aio.AioRpcError:
                pass
        for b in jobs.others:
            fake.run_to_end(b.id)
        final = (await jobs.watching)[-1]
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final.errors
        out, _ = await results(a, final)
        assert_each_once(out, jobs.ids())
        assert [x.filename for x in foreign] == [], "a shard's result file is listed to the caller"
