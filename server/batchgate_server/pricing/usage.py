"""Sum token usage over an OpenAI-format batch OUTPUT file, per model.

Each line is ``{"custom_id", "response": {"status_code", "body": {..., "model",
"usage"}} | null, "error"}``. Only lines with a 2xx ``status_code`` (or none at
all) and a ``body.usage`` object count; error lines, blank or malformed lines
contribute nothing. Usage shapes understood (all normalised to
``domain.models.Usage``, where cached_tokens is a subset of input_tokens and
reasoning_tokens a subset of output_tokens):

* chat.completion / completion: prompt_tokens, completion_tokens,
  prompt_tokens_details.cached_tokens, completion_tokens_details.reasoning_tokens
* embeddings: prompt_tokens, total_tokens (no completion tokens)
* responses API: input_tokens, input_tokens_details.cached_tokens,
  output_tokens, output_tokens_details.reasoning_tokens
* Anthropic-native usage passed through (input_tokens EXCLUDES cache reads
  there): input = input_tokens + cache_read_input_tokens +
  cache_creation_input_tokens, cached = cache_read_input_tokens.

Speed: lines without the bytes ``usage`` are skipped before parsing; the rest
cost one full parse by json's C scanner, called directly (skipping json.loads'
encoding sniffing and trailing-whitespace regex: ~20% faster). Partial parsing
(regexes + ``raw_decode`` of just the usage object) measured only ~10% faster
than json.loads, so the robust full parse is kept. See bench/cost.py for figures.
"""

from __future__ import annotations

import json
import json.scanner
from collections.abc import AsyncIterable, Iterable
from typing import Any

from batchgate_server.domain.models import Usage

_loads = json.loads
_scan_once = json.scanner.make_scanner(json.JSONDecoder())
_MARK_B = b"usage"  # also matches a body embedded as a JSON string (escaped quotes)
_MARK_S = "usage"


def _int(v: Any) -> int:
    if type(v) is int:
        return v
    if v is None or isinstance(v, bool):
        return 0
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


def _detail(usage: dict, key: str, sub: str) -> int:
    d = usage.get(key)
    if type(d) is dict:
        return _int(d.get(sub))
    return 0


def parse_usage(usage: dict) -> tuple[int, int, int, int]:
    """(input, cached, output, reasoning) from one usage object of any supported shape."""
    get = usage.get
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        inp = get("prompt_tokens")
        out = _int(get("completion_tokens"))
        inp = max(_int(get("total_tokens")) - out, 0) if inp is None else _int(inp)
        return (
            inp,
            _detail(usage, "prompt_tokens_details", "cached_tokens"),
            out,
            _detail(usage, "completion_tokens_details", "reasoning_tokens"),
        )
    if "input_tokens" in usage or "output_tokens" in usage:
        inp = _int(get("input_tokens"))
        out = _int(get("output_tokens"))
        reasoning = _detail(usage, "output_tokens_details", "reasoning_tokens")
        if "cache_read_input_tokens" in usage or "cache_creation_input_tokens" in usage:
            cached = _int(get("cache_read_input_tokens"))
            return inp + cached + _int(get("cache_creation_input_tokens")), cached, out, reasoning
        return inp, _detail(usage, "input_tokens_details", "cached_tokens"), out, reasoning
    if "total_tokens" in usage:
        return _int(get("total_tokens")), 0, 0, 0
    return 0, 0, 0, 0


def _add_line(acc: dict[str, list[int]], line: bytes | str, default_model: str) -> None:
    try:
        if _MARK_B not in line:  # type: ignore[operator]
            return
    except TypeError:  # a str line
        if _MARK_S not in line:  # type: ignore[operator]
            return
    try:
        if type(line) is bytes:
            line = line.decode("utf-8")
        try:
            obj = _scan_once(line, 0)[0]  # the C scanner directly: no encoding sniffing, no tail regex
        except StopIteration:  # not starting with a JSON value (e.g. leading blanks)
            obj = _loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        return
    if type(obj) is not dict:
        return
    resp = obj.get("response")
    if type(resp) is not dict:
        return
    status = resp.get("status_code")
    if status is not None:
        if type(status) is not int:
            status = _int(status)
        if status < 200 or status >= 300:
            return
    body = resp.get("body")
    if type(body) is str:
        try:
            body = _loads(body)
        except ValueError:
            return
    if type(body) is not dict:
        return
    usage = body.get("usage")
    if type(usage) is not dict:
        return
    inp, cached, out, reasoning = parse_usage(usage)
    if not (inp or out or cached or reasoning):
        return
    model = body.get("model")
    if type(model) is not str or not model:
        model = default_model
    slot = acc.get(model)
    if slot is None:
        acc[model] = [inp, cached, out, reasoning]
    else:
        slot[0] += inp
        slot[1] += cached
        slot[2] += out
        slot[3] += reasoning


def _finish(acc: dict[str, list[int]]) -> dict[str, Usage]:
    return {
        m: Usage(input_tokens=v[0], cached_tokens=v[1], output_tokens=v[2], reasoning_tokens=v[3])
        for m, v in acc.items()
    }


def sum_usage_from_output(lines: Iterable[bytes], *, default_model: str = "") -> dict[str, Usage]:
    """Per-model usage over batch output lines (bytes or str, with or without newline).

    Keyed by ``response.body.model`` as written (e.g. "gpt-4o-mini-2024-07-18");
    a body without a model is keyed by ``default_model``. Streams: memory is
    O(number of models), not O(lines).
    """
    acc: dict[str, list[int]] = {}
    add = _add_line
    for line in lines:
        add(acc, line, default_model)
    return _finish(acc)


async def sum_usage_from_output_async(
    lines: AsyncIterable[bytes], *, default_model: str = ""
) -> dict[str, Usage]:
    """Async variant of :func:`sum_usage_from_output` (e.g. over a streamed download)."""
    acc: dict[str, list[int]] = {}
    add = _add_line
    async for line in lines:
        add(acc, line, default_model)
    return _finish(acc)
