"""Pure translation between OpenAI batch lines and AWS Bedrock batch inference records.

No network I/O. Input records are `{"recordId", "modelInput"}`; output records (`*.jsonl.out`)
are `{"recordId", "modelInput", "modelOutput"}` or `{"recordId", "modelInput", "error"}`.

`modelInput` depends on the job's modelInvocationType (see `invocation_type`):
- Anthropic Claude models (`anthropic.claude…`, inference profiles `us.anthropic.claude…`,
  their ARNs): InvokeModel with the Anthropic-on-Bedrock Messages body. The OpenAI -> Anthropic
  conversion is the Anthropic adapter's (`chat_to_anthropic_params`), minus `model`, plus
  `anthropic_version`.
- Other chat models: Converse (the Converse API request body, without modelId).
- Amazon Titan Text Embeddings V2: InvokeModel with {"inputText", "dimensions"?, "normalize"}.

The caller's custom_id travels as the recordId (encoded with a CustomIdCodec, see
custom_ids.bedrock_codec).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from batchgate_server.domain.models import RequestCounts, Usage
from batchgate_server.providers.anthropic.translate import (
    TranslationError,
    append_turn,
    anthropic_result_to_openai,
    chat_to_anthropic_params,
    parse_arguments,
    prompt_usage,
    translation_error_line,
)
from batchgate_server.providers.base import JobStatus, ResultKind, ResultLine
from batchgate_server.providers.output_lines import dumps, error_body, line_id, response_line

__all__ = [
    "ANTHROPIC_VERSION", "BEDROCK_STATUS_TO_STATUS", "CHAT_ENDPOINT", "EMBEDDINGS_ENDPOINT",
    "SUPPORTED_ENDPOINTS", "TranslationError", "batch_request_output_id", "bedrock_output_to_openai",
    "chat_to_bedrock_record", "embedding_to_bedrock_record", "invocation_type",
    "is_anthropic_model", "is_titan_embedding_model", "make_job_name", "parse_manifest",
    "translation_error_line", "validate_job_name",
]

ANTHROPIC_VERSION = "bedrock-2023-05-31"
CHAT_ENDPOINT = "/v1/chat/completions"
EMBEDDINGS_ENDPOINT = "/v1/embeddings"
SUPPORTED_ENDPOINTS = (CHAT_ENDPOINT, EMBEDDINGS_ENDPOINT)

# ---------------------------------------------------------------------------------------------
# Model families, job names, statuses, manifest
# ---------------------------------------------------------------------------------------------

# Base model ids (anthropic.claude-…), cross-region inference profiles (us./eu./apac./global.
# anthropic.claude-…) and ARNs ending in either. Application inference profile ARNs are opaque
# and cannot be recognised from the id.
_ANTHROPIC_RE = re.compile(r"(?:^|[/.:])anthropic\.claude", re.IGNORECASE)
_TITAN_EMBED_V2_RE = re.compile(r"(?:^|[/.:])amazon\.titan-embed-text-v2", re.IGNORECASE)


def is_anthropic_model(model_id: str) -> bool:
    return bool(model_id) and _ANTHROPIC_RE.search(model_id) is not None


def is_titan_embedding_model(model_id: str) -> bool:
    return bool(model_id) and _TITAN_EMBED_V2_RE.search(model_id) is not None


def invocation_type(model_id: str, endpoint: str = CHAT_ENDPOINT) -> str:
    """The CreateModelInvocationJob `modelInvocationType` the records of this module need."""
    if endpoint == EMBEDDINGS_ENDPOINT or is_anthropic_model(model_id):
        return "InvokeModel"
    return "Converse"


BEDROCK_STATUS_TO_STATUS: dict[str, JobStatus] = {
    "Submitted": JobStatus.VALIDATING,
    "Validating": JobStatus.VALIDATING,
    "Scheduled": JobStatus.IN_PROGRESS,
    "InProgress": JobStatus.IN_PROGRESS,
    "Completed": JobStatus.COMPLETED,
    "PartiallyCompleted": JobStatus.COMPLETED,
    "Stopping": JobStatus.CANCELLING,
    "Stopped": JobStatus.CANCELLED,
    "Expired": JobStatus.EXPIRED,
    "Failed": JobStatus.FAILED,
}

# botocore ModelInvocationJobName: length 1-63 and this pattern.
_JOB_NAME_RE = re.compile(r"[a-zA-Z0-9]{1,63}(-*[a-zA-Z0-9\+\-\.]){0,63}")
JOB_NAME_MAX_LEN = 63


def validate_job_name(name: str) -> str:
    """Return `name` if Bedrock accepts it as a jobName, else raise ValueError."""
    if not isinstance(name, str) or not 1 <= len(name) <= JOB_NAME_MAX_LEN \
            or not _JOB_NAME_RE.fullmatch(name):
        raise ValueError(f"invalid Bedrock job name {name!r}: 1-63 characters, starting with a "
                         "letter or digit, then letters, digits, '+', '-' and '.'")
    return name


def make_job_name(batch_id: str) -> str:
    """A deterministic, valid jobName for a batch (so a re-submit after a crash reuses it).

    Characters Bedrock refuses become '-'; when anything had to change, a hash of the exact
    batch id is appended so distinct ids never share a name."""
    safe = re.sub(r"[^a-zA-Z0-9+.-]", "-", batch_id)
    name = f"batchgate-{safe}"
    if safe != batch_id or len(name) > JOB_NAME_MAX_LEN:
        digest = hashlib.sha256(batch_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        name = f"{name[:JOB_NAME_MAX_LEN - len(digest) - 1]}-{digest}"
    return validate_job_name(name)


def _int(value: Any) -> int:
    if value is None or value == "" or isinstance(value, bool):
        return 0
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def parse_manifest(manifest: Mapping[str, Any]) -> tuple[RequestCounts, Usage]:
    """manifest.json.out -> (request counts, token usage)."""
    total = _int(manifest.get("totalRecordCount"))
    completed = _int(manifest.get("successRecordCount"))
    failed = _int(manifest.get("errorRecordCount"))
    counts = RequestCounts(total=max(total, completed + failed), completed=completed, failed=failed)
    usage = Usage(input_tokens=_int(manifest.get("inputTokenCount")),
                  output_tokens=_int(manifest.get("outputTokenCount")))
    return counts, usage


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------

def chat_to_bedrock_record(body: Mapping[str, Any], *, record_id: str, model_id: str,
                           default_max_tokens: int = 4096) -> dict:
    """One OpenAI /v1/chat/completions body -> one Bedrock input record."""
    if is_anthropic_model(model_id):
        model_input = _claude_model_input(body, model_id, default_max_tokens)
    else:
        model_input = _converse_model_input(body)
    return {"recordId": record_id, "modelInput": model_input}


def _claude_model_input(body: Mapping[str, Any], model_id: str, default_max_tokens: int) -> dict:
    params = chat_to_anthropic_params(dict(body), model=model_id, default_max_tokens=default_max_tokens)
    params.pop("model", None)
    # metadata.user_id is caller bookkeeping; Bedrock's Claude body has no such field.
    params.pop("metadata", None)
    for i, turn in enumerate(params.get("messages") or []):
        content = turn.get("content")
        if not isinstance(content, list):
            continue
        for block in content:
            source = block.get("source") if isinstance(block, Mapping) else None
            if isinstance(source, Mapping) and source.get("type") == "url":
                raise TranslationError(f"messages[{i}].content",
                                       "Bedrock accepts images as base64 data: URLs only")
    return {"anthropic_version": ANTHROPIC_VERSION, **params}


# --- Converse ---------------------------------------------------------------------------------

_CONVERSE_IGNORED = frozenset({
    "model", "stream_options", "store", "metadata", "service_tier", "user", "safety_identifier",
    "prompt_cache_key", "prompt_cache_retention", "prediction",
    "seed",  # OpenAI itself promises only best-effort determinism
})
_CONVERSE_HANDLED = frozenset({
    "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "tools",
    "tool_choice", "response_format", "parallel_tool_calls", "stream", "n", "logprobs",
    "top_logprobs", "presence_penalty", "frequency_penalty", "modalities",
})
_IMAGE_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg",
                  "image/gif": "gif", "image/webp": "webp"}
_EXT_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".gif": "gif", ".webp": "webp"}
_TOOL_USE_ID_RE = re.compile(r"[a-zA-Z0-9_.:-]{1,64}")
_DATA_URL_RE = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$",
                          re.DOTALL | re.IGNORECASE)


def _tool_use_id(call_id: str) -> str:
    if _TOOL_USE_ID_RE.fullmatch(call_id):
        return call_id
    return "bgt_" + hashlib.sha256(call_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _data_url(url: str, where: str) -> tuple[str, str]:
    m = _DATA_URL_RE.match(url)
    if not m:
        raise TranslationError(where, "only base64 data: URLs are supported")
    data = m.group("data").strip()
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise TranslationError(where, "data: URL payload is not valid base64") from None
    return m.group("mime").lower(), data


def _converse_image(image_url: Any, where: str) -> dict:
    url = image_url.get("url") if isinstance(image_url, Mapping) else image_url
    if not isinstance(url, str) or not url:
        raise TranslationError(where, "image_url.url is required")
    if url[:5].lower() == "data:":
        mime, data = _data_url(url, where)
        if mime not in _IMAGE_FORMATS:
            raise TranslationError(where, f"image type {mime!r} is not supported "
                                          "(png, jpeg, gif, webp)")
        return {"image": {"format": _IMAGE_FORMATS[mime], "source": {"bytes": data}}}
    if url.startswith("s3://"):
        path = url.split("?", 1)[0]
        ext = path[path.rfind("."):].lower() if "." in path.rsplit("/", 1)[-1] else ""
        if ext not in _EXT_FORMATS:
            raise TranslationError(where, "cannot tell the image format of an s3:// URL "
                                          "without a .png/.jpg/.gif/.webp extension")
        return {"image": {"format": _EXT_FORMATS[ext], "source": {"s3Location": {"uri": url}}}}
    raise TranslationError(where, "Bedrock accepts images as base64 data: URLs or s3:// URIs only")


def _converse_blocks(content: Any, where: str, *, media: bool) -> list[dict]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if not isinstance(content, list):
        raise TranslationError(where, "content must be a string or an array of content parts")
    blocks: list[dict] = []
    for j, part in enumerate(content):
        pw = f"{where}[{j}]"
        ptype = part.get("type") if isinstance(part, Mapping) else None
        if ptype == "text" and isinstance(part.get("text"), str):
            if part["text"]:
                blocks.append({"text": part["text"]})
        elif ptype == "refusal" and isinstance(part.get("refusal"), str):
            if part["refusal"]:
                blocks.append({"text": part["refusal"]})
        elif ptype == "image_url" and media:
            blocks.append(_converse_image(part.get("image_url"), pw + ".image_url.url"))
        elif ptype == "file" and media:
            file = part.get("file") if isinstance(part.get("file"), Mapping) else {}
            if not isinstance(file.get("file_data"), str):
                raise TranslationError(pw + ".file", "only inline 'file_data' PDFs are supported")
            mime, data = _data_url(file["file_data"], pw + ".file.file_data")
            if mime != "application/pdf":
                raise TranslationError(pw + ".file.file_data", f"file type {mime!r} is not supported "
                                                               "(PDF only)")
            # Converse document names allow letters, digits, spaces, hyphens, parentheses and
            # brackets only, so a neutral name is used.
            blocks.append({"document": {"format": "pdf", "name": f"document-{j + 1}",
                                        "source": {"bytes": data}}})
        else:
            raise TranslationError(pw + ".type", f"content part type {ptype!r} is not supported here")
    return blocks


def _converse_messages(messages: Any) -> tuple[list[dict], list[dict], bool]:
    if not isinstance(messages, list) or not messages:
        raise TranslationError("messages", "'messages' must be a non-empty array")
    system: list[dict] = []
    turns: list[dict] = []
    uses_tools = False

    def add(role: str, blocks: list[dict]) -> None:
        append_turn(turns, role, blocks)

    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise TranslationError(where, "each message must be a JSON object")
        role = msg.get("role")
        if role in ("system", "developer"):
            system.extend(_converse_blocks(msg.get("content"), where + ".content", media=False))
        elif role == "user":
            add("user", _converse_blocks(msg.get("content"), where + ".content", media=True))
        elif role == "assistant":
            for key in ("audio", "function_call"):
                if msg.get(key) is not None:
                    raise TranslationError(f"{where}.{key}", f"assistant '{key}' is not supported")
            blocks = _converse_blocks(msg.get("content"), where + ".content", media=False)
            calls = msg.get("tool_calls") or []
            if not isinstance(calls, list):
                raise TranslationError(where + ".tool_calls", "tool_calls must be an array")
            for j, call in enumerate(calls):
                cw = f"{where}.tool_calls[{j}]"
                fn = call.get("function") if isinstance(call, Mapping) else None
                if not isinstance(fn, Mapping) or call.get("type", "function") != "function" \
                        or not isinstance(fn.get("name"), str) or not isinstance(call.get("id"), str) \
                        or not call["id"]:
                    raise TranslationError(cw, "a tool call needs an id and a function name")
                blocks.append({"toolUse": {"toolUseId": _tool_use_id(call["id"]), "name": fn["name"],
                                           "input": parse_arguments(fn.get("arguments"),
                                                                     cw + ".function.arguments")}})
                uses_tools = True
            add("assistant", blocks)
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise TranslationError(where + ".tool_call_id", "tool messages need a tool_call_id")
            text = _converse_blocks(msg.get("content"), where + ".content", media=False)
            add("user", [{"toolResult": {"toolUseId": _tool_use_id(call_id),
                                         "content": text or [{"text": ""}]}}])
            uses_tools = True
        else:
            raise TranslationError(where + ".role", f"unsupported message role {role!r}")
    if not turns:
        raise TranslationError("messages", "at least one non-empty user or assistant message is required")
    return system, turns, uses_tools


def _number(body: Mapping[str, Any], key: str, *, integer: bool = False) -> Any:
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise TranslationError(key, f"'{key}' must be a{'n integer' if integer else ' number'}")
    return value


def _is_neutral(value: Any, allowed: tuple[Any, ...]) -> bool:
    for a in allowed:
        if isinstance(a, bool) or isinstance(value, bool):
            if value is a:
                return True
        elif value == a:
            return True
    return False


def _converse_model_input(body: Mapping[str, Any]) -> dict:
    if not isinstance(body, Mapping):
        raise TranslationError("body", "the request body must be a JSON object")
    for key, value in body.items():
        if key in _CONVERSE_HANDLED or key in _CONVERSE_IGNORED or value is None:
            continue
        raise TranslationError(key, f"unsupported parameter '{key}' for Bedrock Converse models")
    neutral = {"stream": (False,), "n": (1,), "logprobs": (False,), "top_logprobs": (0,),
               "presence_penalty": (0,), "frequency_penalty": (0,), "modalities": (["text"],)}
    for key, allowed in neutral.items():
        value = body.get(key)
        if value is not None and not _is_neutral(value, allowed):
            raise TranslationError(key, f"'{key}' is not supported by Bedrock Converse (got {value!r})")

    system, turns, uses_tools = _converse_messages(body.get("messages"))
    model_input: dict[str, Any] = {"messages": turns}
    if system:
        model_input["system"] = system

    inference: dict[str, Any] = {}
    for key in ("max_completion_tokens", "max_tokens"):
        if body.get(key) is not None:
            value = _number(body, key, integer=True)
            if value < 1:
                raise TranslationError(key, f"'{key}' must be a positive integer")
            inference["maxTokens"] = value
            break
    if body.get("temperature") is not None:
        inference["temperature"] = _number(body, "temperature")
    if body.get("top_p") is not None:
        inference["topP"] = _number(body, "top_p")
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise TranslationError("stop", "'stop' must be a non-empty string or an array of them")
        if stops:
            inference["stopSequences"] = list(stops)
    if inference:
        model_input["inferenceConfig"] = inference

    tool_config = _converse_tool_config(body, uses_tools)
    if tool_config is not None:
        model_input["toolConfig"] = tool_config

    rf = body.get("response_format")
    if rf is not None:
        ftype = rf.get("type") if isinstance(rf, Mapping) else None
        if ftype == "json_schema":
            spec = rf.get("json_schema") if isinstance(rf.get("json_schema"), Mapping) else {}
            schema = spec.get("schema")
            if not isinstance(schema, Mapping):
                raise TranslationError("response_format.json_schema.schema",
                                       "a json_schema response_format needs a schema")
            js: dict[str, Any] = {"schema": json.dumps(schema, ensure_ascii=False)}
            if isinstance(spec.get("name"), str) and spec["name"]:
                js["name"] = spec["name"]
            if isinstance(spec.get("description"), str) and spec["description"]:
                js["description"] = spec["description"]
            # Converse structured output; models without it reject the record (an error line).
            model_input["outputConfig"] = {"textFormat": {"type": "json_schema",
                                                          "structure": {"jsonSchema": js}}}
        elif ftype == "json_object":
            raise TranslationError("response_format", "response_format 'json_object' has no Bedrock "
                                                      "Converse equivalent; use 'json_schema'")
        elif ftype != "text":
            raise TranslationError("response_format", f"unsupported response_format type {ftype!r}")
    return model_input


def _converse_tool_config(body: Mapping[str, Any], uses_tools: bool) -> dict | None:
    tools = body.get("tools")
    specs: list[dict] = []
    if tools is not None:
        if not isinstance(tools, list):
            raise TranslationError("tools", "'tools' must be an array")
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, Mapping) else None
            if not isinstance(tool, Mapping) or tool.get("type") != "function" \
                    or not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                raise TranslationError(f"tools[{i}]", "only function tools with a name are supported")
            schema = fn.get("parameters")
            if schema is None:
                schema = {"type": "object", "properties": {}}
            elif not isinstance(schema, Mapping):
                raise TranslationError(f"tools[{i}].function.parameters",
                                       "parameters must be a JSON schema object")
            spec: dict[str, Any] = {"name": fn["name"], "inputSchema": {"json": dict(schema)}}
            if isinstance(fn.get("description"), str) and fn["description"]:
                spec["description"] = fn["description"]
            if fn.get("strict") is True:
                spec["strict"] = True
            specs.append({"toolSpec": spec})
    if body.get("parallel_tool_calls") is False and specs:
        raise TranslationError("parallel_tool_calls", "parallel_tool_calls=false cannot be "
                                                      "enforced through Bedrock Converse")
    choice = body.get("tool_choice")
    names = [s["toolSpec"]["name"] for s in specs]
    if choice == "none":
        if uses_tools:
            raise TranslationError("tool_choice", "tool_choice 'none' cannot be expressed in "
                                                  "Converse for a conversation with tool calls")
        return None
    if not specs:
        if choice not in (None, "auto"):
            raise TranslationError("tool_choice", "tool_choice requires 'tools'")
        if uses_tools:
            raise TranslationError("tools", "Converse needs the tool definitions for a "
                                            "conversation containing tool calls")
        return None
    config: dict[str, Any] = {"tools": specs}
    if choice is None:
        pass
    elif choice == "auto":
        config["toolChoice"] = {"auto": {}}
    elif choice == "required":
        config["toolChoice"] = {"any": {}}
    elif isinstance(choice, Mapping) and choice.get("type") == "function" \
            and isinstance(choice.get("function"), Mapping):
        name = choice["function"].get("name")
        if name not in names:
            raise TranslationError("tool_choice", f"tool_choice names an undeclared function {name!r}")
        config["toolChoice"] = {"tool": {"name": name}}
    else:
        raise TranslationError("tool_choice", f"unsupported tool_choice {choice!r}")
    return config


# --- Embeddings (Titan Text Embeddings V2) ----------------------------------------------------

_TITAN_V2_DIMENSIONS = (256, 512, 1024)


def embedding_to_bedrock_record(body: Mapping[str, Any], *, record_id: str, model_id: str) -> dict:
    """One OpenAI /v1/embeddings body -> one Titan Text Embeddings V2 record.

    A Titan record embeds exactly one text, so only single-string inputs are accepted."""
    if not is_titan_embedding_model(model_id):
        raise TranslationError("model", f"embeddings are only supported for Amazon Titan Text "
                                        f"Embeddings V2 on Bedrock (deployment model {model_id!r})")
    if not isinstance(body, Mapping):
        raise TranslationError("body", "the request body must be a JSON object")
    for key, value in body.items():
        if key not in ("input", "model", "dimensions", "encoding_format", "user") and value is not None:
            raise TranslationError(key, f"unsupported parameter '{key}' for Titan embeddings")
    text = body.get("input")
    if isinstance(text, list) and len(text) == 1 and isinstance(text[0], str):
        text = text[0]
    if not isinstance(text, str):
        raise TranslationError("input", "Titan embeddings take one string per request (arrays of "
                                        "several inputs or of tokens are not supported)")
    if not text:
        raise TranslationError("input", "input must not be empty")
    fmt = body.get("encoding_format")
    if fmt not in (None, "float"):
        raise TranslationError("encoding_format", "only encoding_format 'float' is supported")
    model_input: dict[str, Any] = {"inputText": text}
    dims = body.get("dimensions")
    if dims is not None:
        if isinstance(dims, bool) or dims not in _TITAN_V2_DIMENSIONS:
            raise TranslationError("dimensions", "Titan Text Embeddings V2 supports dimensions "
                                                 "256, 512 or 1024")
        model_input["dimensions"] = dims
    model_input["normalize"] = True  # OpenAI embeddings are unit length
    return {"recordId": record_id, "modelInput": model_input}


# ---------------------------------------------------------------------------------------------
# Output records -> OpenAI batch output lines
# ---------------------------------------------------------------------------------------------

_CONVERSE_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}

# Bedrock runtime exception names -> HTTP status.
_EXCEPTION_HTTP = {
    "validationexception": 400, "accessdeniedexception": 403, "resourcenotfoundexception": 404,
    "throttlingexception": 429, "servicequotaexceededexception": 429, "modeltimeoutexception": 408,
    "modelnotreadyexception": 429, "modelerrorexception": 424, "serviceunavailableexception": 503,
    "internalserverexception": 500,
}


batch_request_output_id = line_id  # the OpenAI output line id ("batch_req_…") of a request


def _error_status(code: Any, message: str) -> int:
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
        return code
    text = str(code or "").strip()
    if text.isdigit() and 400 <= int(text) <= 599:
        return int(text)
    key = text.lower()
    if key in _EXCEPTION_HTTP:
        return _EXCEPTION_HTTP[key]
    lowered = message.lower()
    for name, status in _EXCEPTION_HTTP.items():
        if name in lowered.replace(" ", ""):
            return status
    if "throttl" in lowered or "too many" in lowered:
        return 429
    if "invalid" in lowered or "malformed" in lowered or "validation" in lowered:
        return 400
    # A client-side number we don't know (e.g. 4xx outside the range above) or nothing at all.
    return 400 if (isinstance(code, int) and 400 <= code < 500) else 500


def _error_type(status: int) -> str:
    return {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
            429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")


def _converse_completion(output: Mapping[str, Any], *, out_id: str, model: str, created: int) -> dict:
    message = (output.get("output") or {}).get("message") or {}
    texts: list[str] = []
    tool_calls: list[dict] = []
    for block in message.get("content") or []:
        if not isinstance(block, Mapping):
            continue
        if isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif isinstance(block.get("toolUse"), Mapping):
            use = block["toolUse"]
            tool_calls.append({"id": use.get("toolUseId") or f"call_{len(tool_calls)}", "type": "function",
                               "function": {"name": use.get("name") or "",
                                            "arguments": json.dumps(use.get("input") or {},
                                                                    ensure_ascii=False)}})
        # reasoningContent and other blocks are not part of an OpenAI chat answer.
    finish = _CONVERSE_FINISH.get(output.get("stopReason") or "", "stop")
    out_message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None,
                                   "refusal": None}
    if tool_calls:
        out_message["tool_calls"] = tool_calls
    usage = output.get("usage") or {}
    prompt, prompt_details = prompt_usage(_int(usage.get("inputTokens")), _int(usage.get("cacheReadInputTokens")),
                                          _int(usage.get("cacheWriteInputTokens")))
    completion = _int(usage.get("outputTokens"))
    return {
        "id": "chatcmpl-" + out_id[len("batch_req_"):],
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": out_message, "logprobs": None, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion,
                  "prompt_tokens_details": prompt_details,
                  "completion_tokens_details": {"reasoning_tokens": 0}},
    }


def _embedding_response(output: Mapping[str, Any], *, model: str) -> dict | None:
    vector = output.get("embedding")
    if not isinstance(vector, list):
        by_type = output.get("embeddingsByType")
        vector = by_type.get("float") if isinstance(by_type, Mapping) else None
    if not isinstance(vector, list):
        return None
    tokens = _int(output.get("inputTextTokenCount"))
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": 0, "embedding": vector}],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def bedrock_output_to_openai(record: Mapping[str, Any], *, decode_custom_id: Callable[[str], str],
                             request_index: int, batch_id: str, model_id: str,
                             endpoint: str = CHAT_ENDPOINT, model: str | None = None,
                             created: int = 0) -> ResultLine:
    """One `*.jsonl.out` record -> one OpenAI batch output line (OUTPUT or ERROR).

    `model` is the name echoed in the response body (the caller's model name; defaults to
    `model_id`). `created` stamps chat completions (Bedrock records carry no time; the adapter
    passes the job's end time). Raises TranslationError for a record without a recordId."""
    record_id = record.get("recordId")
    if not isinstance(record_id, str) or not record_id:
        raise TranslationError("recordId", "output record has no recordId")
    custom_id = decode_custom_id(record_id)
    out_id = line_id(batch_id, request_index)
    shown_model = model or model_id

    error = record.get("error")
    if error is not None:
        if isinstance(error, Mapping):
            code = error.get("errorCode")
            message = str(error.get("errorMessage") or error.get("message") or "Bedrock reported an error")
        else:
            code, message = None, str(error)
        status = _error_status(code, message)
        err_code = str(code) if code is not None and not str(code).strip().isdigit() else None
        return response_line(ResultKind.ERROR, out_id, custom_id, status,
                             error_body(message, _error_type(status), None, err_code))

    output = record.get("modelOutput")
    if not isinstance(output, Mapping):
        return response_line(ResultKind.ERROR, out_id, custom_id, 500, error_body(
            "Bedrock returned neither modelOutput nor error for this record", "server_error"))

    if endpoint == EMBEDDINGS_ENDPOINT:
        body = _embedding_response(output, model=shown_model)
        if body is None:
            return response_line(ResultKind.ERROR, out_id, custom_id, 500,
                                 error_body("Bedrock embedding output has no embedding", "server_error"))
        return response_line(ResultKind.OUTPUT, out_id, custom_id, 200, body)

    if output.get("type") == "message" or ("content" in output and "output" not in output):
        # Anthropic Messages response (InvokeModel on a Claude model).
        message = dict(output)
        message["model"] = shown_model
        if not message.get("id"):
            message["id"] = "chatcmpl-" + out_id[len("batch_req_"):]
        line = anthropic_result_to_openai({"result": {"type": "succeeded", "message": message}},
                                          original_custom_id=custom_id, request_index=request_index,
                                          batch_id=batch_id, created=created)
        return _normalise_anthropic_line(line, out_id)

    if isinstance(output.get("output"), Mapping):
        body = _converse_completion(output, out_id=out_id, model=shown_model, created=created)
        return response_line(ResultKind.OUTPUT, out_id, custom_id, 200, body)

    return response_line(ResultKind.ERROR, out_id, custom_id, 500,
                         error_body("unrecognised Bedrock modelOutput shape", "server_error"))


def _normalise_anthropic_line(line: ResultLine, out_id: str) -> ResultLine:
    """Keep the line id scheme ours even if the Anthropic module's changes."""
    data = json.loads(line.data)
    if data.get("id") == out_id:
        return line
    data["id"] = out_id
    return ResultLine(kind=line.kind, data=dumps(data))
