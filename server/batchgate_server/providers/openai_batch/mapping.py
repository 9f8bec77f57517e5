"""Pure translation for the OpenAI / Azure OpenAI batch adapters: no I/O, no clock (except
where a caller passes `now`), unit-tested in tests/unit/test_openai_batch_mapping.py.

* provider Batch JSON -> BatchInfo -> PollResult (statuses incl. Azure's capitalised ones,
  request_counts possibly null, errors with line numbers, unix or ISO-8601 timestamps);
* input-line rewriting (body.model -> the deployment's model, Azure line urls without /v1);
* error bodies and Retry-After headers.
"""

from __future__ import annotations

import email.utils
import itertools
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import msgspec

from batchgate_server.domain.models import BatchError, RequestCounts
from batchgate_server.providers import json_splice
from batchgate_server.providers.base import JobStatus, PollResult

OPENAI_ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/responses",
                    "/v1/moderations")
# Azure global batch on the GA data-plane surface (api-version 2024-10-21): chat completions and
# embeddings. Responses batches only exist on the v1 surface, which this adapter doesn't target.
AZURE_ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings")
# What one batch (its input file) takes: OpenAI 50,000 requests and 200 MB, Azure OpenAI global
# batch 100,000 requests and 200 MB per file. "MB" read as decimal megabytes, the stricter reading.
OPENAI_MAX_LINES = 50_000
AZURE_MAX_LINES = 100_000
MAX_FILE_BYTES = 200_000_000

# Keys: the status lowercased with "_", "-" and spaces removed, so "in_progress", "InProgress",
# "In_progress" and "in progress" all land on the same entry.
_STATUS = {
    "validating": JobStatus.VALIDATING,
    "inprogress": JobStatus.IN_PROGRESS,
    "finalizing": JobStatus.FINALIZING,
    "completed": JobStatus.COMPLETED,
    "failed": JobStatus.FAILED,
    "expired": JobStatus.EXPIRED,
    "cancelling": JobStatus.CANCELLING,
    "canceling": JobStatus.CANCELLING,
    "cancelled": JobStatus.CANCELLED,
    "canceled": JobStatus.CANCELLED,
}

TIMESTAMP_FIELDS = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
                    "failed_at", "expired_at", "cancelling_at", "cancelled_at")


def map_status(raw: Any) -> JobStatus | None:
    """The JobStatus for a provider status string; None when unknown."""
    if not isinstance(raw, str):
        return None
    key = raw.strip().lower().replace("_", "").replace("-", "").replace(" ", "")
    return _STATUS.get(key)


def parse_timestamp(value: Any) -> float | None:
    """Unix seconds (int/float/numeric string; milliseconds are detected) or ISO-8601 -> float."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        v = float(value)
    elif isinstance(value, str):
        s = value.strip()
        if not s:
            return None
        try:
            v = float(s)
        except ValueError:
            return _parse_iso(s)
    else:
        return None
    if not math.isfinite(v) or v <= 0:
        return None
    if v > 1e11:  # milliseconds since the epoch
        v /= 1000.0
    return v


def _parse_iso(s: str) -> float | None:
    t = s.replace(" ", "T", 1) if "T" not in s and " " in s else s
    if t.endswith(("Z", "z")):
        t = t[:-1] + "+00:00"
    return iso_to_unix(t)


def iso_to_unix(t: str) -> float | None:
    """ISO 8601 text (offset written as +HH:MM; none means UTC) -> unix seconds; None when
    fromisoformat can't read it. Fractions longer than 6 digits (.NET writes 7) are cut to 6, which
    Python < 3.11 needs."""
    if "." in t:
        head, _, rest = t.partition(".")
        digits = ""
        while rest and rest[0].isdigit():
            digits, rest = digits + rest[0], rest[1:]
        t = head + ("." + digits[:6] if digits else "") + rest
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _int(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def parse_request_counts(value: Any) -> RequestCounts | None:
    """{total, completed, failed} -> RequestCounts; None when absent or entirely null."""
    if not isinstance(value, Mapping):
        return None
    total, completed, failed = (_int(value.get(k)) for k in ("total", "completed", "failed"))
    if total is None and completed is None and failed is None:
        return None
    completed = completed or 0
    failed = failed or 0
    if total is None:
        total = completed + failed
    return RequestCounts(total=total, completed=completed, failed=failed)


def parse_errors(value: Any) -> list[BatchError]:
    """errors: {"object": "list", "data": [...]} | [...] | null -> [BatchError]."""
    if isinstance(value, Mapping):
        items = value.get("data")
    else:
        items = value
    if not isinstance(items, list):
        return []
    out = []
    for item in items:
        if not isinstance(item, Mapping):
            continue
        line = _int(item.get("line"))
        out.append(BatchError(code=str(item.get("code") or "provider_error"),
                              message=str(item.get("message") or ""),
                              param=str(item.get("param") or ""),
                              line=line))
    return out


@dataclass
class BatchInfo:
    id: str
    status: JobStatus | None  # None: a status we don't know
    raw_status: str
    request_counts: RequestCounts | None
    errors: list[BatchError]
    output_file_id: str | None
    error_file_id: str | None
    timestamps: dict[str, float | None] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    input_file_id: str | None = None


def parse_batch(obj: Any) -> BatchInfo:
    """A provider Batch object -> BatchInfo. Raises ValueError when `obj` isn't a batch."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("id"), str):
        raise ValueError("not a batch object (no id)")
    raw_status = obj.get("status")
    return BatchInfo(
        id=obj["id"],
        status=map_status(raw_status),
        raw_status=str(raw_status),
        request_counts=parse_request_counts(obj.get("request_counts")),
        errors=parse_errors(obj.get("errors")),
        output_file_id=obj.get("output_file_id") or None,
        error_file_id=obj.get("error_file_id") or None,
        timestamps={k: parse_timestamp(obj.get(k)) for k in TIMESTAMP_FIELDS},
        metadata=dict(obj.get("metadata") or {}),
        input_file_id=obj.get("input_file_id") or None,
    )


def to_poll_result(info: BatchInfo, provider_label: str = "openai") -> PollResult:
    if info.status is None:
        raise ValueError(f"unknown batch status {info.raw_status!r}")
    errors = list(info.errors)
    if info.status is JobStatus.FAILED and not errors:
        errors = [BatchError(code="provider_failed",
                             message=f"The {provider_label} batch failed without details.")]
    return PollResult(status=info.status, request_counts=info.request_counts,
                      errors=errors if info.status is JobStatus.FAILED else [],
                      detail=f"{provider_label} batch {info.id}: {info.raw_status}")


def batch_to_poll_result(obj: Any, provider_label: str = "openai") -> PollResult:
    return to_poll_result(parse_batch(obj), provider_label)


# ------------------------------------------------------------------------------ endpoints & lines

def azure_path(url: str) -> str:
    """"/v1/chat/completions" -> "/chat/completions" (Azure's legacy surface has no /v1)."""
    return url[3:] if url.startswith("/v1/") else url


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


class _Body(msgspec.Struct):
    model: Any = None


class _LineHead(msgspec.Struct):
    """The members of an input line the rewrite reads (msgspec skips the rest, the prompt)."""

    body: _Body | None = None
    url: Any = None


_read_head = msgspec.json.Decoder(_LineHead).decode


class _Counted(str):
    """A member of the line head whose every occurrence the read counts (``_read_counted``)."""

    __slots__ = ()


# Occurrences of body.model (and Azure's url) in the lines read: msgspec calls the hook for each, the
# duplicates json drops included, however the key is spelled (escapes too); nested members of the same name (a
# tool's schema) are no field and not counted. A line's count is the counter's advance over its read:
# a read on another thread at the same time can only add to it (one more re-encode, never a missed
# duplicate), so no lock or thread-local is needed. ~0.25 us a member (a Python call from msgspec) for a
# line of 2 KB, where a search of its bytes for a second '"model"' took 1.4 us (and one for keys spelled
# with escapes 1.3 more).
_occurrences = itertools.count()


def _count_occurrence(_type: type, value: Any, _next=next, _counter=_occurrences) -> Any:
    _next(_counter)
    return _Counted(value) if value.__class__ is str else value  # anything else fails the read: re-encoded


class _CountedBody(msgspec.Struct):
    model: _Counted | None = None


class _CountedHead(msgspec.Struct):
    body: _CountedBody | None = None
    url: Any = None


class _CountedAzureHead(msgspec.Struct):
    """Azure's url is spliced too: its occurrences are counted as well."""

    body: _CountedBody | None = None
    url: _Counted | None = None


_read_counted = msgspec.json.Decoder(_CountedHead, dec_hook=_count_occurrence).decode
_read_counted_azure = msgspec.json.Decoder(_CountedAzureHead, dec_hook=_count_occurrence).decode


def rewrite_line(raw: bytes, model: str, *, azure: bool = False) -> bytes:
    """Set body.model to the deployment's model (and drop the /v1 of the url for Azure).

    A line that is not a JSON object is passed through unchanged: the provider reports it (with
    its line number) rather than the adapter guessing. Unchanged lines are returned as-is.
    The new values are spliced into the line's bytes where that is provably exact
    (providers/json_splice.py); otherwise the line is decoded and re-encoded whole."""
    before = next(_occurrences)
    try:
        head = _read_counted_azure(raw) if azure else _read_counted(raw)
        if not raw.isascii():
            raw.decode()  # msgspec does not check the UTF-8 of members it skips; json does
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        # e.g. NaN, a lone surrogate, body not an object, or an earlier duplicate of body.model that is
        # no string (the validator read the last): written once if anything is written.
        return _rewrite_decoded(raw, model, azure=azure, always=True)
    url = head.url
    new_url = azure_path(url) if azure and isinstance(url, str) and url.startswith("/v1/") else None
    new_model = head.body is not None and head.body.model != model
    counted = (azure and url is not None) + (head.body is not None and head.body.model is not None)
    if next(_occurrences) - before - 1 > counted:
        # A duplicate of url, body or body.model (spelled plainly or with escapes): the splice, or the
        # line as it is, would pass the earlier one on, for a parser that keeps the first of duplicate
        # keys to read (another model, on the deployment's account). The re-encode writes it once.
        return _rewrite_decoded(raw, model, azure=azure, always=True)
    if new_url is None and not new_model:
        return raw
    if new_url is not None and new_model and new_url != model:
        both = _splice_both(raw, new_url, model)
        if both is not None:
            return both
    line: bytes | None = raw
    if new_url is not None:
        line = _splice(line, "url", new_url, lambda spliced: _read_head(spliced).url == new_url)
    if line is not None and new_model:
        line = _splice(line, "model", model, lambda spliced: _read_head(spliced).body.model == model)
    return line if line is not None else _rewrite_decoded(raw, model, azure=azure)


def _splice_both(raw: bytes, url: str, model: str) -> bytes | None:
    """Azure's two splices (the url, body.model) with one read-back for both, None when it does
    not prove them. Each splice replaces one scalar token, so the line keeps its structure and each
    member reads the token at the same place as before; both members read other values before (the
    caller checked) and read the new ones after, so each reads a replaced token, and not the other
    member's: the two new values differ (the caller checked), and each reads as its own only."""
    url_span, model_span = json_splice.scalar_span(raw, "url"), json_splice.scalar_span(raw, "model")
    url_value, model_value = json_splice.encode_value(url), json_splice.encode_value(model)
    if url_span is None or model_span is None or url_value is None or model_value is None:
        return None
    (first, first_value), (second, second_value) = sorted(((url_span, url_value), (model_span, model_value)))
    if first[1] > second[0]:
        return None
    line = b"".join((raw[:first[0]], first_value, raw[first[1]:second[0]], second_value, raw[second[1]:]))
    try:
        head = _read_head(line)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return line if head.url == url and head.body is not None and head.body.model == model else None


def _splice(line: bytes, key: str, value: str, reads_back: Callable[[bytes], bool]) -> bytes | None:
    encoded = json_splice.encode_value(value)
    return None if encoded is None else json_splice.splice_member(line, key, encoded, reads_back)


def _rewrite_decoded(raw: bytes, model: str, *, azure: bool, always: bool = False) -> bytes:
    """rewrite_line by decoding the whole line and encoding it again (json, as Python reads it): a
    line with nothing to change is returned as it is unless ``always`` (it may hold duplicate keys,
    which the encode writes once)."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(obj, dict):
        return raw
    changed = False
    body = obj.get("body")
    if isinstance(body, dict) and body.get("model") != model:
        body["model"] = model
        changed = True
    if azure:
        url = obj.get("url")
        if isinstance(url, str) and url.startswith("/v1/"):
            obj["url"] = azure_path(url)
            changed = True
    if not changed and not always:
        return raw
    try:
        return _dumps(obj).encode()
    except ValueError:  # NaN/Infinity in the input: leave it for the provider to reject
        return raw


# ------------------------------------------------------------------------------ HTTP details

def error_message(body: bytes | str, limit: int = 500) -> tuple[str, str | None]:
    """(message, error code) from an OpenAI/Azure error body ({"error": {"message", "code"}})."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if isinstance(obj, Mapping):
        err = obj.get("error", obj)
        if isinstance(err, Mapping):
            msg = err.get("message") or err.get("msg")
            code = err.get("code") or err.get("type")
            if msg:
                return str(msg)[:limit], (str(code) if code is not None else None)
        elif isinstance(err, str):
            return err[:limit], None
    text = " ".join(text.split())
    return (text[:limit] or "(empty body)"), None


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from retry-after-ms, Retry-After (seconds) or Retry-After (HTTP date)."""
    lower = {k.lower(): v for k, v in headers.items()}
    ms = lower.get("retry-after-ms")
    if ms:
        try:
            v = float(ms) / 1000.0
            if math.isfinite(v) and v >= 0:
                return v
        except ValueError:
            pass
    ra = lower.get("retry-after")
    if not ra:
        return None
    try:
        v = float(ra)
        return v if math.isfinite(v) and v >= 0 else None
    except ValueError:
        pass
    try:
        dt = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError):
        return None
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    if now is None:
        now = time.time()
    return max(0.0, dt.timestamp() - now)
