"""Cost tracking through the real server: every batch's usage and cost, exactly once.

Batches run on the built-in executor against the fake OpenAI-compatible upstream (and the fake
OpenAI Batch API). Every request text is 400 characters, so each answered chat request reports
100 prompt and 52 completion tokens (see usage_helpers); expected costs are worked out by hand
in the comments from per-token batch prices.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import yaml

from batchgate.v1 import batch_pb2, usage_pb2
from tests.conftest import start_harness
from tests.fakes.openai_batch_api import FakeBatchAPI
from tests.integration.batch_helpers import results, watch_all, write_config
from tests.integration.test_observability import scrape, value
from tests.integration.usage_helpers import (
    COMPLETION_TOKENS,
    PROMPT_TOKENS,
    UsageUpstream,
    ledger_rows,
    priced_entry,
    query,
    run_batch,
    stop,
    text,
)

# Explicit batch prices: input $1/M, cached input $0.50/M, output $2/M.
PRICED_INFO = {"input_cost_per_token_batches": "0.000001", "cache_read_input_token_cost_batches": "0.0000005",
               "output_cost_per_token_batches": "0.000002"}
# Explicit batch prices with prompt-cache writes: input $1/M, cached $0.50/M, 5-minute writes
# $1.25/M, 1-hour writes $2/M, output $2/M.
CACHE_WRITE_INFO = {**PRICED_INFO, "cache_creation_input_token_cost_batches": "0.00000125",
                    "cache_creation_input_token_cost_above_1hr_batches": "0.000002"}
# A long-context tier: a request whose prompt is above 200k tokens costs input $2/M, output $3/M.
TIERED_INFO = {**PRICED_INFO, "input_cost_per_token_above_200k_tokens_batches": "0.000002",
               "output_cost_per_token_above_200k_tokens_batches": "0.000003"}
# Standard prices only (input $4/M, output $8/M). The built-in executor sends real-time
# requests, so it pays the standard rate (providers' batch APIs pay half; see test_pricing).
HALF_INFO = {"input_cost_per_token": "0.000004", "output_cost_per_token": "0.000008"}


@pytest.fixture
def upstream_class():
    return UsageUpstream


def entries(base_url: str) -> list[dict]:
    return [
        priced_entry("priced-llm", base_url, "hosted_vllm/house-llm", PRICED_INFO),
        priced_entry("half-llm", base_url, "hosted_vllm/house-llm-half", HALF_INFO),
        # No model_info: priced by the deployment's model name in the builtin table.
        priced_entry("mini", base_url, "hosted_vllm/gpt-4o-mini"),
        priced_entry("unpriced", base_url, "hosted_vllm/some-unpriced-model"),
        priced_entry("priced-expiring", base_url, "hosted_vllm/house-llm", PRICED_INFO, completion_window=1.5),
        priced_entry("cache-writes", base_url, "hosted_vllm/house-llm", CACHE_WRITE_INFO),
        priced_entry("tiered", base_url, "hosted_vllm/house-llm", TIERED_INFO),
    ]


@pytest.fixture
async def h(tmp_path, upstream):
    harness = await start_harness(tmp_path / "data", config_file=write_config(tmp_path / "models.yaml",
                                                                              entries(upstream.base_url)))
    try:
        yield harness
    finally:
        await stop(harness)


def usage_of(lines: list[dict]) -> tuple[int, int, int, int]:
    u = [line["response"]["body"]["usage"] for line in lines]
    return (sum(x["prompt_tokens"] for x in u), sum(x["prompt_tokens_details"]["cached_tokens"] for x in u),
            sum(x["completion_tokens"] for x in u),
            sum(x["completion_tokens_details"]["reasoning_tokens"] for x in u))


def cost_tuple(b: batch_pb2.Batch) -> tuple:
    return (b.cost.status, b.cost.input_amount, b.cost.output_amount, b.cost.amount)


KNOWN = batch_pb2.COST_STATUS_KNOWN


# -- hand-computed costs -----------------------------------------------------------------------------


async def test_hand_computed_cost_with_cached_and_reasoning_tokens(h):
    a = h.alice
    texts = [text("CACHED:40 REASONING:10"), text("CACHED:40 REASONING:10"), text(), text(), text("FAIL:400")]
    created = await run_batch(h, a, "priced-llm", texts, wait=False)
    assert created.cost.status == batch_pb2.COST_STATUS_PENDING and not created.HasField("usage")
    final = (await watch_all(a, created.id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED

    # request_counts agree with the output and error files.
    out, err = await results(a, final)
    assert (final.request_counts.total, final.request_counts.completed, final.request_counts.failed) == (5, 4, 1)
    assert (len(out), len(err)) == (4, 1)
    # 4 answers x 100 prompt tokens (2 x 40 cached), 4 x 52 completion tokens (2 x 10 reasoning)
    assert usage_of(out) == (400, 80, 208, 20)
    u = final.usage
    assert (u.input_tokens, u.input_tokens_details.cached_tokens, u.output_tokens,
            u.output_tokens_details.reasoning_tokens, u.total_tokens) == (400, 80, 208, 20, 608)
    # uncached 320 * 0.000001  = 0.00032
    # cached    80 * 0.0000005 = 0.00004
    # input                     = 0.00036
    # output   208 * 0.000002  = 0.000416  (the 20 reasoning tokens are part of the 208)
    # total                     = 0.000776  (the FAIL:400 request is not charged)
    assert cost_tuple(final) == (KNOWN, "0.00036", "0.000416", "0.000776")
    assert final.cost.currency == "USD" and final.cost.reason == ""
    assert final.cost.price_source.startswith("model_info")

    [row] = await ledger_rows(h, final.id)
    assert (row["project"], row["model"], row["provider"], row["cost_status"], row["cost_amount"],
            row["cost_nanos"]) == ("alice", "priced-llm", "openai_compatible", "known", "0.000776", 776_000)
    assert (row["input_tokens"], row["cached_tokens"], row["output_tokens"], row["reasoning_tokens"]) == (
        400, 80, 208, 20)
    assert json.loads(row["usage_by_model"]) == {"house-llm": {
        "input_tokens": 400, "cached_tokens": 80, "output_tokens": 208, "reasoning_tokens": 20,
        "cache_creation_tokens": 0, "cache_creation_1h_tokens": 0}}

    report = await query(h, a)
    assert (report.totals.batch_count, report.totals.cost_amount, report.totals.cached_input_tokens,
            report.totals.reasoning_tokens) == (1, "0.000776", 80, 20)


async def test_cache_writes_5_minute_and_1_hour_at_their_own_prices(h):
    a = h.alice
    final = await run_batch(h, a, "cache-writes", [text("CACHED:30 WRITE:40"), text("WRITE:60 WRITE_1H:20")])
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
    u = final.usage
    assert (u.input_tokens, u.input_tokens_details.cached_tokens, u.input_tokens_details.cache_creation_tokens,
            u.input_tokens_details.cache_creation_1h_tokens, u.output_tokens) == (200, 30, 100, 20, 104)
    # r0: 100 prompt = 30 uncached + 30 read + 40 written (5-minute)
    # r1: 100 prompt = 40 uncached + 60 written, 20 of them 1-hour
    # uncached  70 * 0.000001   = 0.00007
    # read      30 * 0.0000005  = 0.000015
    # 5-minute  80 * 0.00000125 = 0.0001
    # 1-hour    20 * 0.000002   = 0.00004
    # input                      = 0.000225
    # output   104 * 0.000002   = 0.000208
    # total                      = 0.000433
    assert cost_tuple(final) == (KNOWN, "0.000225", "0.000208", "0.000433")
    [row] = await ledger_rows(h, final.id)
    assert (row["cache_creation_tokens"], row["cache_creation_1h_tokens"], row["cost_nanos"]) == (100, 20, 433_000)
    report = await query(h, a)
    assert (report.totals.cache_creation_input_tokens, report.totals.cache_creation_1h_input_tokens,
            report.totals.cost_amount) == (100, 20, "0.000433")


async def test_cache_writes_are_counted_in_the_token_metrics(tmp_path, upstream):
    h = await start_harness(tmp_path / "data", metrics_address="127.0.0.1:0",
                            config_file=write_config(tmp_path / "models.yaml", entries(upstream.base_url)))
    try:
        await run_batch(h, h.alice, "cache-writes", [text("WRITE:60 WRITE_1H:20")])
        samples = await scrape(h.server.metrics_port)
        assert value(samples, "batchgate_tokens_total", project="alice", kind="cache_creation") == 60
        assert value(samples, "batchgate_tokens_total", project="alice", kind="cache_creation_1h") == 20
    finally:
        await stop(h)


async def test_long_context_tier_priced_per_request_in_one_batch(h):
    # 150k and exactly 200k are not above the threshold; 250k is: that whole request is priced
    # at the tier's rates, output included.
    final = await run_batch(h, h.alice, "tiered", [text("PROMPT:150000"), text("PROMPT:250000"),
                                                   text("PROMPT:200000")])
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
    assert (final.usage.input_tokens, final.usage.output_tokens) == (600_000, 156)
    # base  input  350000 * 0.000001 = 0.35
    # base  output    104 * 0.000002 = 0.000208
    # above input  250000 * 0.000002 = 0.5
    # above output     52 * 0.000003 = 0.000156
    # input 0.85, output 0.000364, total 0.850364
    assert cost_tuple(final) == (KNOWN, "0.85", "0.000364", "0.850364")
    [row] = await ledger_rows(h, final.id)
    assert (row["input_tokens"], row["cost_amount"]) == (600_000, "0.850364")


async def test_the_executor_pays_the_standard_price(h):
    final = await run_batch(h, h.alice, "half-llm", [text(), text()])
    assert (final.usage.input_tokens, final.usage.output_tokens) == (2 * PROMPT_TOKENS, 2 * COMPLETION_TOKENS)
    # real-time requests: input $4/M = 0.000004, output $8/M = 0.000008
    # input  200 * 0.000004 = 0.0008
    # output 104 * 0.000008 = 0.000832
    # total                 = 0.001632
    assert cost_tuple(final) == (KNOWN, "0.0008", "0.000832", "0.001632")
    assert final.cost.price_source.startswith("standard rate (the built-in executor makes real-time requests)")


async def test_builtin_price_found_by_the_deployment_model(h):
    # "mini" is hosted_vllm/gpt-4o-mini: the snapshot prices deployment.model "gpt-4o-mini" from
    # the builtin table, at the standard rate because the executor makes real-time requests
    # (input $0.15/M, cached input $0.075/M, output $0.60/M).
    final = await run_batch(h, h.alice, "mini", [text("CACHED:40"), text()])
    assert (final.usage.input_tokens, final.usage.input_tokens_details.cached_tokens,
            final.usage.output_tokens) == (200, 40, 104)
    # input  160 * 0.00000015 + 40 cached * 0.000000075 = 0.000024 + 0.000003 = 0.000027
    # output 104 * 0.0000006                             = 0.0000624
    # total                                              = 0.0000894
    assert cost_tuple(final) == (KNOWN, "0.000027", "0.0000624", "0.0000894")
    assert final.cost.price_source.endswith("builtin@2026-11-01")


async def test_openai_batch_api_output_priced(tmp_path):
    api = FakeBatchAPI(api_key="sk-test")
    await api.start()
    config = write_config(tmp_path / "models.yaml", [{"model_name": "oai-mini", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_key": "sk-test", "api_base": api.base_url, "poll_interval": 0.05}}])
    h = await start_harness(tmp_path / "data", config_file=config)
    try:
        final = await run_batch(h, h.bob, "oai-mini", [text(), text(), text(), text("FAIL please")])
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED and final.provider == "openai"
        assert (final.request_counts.completed, final.request_counts.failed) == (3, 1)
        assert (final.usage.input_tokens, final.usage.output_tokens) == (300, 156)
        # gpt-4o-mini batch: input 300 * 0.000000075 = 0.0000225; output 156 * 0.0000003 = 0.0000468
        # total 0.0000693
        assert cost_tuple(final) == (KNOWN, "0.0000225", "0.0000468", "0.0000693")
        report = await query(h, h.bob, group_by=[usage_pb2.USAGE_GROUP_BY_PROVIDER])
        assert [(dict(r.group), r.cost_amount) for r in report.rows] == [({"provider": "openai"}, "0.0000693")]
    finally:
        await stop(h)
        await api.stop()


# -- unknown prices ----------------------------------------------------------------------------------


async def test_model_without_a_price_is_unknown_never_zero(h):
    created = await run_batch(h, h.alice, "unpriced", [text(), text()], wait=False)
    assert created.cost.status == batch_pb2.COST_STATUS_PENDING
    final = (await watch_all(h.alice, created.id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
    assert final.cost.status == batch_pb2.COST_STATUS_UNKNOWN
    assert final.cost.amount == final.cost.input_amount == final.cost.output_amount == ""
    reason = final.cost.reason
    assert "some-unpriced-model" in reason and "'unpriced'" in reason and "model_info" in reason
    assert (final.usage.input_tokens, final.usage.output_tokens) == (200, 104)  # usage is still recorded

    [row] = await ledger_rows(h, final.id)
    assert (row["cost_status"], row["cost_amount"], row["cost_nanos"]) == ("unknown", "", None)
    # With a priced batch beside it, the unknown one is counted apart, never summed as zero.
    await run_batch(h, h.alice, "priced-llm", [text()])
    totals = (await query(h, h.alice)).totals
    # priced: 100 * 0.000001 + 52 * 0.000002 = 0.0001 + 0.000104 = 0.000204
    assert (totals.batch_count, totals.unknown_cost_batches, totals.cost_amount) == (2, 1, "0.000204")
    assert totals.input_tokens == 300


# -- operator price file -----------------------------------------------------------------------------


def price_file(path, house_special_input: str, house_special_output: str):
    path.write_text(yaml.safe_dump({"version": f"ops-{house_special_input}", "models": {
        "gpt-4o-mini": {"input_cost_per_token": "0.000001", "output_cost_per_token": "0.000002",
                        "input_cost_per_token_batches": "0.000001", "output_cost_per_token_batches": "0.000002"},
        "house-special": {"input_cost_per_token": house_special_input, "output_cost_per_token": house_special_output},
    }}))
    return path


async def test_operator_price_file_overrides_and_model_info_wins(tmp_path, upstream):
    prices = price_file(tmp_path / "prices.yaml", "0.00001", "0.00002")
    config = write_config(tmp_path / "models.yaml", [
        priced_entry("mini", upstream.base_url, "hosted_vllm/gpt-4o-mini"),
        priced_entry("special", upstream.base_url, "hosted_vllm/house-special"),
        priced_entry("special-own-price", upstream.base_url, "hosted_vllm/house-special",
                     {"input_cost_per_token_batches": "0.000001", "output_cost_per_token_batches": "0.000002"}),
    ])
    h = await start_harness(tmp_path / "data", config_file=config, price_file=prices)
    try:
        mini = await run_batch(h, h.alice, "mini", [text(), text()])
        # the file's gpt-4o-mini prices replace the builtin ones: input $1/M, output $2/M
        # input 200 * 0.000001 = 0.0002; output 104 * 0.000002 = 0.000208; total 0.000408
        assert cost_tuple(mini) == (KNOWN, "0.0002", "0.000208", "0.000408")
        assert f"file:{prices}@ops-0.00001 over builtin@" in mini.cost.price_source

        special = await run_batch(h, h.alice, "special", [text()])
        # a model only the file knows, standard prices only, paid in full by the executor:
        # input 100 * 0.00001 = 0.001; output 52 * 0.00002 = 0.00104; total 0.00204
        assert cost_tuple(special) == (KNOWN, "0.001", "0.00104", "0.00204")

        own = await run_batch(h, h.alice, "special-own-price", [text()])
        # the deployment's model_info beats the file: input 100 * 0.000001 = 0.0001,
        # output 52 * 0.000002 = 0.000104, total 0.000204
        assert cost_tuple(own) == (KNOWN, "0.0001", "0.000104", "0.000204")
        assert own.cost.price_source.startswith("model_info over file:")

        totals = (await query(h, h.admin)).totals
        # 0.000408 + 0.00204 + 0.000204 = 0.002652
        assert (totals.batch_count, totals.cost_amount) == (3, "0.002652")
    finally:
        await stop(h)


async def test_prices_in_force_at_creation_survive_a_restart_with_new_prices(tmp_path, upstream):
    data = tmp_path / "data"
    prices = price_file(tmp_path / "prices.yaml", "0.00001", "0.00002")
    config = write_config(tmp_path / "models.yaml", [priced_entry("special", upstream.base_url,
                                                                  "hosted_vllm/house-special")])
    h = await start_harness(data, config_file=config, price_file=prices)
    try:
        slow = await run_batch(h, h.alice, "special", [text("SLOW:600"), text("SLOW:600")], wait=False)
        assert await ledger_rows(h, slow.id) == []  # not ended when the server stops
    finally:
        await stop(h)  # mid-batch: the requests are still sleeping in the upstream
    # The operator raises the prices tenfold while the server is down.
    price_file(prices, "0.0001", "0.0002")
    h = await start_harness(data, config_file=config, price_file=prices)
    try:
        final = (await watch_all(h.alice, slow.id))[-1]
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED and final.request_counts.completed == 2
        # still the prices of creation time (standard rate, executor): input $10/M, output $20/M
        # input 200 * 0.00001 = 0.002; output 104 * 0.00002 = 0.00208; total 0.00408
        assert cost_tuple(final) == (KNOWN, "0.002", "0.00208", "0.00408")
        new = await run_batch(h, h.alice, "special", [text()])
        # created after the change: input 100 * 0.0001 = 0.01; output 52 * 0.0002 = 0.0104; total 0.0204
        assert cost_tuple(new) == (KNOWN, "0.01", "0.0104", "0.0204")
        assert len(await ledger_rows(h, slow.id)) == 1 and len(await ledger_rows(h, new.id)) == 1
        totals = (await query(h, h.alice)).totals
        assert (totals.batch_count, totals.cost_amount) == (2, "0.02448")  # 0.00408 + 0.0204
    finally:
        await stop(h)


# -- exactly once ------------------------------------------------------------------------------------


async def test_exactly_once_under_repeated_reads_retries_and_restarts(tmp_path, upstream):
    data = tmp_path / "data"
    config = write_config(tmp_path / "models.yaml", entries(upstream.base_url))
    h = await start_harness(data, config_file=config)
    try:
        final = await run_batch(h, h.alice, "priced-llm", [text(), text(), text()])
        # 300 * 0.000001 + 156 * 0.000002 = 0.0003 + 0.000312 = 0.000612
        assert final.cost.amount == "0.000612"
        request = batch_pb2.GetBatchRequest(batch_id=final.id)
        for _ in range(10):  # 1000 reads, 100 at a time
            got = await asyncio.gather(*[h.alice.batches.GetBatch(request, metadata=h.alice.metadata)
                                         for _ in range(100)])
            assert all(g.batch == final for g in got)
        await watch_all(h.alice, final.id)  # a watch of an ended batch only replays it
        await h.alice.batches.ListBatches(batch_pb2.ListBatchesRequest(), metadata=h.alice.metadata)

        # A finalisation redone (as after a crash between the provider's results and our commit)
        # offers the same ledger row again: it is ignored, the first one stands.
        store, accounting = h.server.store, h.server.accounting
        record = await store.get_batch(final.id)
        again = accounting.ledger_row(record, {"house-llm": record.usage}, cost=record.cost)
        again["cost_amount"], again["cost_nanos"] = "999", 999 * 10**9
        await store.update_batch(record, ledger=again)

        before = await query(h, h.alice)
        assert (before.totals.batch_count, before.totals.input_tokens, before.totals.cost_amount) == (
            1, 300, "0.000612")
        assert len(await ledger_rows(h, final.id)) == 1
    finally:
        await stop(h)

    for _ in range(2):  # restart twice on the same data directory
        h = await start_harness(data, config_file=config)
        try:
            after = await query(h, h.alice)
            assert after.totals == before.totals and list(after.rows) == list(before.rows)
            [row] = await ledger_rows(h, final.id)
            assert row["cost_amount"] == "0.000612"
            got = (await h.alice.batches.GetBatch(batch_pb2.GetBatchRequest(batch_id=final.id),
                                                  metadata=h.alice.metadata)).batch
            assert got.cost == final.cost and got.usage == final.usage
        finally:
            await stop(h)


# -- batches that end early --------------------------------------------------------------------------


async def test_expired_batch_is_charged_for_what_completed(h):
    texts = [text(), text(), text(), text("SLOW:5000"), text("SLOW:5000"), text("SLOW:5000")]
    final = await run_batch(h, h.alice, "priced-expiring", texts)
    assert final.status == batch_pb2.BATCH_STATUS_EXPIRED
    out, err = await results(h.alice, final)
    assert (final.request_counts.completed, final.request_counts.failed) == (len(out), len(err)) == (3, 3)
    assert {line["error"]["code"] for line in err} == {"batch_expired"}
    # 3 answered: input 300 * 0.000001 = 0.0003; output 156 * 0.000002 = 0.000312; total 0.000612
    assert cost_tuple(final) == (KNOWN, "0.0003", "0.000312", "0.000612")
    [row] = await ledger_rows(h, final.id)
    assert (row["input_tokens"], row["output_tokens"], row["cost_amount"]) == (300, 156, "0.000612")


async def test_cancelled_batch_is_charged_for_what_completed(h):
    a = h.alice
    texts = [text(), text(), text("SLOW:5000"), text("SLOW:5000"), text("SLOW:5000")]
    created = await run_batch(h, a, "priced-llm", texts, wait=False)
    async for event in a.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=created.id),
                                            metadata=a.metadata, timeout=30):
        if event.WhichOneof("event") == "batch" and event.batch.request_counts.completed >= 2:
            break
    await a.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=created.id), metadata=a.metadata)
    final = (await watch_all(a, created.id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_CANCELLED
    out, err = await results(a, final)
    assert (final.request_counts.completed, final.request_counts.failed) == (len(out), len(err)) == (2, 3)
    # 2 answered: input 200 * 0.000001 = 0.0002; output 104 * 0.000002 = 0.000208; total 0.000408
    assert cost_tuple(final) == (KNOWN, "0.0002", "0.000208", "0.000408")
    assert len(await ledger_rows(h, final.id)) == 1


async def start_priced(tmp_path, upstream):
    return await start_harness(tmp_path / "data", config_file=write_config(tmp_path / "models.yaml",
                                                                           entries(upstream.base_url)))


async def failed_at_restart_without_its_deployment(tmp_path, upstream, batch_id: str):
    """Restart on the same data with a model list without "priced-llm": the batch `batch_id` can't
    go on and fails. (the harness, its failed state)."""
    other = write_config(tmp_path / "other.yaml", [priced_entry("half-llm", upstream.base_url,
                                                                "hosted_vllm/house-llm-half", HALF_INFO)])
    h = await start_harness(tmp_path / "data", config_file=other)
    try:
        final = (await watch_all(h.alice, batch_id))[-1]
        assert final.status == batch_pb2.BATCH_STATUS_FAILED
        assert [e.code for e in final.errors] == ["deployment_not_found"]
    except BaseException:
        await stop(h)
        raise
    return h, final


async def test_failed_batch_gets_a_ledger_row_with_zero_cost(tmp_path, upstream):
    h = await start_priced(tmp_path, upstream)
    try:
        created = await run_batch(h, h.alice, "priced-llm", [text("SLOW:10000")], wait=False,
                                  metadata={"team": "search"})
    finally:
        await stop(h)
    h, final = await failed_at_restart_without_its_deployment(tmp_path, upstream, created.id)
    try:
        assert (final.cost.status, final.cost.amount) == (KNOWN, "0")
        [row] = await ledger_rows(h, final.id)
        assert (row["cost_status"], row["cost_amount"], row["cost_nanos"], row["input_tokens"]) == (
            "known", "0", 0, 0)
        report = await query(h, h.alice, group_by=[usage_pb2.USAGE_GROUP_BY_METADATA_KEY], metadata_key="team")
        [only] = report.rows
        assert (dict(only.group), only.batch_count, only.cost_amount, only.unknown_cost_batches) == (
            {"metadata.team": "search"}, 1, "0", 0)
    finally:
        await stop(h)


async def test_failed_batch_is_charged_for_the_answers_it_got(tmp_path, upstream):
    # Two requests are answered (the upstream billed them), the third is still running when the
    # server stops; restarted without the deployment, the batch fails, keeping and charging the two.
    h = await start_priced(tmp_path, upstream)
    try:
        a = h.alice
        created = await run_batch(h, a, "priced-llm", [text(), text("CACHED:40"), text("SLOW:10000")], wait=False)
        async for event in a.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=created.id),
                                                metadata=a.metadata, timeout=30):
            if event.WhichOneof("event") == "batch" and event.batch.request_counts.completed >= 2:
                break
    finally:
        await stop(h)
    h, final = await failed_at_restart_without_its_deployment(tmp_path, upstream, created.id)
    try:
        out, err = await results(h.alice, final)
        assert sorted(line["custom_id"] for line in out) == ["r0", "r1"] and err == []
        assert (final.request_counts.total, final.request_counts.completed, final.request_counts.failed) == (3, 2, 0)
        assert (final.usage.input_tokens, final.usage.input_tokens_details.cached_tokens,
                final.usage.output_tokens) == (200, 40, 104)
        # uncached 160 * 0.000001  = 0.00016
        # cached    40 * 0.0000005 = 0.00002
        # input                     = 0.00018
        # output   104 * 0.000002  = 0.000208
        # total                     = 0.000388
        assert cost_tuple(final) == (KNOWN, "0.00018", "0.000208", "0.000388")
        [row] = await ledger_rows(h, final.id)
        assert (row["cost_status"], row["cost_amount"], row["cost_nanos"], row["input_tokens"]) == (
            "known", "0.000388", 388_000, 200)
        report = await query(h, h.alice)
        assert (report.totals.batch_count, report.totals.cost_amount) == (1, "0.000388")
    finally:
        await stop(h)
