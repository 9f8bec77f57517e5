"""Pricing: price table, usage summing over batch output, cost computation.

Expected costs are computed by hand in the comments (prices per 1M tokens, batch tier).
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from batchgate_server.domain.models import Cost, Usage
from batchgate_server.pricing import (
    ModelPrice,
    PriceTable,
    compute_cost,
    sum_usage_from_output,
    sum_usage_from_output_async,
)
from batchgate_server.pricing.table import PRICE_KEYS


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return PriceTable.load_builtin()


def cost_of(table: PriceTable, usage: dict[str, Usage]) -> Cost:
    return compute_cost(usage, table.price_for, price_source=table.version)


# --- hand-computed costs -------------------------------------------------------


def test_gpt_4o_mini_cost(table):
    # batch: input $0.075/M = 0.000000075/token, output $0.30/M = 0.0000003/token
    # input  12,345 * 0.000000075 = 0.000925875
    # output  6,789 * 0.0000003   = 0.0020367
    # total                        = 0.002962575
    cost = cost_of(table, {"gpt-4o-mini-2024-07-18": Usage(input_tokens=12_345, output_tokens=6_789)})
    assert cost.status == "known"
    assert cost.currency == "USD"
    assert cost.input_amount == "0.000925875"
    assert cost.output_amount == "0.0020367"
    assert cost.amount == "0.002962575"
    assert cost.price_source == "builtin@2026-11-01"
    assert cost.reason == ""


def test_claude_3_5_haiku_cost_with_cached_tokens(table):
    # batch: input $0.40/M, cache read $0.08/M * 50% = $0.04/M (batch and cache discounts stack), output $2/M
    # uncached 6,000 * 0.0000004  = 0.0024
    # cached   4,000 * 0.00000004 = 0.00016
    # input                        = 0.00256
    # output   2,000 * 0.000002   = 0.004
    # total                        = 0.00656
    usage = {"claude-3-5-haiku-20241022": Usage(input_tokens=10_000, cached_tokens=4_000, output_tokens=2_000)}
    cost = cost_of(table, usage)
    assert (cost.status, cost.input_amount, cost.output_amount, cost.amount) == (
        "known", "0.00256", "0.004", "0.00656")


def test_gemini_2_5_flash_cost_with_cached_and_reasoning(table):
    # batch: input $0.15/M; cached $0.03/M (cache discount takes precedence, no stacking); output $1.25/M
    # uncached 50,000 * 0.00000015 = 0.0075
    # cached   50,000 * 0.00000003 = 0.0015
    # input                         = 0.009
    # output   20,000 * 0.00000125 = 0.025  (the 5,000 reasoning tokens are part of the 20,000)
    # total                         = 0.034
    usage = {"publishers/google/models/gemini-2.5-flash": Usage(
        input_tokens=100_000, cached_tokens=50_000, output_tokens=20_000, reasoning_tokens=5_000)}
    cost = cost_of(table, usage)
    assert (cost.status, cost.input_amount, cost.output_amount, cost.amount) == (
        "known", "0.009", "0.025", "0.034")


def test_several_models_sum(table):
    # gpt-4o: 1,000 * 0.00000125 = 0.00125 in, 1,000 * 0.000005 = 0.005 out
    # claude-3-haiku (Bedrock id): 1,000 * 0.000000125 = 0.000125 in, 1,000 * 0.000000625 = 0.000625 out
    # input 0.001375, output 0.005625, total 0.007
    usage = {
        "gpt-4o-2024-08-06": Usage(input_tokens=1_000, output_tokens=1_000),
        "anthropic.claude-3-haiku-20240307-v1:0": Usage(input_tokens=1_000, output_tokens=1_000),
    }
    cost = cost_of(table, usage)
    assert (cost.input_amount, cost.output_amount, cost.amount) == ("0.001375", "0.005625", "0.007")


def test_openai_cached_tokens_charged_at_batch_input_price(table):
    # gpt-4.1 batch input $1/M; cached in batch assumed = batch input ($1/M, not $0.50/M)
    # 1,000,000 input (400,000 cached) * 0.000001 = 1; 0 output
    cost = cost_of(table, {"gpt-4.1": Usage(input_tokens=1_000_000, cached_tokens=400_000)})
    assert (cost.input_amount, cost.output_amount, cost.amount) == ("1", "0", "1")


def test_gpt5_cached_tokens_stack(table):
    # gpt-5 batch input $0.625/M, batch cached $0.0625/M
    # uncached 600,000 * 0.000000625 = 0.375; cached 400,000 * 0.0000000625 = 0.025; input 0.4
    cost = cost_of(table, {"gpt-5": Usage(input_tokens=1_000_000, cached_tokens=400_000)})
    assert cost.input_amount == "0.4"


def test_reasoning_tokens_not_charged_twice(table):
    # o4-mini batch output $2.20/M: 1,000 output tokens (600 of them reasoning) * 0.0000022 = 0.0022
    cost = cost_of(table, {"o4-mini": Usage(output_tokens=1_000, reasoning_tokens=600)})
    assert cost.output_amount == "0.0022"


def test_cached_tokens_clamped_to_input(table):
    # claude-3-haiku: cached 500 > input 100 -> 100 cached * 0.000000015 = 0.0000015
    cost = cost_of(table, {"claude-3-haiku": Usage(input_tokens=100, cached_tokens=500)})
    assert cost.input_amount == "0.0000015"


def test_embedding_cost(table):
    # text-embedding-3-small batch $0.01/M: 250,000 * 0.00000001 = 0.0025
    cost = cost_of(table, {"text-embedding-3-small": Usage(input_tokens=250_000)})
    assert (cost.amount, cost.output_amount) == ("0.0025", "0")


# --- unknown / zero ----------------------------------------------------------------


def test_unknown_model_makes_cost_unknown(table):
    usage = {"gpt-4o-mini": Usage(input_tokens=10, output_tokens=10),
             "mystery-model-9000": Usage(input_tokens=5, output_tokens=1),
             "azure/my-deployment": Usage(input_tokens=1)}
    cost = cost_of(table, usage)
    assert cost.status == "unknown"
    assert cost.amount == "" and cost.input_amount == "" and cost.output_amount == ""
    assert "mystery-model-9000" in cost.reason and "azure/my-deployment" in cost.reason
    assert "gpt-4o-mini" not in cost.reason
    assert cost.price_source == table.version


def test_fine_tuned_model_is_not_priced_as_its_base(table):
    assert table.price_for("ft:gpt-4o-mini-2024-07-18:org::abc123") is None


def test_zero_usage_is_known_zero(table):
    for usage in ({}, {"gpt-4o-mini": Usage()}, {"never-priced": Usage()}):
        cost = cost_of(table, usage)
        assert (cost.status, cost.amount, cost.input_amount, cost.output_amount) == ("known", "0", "0", "0")


def test_output_tokens_without_output_price_are_unknown(table):
    price = table.price_for("local-embedder", {"input_cost_per_token": "0.0000001"})
    assert price is not None and price.output is None
    ok = compute_cost({"local-embedder": Usage(input_tokens=10)}, lambda m: price, price_source="x")
    assert (ok.status, ok.amount) == ("known", "0.0000005")  # 10 * 0.00000005 (half of standard)
    bad = compute_cost({"local-embedder": Usage(input_tokens=10, output_tokens=1)}, lambda m: price,
                       price_source="x")
    assert bad.status == "unknown" and "local-embedder" in bad.reason and bad.amount == ""


def test_amounts_rounded_half_up_to_nano_dollars():
    price = ModelPrice(input=Decimal("0.0000000001"), output=Decimal("0.00000000015"),
                       cached_input=Decimal("0.0000000001"))
    # input 5 * 1e-10 = 5e-10 -> 0.000000001; output 3 * 1.5e-10 = 4.5e-10 -> 0
    cost = compute_cost({"m": Usage(input_tokens=5, output_tokens=3)}, lambda m: price, price_source="t")
    assert (cost.input_amount, cost.output_amount, cost.amount) == ("0.000000001", "0", "0.000000001")
    assert Decimal(cost.amount) == Decimal(cost.input_amount) + Decimal(cost.output_amount)


def test_large_amounts_are_exact(table):
    # claude-opus-4-1: 3e9 input * 0.0000075 = 22500; 1e9 output * 0.0000375 = 37500
    cost = cost_of(table, {"claude-opus-4-1": Usage(input_tokens=3_000_000_000, output_tokens=1_000_000_000)})
    assert (cost.input_amount, cost.output_amount, cost.amount) == ("22500", "37500", "60000")


# --- the builtin table ------------------------------------------------------------------


REFERENCE = {  # provider-batch-apis.md section 6: standard in/out -> batch in/out, USD per 1M tokens
    "gpt-4o-mini": ("0.15", "0.60", "0.075", "0.30"),
    "gpt-4o-2024-08-06": ("2.50", "10.00", "1.25", "5.00"),
    "claude-sonnet-4": ("3", "15", "1.50", "7.50"),
    "claude-sonnet-4-5": ("3", "15", "1.50", "7.50"),
    "claude-3-5-haiku": ("0.80", "4", "0.40", "2.00"),
    "claude-haiku-4-5": ("1", "5", "0.50", "2.50"),
    "claude-3-haiku": ("0.25", "1.25", "0.125", "0.625"),
    "gemini-2.5-flash": ("0.30", "2.50", "0.15", "1.25"),
    "gemini-2.5-flash-lite": ("0.10", "0.40", "0.05", "0.20"),
}


@pytest.mark.parametrize("model", sorted(REFERENCE))
def test_builtin_matches_reference_table(table, model):
    m = Decimal(1_000_000)
    si, so, bi, bo = (Decimal(x) / m for x in REFERENCE[model])
    p = table.price_for(model)
    assert (p.standard_input, p.standard_output, p.input, p.output) == (si, so, bi, bo)


def test_builtin_file_shape(table):
    from importlib import resources

    doc = json.loads(resources.files("batchgate_server.pricing").joinpath("prices.json").read_text())
    assert doc["version"] == "2026-11-01" and doc["currency"] == "USD" and doc["source"]
    for name, entry in doc["models"].items():
        assert entry["provider"] in ("openai", "anthropic", "vertex_ai")
        for key in PRICE_KEYS:
            if key in entry:
                assert isinstance(entry[key], str), (name, key)  # decimal strings, never floats
                assert "e" not in entry[key].lower()
        # every provider advertises 50% off for batch
        assert Decimal(entry["input_cost_per_token_batches"]) * 2 == Decimal(entry["input_cost_per_token"])
        assert Decimal(entry["output_cost_per_token_batches"]) * 2 == Decimal(entry["output_cost_per_token"])
    for alias, target in doc["aliases"].items():
        assert target in doc["models"], alias
    for required in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o3-mini", "o4-mini",
                     "text-embedding-3-small", "text-embedding-3-large", "claude-sonnet-4", "claude-sonnet-4-5",
                     "claude-opus-4", "claude-opus-4-1", "claude-3-5-haiku", "claude-haiku-4-5", "claude-3-haiku",
                     "gemini-2.5-flash", "gemini-2.5-flash-lite", "gemini-2.5-pro"):
        assert required in doc["models"], required


@pytest.mark.parametrize("name,expected", [
    ("gpt-4o-2024-08-06", "gpt-4o"),
    ("gpt-4o-2024-11-20", "gpt-4o"),
    ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),  # priced differently: its own entry
    ("openai/gpt-4o-mini", "gpt-4o-mini"),
    ("azure/gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
    ("GPT-4O-MINI", "gpt-4o-mini"),
    ("o4-mini-2025-04-16", "o4-mini"),
    ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
    ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
    ("claude-3-5-haiku@20241022", "claude-3-5-haiku"),  # Vertex AI Claude id
    ("anthropic.claude-3-haiku-20240307-v1:0", "claude-3-haiku"),
    ("us.anthropic.claude-sonnet-4-20250514-v1:0", "claude-sonnet-4"),
    ("bedrock/global.anthropic.claude-haiku-4-5-20251001-v1:0", "claude-haiku-4-5"),
    ("anthropic.claude-3-5-sonnet-20241022-v2:0", "claude-3-5-sonnet"),
    ("publishers/google/models/gemini-2.5-flash", "gemini-2.5-flash"),
    ("projects/p/locations/us-central1/publishers/google/models/gemini-2.5-pro", "gemini-2.5-pro"),
    ("vertex_ai/gemini-2.5-flash-lite", "gemini-2.5-flash-lite"),
    ("gemini-2.0-flash-001", "gemini-2.0-flash"),
    ("gemini-2.5-flash-lite", "gemini-2.5-flash-lite"),  # not mangled into gemini-2.5-flash
    ("text-embedding-3-large", "text-embedding-3-large"),
    ("no-such-model", None),
    ("", None),
])
def test_name_resolution(table, name, expected):
    assert table.resolve_name(name) == expected


# --- rules: half of standard, cached conventions -----------------------------------------


def _table(models: dict) -> PriceTable:
    return PriceTable.from_dict({"models": models}, version="test@1")


def test_batch_defaults_to_half_of_standard():
    t = _table({"m": {"input_cost_per_token": "0.000002", "output_cost_per_token": "0.000008"}})
    p = t.price_for("m")
    assert (p.input, p.output) == (Decimal("0.000001"), Decimal("0.000004"))
    assert (p.standard_input, p.standard_output) == (Decimal("0.000002"), Decimal("0.000008"))
    assert "50% of standard" in p.source
    # no cached price known: cached tokens at the batch input price, and the source says so
    assert p.cached_input == p.input and "cached tokens at batch input price" in p.source


def test_explicit_batch_price_wins_over_half():
    t = _table({"m": {"input_cost_per_token": "0.000002", "input_cost_per_token_batches": "0.0000015",
                      "output_cost_per_token": "0.000008"}})
    p = t.price_for("m")
    assert p.input == Decimal("0.0000015") and p.output == Decimal("0.000004")


@pytest.mark.parametrize("model,provider,expected", [
    ("claude-x", "anthropic", "0.00000015"),  # stacks: 50% of standard cached 0.0000003
    ("some-model", "anthropic", "0.00000015"),
    ("gemini-x", "vertex_ai", "0.0000003"),  # cache discount takes precedence: standard cached
    ("gpt-x", "openai", "0.0000015"),  # no cache discount assumed inside a batch: batch input
    ("gpt-x", "", "0.0000015"),
])
def test_cached_batch_price_conventions(model, provider, expected):
    entry = {"input_cost_per_token": "0.000003", "output_cost_per_token": "0.000015",
             "cache_read_input_token_cost": "0.0000003"}
    if provider:
        entry["provider"] = provider
    p = _table({model: entry}).price_for(model)
    assert p.cached_input == Decimal(expected)
    assert p.standard_cached_input == Decimal("0.0000003")
    assert "batch cached" in p.source


def test_entry_without_input_price_is_unpriced():
    assert _table({"m": {"output_cost_per_token": "0.000001"}}).price_for("m") is None


def test_bad_price_values_rejected():
    for bad in ("abc", "-0.1", True, "NaN", "Infinity"):
        with pytest.raises(ValueError):
            _table({"m": {"input_cost_per_token": bad}})
    with pytest.raises(ValueError):
        PriceTable.from_dict({"currency": "EUR", "models": {}})


# --- operator override file ------------------------------------------------------------


def test_override_file_yaml(tmp_path, table):
    path = tmp_path / "prices.yaml"
    path.write_text(
        "version: '2026-12-01'\n"
        "models:\n"
        "  gpt-4o-mini:\n"
        "    input_cost_per_token: 2.0e-07     # new standard price: batch re-derived as half\n"
        "  my-llama:\n"
        "    provider: openai_compatible\n"
        "    input_cost_per_token_batches: '0.0000001'\n"
        "    output_cost_per_token_batches: 2e-7\n"
        "  claude-3-haiku: null               # removed\n"
        "aliases:\n"
        "  llama-3-8b-instruct: my-llama\n"
    )
    t = PriceTable.load_file(path)
    assert t.version == f"file:{path}@2026-12-01"
    p = t.price_for("gpt-4o-mini-2024-07-18")
    assert p.input == Decimal("0.0000001")  # half of the overridden 0.0000002
    assert p.output == Decimal("0.0000003")  # untouched builtin batch output
    assert p.source.startswith(f"file:{path}@2026-12-01 over builtin@2026-11-01")
    llama = t.price_for("openai/llama-3-8b-instruct")
    assert (llama.input, llama.output, llama.standard_input) == (Decimal("1e-7"), Decimal("2e-7"), None)
    assert t.price_for("claude-3-haiku") is None
    assert t.price_for("anthropic.claude-3-haiku-20240307-v1:0") is None  # its aliases went with it
    assert t.price_for("gemini-2.5-flash") == table.price_for("gemini-2.5-flash")  # rest of builtin kept
    # 1,000 input * 0.0000001 + 1,000 output * 0.0000003 = 0.0001 + 0.0003 = 0.0004
    cost = compute_cost({"gpt-4o-mini": Usage(input_tokens=1_000, output_tokens=1_000)}, t.price_for,
                        price_source=t.version)
    assert (cost.amount, cost.price_source) == ("0.0004", t.version)


def test_override_file_json_without_version(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"models": {"claude-3-5-haiku": {
        "input_cost_per_token_batches": "0.0000005", "output_cost_per_token_batches": "0.0000025"}}}))
    t = PriceTable.load_file(path)
    assert t.version.startswith(f"file:{path}@sha256:")
    p = t.price_for("claude-3-5-haiku-20241022")
    assert (p.input, p.output) == (Decimal("0.0000005"), Decimal("0.0000025"))
    assert p.standard_input == Decimal("0.0000008")  # builtin standard kept
    assert p.cached_input == Decimal("0.00000004")  # builtin batch cached kept


def test_override_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"models": {"m": {"input_cost_per_token": "x"}}}))
    with pytest.raises(ValueError, match="models.m.input_cost_per_token"):
        PriceTable.load_file(bad)
    bad.write_text(json.dumps({"aliases": {"a": "no-such-model"}}))
    with pytest.raises(ValueError, match="no-such-model"):
        PriceTable.load_file(bad)


# --- per-deployment model_info -----------------------------------------------------------


def test_model_info_overrides_win(table):
    info = {"mode": "batch", "input_cost_per_token_batches": 1e-07}  # float from YAML config
    p = table.price_for("gpt-4o-mini", info)
    assert p == table.with_overrides("gpt-4o-mini", info)
    assert p.input == Decimal("0.0000001")
    assert p.output == Decimal("0.0000003")  # from the table
    assert p.source == "model_info over builtin@2026-11-01"


def test_model_info_standard_price_rederives_batch(table):
    p = table.price_for("gpt-4o-mini", {"input_cost_per_token": "0.000001", "output_cost_per_token": "0.000004"})
    assert (p.input, p.output) == (Decimal("0.0000005"), Decimal("0.000002"))


def test_model_info_without_prices_uses_table(table):
    assert table.price_for("claude-haiku-4-5", {"mode": "batch"}) == table.price_for("claude-haiku-4-5")


def test_model_info_for_unknown_model_and_base_model(table):
    p = table.price_for("my-azure-deployment", {"input_cost_per_token": "0.000004",
                                                "output_cost_per_token": "0.000016"})
    assert (p.input, p.output) == (Decimal("0.000002"), Decimal("0.000008"))
    assert p.source.startswith("model_info (batch input = 50% of standard")
    # LiteLLM's base_model names the priced model behind an Azure deployment name
    q = table.price_for("my-azure-deployment", {"base_model": "azure/gpt-4o"})
    assert q == table.price_for("gpt-4o")
    assert table.price_for("my-azure-deployment", {"mode": "batch"}) is None


# --- snapshots ---------------------------------------------------------------------


@pytest.mark.parametrize("model,info", [
    ("gpt-4o-mini-2024-07-18", None),
    ("claude-3-5-haiku", None),
    ("publishers/google/models/gemini-2.5-flash", None),
    ("gpt-4o-mini", {"input_cost_per_token_batches": "0.0000001"}),
    ("local", {"input_cost_per_token": "0.0000001"}),  # no output price
])
def test_snapshot_round_trip(table, model, info):
    snap = json.loads(json.dumps(table.snapshot(model, info)))  # survives JSON storage
    assert snap["priced"] is True and snap["table_version"] == table.version and snap["model"] == model
    assert ModelPrice.from_snapshot(snap) == table.price_for(model, info)


def test_snapshot_prices_survive_table_change(tmp_path, table):
    snap = table.snapshot("gpt-4o-mini")
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"version": "v2", "models": {"gpt-4o-mini": {"input_cost_per_token": "1"}}}))
    newer = PriceTable.load_file(path)
    assert newer.price_for("gpt-4o-mini").input == Decimal("0.5")
    frozen = ModelPrice.from_snapshot(snap)
    # 1,000 * 0.000000075 = 0.000075 at the price in force when the batch was created
    cost = compute_cost({"gpt-4o-mini": Usage(input_tokens=1_000)}, lambda m: frozen,
                        price_source=snap["table_version"])
    assert (cost.amount, cost.price_source) == ("0.000075", "builtin@2026-11-01")


def test_unpriced_snapshot(table):
    snap = table.snapshot("mystery")
    assert snap["priced"] is False and json.dumps(snap)
    with pytest.raises(ValueError):
        ModelPrice.from_snapshot(snap)


# --- usage over batch output lines ----------------------------------------------------------


def out_line(body: dict | None, status: int = 200, cid: str = "c", error: dict | None = None) -> bytes:
    resp = None if body is None else {"status_code": status, "request_id": "req_1", "body": body}
    return json.dumps({"id": "batch_req_1", "custom_id": cid, "response": resp, "error": error}).encode() + b"\n"


CHAT = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi \"usage\": {}"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
                  "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 8, "audio_tokens": 0}}}
EMBED = {"object": "list", "model": "text-embedding-3-small",
         "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
         "usage": {"prompt_tokens": 7, "total_tokens": 7}}
RESPONSES = {"id": "resp_1", "object": "response", "model": "o4-mini-2025-04-16", "status": "completed",
             "output": [], "usage": {"input_tokens": 300, "input_tokens_details": {"cached_tokens": 128},
                                     "output_tokens": 50, "output_tokens_details": {"reasoning_tokens": 30},
                                     "total_tokens": 350}}
ANTHROPIC_NATIVE = {"id": "msg_1", "type": "message", "model": "claude-3-5-haiku-20241022",
                    "usage": {"input_tokens": 10, "cache_read_input_tokens": 90,
                              "cache_creation_input_tokens": 5, "output_tokens": 3}}


def test_usage_shapes():
    lines = [out_line(CHAT), out_line(CHAT), out_line(EMBED), out_line(RESPONSES), out_line(ANTHROPIC_NATIVE)]
    got = sum_usage_from_output(lines)
    assert got == {
        "gpt-4o-mini-2024-07-18": Usage(input_tokens=200, cached_tokens=128, output_tokens=40, reasoning_tokens=16),
        "text-embedding-3-small": Usage(input_tokens=7),
        "o4-mini-2025-04-16": Usage(input_tokens=300, cached_tokens=128, output_tokens=50, reasoning_tokens=30),
        # Anthropic input_tokens excludes cache reads/writes: 10 + 90 + 5
        "claude-3-5-haiku-20241022": Usage(input_tokens=105, cached_tokens=90, output_tokens=3,
                                           cache_creation_tokens=5),
    }


def test_embeddings_total_only_and_nulls():
    lines = [out_line({"model": "e", "usage": {"total_tokens": 9}}),
             out_line({"model": "e", "usage": {"prompt_tokens": None, "completion_tokens": None,
                                               "total_tokens": 4, "prompt_tokens_details": None}})]
    assert sum_usage_from_output(lines) == {"e": Usage(input_tokens=13)}


def test_failed_and_odd_lines_contribute_nothing():
    lines = [
        out_line({"error": {"message": "bad", "type": "invalid_request_error"}}, status=400),
        out_line(CHAT, status=500),  # usage on a non-2xx line still does not count
        out_line(CHAT, status=429),
        out_line(None, error={"code": "batch_expired", "message": "expired"}),
        out_line({"model": "gpt-4o-mini", "choices": []}),  # 2xx without usage
        out_line({"model": "gpt-4o-mini", "usage": "n/a"}),
        b"",
        b"\n",
        b"not json \"usage\"\n",
        b'{"truncated": "usage"',
        b'["usage"]\n',
    ]
    assert sum_usage_from_output(lines) == {}
    cost = compute_cost(sum_usage_from_output(lines), PriceTable.load_builtin().price_for, price_source="t")
    assert (cost.status, cost.amount) == ("known", "0")


def test_leading_blanks_and_bad_utf8():
    lines = [b"  " + out_line(CHAT), b'{"usage": "\xff\xfe"}\n', out_line(CHAT)[:-30]]
    assert sum_usage_from_output(lines)["gpt-4o-mini-2024-07-18"].input_tokens == 100


def test_2xx_variants_count():
    lines = [out_line(CHAT, status=201), out_line(CHAT, status=299)]
    assert sum_usage_from_output(lines)["gpt-4o-mini-2024-07-18"].input_tokens == 200


def test_str_lines_body_string_and_default_model():
    body_as_string = json.dumps({"id": "x", "custom_id": "c", "response": {
        "status_code": 200, "body": json.dumps({"model": "m1", "usage": {"prompt_tokens": 1,
                                                                         "completion_tokens": 2}})}})
    no_model = out_line({"usage": {"prompt_tokens": 5, "completion_tokens": 1}}).decode()
    got = sum_usage_from_output([body_as_string, no_model], default_model="gpt-4o-mini")
    assert got == {"m1": Usage(input_tokens=1, output_tokens=2),
                   "gpt-4o-mini": Usage(input_tokens=5, output_tokens=1)}


def test_streams_from_a_file(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"".join(out_line(CHAT, cid=f"c{i}") for i in range(1_000)))
    with path.open("rb") as f:
        got = sum_usage_from_output(f)
    assert got == {"gpt-4o-mini-2024-07-18": Usage(input_tokens=100_000, cached_tokens=64_000,
                                                  output_tokens=20_000, reasoning_tokens=8_000)}


async def test_async_variant():
    async def gen():
        for line in (out_line(CHAT), out_line(CHAT, status=400), out_line(RESPONSES)):
            yield line

    got = await sum_usage_from_output_async(gen())
    assert got == sum_usage_from_output([out_line(CHAT), out_line(RESPONSES)])


def test_end_to_end_output_file_cost(table):
    # two chat lines of gpt-4o-mini: input 200 (128 cached), output 40
    # batch input and cached both $0.075/M: 200 * 0.000000075 = 0.000015; output 40 * 0.0000003 = 0.000012
    lines = [out_line(CHAT), out_line(CHAT), out_line(CHAT, status=400)]
    cost = compute_cost(sum_usage_from_output(lines), table.price_for, price_source=table.version)
    assert (cost.status, cost.input_amount, cost.output_amount, cost.amount) == (
        "known", "0.000015", "0.000012", "0.000027")


# --- prompt-cache writes and long-context tiers -------------------------------------------------


def test_claude_cache_writes_5_minute_and_1_hour(table):
    # claude-sonnet-4-5 batch (builtin): input $1.50/M, cache read $0.15/M, 5-minute write $1.875/M
    # (1.25 x $3 = $3.75/M standard, halved), 1-hour write $3/M (2 x $3 = $6/M, halved), output $7.50/M.
    # prompt 10,000 = 1,000 uncached + 2,000 read + 7,000 written (3,000 of them 1-hour)
    # uncached 1,000 * 0.0000015   = 0.0015
    # read     2,000 * 0.00000015  = 0.0003
    # 5-minute 4,000 * 0.000001875 = 0.0075
    # 1-hour   3,000 * 0.000003    = 0.009
    # input                         = 0.0183
    # output     500 * 0.0000075   = 0.00375
    # total                         = 0.02205
    usage = Usage(input_tokens=10_000, cached_tokens=2_000, cache_creation_tokens=7_000,
                  cache_creation_1h_tokens=3_000, output_tokens=500)
    cost = cost_of(table, {"claude-sonnet-4-5-20250929": usage})
    assert (cost.status, cost.input_amount, cost.output_amount, cost.amount) == (
        "known", "0.0183", "0.00375", "0.02205")


def test_anthropic_cache_write_prices_default_to_the_published_multipliers():
    # A Claude entry without cache-write prices: 1.25x (5-minute) and 2x (1-hour) the input price,
    # halved in batch like every token class: input $2/M -> batch $1/M, writes $1.25/M and $2/M.
    t = PriceTable.from_dict({"models": {"claude-custom": {"provider": "anthropic",
                                                          "input_cost_per_token": "0.000002",
                                                          "output_cost_per_token": "0.00001"}}})
    p = t.price_for("claude-custom")
    assert (p.input, p.cache_write, p.cache_write_1h) == (
        Decimal("0.000001"), Decimal("0.00000125"), Decimal("0.000002"))
    assert "1.25x (5-minute) / 2x (1-hour)" in p.source
    # Elsewhere writes a provider reports without a price are charged as input.
    other = PriceTable.from_dict({"models": {"house": {"input_cost_per_token": "0.000002"}}}).price_for("house")
    assert other.cache_write == other.cache_write_1h == other.input == Decimal("0.000001")


def test_old_snapshot_without_cache_write_prices_uses_the_anthropic_multipliers(table):
    snap = table.snapshot("claude-3-5-haiku")
    for key in [k for k in snap if k.startswith("cache_creation")]:
        del snap[key]  # stored before cache writes were priced
    price = ModelPrice.from_snapshot(snap)
    # batch input $0.40/M: 5-minute 1.25 x = $0.50/M, 1-hour 2 x = $0.80/M
    assert (price.cache_write, price.cache_write_1h) == (Decimal("0.0000005"), Decimal("0.0000008"))


def test_gemini_2_5_pro_tier_above_200k_prompt_tokens(table):
    # gemini-2.5-pro batch (builtin): up to 200k prompt tokens input $0.625/M, output $5/M;
    # above, the whole request: input $1.25/M, output $7.50/M, cache read $0.25/M (cache discount wins).
    price = table.price_for("gemini-2.5-pro")
    assert price.thresholds == (200_000,)
    usage = {("gemini-2.5-pro", 0): Usage(input_tokens=300_000, output_tokens=2_000),
             ("gemini-2.5-pro", 200_000): Usage(input_tokens=250_000, cached_tokens=50_000, output_tokens=1_000)}
    # base  input  300,000 * 0.000000625 = 0.1875
    # base  output   2,000 * 0.000005    = 0.01
    # above uncached 200,000 * 0.00000125 = 0.25
    # above cached    50,000 * 0.00000025 = 0.0125
    # above output     1,000 * 0.0000075  = 0.0075
    # input 0.45, output 0.0175, total 0.4675
    cost = cost_of(table, usage)
    assert (cost.input_amount, cost.output_amount, cost.amount) == ("0.45", "0.0175", "0.4675")


def test_claude_1m_context_tier_with_cache_writes(table):
    # claude-sonnet-4 above 200k (batch = half of the 1M-context list prices): input $3/M,
    # 5-minute write $3.75/M, output $11.25/M.
    # 210,000 prompt = 200,000 uncached + 10,000 written; 1,000 output
    # uncached 200,000 * 0.000003    = 0.6
    # written   10,000 * 0.00000375  = 0.0375
    # output     1,000 * 0.00001125  = 0.01125
    usage = {("claude-sonnet-4-20250514", 200_000): Usage(input_tokens=210_000, cache_creation_tokens=10_000,
                                                         output_tokens=1_000)}
    cost = cost_of(table, usage)
    assert (cost.input_amount, cost.output_amount, cost.amount) == ("0.6375", "0.01125", "0.64875")


def test_tier_prices_survive_the_snapshot_and_the_executors_standard_rate(table):
    snap = json.loads(json.dumps(table.snapshot("gemini-2.5-pro")))
    assert snap["input_cost_per_token_above_200k_tokens_batches"] == "0.00000125"
    assert ModelPrice.from_snapshot(snap) == table.price_for("gemini-2.5-pro")
    # The built-in executor makes real-time requests: every batch rate, tiers included, is the standard one.
    from batchgate_server.core.accounting import Accounting
    executor = ModelPrice.from_snapshot(Accounting(table).snapshot("gemini-2.5-pro", None, "openai_compatible"))
    assert (executor.input, executor.at_tier(200_000).input, executor.at_tier(200_000).output) == (
        Decimal("0.00000125"), Decimal("0.0000025"), Decimal("0.000015"))


def test_usage_summed_per_tier_by_prompt_size():
    from batchgate_server.pricing.usage import sum_usage_by_tier

    def line(prompt: int) -> bytes:
        return out_line({"model": "m", "usage": {"prompt_tokens": prompt, "completion_tokens": 1}})

    got = sum_usage_by_tier([line(200_000), line(200_001), line(5), line(900_000)], (200_000, 800_000))
    assert got == {("m", 0): Usage(input_tokens=200_005, output_tokens=2),
                   ("m", 200_000): Usage(input_tokens=200_001, output_tokens=1),
                   ("m", 800_000): Usage(input_tokens=900_000, output_tokens=1)}


def test_tier_keys_in_model_info_rederive_their_batch_twin(table):
    # A standard tier price in model_info drops the table's batch twin: re-derived as half of it.
    p = table.price_for("gemini-2.5-pro", {"input_cost_per_token_above_200k_tokens": "0.000004"})
    assert p.at_tier(200_000).input == Decimal("0.000002")
    assert p.at_tier(200_000).output == Decimal("0.0000075")  # the table's, untouched
