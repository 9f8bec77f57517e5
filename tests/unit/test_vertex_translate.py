"""Vertex AI Gemini batch translation: OpenAI chat bodies <-> GenerateContentRequest lines."""

from __future__ import annotations

import json
from typing import Any, Literal

import pytest
from openai.types.chat import ChatCompletion

from tests.openai_shapes import BatchOutputLine, ErrorBody
from batchgate_server.domain.models import RequestCounts
from batchgate_server.providers.base import JobStatus, ResultKind
from batchgate_server.providers.custom_ids import vertex_codec
from batchgate_server.providers.vertex import translate as vt
from batchgate_server.providers.vertex.translate import (
    CUSTOM_ID_LABEL_KEY,
    JOB_STATE_TO_STATUS,
    SUPPORTED_ENDPOINTS,
    TranslationError,
    chat_to_vertex_instance,
    completion_stats_to_counts,
    translation_error_line,
    vertex_prediction_to_openai,
)

PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
PDF_B64 = "JVBERi0xLjQKJcOkw7zDtsOfCjIgMCBvYmoKPDwvTGVuZ3RoIDMgMCBSPj4Kc3RyZWFtCnN0YXJ0CmVuZHN0cmVhbQplbmRvYmoK"
WAV_B64 = "UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAIA+AAACABAAZGF0YQAAAAA="


# --- OpenAI batch output line validation ------------------------------------------------------

def check_line(result, kind: ResultKind) -> dict:
    assert result.kind is kind
    assert isinstance(result.data, bytes) and b"\n" not in result.data
    raw = json.loads(result.data)
    line = BatchOutputLine.model_validate(raw)
    assert line.id.startswith("batch_req_")
    if kind is ResultKind.OUTPUT:
        assert line.error is None and line.response is not None
        assert 200 <= line.response.status_code < 300
        ChatCompletion.model_validate(line.response.body, strict=True)
        assert line.response.body["object"] == "chat.completion"
    else:
        assert line.response is not None and line.response.status_code >= 400
        ErrorBody.model_validate(line.response.body)
    return raw


# --- structural check of the Vertex request (REST JSON, camelCase) -----------------------------

_PART_KEYS = {"text", "inlineData", "fileData", "functionCall", "functionResponse"}
_GEN_KEYS = {"maxOutputTokens", "temperature", "topP", "stopSequences", "candidateCount",
             "responseMimeType", "responseSchema", "seed", "presencePenalty", "frequencyPenalty",
             "thinkingConfig"}
_SCHEMA_KEYS = {"type", "format", "title", "description", "nullable", "default", "items", "minItems",
                "maxItems", "enum", "properties", "propertyOrdering", "required", "minProperties",
                "maxProperties", "minimum", "maximum", "minLength", "maxLength", "pattern", "example",
                "anyOf"}
_TYPES = {"STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT"}


def _check_schema(schema: dict) -> None:
    assert set(schema) <= _SCHEMA_KEYS, set(schema) - _SCHEMA_KEYS
    if "type" in schema:
        assert schema["type"] in _TYPES
    if "enum" in schema:
        assert all(isinstance(v, str) for v in schema["enum"])
    for sub in (schema.get("properties") or {}).values():
        _check_schema(sub)
    if "items" in schema:
        _check_schema(schema["items"])
    for sub in schema.get("anyOf") or []:
        _check_schema(sub)


def check_request(instance: dict) -> dict:
    assert set(instance) == {"request"}
    req = instance["request"]
    assert set(req) <= {"contents", "systemInstruction", "generationConfig", "tools", "toolConfig", "labels"}
    assert req["contents"], "Gemini needs at least one content"
    previous = None
    for content in req["contents"]:
        assert set(content) == {"role", "parts"} and content["role"] in ("user", "model")
        assert content["role"] != previous, "turns must alternate"
        previous = content["role"]
        for part in content["parts"]:
            assert len(part) == 1 and set(part) <= _PART_KEYS, part
    if "systemInstruction" in req:
        assert all(set(p) == {"text"} for p in req["systemInstruction"]["parts"])
    gen = req.get("generationConfig", {})
    assert set(gen) <= _GEN_KEYS
    if "responseSchema" in gen:
        _check_schema(gen["responseSchema"])
    for tool in req.get("tools", []):
        assert set(tool) == {"functionDeclarations"}
        for decl in tool["functionDeclarations"]:
            assert set(decl) <= {"name", "description", "parameters"}
            if "parameters" in decl:
                _check_schema(decl["parameters"])
    if "toolConfig" in req:
        fcc = req["toolConfig"]["functionCallingConfig"]
        assert fcc["mode"] in ("AUTO", "ANY", "NONE")
    json.dumps(instance)  # JSON-serialisable
    return req


def translate(body: dict, label: str = "req-1") -> dict:
    req = check_request(chat_to_vertex_instance(body, custom_id_label=label))
    assert req["labels"] == {CUSTOM_ID_LABEL_KEY: label}
    return req


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
WEATHER_DECL = {"name": "get_weather", "description": "Weather for a city",
                "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"},
                                                                "unit": {"type": "STRING", "enum": ["c", "f"]}},
                               "required": ["city"]}}


# --- requests: translation table -----------------------------------------------------------------

REQUEST_CASES = [
    pytest.param(
        {"model": "gemini-2.5-flash", "messages": [{"role": "user", "content": "Hello!"}]},
        {"contents": [{"role": "user", "parts": [{"text": "Hello!"}]}]},
        id="plain-user"),
    pytest.param(
        {"model": "g", "messages": [{"role": "system", "content": "You are terse."},
                                    {"role": "user", "content": "Hi"}], "max_tokens": 50, "temperature": 0.2},
        {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}],
         "systemInstruction": {"parts": [{"text": "You are terse."}]},
         "generationConfig": {"maxOutputTokens": 50, "temperature": 0.2}},
        id="system-and-params"),
    pytest.param(
        {"model": "g", "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Rule 1"}, {"type": "text", "text": "Rule 2"}]},
            {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"}],
         "max_completion_tokens": 99, "max_tokens": 5, "top_p": 0.9},
        {"contents": [{"role": "user", "parts": [{"text": "Q1"}]},
                      {"role": "model", "parts": [{"text": "A1"}]},
                      {"role": "user", "parts": [{"text": "Q2"}]}],
         "systemInstruction": {"parts": [{"text": "Rule 1"}, {"text": "Rule 2"}]},
         "generationConfig": {"maxOutputTokens": 99, "topP": 0.9}},
        id="developer-multi-turn"),
    pytest.param(
        {"model": "g", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        {"contents": [{"role": "user", "parts": [{"text": "a"}, {"text": "b"}]}]},
        id="consecutive-user-merged"),
    pytest.param(
        {"model": "g", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}", "detail": "high"}}]}]},
        {"contents": [{"role": "user", "parts": [
            {"text": "What is this?"}, {"inlineData": {"mimeType": "image/png", "data": PNG_B64}}]}]},
        id="image-data-url"),
    pytest.param(
        {"model": "g", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "gs://bucket/cat.webp"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/a/dog.JPG?x=1"}},
            {"type": "image_url", "image_url": {"url": "https://cdn.example.com/img/123"}},
            {"type": "text", "text": "Compare"}]}]},
        {"contents": [{"role": "user", "parts": [
            {"fileData": {"mimeType": "image/webp", "fileUri": "gs://bucket/cat.webp"}},
            {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/a/dog.JPG?x=1"}},
            {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://cdn.example.com/img/123"}},
            {"text": "Compare"}]}]},
        id="image-uris"),
    pytest.param(
        {"model": "g", "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": WAV_B64, "format": "wav"}},
            {"type": "file", "file": {"filename": "a.pdf", "file_data": f"data:application/pdf;base64,{PDF_B64}"}}]}]},
        {"contents": [{"role": "user", "parts": [
            {"inlineData": {"mimeType": "audio/wav", "data": WAV_B64}},
            {"inlineData": {"mimeType": "application/pdf", "data": PDF_B64}}]}]},
        id="audio-and-pdf"),
    pytest.param(
        {"model": "g", "messages": [{"role": "user", "content": "Weather in Paris?"}],
         "tools": [WEATHER_TOOL, TIME_TOOL], "tool_choice": "auto"},
        {"contents": [{"role": "user", "parts": [{"text": "Weather in Paris?"}]}],
         "tools": [{"functionDeclarations": [WEATHER_DECL, {"name": "get_time"}]}],
         "toolConfig": {"functionCallingConfig": {"mode": "AUTO"}}},
        id="tools-auto"),
    pytest.param(
        {"model": "g", "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER_TOOL],
         "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        {"contents": [{"role": "user", "parts": [{"text": "x"}]}],
         "tools": [{"functionDeclarations": [WEATHER_DECL]}],
         "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}},
        id="tool-choice-named"),
    pytest.param(
        {"model": "g", "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER_TOOL],
         "tool_choice": "required"},
        {"contents": [{"role": "user", "parts": [{"text": "x"}]}],
         "tools": [{"functionDeclarations": [WEATHER_DECL]}],
         "toolConfig": {"functionCallingConfig": {"mode": "ANY"}}},
        id="tool-choice-required"),
    pytest.param(
        {"model": "g", "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER_TOOL],
         "tool_choice": "none"},
        {"contents": [{"role": "user", "parts": [{"text": "x"}]}],
         "tools": [{"functionDeclarations": [WEATHER_DECL]}],
         "toolConfig": {"functionCallingConfig": {"mode": "NONE"}}},
        id="tool-choice-none"),
    pytest.param(
        {"model": "g", "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER_TOOL, TIME_TOOL],
         "tool_choice": {"type": "allowed_tools", "allowed_tools": {
             "mode": "auto", "tools": [{"type": "function", "function": {"name": "get_time"}}]}}},
        {"contents": [{"role": "user", "parts": [{"text": "x"}]}],
         "tools": [{"functionDeclarations": [{"name": "get_time"}]}],
         "toolConfig": {"functionCallingConfig": {"mode": "AUTO"}}},
        id="allowed-tools-auto"),
    pytest.param(
        {"model": "g", "messages": [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
                {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "25C"}]},
        ], "tools": [WEATHER_TOOL]},
        {"contents": [
            {"role": "user", "parts": [{"text": "Weather in Paris and Rome?"}]},
            {"role": "model", "parts": [{"text": "Checking."},
                                        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                                        {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}}]},
            {"role": "user", "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"content": "18C"}}},
                {"functionResponse": {"name": "get_weather", "response": {"content": "25C"}}}]}],
         "tools": [{"functionDeclarations": [WEATHER_DECL]}]},
        id="parallel-tool-round-trip"),
    pytest.param(
        {"model": "g", "messages": [{"role": "user", "content": "x"}], "stop": "END", "n": 3, "seed": 7,
         "presence_penalty": 0.5, "frequency_penalty": -0.5},
        {"contents": [{"role": "user", "parts": [{"text": "x"}]}],
         "generationConfig": {"stopSequences": ["END"], "candidateCount": 3, "seed": 7,
                              "presencePenalty": 0.5, "frequencyPenalty": -0.5}},
        id="stop-n-seed-penalties"),
    pytest.param(
        {"model": "g", "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b"], "n": 1},
        {"contents": [{"role": "user", "parts": [{"text": "x"}]}],
         "generationConfig": {"stopSequences": ["a", "b"]}},
        id="stop-list-n1"),
    pytest.param(
        {"model": "g", "messages": [{"role": "user", "content": "JSON please"}],
         "response_format": {"type": "json_object"}},
        {"contents": [{"role": "user", "parts": [{"text": "JSON please"}]}],
         "generationConfig": {"responseMimeType": "application/json"}},
        id="json-object"),
    pytest.param(
        {"model": "g", "messages": [{"role": "user", "content": "Extract"}], "response_format": {
            "type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": {
                "$schema": "http://json-schema.org/draft-07/schema#",
                "type": "object",
                "properties": {
                    "name": {"type": "string", "description": "Full name"},
                    "age": {"type": ["integer", "null"], "minimum": 0},
                    "role": {"$ref": "#/$defs/Role"},
                    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
                    "nick": {"anyOf": [{"type": "string"}, {"type": "null"}], "description": "Nickname"},
                    "kind": {"const": "person"},
                    "level": {"enum": [1, 2, 3]},
                },
                "required": ["name", "age", "role", "tags", "nick", "kind", "level"],
                "additionalProperties": False,
                "$defs": {"Role": {"type": "string", "enum": ["admin", "user"]}}}}}},
        {"contents": [{"role": "user", "parts": [{"text": "Extract"}]}],
         "generationConfig": {"responseMimeType": "application/json", "responseSchema": {
             "type": "OBJECT",
             "properties": {
                 "name": {"type": "STRING", "description": "Full name"},
                 "age": {"type": "INTEGER", "minimum": 0, "nullable": True},
                 "role": {"type": "STRING", "enum": ["admin", "user"]},
                 "tags": {"type": "ARRAY", "items": {"type": "STRING"}, "maxItems": 5},
                 "nick": {"type": "STRING", "description": "Nickname", "nullable": True},
                 "kind": {"type": "STRING", "enum": ["person"]},
                 "level": {"type": "INTEGER", "format": "enum", "enum": ["1", "2", "3"]},
             },
             "propertyOrdering": ["name", "age", "role", "tags", "nick", "kind", "level"],
             "required": ["name", "age", "role", "tags", "nick", "kind", "level"]}}},
        id="json-schema"),
    pytest.param(
        {"model": "g", "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "low",
         "response_format": {"type": "text"}, "user": "u-1", "metadata": {"k": "v"}, "store": False,
         "stream": False, "logprobs": False, "parallel_tool_calls": True},
        {"contents": [{"role": "user", "parts": [{"text": "x"}]}],
         "generationConfig": {"thinkingConfig": {"thinkingBudget": 1024}}},
        id="reasoning-and-ignored"),
    pytest.param(
        {"model": "g", "messages": [{"role": "user", "content": "x"}],
         "functions": [{"name": "legacy", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}],
         "function_call": {"name": "legacy"}},
        {"contents": [{"role": "user", "parts": [{"text": "x"}]}],
         "tools": [{"functionDeclarations": [{"name": "legacy", "parameters": {
             "type": "OBJECT", "properties": {"q": {"type": "STRING"}}}}]}],
         "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["legacy"]}}},
        id="legacy-functions"),
]


@pytest.mark.parametrize("body, expected", REQUEST_CASES)
def test_chat_to_vertex_instance(body, expected):
    req = translate(body)
    req.pop("labels")
    assert req == expected


def test_input_body_is_not_mutated():
    body = {"model": "g", "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER_TOOL],
            "response_format": REQUEST_CASES[16].values[0]["response_format"]}
    snapshot = json.dumps(body, sort_keys=True)
    translate(body)
    assert json.dumps(body, sort_keys=True) == snapshot


def test_supported_endpoints_chat_only():
    assert SUPPORTED_ENDPOINTS == ("/v1/chat/completions",)


@pytest.mark.parametrize("body, param", [
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"stream": True}, "stream"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"parallel_tool_calls": False, "tools": [WEATHER_TOOL]}, "parallel_tool_calls"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"n": True}, "n"),
    ({"stop": [1, 2]}, "stop"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0]"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"m": {"type": "object", "additionalProperties": {"type": "string"}}}}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "oneOf": [{"type": "string"}, {"type": "integer"}]}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"n": {"$ref": "#/$defs/Node"}},
        "$defs": {"Node": {"type": "object", "properties": {"child": {"$ref": "#/$defs/Node"}}}}}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"x": {"type": "number", "multipleOf": 2}}}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": ["string", "integer"]}}}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}}, "patternProperties": {"^x": {}}}}}]},
     "tools[0].function.parameters"),
])
def test_unexpressible_params_raise(body, param):
    body = {"model": "g", "messages": [{"role": "user", "content": "x"}], **body}
    with pytest.raises(TranslationError) as exc:
        chat_to_vertex_instance(body, custom_id_label="a")
    assert exc.value.param == param
    assert exc.value.message


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"role": "system", "content": "only system"}], "messages"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "call_9", "content": "?"}],
     "messages[1].tool_call_id"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}],
     "messages[1].tool_calls[0].function.arguments"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}],
     "messages[1].tool_calls[0].function.arguments"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}],
     "messages[0].content[0].image_url"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}],
     "messages[0].content[0].image_url"),
    ([{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-abc"}}]}],
     "messages[0].content[0].file"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": WAV_B64, "format": "flac"}}]}],
     "messages[0].content[0].input_audio"),
    ([{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "gs://b/x.png"}}]},
      {"role": "user", "content": "x"}], "messages[0].content[0]"),
    ([{"role": "critic", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": ""}], "messages[0].content"),
])
def test_bad_messages_raise(messages, param):
    with pytest.raises(TranslationError) as exc:
        chat_to_vertex_instance({"model": "g", "messages": messages}, custom_id_label="a")
    assert exc.value.param == param


@pytest.mark.parametrize("label", ["", "UPPER", "has space", "x" * 64, "ünï"])
def test_label_must_already_be_encoded(label):
    with pytest.raises(ValueError):
        chat_to_vertex_instance({"messages": [{"role": "user", "content": "x"}]}, custom_id_label=label)


# --- results ---------------------------------------------------------------------------------------

def prediction(request: dict, response: dict | None = None, status: str = "") -> dict:
    line = {"request": request, "status": status, "processed_time": "2025-06-01T12:00:03.123456789+00:00"}
    if response is not None:
        line["response"] = response
    return line


def request_with_label(label: str) -> dict:
    return {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "labels": {CUSTOM_ID_LABEL_KEY: label}}


def convert(line: dict, *, index: int = 0, decode=lambda s: s, batch_id: str = "batch_abc"):
    return vertex_prediction_to_openai(line, decode_custom_id=decode, request_index=index,
                                       batch_id=batch_id, model="gemini-2.5-flash")


TEXT_RESPONSE = {
    "candidates": [{"content": {"role": "model", "parts": [{"text": "Hello"}, {"text": " world"}]},
                    "finishReason": "STOP", "avgLogprobs": -0.1}],
    "usageMetadata": {"promptTokenCount": 11, "candidatesTokenCount": 5, "thoughtsTokenCount": 20,
                      "cachedContentTokenCount": 4, "totalTokenCount": 36,
                      "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 11}]},
    "modelVersion": "gemini-2.5-flash", "createTime": "2025-06-01T12:00:01.500Z", "responseId": "resp-123",
}


def test_text_prediction_to_chat_completion():
    raw = check_line(convert(prediction(request_with_label("req-7"), TEXT_RESPONSE)), ResultKind.OUTPUT)
    assert raw["custom_id"] == "req-7"
    assert raw["response"]["request_id"] == "resp-123"
    body = raw["response"]["body"]
    assert body["id"] == "chatcmpl-resp-123"
    assert body["model"] == "gemini-2.5-flash"
    assert body["created"] == 1748779201
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello world", "refusal": None},
                                "finish_reason": "stop", "logprobs": None}]
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 25, "total_tokens": 36,
                             "prompt_tokens_details": {"cached_tokens": 4},
                             "completion_tokens_details": {"reasoning_tokens": 20}}


def test_function_call_prediction():
    response = {"candidates": [{"content": {"role": "model", "parts": [
        {"text": "thinking about it", "thought": True},
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris", "unit": "c"}}},
        {"functionCall": {"name": "get_time", "args": {}}}]}, "finishReason": "STOP"}],
        "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2, "totalTokenCount": 5}}
    raw = check_line(convert(prediction(request_with_label("a"), response)), ResultKind.OUTPUT)
    choice = raw["response"]["body"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "c"}
    assert calls[1]["function"]["arguments"] == "{}"
    assert len({c["id"] for c in calls}) == 2 and all(c["type"] == "function" for c in calls)
    # deterministic ids: re-reading the same results gives the same tool call ids
    again = json.loads(convert(prediction(request_with_label("a"), response)).data)
    assert again["response"]["body"]["choices"][0]["message"]["tool_calls"] == calls
    usage = raw["response"]["body"]["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0
    assert usage["total_tokens"] == 5


def test_function_call_keeps_provider_id():
    response = {"candidates": [{"content": {"role": "model", "parts": [
        {"functionCall": {"id": "fc-1", "name": "f", "args": {"x": [1, 2]}}}]}, "finishReason": "STOP"}]}
    raw = check_line(convert(prediction(request_with_label("a"), response)), ResultKind.OUTPUT)
    assert raw["response"]["body"]["choices"][0]["message"]["tool_calls"][0]["id"] == "fc-1"


def test_multiple_candidates_index_defaults():
    response = {"candidates": [
        {"content": {"role": "model", "parts": [{"text": "one"}]}, "finishReason": "STOP"},  # index 0 omitted
        {"index": 2, "content": {"role": "model", "parts": [{"text": "three"}]}, "finishReason": "MAX_TOKENS"},
        {"index": 1, "content": {"role": "model", "parts": [{"text": "two"}]}, "finishReason": "SAFETY"},
    ]}
    raw = check_line(convert(prediction(request_with_label("a"), response)), ResultKind.OUTPUT)
    choices = raw["response"]["body"]["choices"]
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in choices] == [
        (0, "one", "stop"), (1, "two", "content_filter"), (2, "three", "length")]
    assert raw["response"]["body"]["usage"]["total_tokens"] == 0


@pytest.mark.parametrize("reason, expected", [
    ("STOP", "stop"), ("MAX_TOKENS", "length"), ("SAFETY", "content_filter"),
    ("RECITATION", "content_filter"), ("BLOCKLIST", "content_filter"),
    ("PROHIBITED_CONTENT", "content_filter"), ("SPII", "content_filter"),
    ("OTHER", "stop"), ("MALFORMED_FUNCTION_CALL", "stop"), ("FINISH_REASON_UNSPECIFIED", "stop"), (None, "stop"),
])
def test_finish_reasons(reason, expected):
    cand: dict = {"content": {"role": "model", "parts": [{"text": "x"}]}}
    if reason:
        cand["finishReason"] = reason
    raw = check_line(convert(prediction(request_with_label("a"), {"candidates": [cand]})), ResultKind.OUTPUT)
    assert raw["response"]["body"]["choices"][0]["finish_reason"] == expected


def test_safety_stop_without_content():
    response = {"candidates": [{"finishReason": "SAFETY", "safetyRatings": [{"category": "HARM_CATEGORY_HARASSMENT",
                                                                             "probability": "HIGH"}]}]}
    raw = check_line(convert(prediction(request_with_label("a"), response)), ResultKind.OUTPUT)
    choice = raw["response"]["body"]["choices"][0]
    assert choice["message"]["content"] is None and choice["finish_reason"] == "content_filter"


def test_snake_case_response_is_tolerated():
    response = {"candidates": [{"content": {"role": "model", "parts": [{"text": "ok"}]}, "finish_reason": "MAX_TOKENS"}],
                "usage_metadata": {"prompt_token_count": "7", "candidates_token_count": 2, "total_token_count": 9}}
    raw = check_line(convert(prediction(request_with_label("a"), response)), ResultKind.OUTPUT)
    body = raw["response"]["body"]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == 7 and body["usage"]["total_tokens"] == 9


@pytest.mark.parametrize("status, code, err_code", [
    ("Bad Request: {\"error\": {\"code\": 400, \"message\": \"Request contains an invalid argument.\", "
     "\"status\": \"INVALID_ARGUMENT\"}}", 400, "invalid_argument"),
    ("{\"error\": {\"code\": 429, \"message\": \"Quota exceeded\", \"status\": \"RESOURCE_EXHAUSTED\"}}", 429,
     "resource_exhausted"),
    ("RESOURCE_EXHAUSTED: quota", 429, "resource_exhausted"),
    ("INTERNAL: something broke", 500, "internal"),
    ("DEADLINE_EXCEEDED", 504, "deadline_exceeded"),
    ("The input is invalid: unsupported MIME type", 400, "vertex_error"),
    ("Internal Server Error", 500, "vertex_error"),
    ("something odd happened", 500, "vertex_error"),
])
def test_status_becomes_error_line(status, code, err_code):
    raw = check_line(convert(prediction(request_with_label("x1"), None, status=status)), ResultKind.ERROR)
    assert raw["custom_id"] == "x1"
    assert raw["response"]["status_code"] == code
    err = raw["response"]["body"]["error"]
    assert err["code"] == err_code and err["param"] is None and err["message"]
    assert err["type"] in ("invalid_request_error", "server_error", "rate_limit_error")


def test_status_wins_over_a_present_response():
    raw = check_line(convert(prediction(request_with_label("x"), TEXT_RESPONSE, status="INVALID_ARGUMENT: x")),
                     ResultKind.ERROR)
    assert raw["response"]["status_code"] == 400


def test_blocked_prompt_is_a_content_filter_error():
    response = {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
                "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9}}
    raw = check_line(convert(prediction(request_with_label("x"), response)), ResultKind.ERROR)
    assert raw["response"]["status_code"] == 400
    assert raw["response"]["body"]["error"]["code"] == "content_filter"


def test_missing_response_is_error():
    raw = check_line(convert(prediction(request_with_label("x"), None)), ResultKind.ERROR)
    assert raw["response"]["status_code"] == 500
    raw = check_line(convert(prediction(request_with_label("x"), {"candidates": []})), ResultKind.ERROR)
    assert raw["response"]["status_code"] == 500


def test_missing_label_raises():
    with pytest.raises(TranslationError):
        convert(prediction({"contents": []}, TEXT_RESPONSE))
    with pytest.raises(TranslationError):
        convert({"request": {"labels": {"other": "x"}}, "response": TEXT_RESPONSE, "status": ""})


def test_output_ids_are_deterministic_and_distinct():
    line = prediction(request_with_label("a"), TEXT_RESPONSE)
    a = json.loads(convert(line, index=0).data)
    b = json.loads(convert(line, index=0).data)
    c = json.loads(convert(line, index=1).data)
    d = json.loads(convert(line, index=0, batch_id="batch_other").data)
    assert a == b
    assert len({a["id"], c["id"], d["id"]}) == 3


HOSTILE_IDS = [
    "request-1", "simple_id", "UPPER-case", "has spaces", "ünïcødé-ид", "emoji-🚀", "new\nline", "tab\tsep",
    "../../etc/passwd", "a" * 63, "b" * 64, "c" * 500, "bgl_0", "BGL_1", "bgl_", "quote\"s", "back\\slash",
    "{\"json\": true}", "\u0000nul", "lone-\ud800-surrogate", "ｆｕｌｌｗｉｄｔｈ", "-", "_", "1",
]


def test_hostile_custom_ids_round_trip_through_labels():
    codec = vertex_codec()
    labels = []
    lines = []
    for i, cid in enumerate(HOSTILE_IDS):
        label = codec.encode(cid, i)
        instance = chat_to_vertex_instance({"messages": [{"role": "user", "content": f"q{i}"}]},
                                           custom_id_label=label)
        labels.append(label)
        # Vertex echoes the request (labels included) in the prediction line; order not kept.
        encoded = json.loads(json.dumps(instance))
        lines.append((i, prediction(encoded["request"], TEXT_RESPONSE)))
    assert len(set(labels)) == len(labels)
    restored = vertex_codec(remapped=json.loads(json.dumps(codec.remapped)))  # after a restart
    for i, line in reversed(lines):
        raw = check_line(convert(line, index=i, decode=restored.decode), ResultKind.OUTPUT)
        assert raw["custom_id"] == HOSTILE_IDS[i]
    err = check_line(convert(prediction(lines[5][1]["request"], None, status="INTERNAL"), index=5,
                             decode=restored.decode), ResultKind.ERROR)
    assert err["custom_id"] == HOSTILE_IDS[5]


def test_translation_error_line():
    try:
        chat_to_vertex_instance({"messages": [{"role": "user", "content": "x"}], "logprobs": True},
                                custom_id_label="a")
    except TranslationError as exc:
        raw = check_line(translation_error_line("my id", exc, request_index=3, batch_id="batch_x"),
                         ResultKind.ERROR)
    assert raw["custom_id"] == "my id"
    assert raw["response"]["status_code"] == 400
    assert raw["response"]["body"]["error"]["param"] == "logprobs"


# --- job states and counts -------------------------------------------------------------------------

@pytest.mark.parametrize("state, status", [
    ("JOB_STATE_QUEUED", JobStatus.VALIDATING), ("JOB_STATE_PENDING", JobStatus.VALIDATING),
    ("JOB_STATE_RUNNING", JobStatus.IN_PROGRESS), ("JOB_STATE_PAUSED", JobStatus.IN_PROGRESS),
    ("JOB_STATE_UPDATING", JobStatus.IN_PROGRESS), ("JOB_STATE_SUCCEEDED", JobStatus.COMPLETED),
    ("JOB_STATE_PARTIALLY_SUCCEEDED", JobStatus.COMPLETED), ("JOB_STATE_CANCELLING", JobStatus.CANCELLING),
    ("JOB_STATE_CANCELLED", JobStatus.CANCELLED), ("JOB_STATE_EXPIRED", JobStatus.EXPIRED),
    ("JOB_STATE_FAILED", JobStatus.FAILED),
])
def test_job_state_map(state, status):
    assert JOB_STATE_TO_STATUS[state] is status


def test_job_state_map_is_complete():
    assert len(JOB_STATE_TO_STATUS) == 11
    assert "JOB_STATE_UNSPECIFIED" not in JOB_STATE_TO_STATUS  # unknown: the adapter decides


@pytest.mark.parametrize("stats, total, expected", [
    ({"successfulCount": "7", "failedCount": "2", "incompleteCount": "1"}, 10, RequestCounts(10, 7, 2)),
    ({"successfulCount": 3}, 5, RequestCounts(5, 3, 0)),
    ({}, 4, RequestCounts(4, 0, 0)),
    (None, 4, RequestCounts(4, 0, 0)),
    ({"successfulCount": "9", "failedCount": "3"}, 10, RequestCounts(12, 9, 3)),
    ({"successful_count": "1", "failed_count": "1"}, 2, RequestCounts(2, 1, 1)),
])
def test_completion_stats_to_counts(stats, total, expected):
    assert completion_stats_to_counts(stats, total) == expected


def test_module_is_pure():
    """No network clients: the translation layer must import nothing that does I/O."""
    src = open(vt.__file__, encoding="utf-8").read()
    for banned in ("import httpx", "import aiohttp", "google.cloud", "import requests", "boto3"):
        assert banned not in src
