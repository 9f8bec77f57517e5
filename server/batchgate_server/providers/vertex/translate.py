"""Pure translation between OpenAI batch lines and Vertex AI Gemini batch prediction lines.

No network I/O. The Vertex adapter uses these to build `{"request": GenerateContentRequest}`
input lines (REST JSON, camelCase) and to turn `predictions.jsonl` lines back into OpenAI batch
output lines.

Vertex has no per-request id field, so the caller's custom_id travels (encoded into the label
charset, see `LABEL_VALUE_PATTERN`) in the request's `labels` map under `CUSTOM_ID_LABEL_KEY`;
the prediction line echoes the request, labels included.

Only /v1/chat/completions is supported: Vertex batch embeddings use a different line format
(no GenerateContentRequest, no labels) that we have not been able to confirm.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import mimetypes
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from batchgate_server.domain.models import RequestCounts
from batchgate_server.providers import output_lines
from batchgate_server.providers.base import JobStatus, ResultKind, ResultLine
from batchgate_server.providers.output_lines import error_body, line_id, response_line

SUPPORTED_ENDPOINTS = ("/v1/chat/completions",)

CUSTOM_ID_LABEL_KEY = "batchgate_custom_id"
# Vertex label values: at most 63 characters of lowercase letters, digits, '_' and '-'.
LABEL_VALUE_PATTERN = r"[a-z0-9_-]{1,63}"
LABEL_VALUE_MAX_LEN = 63
_LABEL_VALUE_RE = re.compile(LABEL_VALUE_PATTERN)


class TranslationError(Exception):
    """An OpenAI request that cannot be expressed as a Vertex request (or a Vertex line that
    cannot be read back). `param` names the offending OpenAI parameter."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


# ---------------------------------------------------------------------------------------------
# Job state / counts
# ---------------------------------------------------------------------------------------------

JOB_STATE_TO_STATUS: dict[str, JobStatus] = {
    "JOB_STATE_QUEUED": JobStatus.VALIDATING,
    "JOB_STATE_PENDING": JobStatus.VALIDATING,
    "JOB_STATE_RUNNING": JobStatus.IN_PROGRESS,
    "JOB_STATE_PAUSED": JobStatus.IN_PROGRESS,
    "JOB_STATE_UPDATING": JobStatus.IN_PROGRESS,
    "JOB_STATE_SUCCEEDED": JobStatus.COMPLETED,
    "JOB_STATE_PARTIALLY_SUCCEEDED": JobStatus.COMPLETED,
    "JOB_STATE_CANCELLING": JobStatus.CANCELLING,
    "JOB_STATE_CANCELLED": JobStatus.CANCELLED,
    "JOB_STATE_EXPIRED": JobStatus.EXPIRED,
    "JOB_STATE_FAILED": JobStatus.FAILED,
}


def _int(value: Any) -> int:
    """int64 fields arrive as JSON strings in Google REST JSON ("12"); tolerate ints and None."""
    if value is None or value == "":
        return 0
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def completion_stats_to_counts(stats: Mapping[str, Any] | None, total: int) -> RequestCounts:
    """`completionStats` {successfulCount, failedCount, incompleteCount} (int64 as strings)."""
    stats = stats or {}
    completed = _int(stats.get("successfulCount", stats.get("successful_count")))
    failed = _int(stats.get("failedCount", stats.get("failed_count")))
    return RequestCounts(total=max(total, completed + failed), completed=completed, failed=failed)


# ---------------------------------------------------------------------------------------------
# OpenAI chat request -> Vertex GenerateContentRequest
# ---------------------------------------------------------------------------------------------

# Parameters that change nothing the caller can observe in a batch result, or only carry
# caller bookkeeping: accepted and dropped.
_IGNORED_PARAMS = frozenset({
    "model", "user", "metadata", "store", "service_tier", "stream_options", "safety_identifier",
    "prompt_cache_key", "prompt_cache_retention", "verbosity",
})
_HANDLED_PARAMS = frozenset({
    "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "n", "seed",
    "presence_penalty", "frequency_penalty", "response_format", "tools", "tool_choice",
    "functions", "function_call", "parallel_tool_calls", "logprobs", "top_logprobs", "stream",
    "modalities", "reasoning_effort",
})
# Parameters Vertex batch cannot express (or we cannot map back): rejected by name.
_UNSUPPORTED_PARAMS = {
    "audio": "audio output is not supported on Vertex AI batch",
    "logit_bias": "logit_bias is not supported by Vertex AI Gemini",
    "prediction": "predicted outputs are not supported by Vertex AI Gemini",
    "web_search_options": "web search options are not supported by this adapter",
}

_REASONING_EFFORT_BUDGET = {"none": 0, "minimal": 1024, "low": 1024, "medium": 8192, "high": 24576}

_IMAGE_EXT_MIME = {
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
    ".gif": "image/gif", ".heic": "image/heic", ".heif": "image/heif", ".pdf": "application/pdf",
}
_DATA_URL_RE = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$",
                          re.DOTALL)


def _b64_ok(data: str) -> bool:
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _parse_data_url(url: str, param: str) -> tuple[str, str]:
    m = _DATA_URL_RE.match(url)
    if not m or not m.group("mime"):
        raise TranslationError(param, "only base64 data URLs with a media type are supported")
    data = m.group("data").strip()
    if not _b64_ok(data):
        raise TranslationError(param, "data URL payload is not valid base64")
    return m.group("mime").lower(), data


def _guess_mime(uri: str, param: str, default: str | None = None) -> str:
    path = uri.split("?", 1)[0].split("#", 1)[0]
    dot = path.rfind(".")
    ext = path[dot:].lower() if dot > path.rfind("/") else ""
    if ext in _IMAGE_EXT_MIME:
        return _IMAGE_EXT_MIME[ext]
    guessed = mimetypes.types_map.get(ext) if ext else None
    if guessed:
        return guessed
    if default is not None:
        return default
    raise TranslationError(param, f"cannot tell the media type of {uri!r} from its name")


def _image_part(image_url: Any, param: str) -> dict:
    if isinstance(image_url, str):
        url = image_url
    elif isinstance(image_url, Mapping) and isinstance(image_url.get("url"), str):
        url = image_url["url"]
    else:
        raise TranslationError(param, "image_url.url must be a string")
    # image_url.detail is a resolution hint with no per-part Gemini equivalent: ignored.
    if url.startswith("data:"):
        mime, data = _parse_data_url(url, param)
        return {"inlineData": {"mimeType": mime, "data": data}}
    if url.startswith(("gs://", "https://", "http://")):
        # Image URLs often have no extension (CDNs); Gemini sniffs image bytes, so JPEG is a
        # safe declared default for images.
        return {"fileData": {"mimeType": _guess_mime(url, param, default="image/jpeg"), "fileUri": url}}
    raise TranslationError(param, "image URLs must be data:, gs://, http:// or https:// URLs")


_AUDIO_FORMAT_MIME = {"wav": "audio/wav", "mp3": "audio/mp3"}


def _content_parts(content: Any, param: str, *, allow_media: bool = True) -> list[dict]:
    """OpenAI message content (string or list of parts) -> Gemini parts."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content != "" else []
    if not isinstance(content, list):
        raise TranslationError(param, "content must be a string or a list of content parts")
    parts: list[dict] = []
    for i, part in enumerate(content):
        p = f"{param}[{i}]"
        if not isinstance(part, Mapping):
            raise TranslationError(p, "content part must be an object")
        ptype = part.get("type")
        if ptype == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise TranslationError(p, "text part needs a string 'text'")
            if text:
                parts.append({"text": text})
        elif ptype == "refusal":
            if isinstance(part.get("refusal"), str) and part["refusal"]:
                parts.append({"text": part["refusal"]})
        elif ptype == "image_url" and allow_media:
            parts.append(_image_part(part.get("image_url"), p + ".image_url"))
        elif ptype == "input_audio" and allow_media:
            audio = part.get("input_audio") or {}
            fmt = audio.get("format")
            data = audio.get("data")
            if fmt not in _AUDIO_FORMAT_MIME or not isinstance(data, str) or not _b64_ok(data):
                raise TranslationError(p + ".input_audio", "input_audio needs base64 'data' and format wav|mp3")
            parts.append({"inlineData": {"mimeType": _AUDIO_FORMAT_MIME[fmt], "data": data}})
        elif ptype == "file" and allow_media:
            file = part.get("file") or {}
            if isinstance(file.get("file_data"), str):
                mime, data = _parse_data_url(file["file_data"], p + ".file.file_data")
                parts.append({"inlineData": {"mimeType": mime, "data": data}})
            else:
                raise TranslationError(p + ".file", "only inline file_data (data URL) files are supported; "
                                       "file_id references are not")
        else:
            raise TranslationError(p, f"content part type {ptype!r} is not supported here")
    return parts


def _text_only(content: Any, param: str) -> list[dict]:
    return _content_parts(content, param, allow_media=False)


def _parse_arguments(arguments: Any, param: str) -> dict:
    if isinstance(arguments, Mapping):
        return dict(arguments)
    if arguments is None or arguments == "":
        return {}
    if not isinstance(arguments, str):
        raise TranslationError(param, "function arguments must be a JSON string")
    try:
        value = json.loads(arguments)
    except ValueError as exc:
        raise TranslationError(param, f"function arguments are not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise TranslationError(param, "function arguments must be a JSON object")
    return value


def _tool_response_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise TranslationError(f"{param}[{i}]", "tool message content parts must be text")
            texts.append(part["text"])
        return "".join(texts)
    if content is None:
        return ""
    raise TranslationError(param, "tool message content must be a string or text parts")


def _convert_messages(messages: Any) -> tuple[list[dict], list[dict]]:
    if not isinstance(messages, list) or not messages:
        raise TranslationError("messages", "messages must be a non-empty list")
    system_parts: list[dict] = []
    contents: list[dict] = []
    call_names: dict[str, str] = {}  # tool_call_id -> function name, for functionResponse

    def add(role: str, parts: list[dict]) -> None:
        if not parts:
            return
        # Gemini wants alternating turns; merge consecutive same-role messages (this also puts
        # the responses to parallel function calls into one turn, as Gemini requires).
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})

    for i, msg in enumerate(messages):
        p = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise TranslationError(p, "message must be an object")
        role = msg.get("role")
        if role in ("system", "developer"):
            system_parts.extend(_text_only(msg.get("content"), p + ".content"))
        elif role == "user":
            parts = _content_parts(msg.get("content"), p + ".content")
            if not parts:
                raise TranslationError(p + ".content", "user message has no content")
            add("user", parts)
        elif role == "assistant":
            parts = _text_only(msg.get("content"), p + ".content")
            if msg.get("audio"):
                raise TranslationError(p + ".audio", "assistant audio references are not supported")
            tool_calls = msg.get("tool_calls") or []
            if not isinstance(tool_calls, list):
                raise TranslationError(p + ".tool_calls", "tool_calls must be a list")
            for j, call in enumerate(tool_calls):
                cp = f"{p}.tool_calls[{j}]"
                if not isinstance(call, Mapping) or call.get("type", "function") != "function":
                    raise TranslationError(cp, "only function tool calls are supported")
                fn = call.get("function") or {}
                name = fn.get("name")
                if not isinstance(name, str) or not name:
                    raise TranslationError(cp + ".function.name", "tool call needs a function name")
                if isinstance(call.get("id"), str):
                    call_names[call["id"]] = name
                parts.append({"functionCall": {
                    "name": name, "args": _parse_arguments(fn.get("arguments"), cp + ".function.arguments")}})
            fc = msg.get("function_call")
            if isinstance(fc, Mapping) and fc.get("name"):
                parts.append({"functionCall": {
                    "name": fc["name"], "args": _parse_arguments(fc.get("arguments"), p + ".function_call.arguments")}})
            add("model", parts)
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            name = call_names.get(call_id) if isinstance(call_id, str) else None
            if name is None:
                raise TranslationError(p + ".tool_call_id", "tool message does not answer a tool call of an earlier "
                                       "assistant message")
            text = _tool_response_text(msg.get("content"), p + ".content")
            add("user", [{"functionResponse": {"name": name, "response": {"content": text}}}])
        elif role == "function":  # deprecated OpenAI function-calling messages
            name = msg.get("name")
            if not isinstance(name, str) or not name:
                raise TranslationError(p + ".name", "function message needs a name")
            text = _tool_response_text(msg.get("content"), p + ".content")
            add("user", [{"functionResponse": {"name": name, "response": {"content": text}}}])
        else:
            raise TranslationError(p + ".role", f"unsupported message role {role!r}")
    if not contents:
        raise TranslationError("messages", "messages must contain at least one user or assistant message")
    return system_parts, contents


# --- JSON Schema -> Vertex Schema (OpenAPI 3.0 subset) ----------------------------------------

_TYPE_MAP = {"string": "STRING", "number": "NUMBER", "integer": "INTEGER", "boolean": "BOOLEAN",
             "array": "ARRAY", "object": "OBJECT"}
_COPY_KEYS = {
    "description": "description", "title": "title", "format": "format", "default": "default",
    "minItems": "minItems", "maxItems": "maxItems", "minLength": "minLength", "maxLength": "maxLength",
    "pattern": "pattern", "minimum": "minimum", "maximum": "maximum", "minProperties": "minProperties",
    "maxProperties": "maxProperties", "nullable": "nullable", "example": "example",
    "propertyOrdering": "propertyOrdering",
}
# Annotations with no effect on what may be generated.
_DROP_KEYS = {"$schema", "$id", "$comment", "examples", "deprecated", "readOnly", "writeOnly",
              "$defs", "definitions", "strict"}


class _SchemaConverter:
    def __init__(self, root: Mapping[str, Any], param: str, *, order_properties: bool) -> None:
        self.param = param
        self.defs = {**(root.get("definitions") or {}), **(root.get("$defs") or {})}
        self.order_properties = order_properties

    def fail(self, path: str, why: str) -> TranslationError:
        return TranslationError(self.param, f"JSON schema at {path or '#'}: {why} (not expressible in a "
                                f"Vertex AI schema)")

    def resolve(self, ref: str, path: str, seen: tuple[str, ...]) -> tuple[Mapping[str, Any], tuple[str, ...]]:
        m = re.fullmatch(r"#/(\$defs|definitions)/(.+)", ref)
        if not m or m.group(2) not in self.defs:
            raise self.fail(path, f"unresolvable $ref {ref!r}")
        if ref in seen:
            raise self.fail(path, f"recursive $ref {ref!r}")
        return self.defs[m.group(2)], seen + (ref,)

    def convert(self, schema: Any, path: str = "", seen: tuple[str, ...] = ()) -> dict:
        if schema is True or schema == {}:
            raise self.fail(path, "an unconstrained schema")
        if not isinstance(schema, Mapping):
            raise self.fail(path, "schema must be an object")
        schema = dict(schema)
        if "$ref" in schema:
            target, seen = self.resolve(schema.pop("$ref"), path, seen)
            schema = {**target, **schema}  # sibling keys (description...) override
        if "allOf" in schema:
            all_of = schema.pop("allOf")
            if not isinstance(all_of, list) or len(all_of) != 1:
                raise self.fail(path, "allOf with more than one subschema")
            inner = all_of[0]
            if isinstance(inner, Mapping) and "$ref" in inner:
                inner, seen = self.resolve(inner["$ref"], path, seen)
            schema = {**inner, **schema}
        out: dict[str, Any] = {}
        nullable = False
        types = schema.pop("type", None)
        if isinstance(types, list):
            non_null = [t for t in types if t != "null"]
            nullable = len(non_null) != len(types)
            if len(non_null) != 1:
                raise self.fail(path, f"type {types!r}")
            types = non_null[0]
        if types is not None:
            if types == "null" or types not in _TYPE_MAP:
                raise self.fail(path, f"type {types!r}")
            out["type"] = _TYPE_MAP[types]
        if "const" in schema:
            schema.setdefault("enum", [schema.pop("const")])
        for key in list(schema):
            value = schema[key]
            kp = f"{path}/{key}"
            if key in _DROP_KEYS:
                continue
            if key in _COPY_KEYS:
                out[_COPY_KEYS[key]] = value
            elif key == "enum":
                if not isinstance(value, list) or not value:
                    raise self.fail(kp, "enum must be a non-empty list")
                if any(v is None for v in value):
                    nullable = True
                    value = [v for v in value if v is not None]
                if all(isinstance(v, str) for v in value):
                    out.setdefault("type", "STRING")
                    out["enum"] = value
                elif all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                    out.setdefault("type", "INTEGER")
                    out["format"] = "enum"
                    out["enum"] = [str(v) for v in value]
                else:
                    raise self.fail(kp, "enum values must be all strings or all integers")
            elif key == "items":
                if isinstance(value, list):
                    raise self.fail(kp, "tuple-style items")
                out["items"] = self.convert(value, kp, seen)
            elif key == "properties":
                if not isinstance(value, Mapping):
                    raise self.fail(kp, "properties must be an object")
                out["properties"] = {name: self.convert(sub, f"{kp}/{name}", seen) for name, sub in value.items()}
                if self.order_properties and value and "propertyOrdering" not in schema:
                    out["propertyOrdering"] = list(value)
            elif key == "required":
                out["required"] = list(value)
            elif key == "additionalProperties":
                # `false` is what a Gemini schema means anyway (only the listed properties are
                # generated); anything else asks for free-form maps, which it cannot express.
                if value is not False:
                    raise self.fail(kp, "additionalProperties other than false")
            elif key in ("anyOf", "oneOf"):
                # oneOf -> anyOf is only safe when the branches cannot overlap; we don't prove it.
                if key == "oneOf":
                    raise self.fail(kp, "oneOf")
                if not isinstance(value, list) or not value:
                    raise self.fail(kp, "anyOf must be a non-empty list")
                branches = []
                for k, sub in enumerate(value):
                    if isinstance(sub, Mapping) and sub.get("type") == "null" and len(sub) == 1:
                        nullable = True
                        continue
                    branches.append(self.convert(sub, f"{kp}/{k}", seen))
                if len(branches) == 1:
                    merged = dict(branches[0])
                    merged.update(out)  # outer description/title win
                    out = merged
                elif branches:
                    out["anyOf"] = branches
            else:
                raise self.fail(kp, f"keyword {key!r}")
        if nullable:
            out["nullable"] = True
        return out


def json_schema_to_vertex(schema: Mapping[str, Any], *, param: str, order_properties: bool = False) -> dict:
    """Convert a JSON Schema into Vertex's OpenAPI-subset `Schema`, raising TranslationError for
    anything that would silently loosen it."""
    return _SchemaConverter(schema, param, order_properties=order_properties).convert(schema)


def _function_declarations(body: Mapping[str, Any]) -> list[dict]:
    decls: list[dict] = []
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise TranslationError("tools", "tools must be a list")
        for i, tool in enumerate(tools):
            p = f"tools[{i}]"
            if not isinstance(tool, Mapping) or tool.get("type") != "function":
                raise TranslationError(p, "only function tools are supported")
            decls.append(_declaration(tool.get("function"), p + ".function"))
    functions = body.get("functions")
    if functions is not None:
        if not isinstance(functions, list):
            raise TranslationError("functions", "functions must be a list")
        for i, fn in enumerate(functions):
            decls.append(_declaration(fn, f"functions[{i}]"))
    return decls


def _declaration(fn: Any, param: str) -> dict:
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise TranslationError(param, "function needs a name")
    decl: dict[str, Any] = {"name": fn["name"]}
    if isinstance(fn.get("description"), str) and fn["description"]:
        decl["description"] = fn["description"]
    params = fn.get("parameters")
    # Gemini rejects OBJECT schemas without properties: a no-argument function omits parameters.
    if isinstance(params, Mapping) and params.get("properties"):
        decl["parameters"] = json_schema_to_vertex(params, param=param + ".parameters")
    elif isinstance(params, Mapping) and params.get("type") not in (None, "object"):
        raise TranslationError(param + ".parameters", "function parameters must be an object schema")
    return decl


def _tool_config(body: Mapping[str, Any], names: list[str]) -> tuple[dict | None, list[str] | None]:
    """Returns (toolConfig, restrict_to) where restrict_to limits the declared functions."""
    choice = body.get("tool_choice")
    param = "tool_choice"
    if choice is None and body.get("function_call") is not None:
        choice, param = body["function_call"], "function_call"
        if isinstance(choice, Mapping):
            choice = {"type": "function", "function": {"name": choice.get("name")}}
    if choice is None:
        return None, None
    if not names:
        if choice in ("none", "auto"):
            return None, None
        raise TranslationError(param, f"{param} requires tools")
    if choice == "auto":
        return {"functionCallingConfig": {"mode": "AUTO"}}, None
    if choice == "none":
        return {"functionCallingConfig": {"mode": "NONE"}}, None
    if choice == "required":
        return {"functionCallingConfig": {"mode": "ANY"}}, None
    if isinstance(choice, Mapping) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if name not in names:
            raise TranslationError(param, f"{param} names an undeclared function {name!r}")
        return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}, None
    if isinstance(choice, Mapping) and choice.get("type") == "allowed_tools":
        allowed = choice.get("allowed_tools") or {}
        wanted = []
        for t in allowed.get("tools") or []:
            n = (t.get("function") or {}).get("name") if isinstance(t, Mapping) else None
            if n not in names:
                raise TranslationError(param, f"allowed_tools names an undeclared function {n!r}")
            wanted.append(n)
        if allowed.get("mode") == "required":
            return {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": wanted}}, None
        if allowed.get("mode") == "auto":
            return {"functionCallingConfig": {"mode": "AUTO"}}, wanted
        raise TranslationError(param, "allowed_tools.mode must be auto or required")
    raise TranslationError(param, f"unsupported {param} {choice!r}")


def _response_format(rf: Any, gen: dict) -> None:
    if rf is None:
        return
    if not isinstance(rf, Mapping):
        raise TranslationError("response_format", "response_format must be an object")
    kind = rf.get("type")
    if kind == "text":
        return
    if kind == "json_object":
        gen["responseMimeType"] = "application/json"
        return
    if kind == "json_schema":
        js = rf.get("json_schema") or {}
        schema = js.get("schema")
        if not isinstance(schema, Mapping):
            raise TranslationError("response_format", "json_schema.schema is required")
        gen["responseMimeType"] = "application/json"
        gen["responseSchema"] = json_schema_to_vertex(schema, param="response_format", order_properties=True)
        return
    raise TranslationError("response_format", f"unsupported response_format type {kind!r}")


def _number(body: Mapping[str, Any], key: str, *, integer: bool = False) -> Any:
    value = body.get(key)
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise TranslationError(key, f"{key} must be a {'integer' if integer else 'number'}")
    return value


def chat_to_vertex_instance(body: Mapping[str, Any], *, custom_id_label: str) -> dict:
    """One OpenAI /v1/chat/completions body -> one Vertex batch input line {"request": {...}}.

    `custom_id_label` is the caller's custom_id already encoded into the label charset
    (LABEL_VALUE_PATTERN); it is stored under labels[CUSTOM_ID_LABEL_KEY]."""
    if not isinstance(custom_id_label, str) or not _LABEL_VALUE_RE.fullmatch(custom_id_label):
        raise ValueError(f"custom_id_label {custom_id_label!r} is not a valid Vertex label value")
    if not isinstance(body, Mapping):
        raise TranslationError("body", "body must be an object")

    for key in body:
        if key in _UNSUPPORTED_PARAMS and body[key] is not None:
            raise TranslationError(key, _UNSUPPORTED_PARAMS[key])
        if key not in _HANDLED_PARAMS and key not in _IGNORED_PARAMS and key not in _UNSUPPORTED_PARAMS:
            raise TranslationError(key, f"unsupported parameter {key!r}")
    if body.get("stream"):
        raise TranslationError("stream", "stream is not supported in batch requests")
    if body.get("logprobs"):
        raise TranslationError("logprobs", "logprobs are not supported on Vertex AI batch")
    if body.get("top_logprobs") not in (None, 0):
        raise TranslationError("top_logprobs", "top_logprobs are not supported on Vertex AI batch")
    modalities = body.get("modalities")
    if modalities is not None and list(modalities) != ["text"]:
        raise TranslationError("modalities", "only text output is supported")
    if body.get("parallel_tool_calls") is False:
        raise TranslationError("parallel_tool_calls", "parallel_tool_calls=false cannot be enforced on Vertex AI")

    system_parts, contents = _convert_messages(body.get("messages"))
    request: dict[str, Any] = {"contents": contents}
    if system_parts:
        request["systemInstruction"] = {"parts": system_parts}

    gen: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens")
    key = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, key = body.get("max_tokens"), "max_tokens"
    if max_tokens is not None:
        gen["maxOutputTokens"] = _number(body, key, integer=True)
    if body.get("temperature") is not None:
        gen["temperature"] = _number(body, "temperature")
    if body.get("top_p") is not None:
        gen["topP"] = _number(body, "top_p")
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise TranslationError("stop", "stop must be a string or a list of strings")
        if stops:
            gen["stopSequences"] = stops
    if body.get("n") is not None:
        n = _number(body, "n", integer=True)
        if n != 1:
            gen["candidateCount"] = n
    if body.get("seed") is not None:
        gen["seed"] = _number(body, "seed", integer=True)
    if body.get("presence_penalty") is not None:
        gen["presencePenalty"] = _number(body, "presence_penalty")
    if body.get("frequency_penalty") is not None:
        gen["frequencyPenalty"] = _number(body, "frequency_penalty")
    effort = body.get("reasoning_effort")
    if effort is not None:
        if effort not in _REASONING_EFFORT_BUDGET:
            raise TranslationError("reasoning_effort", f"unsupported reasoning_effort {effort!r}")
        gen["thinkingConfig"] = {"thinkingBudget": _REASONING_EFFORT_BUDGET[effort]}
    _response_format(body.get("response_format"), gen)
    if gen:
        request["generationConfig"] = gen

    decls = _function_declarations(body)
    tool_config, restrict = _tool_config(body, [d["name"] for d in decls])
    if restrict is not None:
        decls = [d for d in decls if d["name"] in restrict]
    if decls:
        request["tools"] = [{"functionDeclarations": decls}]
    if tool_config is not None:
        request["toolConfig"] = tool_config

    request["labels"] = {CUSTOM_ID_LABEL_KEY: custom_id_label}
    return {"request": request}


# ---------------------------------------------------------------------------------------------
# Vertex prediction line -> OpenAI batch output line
# ---------------------------------------------------------------------------------------------

_FINISH_REASON = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}

# google.rpc.Code names -> HTTP status, for per-line status text.
_RPC_STATUS_HTTP = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ALREADY_EXISTS": 409,
    "ABORTED": 409, "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "INTERNAL": 500, "UNKNOWN": 500,
    "DATA_LOSS": 500, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}
_HTTP_PHRASES = {"bad request": 400, "unauthorized": 401, "forbidden": 403, "not found": 404,
                 "too many requests": 429, "internal server error": 500, "service unavailable": 503,
                 "gateway timeout": 504}


def _g(d: Mapping[str, Any] | None, camel: str, default: Any = None) -> Any:
    """Read a camelCase field, tolerating the snake_case spelling."""
    if not isinstance(d, Mapping):
        return default
    if camel in d:
        return d[camel]
    snake = re.sub(r"(?<!^)([A-Z])", r"_\1", camel).lower()
    return d.get(snake, default)


batch_request_output_id = line_id


def _status_to_http(status: Any) -> tuple[int, str, str]:
    """Vertex per-line `status` (free text, sometimes JSON) -> (http code, message, code name)."""
    if isinstance(status, Mapping):
        message = str(status.get("message") or json.dumps(status))
        code = status.get("code")
        name = str(status.get("status") or "")
    else:
        message = str(status)
        code, name = None, ""
        try:
            parsed = json.loads(message)
        except ValueError:
            parsed = None
        if isinstance(parsed, Mapping):
            inner = parsed.get("error", parsed)
            if isinstance(inner, Mapping):
                code, name = inner.get("code"), str(inner.get("status") or "")
                message = str(inner.get("message") or message)
    if isinstance(code, int) and 400 <= code <= 599:
        http = code
    elif name.upper() in _RPC_STATUS_HTTP:
        http = _RPC_STATUS_HTTP[name.upper()]
    else:
        http = 0
        for rpc, value in _RPC_STATUS_HTTP.items():
            if re.search(rf"\b{rpc}\b", message):
                http, name = value, rpc
                break
        if not http:
            lowered = message.lower()
            m = re.match(r"\s*(\d{3})\b", message)
            if m and 400 <= int(m.group(1)) <= 599:
                http = int(m.group(1))
            else:
                http = next((v for k, v in _HTTP_PHRASES.items() if k in lowered), 0)
            if not http:
                http = 400 if ("invalid" in lowered or "bad request" in lowered) else 500
    return http, message, (name.lower() if name else "")


def _error_type(http: int) -> str:
    if http == 429:
        return "rate_limit_error"
    if http == 401:
        return "authentication_error"
    if http == 403:
        return "permission_error"
    return "invalid_request_error" if http < 500 else "server_error"


def _error_line(out_id: str, custom_id: str, http: int, message: str, code: str,
                request_id: str = "") -> ResultLine:
    return response_line(ResultKind.ERROR, out_id, custom_id, http,
                         error_body(message, _error_type(http), None, code or None), request_id)


def _created(response: Mapping[str, Any], processed_time: Any) -> int:
    for value in (_g(response, "createTime"), processed_time):
        if isinstance(value, str) and value:
            text = value.strip().replace("Z", "+00:00")
            # Python < 3.11 can't read nanoseconds; trim fractional seconds to microseconds.
            text = re.sub(r"(\.\d{6})\d+", r"\1", text)
            try:
                return int(datetime.fromisoformat(text).timestamp())
            except ValueError:
                continue
    return 0


def _usage(meta: Mapping[str, Any] | None) -> dict:
    prompt = _int(_g(meta, "promptTokenCount"))
    candidates = _int(_g(meta, "candidatesTokenCount"))
    thoughts = _int(_g(meta, "thoughtsTokenCount"))
    cached = _int(_g(meta, "cachedContentTokenCount"))
    completion = candidates + thoughts  # OpenAI counts reasoning tokens as completion tokens
    total = _int(_g(meta, "totalTokenCount")) or prompt + completion
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": total,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": thoughts},
    }


def _choice(candidate: Mapping[str, Any], position: int, out_id: str) -> dict:
    content = _g(candidate, "content") or {}
    texts: list[str] = []
    tool_calls: list[dict] = []
    raw_index = _g(candidate, "index")
    index = _int(raw_index) if raw_index is not None else position  # proto3 JSON omits index 0
    for part in _g(content, "parts") or []:
        if not isinstance(part, Mapping):
            continue
        if part.get("thought"):
            continue  # thought summaries are not part of the answer
        call = _g(part, "functionCall")
        if isinstance(call, Mapping):
            call_id = call.get("id") or "call_" + hashlib.sha256(
                f"{out_id}\x00{index}\x00{len(tool_calls)}".encode()).hexdigest()[:24]
            tool_calls.append({
                "id": call_id, "type": "function",
                "function": {"name": call.get("name", ""),
                             "arguments": json.dumps(call.get("args") or {}, ensure_ascii=False)},
            })
        elif isinstance(part.get("text"), str):
            texts.append(part["text"])
    raw_reason = _g(candidate, "finishReason")
    reason = "tool_calls" if tool_calls else _FINISH_REASON.get(raw_reason, "stop")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None,
                               "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "finish_reason": reason, "logprobs": None}


def vertex_prediction_to_openai(line: Mapping[str, Any], *, decode_custom_id: Callable[[str], str],
                                request_index: int, batch_id: str, model: str) -> ResultLine:
    """One predictions.jsonl line -> one OpenAI batch output line (OUTPUT or ERROR).

    Raises TranslationError when the line carries no custom_id label (it cannot be attributed)."""
    request = _g(line, "request") or {}
    labels = _g(request, "labels") or {}
    label = labels.get(CUSTOM_ID_LABEL_KEY) if isinstance(labels, Mapping) else None
    if not isinstance(label, str) or not label:
        raise TranslationError("labels", "prediction line has no batchgate custom_id label")
    custom_id = decode_custom_id(label)
    out_id = batch_request_output_id(batch_id, request_index)

    status = line.get("status")
    response = _g(line, "response")
    request_id = str(_g(response, "responseId") or "") if isinstance(response, Mapping) else ""
    if status:
        http, message, code = _status_to_http(status)
        return _error_line(out_id, custom_id, http, message, code or "vertex_error", request_id)
    if not isinstance(response, Mapping):
        return _error_line(out_id, custom_id, 500, "Vertex AI returned no response for this request",
                           "vertex_error")
    candidates = _g(response, "candidates") or []
    if not candidates:
        feedback = _g(response, "promptFeedback") or {}
        reason = _g(feedback, "blockReason")
        if reason:
            msg = _g(feedback, "blockReasonMessage") or f"the prompt was blocked ({reason})"
            return _error_line(out_id, custom_id, 400, str(msg), "content_filter", request_id)
        return _error_line(out_id, custom_id, 500, "Vertex AI returned no candidates", "vertex_error",
                           request_id)

    choices = [_choice(c, i, out_id) for i, c in enumerate(candidates) if isinstance(c, Mapping)]
    choices.sort(key=lambda c: c["index"])
    completion = {
        "id": f"chatcmpl-{request_id}" if request_id else "chatcmpl-" + out_id[len("batch_req_"):],
        "object": "chat.completion",
        "created": _created(response, line.get("processed_time")),
        "model": model,
        "choices": choices,
        "usage": _usage(_g(response, "usageMetadata")),
    }
    return response_line(ResultKind.OUTPUT, out_id, custom_id, 200, completion, request_id)


def translation_error_line(custom_id: str, error: TranslationError, *, request_index: int,
                           batch_id: str) -> ResultLine:
    """The error-file line for a request never sent because it cannot be translated."""
    return output_lines.translation_error_line(custom_id, error, request_index=request_index,
                                               batch_id=batch_id, request_id="")
