"""The Anthropic Message Batches adapter driven directly against the fake (no batchgate server),
and the fake itself checked against the official `anthropic` package: its raw JSON parses with
the SDK types, and the SDK client works against it."""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc
from pathlib import Path

import anthropic
import httpx
import pytest
from anthropic.types.messages import DeletedMessageBatch, MessageBatch, MessageBatchIndividualResponse
from anthropic.types.shared import ErrorResponse
from openai.types.chat import ChatCompletion

from batchgate_server.domain.shards import JobLimits
from batchgate_server.providers.anthropic import provider as provider_module
from batchgate_server.providers.anthropic.provider import (
    BODY_FILE,
    ERRORS_FILE,
    IDS_FILE,
    AnthropicBatchProvider,
)
from batchgate_server.providers.base import (
    Deployment,
    JobStatus,
    ProviderError,
    ProviderJob,
    ResultKind,
    UnsupportedRequest,
)
from tests.fakes.anthropic_batches import FakeAnthropicBatches

KEY = "test-key"
MODEL = "claude-3-5-haiku-20241022"
HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}


# ------------------------------------------------------------------ helpers

def chat_line(i: int, text: str | None = None, custom_id: str | None = None, **body) -> dict:
    b = {"model": "claude-batch", "max_tokens": 64,
         "messages": [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": text or f"question number {i}"}]}
    b.update(body)
    return {"custom_id": custom_id if custom_id is not None else f"req-{i}", "method": "POST",
            "url": "/v1/chat/completions", "body": b}


class Job:
    def __init__(self, job: ProviderJob) -> None:
        self.job = job
        self.saves: list[dict] = []


def make_job(tmp_path: Path, lines: list[dict], dep: Deployment, *, batch_id: str = "batch_a1",
             state: dict | None = None) -> Job:
    path = tmp_path / f"{batch_id}.jsonl"
    with open(path, "wb") as f:
        for line in lines:
            f.write(json.dumps(line).encode() + b"\n")

    async def open_input():
        with open(path, "rb") as f:
            for raw in f:
                yield raw.rstrip(b"\n")

    holder: list[Job] = []

    async def save_state() -> None:
        holder[0].saves.append(json.loads(json.dumps(holder[0].job.state)))

    now = time.time()
    h = Job(ProviderJob(batch_id=batch_id, endpoint="/v1/chat/completions", deployment=dep,
                        line_count=len(lines), created_at=now, expires_at=now + 86400,
                        state=dict(state or {}), open_input=open_input, save_state=save_state,
                        workdir=tmp_path / f"work-{batch_id}"))
    holder.append(h)
    return h


def dep(api: FakeAnthropicBatches, **params) -> Deployment:
    p = {"api_key": KEY, "api_base": api.base_url, "timeout": 5, "max_retries": 2, "backoff_base": 0.01}
    p.update(params)
    return Deployment(id="dep-anthropic", model_name="claude-batch", provider="anthropic", model=MODEL,
                      params=p)


async def poll_until_end(provider, job: ProviderJob, api: FakeAnthropicBatches | None = None,
                         limit: int = 200) -> list:
    seen = []
    for _ in range(limit):
        r = await provider.poll(job)
        seen.append(r)
        if r.status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.EXPIRED, JobStatus.CANCELLED):
            return seen
        if api is not None and api.clock == "manual":
            api.advance(job.state["msgbatch_id"])
        else:
            await asyncio.sleep(0.01)
    raise AssertionError(f"never ended: {[r.status for r in seen]}")


async def collect(provider, job: ProviderJob) -> tuple[list[dict], list[dict]]:
    out, err = [], []
    async for r in provider.results(job):
        assert isinstance(r.data, bytes) and not r.data.endswith(b"\n")
        (out if r.kind is ResultKind.OUTPUT else err).append(json.loads(r.data))
    return out, err


@pytest.fixture
async def api():
    fake = FakeAnthropicBatches(api_key=KEY, tick_ms=10)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def manual_api():
    fake = FakeAnthropicBatches(api_key=KEY, clock="manual", requests_per_tick=2)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def provider():
    p = AnthropicBatchProvider()
    yield p
    await p.close()


def params(text: str, **kw) -> dict:
    p = {"model": MODEL, "max_tokens": 32, "messages": [{"role": "user", "content": text}]}
    p.update(kw)
    return p


# ------------------------------------------------------------------ the fake vs the official SDK

async def test_fake_answers_parse_with_the_anthropic_types(manual_api):
    api = manual_api
    async with httpx.AsyncClient(base_url=api.base_url, headers=HEADERS) as http:
        reqs = [{"custom_id": "ok", "params": params("hello there", system="be kind")},
                {"custom_id": "bad", "params": params("ANTHROPIC:errored please")},
                {"custom_id": "busy", "params": params("ANTHROPIC:errored:overloaded_error")},
                {"custom_id": "late", "params": params("ANTHROPIC:expired")},
                {"custom_id": "nomax", "params": {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}},
                {"custom_id": "tool", "params": params("ANTHROPIC:tool find it", tools=[
                    {"name": "search", "input_schema": {"type": "object", "properties": {}}}])},
                {"custom_id": "short", "params": params("one two three four five", max_tokens=3)}]
        r = await http.post("/v1/messages/batches", json={"requests": reqs})
        assert r.status_code == 200
        created = MessageBatch.model_validate(r.json())
        assert created.processing_status == "in_progress" and created.request_counts.processing == 7
        assert created.results_url is None and created.ended_at is None
        assert created.id.startswith("msgbatch_")

        r = await http.get(f"/v1/messages/batches/{created.id}/results")
        assert r.status_code == 400
        ErrorResponse.model_validate(r.json())

        api.run_to_end(created.id)
        ended = MessageBatch.model_validate((await http.get(f"/v1/messages/batches/{created.id}")).json())
        assert ended.processing_status == "ended" and ended.ended_at is not None
        counts = ended.request_counts
        assert (counts.succeeded, counts.errored, counts.expired, counts.canceled, counts.processing) == \
               (3, 3, 1, 0, 0)
        assert ended.results_url == f"{api.base_url}/v1/messages/batches/{created.id}/results"

        r = await http.get(f"/v1/messages/batches/{created.id}/results")
        lines = [MessageBatchIndividualResponse.model_validate_json(ln) for ln in r.content.splitlines()]
        by_id = {ln.custom_id: ln.result for ln in lines}
        assert [ln.custom_id for ln in lines] != [q["custom_id"] for q in reqs], "results come unordered"
        assert by_id["ok"].type == "succeeded"
        msg = by_id["ok"].message
        assert msg.content[0].text == "echo: hello there" and msg.stop_reason == "end_turn"
        assert (msg.usage.input_tokens, msg.usage.output_tokens) == (4, 3)  # "be kind hello there"
        assert by_id["bad"].type == "errored" and by_id["bad"].error.error.type == "invalid_request_error"
        assert by_id["busy"].error.error.type == "overloaded_error"
        assert by_id["late"].type == "expired"
        assert by_id["nomax"].type == "errored" and "max_tokens" in by_id["nomax"].error.error.message
        assert by_id["tool"].message.content[0].type == "tool_use"
        assert by_id["tool"].message.stop_reason == "tool_use"
        assert by_id["short"].message.stop_reason == "max_tokens"
        assert by_id["short"].message.usage.output_tokens == 3

        r = await http.delete(f"/v1/messages/batches/{created.id}")
        DeletedMessageBatch.model_validate(r.json())
        r = await http.get(f"/v1/messages/batches/{created.id}")
        assert r.status_code == 404
        assert ErrorResponse.model_validate(r.json()).error.type == "not_found_error"


async def test_official_sdk_client_runs_against_the_fake(manual_api):
    api = manual_api
    client = anthropic.AsyncAnthropic(api_key=KEY, base_url=api.base_url, max_retries=0)
    try:
        b = await client.messages.batches.create(requests=[
            {"custom_id": f"r{i}", "params": params(f"number {i}")} for i in range(5)])
        assert isinstance(b, MessageBatch)
        api.advance(b.id)  # 2 of 5 processed
        canceling = await client.messages.batches.cancel(b.id)
        assert canceling.processing_status == "canceling" and canceling.cancel_initiated_at is not None
        api.advance(b.id)
        ended = await client.messages.batches.retrieve(b.id)
        assert ended.processing_status == "ended"
        assert (ended.request_counts.succeeded, ended.request_counts.canceled) == (2, 3)
        page = await client.messages.batches.list(limit=10)
        assert [x.id for x in page.data] == [b.id]
        results = [r async for r in await client.messages.batches.results(b.id)]
        assert sorted(r.custom_id for r in results) == [f"r{i}" for i in range(5)]
        assert sorted(r.result.type for r in results) == ["canceled"] * 3 + ["succeeded"] * 2
        with pytest.raises(anthropic.BadRequestError):  # already ended
            await client.messages.batches.cancel(b.id)
    finally:
        await client.close()


@pytest.mark.parametrize("headers,status,etype", [
    ({"x-api-key": "wrong", "anthropic-version": "2023-06-01"}, 401, "authentication_error"),
    ({"anthropic-version": "2023-06-01"}, 401, "authentication_error"),
    ({"x-api-key": KEY}, 400, "invalid_request_error"),
    ({"x-api-key": KEY, "anthropic-version": "1999-01-01"}, 400, "invalid_request_error"),
])
async def test_fake_checks_key_and_version(api, headers, status, etype):
    async with httpx.AsyncClient(base_url=api.base_url, headers=headers) as http:
        r = await http.get("/v1/messages/batches")
    assert r.status_code == status
    assert ErrorResponse.model_validate(r.json()).error.type == etype


@pytest.mark.parametrize("body,needle", [
    ({"requests": []}, "at least 1"),
    ({}, "requests"),
    ({"requests": [{"custom_id": "has space", "params": {}}]}, "pattern"),
    ({"requests": [{"custom_id": "x" * 65, "params": {}}]}, "pattern"),
    ({"requests": [{"custom_id": "a", "params": {}}, {"custom_id": "a", "params": {}}]}, "Duplicate"),
    ({"requests": [{"custom_id": "a"}]}, "custom_id' and 'params'"),
    ({"requests": [{"custom_id": "a", "params": []}]}, "dictionary"),
])
async def test_fake_refuses_a_bad_create_as_a_whole(api, body, needle):
    async with httpx.AsyncClient(base_url=api.base_url, headers=HEADERS) as http:
        r = await http.post("/v1/messages/batches", json=body)
    assert r.status_code == 400
    err = ErrorResponse.model_validate(r.json())
    assert err.error.type == "invalid_request_error" and needle in err.error.message
    assert api.batches == {}


# ------------------------------------------------------------------ check()

async def test_request_size_sums_to_the_create_body_the_fake_received(api, provider, tmp_path):
    """request_size is each request as it goes in the create body (translated: system lifted out,
    model and max_tokens set), with its comma; 0 for a line that cannot be sent (n=2)."""
    d = dep(api, default_max_tokens=1000)
    lines = [chat_line(0), chat_line(1, n=2), chat_line(2, text="caf\u00e9 \U0001f680", max_tokens=None),
             chat_line(3, tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])]
    sizes = [provider.request_size("/v1/chat/completions", d, json.dumps(ln).encode()) for ln in lines]
    assert sizes[1] == 0
    h = make_job(tmp_path, lines, d)
    await provider.submit(h.job)
    received = api.created[-1]
    assert received["requests"] == 3
    # {"requests":[r1,r2,r3]}: the envelope, the requests and a comma between two.
    assert received["bytes"] == len(b'{"requests":[]}') + sum(sizes) - 1
    assert provider.limits("/v1/chat/completions", d).max_bytes == 256_000_000 - len(b'{"requests":[]}')


async def test_request_size_of_a_remapped_custom_id_is_never_below_what_is_sent(api, provider, tmp_path):
    d = dep(api)
    lines = [chat_line(0, custom_id="Req 1/\u00fc"), chat_line(1, custom_id="x" * 100), chat_line(2)]
    sizes = [provider.request_size("/v1/chat/completions", d, json.dumps(ln).encode()) for ln in lines]
    h = make_job(tmp_path, lines, d)
    await provider.submit(h.job)
    sent = api.created[-1]["bytes"] - len(b'{"requests":[]}') + 1
    # Sent as bgl_1 and bgl_2, measured with the longest id a job can give (bgl_ and nine digits).
    assert sum(sizes) == sent + 2 * (9 - 1)


def test_check_refuses_other_endpoints_not_sizes(api):
    p = AnthropicBatchProvider()
    d = dep(api)
    p.check("/v1/chat/completions", d, 100_000)
    for endpoint in ("/v1/embeddings", "/v1/responses", "/v1/completions", "/v1/moderations"):
        with pytest.raises(UnsupportedRequest) as e:
            p.check(endpoint, d, 1)
        assert e.value.reason == "UNSUPPORTED_ENDPOINT" and not e.value.precondition
        assert "/v1/chat/completions" in e.value.message and endpoint in e.value.message
    # Sizes are not refused (a batch over the limits runs as several jobs): limits() says them.
    p.check("/v1/chat/completions", d, 100_001)
    assert p.limits("/v1/chat/completions", d) == JobLimits(100_000, 256_000_000 - len(b'{"requests":[]}'), 1)
    with pytest.raises(UnsupportedRequest) as e:
        p.check("/v1/chat/completions", dep(api, api_key=""), 1)
    assert e.value.reason == "PROVIDER_NOT_CONFIGURED" and e.value.precondition


# ------------------------------------------------------------------ submit / poll / results

async def test_lifecycle_and_the_create_body(tmp_path, api, provider):
    lines = [chat_line(i) for i in range(6)]
    lines[1]["body"]["messages"][1]["content"] = "ANTHROPIC:errored nope"
    h = make_job(tmp_path, lines, dep(api))
    await provider.submit(h.job)
    st = h.job.state
    assert st["msgbatch_id"].startswith("msgbatch_") and st["requests_sent"] == 6 and st["not_sent"] == 0
    assert h.saves[0].get("create_started_at") and "msgbatch_id" not in h.saves[0], \
        "create_started_at is saved before the POST"
    assert not (h.job.workdir / BODY_FILE).exists(), "the spooled body is dropped once accepted"

    # the create call: headers, streamed from disk with a Content-Length (not held in memory)
    _, path, headers = next(c for c in api.calls if c[0] == "POST")
    assert path == "/v1/messages/batches"
    assert headers["x-api-key"] == KEY and headers["anthropic-version"] == "2023-06-01"
    assert headers["Content-Type"] == "application/json"
    stats = api.created[0]
    assert not stats["chunked"] and int(stats["content_length"]) == stats["bytes"]
    sent = api.batches[st["msgbatch_id"]].requests
    assert [cid for cid, _ in sent] == [f"req-{i}" for i in range(6)]
    assert sent[0][1] == {"model": MODEL, "max_tokens": 64, "system": "be brief",
                          "messages": [{"role": "user", "content": "question number 0"}]}

    await provider.submit(h.job)  # idempotent: no second batch
    assert api.calls_to("POST", "/v1/messages/batches") == 1

    polls = await poll_until_end(provider, h.job)
    assert polls[-1].status is JobStatus.COMPLETED
    assert polls[-1].request_counts.total == 6
    assert (polls[-1].request_counts.completed, polls[-1].request_counts.failed) == (5, 1)
    out, err = await collect(provider, h.job)
    assert sorted(o["custom_id"] for o in out) == [f"req-{i}" for i in range(6) if i != 1]
    ended_at = int(api.batches[st["msgbatch_id"]].ended_at)
    for o in out:
        body = ChatCompletion.model_validate(o["response"]["body"])
        assert body.created == ended_at and body.model == MODEL
        assert o["response"]["status_code"] == 200 and o["error"] is None
    assert err[0]["custom_id"] == "req-1" and err[0]["response"]["status_code"] == 400
    # results() is repeatable and gives the same lines
    assert await collect(provider, h.job) == (out, err)


async def test_hostile_custom_ids_are_remapped_and_restored(tmp_path, api, provider):
    ids = ["has space", "ünïcode", "x" * 65, "bgl_1", "BGL_2", "a/b", "ok-id_1", "\u2028", "{\"json\":1}"]
    h = make_job(tmp_path, [chat_line(i, custom_id=c) for i, c in enumerate(ids)], dep(api))
    await provider.submit(h.job)
    sent = [cid for cid, _ in api.batches[h.job.state["msgbatch_id"]].requests]
    assert sent == ["bgl_1", "bgl_2", "bgl_3", "bgl_4", "bgl_5", "bgl_6", "ok-id_1", "bgl_8", "bgl_9"]
    await poll_until_end(provider, h.job)
    out, err = await collect(provider, h.job)
    assert err == [] and sorted(o["custom_id"] for o in out) == sorted(ids)
    assert len({o["id"] for o in out}) == len(ids)


async def test_untranslatable_lines_are_not_sent_and_become_error_lines(tmp_path, api, provider):
    lines = [chat_line(0), chat_line(1, n=2), chat_line(2, custom_id="weird id", logprobs=True),
             chat_line(3)]
    h = make_job(tmp_path, lines, dep(api))
    await provider.submit(h.job)
    assert h.job.state["requests_sent"] == 2 and h.job.state["not_sent"] == 2
    assert api.sent_custom_ids() == ["req-0", "req-3"]
    polls = await poll_until_end(provider, h.job)
    assert polls[0].request_counts.failed == 2, "known failures show while it runs"
    out, err = await collect(provider, h.job)
    assert sorted(o["custom_id"] for o in out) == ["req-0", "req-3"]
    by_id = {e["custom_id"]: e for e in err}
    assert set(by_id) == {"req-1", "weird id"}
    assert by_id["req-1"]["response"]["status_code"] == 400
    assert by_id["req-1"]["response"]["body"]["error"]["param"] == "n"
    assert by_id["weird id"]["response"]["body"]["error"]["param"] == "logprobs"


async def test_all_lines_untranslatable_never_calls_anthropic(tmp_path, api, provider):
    h = make_job(tmp_path, [chat_line(i, n=3) for i in range(3)], dep(api))
    await provider.submit(h.job)
    assert h.job.state["nothing_sent"] and "msgbatch_id" not in h.job.state
    assert api.calls == []
    r = await provider.poll(h.job)
    assert r.status is JobStatus.COMPLETED and r.request_counts.failed == 3
    out, err = await collect(provider, h.job)
    assert out == [] and len(err) == 3
    assert api.calls == []


async def test_cancel_mid_run(tmp_path, manual_api, provider):
    api = manual_api
    h = make_job(tmp_path, [chat_line(i) for i in range(7)], dep(api))
    await provider.submit(h.job)
    bid = h.job.state["msgbatch_id"]
    api.advance(bid)  # 2 of 7 done
    assert (await provider.poll(h.job)).status is JobStatus.IN_PROGRESS
    h.job.cancel_requested.set()
    await provider.cancel(h.job)
    assert h.job.state["cancel_sent"]
    assert api.calls_to("POST", f"{bid}/cancel") == 1
    assert (await provider.poll(h.job)).status is JobStatus.CANCELLING
    api.advance(bid)
    r = await provider.poll(h.job)
    assert r.status is JobStatus.CANCELLED and (r.request_counts.completed, r.request_counts.failed) == (2, 5)
    out, err = await collect(provider, h.job)
    assert len(out) == 2 and len(err) == 5
    assert {e["error"]["code"] for e in err} == {"batch_cancelled"} and all(e["response"] is None for e in err)
    # cancelling an ended batch is refused by Anthropic: not an error for us
    await provider.cancel(h.job)


async def test_cancel_before_submit_ends_cancelled_without_calls(tmp_path, api, provider):
    h = make_job(tmp_path, [chat_line(0)], dep(api))
    h.job.cancel_requested.set()
    await provider.cancel(h.job)
    r = await provider.poll(h.job)
    assert r.status is JobStatus.CANCELLED
    assert await collect(provider, h.job) == ([], [])
    assert api.calls == []


async def test_expired_batch(tmp_path, manual_api, provider):
    api = manual_api
    h = make_job(tmp_path, [chat_line(i) for i in range(5)], dep(api))
    await provider.submit(h.job)
    api.advance(h.job.state["msgbatch_id"])  # 2 done
    api.expire(h.job.state["msgbatch_id"])
    polls = await poll_until_end(provider, h.job, api)
    assert polls[-1].status is JobStatus.EXPIRED
    out, err = await collect(provider, h.job)
    assert len(out) == 2 and [e["error"]["code"] for e in err] == ["batch_expired"] * 3


async def test_results_rebuilt_when_the_workdir_is_lost(tmp_path, api, provider):
    h = make_job(tmp_path, [chat_line(0, custom_id="a b"), chat_line(1, n=2), chat_line(2)], dep(api))
    await provider.submit(h.job)
    await poll_until_end(provider, h.job)
    first = await collect(provider, h.job)
    for name in (IDS_FILE, ERRORS_FILE):
        (h.job.workdir / name).unlink()
    assert await collect(provider, h.job) == first
    assert not (h.job.workdir / BODY_FILE).exists()


async def test_missing_result_lines_become_error_lines(tmp_path, api, provider):
    h = make_job(tmp_path, [chat_line(i) for i in range(3)], dep(api))
    await provider.submit(h.job)
    await poll_until_end(provider, h.job)
    del api.batches[h.job.state["msgbatch_id"]].results["req-1"]
    api.batches[h.job.state["msgbatch_id"]].requests.pop(1)
    out, err = await collect(provider, h.job)
    assert len(out) == 2
    assert err[0]["custom_id"] == "req-1" and err[0]["error"]["code"] == "provider_result_missing"


async def test_too_large_batch_fails_before_sending(tmp_path, api, provider, monkeypatch):
    monkeypatch.setattr(provider_module, "MAX_BODY_BYTES", 2000)
    h = make_job(tmp_path, [chat_line(i, text="many words " * 20) for i in range(20)], dep(api))
    with pytest.raises(ProviderError) as e:
        await provider.submit(h.job)
    assert e.value.code == "batch_too_large" and not e.value.retryable
    assert "256 MB" in e.value.message and "split" in e.value.message
    assert api.calls == [] and not (h.job.workdir / BODY_FILE).exists()


@pytest.mark.parametrize("first_line, where", [(1, "at input line 6 "), (41, "at input line 46 "),
                                               (None, "at the request with custom_id 'req-5' ")])
async def test_too_large_batch_names_the_line_in_the_file(tmp_path, api, provider, monkeypatch, first_line, where):
    """A shard's line is named by its place in the input file (a shard of one group starts at
    first_line), or by its custom_id when the shard's lines are not consecutive in the file."""
    monkeypatch.setattr(provider_module, "MAX_BODY_BYTES", 2000)
    h = make_job(tmp_path, [chat_line(i, text="many words " * 20) for i in range(20)], dep(api))
    h.job.first_line = first_line
    with pytest.raises(ProviderError) as e:
        await provider.submit(h.job)
    assert where in e.value.message, e.value.message


async def test_create_body_is_streamed_not_held_in_memory(tmp_path, provider):
    """~20 MB of input: translating and spooling the create body keeps memory flat."""
    big = "lorem ipsum dolor sit amet " * 400  # ~10 KB of text per request
    lines = [chat_line(i, text=f"{i} {big}") for i in range(2_000)]
    h = make_job(tmp_path, lines, Deployment(id="d", model_name="m", provider="anthropic", model=MODEL,
                                             params={"api_key": KEY}))
    del lines
    tracemalloc.start()
    try:
        prepared = await provider._prepare(h.job, write_body=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert prepared.sent == 2_000 and prepared.body_bytes > 20_000_000
    assert (h.job.workdir / BODY_FILE).stat().st_size == prepared.body_bytes
    assert peak < 2_000_000, f"peak {peak} bytes while spooling a {prepared.body_bytes}-byte body"
    body = json.loads((h.job.workdir / BODY_FILE).read_bytes())
    assert len(body["requests"]) == 2_000 and body["requests"][7]["custom_id"] == "req-7"


# ------------------------------------------------------------------ errors and retries

async def test_bad_api_key_is_provider_auth(tmp_path, api, provider):
    h = make_job(tmp_path, [chat_line(0)], dep(api, api_key="wrong-key"))
    with pytest.raises(ProviderError) as e:
        await provider.submit(h.job)
    assert e.value.code == "provider_auth" and not e.value.retryable
    assert "invalid x-api-key" in e.value.message


async def test_create_retries_429_honouring_retry_after(tmp_path, api, provider):
    api.inject(429, 1, retry_after=0.2, path_contains="/v1/messages/batches", method="POST")
    h = make_job(tmp_path, [chat_line(0)], dep(api))
    t0 = time.monotonic()
    await provider.submit(h.job)
    assert time.monotonic() - t0 >= 0.2
    assert api.calls_to("POST", "/v1/messages/batches") == 2 and len(api.batches) == 1


async def test_poll_retries_overloaded_then_gives_a_retryable_error(tmp_path, api, provider):
    h = make_job(tmp_path, [chat_line(0)], dep(api, max_retries=1))
    await provider.submit(h.job)
    api.inject(529, 1, method="GET")
    assert (await provider.poll(h.job)).status in (JobStatus.IN_PROGRESS, JobStatus.COMPLETED)
    api.inject(500, 2, method="GET")
    with pytest.raises(ProviderError) as e:
        await provider.poll(h.job)
    assert e.value.retryable and e.value.code == "provider_unavailable"


async def test_unknown_batch_is_provider_job_not_found(tmp_path, api, provider):
    h = make_job(tmp_path, [chat_line(0)], dep(api), state={"msgbatch_id": "msgbatch_gone",
                                                            "requests_sent": 1, "not_sent": 0})
    with pytest.raises(ProviderError) as e:
        await provider.poll(h.job)
    assert e.value.code == "provider_job_not_found" and not e.value.retryable
    assert "msgbatch_gone" in e.value.message


async def test_results_gone_is_provider_result_missing(tmp_path, api, provider):
    h = make_job(tmp_path, [chat_line(0)], dep(api))
    await provider.submit(h.job)
    await poll_until_end(provider, h.job)
    api.inject(404, 1, path_contains="/results")
    with pytest.raises(ProviderError) as e:
        await collect(provider, h.job)
    assert e.value.code == "provider_result_missing" and not e.value.retryable


QUICK = dict(timeout=0.3, create_lookup_patience=0.3)  # a lost create is looked for ~0.6 s


def lost(state: dict) -> dict:
    """The state a crash between Anthropic's create and our save leaves."""
    return {k: v for k, v in state.items() if k not in ("msgbatch_id", "provider_created_at")}


async def test_an_unresolved_create_that_never_arrived_is_sent_again(tmp_path, api, provider, caplog):
    h = make_job(tmp_path, [chat_line(0)], dep(api, **QUICK), state={"create_started_at": time.time()})
    await provider.submit(h.job)
    assert h.job.state["msgbatch_id"] and len(api.batches) == 1
    assert api.calls_to("GET", "/v1/messages/batches?limit=100") > 1, "looked again before creating"
    assert "creating the batch again" in caplog.text


async def test_a_lost_create_listed_late_is_adopted_not_repeated(tmp_path, provider):
    api = FakeAnthropicBatches(api_key=KEY, tick_ms=10)
    api.lag.listing = 0.5
    await api.start()
    restarted = AnthropicBatchProvider()
    try:
        d = dep(api, timeout=0.3, create_lookup_patience=1.0)
        before = make_job(tmp_path, [chat_line(i) for i in range(2)], d, batch_id="batch_before")
        await provider.submit(before.job)  # same size, created just before: not the lost one
        h = make_job(tmp_path, [chat_line(i) for i in range(2)], d)
        await provider.submit(h.job)  # ... and then the process dies before saving the id
        after = make_job(tmp_path, [chat_line(i) for i in range(2)], d, batch_id="batch_after")
        await restarted.submit(after.job)  # same size, created right after the restart
        h2 = make_job(tmp_path, [chat_line(i) for i in range(2)], d, state=lost(h.job.state))
        await restarted.submit(h2.job)  # not listed yet: looks again until it is
        assert h2.job.state["msgbatch_id"] == h.job.state["msgbatch_id"]
        assert len(api.batches) == 3
    finally:
        await restarted.close()
        await api.stop()


async def test_a_batch_ended_before_a_lost_create_answer_stops_that_message_batch(tmp_path, manual_api,
                                                                                  provider):
    api = manual_api
    h = make_job(tmp_path, [chat_line(0)], dep(api, **QUICK))
    await provider.submit(h.job)
    made = api.batches[h.job.state["msgbatch_id"]]
    restarted = AnthropicBatchProvider()  # the crash lost the create's answer
    try:
        h2 = make_job(tmp_path, [chat_line(0)], dep(api, **QUICK), state=lost(h.job.state))
        await restarted.release(h2.job)  # cancelled before a re-submit: the tracker ends it and releases it
        assert made.processing_status == "canceling"
    finally:
        await restarted.close()


async def test_a_lost_create_is_found_after_a_restart_among_same_sized_batches(tmp_path, api):
    first = AnthropicBatchProvider()
    jobs = [make_job(tmp_path, [chat_line(0)], dep(api, **QUICK), batch_id=f"batch_{k}") for k in range(3)]
    for h in jobs:
        await first.submit(h.job)
    await first.close()
    restarted = AnthropicBatchProvider()  # knows nothing of the batches created before
    try:
        h = make_job(tmp_path, [chat_line(0)], dep(api, **QUICK), batch_id="batch_1",
                     state=lost(jobs[1].job.state))
        await restarted.submit(h.job)
        assert h.job.state["msgbatch_id"] == jobs[1].job.state["msgbatch_id"]
        assert len(api.batches) == 3
    finally:
        await restarted.close()


async def test_a_create_repeated_after_the_patience_cancels_the_late_copy(tmp_path, provider):
    api = FakeAnthropicBatches(api_key=KEY, clock="manual")
    api.lag.listing = 3600  # listed far too late
    await api.start()
    try:
        d = dep(api, **QUICK)
        h = make_job(tmp_path, [chat_line(0)], d)
        await provider.submit(h.job)
        first = h.job.state["msgbatch_id"]
        restarted = AnthropicBatchProvider()
        h2 = make_job(tmp_path, [chat_line(0)], d, state=lost(h.job.state))
        await restarted.submit(h2.job)  # not listed within the patience: created again
        assert h2.job.state["msgbatch_id"] != first and h2.job.state["abandoned_create"]
        await restarted.poll(h2.job)
        assert api.batches[first].processing_status == "in_progress", "not listed yet: not cancelled"
        api.lag.listing = 0
        await restarted.poll(h2.job)  # listed now: the copy is cancelled at once
        await restarted.close()
        assert api.batches[first].processing_status == "canceling"
        assert api.batches[h2.job.state["msgbatch_id"]].processing_status == "in_progress"
        assert "abandoned_create" not in h2.job.state
    finally:
        await api.stop()


async def test_api_base_with_v1_suffix(tmp_path, api, provider):
    h = make_job(tmp_path, [chat_line(0)], dep(api, api_base=api.base_url + "/v1/"))
    await provider.submit(h.job)
    assert h.job.state["msgbatch_id"]
