"""Pure translation between OpenAI chat completions and Anthropic Message Batches.

No I/O here: the adapter streams input lines through `chat_to_anthropic_params` /
`batch_request_line` and result lines through `anthropic_result_to_openai`. A request that
cannot be expressed raises `TranslationError`; the adapter never sends it and reports it with
`translation_error_line` (an HTTP-400-shaped line in the error file), so one bad line never
fails the batch.

Policy: a parameter is translated when Anthropic has an equivalent, ignored only when dropping
it cannot change the result a caller is promised (streaming, storage, caching and latency
hints, best-effort `seed`), and rejected otherwise. Parameters this module doesn't know are
rejected rather than silently dropped.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping
from typing import Any

from batchgate_server.providers import output_lines
from batchgate_server.providers.base import ResultKind, ResultLine

DEFAULT_MAX_TOKENS = 4096

# Accepted by the Anthropic image block's base64 source.
_IMAGE_MEDIA_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp"}
_MEDIA_TYPE_ALIASES = {"image/jpg": "image/jpeg"}

# Anthropic tool_use ids must match this; other ids are replaced by a stable hash so that a
# tool_use and its tool_result still agree.
_TOOL_ID_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")

# Dropping these cannot change what the caller is promised.
_IGNORED_PARAMS = frozenset({
    "model",  # the deployment's model wins
    "stream", "stream_options",  # batches aren't streamed
    "store", "metadata",  # OpenAI stored-completions features
    "service_tier",  # batch tier regardless
    "prediction",  # predicted outputs: a latency hint, same output
    "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",  # caching hints
    "seed",  # OpenAI itself only promises best-effort determinism
})

# Rejected unless absent or set to one of the listed neutral values.
_NEUTRAL_ONLY: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logit_bias": ({},),
    "audio": (),
    "modalities": (["text"],),
    "reasoning_effort": ("none",),
    "verbosity": ("medium",),
    "functions": ([],),
    "function_call": (),
    "web_search_options": (),
}

_HANDLED_PARAMS = frozenset({
    "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop",
    "tools", "tool_choice", "parallel_tool_calls", "response_format", "user",
    "safety_identifier",
})

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


class TranslationError(Exception):
    """An OpenAI request that Anthropic can't express. `param` names the offending
    parameter, OpenAI-style (e.g. "n", "messages[2].content[0].type")."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


# ---------------------------------------------------------------------------------------------
# Request: OpenAI chat completion body -> Anthropic Messages params


def chat_to_anthropic_params(body: dict, *, model: str,
                             default_max_tokens: int = DEFAULT_MAX_TOKENS) -> dict:
    """Translate an OpenAI /v1/chat/completions body into the `params` of an Anthropic
    Message Batches request. `model` (the deployment's model) overrides body["model"]."""
    if not isinstance(body, Mapping):
        raise TranslationError("body", "the request body must be a JSON object")

    for key, value in body.items():
        if key in _HANDLED_PARAMS or key in _IGNORED_PARAMS:
            continue
        if key in _NEUTRAL_ONLY:
            if value is None or _is_neutral(value, _NEUTRAL_ONLY[key]):
                continue
            raise TranslationError(key, f"'{key}' is not supported by Anthropic models "
                                        f"(got {value!r})")
        if value is None:
            continue
        raise TranslationError(key, f"unsupported parameter '{key}' for Anthropic models")

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise TranslationError("messages", "'messages' must be a non-empty array")
    system_blocks, turns = _translate_messages(messages)
    if not turns:
        raise TranslationError("messages", "at least one non-empty user or assistant message "
                                           "is required")

    params: dict[str, Any] = {"model": model, "max_tokens": _max_tokens(body, default_max_tokens)}
    if system_blocks:
        params["system"] = (system_blocks[0]["text"] if len(system_blocks) == 1
                            else system_blocks)
    params["messages"] = turns

    # temperature/top_p: the Messages API takes them on models with sampling controls (the
    # anthropic>=1.0 SDK no longer types them); models that reject them, or reject both
    # together, fail that request with Anthropic's own 400, reported as an error line.
    temperature = body.get("temperature")
    if temperature is not None:
        if not _is_number(temperature) or not 0 <= temperature <= 1:
            raise TranslationError("temperature", "Anthropic accepts temperature between 0 and "
                                                  f"1 (got {temperature!r})")
        params["temperature"] = temperature
    top_p = body.get("top_p")
    if top_p is not None:
        if not _is_number(top_p):
            raise TranslationError("top_p", f"top_p must be a number (got {top_p!r})")
        params["top_p"] = top_p

    stop = body.get("stop")
    if isinstance(stop, str):
        params["stop_sequences"] = [stop]
    elif isinstance(stop, list):
        if not all(isinstance(s, str) for s in stop):
            raise TranslationError("stop", "'stop' must be a string or an array of strings")
        if stop:
            params["stop_sequences"] = list(stop)
    elif stop is not None:
        raise TranslationError("stop", "'stop' must be a string or an array of strings")

    tools = _translate_tools(body.get("tools"))
    if tools:
        params["tools"] = tools
    tool_choice = _translate_tool_choice(body.get("tool_choice"), has_tools=bool(tools),
                                         parallel=body.get("parallel_tool_calls"))
    if tool_choice is not None:
        params["tool_choice"] = tool_choice

    output_format = _translate_response_format(body.get("response_format"))
    if output_format is not None:
        params["output_config"] = {"format": output_format}

    user = body.get("user")
    if user is None:
        user = body.get("safety_identifier")
    if user is not None:
        if not isinstance(user, str):
            raise TranslationError("user", "'user' must be a string")
        if user:
            params["metadata"] = {"user_id": user}
    return params


def _is_neutral(value: Any, neutrals: tuple[Any, ...]) -> bool:
    # bool is an int in Python: n=True must not pass as n=1.
    return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutrals)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _max_tokens(body: Mapping[str, Any], default: int) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TranslationError(key, f"'{key}' must be a positive integer (got {value!r})")
        return value
    return default


def append_turn(turns: list[dict], role: str, blocks: list[dict]) -> None:
    """Adds `blocks` as a `role` turn, merged into the previous turn of the same role: the
    Messages and Converse APIs both want user and assistant turns to alternate."""
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": list(blocks)})


def _translate_messages(messages: list[Any]) -> tuple[list[dict], list[dict]]:
    system_blocks: list[dict] = []
    turns: list[dict] = []

    def add(role: str, blocks: list[dict]) -> None:
        append_turn(turns, role, blocks)

    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise TranslationError(where, "each message must be a JSON object")
        role = msg.get("role")
        if role in ("system", "developer"):
            system_blocks.extend(_text_blocks(msg.get("content"), f"{where}.content",
                                              allowed=("text",)))
        elif role == "user":
            add("user", _user_blocks(msg.get("content"), f"{where}.content"))
        elif role == "assistant":
            add("assistant", _assistant_blocks(msg, where))
        elif role == "tool":
            add("user", [_tool_result_block(msg, where)])
        elif role == "function":
            raise TranslationError(f"{where}.role", "legacy 'function' messages are not "
                                                    "supported; use tools and 'tool' messages")
        else:
            raise TranslationError(f"{where}.role", f"unsupported message role {role!r}")

    for turn in turns:
        content = turn["content"]
        if len(content) == 1 and content[0].keys() == {"type", "text"} \
                and content[0]["type"] == "text":
            turn["content"] = content[0]["text"]
    return system_blocks, turns


def _text_blocks(content: Any, where: str, *, allowed: tuple[str, ...]) -> list[dict]:
    """Text-only content (system/developer/tool messages): a string or text parts."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise TranslationError(where, "content must be a string or an array of content parts")
    blocks = []
    for j, part in enumerate(content):
        ptype = part.get("type") if isinstance(part, Mapping) else None
        if ptype not in allowed:
            raise TranslationError(f"{where}[{j}].type",
                                   f"content part type {ptype!r} is not supported here")
        text = part.get("text") if ptype == "text" else part.get("refusal")
        if not isinstance(text, str):
            raise TranslationError(f"{where}[{j}]", "content part has no text")
        if text:
            blocks.append({"type": "text", "text": text})
    return blocks


def _user_blocks(content: Any, where: str) -> list[dict]:
    if content is None or isinstance(content, str):
        return _text_blocks(content, where, allowed=("text",))
    if not isinstance(content, list):
        raise TranslationError(where, "content must be a string or an array of content parts")
    blocks: list[dict] = []
    for j, part in enumerate(content):
        pwhere = f"{where}[{j}]"
        ptype = part.get("type") if isinstance(part, Mapping) else None
        if ptype == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise TranslationError(pwhere, "content part has no text")
            if text:
                blocks.append({"type": "text", "text": text})
        elif ptype == "image_url":
            blocks.append(_image_block(part.get("image_url"), pwhere))
        elif ptype == "file":
            blocks.append(_document_block(part.get("file"), pwhere))
        else:
            raise TranslationError(f"{pwhere}.type",
                                   f"content part type {ptype!r} is not supported by Anthropic "
                                   "models")
    return blocks


def _parse_data_url(url: str, where: str) -> tuple[str, str]:
    header, sep, data = url[len("data:"):].partition(",")
    attrs = header.split(";")
    if not sep or "base64" not in (a.strip().lower() for a in attrs[1:]):
        raise TranslationError(where, "only base64 data: URLs are supported")
    media_type = attrs[0].strip().lower()
    return _MEDIA_TYPE_ALIASES.get(media_type, media_type), data


def _image_block(image_url: Any, where: str) -> dict:
    url = image_url.get("url") if isinstance(image_url, Mapping) else image_url
    where = f"{where}.image_url.url"
    if not isinstance(url, str) or not url:
        raise TranslationError(where, "image_url.url is required")
    if url[:5].lower() == "data:":
        media_type, data = _parse_data_url(url, where)
        if media_type not in _IMAGE_MEDIA_TYPES:
            raise TranslationError(where, f"image type {media_type!r} is not supported "
                                          f"(use one of {', '.join(sorted(_IMAGE_MEDIA_TYPES))})")
        return {"type": "image",
                "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.lower().startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise TranslationError(where, "image URLs must be https:// or base64 data: URLs")


def _document_block(file: Any, where: str) -> dict:
    if not isinstance(file, Mapping):
        raise TranslationError(f"{where}.file", "file content part requires a 'file' object")
    file_data = file.get("file_data")
    if not isinstance(file_data, str) or not file_data:
        raise TranslationError(f"{where}.file", "only inline 'file_data' PDFs are supported "
                                                "('file_id' refers to OpenAI storage)")
    if file_data[:5].lower() == "data:":
        media_type, data = _parse_data_url(file_data, f"{where}.file.file_data")
    elif str(file.get("filename", "")).lower().endswith(".pdf"):
        media_type, data = "application/pdf", file_data
    else:
        raise TranslationError(f"{where}.file.file_data", "file_data must be a base64 data: URL")
    if media_type != "application/pdf":
        raise TranslationError(f"{where}.file.file_data",
                               f"file type {media_type!r} is not supported (PDF only)")
    return {"type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": data}}


def _tool_id(tool_call_id: str) -> str:
    if _TOOL_ID_RE.fullmatch(tool_call_id):
        return tool_call_id
    return "bgt_" + hashlib.sha256(tool_call_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _assistant_blocks(msg: Mapping[str, Any], where: str) -> list[dict]:
    for key in ("audio", "function_call"):
        if msg.get(key) is not None:
            raise TranslationError(f"{where}.{key}", f"assistant '{key}' is not supported by "
                                                     "Anthropic models")
    blocks = _text_blocks(msg.get("content"), f"{where}.content", allowed=("text", "refusal"))
    refusal = msg.get("refusal")
    if not blocks and isinstance(refusal, str) and refusal:
        blocks.append({"type": "text", "text": refusal})
    tool_calls = msg.get("tool_calls") or []
    if not isinstance(tool_calls, list):
        raise TranslationError(f"{where}.tool_calls", "tool_calls must be an array")
    for j, call in enumerate(tool_calls):
        cwhere = f"{where}.tool_calls[{j}]"
        if not isinstance(call, Mapping) or call.get("type", "function") != "function":
            raise TranslationError(f"{cwhere}.type", "only function tool calls are supported")
        fn = call.get("function")
        call_id = call.get("id")
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) \
                or not isinstance(call_id, str) or not call_id:
            raise TranslationError(cwhere, "a tool call needs an id and a function name")
        arguments = parse_arguments(fn.get("arguments"), f"{cwhere}.function.arguments")
        blocks.append({"type": "tool_use", "id": _tool_id(call_id), "name": fn["name"],
                       "input": arguments})
    return blocks


def parse_arguments(arguments: Any, where: str) -> dict:
    """A tool call's `function.arguments` (a JSON object string, an object, or empty) as a dict."""
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, Mapping):
        return dict(arguments)
    if not isinstance(arguments, str):
        raise TranslationError(where, "arguments must be a JSON string")
    try:
        parsed = json.loads(arguments)
    except ValueError as exc:
        raise TranslationError(where, f"arguments are not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise TranslationError(where, "arguments must encode a JSON object")
    return parsed


def _tool_result_block(msg: Mapping[str, Any], where: str) -> dict:
    call_id = msg.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise TranslationError(f"{where}.tool_call_id", "tool messages need a tool_call_id")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": _tool_id(call_id)}
    content = msg.get("content")
    if isinstance(content, str):
        if content:
            block["content"] = content
    else:
        parts = _text_blocks(content, f"{where}.content", allowed=("text",))
        if parts:
            block["content"] = parts
    return block


def _translate_tools(tools: Any) -> list[dict]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise TranslationError("tools", "'tools' must be an array")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            ttype = tool.get("type") if isinstance(tool, Mapping) else None
            raise TranslationError(f"tools[{i}].type",
                                   f"tool type {ttype!r} is not supported (function tools only)")
        fn = tool.get("function")
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise TranslationError(f"tools[{i}].function", "a function tool needs a name")
        schema = fn.get("parameters")
        if schema is None:
            schema = {"type": "object", "properties": {}}
        elif not isinstance(schema, Mapping):
            raise TranslationError(f"tools[{i}].function.parameters",
                                   "parameters must be a JSON schema object")
        entry: dict[str, Any] = {"name": fn["name"]}
        if fn.get("description"):
            entry["description"] = fn["description"]
        entry["input_schema"] = dict(schema)
        if fn.get("strict") is True:
            entry["strict"] = True
        out.append(entry)
    return out


def _translate_tool_choice(choice: Any, *, has_tools: bool, parallel: Any) -> dict | None:
    if choice is None:
        result: dict[str, Any] | None = {"type": "auto"} if parallel is False else None
    elif choice == "auto":
        result = {"type": "auto"}
    elif choice == "required":
        result = {"type": "any"}
    elif choice == "none":
        result = {"type": "none"}
    elif isinstance(choice, Mapping) and choice.get("type") == "function" \
            and isinstance(choice.get("function"), Mapping) \
            and isinstance(choice["function"].get("name"), str):
        result = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise TranslationError("tool_choice", f"unsupported tool_choice {choice!r}")
    if not has_tools:
        if result is None or result["type"] in ("auto", "none"):
            return None
        raise TranslationError("tool_choice", "tool_choice requires 'tools'")
    if result is not None and parallel is False and result["type"] != "none":
        result["disable_parallel_tool_use"] = True
    return result


def _translate_response_format(fmt: Any) -> dict | None:
    if fmt is None:
        return None
    ftype = fmt.get("type") if isinstance(fmt, Mapping) else None
    if ftype == "text":
        return None
    if ftype == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise TranslationError("response_format.json_schema.schema",
                                   "a json_schema response_format needs a schema")
        # Anthropic structured outputs (output_config.format). Models without structured
        # output support reject it per request, which surfaces as an error line.
        return {"type": "json_schema", "schema": dict(schema)}
    if ftype == "json_object":
        raise TranslationError("response_format", "response_format 'json_object' has no "
                                                  "Anthropic equivalent; use 'json_schema'")
    raise TranslationError("response_format", f"unsupported response_format type {ftype!r}")


def batch_request_line(custom_id: str, params: dict) -> bytes:
    """One element of the create body's `requests` array, serialised."""
    return output_lines.dumps({"custom_id": custom_id, "params": params})


# ---------------------------------------------------------------------------------------------
# Results: Anthropic result lines -> OpenAI batch output lines


def _line(kind: ResultKind, *, batch_id: str, request_index: int, custom_id: str,
          response: dict | None, error: dict | None) -> ResultLine:
    return output_lines.result_line(kind, output_lines.line_id(batch_id, request_index), custom_id,
                                    response=response, error=error)


def _chat_completion(message: Mapping[str, Any], created: int) -> dict:
    content = message.get("content") or []
    texts = [b.get("text") or "" for b in content if b.get("type") == "text"]
    tool_calls = [
        {"id": b.get("id"), "type": "function",
         "function": {"name": b.get("name"),
                      "arguments": json.dumps(b.get("input") or {}, ensure_ascii=False)}}
        for b in content if b.get("type") == "tool_use"
    ]
    out_message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts else None,
        "refusal": None,
    }
    if tool_calls:
        out_message["tool_calls"] = tool_calls
    stop_reason = message.get("stop_reason")
    finish_reason = _FINISH_REASONS.get(stop_reason or "", "stop")
    if tool_calls and finish_reason == "stop" and stop_reason is None:
        finish_reason = "tool_calls"

    usage = message.get("usage") or {}
    cache_write = usage.get("cache_creation_input_tokens") or 0
    split = usage.get("cache_creation") if isinstance(usage.get("cache_creation"), dict) else {}
    cache_write_1h = split.get("ephemeral_1h_input_tokens") or 0
    cache_write = max(cache_write, (split.get("ephemeral_5m_input_tokens") or 0) + cache_write_1h)
    prompt_tokens, prompt_details = prompt_usage(usage.get("input_tokens") or 0,
                                                 usage.get("cache_read_input_tokens") or 0,
                                                 cache_write, cache_write_1h)
    completion_tokens = usage.get("output_tokens") or 0
    details = usage.get("output_tokens_details") or {}
    return {
        "id": message.get("id"),
        "object": "chat.completion",
        "created": created,
        "model": message.get("model"),
        "choices": [{"index": 0, "message": out_message, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": prompt_details,
            "completion_tokens_details": {"reasoning_tokens": details.get("thinking_tokens") or 0},
        },
        "system_fingerprint": None,
    }


def prompt_usage(uncached: int, cache_read: int, cache_write: int, cache_write_1h: int = 0) -> tuple[int, dict]:
    """(prompt_tokens, prompt_tokens_details) in OpenAI's sense from Anthropic's counts, whose
    input_tokens leave out cache reads and writes: prompt_tokens counts all three, and the
    details name the reads (cached_tokens) and the writes (cache_creation_tokens, of which
    cache_creation_1h_tokens have a 1-hour lifetime) as parts of it. pricing/usage.py reads
    them back to charge each at its own price."""
    return uncached + cache_read + cache_write, {"cached_tokens": cache_read, "cache_creation_tokens": cache_write,
                                                 "cache_creation_1h_tokens": cache_write_1h}


def anthropic_result_to_openai(result_line: dict, *, original_custom_id: str, request_index: int,
                               batch_id: str, created: int | None = None) -> ResultLine:
    """One line of an Anthropic results stream -> one OpenAI batch output line.

    `created` stamps the chat.completion (unix seconds; the adapter passes the batch's end
    time so re-reading results is reproducible); defaults to now."""
    result = result_line.get("result") or {}
    rtype = result.get("type")
    common = {"batch_id": batch_id, "request_index": request_index,
              "custom_id": original_custom_id}
    if rtype == "succeeded":
        message = result.get("message") or {}
        stamp = int(created if created is not None else time.time())
        return _line(ResultKind.OUTPUT, **common, error=None, response={
            "status_code": 200,
            "request_id": message.get("id"),
            "body": _chat_completion(message, stamp),
        })
    if rtype == "errored":
        envelope = result.get("error") or {}
        inner = envelope.get("error") if isinstance(envelope.get("error"), Mapping) else envelope
        etype = inner.get("type") or "api_error"
        if etype == "error":  # no inner object at all
            etype = "api_error"
        return _line(ResultKind.ERROR, **common, error=None, response={
            "status_code": _ERROR_STATUS.get(etype, 500),
            "request_id": envelope.get("request_id"),
            "body": {"error": {"message": inner.get("message") or "Anthropic reported an error",
                               "type": etype, "param": None, "code": None}},
        })
    if rtype == "canceled":
        return _line(ResultKind.ERROR, **common, response=None, error={
            "code": "batch_cancelled",
            "message": "This request was not executed because the batch was cancelled."})
    if rtype == "expired":
        return _line(ResultKind.ERROR, **common, response=None, error={
            "code": "batch_expired",
            "message": "This request could not be executed before the completion window "
                       "expired."})
    return _line(ResultKind.ERROR, **common, response=None, error={
        "code": "provider_error",
        "message": f"unexpected Anthropic result type {rtype!r}"})


def translation_error_line(custom_id: str, error: TranslationError, *, request_index: int,
                           batch_id: str) -> ResultLine:
    """The error-file line for a request that was never sent because it can't be translated."""
    return output_lines.translation_error_line(custom_id, error, request_index=request_index,
                                               batch_id=batch_id, request_id=None)


def provider_error_line(custom_id: str, *, code: str, message: str, request_index: int,
                        batch_id: str) -> ResultLine:
    """An error-file line (non-HTTP failure: response null) for a request the provider gave no
    usable result for, e.g. one missing from the results stream."""
    return output_lines.no_result_line(output_lines.line_id(batch_id, request_index), custom_id, code, message)
