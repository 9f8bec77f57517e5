"""OpenAI-format batches answered by Claude: the real server, through the generated stubs, with
the fake Anthropic Message Batches API behind deployments of provider `anthropic`."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal

import grpc
import pytest
from openai.types.chat import ChatCompletion

from batchgate.v1 import batch_pb2
from tests.conftest import error_details, jsonl, start_harness
from tests.fakes.anthropic_batches import FakeAnthropicBatches
from tests.integration.batch_helpers import (
    assert_lifecycle,
    create,
    results,
    run_batch,
    status_names,
    watch_all,
    write_config,
)

KEY = "test-key"
MODEL = "claude-3-5-haiku-20241022"
# claude-3-5-haiku Message Batches prices (50% of standard), USD per token
BATCH_INPUT_PRICE = Decimal("0.40") / 1_000_000
BATCH_OUTPUT_PRICE = Decimal("2.00") / 1_000_000


def entry(name: str, api: FakeAnthropicBatches, **params) -> dict:
    p = {"model": f"anthropic/{MODEL}", "api_key": KEY, "api_base": api.base_url, "poll_interval": 0.05,
         "max_retries": 1, "backoff_base": 0.01, "timeout": 5}
    p.update(params)
    return {"model_name": name, "litellm_params": p}


def chat(custom_id: str, text: str, model: str = "claude-batch", **body) -> dict:
    b = {"model": model, "max_tokens": 50,
         "messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": text}]}
    b.update(body)
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": b}


@pytest.fixture
async def fakes():
    timed = FakeAnthropicBatches(api_key=KEY, tick_ms=30)
    manual = FakeAnthropicBatches(api_key=KEY, clock="manual", requests_per_tick=3)
    await timed.start()
    await manual.start()
    try:
        yield timed, manual
    finally:
        await timed.stop()
        await manual.stop()


@pytest.fixture
async def h(tmp_path, fakes):
    timed, manual = fakes
    config = write_config(tmp_path / "models.yaml", [
        entry("claude-batch", timed),
        entry("claude-manual", manual),
        entry("claude-badkey", timed, api_key="not-the-key"),
        {"model_name": "claude-nokey", "litellm_params": {"model": f"anthropic/{MODEL}",
                                                          "api_base": timed.base_url}},
    ])
    harness = await start_harness(tmp_path / "data", config_file=config)
    try:
        yield harness
    finally:
        await harness.channel.close()
        await harness.server.stop(grace=0)


def usage_cost(outputs: list[dict]) -> tuple[int, int, Decimal]:
    prompt = sum(o["response"]["body"]["usage"]["prompt_tokens"] for o in outputs)
    completion = sum(o["response"]["body"]["usage"]["completion_tokens"] for o in outputs)
    return prompt, completion, prompt * BATCH_INPUT_PRICE + completion * BATCH_OUTPUT_PRICE


# -- the happy path ------------------------------------------------------------------------------


async def test_claude_answers_come_back_as_openai_batch_output(h, fakes):
    timed, _ = fakes
    a = h.alice
    lines = [chat(f"q-{i}", f"What is {i} plus {i}?") for i in range(12)]
    f = await h.upload(a, jsonl(lines))
    batch = await create(a, f.id, model="claude-batch", metadata={"team": "eval"})
    assert batch.provider == "anthropic" and batch.model == "claude-batch"

    states = await watch_all(a, batch.id)
    assert_lifecycle(states)
    final = states[-1]
    assert (final.request_counts.total, final.request_counts.completed, final.request_counts.failed) == (12, 12, 0)
    assert final.output_file_id and not final.error_file_id

    out, err = await results(a, final)
    assert err == [] and sorted(o["custom_id"] for o in out) == sorted(ln["custom_id"] for ln in lines)
    for o in out:
        assert set(o) == {"id", "custom_id", "response", "error"} and o["id"].startswith("batch_req_")
        assert o["response"]["status_code"] == 200 and o["error"] is None
        completion = ChatCompletion.model_validate(o["response"]["body"])
        i = o["custom_id"].removeprefix("q-")
        assert completion.choices[0].message.content == f"echo: What is {i} plus {i}?"
        assert completion.choices[0].finish_reason == "stop" and completion.model == MODEL

    # Anthropic got Messages params built from the OpenAI bodies, with the deployment's model
    sent = next(iter(timed.batches.values())).requests
    assert sent[0] == ("q-0", {"model": MODEL, "max_tokens": 50, "system": "Answer briefly.",
                               "messages": [{"role": "user", "content": "What is 0 plus 0?"}]})
    create_call = next(c for c in timed.calls if c[0] == "POST")
    assert create_call[2]["x-api-key"] == KEY and create_call[2]["anthropic-version"] == "2023-06-01"

    # usage and cost at claude-3-5-haiku batch prices, computed by hand from the output lines
    prompt, completion_tokens, expected = usage_cost(out)
    assert prompt > 0 and completion_tokens > 0
    assert final.usage.input_tokens == prompt and final.usage.output_tokens == completion_tokens
    assert final.cost.status == batch_pb2.COST_STATUS_KNOWN
    assert Decimal(final.cost.amount) == expected
    assert Decimal(final.cost.input_amount) == prompt * BATCH_INPUT_PRICE
    assert Decimal(final.cost.output_amount) == completion_tokens * BATCH_OUTPUT_PRICE


async def test_errored_and_expired_requests_become_error_lines(h):
    a = h.alice
    lines = [chat("fine", "hello"),
             chat("bad", "ANTHROPIC:errored please"),
             chat("busy", "ANTHROPIC:errored:overloaded_error"),
             chat("late", "ANTHROPIC:expired"),
             chat("cut", "one two three four five six", max_tokens=2)]
    f = await h.upload(a, jsonl(lines))
    batch = await create(a, f.id, model="claude-batch")
    final = (await watch_all(a, batch.id))[-1]
    # a request expired: Anthropic only does that when the batch hit its 24 h limit
    assert final.status == batch_pb2.BATCH_STATUS_EXPIRED
    assert (final.request_counts.completed, final.request_counts.failed) == (2, 3)
    out, err = await results(a, final)
    by_id = {ln["custom_id"]: ln for ln in out + err}
    assert sorted(o["custom_id"] for o in out) == ["cut", "fine"]
    assert ChatCompletion.model_validate(by_id["cut"]["response"]["body"]).choices[0].finish_reason == "length"
    assert by_id["bad"]["response"]["status_code"] == 400
    assert by_id["bad"]["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert by_id["busy"]["response"]["status_code"] == 529
    assert by_id["busy"]["response"]["body"]["error"]["type"] == "overloaded_error"
    assert by_id["late"]["response"] is None and by_id["late"]["error"]["code"] == "batch_expired"
    # expired batches still charge what ran
    assert final.cost.status == batch_pb2.COST_STATUS_KNOWN
    assert Decimal(final.cost.amount) == usage_cost(out)[2]


async def test_cancel_mid_run(h, fakes):
    _, manual = fakes
    a = h.alice
    f = await h.upload(a, jsonl([chat(f"c-{i}", f"question {i}") for i in range(10)]))
    batch = await create(a, f.id, model="claude-manual")
    watcher = asyncio.create_task(watch_all(a, batch.id))
    for _ in range(200):
        if manual.batches:
            break
        await asyncio.sleep(0.02)
    bid = next(iter(manual.batches))
    manual.advance(bid)  # 3 of 10 answered, the rest still queued at Anthropic
    cancelled = (await a.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch.id),
                                             metadata=a.metadata)).batch
    assert cancelled.status == batch_pb2.BATCH_STATUS_CANCELLING
    for _ in range(200):
        if manual.batches[bid].processing_status == "canceling":
            break
        await asyncio.sleep(0.02)
    assert manual.calls_to("POST", f"/v1/messages/batches/{bid}/cancel") == 1
    manual.advance(bid)  # Anthropic finishes cancelling: the 7 unprocessed requests are canceled
    states = await asyncio.wait_for(watcher, 30)
    assert status_names(states)[-2:] == ["cancelling", "cancelled"]
    final = states[-1]
    assert (final.request_counts.total, final.request_counts.completed, final.request_counts.failed) == (10, 3, 7)
    out, err = await results(a, final)
    assert sorted(o["custom_id"] for o in out) == ["c-0", "c-1", "c-2"]
    assert {e["error"]["code"] for e in err} == {"batch_cancelled"} and len(err) == 7
    assert Decimal(final.cost.amount) == usage_cost(out)[2]
    # The 3 answered, each "Answer briefly." + "question i" = 4 input words, "echo: question i" = 3 out:
    # input  12 * 0.0000004 = 0.0000048
    # output  9 * 0.000002  = 0.000018
    # total                 = 0.0000228   (the 7 canceled requests are not charged)
    assert (final.cost.input_amount, final.cost.output_amount, final.cost.amount) == (
        "0.0000048", "0.000018", "0.0000228")


async def test_cache_writes_are_priced_at_their_own_batch_rates(h, fakes):
    final, _, out, err = await run_batch(h, [
        chat("cached", "CACHE_READ:1000 CACHE_WRITE_5M:2000 CACHE_WRITE_1H:3000 hi"),
        chat("plain", "hello there")], model="claude-batch")
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED and err == []
    by_id = {o["custom_id"]: o["response"]["body"]["usage"] for o in out}
    # Anthropic's input_tokens (2 system + 4 user words) leaves the cache out; OpenAI's
    # prompt_tokens counts it: 6 + 1000 read + 5000 written = 6006.
    assert by_id["cached"]["prompt_tokens"] == 6006
    assert by_id["cached"]["prompt_tokens_details"] == {"cached_tokens": 1000, "cache_creation_tokens": 5000,
                                                        "cache_creation_1h_tokens": 3000}
    u = final.usage
    assert (u.input_tokens, u.input_tokens_details.cached_tokens, u.input_tokens_details.cache_creation_tokens,
            u.input_tokens_details.cache_creation_1h_tokens, u.output_tokens) == (6010, 1000, 5000, 3000, 8)
    # claude-3-5-haiku, Message Batches = 50% of every standard price (builtin table):
    #   input $0.80/M -> $0.40/M, cache read $0.08/M -> $0.04/M,
    #   5-minute write 1.25 x $0.80 = $1/M -> $0.50/M, 1-hour write 2 x $0.80 = $1.60/M -> $0.80/M,
    #   output $4/M -> $2/M.
    # uncached   10 * 0.0000004  = 0.000004   (6006 + 4 - 1000 - 5000)
    # read     1000 * 0.00000004 = 0.00004
    # 5-minute 2000 * 0.0000005  = 0.001
    # 1-hour   3000 * 0.0000008  = 0.0024
    # input                       = 0.003444
    # output      8 * 0.000002   = 0.000016  ("echo: ..." 5 words + "echo: hello there" 3)
    # total                       = 0.00346
    assert (final.cost.input_amount, final.cost.output_amount, final.cost.amount) == (
        "0.003444", "0.000016", "0.00346")


# -- ids and translation -------------------------------------------------------------------------


async def test_hostile_custom_ids_are_restored(h, fakes):
    timed, _ = fakes
    a = h.alice
    ids = ["with space", "ünïcödé", "x" * 200, "bgl_1", "BGL_3", "slash/and:colon", "emoji 🙂", "tab\tid",
           "plain-id_1", "\u2028", "\"quoted\"", "bgl_999999"]
    f = await h.upload(a, jsonl([chat(cid, f"q{i}") for i, cid in enumerate(ids)]))
    final = (await watch_all(a, (await create(a, f.id, model="claude-batch")).id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
    out, err = await results(a, final)
    assert err == [] and sorted(o["custom_id"] for o in out) == sorted(ids)
    by_id = {o["custom_id"]: o for o in out}
    for i, cid in enumerate(ids):  # each answer is matched to its own request
        assert by_id[cid]["response"]["body"]["choices"][0]["message"]["content"] == f"echo: q{i}"
    # Anthropic only saw ids it accepts: the fitting one as is, the others as bgl_<line>
    # (a caller's own "bgl_1" is remapped too, so it can't collide with a generated id)
    assert timed.sent_custom_ids() == [f"bgl_{n}" for n in range(1, 9)] + ["plain-id_1"] + \
        [f"bgl_{n}" for n in range(10, 13)]


async def test_untranslatable_request_is_an_error_line_and_is_not_sent(h, fakes):
    timed, _ = fakes
    a = h.alice
    f = await h.upload(a, jsonl([chat("ok-1", "hello"), chat("two-choices", "hello", n=2),
                                 chat("ok-2", "bye")]))
    final = (await watch_all(a, (await create(a, f.id, model="claude-batch")).id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
    assert (final.request_counts.total, final.request_counts.completed, final.request_counts.failed) == (3, 2, 1)
    out, err = await results(a, final)
    assert sorted(o["custom_id"] for o in out) == ["ok-1", "ok-2"]
    [line] = err
    assert line["custom_id"] == "two-choices" and line["error"] is None
    assert line["response"]["status_code"] == 400
    assert line["response"]["body"]["error"]["param"] == "n"
    assert line["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert timed.sent_custom_ids() == ["ok-1", "ok-2"]


async def test_nothing_translatable_completes_without_calling_anthropic(h, fakes):
    timed, _ = fakes
    a = h.alice
    f = await h.upload(a, jsonl([chat(f"n-{i}", "hi", n=2) for i in range(3)]))
    final = (await watch_all(a, (await create(a, f.id, model="claude-batch")).id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
    assert (final.request_counts.completed, final.request_counts.failed) == (0, 3)
    assert not final.output_file_id and final.error_file_id
    assert final.cost.status == batch_pb2.COST_STATUS_KNOWN and Decimal(final.cost.amount) == 0
    assert timed.calls == []


# -- refusals and failures -----------------------------------------------------------------------


async def test_other_endpoints_are_refused_at_create(h):
    a = h.alice
    line = {"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
            "body": {"model": "claude-batch", "input": "hello"}}
    f = await h.upload(a, jsonl([line]))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await create(a, f.id, endpoint="/v1/embeddings", model="claude-batch")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "/v1/chat/completions" in e.value.details() and "/v1/embeddings" in e.value.details()
    info, bad_request = error_details(e.value)
    assert info.reason == "UNSUPPORTED_ENDPOINT" and info.metadata["provider"] == "anthropic"
    assert bad_request.field_violations[0].field == "endpoint"


async def test_deployment_without_api_key_is_refused_at_create(h):
    a = h.alice
    f = await h.upload(a, jsonl([chat("k", "hi", model="claude-nokey")]))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await create(a, f.id, model="claude-nokey")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info, _ = error_details(e.value)
    assert info.reason == "PROVIDER_NOT_CONFIGURED"


async def test_bad_api_key_fails_the_batch_with_provider_auth(h, fakes):
    timed, _ = fakes
    a = h.alice
    f = await h.upload(a, jsonl([chat("k", "hi")]))
    final = (await watch_all(a, (await create(a, f.id, model="claude-badkey")).id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_FAILED
    assert final.errors[0].code == "provider_auth"
    assert "401" in final.errors[0].message and "api_key" in final.errors[0].message
    assert timed.batches == {}


# -- scale ---------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_ten_thousand_line_round_trip(h, fakes):
    timed, _ = fakes
    a = h.alice
    n = 10_000
    lines = [chat(f"id {i}" if i % 10 == 0 else f"r-{i}", f"Question number {i}?") for i in range(n)]
    lines[123]["body"]["messages"][1]["content"] = "ANTHROPIC:errored nope"
    lines[4567]["body"]["n"] = 2
    t0 = time.monotonic()
    f = await h.upload(a, jsonl(lines))
    batch = await create(a, f.id, model="claude-batch")
    states = await watch_all(a, batch.id)
    final = states[-1]
    elapsed = time.monotonic() - t0
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
    assert (final.request_counts.total, final.request_counts.completed, final.request_counts.failed) == \
           (n, n - 2, 2)
    out, err = await results(a, final)
    assert len(out) == n - 2 and len(err) == 2
    assert len({o["id"] for o in out + err}) == n
    assert sorted(e["custom_id"] for e in err) == sorted([lines[123]["custom_id"], lines[4567]["custom_id"]])
    expected = {ln["custom_id"]: ln["body"]["messages"][1]["content"] for ln in lines}
    for o in out:
        assert o["response"]["body"]["choices"][0]["message"]["content"] == "echo: " + expected[o["custom_id"]]
    for o in out[:500]:
        ChatCompletion.model_validate(o["response"]["body"])
    assert len(timed.sent_custom_ids()) == n - 1
    assert Decimal(final.cost.amount) == usage_cost(out)[2]
    assert elapsed < 20, f"10,000-line round trip took {elapsed:.1f}s"
    json.dumps([s.revision for s in states])  # revisions are plain ints


async def test_restart_mid_run_resumes_without_a_second_create(tmp_path, fakes):
    _, manual = fakes
    config = write_config(tmp_path / "models.yaml", [entry("claude-manual", manual)])
    harness = await start_harness(tmp_path / "data", config_file=config)
    ids = ["needs remap 1", "ok-2", "needs/remap:3"]
    try:
        a = harness.alice
        f = await harness.upload(a, jsonl([chat(cid, f"q{i}") for i, cid in enumerate(ids)]
                                          + [chat("never-sent", "x", n=2)]))
        batch = await create(a, f.id, model="claude-manual")
        for _ in range(200):
            if manual.batches:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # let the tracker record the msgbatch id and in_progress
    finally:
        await harness.channel.close()
        await harness.server.stop(grace=0)
    bid = next(iter(manual.batches))
    manual.run_to_end(bid)

    harness = await start_harness(tmp_path / "data", config_file=config)
    try:
        a = harness.alice
        final = (await watch_all(a, batch.id))[-1]
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
        out, err = await results(a, final)
        assert sorted(o["custom_id"] for o in out) == sorted(ids)
        assert [e["custom_id"] for e in err] == ["never-sent"]
        assert manual.calls_to("POST", "/v1/messages/batches") == 1, "no second create after the restart"
    finally:
        await harness.channel.close()
        await harness.server.stop(grace=0)
