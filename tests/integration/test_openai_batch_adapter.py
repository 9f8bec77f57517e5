"""The OpenAI / Azure OpenAI batch adapters driven directly against the fakes (no batchgate
server), plus the fakes themselves checked against the official `openai` package."""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc
from pathlib import Path

import httpx
import openai
import pytest
from openai.types import Batch, Completion, CreateEmbeddingResponse, FileDeleted, FileObject
from openai.types import ModerationCreateResponse
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from batchgate_server.domain.models import RequestCounts
from batchgate_server.domain.shards import JobLimits
from batchgate_server.providers.base import (
    Deployment,
    JobStatus,
    ProviderError,
    ProviderJob,
    ResultKind,
    UnsupportedRequest,
)
from batchgate_server.providers.openai_batch import AzureBatchProvider, OpenAIBatchProvider
from tests.fakes.openai_batch_api import FakeBatchAPI

OPENAI_KEY = "sk-test"
AZURE_KEY = "az-test-key"


# ------------------------------------------------------------------ helpers

def chat_line(i: int, text: str | None = None, model: str = "gpt-4o-mini",
              url: str = "/v1/chat/completions", custom_id: str | None = None) -> dict:
    return {"custom_id": custom_id or f"req-{i}", "method": "POST", "url": url,
            "body": {"model": model, "max_tokens": 16,
                     "messages": [{"role": "system", "content": "be brief"},
                                  {"role": "user", "content": text or f"question {i}"}]}}


class JobHarness:
    def __init__(self, job: ProviderJob) -> None:
        self.job = job
        self.saves: list[dict] = []


def make_job(tmp_path: Path, lines: list, deployment: Deployment,
             endpoint: str = "/v1/chat/completions", batch_id: str = "batch_gw1",
             state: dict | None = None) -> JobHarness:
    path = tmp_path / f"{batch_id}-input.jsonl"
    with open(path, "wb") as f:
        for ln in lines:
            f.write((ln if isinstance(ln, bytes) else json.dumps(ln).encode()) + b"\n")
    return job_for_file(tmp_path, path, len(lines), deployment, endpoint, batch_id, state)


def job_for_file(tmp_path: Path, path: Path, n: int, deployment: Deployment, endpoint: str,
                 batch_id: str, state: dict | None = None) -> JobHarness:
    async def open_input():
        with open(path, "rb") as f:
            for raw in f:
                yield raw.rstrip(b"\n")

    holder: list[JobHarness] = []

    async def save_state() -> None:
        holder[0].saves.append(dict(holder[0].job.state))

    now = time.time()
    job = ProviderJob(batch_id=batch_id, endpoint=endpoint, deployment=deployment, line_count=n,
                      created_at=now, expires_at=now + 86400, state=dict(state or {}),
                      open_input=open_input, save_state=save_state, workdir=tmp_path)
    h = JobHarness(job)
    holder.append(h)
    return h


def openai_dep(api: FakeBatchAPI, **params) -> Deployment:
    p = {"api_key": OPENAI_KEY, "api_base": api.base_url, "timeout": 5, "max_retries": 2,
         "backoff_base": 0.01}
    p.update(params)
    return Deployment(id="dep-openai", model_name="gpt-4o-mini", provider="openai",
                      model="gpt-4o-mini-2024-07-18", params=p)


def azure_dep(api: FakeBatchAPI, **params) -> Deployment:
    p = {"api_key": AZURE_KEY, "api_base": api.base_url, "timeout": 5, "max_retries": 2,
         "backoff_base": 0.01}
    p.update(params)
    return Deployment(id="dep-azure", model_name="gpt-4o", provider="azure",
                      model="my-gpt4o-batch", params=p)


async def poll_until_end(provider, job: ProviderJob, limit: int = 50) -> list:
    seen = []
    for _ in range(limit):
        r = await provider.poll(job)
        seen.append(r)
        if r.status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.EXPIRED,
                        JobStatus.CANCELLED):
            return seen
    raise AssertionError(f"never ended: {[r.status for r in seen]}")


async def collect(provider, job: ProviderJob) -> tuple[list[dict], list[dict]]:
    out, err = [], []
    async for r in provider.results(job):
        assert isinstance(r.data, bytes) and not r.data.endswith(b"\n")
        (out if r.kind is ResultKind.OUTPUT else err).append(json.loads(r.data))
    return out, err


@pytest.fixture
async def api():
    fake = FakeBatchAPI(api_key=OPENAI_KEY)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def azure_api():
    fake = FakeBatchAPI(azure=True, api_key=AZURE_KEY)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def openai_provider():
    p = OpenAIBatchProvider()
    yield p
    await p.close()


@pytest.fixture
async def azure_provider():
    p = AzureBatchProvider()
    yield p
    await p.close()


# ------------------------------------------------------------------ lifecycle

async def test_full_lifecycle_completed(api, openai_provider, tmp_path):
    h = make_job(tmp_path, [chat_line(i) for i in range(5)], openai_dep(api))
    await openai_provider.submit(h.job)
    st = h.job.state
    assert st["input_file_id"].startswith("file-") and st["provider_batch_id"].startswith("batch_")
    # a state save before and after each step, the last one carrying the provider batch id
    assert h.saves[0] == {"upload_started": True}, "saved before the upload"
    assert h.saves[1]["input_file_id"] == st["input_file_id"] and "create_started_at" not in h.saves[1]
    assert h.saves[2]["create_started_at"] and "provider_batch_id" not in h.saves[2], \
        "saved before the create"
    assert h.saves[-1]["provider_batch_id"] == st["provider_batch_id"]
    created = api.created_batch_requests[0]
    assert created == {"input_file_id": st["input_file_id"], "endpoint": "/v1/chat/completions",
                       "completion_window": "24h", "metadata": {"batchgate_batch_id": "batch_gw1"}}
    # idempotent: a second submit does nothing
    calls = len(api.calls)
    await openai_provider.submit(h.job)
    assert len(api.calls) == calls and len(api.files) == 1

    seen = await poll_until_end(openai_provider, h.job)
    assert [r.status for r in seen] == [JobStatus.IN_PROGRESS, JobStatus.FINALIZING,
                                        JobStatus.COMPLETED]
    assert seen[-1].request_counts == RequestCounts(5, 5, 0)
    assert seen[-1].errors == []

    out, err = await collect(openai_provider, h.job)
    assert err == []
    assert sorted(o["custom_id"] for o in out) == [f"req-{i}" for i in range(5)]
    for o in out:
        assert o["id"].startswith("batch_req_") and o["error"] is None
        assert o["response"]["status_code"] == 200
        cc = ChatCompletion.model_validate(o["response"]["body"])
        assert cc.model == "gpt-4o-mini-2024-07-18"
        assert cc.usage.total_tokens > 0
        assert cc.choices[0].message.content.startswith("echo: question ")
    await openai_provider.release(h.job)
    assert st["input_file_id"] not in api.files, "the input file is deleted once results are read"
    assert api.batches[st["provider_batch_id"]].output_file_id in api.files


@pytest.mark.parametrize("azure", [False, True])
async def test_request_size_is_each_line_as_the_fake_received_it(api, azure_api, tmp_path, azure):
    """request_size (what CreateBatch's split sums against max_bytes) is each line as uploaded: body.model
    rewritten to the deployment's (longer here), Azure's url without /v1, non-ASCII as sent."""
    fake, provider = (azure_api, AzureBatchProvider()) if azure else (api, OpenAIBatchProvider())
    dep = azure_dep(azure_api) if azure else openai_dep(api)
    lines = [chat_line(0), chat_line(1, text="caf\u00e9 \u6771\u4eac \U0001f680", model="m"),
             chat_line(2, url="/v1/embeddings"), chat_line(3, custom_id="Req 1/\u00fc " + "x" * 80)]
    h = make_job(tmp_path, lines, dep)
    try:
        await provider.submit(h.job)
        received = fake.files[h.job.state["input_file_id"]].content
    finally:
        await provider.close()
    sizes = [provider.request_size(h.job.endpoint, dep, json.dumps(ln).encode()) for ln in lines]
    assert sizes == [len(line) + 1 for line in received.rstrip(b"\n").split(b"\n")]
    assert sum(sizes) == len(received)
    # Not a size of the line as given: the model was rewritten (on Azure the url too, which here
    # happens to keep the size).
    assert received.split(b"\n", 1)[0] != json.dumps(lines[0]).encode(), "the model was rewritten"


async def test_failing_lines_become_error_results(api, openai_provider, tmp_path):
    lines = [chat_line(i, "FAIL please" if i in (1, 3) else None) for i in range(5)]
    h = make_job(tmp_path, lines, openai_dep(api))
    await openai_provider.submit(h.job)
    seen = await poll_until_end(openai_provider, h.job)
    assert seen[-1].status is JobStatus.COMPLETED
    assert seen[-1].request_counts == RequestCounts(5, 3, 2)
    out, err = await collect(openai_provider, h.job)
    assert sorted(o["custom_id"] for o in out) == ["req-0", "req-2", "req-4"]
    assert sorted(e["custom_id"] for e in err) == ["req-1", "req-3"]
    for e in err:
        assert e["response"]["status_code"] == 400
        assert e["response"]["body"]["error"]["type"] == "invalid_request_error"


async def test_validation_failure_reports_line_numbers(api, openai_provider, tmp_path):
    lines = [chat_line(0), b"{not json", chat_line(2, custom_id="req-0"),
             chat_line(3, url="/v1/embeddings"), chat_line(4)]
    h = make_job(tmp_path, lines, openai_dep(api))
    await openai_provider.submit(h.job)
    # the adapter passed the broken line through untouched, for the provider to report
    assert api.files[h.job.state["input_file_id"]].content.split(b"\n")[1] == b"{not json"
    r = await openai_provider.poll(h.job)
    assert r.status is JobStatus.FAILED
    assert [(e.code, e.line) for e in r.errors] == [
        ("invalid_json_line", 2), ("duplicate_custom_id", 3), ("url_mismatch", 4)]
    assert all(e.message for e in r.errors)
    assert await collect(openai_provider, h.job) == ([], [])


async def test_cancel_mid_run_keeps_partial_results(api, openai_provider, tmp_path):
    api.lines_per_tick = 2
    h = make_job(tmp_path, [chat_line(i) for i in range(6)], openai_dep(api))
    await openai_provider.submit(h.job)
    assert (await openai_provider.poll(h.job)).status is JobStatus.IN_PROGRESS
    r = await openai_provider.poll(h.job)
    assert r.status is JobStatus.IN_PROGRESS and r.request_counts == RequestCounts(6, 2, 0)
    await openai_provider.cancel(h.job)
    assert api.batches[h.job.state["provider_batch_id"]].status == "cancelling"
    r = await openai_provider.poll(h.job)
    assert r.status is JobStatus.CANCELLED and r.request_counts == RequestCounts(6, 2, 0)
    out, err = await collect(openai_provider, h.job)
    assert sorted(o["custom_id"] for o in out) == ["req-0", "req-1"] and err == []
    # cancelling an ended batch is refused by the provider (409): not an error for the tracker
    await openai_provider.cancel(h.job)


async def test_cancel_before_submit_is_a_no_op(api, openai_provider, tmp_path):
    h = make_job(tmp_path, [chat_line(0)], openai_dep(api))
    await openai_provider.cancel(h.job)
    assert api.calls == []


async def test_expiry_keeps_partial_results(api, openai_provider, tmp_path):
    api.lines_per_tick = 2
    h = make_job(tmp_path, [chat_line(i) for i in range(5)], openai_dep(api))
    await openai_provider.submit(h.job)
    await openai_provider.poll(h.job)
    await openai_provider.poll(h.job)
    api.expire(h.job.state["provider_batch_id"])
    r = await openai_provider.poll(h.job)
    assert r.status is JobStatus.EXPIRED
    out, err = await collect(openai_provider, h.job)
    assert sorted(o["custom_id"] for o in out) == ["req-0", "req-1"]
    assert sorted(e["custom_id"] for e in err) == ["req-2", "req-3", "req-4"]
    assert {e["error"]["code"] for e in err} == {"batch_expired"}
    assert all(e["response"] is None for e in err)


# ------------------------------------------------------------------ errors and retries

async def test_wrong_key_is_provider_auth(api, openai_provider, tmp_path):
    h = make_job(tmp_path, [chat_line(0)], openai_dep(api, api_key="sk-wrong"))
    with pytest.raises(ProviderError) as ei:
        await openai_provider.submit(h.job)
    assert ei.value.code == "provider_auth" and ei.value.retryable is False
    assert "sk-wrong" not in ei.value.message
    assert len(api.calls) == 1  # not retried
    assert h.job.state == {"upload_started": True}


async def test_429_then_success_honours_retry_after(api, openai_provider, tmp_path):
    h = make_job(tmp_path, [chat_line(0)], openai_dep(api))
    await openai_provider.submit(h.job)
    api.inject(429, 1, retry_after=1, path_contains="/batches/")
    t0 = time.monotonic()
    r = await openai_provider.poll(h.job)
    elapsed = time.monotonic() - t0
    assert r.status is JobStatus.IN_PROGRESS
    assert elapsed >= 1.0, elapsed  # backoff_base is 0.01: only Retry-After explains the wait
    assert elapsed < 3.0
    assert api.calls_to("GET", "/v1/batches/batch_") == 2


async def test_long_retry_after_goes_back_to_the_tracker(api, openai_provider, tmp_path):
    h = make_job(tmp_path, [chat_line(0)], openai_dep(api))
    await openai_provider.submit(h.job)
    api.inject(429, 1, retry_after=120, path_contains="/batches/")
    t0 = time.monotonic()
    with pytest.raises(ProviderError) as ei:
        await openai_provider.poll(h.job)
    assert time.monotonic() - t0 < 1.0
    assert ei.value.retryable and ei.value.retry_after == 120
    assert ei.value.code == "provider_rate_limited"


async def test_insufficient_quota_is_not_retried(api, openai_provider, tmp_path):
    h = make_job(tmp_path, [chat_line(0)], openai_dep(api))
    api.inject(429, 1, body={"error": {"message": "You exceeded your current quota",
                                       "type": "insufficient_quota", "param": None,
                                       "code": "insufficient_quota"}})
    with pytest.raises(ProviderError) as ei:
        await openai_provider.submit(h.job)
    assert ei.value.code == "provider_quota_exceeded" and not ei.value.retryable
    assert "quota" in ei.value.message


async def test_500_is_retried(api, openai_provider, tmp_path):
    h = make_job(tmp_path, [chat_line(0)], openai_dep(api))
    await openai_provider.submit(h.job)
    api.inject(500, 2, path_contains="/batches/")
    r = await openai_provider.poll(h.job)
    assert r.status is JobStatus.IN_PROGRESS
    assert api.calls_to("GET", "/v1/batches/batch_") == 3


async def test_500_exhausted_is_retryable(api, openai_provider, tmp_path):
    h = make_job(tmp_path, [chat_line(0)], openai_dep(api))
    await openai_provider.submit(h.job)
    api.inject(503, 10, path_contains="/batches/")
    with pytest.raises(ProviderError) as ei:
        await openai_provider.poll(h.job)
    assert ei.value.retryable and ei.value.code == "provider_unavailable"
    assert "3 attempts" in ei.value.message
    assert api.calls_to("GET", "/v1/batches/batch_") == 3  # 1 + max_retries


async def test_upload_retried_on_500(api, openai_provider, tmp_path):
    h = make_job(tmp_path, [chat_line(i) for i in range(3)], openai_dep(api))
    api.inject(500, 1, path_contains="/files")
    await openai_provider.submit(h.job)
    assert api.calls_to("POST", "/v1/files") == 2
    f = api.files[h.job.state["input_file_id"]]
    assert len(f.content.splitlines()) == 3  # the retried upload is complete


async def test_500_on_create_is_reconciled_not_duplicated(api, openai_provider, tmp_path):
    patience = dict(timeout=0.5, create_lookup_patience=0.5)  # the lookup lasts until 1 s after the create
    h = make_job(tmp_path, [chat_line(0)], openai_dep(api, **patience))
    api.inject(500, 1, path_contains="/batches", method="POST")
    with pytest.raises(ProviderError) as ei:
        await openai_provider.submit(h.job)
    assert ei.value.retryable
    assert h.job.state.get("create_started_at") and "provider_batch_id" not in h.job.state
    await openai_provider.submit(h.job)  # the tracker tries again: looks up for a while, then creates
    assert time.time() - h.job.state["create_started_at"] < 1, "the create after the lookups is recorded"
    assert api.calls_to("GET", "/v1/batches?") > 1
    assert len(api.batches) == 1
    assert h.job.state["provider_batch_id"] in api.batches


async def test_interrupted_create_is_adopted(api, openai_provider, tmp_path):
    h = make_job(tmp_path, [chat_line(0)], openai_dep(api))
    await openai_provider.submit(h.job)
    bid = h.job.state["provider_batch_id"]
    # Crash after the provider created the batch but before we saved its id:
    lost = {k: v for k, v in h.job.state.items() if k not in ("provider_batch_id", "provider_created_at")}
    h2 = make_job(tmp_path, [chat_line(0)], openai_dep(api), state=lost)
    await openai_provider.submit(h2.job)
    assert h2.job.state["provider_batch_id"] == bid
    assert len(api.batches) == 1 and len(api.created_batch_requests) == 1
    # another gateway batch's lost create doesn't adopt this one
    h3 = make_job(tmp_path, [chat_line(0)], openai_dep(api, timeout=0.2, create_lookup_patience=0.2),
                  batch_id="batch_gw_other", state=lost)
    await openai_provider.submit(h3.job)
    assert h3.job.state["provider_batch_id"] != bid and len(api.batches) == 2


async def test_a_batch_ended_before_a_lost_create_answer_stops_that_batch(api, openai_provider, tmp_path):
    h = make_job(tmp_path, [chat_line(0)], openai_dep(api))
    await openai_provider.submit(h.job)
    made, input_id = h.job.state["provider_batch_id"], h.job.state["input_file_id"]
    lost = {k: v for k, v in h.job.state.items() if k not in ("provider_batch_id", "provider_created_at")}
    h2 = make_job(tmp_path, [chat_line(0)], openai_dep(api), state=lost)  # cancelled after the restart
    await openai_provider.release(h2.job)  # the tracker ends the batch and releases it
    assert api.batches[made].status == "cancelling"
    assert input_id not in api.files


async def test_a_create_listed_late_is_adopted_not_repeated(openai_provider, tmp_path):
    api = FakeBatchAPI(api_key=OPENAI_KEY)
    api.lag.listing = 0.6
    await api.start()
    try:
        d = openai_dep(api, timeout=0.5, create_lookup_patience=1.0)
        h = make_job(tmp_path, [chat_line(0)], d)
        await openai_provider.submit(h.job)
        lost = {k: v for k, v in h.job.state.items() if k not in ("provider_batch_id", "provider_created_at")}
        h2 = make_job(tmp_path, [chat_line(0)], d, state=lost)
        await openai_provider.submit(h2.job)  # not listed yet: looks again until it is
        assert h2.job.state["provider_batch_id"] == h.job.state["provider_batch_id"]
        assert len(api.batches) == 1 and api.calls_to("GET", "/v1/batches?") > 1
    finally:
        await api.stop()


async def test_duplicates_found_at_the_lookup_are_cancelled(api, openai_provider, tmp_path):
    """Two provider batches for one batch (the listing once lagged past the patience): the oldest
    is adopted, the other cancelled at once."""
    d = openai_dep(api)
    first = make_job(tmp_path, [chat_line(0)], d)
    await openai_provider.submit(first.job)
    second = make_job(tmp_path, [chat_line(0)], d)
    await openai_provider.submit(second.job)
    assert len(api.batches) == 2
    lost = {k: v for k, v in first.job.state.items() if k not in ("provider_batch_id", "provider_created_at")}
    h = make_job(tmp_path, [chat_line(0)], d, state=lost)
    await openai_provider.submit(h.job)
    assert h.job.state["provider_batch_id"] == first.job.state["provider_batch_id"]
    assert api.batches[second.job.state["provider_batch_id"]].status == "cancelling"
    assert api.batches[first.job.state["provider_batch_id"]].status == "validating"


async def test_a_create_repeated_after_the_patience_cancels_the_late_copy(openai_provider, tmp_path):
    api = FakeBatchAPI(api_key=OPENAI_KEY, clock="manual")
    api.lag.listing = 3600  # listed far too late
    await api.start()
    try:
        d = openai_dep(api, timeout=0.2, create_lookup_patience=0.2)
        h = make_job(tmp_path, [chat_line(0)], d)
        await openai_provider.submit(h.job)
        first = h.job.state["provider_batch_id"]
        lost = {k: v for k, v in h.job.state.items() if k not in ("provider_batch_id", "provider_created_at")}
        h2 = make_job(tmp_path, [chat_line(0)], d, state=lost)
        await openai_provider.submit(h2.job)  # not listed within the patience: created again
        assert h2.job.state["provider_batch_id"] != first and h2.job.state["duplicate_watch_until"]
        await openai_provider.poll(h2.job)
        assert api.batches[first].status == "validating", "not listed yet: not cancelled"
        api.lag.listing = 0
        await openai_provider.poll(h2.job)  # listed now: the copy is cancelled at once
        assert api.batches[first].status == "cancelling"
        assert api.batches[h2.job.state["provider_batch_id"]].status == "validating"
        assert "duplicate_watch_until" not in h2.job.state
    finally:
        await api.stop()


async def test_an_interrupted_upload_is_reused_and_copies_deleted(api, openai_provider, tmp_path):
    lines = [chat_line(i) for i in range(3)]
    d = openai_dep(api)
    h = make_job(tmp_path, lines, d)
    await openai_provider.submit(h.job)
    whole = h.job.state["input_file_id"]
    api._add_file("batch_gw1.jsonl", "batch", b"{}\n")  # a cut copy, by name only
    h2 = make_job(tmp_path, lines, d, state={"upload_started": True})  # crashed before saving the id
    await openai_provider.submit(h2.job)
    assert h2.job.state["input_file_id"] == whole
    assert api.calls_to("POST", "/v1/files") == 1
    assert [f.id for f in api.files.values() if f.purpose == "batch"] == [whole]


async def test_unknown_job_is_provider_job_not_found(api, openai_provider, tmp_path):
    h = make_job(tmp_path, [chat_line(0)], openai_dep(api),
                 state={"input_file_id": "file-x", "provider_batch_id": "batch_doesnotexist"})
    for call in (openai_provider.poll(h.job), openai_provider.cancel(h.job)):
        with pytest.raises(ProviderError) as ei:
            await call
        assert ei.value.code == "provider_job_not_found" and not ei.value.retryable
        assert "404" in ei.value.message and h.job.batch_id in ei.value.message
        assert "batch_doesnotexist" not in ei.value.message  # callers see our ids only
    with pytest.raises(ProviderError) as ei:
        await collect(openai_provider, h.job)
    assert ei.value.code == "provider_job_not_found"
    assert api.calls_to("GET", "/batches/") == 2  # 404 is not retried


async def test_poll_before_submit(api, openai_provider, tmp_path):
    h = make_job(tmp_path, [chat_line(0)], openai_dep(api))
    with pytest.raises(ProviderError) as ei:
        await openai_provider.poll(h.job)
    assert ei.value.code == "provider_job_not_found" and not ei.value.retryable


async def test_network_error_retried_then_retryable(api, openai_provider, tmp_path):
    h = make_job(tmp_path, [chat_line(0)], openai_dep(api))
    await openai_provider.submit(h.job)
    await api.stop()
    with pytest.raises(ProviderError) as ei:
        await openai_provider.poll(h.job)
    assert ei.value.retryable and ei.value.code == "provider_unreachable"
    assert "3 attempts" in ei.value.message


async def test_network_error_recovers_when_server_returns(api, openai_provider, tmp_path):
    h = make_job(tmp_path, [chat_line(0)], openai_dep(api, max_retries=6, backoff_base=0.1))
    await openai_provider.submit(h.job)
    await api.stop()

    async def restart():
        await asyncio.sleep(0.3)
        await api.start(port=api.port)

    task = asyncio.create_task(restart())
    r = await openai_provider.poll(h.job)
    await task
    assert r.status is JobStatus.IN_PROGRESS


async def test_timeout_is_applied(api, openai_provider, tmp_path):
    h = make_job(tmp_path, [chat_line(0)], openai_dep(api, timeout=0.3, max_retries=1))
    await openai_provider.submit(h.job)
    api.inject(200, 2, path_contains="/batches/", hang=True)
    t0 = time.monotonic()
    with pytest.raises(ProviderError) as ei:
        await openai_provider.poll(h.job)
    assert time.monotonic() - t0 < 3
    assert ei.value.retryable and ei.value.code == "provider_unreachable"
    assert "Timeout" in ei.value.message


async def test_missing_error_file_is_tolerated_missing_output_is_not(api, openai_provider,
                                                                     tmp_path):
    lines = [chat_line(0), chat_line(1, "FAIL")]
    h = make_job(tmp_path, lines, openai_dep(api))
    await openai_provider.submit(h.job)
    await poll_until_end(openai_provider, h.job)
    b = api.batches[h.job.state["provider_batch_id"]]
    del api.files[b.error_file_id]
    out, err = await collect(openai_provider, h.job)
    assert [o["custom_id"] for o in out] == ["req-0"] and err == []
    del api.files[b.output_file_id]
    with pytest.raises(ProviderError) as ei:
        await collect(openai_provider, h.job)
    assert ei.value.code == "provider_result_missing" and not ei.value.retryable


# ------------------------------------------------------------------ rewrite, Azure

async def test_model_rewrite_observed_by_the_fake(api, openai_provider, tmp_path):
    h = make_job(tmp_path, [chat_line(i, model="gpt-4o-mini") for i in range(4)], openai_dep(api))
    await openai_provider.submit(h.job)
    stats = api.uploads[h.job.state["input_file_id"]]
    assert stats.models == {"gpt-4o-mini-2024-07-18"}
    assert stats.urls == {"/v1/chat/completions"}
    assert stats.lines == 4
    assert api.files[h.job.state["input_file_id"]].filename == "batch_gw1.jsonl"
    assert api.files[h.job.state["input_file_id"]].purpose == "batch"


HOSTILE_MODEL_LINES = [  # where body.model is not simply the first "model" in the line
    b'{"custom_id": "r0", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "a", '
    b'"messages": [{"role": "user", "content": "x"}], "model": "gpt-4o-mini"}}',  # twice: json reads the last
    b'{"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {"metadata": {"model": "x"}, '
    b'"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}}',  # a nested one first
    b'{"custom_id": "r2", "method": "POST", "url": "/v1/chat/completions", "body": {"mod\\u0065l": '
    b'"gpt-4o-mini", "messages": [{"role": "user", "content": "caf\\u00e9"}]}}',  # the key escaped
    b'{"custom_id": "r3", "method": "POST", "url": "/v1/chat/completions", "body": {"x\\"model": "v", '
    b'"messages": [{"role": "user", "content": "say \\"model\\": \\"y\\""}], "model" :\t"gpt-4o-mini"}}',
    b'{"body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}, "custom_id": "r4", '
    b'"method": "POST", "url": "/v1/chat/completions"}',  # body before url
]


@pytest.mark.parametrize("azure", [False, True])
async def test_every_line_reaches_the_provider_with_the_deployments_model(api, azure_api, tmp_path, azure):
    """The rewrite splices the model into each line's bytes: whatever the line's shape, the provider
    reads the line as sent with only body.model (and Azure's url) changed."""
    fake, provider = (azure_api, AzureBatchProvider()) if azure else (api, OpenAIBatchProvider())
    dep = azure_dep(azure_api) if azure else openai_dep(api)
    h = make_job(tmp_path, HOSTILE_MODEL_LINES, dep)
    try:
        await provider.submit(h.job)
    finally:
        await provider.close()
    received = fake.files[h.job.state["input_file_id"]].content.rstrip(b"\n").split(b"\n")
    assert fake.uploads[h.job.state["input_file_id"]].models == {dep.model}
    for raw, sent in zip(HOSTILE_MODEL_LINES, received, strict=True):
        expected = json.loads(raw)
        expected["body"]["model"] = dep.model
        if azure:
            expected["url"] = "/chat/completions"
        assert json.loads(sent) == expected


async def test_azure_full_lifecycle_with_quirks(azure_api, azure_provider, tmp_path):
    azure_api.capitalized_status = True
    azure_api.iso_timestamps = True
    azure_api.null_request_counts = True
    azure_api.empty_error_file = True
    h = make_job(tmp_path, [chat_line(i, model="gpt-4o") for i in range(3)], azure_dep(azure_api))
    await azure_provider.submit(h.job)
    stats = azure_api.uploads[h.job.state["input_file_id"]]
    assert stats.models == {"my-gpt4o-batch"}  # the deployment name
    assert stats.urls == {"/chat/completions"}  # no /v1 on Azure
    assert azure_api.created_batch_requests[0]["endpoint"] == "/chat/completions"
    for method, path_qs, headers in azure_api.calls:
        assert "api-version=2024-10-21" in path_qs and path_qs.startswith("/openai/")
        assert headers.get("api-key") == AZURE_KEY and "Authorization" not in headers

    seen = await poll_until_end(azure_provider, h.job)
    assert [r.status for r in seen] == [JobStatus.IN_PROGRESS, JobStatus.FINALIZING,
                                        JobStatus.COMPLETED]
    assert all(r.request_counts is None for r in seen)  # null counts: "unknown, keep what we have"
    b = azure_api.batches[h.job.state["provider_batch_id"]]
    assert b.error_file_id and azure_api.files[b.error_file_id].content == b""
    out, err = await collect(azure_provider, h.job)
    assert len(out) == 3 and err == []
    for o in out:
        ChatCompletion.model_validate(o["response"]["body"])


async def test_azure_v1_url_rejected_by_fake_without_rewrite(azure_api, tmp_path):
    """The fake is strict about Azure's url form, so the rewrite test above means something."""
    async with httpx.AsyncClient(base_url=azure_api.base_url,
                                 headers={"api-key": AZURE_KEY}) as c:
        content = json.dumps(chat_line(0, model="my-gpt4o-batch")).encode()
        f = (await c.post("/openai/files", params={"api-version": "2024-10-21"},
                          data={"purpose": "batch"},
                          files={"file": ("x.jsonl", content)})).json()
        r = await c.post("/openai/batches", params={"api-version": "2024-10-21"},
                         json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                               "completion_window": "24h"})
        assert r.status_code == 400
        b = (await c.post("/openai/batches", params={"api-version": "2024-10-21"},
                          json={"input_file_id": f["id"], "endpoint": "/chat/completions",
                                "completion_window": "24h"})).json()
        b = (await c.get(f"/openai/batches/{b['id']}", params={"api-version": "2024-10-21"})).json()
        assert b["status"] == "failed" and b["errors"]["data"][0]["code"] == "url_mismatch"
        r = await c.get(f"/openai/batches/{b['id']}")
        assert r.status_code == 404  # api-version is required


async def test_azure_wrong_key_and_ad_token(azure_api, azure_provider, tmp_path):
    h = make_job(tmp_path, [chat_line(0)], azure_dep(azure_api, api_key="nope"))
    with pytest.raises(ProviderError) as ei:
        await azure_provider.submit(h.job)
    assert ei.value.code == "provider_auth"
    dep = azure_dep(azure_api, api_key=None, azure_ad_token="tok", api_version="2024-10-01-preview")
    h = make_job(tmp_path, [chat_line(0)], dep)
    with pytest.raises(ProviderError):
        await azure_provider.submit(h.job)
    _, path_qs, headers = azure_api.calls[-1]
    assert headers["Authorization"] == "Bearer tok" and "api-version=2024-10-01-preview" in path_qs


async def test_streamed_upload_of_20mb_does_not_hold_the_file(tmp_path, openai_provider):
    api = FakeBatchAPI(api_key=OPENAI_KEY, store_uploads=False)
    await api.start()
    try:
        path = tmp_path / "big.jsonl"
        filler = "x" * 2000
        n = 0
        with open(path, "wb") as f:
            while f.tell() < 20 * 1024 * 1024:
                f.write(json.dumps(chat_line(n, f"{n} {filler}")).encode() + b"\n")
                n += 1
        size = path.stat().st_size
        h = job_for_file(tmp_path, path, n, openai_dep(api), "/v1/chat/completions", "batch_big")
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            await openai_provider.submit(h.job)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        stats = api.uploads[h.job.state["input_file_id"]]
        assert stats.lines == n and stats.models == {"gpt-4o-mini-2024-07-18"}
        assert stats.bytes > size * 0.95  # re-serialised compactly, longer model name
        assert stats.chunked  # streamed, not a buffered body
        # adapter + in-process fake together stay far below the file size
        print(f"upload of {size / 1e6:.1f} MB: tracemalloc peak {peak / 1e6:.2f} MB")
        assert peak < 8 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB upload"
    finally:
        await api.stop()


# ------------------------------------------------------------------ check, poll interval

def test_check_endpoints_and_config_not_sizes():
    dep = Deployment(id="d", model_name="m", provider="openai", model="m", params={"api_key": "k"})
    op, az = OpenAIBatchProvider(), AzureBatchProvider()
    for ep in ("/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/responses",
               "/v1/moderations"):
        op.check(ep, dep, 10)
    with pytest.raises(UnsupportedRequest) as ei:
        op.check("/v1/images/generations", dep, 1)
    assert ei.value.reason == "UNSUPPORTED_ENDPOINT" and not ei.value.precondition
    # Sizes are not refused (a batch over the limits runs as several jobs): limits() says them.
    op.check("/v1/chat/completions", dep, 50_001)
    assert op.limits("/v1/chat/completions", dep) == JobLimits(50_000, 200_000_000, 1)
    with pytest.raises(UnsupportedRequest) as ei:
        op.check("/v1/chat/completions", Deployment("d", "m", "openai", "m", {}), 1)
    assert ei.value.reason == "PROVIDER_NOT_CONFIGURED" and ei.value.precondition

    azd = Deployment(id="a", model_name="m", provider="azure", model="dep",
                     params={"api_key": "k", "api_base": "https://res.openai.azure.com"})
    az.check("/v1/chat/completions", azd, 100_001)
    az.check("/v1/embeddings", azd, 1)
    assert az.limits("/v1/chat/completions", azd) == JobLimits(100_000, 200_000_000, 1)
    with pytest.raises(UnsupportedRequest):
        az.check("/v1/moderations", azd, 1)
    with pytest.raises(UnsupportedRequest) as ei:
        az.check("/v1/chat/completions", Deployment("a", "m", "azure", "d", {"api_key": "k"}), 1)
    assert ei.value.precondition and "api_base" in ei.value.message


def test_base_urls():
    op, az = OpenAIBatchProvider(), AzureBatchProvider()
    mk = lambda params: Deployment("d", "m", "x", "m", params)  # noqa: E731
    assert op._conn(mk({"api_key": "k"})).base_url == "https://api.openai.com/v1"
    assert op._conn(mk({"api_key": "k", "api_base": "https://proxy.example/"})).base_url == \
        "https://proxy.example/v1"
    assert op._conn(mk({"api_key": "k", "api_base": "https://proxy.example/openai/v1/"})).base_url \
        == "https://proxy.example/openai/v1"
    c = az._conn(mk({"api_key": "k", "api_base": "https://res.openai.azure.com/"}))
    assert c.base_url == "https://res.openai.azure.com/openai"
    assert c.query == {"api-version": "2024-10-21"} and c.headers == {"api-key": "k"}
    assert az._conn(mk({"api_key": "k", "api_base": "https://r.openai.azure.com/openai"})).base_url \
        == "https://r.openai.azure.com/openai"
    assert OpenAIBatchProvider.poll_interval == 5.0
    assert OpenAIBatchProvider(poll_interval=0.1).poll_interval == 0.1
    assert (OpenAIBatchProvider.name, AzureBatchProvider.name) == ("openai", "azure")


async def test_wait_for_change_uses_the_deployment_poll_interval(api, openai_provider, tmp_path):
    h = make_job(tmp_path, [chat_line(0)], openai_dep(api, poll_interval=0.05))
    t0 = time.monotonic()
    await openai_provider.wait_for_change(h.job, openai_provider.poll_interval)
    assert time.monotonic() - t0 < 1.0


# ------------------------------------------------------------------ the fake batch API itself

def _validate_all_json(calls_json: list) -> None:
    for kind, obj in calls_json:
        {"batch": Batch, "file": FileObject, "deleted": FileDeleted}[kind].model_validate(obj)


async def test_fake_batch_api_answers_parse_with_openai_types(api, tmp_path):
    seen = []
    api.lines_per_tick = 1
    headers = {"Authorization": f"Bearer {OPENAI_KEY}"}
    async with httpx.AsyncClient(base_url=api.base_url, headers=headers) as c:
        async def upload(lines):
            body = b"".join(json.dumps(x).encode() + b"\n" if isinstance(x, dict) else x + b"\n"
                            for x in lines)
            r = await c.post("/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", body)})
            assert r.status_code == 200
            seen.append(("file", r.json()))
            return r.json()["id"]

        async def create(fid):
            r = await c.post("/batches", json={"input_file_id": fid,
                                               "endpoint": "/v1/chat/completions",
                                               "completion_window": "24h",
                                               "metadata": {"k": "v"}})
            assert r.status_code == 200
            seen.append(("batch", r.json()))
            return r.json()["id"]

        async def get(bid):
            r = await c.get(f"/batches/{bid}")
            seen.append(("batch", r.json()))
            return r.json()

        ok = await create(await upload([chat_line(i, "FAIL" if i == 1 else None)
                                        for i in range(3)]))
        while (b := await get(ok))["status"] not in ("completed",):
            pass
        assert b["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
        assert b["usage"]["total_tokens"] > 0 and b["model"] == "gpt-4o-mini"
        for fid in (b["output_file_id"], b["error_file_id"]):
            seen.append(("file", (await c.get(f"/files/{fid}")).json()))
        bad = await create(await upload([b"nope"]))
        assert (b := await get(bad))["status"] == "failed" and b["errors"]["data"][0]["line"] == 1
        cancelled = await create(await upload([chat_line(i) for i in range(3)]))
        await get(cancelled)
        r = await c.post(f"/batches/{cancelled}/cancel")
        seen.append(("batch", r.json()))
        assert r.json()["status"] == "cancelling"
        assert (await get(cancelled))["status"] == "cancelled"
        expired = await create(await upload([chat_line(i) for i in range(3)]))
        await get(expired)
        api.expire(expired)
        assert (await get(expired))["status"] == "expired"
        lst = (await c.get("/batches", params={"limit": 2})).json()
        assert lst["object"] == "list" and lst["has_more"] and len(lst["data"]) == 2
        seen.extend(("batch", x) for x in lst["data"])
        seen.extend(("file", x) for x in (await c.get("/files")).json()["data"])
        d = await c.delete(f"/files/{b['input_file_id']}")
        seen.append(("deleted", d.json()))
        assert (await c.get(f"/files/{b['input_file_id']}")).status_code == 404
        assert (await c.get("/batches/batch_nope")).status_code == 404
        assert (await c.post("/batches/batch_nope/cancel")).status_code == 404
        r = await c.get("/batches", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    _validate_all_json(seen)
    assert len(seen) > 20


async def test_fake_batch_api_time_clock(tmp_path):
    api = FakeBatchAPI(api_key=OPENAI_KEY, clock="time", step_ms=30)
    await api.start()
    try:
        client = openai.AsyncOpenAI(base_url=api.base_url, api_key=OPENAI_KEY, max_retries=0)
        f = await client.files.create(file=("in.jsonl", json.dumps(chat_line(0)).encode()),
                                      purpose="batch")
        b = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
        assert b.status == "validating"
        await asyncio.sleep(0.2)
        b = await client.batches.retrieve(b.id)
        assert b.status == "completed" and b.completed_at is not None
        await client.close()
    finally:
        await api.stop()


async def test_official_openai_client_drives_the_fake(api):
    client = openai.AsyncOpenAI(base_url=api.base_url, api_key=OPENAI_KEY, max_retries=0)
    content = b"".join(json.dumps(chat_line(i)).encode() + b"\n" for i in range(3))
    f = await client.files.create(file=("input.jsonl", content), purpose="batch")
    assert isinstance(f, FileObject) and f.bytes == len(content) and f.purpose == "batch"
    assert (await client.files.retrieve(f.id)).id == f.id
    b = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                    completion_window="24h", metadata={"who": "test"})
    assert b.status == "validating" and b.metadata == {"who": "test"}
    while b.status not in ("completed", "failed"):
        b = await client.batches.retrieve(b.id)
    assert b.status == "completed" and b.request_counts.completed == 3
    text = (await client.files.content(b.output_file_id)).text
    for line in text.splitlines():
        o = json.loads(line)
        ChatCompletion.model_validate(o["response"]["body"])
    ids = []
    for _ in range(4):
        x = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
        ids.append(x.id)
    listed = [x.id async for x in client.batches.list(limit=2)]  # pages through after=
    assert len(listed) == 5 and set(ids) | {b.id} == set(listed)
    c = await client.batches.cancel(ids[0])
    assert c.status == "cancelling"
    assert (await client.batches.retrieve(ids[0])).status == "cancelled"
    d = await client.files.delete(f.id)
    assert isinstance(d, FileDeleted) and d.deleted
    with pytest.raises(openai.NotFoundError):
        await client.batches.retrieve("batch_missing")
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(f.id)
    with pytest.raises(openai.BadRequestError):
        await client.batches.create(input_file_id="file-x", endpoint="/v1/nope",
                                    completion_window="24h")
    await client.close()
    bad = openai.AsyncOpenAI(base_url=api.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.batches.list()
    await bad.close()
    api.inject(429, 1, retry_after=0)
    retrying = openai.AsyncOpenAI(base_url=api.base_url, api_key=OPENAI_KEY, max_retries=1)
    assert (await retrying.batches.retrieve(b.id)).id == b.id  # the SDK retried the 429
    await retrying.close()


async def test_official_azure_client_drives_the_azure_fake(azure_api):
    client = openai.AsyncAzureOpenAI(azure_endpoint=azure_api.base_url, api_key=AZURE_KEY,
                                     api_version="2024-10-21", max_retries=0)
    line = chat_line(0, model="my-gpt4o-batch", url="/chat/completions")
    f = await client.files.create(file=("in.jsonl", json.dumps(line).encode()), purpose="batch")
    b = await client.batches.create(input_file_id=f.id, endpoint="/chat/completions",
                                    completion_window="24h")
    while b.status not in ("completed", "failed"):
        b = await client.batches.retrieve(b.id)
    assert b.status == "completed", b.errors
    out = (await client.files.content(b.output_file_id)).text
    assert json.loads(out)["response"]["body"]["model"] == "my-gpt4o-batch"
    await client.close()
    assert all("api-version=2024-10-21" in p for _, p, _ in azure_api.calls)


# ------------------------------------------------------------------ the fake upstream


async def test_fake_upstream_bodies_parse_with_openai_types(upstream):
    cases = [
        ("/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
         ChatCompletion),
        ("/embeddings", {"model": "e", "input": ["a", "b"]}, CreateEmbeddingResponse),
        ("/completions", {"model": "c", "prompt": "once upon"}, Completion),
        ("/responses", {"model": "r", "input": "hello"}, Response),
        ("/responses", {"model": "r", "input": [{"role": "user", "content": "hello"}]}, Response),
        ("/moderations", {"input": "some violence"}, ModerationCreateResponse),
    ]
    async with httpx.AsyncClient(base_url=upstream.base_url) as c:
        for path, body, typ in cases:
            r = await c.post(path, json=body)
            assert r.status_code == 200, (path, r.text)
            obj = typ.model_validate(r.json())
            if hasattr(obj, "usage") and typ is not ModerationCreateResponse:
                assert obj.usage is not None and obj.usage.total_tokens > 0
        emb = CreateEmbeddingResponse.model_validate(
            (await c.post("/embeddings", json={"model": "e", "input": "a", "dimensions": 4})).json())
        assert len(emb.data[0].embedding) == 4
    assert upstream.by_path["/v1/chat/completions"] == 1

    client = openai.AsyncOpenAI(base_url=upstream.base_url, api_key="x", max_retries=0)
    cc = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "yo"}])
    assert cc.choices[0].message.content == "echo: yo" and cc.usage.total_tokens > 0
    resp = await client.responses.create(model="m", input="yo")
    assert resp.output_text == "echo: yo"
    mod = await client.moderations.create(input="fine")
    assert mod.results[0].flagged is False
    emb = await client.embeddings.create(model="e", input="yo")
    assert len(emb.data[0].embedding) == 8
    await client.close()


async def test_fake_upstream_markers_and_counts(upstream):
    async def chat(c, text):
        return await c.post("/chat/completions",
                            json={"model": "m", "messages": [{"role": "user", "content": text}]})

    async with httpx.AsyncClient(base_url=upstream.base_url, timeout=5) as c:
        r = await chat(c, "a FAIL:429 b")
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        r1, r2 = await chat(c, "x FAIL:429-once"), await chat(c, "x FAIL:429-once")
        assert (r1.status_code, r2.status_code) == (429, 200)
        assert upstream.count("x FAIL:429-once") == 2
        assert (await chat(c, "FAIL:500")).status_code == 500
        r = await chat(c, "FAIL:400")
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = await chat(c, "FAIL:malformed")
        assert r.status_code == 200
        with pytest.raises(ValueError):
            json.loads(r.content)
        with pytest.raises(httpx.ReadTimeout):
            await c.post("/chat/completions", timeout=0.2,
                         json={"model": "m", "messages": [{"role": "user", "content": "FAIL:hang"}]})
        t0 = time.monotonic()
        assert (await chat(c, "SLOW:150 please")).status_code == 200
        assert time.monotonic() - t0 >= 0.15
        await chat(c, "only once")
        assert upstream.count("only once") == 1 and upstream.count("never") == 0

        upstream.fail_next("500", 2)
        assert [(await chat(c, "n")).status_code for _ in range(3)] == [500, 500, 200]
        upstream.fail_mode, upstream.retry_after_s = "429", 2
        r = await chat(c, "z")
        assert r.status_code == 429 and r.headers["Retry-After"] == "2"
        upstream.fail_mode = None
        upstream.latency_ms = 100
        t0 = time.monotonic()
        await chat(c, "z")
        assert time.monotonic() - t0 >= 0.1
        upstream.latency_ms = 0
        upstream.api_key = "k"
        assert (await chat(c, "z")).status_code == 401
        upstream.api_key = None
        stats = (await c.get(upstream.base_url.replace("/v1", "") + "/_fake/stats")).json()
        assert stats["counts"]["only once"] == 1 and stats["requests_total"] == upstream.requests_total
