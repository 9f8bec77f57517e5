"""AWS Bedrock batch translation: OpenAI bodies <-> Bedrock batch records."""

from __future__ import annotations

import json
from typing import Any

import botocore.session
import pytest
from anthropic.types import Message
from botocore.validate import ParamValidator
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

from tests.openai_shapes import BatchOutputLine, ErrorBody
from batchgate_server.domain.models import RequestCounts, Usage
from batchgate_server.providers.anthropic.translate import chat_to_anthropic_params
from batchgate_server.providers.base import JobStatus, ResultKind
from batchgate_server.providers.bedrock import translate as bt
from batchgate_server.providers.bedrock.translate import (
    ANTHROPIC_VERSION,
    BEDROCK_STATUS_TO_STATUS,
    SUPPORTED_ENDPOINTS,
    TranslationError,
    bedrock_output_to_openai,
    chat_to_bedrock_record,
    embedding_to_bedrock_record,
    invocation_type,
    is_anthropic_model,
    make_job_name,
    parse_manifest,
    validate_job_name,
)
from batchgate_server.providers.custom_ids import bedrock_codec

CLAUDE = "anthropic.claude-3-5-haiku-20241022-v1:0"
CLAUDE_PROFILE = "us.anthropic.claude-sonnet-4-20250514-v1:0"
LLAMA = "meta.llama3-1-70b-instruct-v1:0"
NOVA = "us.amazon.nova-pro-v1:0"
TITAN = "amazon.titan-embed-text-v2:0"
PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
PDF_B64 = "JVBERi0xLjQKJcOkw7zDtsOfCjIgMCBvYmoKPDwvTGVuZ3RoIDMgMCBSPj4Kc3RyZWFtCnN0YXJ0CmVuZHN0cmVhbQplbmRvYmoK"

_RUNTIME = botocore.session.get_session().get_service_model("bedrock-runtime")
_CONVERSE = _RUNTIME.operation_model("Converse")


# --- validators ------------------------------------------------------------------------------------

def check_line(result, kind: ResultKind, *, embeddings: bool = False) -> dict:
    assert result.kind is kind
    assert isinstance(result.data, bytes) and b"\n" not in result.data
    raw = json.loads(result.data)
    line = BatchOutputLine.model_validate(raw)
    assert line.id.startswith("batch_req_")
    if kind is ResultKind.OUTPUT:
        assert line.error is None and line.response is not None and line.response.status_code == 200
        if embeddings:
            CreateEmbeddingResponse.model_validate(line.response.body, strict=True)
        else:
            ChatCompletion.model_validate(line.response.body, strict=True)
    else:
        assert line.response is not None and line.response.status_code >= 400
        ErrorBody.model_validate(line.response.body)
    return raw


def check_converse(model_input: dict) -> None:
    """The Converse modelInput must be a valid Converse request body (botocore's model)."""
    report = ParamValidator().validate({"modelId": LLAMA, **model_input}, _CONVERSE.input_shape)
    assert not report.has_errors(), report.generate_report()
    roles = [m["role"] for m in model_input["messages"]]
    assert all(a != b for a, b in zip(roles, roles[1:])), "roles must alternate"


def check_converse_output(output: dict) -> None:
    """Test fixtures must be valid ConverseResponse shapes."""
    report = ParamValidator().validate(output, _CONVERSE.output_shape)
    assert not report.has_errors(), report.generate_report()


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
WEATHER_SPEC = {"toolSpec": {"name": "get_weather", "description": "Weather for a city", "inputSchema": {
    "json": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}}


# --- model families, names, statuses, manifest ---------------------------------------------------

@pytest.mark.parametrize("model_id, expected", [
    (CLAUDE, True), (CLAUDE_PROFILE, True), ("eu.anthropic.claude-3-7-sonnet-20250219-v1:0", True),
    ("apac.anthropic.claude-3-haiku-20240307-v1:0", True), ("global.anthropic.claude-sonnet-4-5-20250929-v1:0", True),
    ("arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-3-haiku-20240307-v1:0", True),
    ("arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-5-sonnet-20241022-v2:0", True),
    (LLAMA, False), (NOVA, False), (TITAN, False), ("mistral.mistral-large-2407-v1:0", False),
    ("notanthropic.claude", False), ("", False),
])
def test_is_anthropic_model(model_id, expected):
    assert is_anthropic_model(model_id) is expected


def test_invocation_type():
    assert invocation_type(CLAUDE) == "InvokeModel"
    assert invocation_type(LLAMA) == "Converse"
    assert invocation_type(TITAN, "/v1/embeddings") == "InvokeModel"
    assert set(SUPPORTED_ENDPOINTS) == {"/v1/chat/completions", "/v1/embeddings"}


@pytest.mark.parametrize("status, expected", [
    ("Submitted", JobStatus.VALIDATING), ("Validating", JobStatus.VALIDATING),
    ("Scheduled", JobStatus.IN_PROGRESS), ("InProgress", JobStatus.IN_PROGRESS),
    ("Completed", JobStatus.COMPLETED), ("PartiallyCompleted", JobStatus.COMPLETED),
    ("Stopping", JobStatus.CANCELLING), ("Stopped", JobStatus.CANCELLED),
    ("Expired", JobStatus.EXPIRED), ("Failed", JobStatus.FAILED),
])
def test_status_map(status, expected):
    assert BEDROCK_STATUS_TO_STATUS[status] is expected


def test_status_map_covers_botocore_enum():
    shape = botocore.session.get_session().get_service_model("bedrock").shape_for("ModelInvocationJobStatus")
    assert set(BEDROCK_STATUS_TO_STATUS) == set(shape.enum)


def test_job_names():
    pattern = botocore.session.get_session().get_service_model("bedrock").shape_for(
        "ModelInvocationJobName").metadata["pattern"]
    import re
    ids = ["batch_abc123", "batch-abc", "x" * 200, "batch_ünï/../cødé", "_", "b", "batch.with+plus",
           "-leading", "batch_abc123 ", "batch_ABC123"]
    names = [make_job_name(i) for i in ids]
    for name in names:
        assert validate_job_name(name) == name
        assert 1 <= len(name) <= 63 and re.fullmatch(pattern, name)
    assert len(set(names)) == len(names)
    assert make_job_name("batch_abc123") == make_job_name("batch_abc123")
    assert make_job_name("batch-abc") == "batchgate-batch-abc"
    assert make_job_name("batch_abc") != make_job_name("batch-abc")


@pytest.mark.parametrize("name", ["", "-abc", "a" * 64, "has space", "under_score", "ünï", "a/b"])
def test_invalid_job_names(name):
    with pytest.raises(ValueError):
        validate_job_name(name)


def test_parse_manifest():
    counts, usage = parse_manifest({"totalRecordCount": 120, "processedRecordCount": 120, "successRecordCount": 117,
                                    "errorRecordCount": 3, "inputTokenCount": 45000, "outputTokenCount": 9000})
    assert counts == RequestCounts(total=120, completed=117, failed=3)
    assert usage == Usage(input_tokens=45000, output_tokens=9000)
    counts, usage = parse_manifest({"totalRecordCount": "5", "successRecordCount": "4", "errorRecordCount": "1"})
    assert counts == RequestCounts(5, 4, 1) and usage == Usage()
    assert parse_manifest({}) == (RequestCounts(0, 0, 0), Usage())


# --- Claude records ------------------------------------------------------------------------------

CLAUDE_BODIES = [
    {"model": "claude", "messages": [{"role": "user", "content": "Hello"}]},
    {"model": "claude", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
     "max_tokens": 100, "temperature": 0.3, "top_p": 0.9},
    {"model": "claude", "messages": [{"role": "developer", "content": "Rules"}, {"role": "user", "content": "Q1"},
                                     {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
     "max_completion_tokens": 50, "stop": ["\n\n", "END"]},
    {"model": "claude", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Describe"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}}]}]},
    {"model": "claude", "messages": [{"role": "user", "content": [
        {"type": "file", "file": {"filename": "a.pdf", "file_data": f"data:application/pdf;base64,{PDF_B64}"}},
        {"type": "text", "text": "Summarise"}]}]},
    {"model": "claude", "messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER_TOOL],
     "tool_choice": "required"},
    {"model": "claude", "messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER_TOOL],
     "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "parallel_tool_calls": False},
    {"model": "claude", "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"}], "tools": [WEATHER_TOOL]},
    {"model": "claude", "messages": [{"role": "user", "content": "x"}], "stop": "STOP", "user": "user-42",
     "seed": 3, "n": 1},
    {"model": "claude", "messages": [{"role": "user", "content": "Extract"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "p", "schema": {
            "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
            "additionalProperties": False}}}},
]


@pytest.mark.parametrize("body", CLAUDE_BODIES)
@pytest.mark.parametrize("model_id", [CLAUDE, CLAUDE_PROFILE])
def test_claude_record_reuses_anthropic_translation(body, model_id):
    record = chat_to_bedrock_record(body, record_id="rec-1", model_id=model_id)
    assert set(record) == {"recordId", "modelInput"} and record["recordId"] == "rec-1"
    mi = record["modelInput"]
    assert mi["anthropic_version"] == ANTHROPIC_VERSION
    assert "model" not in mi and "metadata" not in mi
    expected = chat_to_anthropic_params(body, model=model_id, default_max_tokens=4096)
    expected.pop("model")
    expected.pop("metadata", None)
    assert {k: v for k, v in mi.items() if k != "anthropic_version"} == expected
    json.dumps(record)


def test_claude_record_shapes():
    mi = chat_to_bedrock_record(CLAUDE_BODIES[1], record_id="r", model_id=CLAUDE)["modelInput"]
    assert mi == {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 100, "system": "Be brief.",
                  "messages": [{"role": "user", "content": "Hi"}], "temperature": 0.3, "top_p": 0.9}
    mi = chat_to_bedrock_record(CLAUDE_BODIES[0], record_id="r", model_id=CLAUDE, default_max_tokens=777)["modelInput"]
    assert mi["max_tokens"] == 777
    mi = chat_to_bedrock_record(CLAUDE_BODIES[5], record_id="r", model_id=CLAUDE)["modelInput"]
    assert mi["tool_choice"] == {"type": "any"}
    assert mi["tools"][0]["name"] == "get_weather" and "input_schema" in mi["tools"][0]


@pytest.mark.parametrize("extra, param", [
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"temperature": 1.5}, "temperature"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, "messages[0].content"),
])
def test_claude_record_errors(extra, param):
    body = {"model": "claude", "messages": [{"role": "user", "content": "x"}], **extra}
    with pytest.raises(TranslationError) as exc:
        chat_to_bedrock_record(body, record_id="r", model_id=CLAUDE)
    assert exc.value.param == param


# --- Converse records ----------------------------------------------------------------------------

CONVERSE_CASES = [
    pytest.param(
        {"model": "llama", "messages": [{"role": "user", "content": "Hello"}]},
        {"messages": [{"role": "user", "content": [{"text": "Hello"}]}]}, id="plain"),
    pytest.param(
        {"model": "llama", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "max_tokens": 100, "temperature": 0.3, "top_p": 0.9},
        {"messages": [{"role": "user", "content": [{"text": "Hi"}]}], "system": [{"text": "Be brief."}],
         "inferenceConfig": {"maxTokens": 100, "temperature": 0.3, "topP": 0.9}}, id="system-params"),
    pytest.param(
        {"model": "llama", "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "R1"}, {"type": "text", "text": "R2"}]},
            {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"}, {"role": "user", "content": "Q2b"}],
         "max_completion_tokens": 64, "stop": "END"},
        {"messages": [{"role": "user", "content": [{"text": "Q1"}]},
                      {"role": "assistant", "content": [{"text": "A1"}]},
                      {"role": "user", "content": [{"text": "Q2"}, {"text": "Q2b"}]}],
         "system": [{"text": "R1"}, {"text": "R2"}],
         "inferenceConfig": {"maxTokens": 64, "stopSequences": ["END"]}}, id="multi-turn"),
    pytest.param(
        {"model": "nova", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What?"},
            {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{PNG_B64}"}},
            {"type": "image_url", "image_url": {"url": "s3://bucket/pics/cat.webp"}}]}]},
        {"messages": [{"role": "user", "content": [
            {"text": "What?"}, {"image": {"format": "jpeg", "source": {"bytes": PNG_B64}}},
            {"image": {"format": "webp", "source": {"s3Location": {"uri": "s3://bucket/pics/cat.webp"}}}}]}]},
        id="images"),
    pytest.param(
        {"model": "nova", "messages": [{"role": "user", "content": [
            {"type": "file", "file": {"filename": "r.pdf", "file_data": f"data:application/pdf;base64,{PDF_B64}"}},
            {"type": "text", "text": "Summarise"}]}]},
        {"messages": [{"role": "user", "content": [
            {"document": {"format": "pdf", "name": "document-1", "source": {"bytes": PDF_B64}}},
            {"text": "Summarise"}]}]}, id="pdf"),
    pytest.param(
        {"model": "llama", "messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER_TOOL]},
        {"messages": [{"role": "user", "content": [{"text": "Weather?"}]}], "toolConfig": {"tools": [WEATHER_SPEC]}},
        id="tools"),
    pytest.param(
        {"model": "llama", "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER_TOOL],
         "tool_choice": "auto"},
        {"messages": [{"role": "user", "content": [{"text": "x"}]}],
         "toolConfig": {"tools": [WEATHER_SPEC], "toolChoice": {"auto": {}}}}, id="tool-choice-auto"),
    pytest.param(
        {"model": "llama", "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER_TOOL],
         "tool_choice": "required"},
        {"messages": [{"role": "user", "content": [{"text": "x"}]}],
         "toolConfig": {"tools": [WEATHER_SPEC], "toolChoice": {"any": {}}}}, id="tool-choice-required"),
    pytest.param(
        {"model": "llama", "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER_TOOL],
         "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        {"messages": [{"role": "user", "content": [{"text": "x"}]}],
         "toolConfig": {"tools": [WEATHER_SPEC], "toolChoice": {"tool": {"name": "get_weather"}}}},
        id="tool-choice-named"),
    pytest.param(
        {"model": "llama", "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER_TOOL],
         "tool_choice": "none"},
        {"messages": [{"role": "user", "content": [{"text": "x"}]}]}, id="tool-choice-none-drops-tools"),
    pytest.param(
        {"model": "llama", "messages": [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                {"id": "call with spaces!", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call with spaces!", "content": ""}], "tools": [WEATHER_TOOL]},
        {"messages": [
            {"role": "user", "content": [{"text": "Weather in Paris and Rome?"}]},
            {"role": "assistant", "content": [
                {"text": "Checking."},
                {"toolUse": {"toolUseId": "call_1", "name": "get_weather", "input": {"city": "Paris"}}},
                {"toolUse": {"toolUseId": "bgt_c0c4b1bd4b8e3d9b3b6f2e0b0b3d4d4f", "name": "get_weather",
                             "input": {"city": "Rome"}}}]},
            {"role": "user", "content": [
                {"toolResult": {"toolUseId": "call_1", "content": [{"text": "18C"}]}},
                {"toolResult": {"toolUseId": "bgt_c0c4b1bd4b8e3d9b3b6f2e0b0b3d4d4f", "content": [{"text": ""}]}}]}],
         "toolConfig": {"tools": [WEATHER_SPEC]}}, id="tool-round-trip"),
    pytest.param(
        {"model": "nova", "messages": [{"role": "user", "content": "Extract"}], "response_format": {
            "type": "json_schema", "json_schema": {"name": "person", "description": "A person", "schema": {
                "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}},
        {"messages": [{"role": "user", "content": [{"text": "Extract"}]}],
         "outputConfig": {"textFormat": {"type": "json_schema", "structure": {"jsonSchema": {
             "schema": "{\"type\": \"object\", \"properties\": {\"name\": {\"type\": \"string\"}}, \"required\": [\"name\"]}",
             "name": "person", "description": "A person"}}}}}, id="json-schema"),
    pytest.param(
        {"model": "llama", "messages": [{"role": "user", "content": "x"}], "user": "u", "seed": 1, "n": 1,
         "stream": False, "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0,
         "response_format": {"type": "text"}, "metadata": {"a": "b"}, "store": False},
        {"messages": [{"role": "user", "content": [{"text": "x"}]}]}, id="neutral-params"),
]


def _fix_hashed_ids(expected: dict, actual: dict) -> dict:
    """The hashed toolUseId above is a placeholder; compare it by consistency instead."""
    text = json.dumps(expected)
    hashed = [b["toolUse"]["toolUseId"] for m in actual["messages"] for b in m["content"]
              if "toolUse" in b and b["toolUse"]["toolUseId"].startswith("bgt_")]
    if hashed:
        text = text.replace("bgt_c0c4b1bd4b8e3d9b3b6f2e0b0b3d4d4f", hashed[0])
    return json.loads(text)


@pytest.mark.parametrize("body, expected", CONVERSE_CASES)
@pytest.mark.parametrize("model_id", [LLAMA, NOVA])
def test_chat_to_converse_record(body, expected, model_id):
    record = chat_to_bedrock_record(body, record_id="rec-9", model_id=model_id)
    assert record["recordId"] == "rec-9"
    mi = record["modelInput"]
    check_converse(mi)
    assert mi == _fix_hashed_ids(expected, mi)


def test_converse_hashed_tool_ids_match_and_fit():
    body = CONVERSE_CASES[10].values[0]
    mi = chat_to_bedrock_record(body, record_id="r", model_id=LLAMA)["modelInput"]
    use_id = mi["messages"][1]["content"][2]["toolUse"]["toolUseId"]
    result_id = mi["messages"][2]["content"][1]["toolResult"]["toolUseId"]
    assert use_id == result_id and use_id.startswith("bgt_") and len(use_id) <= 64


@pytest.mark.parametrize("extra, param", [
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 1}, "frequency_penalty"),
    ({"stream": True}, "stream"),
    ({"logit_bias": {"1": 2}}, "logit_bias"),
    ({"audio": {"voice": "alloy"}}, "audio"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"tools": [WEATHER_TOOL], "parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0]"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": [""]}, "stop"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]},
     "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AAAA"}}]}]},
     "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "s3://bucket/noext"}}]}]}, "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AA==", "format": "wav"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "r"}], "tools": [WEATHER_TOOL], "tool_choice": "none"},
     "tool_choice"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "r"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "nope"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "system", "content": "only"}]}, "messages"),
    ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role"),
])
def test_converse_errors(extra, param):
    body = {"model": "llama", "messages": [{"role": "user", "content": "x"}], **extra}
    with pytest.raises(TranslationError) as exc:
        chat_to_bedrock_record(body, record_id="r", model_id=LLAMA)
    assert exc.value.param == param
    assert exc.value.message


# --- embeddings ----------------------------------------------------------------------------------

@pytest.mark.parametrize("body, model_input", [
    ({"model": "e", "input": "hello world"}, {"inputText": "hello world", "normalize": True}),
    ({"model": "e", "input": ["only one"], "dimensions": 512, "encoding_format": "float", "user": "u"},
     {"inputText": "only one", "dimensions": 512, "normalize": True}),
])
def test_embedding_record(body, model_input):
    record = embedding_to_bedrock_record(body, record_id="e1", model_id=TITAN)
    assert record == {"recordId": "e1", "modelInput": model_input}


@pytest.mark.parametrize("body, model_id, param", [
    ({"input": ["a", "b"]}, TITAN, "input"),
    ({"input": [1, 2, 3]}, TITAN, "input"),
    ({"input": ""}, TITAN, "input"),
    ({"input": "a", "dimensions": 300}, TITAN, "dimensions"),
    ({"input": "a", "encoding_format": "base64"}, TITAN, "encoding_format"),
    ({"input": "a", "extra": 1}, TITAN, "extra"),
    ({"input": "a"}, "cohere.embed-english-v3", "model"),
])
def test_embedding_errors(body, model_id, param):
    with pytest.raises(TranslationError) as exc:
        embedding_to_bedrock_record(body, record_id="e", model_id=model_id)
    assert exc.value.param == param


# --- output records ------------------------------------------------------------------------------

def convert(record: dict, *, index: int = 0, decode=lambda s: s, model_id: str = CLAUDE, **kw):
    return bedrock_output_to_openai(record, decode_custom_id=decode, request_index=index,
                                    batch_id="batch_123", model_id=model_id, **kw)


CLAUDE_TEXT_OUTPUT = {
    "id": "msg_bdrk_01ABC", "type": "message", "role": "assistant", "model": "claude-3-5-haiku-20241022",
    "content": [{"type": "text", "text": "Hello there"}], "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 12, "output_tokens": 4, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
}
CLAUDE_TOOL_OUTPUT = {
    "id": "msg_bdrk_02", "type": "message", "role": "assistant", "model": "claude-3-5-haiku-20241022",
    "content": [{"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_bdrk_1", "name": "get_weather", "input": {"city": "Paris"}}],
    "stop_reason": "tool_use", "stop_sequence": None, "usage": {"input_tokens": 30, "output_tokens": 20},
}


def test_fixtures_are_real_anthropic_messages():
    Message.model_validate(CLAUDE_TEXT_OUTPUT)
    Message.model_validate(CLAUDE_TOOL_OUTPUT)


def test_claude_output():
    raw = check_line(convert({"recordId": "rec-1", "modelInput": {}, "modelOutput": CLAUDE_TEXT_OUTPUT},
                             model="my-claude", created=1700000000), ResultKind.OUTPUT)
    assert raw["custom_id"] == "rec-1"
    body = raw["response"]["body"]
    assert body["model"] == "my-claude" and body["created"] == 1700000000
    assert body["choices"][0]["message"]["content"] == "Hello there"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == 12 and body["usage"]["completion_tokens"] == 4
    assert body["usage"]["total_tokens"] == 16


def test_claude_tool_output():
    raw = check_line(convert({"recordId": "r", "modelInput": {}, "modelOutput": CLAUDE_TOOL_OUTPUT}), ResultKind.OUTPUT)
    choice = raw["response"]["body"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["id"] == "toolu_bdrk_1"
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert raw["response"]["body"]["model"] == CLAUDE


def test_claude_output_without_model_or_id():
    out = {k: v for k, v in CLAUDE_TEXT_OUTPUT.items() if k not in ("model", "id")}
    raw = check_line(convert({"recordId": "r", "modelOutput": out}), ResultKind.OUTPUT)
    assert raw["response"]["body"]["model"] == CLAUDE
    assert raw["response"]["body"]["id"].startswith("chatcmpl-")


def converse_output(content: list, stop: str = "end_turn", usage: dict | None = None) -> dict:
    out = {"output": {"message": {"role": "assistant", "content": content}}, "stopReason": stop,
           "usage": usage or {"inputTokens": 10, "outputTokens": 5, "totalTokens": 15},
           "metrics": {"latencyMs": 321}}
    check_converse_output(out)
    return out


def test_converse_text_output():
    out = converse_output([{"text": "Hi "}, {"text": "there"}],
                          usage={"inputTokens": 10, "outputTokens": 5, "totalTokens": 17, "cacheReadInputTokens": 2})
    raw = check_line(convert({"recordId": "r", "modelInput": {}, "modelOutput": out}, model_id=LLAMA), ResultKind.OUTPUT)
    body = raw["response"]["body"]
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hi there", "refusal": None}
    assert body["usage"]["prompt_tokens"] == 12 and body["usage"]["completion_tokens"] == 5
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 2
    assert body["model"] == LLAMA


def test_converse_tool_output():
    out = converse_output([{"text": "Checking"},
                           {"toolUse": {"toolUseId": "tooluse_abc", "name": "get_weather", "input": {"city": "Rome"}}}],
                          stop="tool_use")
    raw = check_line(convert({"recordId": "r", "modelOutput": out}, model_id=NOVA), ResultKind.OUTPUT)
    choice = raw["response"]["body"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Checking"
    assert choice["message"]["tool_calls"] == [{"id": "tooluse_abc", "type": "function", "function": {
        "name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]


@pytest.mark.parametrize("stop, expected", [
    ("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
    ("model_context_window_exceeded", "length"), ("guardrail_intervened", "content_filter"),
    ("content_filtered", "content_filter"), ("malformed_model_output", "stop"), ("tool_use", "tool_calls"),
])
def test_converse_stop_reasons(stop, expected):
    out = converse_output([{"text": "x"}], stop=stop)
    raw = check_line(convert({"recordId": "r", "modelOutput": out}, model_id=LLAMA), ResultKind.OUTPUT)
    assert raw["response"]["body"]["choices"][0]["finish_reason"] == expected


def test_embedding_output():
    out = {"embedding": [0.1, -0.2, 0.3], "inputTextTokenCount": 3}
    raw = check_line(convert({"recordId": "e1", "modelInput": {"inputText": "abc"}, "modelOutput": out},
                             model_id=TITAN, endpoint="/v1/embeddings", model="titan"),
                     ResultKind.OUTPUT, embeddings=True)
    body = raw["response"]["body"]
    assert body["data"] == [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2, 0.3]}]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3} and body["model"] == "titan"
    bad = check_line(convert({"recordId": "e1", "modelOutput": {"inputTextTokenCount": 3}},
                             model_id=TITAN, endpoint="/v1/embeddings"), ResultKind.ERROR)
    assert bad["response"]["status_code"] == 500


@pytest.mark.parametrize("error, status, code", [
    ({"errorCode": 400, "errorMessage": "Malformed input request: #: extraneous key [foo] is not permitted"}, 400, None),
    ({"errorCode": "429", "errorMessage": "Too many requests"}, 429, None),
    ({"errorCode": 500, "errorMessage": "Internal failure"}, 500, None),
    ({"errorCode": 424, "errorMessage": "Model error"}, 424, None),
    ({"errorCode": "ValidationException", "errorMessage": "bad"}, 400, "ValidationException"),
    ({"errorCode": "ThrottlingException", "errorMessage": "slow down"}, 429, "ThrottlingException"),
    ({"errorCode": "ModelTimeoutException", "errorMessage": "timed out"}, 408, "ModelTimeoutException"),
    ({"errorCode": "SomethingNew", "errorMessage": "the input is invalid"}, 400, "SomethingNew"),
    ({"errorCode": "SomethingNew", "errorMessage": "boom"}, 500, "SomethingNew"),
    ({"errorMessage": "no code at all"}, 500, None),
    ({"errorCode": 999, "errorMessage": "weird code"}, 500, None),
])
def test_error_records(error, status, code):
    raw = check_line(convert({"recordId": "rec-e", "modelInput": {"messages": []}, "error": error}), ResultKind.ERROR)
    assert raw["custom_id"] == "rec-e"
    assert raw["response"]["status_code"] == status
    err = raw["response"]["body"]["error"]
    assert err["code"] == code and err["param"] is None and err["message"] == error["errorMessage"]


def test_record_without_output_or_error():
    raw = check_line(convert({"recordId": "r", "modelInput": {}}), ResultKind.ERROR)
    assert raw["response"]["status_code"] == 500
    raw = check_line(convert({"recordId": "r", "modelOutput": {"unexpected": True}}), ResultKind.ERROR)
    assert raw["response"]["status_code"] == 500


def test_record_without_record_id_raises():
    with pytest.raises(TranslationError):
        convert({"modelInput": {}, "modelOutput": CLAUDE_TEXT_OUTPUT})


def test_output_ids_deterministic():
    rec = {"recordId": "r", "modelOutput": CLAUDE_TEXT_OUTPUT}
    a, b, c = (json.loads(convert(rec, index=i).data)["id"] for i in (0, 0, 1))
    assert a == b != c
    conv = json.loads(convert({"recordId": "r", "modelOutput": converse_output([{"text": "x"}])},
                              model_id=LLAMA, index=0).data)["id"]
    assert conv == a  # one id scheme whatever the model family


HOSTILE_IDS = [
    "request-1", "simple_id", "UPPER-case", "has spaces", "ünïcødé-ид", "emoji-🚀", "new\nline",
    "../../etc/passwd", "a" * 64, "b" * 65, "c" * 500, "bgl_0", "BGL_1", "bgl_", "quote\"s", "back\\slash",
    "dots.in.id", "colon:id", "\u0000nul", "lone-\ud800-surrogate", "-", "_", "1",
]


@pytest.mark.parametrize("model_id", [CLAUDE, LLAMA])
def test_hostile_custom_ids_round_trip_through_record_ids(model_id):
    codec = bedrock_codec()
    records = []
    for i, cid in enumerate(HOSTILE_IDS):
        rid = codec.encode(cid, i)
        records.append(chat_to_bedrock_record({"messages": [{"role": "user", "content": f"q{i}"}]},
                                              record_id=rid, model_id=model_id))
    rids = [r["recordId"] for r in records]
    assert len(set(rids)) == len(rids)
    restored = bedrock_codec(remapped=json.loads(json.dumps(codec.remapped)))
    output = (CLAUDE_TEXT_OUTPUT if model_id == CLAUDE else converse_output([{"text": "ok"}]))
    for i, record in reversed(list(enumerate(records))):
        echoed = json.loads(json.dumps(record))
        if i % 3 == 0:
            echoed["error"] = {"errorCode": 400, "errorMessage": "bad"}
            kind = ResultKind.ERROR
        else:
            echoed["modelOutput"] = output
            kind = ResultKind.OUTPUT
        raw = check_line(convert(echoed, index=i, decode=restored.decode, model_id=model_id), kind)
        assert raw["custom_id"] == HOSTILE_IDS[i]


def test_translation_error_line_reexported():
    try:
        chat_to_bedrock_record({"messages": [{"role": "user", "content": "x"}], "n": 2}, record_id="r", model_id=LLAMA)
    except TranslationError as exc:
        raw = check_line(bt.translation_error_line("cid", exc, request_index=0, batch_id="batch_1"), ResultKind.ERROR)
    assert raw["response"]["body"]["error"]["param"] == "n"


def test_module_is_pure():
    src = open(bt.__file__, encoding="utf-8").read()
    for banned in ("import boto3", "import botocore", "import httpx", "import aiohttp"):
        assert banned not in src
