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
  and writes there): input = input_tokens + cache_read_input_tokens +
  cache_creation_input_tokens, cached = cache_read_input_tokens, cache
  writes = cache_creation_input_tokens, of which
  cache_creation.ephemeral_1h_input_tokens are 1-hour writes.
* Prompt-cache writes in the OpenAI shapes (how the Anthropic and Bedrock
  adapters normalise them): prompt_tokens_details.cache_creation_tokens and
  .cache_creation_1h_tokens (input_tokens_details.* in the responses shape),
  parts of prompt_tokens like cached_tokens.

Long-context price tiers: given the thresholds of the batch's price (e.g.
200000 for a price "above 200k tokens"), each request's usage is summed under
(model, tier), the tier being the highest threshold its prompt (input_tokens,
cache reads and writes included) exceeds, 0 below them all: a provider prices
the whole request at its tier's rates.

Speed: lines without the bytes ``usage`` are skipped before parsing; the rest
cost one full parse by json's C scanner, called directly (skipping json.loads'
encoding sniffing and trailing-whitespace regex: ~20% faster). Partial parsing
(regexes + ``raw_decode`` of just the usage object) measured only ~10% faster
than json.loads, so the robust full parse is kept. See bench/cost.py for figures.
UsageCounter (a batch's results as they arrive) reads lines with add_output_line instead: msgspec
decoding into structs of just the members read (response.status_code, body.model, body.usage)
skips the answer's text without building it, and hands what it cannot read exactly as json does
to the full parse (tests/unit/test_line_fast_paths.py).
"""

from __future__ import annotations

import json
import json.scanner
import sys
from collections.abc import AsyncIterable, Iterable, Mapping
from typing import Any

import msgspec

from batchgate_server.domain.models import Usage

_loads = json.loads
_INT_DIGITS = getattr(sys, "get_int_max_str_digits", lambda: 0)() or sys.maxsize
_scan_once = json.scanner.make_scanner(json.JSONDecoder())
_MARK_B = b"usage"  # also matches a body embedded as a JSON string (escaped quotes)
_MARK_S = "usage"
# A key may spell "usage" with escapes ("us\\u0061ge"); json reads it as "usage" all the same.
_ESCAPE_B = b"\\u"
_ESCAPE_S = "\\u"
_long_ints_as_null = json.JSONDecoder(
    parse_int=lambda text: int(text) if len(text.lstrip("-")) <= _INT_DIGITS else None).raw_decode


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


def _input_details(usage: dict, details_key: str) -> tuple[int, int, int]:
    """(cached, cache writes, of which 1-hour) from an OpenAI-shaped usage's input details."""
    d = usage.get(details_key)
    if type(d) is not dict:
        return 0, 0, 0
    written = d.get("cache_creation_tokens")
    if not written:  # the common case: one lookup, no conversions
        return _int(d.get("cached_tokens")), 0, 0
    return _int(d.get("cached_tokens")), _int(written), _int(d.get("cache_creation_1h_tokens"))


def _anthropic_cache_writes(usage: dict) -> tuple[int, int]:
    """(cache writes, of which 1-hour) from Anthropic's usage: cache_creation_input_tokens, split
    by cache_creation.ephemeral_5m_input_tokens / ephemeral_1h_input_tokens when present."""
    written = _int(usage.get("cache_creation_input_tokens"))
    split = usage.get("cache_creation")
    if type(split) is not dict:
        return written, 0
    one_hour = _int(split.get("ephemeral_1h_input_tokens"))
    return max(written, _int(split.get("ephemeral_5m_input_tokens")) + one_hour), one_hour


def parse_usage(usage: dict) -> tuple[int, int, int, int, int, int]:
    """(input, cached, output, reasoning, cache writes, 1-hour cache writes) from one usage
    object of any supported shape."""
    get = usage.get
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        inp = get("prompt_tokens")
        out = _int(get("completion_tokens"))
        inp = max(_int(get("total_tokens")) - out, 0) if inp is None else _int(inp)
        cached, written, one_hour = _input_details(usage, "prompt_tokens_details")
        return inp, cached, out, _detail(usage, "completion_tokens_details", "reasoning_tokens"), written, one_hour
    if "input_tokens" in usage or "output_tokens" in usage:
        inp = _int(get("input_tokens"))
        out = _int(get("output_tokens"))
        reasoning = _detail(usage, "output_tokens_details", "reasoning_tokens")
        if "cache_read_input_tokens" in usage or "cache_creation_input_tokens" in usage:
            cached = _int(get("cache_read_input_tokens"))
            written, one_hour = _anthropic_cache_writes(usage)
            return inp + cached + written, cached, out, reasoning, written, one_hour
        cached, written, one_hour = _input_details(usage, "input_tokens_details")
        return inp, cached, out, reasoning, written, one_hour
    if "total_tokens" in usage:
        return _int(get("total_tokens")), 0, 0, 0, 0, 0
    return 0, 0, 0, 0, 0, 0


UsageKey = tuple[str, int]  # (model, long-context tier: the threshold exceeded, 0 for none)


def tier_of(prompt_tokens: int, thresholds: tuple[int, ...]) -> int:
    """The highest of `thresholds` (ascending) that `prompt_tokens` exceeds, else 0."""
    tier = 0
    for threshold in thresholds:
        if prompt_tokens > threshold:
            tier = threshold
    return tier


def _add_line(acc: dict[UsageKey, list[int]], line: bytes | str, default_model: str,
              thresholds: tuple[int, ...] = ()) -> None:
    try:
        if _MARK_B not in line and _ESCAPE_B not in line:  # type: ignore[operator]
            return
    except TypeError:  # a str line
        if _MARK_S not in line and _ESCAPE_S not in line:  # type: ignore[operator]
            return
    try:
        if type(line) is bytes:
            line = line.decode("utf-8")
        try:
            obj = _scan_once(line, 0)[0]  # the C scanner directly: no encoding sniffing, no tail regex
        except StopIteration:  # not starting with a JSON value (e.g. leading blanks)
            obj = _loads(line)
    except RecursionError:  # nested deeper than the decoder goes: as unreadable as bad JSON
        return
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        if type(line) is bytes or "integer string conversion" not in str(exc):
            return
        # An integer int() will not convert (past sys.get_int_max_str_digits() digits): msgspec
        # reads the members usage needs past it, so this reads the line again with such integers
        # as null (0 where usage is counted; msgspec refuses the line when it is one of them).
        try:
            obj = _long_ints_as_null(line.lstrip(" \t\r\n"))[0]
        except (ValueError, RecursionError):
            return
    add_parsed_line(acc, obj, default_model, thresholds)


def add_parsed_line(acc: dict[UsageKey, list[int]], obj: Any, default_model: str = "",
                    thresholds: tuple[int, ...] = ()) -> None:
    """Add one output line already parsed (`obj`) to `acc`, as add_output_line counts its bytes:
    for a writer that holds each line parsed as it writes it (the executor), so that nothing is
    parsed a second time at the end."""
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
    _count(acc, body.get("usage"), body.get("model"), default_model, thresholds)


def _count(acc: dict[UsageKey, list[int]], usage: Any, model: Any, default_model: str,
           thresholds: tuple[int, ...]) -> None:
    """Add one answered request's `usage` object (anything else counts nothing) under its body's
    `model` (default_model when it has none) and its long-context tier."""
    if type(usage) is not dict:
        return
    counts = parse_usage(usage)
    if not any(counts):
        return
    if type(model) is not str or not model:
        model = default_model
    key = (model, tier_of(counts[0], thresholds) if thresholds else 0)
    slot = acc.get(key)
    if slot is None:
        acc[key] = list(counts)
    else:  # unrolled: this runs once per output line
        slot[0] += counts[0]
        slot[1] += counts[1]
        slot[2] += counts[2]
        slot[3] += counts[3]
        slot[4] += counts[4]
        slot[5] += counts[5]


class _OutputBody(msgspec.Struct):
    model: Any = None
    usage: Any = None


class _OutputResponse(msgspec.Struct):
    status_code: Any = None
    body: _OutputBody | None = None


class _OutputLine(msgspec.Struct):
    """The members of an output line usage is read from; msgspec skips the rest (the answer's text)
    without building it: ~3x faster than json.loads on a 4 KB answer."""

    response: _OutputResponse | None = None


_read_output_line = msgspec.json.Decoder(_OutputLine).decode


def add_output_line(acc: dict[UsageKey, list[int]], line: bytes, thresholds: tuple[int, ...] = (),
                    default_model: str = "") -> None:
    """Add the usage of one batch output line (bytes) into `acc` (per (model, tier): the six
    counts of parse_usage, as usage_of reads them), as sum_usage_by_tier counts it; the hot path
    of core/accounting.py UsageCounter. Reads only the members usage needs. Whatever the typed
    read does not take as Python's json reads it (not an object, a body embedded as a string, NaN,
    a lone surrogate, text after the object) goes to _add_line, so both count the same."""
    try:  # no `b"usage" in line` first: on a long answer that search costs most of this read
        obj = _read_output_line(line)
        if not line.isascii():
            line.decode()  # msgspec does not check the UTF-8 of skipped members; json.loads does
    except UnicodeDecodeError:
        return
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        _add_line(acc, line, default_model, thresholds)
        return
    resp = obj.response
    if resp is None:
        return
    status = resp.status_code
    if status is not None:
        if type(status) is not int:
            status = _int(status)
        if status < 200 or status >= 300:
            return
    body = resp.body
    if body is not None:
        _count(acc, body.usage, body.model, default_model, thresholds)


def usage_of(v: list[int]) -> Usage:
    """A Usage from the six counts add_output_line (and the sums below) keep per key."""
    return Usage(input_tokens=v[0], cached_tokens=v[1], output_tokens=v[2], reasoning_tokens=v[3],
                 cache_creation_tokens=v[4], cache_creation_1h_tokens=v[5])


def _finish(acc: dict[UsageKey, list[int]]) -> dict[str, Usage]:
    return merge_tiers({k: usage_of(v) for k, v in acc.items()})


def merge_tiers(by_tier: Mapping[UsageKey, Usage] | Mapping[str, Usage]) -> dict[str, Usage]:
    """Per-model usage from per-(model, tier) usage (a per-model mapping is copied)."""
    by_model: dict[str, Usage] = {}
    for key, usage in by_tier.items():
        by_model.setdefault(key[0] if isinstance(key, tuple) else key, Usage()).add(usage)
    return by_model


def sum_usage_by_tier(lines: Iterable[bytes], thresholds: tuple[int, ...] = (), *,
                      default_model: str = "") -> dict[UsageKey, Usage]:
    """Usage per (model, long-context tier) over batch output lines; see the module docstring."""
    acc: dict[UsageKey, list[int]] = {}
    add = _add_line
    for line in lines:
        add(acc, line, default_model, thresholds)
    return {k: usage_of(v) for k, v in acc.items()}


def sum_usage_from_output(lines: Iterable[bytes], *, default_model: str = "") -> dict[str, Usage]:
    """Per-model usage over batch output lines (bytes or str, with or without newline).

    Keyed by ``response.body.model`` as written (e.g. "gpt-4o-mini-2024-07-18");
    a body without a model is keyed by ``default_model``. Streams: memory is
    O(number of models), not O(lines).
    """
    acc: dict[UsageKey, list[int]] = {}
    add = _add_line
    for line in lines:
        add(acc, line, default_model)
    return _finish(acc)


async def sum_usage_from_output_async(
    lines: AsyncIterable[bytes], *, default_model: str = ""
) -> dict[str, Usage]:
    """Async variant of :func:`sum_usage_from_output` (e.g. over a streamed download)."""
    acc: dict[UsageKey, list[int]] = {}
    add = _add_line
    async for line in lines:
        add(acc, line, default_model)
    return _finish(acc)
