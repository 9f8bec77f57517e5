"""The split of a planned part into jobs (core/sharded.py cut), the measuring pass over the input
(measure_parts), a shard's end status from its shards' (ended_as), and the exact sum of shard costs
(pricing/cost.py sum_costs)."""

from __future__ import annotations

import json
import threading
from itertools import accumulate, pairwise

import pytest

from batchgate_server.core.sharded import MEASURE_BLOCK_LINES, Measured, SplitRefused, cut, ended_as, measure_parts
from batchgate_server.domain.deployment import Deployment
from batchgate_server.domain.models import BatchRecord, BatchStatus, Cost
from batchgate_server.domain.shards import JobLimits, PlannedPart
from batchgate_server.pricing.cost import sum_costs
from batchgate_server.providers.openai_batch import OpenAIBatchProvider
from batchgate_server.store.blobs.local import LocalBlobStore


def test_a_part_is_cut_into_the_fewest_near_equal_jobs_by_lines():
    assert cut([1] * 120_000, JobLimits(max_requests=50_000), "p") == [(0, 40_000), (40_000, 80_000),
                                                                         (80_000, 120_000)]
    assert cut([1] * 10, JobLimits(max_requests=4), "p") == [(0, 3), (3, 6), (6, 10)]
    assert cut([1] * 10, JobLimits(), "p") == [(0, 10)]


def test_near_equal_jobs_keep_the_last_above_the_minimum():
    # 50,100 at most 50,000 a job, at least 100: greedy would leave a last job of 100; near-equal gives 25,050.
    jobs = cut([1] * 50_100, JobLimits(max_requests=50_000, min_requests=100), "p")
    assert [b - a for a, b in jobs] == [25_050, 25_050]


def test_bytes_add_jobs_where_lines_alone_would_fit():
    sizes = [100] * 10 + [1000] * 10  # 11,000 bytes, at most 4,000 a job
    jobs = cut(sizes, JobLimits(max_requests=100, max_bytes=4000), "p")
    assert all(sum(sizes[a:b]) <= 4000 for a, b in jobs)
    assert jobs[0][0] == 0 and jobs[-1][1] == 20 and all(x[1] == y[0] for x, y in zip(jobs, jobs[1:]))
    # 4 jobs of 5 lines would put 5,000 bytes in the third; 5 jobs of 4 lines fit (near-equal by lines).
    assert jobs == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20)]


def test_lines_never_sent_count_as_no_job_s_requests():
    # Bedrock's 100 to 150 records a job; 20 lines (size 0: cannot be translated) among 350. Cut by
    # lines, the third job held 97 records to send and Bedrock's minimum refused it.
    sizes = [10] * 350
    sizes[240:260] = [0] * 20
    limits = JobLimits(max_requests=150, min_requests=100)
    jobs = cut(sizes, limits, "p")
    assert jobs[0][0] == 0 and jobs[-1][1] == 350 and all(x[1] == y[0] for x, y in pairwise(jobs))
    sent = [sum(1 for size in sizes[a:b] if size) for a, b in jobs]
    assert sent == [110, 110, 110]
    # The lines never sent go with the sent line before them, the first ones with the first job.
    assert cut([0, 0, 5, 5, 0, 5, 5, 0], JobLimits(max_requests=2), "p") == [(0, 5), (5, 8)]


def test_a_part_with_too_few_lines_to_send_for_one_job_is_one_job():
    # Its provider refuses it at submit (BATCH_TOO_SMALL, no job created), as a batch under its minimum.
    sizes = [10] * 99 + [0] * 5
    assert cut(sizes, JobLimits(max_requests=150, min_requests=100), "p") == [(0, 104)]
    assert cut([0] * 7, JobLimits(max_requests=3), "p") == [(0, 7)]  # none sent: one job of error lines


def test_no_cut_fits_names_the_numbers():
    with pytest.raises(SplitRefused, match="has 50 requests; a job there takes at least 100"):
        cut([1] * 50, JobLimits(min_requests=100), "the 50 requests")
    with pytest.raises(SplitRefused, match="a request of 5000 bytes.*at most 4000 bytes"):
        cut([10, 5000, 10], JobLimits(max_bytes=4000), "p")
    # Bytes force jobs of fewer lines than the minimum.
    with pytest.raises(SplitRefused, match=r"150 requests, 150000 bytes.*at least 100 requests each"):
        cut([1000] * 150, JobLimits(max_bytes=100_000, min_requests=100), "p")


def record(status: BatchStatus) -> BatchRecord:
    return BatchRecord(id="b", project="p", endpoint="/v1/chat/completions", input_file_id="f",
                       completion_window="24h", status=status, created_at=0.0, expires_at=1.0)


@pytest.mark.parametrize("parent,shards,expected", [
    ("in_progress", ["completed", "failed"], "completed"),
    ("in_progress", ["failed", "failed"], "failed"),
    ("in_progress", ["failed", "expired"], "expired"),
    ("in_progress", ["expired", "completed"], "completed"),
    ("in_progress", ["cancelled", "completed"], "completed"),
    ("cancelling", ["completed", "completed"], "cancelled"),
])
def test_the_parent_ends_as_its_shards_say(parent, shards, expected):
    assert ended_as(record(BatchStatus(parent)), [record(BatchStatus(s)) for s in shards]) is BatchStatus(expected)


def test_shard_costs_sum_exactly_and_unknown_wins_with_its_reasons():
    a = Cost(status="known", amount="0.000000003", input_amount="0.000000001", output_amount="0.000000002",
             price_source="table 2026-01")
    b = Cost(status="known", amount="12.5", input_amount="10", output_amount="2.5", price_source="model_info")
    total = sum_costs([a, b, a])
    assert (total.status, total.amount, total.input_amount, total.output_amount) == (
        "known", "12.500000006", "10.000000002", "2.500000004")
    assert total.price_source == "table 2026-01, model_info"
    unknown = sum_costs([a, Cost(status="unknown", reason="no price for model(s): x"), b])
    assert (unknown.status, unknown.amount, unknown.reason) == ("unknown", "", "no price for model(s): x")
    assert sum_costs([]).amount == "0"


class _ThreadNoting(OpenAIBatchProvider):
    """The real OpenAI adapter, noting which thread measures each line."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def request_size(self, endpoint, deployment, line):
        self.threads.add(threading.get_ident())
        return super().request_size(endpoint, deployment, line)


async def test_the_split_measures_off_the_loop_in_blocks_with_the_one_pass_result(tmp_path):
    blobs = await LocalBlobStore.open(tmp_path)
    n = MEASURE_BLOCK_LINES * 2 + 7  # blocks, and a last short one
    lines = [json.dumps({"custom_id": f"r-{i}", "method": "POST",
                         "url": "/v1/embeddings" if i % 3 == 0 else "/v1/chat/completions",
                         "body": {"model": "emb" if i % 3 == 0 else "chat", "input": "x" * (i % 50)}}).encode()
             for i in range(n)]
    writer = blobs.open_writer()
    await writer.write(b"\n".join(lines) + b"\n")
    await writer.commit("file-in")
    provider = _ThreadNoting()
    deployment = Deployment(id="d", model_name="m", provider="openai", model="gpt-4o-mini", params={"api_key": "x"})
    embeds = [i for i in range(n) if i % 3 == 0]
    chats = [i for i in range(n) if i % 3]
    measured = [Measured(PlannedPart("/v1/chat/completions", "chat", "d", 10, len(chats)), deployment, provider),
                Measured(PlannedPart("/v1/embeddings", "emb", "d", 0, len(embeds)), deployment, provider),
                Measured(PlannedPart("/v1/chat/completions", "chat", "d", 0, 10), deployment, provider)]
    await measure_parts(blobs, "file-in", measured, single_group=False)
    assert provider.threads and threading.get_ident() not in provider.threads, "measured on the loop's thread"
    offsets = list(accumulate((len(line) + 1 for line in lines), initial=0))
    for m, indexes in zip(measured, (chats[10:], embeds, chats[:10])):
        assert list(m.offsets) == [offsets[i] for i in indexes]
        assert list(m.sizes) == [provider.request_size(m.part.endpoint, deployment, lines[i]) for i in indexes]
    await blobs.close()
