"""Every provider's output, as its adapter's translation writes it, priced end to end.

Each case builds OpenAI batch output lines with the provider's own translation function
(what the tracker reads when the batch ends), sums usage with `sum_usage_from_output` and
the tracker's streaming `UsageCounter`, and prices it the way the tracker does: from the
price snapshot taken at CreateBatch (`Accounting.snapshot(deployment.model, model_info)`).
Expected amounts are worked out by hand in the comments, from the per-token batch prices
in pricing/prices.json (or the deployment's model_info).
"""

from __future__ import annotations

import json
import time

import pytest

from batchgate_server.core.accounting import Accounting
from batchgate_server.domain.models import BatchRecord, BatchStatus, Usage
from batchgate_server.pricing import PriceTable, compute_cost, sum_usage_from_output
from batchgate_server.pricing.table import ModelPrice
from batchgate_server.providers.anthropic.translate import anthropic_result_to_openai
from batchgate_server.providers.base import ResultKind
from batchgate_server.providers.bedrock.translate import bedrock_output_to_openai
from batchgate_server.providers.vertex.translate import CUSTOM_ID_LABEL_KEY, vertex_prediction_to_openai
from tests.fakes.openai_compatible_upstream import build_response


@pytest.fixture(scope="module")
def accounting() -> Accounting:
    return Accounting(PriceTable.load_builtin())


def record(accounting: Accounting, deployment_model: str, model_info: dict | None = None,
           endpoint: str = "/v1/chat/completions") -> BatchRecord:
    now = time.time()
    return BatchRecord(id="batch_fixture", project="p", endpoint=endpoint, input_file_id="file-x",
                       completion_window="24h", status=BatchStatus.FINALIZING, created_at=now,
                       expires_at=now + 86400, model="caller-name", provider="x",
                       price=accounting.snapshot(deployment_model, model_info))


def price_lines(accounting: Accounting, rec: BatchRecord, lines: list[bytes]):
    """(total usage, cost) exactly as the tracker computes them at the terminal state."""
    counter = accounting.usage_counter(rec)
    for line in lines:
        counter.add_line(line)
    by_model = counter.by_model
    # The one-pass helper and the streaming counter agree.
    assert by_model == sum_usage_from_output(lines)
    # compute_cost over the snapshot's price gives the same cost as Accounting.price.
    total, cost = accounting.price(rec, by_model)
    if rec.price and rec.price.get("priced"):
        price = ModelPrice.from_snapshot(rec.price)
        direct = compute_cost(by_model, lambda _m: price, price_source=cost.price_source)
        assert direct == cost
    return total, cost


def output_lines(results) -> list[bytes]:
    """Only what goes to the output file (the tracker counts usage there, never in errors)."""
    return [r.data for r in results if r.kind is ResultKind.OUTPUT]


def all_data(results) -> list[bytes]:
    return [r.data for r in results]


# --- OpenAI / Azure Batch API: provider output passed through -------------------------------


def openai_line(custom_id: str, model: str, usage: dict, status: int = 200) -> bytes:
    body = {"id": f"chatcmpl-{custom_id}", "object": "chat.completion", "created": 1_750_000_000,
            "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                         "finish_reason": "stop", "logprobs": None}],
            "usage": usage, "system_fingerprint": "fp_x"}
    return json.dumps({"id": f"batch_req_{custom_id}", "custom_id": custom_id,
                       "response": {"status_code": status, "request_id": "req", "body": body},
                       "error": None}).encode()


def test_openai_batch_output_gpt_4o_mini_with_cached(accounting):
    lines = [
        openai_line("a", "gpt-4o-mini-2024-07-18", {
            "prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500,
            "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0}}),
        openai_line("b", "gpt-4o-mini-2024-07-18", {
            "prompt_tokens": 800, "completion_tokens": 200, "total_tokens": 1000}),
        # Error-file lines carry no usage and are never charged, even if they reach the counter.
        json.dumps({"id": "batch_req_c", "custom_id": "c", "response": {"status_code": 400, "body": {
            "error": {"message": "bad", "type": "invalid_request_error"}, "usage": {"prompt_tokens": 99}}},
            "error": None}).encode(),
        json.dumps({"id": "batch_req_d", "custom_id": "d", "response": None,
                    "error": {"code": "batch_expired", "message": "expired"}}).encode(),
    ]
    total, cost = price_lines(accounting, record(accounting, "gpt-4o-mini"), lines)
    # input 1200 + 800 = 2000 (1024 cached), output 300 + 200 = 500
    assert total == Usage(input_tokens=2000, cached_tokens=1024, output_tokens=500, reasoning_tokens=0)
    # gpt-4o-mini batch: input $0.075/M, cached $0.075/M (no cache discount inside Batch), output $0.30/M
    # uncached  976 * 0.000000075 = 0.0000732
    # cached   1024 * 0.000000075 = 0.0000768
    # input                        = 0.00015
    # output    500 * 0.0000003    = 0.00015
    # total                        = 0.0003
    assert (cost.status, cost.input_amount, cost.output_amount, cost.amount) == (
        "known", "0.00015", "0.00015", "0.0003")
    assert cost.price_source == "builtin@2026-11-01" and cost.currency == "USD"


def test_openai_batch_output_reasoning_model(accounting):
    lines = [openai_line("a", "o4-mini-2025-04-16", {
        "prompt_tokens": 1000, "completion_tokens": 3000, "total_tokens": 4000,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 2500}})]
    total, cost = price_lines(accounting, record(accounting, "o4-mini"), lines)
    assert total == Usage(input_tokens=1000, cached_tokens=0, output_tokens=3000, reasoning_tokens=2500)
    # o4-mini batch: input $0.55/M, output $2.20/M; the 2,500 reasoning tokens are inside the 3,000
    # input  1000 * 0.00000055 = 0.00055
    # output 3000 * 0.0000022  = 0.0066
    # total                    = 0.00715
    assert (cost.input_amount, cost.output_amount, cost.amount) == ("0.00055", "0.0066", "0.00715")


# --- built-in executor: an OpenAI-compatible server's answers (the fake upstream's) ----------

EXECUTOR_INFO = {"input_cost_per_token": "0.000002", "output_cost_per_token": "0.000006"}


def executor_line(custom_id: str, path: str, body: dict) -> bytes:
    """The line ExecutorRun._write_output writes: the upstream's body verbatim."""
    raw = json.dumps(build_response(path, body, created=1_750_000_000)).encode()
    return (b'{"id":"batch_req_' + custom_id.encode() + b'","custom_id":' + json.dumps(custom_id).encode()
            + b',"response":{"status_code":200,"request_id":"","body":' + raw + b'},"error":null}')


TEXT = "x" * 400  # the fake counts ceil(len / 4) tokens: 100; its answer "echo: " + 200 chars -> 52


@pytest.mark.parametrize("path, body, usage, amounts", [
    # 3 x (100 in, 52 out) at half the standard price (no *_batches keys): input $1/M, output $3/M
    # input 300 * 0.000001 = 0.0003; output 156 * 0.000003 = 0.000468; total 0.000768
    ("/v1/chat/completions", {"model": "my-llm", "messages": [{"role": "user", "content": TEXT}]},
     Usage(300, 0, 156, 0), ("0.0003", "0.000468", "0.000768")),
    ("/v1/completions", {"model": "my-llm", "prompt": TEXT},
     Usage(300, 0, 156, 0), ("0.0003", "0.000468", "0.000768")),
    ("/v1/responses", {"model": "my-llm", "input": TEXT},
     Usage(300, 0, 156, 0), ("0.0003", "0.000468", "0.000768")),
    # embeddings: prompt tokens only. 300 * 0.000001 = 0.0003, output 0
    ("/v1/embeddings", {"model": "my-llm", "input": TEXT},
     Usage(300, 0, 0, 0), ("0.0003", "0", "0.0003")),
])
def test_executor_output_every_endpoint(accounting, path, body, usage, amounts):
    lines = [executor_line(f"r{i}", path, body) for i in range(3)]
    rec = record(accounting, "my-llm", EXECUTOR_INFO, endpoint=path)
    total, cost = price_lines(accounting, rec, lines)
    assert total == usage
    assert (cost.status, cost.input_amount, cost.output_amount, cost.amount) == ("known", *amounts)
    assert cost.price_source.startswith("model_info")


# --- Anthropic Message Batches ----------------------------------------------------------------


def anthropic_message(usage: dict) -> dict:
    return {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-3-5-haiku-20241022",
            "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": usage}


def test_anthropic_results(accounting):
    results = [
        {"custom_id": "a", "result": {"type": "succeeded", "message": anthropic_message(
            {"input_tokens": 2000, "cache_read_input_tokens": 6000, "cache_creation_input_tokens": 1000,
             "output_tokens": 500})}},
        {"custom_id": "b", "result": {"type": "succeeded", "message": anthropic_message(
            {"input_tokens": 1000, "output_tokens": 300})}},
        {"custom_id": "c", "result": {"type": "errored", "error": {"type": "error", "error": {
            "type": "invalid_request_error", "message": "bad"}}}},
        {"custom_id": "d", "result": {"type": "canceled"}},
        {"custom_id": "e", "result": {"type": "expired"}},
    ]
    translated = [anthropic_result_to_openai(r, original_custom_id=r["custom_id"], request_index=i,
                                             batch_id="batch_fixture", created=1_750_000_000)
                  for i, r in enumerate(results)]
    assert [t.kind for t in translated].count(ResultKind.OUTPUT) == 2
    total, cost = price_lines(accounting, record(accounting, "claude-3-5-haiku-20241022"), all_data(translated))
    # OpenAI semantics: prompt = input + cache reads + cache writes = (2000 + 6000 + 1000) + 1000
    assert total == Usage(input_tokens=10_000, cached_tokens=6000, output_tokens=800, reasoning_tokens=0,
                          cache_creation_tokens=1000)
    # claude-3-5-haiku batch: input $0.40/M, cache read $0.08/M halved = $0.04/M (discounts stack),
    # 5-minute cache write $1/M (1.25 x $0.80) halved = $0.50/M, output $2/M.
    # uncached 3000 * 0.0000004  = 0.0012
    # cached   6000 * 0.00000004 = 0.00024
    # written  1000 * 0.0000005  = 0.0005
    # input                       = 0.00194
    # output    800 * 0.000002   = 0.0016
    # total                       = 0.00354
    assert (cost.status, cost.input_amount, cost.output_amount, cost.amount) == (
        "known", "0.00194", "0.0016", "0.00354")


# --- Vertex AI batch prediction (Gemini) --------------------------------------------------------


def prediction(label: str, response: dict | None = None, status: str = "") -> dict:
    line = {"request": {"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
                        "labels": {CUSTOM_ID_LABEL_KEY: label}},
            "status": status, "processed_time": "2025-06-01T12:00:03.123Z"}
    if response is not None:
        line["response"] = response
    return line


def test_vertex_predictions(accounting):
    camel = {"candidates": [{"content": {"role": "model", "parts": [{"text": "Hi"}]}, "finishReason": "STOP"}],
             "usageMetadata": {"promptTokenCount": 10_000, "cachedContentTokenCount": 4000,
                               "candidatesTokenCount": 1500, "thoughtsTokenCount": 500,
                               "totalTokenCount": 12_000},
             "modelVersion": "gemini-2.5-flash", "responseId": "r1"}
    # The snake_case spelling some exports use; zero counts omitted as proto3 JSON does.
    snake = {"candidates": [{"content": {"role": "model", "parts": [{"text": "Yo"}]}, "finish_reason": "STOP"}],
             "usage_metadata": {"prompt_token_count": 2000, "candidates_token_count": 500},
             "response_id": "r2"}
    lines = [prediction("a", camel), prediction("b", snake),
             prediction("c", status='{"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}}')]
    translated = [vertex_prediction_to_openai(p, decode_custom_id=lambda s: s, request_index=i,
                                              batch_id="batch_fixture", model="gemini-2.5-flash")
                  for i, p in enumerate(lines)]
    assert [t.kind for t in translated] == [ResultKind.OUTPUT, ResultKind.OUTPUT, ResultKind.ERROR]
    total, cost = price_lines(accounting, record(accounting, "gemini-2.5-flash"), all_data(translated))
    # completion = candidates + thoughts: (1500 + 500) + 500; reasoning = thoughts
    assert total == Usage(input_tokens=12_000, cached_tokens=4000, output_tokens=2500, reasoning_tokens=500)
    # gemini-2.5-flash batch: input $0.15/M, cached $0.03/M (cache discount wins, no stacking), output $1.25/M
    # uncached 8000 * 0.00000015 = 0.0012
    # cached   4000 * 0.00000003 = 0.00012
    # input                       = 0.00132
    # output   2500 * 0.00000125 = 0.003125
    # total                       = 0.004445
    assert (cost.status, cost.input_amount, cost.output_amount, cost.amount) == (
        "known", "0.00132", "0.003125", "0.004445")


# --- AWS Bedrock batch inference --------------------------------------------------------------


def bedrock(records: list[dict], model_id: str, endpoint: str = "/v1/chat/completions"):
    return [bedrock_output_to_openai(r, decode_custom_id=lambda s: s, request_index=i, batch_id="batch_fixture",
                                     model_id=model_id, endpoint=endpoint, created=1_750_000_000)
            for i, r in enumerate(records)]


def test_bedrock_claude_invoke_model(accounting):
    model_id = "us.anthropic.claude-3-haiku-20240307-v1:0"
    claude = {"id": "msg_bdrk_01", "type": "message", "role": "assistant", "model": "claude-3-haiku-20240307",
              "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn"}
    translated = bedrock([
        {"recordId": "a", "modelInput": {}, "modelOutput": {
            **claude, "usage": {"input_tokens": 3000, "cache_read_input_tokens": 1000, "output_tokens": 400}}},
        {"recordId": "b", "modelInput": {}, "modelOutput": {**claude, "usage": {"input_tokens": 1000,
                                                                                 "output_tokens": 100}}},
        {"recordId": "c", "modelInput": {}, "error": {"errorCode": 400, "errorMessage": "ValidationException"}},
    ], model_id)
    assert len(output_lines(translated)) == 2
    total, cost = price_lines(accounting, record(accounting, model_id), all_data(translated))
    assert total == Usage(input_tokens=5000, cached_tokens=1000, output_tokens=500, reasoning_tokens=0)
    # us.anthropic.claude-3-haiku-20240307-v1:0 -> claude-3-haiku. batch: input $0.125/M,
    # cache read $0.03/M halved = $0.015/M, output $0.625/M
    # uncached 4000 * 0.000000125 = 0.0005
    # cached   1000 * 0.000000015 = 0.000015
    # input                        = 0.000515
    # output    500 * 0.000000625 = 0.0003125
    # total                        = 0.0008275
    assert (cost.status, cost.input_amount, cost.output_amount, cost.amount) == (
        "known", "0.000515", "0.0003125", "0.0008275")


NOVA = "amazon.nova-lite-v1:0"
NOVA_INFO = {"input_cost_per_token_batches": "0.00000003", "output_cost_per_token_batches": "0.00000012"}


def converse_records() -> list[dict]:
    return [{"recordId": "a", "modelInput": {}, "modelOutput": {
        "output": {"message": {"role": "assistant", "content": [{"text": "Hi"}]}}, "stopReason": "end_turn",
        "usage": {"inputTokens": 1000, "outputTokens": 250, "cacheReadInputTokens": 500, "totalTokens": 1750}}}]


def test_bedrock_converse_priced_by_model_info(accounting):
    total, cost = price_lines(accounting, record(accounting, NOVA, NOVA_INFO),
                              all_data(bedrock(converse_records(), NOVA)))
    assert total == Usage(input_tokens=1500, cached_tokens=500, output_tokens=250, reasoning_tokens=0)
    # model_info batch prices: input $0.03/M, output $0.12/M; no cached price -> cached at the input price
    # input  1500 * 0.00000003 = 0.000045
    # output  250 * 0.00000012 = 0.00003
    # total                    = 0.000075
    assert (cost.status, cost.input_amount, cost.output_amount, cost.amount) == (
        "known", "0.000045", "0.00003", "0.000075")
    assert cost.price_source.startswith("model_info")


def test_bedrock_titan_embeddings_half_of_standard(accounting):
    titan = "amazon.titan-embed-text-v2:0"
    records = [{"recordId": f"e{i}", "modelInput": {"inputText": "hello"},
                "modelOutput": {"embedding": [0.1, 0.2], "inputTextTokenCount": 12}} for i in range(3)]
    translated = bedrock(records, titan, endpoint="/v1/embeddings")
    info = {"input_cost_per_token": "0.00000002", "output_cost_per_token": "0"}
    total, cost = price_lines(accounting, record(accounting, titan, info, endpoint="/v1/embeddings"),
                              all_data(translated))
    assert total == Usage(input_tokens=36, cached_tokens=0, output_tokens=0, reasoning_tokens=0)
    # batch = half the standard $0.02/M = $0.01/M: 36 * 0.00000001 = 0.00000036
    assert (cost.status, cost.input_amount, cost.output_amount, cost.amount) == (
        "known", "0.00000036", "0", "0.00000036")


# --- no price -------------------------------------------------------------------------------------


def test_unpriced_model_is_unknown_with_reason_never_zero(accounting):
    rec = record(accounting, NOVA)  # no model_info, not in the builtin table
    assert rec.price == {"model": NOVA, "currency": "USD", "table_version": "builtin@2026-11-01", "priced": False}
    total, cost = price_lines(accounting, rec, all_data(bedrock(converse_records(), NOVA)))
    assert total.input_tokens == 1500  # usage is still counted
    assert cost.status == "unknown"
    assert cost.amount == cost.input_amount == cost.output_amount == ""
    assert NOVA in cost.reason and "caller-name" in cost.reason and "builtin@2026-11-01" in cost.reason


def test_unpriced_model_with_no_usage_costs_zero(accounting):
    # Every request failed: nothing was used, so nothing is charged (a true zero, not a guess).
    rec = record(accounting, NOVA)
    error = bedrock([{"recordId": "a", "error": {"errorCode": 500, "errorMessage": "boom"}}], NOVA)
    total, cost = price_lines(accounting, rec, all_data(error))
    assert total == Usage() and (cost.status, cost.amount) == ("known", "0")


def test_output_tokens_without_output_price_are_unknown(accounting):
    rec = record(accounting, NOVA, {"input_cost_per_token_batches": "0.00000003"})
    _, cost = price_lines(accounting, rec, all_data(bedrock(converse_records(), NOVA)))
    assert cost.status == "unknown" and "no output price" in cost.reason and cost.amount == ""


def test_ledger_row_holds_exact_nanos(accounting):
    rec = record(accounting, "gemini-2.5-flash")
    usage = {"gemini-2.5-flash": Usage(input_tokens=12_000, cached_tokens=4000, output_tokens=2500)}
    _, cost = accounting.price(rec, usage)
    row = accounting.ledger_row(rec, usage, cost=cost)
    assert row["cost_amount"] == "0.004445" and row["cost_nanos"] == 4_445_000
    assert (row["input_tokens"], row["cached_tokens"], row["output_tokens"]) == (12_000, 4000, 2500)
    unknown = accounting.price(record(accounting, NOVA), {NOVA: Usage(input_tokens=5)})[1]
    assert accounting.ledger_row(rec, usage, cost=unknown)["cost_nanos"] is None
    failed = accounting.ledger_row(rec, None)
    assert (failed["cost_status"], failed["cost_amount"], failed["cost_nanos"]) == ("known", "0", 0)
