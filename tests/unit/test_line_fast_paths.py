"""The passthrough's per-line fast paths against the full-parse paths they stand in for.

* mapping.rewrite_line splices body.model (and Azure's url) into the line's bytes
  (providers/json_splice.py); it must read back, as Python's json reads it, exactly as the
  decode + re-encode it replaced (mapping._rewrite_decoded), on every line a user can upload,
  hostile ones included.
* UsageCounter reads only the members usage needs (pricing/usage.py add_output_line); it must
  count what sum_usage_by_tier counts.
"""

from __future__ import annotations

import importlib
import json

import pytest

from batchgate_server.core.accounting import UsageCounter
from batchgate_server.domain.deployment import Deployment
from batchgate_server.domain.models import Usage
from batchgate_server.pricing.usage import sum_usage_by_tier
from batchgate_server.providers.openai_batch import mapping as m
from batchgate_server.providers.registry import BUILTIN_PROVIDERS

MODEL = "gpt-4o-mini-2024-07-18"


def line(body: object = None, *, url: str = "/v1/chat/completions", raw_body: str | None = None) -> bytes:
    body_text = raw_body if raw_body is not None else json.dumps(body)
    return (f'{{"custom_id": "r-1", "method": "POST", "url": {json.dumps(url)}, "body": {body_text}}}').encode()


HOSTILE_LINES = [
    line({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "héllo \u2028 \"q\" \\"}]}),
    line(raw_body='{"model":"a","messages":[],"model":"b"}'),  # duplicated: json reads the last
    line(raw_body='{"model":"a","model":"b"}'),
    line(raw_body='{"mod\\u0065l": "a", "messages": []}'),  # the key spelled with an escape
    line(raw_body='{"model": "a", "mod\\u0065l": "b"}'),
    line(raw_body='{"tools": [{"parameters": {"properties": {"model": {"type": "string"}}}}], "model": "a"}'),
    line(raw_body='{"metadata": {"model": "nested"}, "model": "a"}'),  # a nested one first
    line(raw_body='{"x\\"model": "v", "model": "a"}'),  # the name at a key's end, after an escaped quote
    line(raw_body='{"content": "say \\"model\\": \\"x\\"", "model": "a"}'),  # the name inside a string
    line(raw_body='{"model" :\t"a" , "n": 1}'),
    line(raw_body='{"model": null}'),
    line(raw_body='{"model": 7}'),
    line(raw_body='{"model": -1.5e3}'),
    line(raw_body='{"model": true}'),
    line(raw_body='{"model": {"name": "a"}}'),  # an object: not spliced
    line(raw_body='{"model": ["a"]}'),
    line(raw_body='{"model": {"model": "a"}}'),
    line(raw_body='{"model": "a\\u0000b\\ud83d\\ude00"}'),
    line(raw_body='{"model": "\\ud800"}'),  # a lone surrogate: msgspec refuses it, json reads it
    line(raw_body='{"input": "x"}'),  # no model: added by the re-encode
    line(raw_body='{}'),
    line(raw_body='"not an object"'),
    line(raw_body='null'),
    line(raw_body='{"model": "a", "n": NaN}'),  # json reads NaN, cannot write it: passed through
    line(raw_body='{"model": "a", "big": 123456789012345678901234567890}'),
    line({"model": MODEL}),  # already the deployment's
    b'{"body": {"model": "a"}, "url": "/v1/embeddings", "custom_id": "x"}',  # body before url
    b'{"url": "/v1/chat/completions", "url": "/v1/embeddings", "body": {"model": "a"}}',
    b'{"body": {"url": "/v1/nested", "model": "a"}, "url": "/v1/embeddings"}',
    b'{"url": 5, "body": {"model": "a"}}',
    # Azure's two splices, read back once: a url at a key's end, a model named like the new url
    b'{"x\\"url": "/v1/a", "url": "/v1/chat/completions", "body": {"model": "a"}}',
    b'{"url": "/v1/chat/completions", "body": {"model": "/chat/completions"}}',
    b'{"body": {"model": "/v1/embeddings"}, "url": "/v1/embeddings"}',
    b'  {"body": {"model": "a"}}  ',
    b'{"body": {"model": "a"}} trailing',
    b'{"body": {"model": "\xff"}}',  # bad UTF-8
    b'{"body": {"model": "a", "text": "\xc3\x28"}}',
    b'{"body": {"model": "a", "text": "caf\xc3\xa9"}}',
    b'[1, 2]',
    b'{not json',
    b'',
]


def reads(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return ("unreadable", raw)


@pytest.mark.parametrize("azure", [False, True])
@pytest.mark.parametrize("model", [MODEL, "a", 'dep "quoted" \\ é \u2028', "/chat/completions"])
@pytest.mark.parametrize("raw", HOSTILE_LINES)
def test_rewrite_reads_as_the_full_reencode(raw, model, azure):
    spliced = m.rewrite_line(raw, model, azure=azure)
    assert reads(spliced) == reads(m._rewrite_decoded(raw, model, azure=azure))
    assert b"\n" not in spliced


def test_rewrite_keeps_the_prompt_bytes_as_written():
    raw = line({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "caf\u00e9 \u2028"}]})
    assert b"caf\\u00e9 \\u2028" in raw  # json.dumps escapes them
    out = m.rewrite_line(raw, MODEL, azure=True)
    assert out == raw.replace(b'"gpt-4o-mini"', f'"{MODEL}"'.encode()).replace(
        b'"/v1/chat/completions"', b'"/chat/completions"')


def test_rewrite_of_a_large_number_keeps_it_exact():
    raw = line(raw_body='{"model": "a", "seed": 123456789012345678901234567890, "t": 1e400}')
    out = m.rewrite_line(raw, MODEL)
    assert b"123456789012345678901234567890" in out and b"1e400" in out
    assert json.loads(out)["body"]["model"] == MODEL


def out_line(body: object, status: object = 200, *, raw_body: str | None = None) -> bytes:
    body_text = raw_body if raw_body is not None else json.dumps(body)
    return (f'{{"id": "batch_req_1", "custom_id": "c", "response": {{"status_code": {json.dumps(status)}, '
            f'"body": {body_text}}}, "error": null}}\n').encode()


CHAT = {"model": "gpt-4o-mini-2024-07-18", "choices": [{"message": {"content": "y" * 300}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
                  "prompt_tokens_details": {"cached_tokens": 64}, "completion_tokens_details": {"reasoning_tokens": 8}}}
HOSTILE_OUTPUT = [
    out_line(CHAT),
    out_line(CHAT, status=201),
    out_line(CHAT, status="200"),
    out_line(CHAT, status=True),
    out_line(CHAT, status=None),
    out_line(CHAT, status=500),
    out_line(CHAT, status=199.0),
    out_line({"model": "m", "usage": {"input_tokens": 300000, "output_tokens": 5,
                                      "cache_read_input_tokens": 7, "cache_creation_input_tokens": 3,
                                      "cache_creation": {"ephemeral_1h_input_tokens": 2}}}),
    out_line({"model": "m", "usage": {"prompt_tokens": 250000, "completion_tokens": 1}}),
    out_line({"usage": {"prompt_tokens": 5, "completion_tokens": 1}}),  # no model
    out_line({"model": 5, "usage": {"prompt_tokens": 5}}),
    out_line({"model": "", "usage": {"total_tokens": 9}}),
    out_line({"model": "m", "usage": "n/a"}),
    out_line({"model": "m", "usage": None}),
    out_line({"model": "m", "usage": {"prompt_tokens": "12", "completion_tokens": 3.0}}),
    out_line(None, raw_body=json.dumps(json.dumps({"model": "s", "usage": {"prompt_tokens": 4}}))),  # a string
    out_line(None, raw_body='{"model": "m", "usage": {"prompt_tokens": 1}, "usage": {"prompt_tokens": 2}}'),
    out_line(None, raw_body='{"model": "m", "logprob": NaN, "usage": {"prompt_tokens": 3}}'),
    out_line(None, raw_body='{"model": "m", "text": "\\ud800", "usage": {"prompt_tokens": 3}}'),
    out_line(None, raw_body='{"model": "m", "text": "\xff", "usage": {"prompt_tokens": 3}}'),
    out_line(None, raw_body='[{"usage": {"prompt_tokens": 3}}]'),
    b'  ' + out_line(CHAT),
    out_line(CHAT)[:-3] + b'} trailing "usage"',
    out_line(None, raw_body='{"model": "m", "us\\u0061ge": {"prompt_tokens": 6}}'),  # the key spelled with an escape
    out_line(None, raw_body='{"model": "m", "seed": ' + "7" * 4301 + ', "usage": {"prompt_tokens": 8}}'),  # past int()
    out_line(None, raw_body='{"model": "m", "usage": {"prompt_tokens": ' + "7" * 4301 + ', "completion_tokens": 2}}'),
    out_line(None, raw_body='{"model": "m", "usage": {"prompt_tokens": 9}, "x": ' + "[" * 5000 + "]" * 5000 + "}"),
    b'{"response": null, "error": {"message": "usage"}}',
    b'{"response": "usage"}',
    b'["usage"]',
    b'not json "usage"',
    b'',
]


@pytest.mark.parametrize("thresholds", [(), (200_000,)])
def test_usage_counter_counts_as_the_full_parse(thresholds):
    counter = UsageCounter(thresholds)
    for raw in HOSTILE_OUTPUT:
        counter.add_line(raw)
    assert counter.by_tier == sum_usage_by_tier(HOSTILE_OUTPUT, thresholds)
    assert counter.by_tier  # the corpus does count something


@pytest.mark.parametrize("raw", HOSTILE_OUTPUT)
def test_usage_counter_line_by_line(raw):
    counter = UsageCounter((200_000,))
    counter.add_line(raw)
    assert counter.by_tier == sum_usage_by_tier([raw], (200_000,))


@pytest.mark.parametrize(("raw", "counted"), [
    (out_line(None, raw_body='{"model": "m", "us\\u0061ge": {"prompt_tokens": 6}}'), 6),
    (out_line(None, raw_body='{"model": "m", "seed": ' + "7" * 4301 + ', "usage": {"prompt_tokens": 8}}'), 8),
])
def test_usage_the_provider_reported_is_counted_whatever_else_the_line_holds(raw, counted):
    # json reads the escaped key as "usage", and a number int() will not convert is no reason to
    # drop the usage beside it: both paths count it.
    for by_tier in (sum_usage_by_tier([raw]), _counted(raw)):
        assert by_tier == {("m", 0): Usage(input_tokens=counted)}


def test_an_output_line_nested_past_the_recursion_limit_counts_nothing():
    raw = out_line(None, raw_body='{"model": "m", "usage": {"prompt_tokens": 9}, "x": ' + "[" * 5000 + "]" * 5000 + "}")
    assert sum_usage_by_tier([raw]) == {} and _counted(raw) == {}


def _counted(raw: bytes) -> dict:
    counter = UsageCounter(())
    counter.add_line(raw)
    return counter.by_tier


def _deepest_valid_line() -> bytes:
    """The most deeply nested request line the upload validator accepts, called from here."""
    from batchgate_server.core.jsonl_validation import JsonlValidator

    accepted = b""
    for depth in range(2, 1100, 2):
        raw = line(raw_body='{"model": "a", "x": ' + "[" * depth + "]" * depth + "}")
        validator = JsonlValidator()
        validator.feed(raw + b"\n")
        if not validator.finish().ok:
            break
        accepted = raw
    return accepted


def _from_deeper_in_the_stack(frames: int, call):
    return call() if frames == 0 else _from_deeper_in_the_stack(frames - 1, call)


def test_a_line_the_validator_accepts_is_rewritten_from_any_stack_depth():
    # The validator runs in its own process, from a shallow stack; submit and request_size (the
    # split's) run rewrite_line from a deeper one (here 200 frames below the test's own).
    raw = _deepest_valid_line()
    assert raw
    out = _from_deeper_in_the_stack(200, lambda: m.rewrite_line(raw, MODEL))
    assert json.loads(out)["body"]["model"] == MODEL


def _deepest_valid_tool_schema_line() -> bytes:
    """The request line with the most deeply nested tool schema (the part the translators walk)
    that the upload validator accepts."""
    from batchgate_server.core.jsonl_validation import JsonlValidator

    def with_schema(levels: int) -> bytes:
        schema: dict = {"type": "string"}
        for _ in range(levels):
            schema = {"type": "object", "properties": {"a": schema}}
        return line({"model": "a", "messages": [{"role": "user", "content": "hi"}],
                     "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]})

    accepted = b""
    for levels in range(1, 600):
        validator = JsonlValidator()
        validator.feed(with_schema(levels) + b"\n")
        if not validator.finish().ok:
            break
        accepted = with_schema(levels)
    return accepted


@pytest.mark.parametrize("provider", sorted(BUILTIN_PROVIDERS))
def test_every_provider_measures_the_deepest_line_the_validator_accepts_from_a_deep_stack(provider):
    # request_size translates the line as the provider's job takes it (the split calls it in a worker
    # thread; submit translates it again): no RecursionError 600 frames down.
    module, _, name = BUILTIN_PROVIDERS[provider].partition(":")
    adapter = getattr(importlib.import_module(module), name)()
    model = {"anthropic": "claude-3-5-haiku-20241022", "vertex_ai": "gemini-1.5-flash-002",
             "bedrock": "anthropic.claude-3-haiku-20240307-v1:0"}.get(provider, "gpt-4o")
    deployment = Deployment(id=provider, model_name=provider, provider=provider, model=model, params={})
    raw = _deepest_valid_tool_schema_line()
    assert raw.count(b'"properties"') > 50  # deep enough to matter
    size = _from_deeper_in_the_stack(600, lambda: adapter.request_size("/v1/chat/completions", deployment, raw))
    assert size > len(raw) // 2


def _reads_first_of_duplicates(raw: bytes) -> object:
    """The line as a parser that keeps the first of duplicate keys reads it (json keeps the last;
    a provider's parser may keep the first, or refuse the line)."""
    def first_wins(pairs):
        obj: dict = {}
        for key, value in pairs:
            obj.setdefault(key, value)
        return obj
    return json.loads(raw, object_pairs_hook=first_wins)


@pytest.mark.parametrize(("raw", "azure"), [
    (line(raw_body='{"model": "gpt-4o", "messages": [], "model": "gpt-4o-mini"}'), False),
    (line(raw_body='{"model": {"name": "gpt-4o"}, "model": "gpt-4o-mini"}'), False),
    (b'{"custom_id": "r-1", "method": "POST", "url": "/v1/embeddings", "url": "/v1/chat/completions",'
     b' "body": {"model": "a"}}', True),
])
def test_a_duplicated_member_reaches_the_provider_only_as_the_new_value(raw, azure):
    # The re-encode wrote the one member json reads; a splice of the last duplicate leaves the
    # first as the user wrote it, for a parser that keeps the first to run (another model, on the
    # deployment's account).
    sent = _reads_first_of_duplicates(m.rewrite_line(raw, MODEL, azure=azure))
    assert sent["body"]["model"] == MODEL
    assert sent["url"] == ("/chat/completions" if azure else "/v1/chat/completions")


@pytest.mark.parametrize(("raw", "azure"), [
    (line(raw_body=f'{{"model": "gpt-4o", "model": "{MODEL}"}}'), False),
    (line(raw_body=f'{{"model": "gpt-4o", "model": "{MODEL}"}}'), True),
    (line(raw_body='{"model": "gpt-4o"}')[:-1] + f', "body": {{"model": "{MODEL}"}}}}'.encode(), False),
    (line(raw_body=f'{{"model": 7, "model": "{MODEL}"}}'), False),  # the earlier one of another type
    (line(raw_body=f'{{"model": {{"name": "gpt-4o"}}, "model": "{MODEL}"}}'), True),
    # An earlier duplicate spelled with an escape: the splice's first match is the last one.
    (line(raw_body=f'{{"mod\\u0065l": "gpt-4o", "model": "{MODEL}"}}'), False),
    (line(raw_body='{"mod\\u0065l": "gpt-4o", "model": "gpt-4o-mini"}'), False),
    (line(raw_body='{"m\\u006fdel": "gpt-4o", "model": "gpt-4o-mini"}'), True),
    (line(raw_body='{"model": "gpt-4o"}')[:-1] + b', "bod\\u0079": {"model": "gpt-4o-mini"}}', False),
])
def test_a_duplicated_model_already_the_deployments_reaches_the_provider_once(raw, azure):
    # The earlier duplicate was passed on beside the last (already the deployment's, or spliced):
    # a parser that keeps the first of duplicate keys ran the user's model on the deployment's account.
    sent = _reads_first_of_duplicates(m.rewrite_line(raw, MODEL, azure=azure))
    assert sent["body"]["model"] == MODEL
    assert json.loads(m.rewrite_line(raw, MODEL, azure=azure)) == sent  # each member written once


def test_a_nested_member_named_model_or_url_leaves_the_line_as_it_was_written():
    # Only body.model and url are counted: a tool's "model" property is no duplicate.
    raw = line(raw_body='{"tools": [{"parameters": {"properties": {"model": {"type": "string"}}}}],'
                        f' "metadata": {{"url": "x"}}, "model": "{MODEL}"}}')
    assert m.rewrite_line(raw, MODEL) is raw
