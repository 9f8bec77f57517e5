"""Pure mapping of OpenAI / Azure OpenAI batch JSON (no I/O)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from batchgate_server.domain.models import BatchError, RequestCounts
from batchgate_server.providers.base import JobStatus
from batchgate_server.providers.openai_batch import mapping as m


@pytest.mark.parametrize("raw, expected", [
    ("validating", JobStatus.VALIDATING),
    ("in_progress", JobStatus.IN_PROGRESS),
    ("finalizing", JobStatus.FINALIZING),
    ("completed", JobStatus.COMPLETED),
    ("failed", JobStatus.FAILED),
    ("expired", JobStatus.EXPIRED),
    ("cancelling", JobStatus.CANCELLING),
    ("cancelled", JobStatus.CANCELLED),
    # Azure preview quirks: capitalised, CamelCase, US spelling
    ("Validating", JobStatus.VALIDATING),
    ("InProgress", JobStatus.IN_PROGRESS),
    ("In_progress", JobStatus.IN_PROGRESS),
    ("Finalizing", JobStatus.FINALIZING),
    ("Completed", JobStatus.COMPLETED),
    ("Failed", JobStatus.FAILED),
    ("Expired", JobStatus.EXPIRED),
    ("Cancelling", JobStatus.CANCELLING),
    ("Canceling", JobStatus.CANCELLING),
    ("Cancelled", JobStatus.CANCELLED),
    ("canceled", JobStatus.CANCELLED),
    (" COMPLETED ", JobStatus.COMPLETED),
    ("paused", None),
    ("", None),
    (None, None),
    (3, None),
])
def test_map_status(raw, expected):
    assert m.map_status(raw) is expected


T = 1721412000  # 2024-07-19T18:00:00Z


@pytest.mark.parametrize("raw, expected", [
    (T, float(T)),
    (float(T) + 0.5, T + 0.5),
    (str(T), float(T)),
    (T * 1000, float(T)),  # milliseconds
    ("2024-07-19T18:00:00Z", float(T)),
    ("2024-07-19T18:00:00.0000000Z", float(T)),  # .NET 7-digit fraction (Azure)
    ("2024-07-19T18:00:00.5000000Z", T + 0.5),
    ("2024-07-19T20:00:00+02:00", float(T)),
    ("2024-07-19T18:00:00", float(T)),  # naive: UTC
    ("2024-07-19 18:00:00", float(T)),
    (None, None),
    ("", None),
    ("not a date", None),
    (0, None),
    (True, None),
    ({"x": 1}, None),
])
def test_parse_timestamp(raw, expected):
    got = m.parse_timestamp(raw)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


@pytest.mark.parametrize("raw, expected", [
    ({"total": 10, "completed": 7, "failed": 2}, RequestCounts(10, 7, 2)),
    ({"total": 0, "completed": 0, "failed": 0}, RequestCounts(0, 0, 0)),
    ({"total": None, "completed": 3, "failed": 1}, RequestCounts(4, 3, 1)),
    ({"total": "5", "completed": "5", "failed": "0"}, RequestCounts(5, 5, 0)),
    ({"total": 5}, RequestCounts(5, 0, 0)),
    ({"total": None, "completed": None, "failed": None}, None),  # Azure: nulls
    (None, None),  # Azure: request_counts null
    ({}, None),
    ([], None),
])
def test_parse_request_counts(raw, expected):
    assert m.parse_request_counts(raw) == expected


def test_parse_errors_shapes():
    data = [{"code": "invalid_json_line", "message": "bad", "param": None, "line": 2},
            {"code": "duplicate_custom_id", "message": "dup", "param": "custom_id", "line": "3"},
            {"message": "no code"}, "garbage"]
    want = [BatchError("invalid_json_line", "bad", "", 2),
            BatchError("duplicate_custom_id", "dup", "custom_id", 3),
            BatchError("provider_error", "no code", "", None)]
    assert m.parse_errors({"object": "list", "data": data}) == want
    assert m.parse_errors(data) == want
    assert m.parse_errors(None) == []
    assert m.parse_errors({"object": "list", "data": None}) == []


def _batch(**kw):
    b = {"id": "batch_1", "object": "batch", "endpoint": "/v1/chat/completions", "errors": None,
         "input_file_id": "file-in", "completion_window": "24h", "status": "in_progress",
         "output_file_id": None, "error_file_id": None, "created_at": T, "in_progress_at": T + 5,
         "expires_at": T + 86400, "finalizing_at": None, "completed_at": None, "failed_at": None,
         "expired_at": None, "cancelling_at": None, "cancelled_at": None,
         "request_counts": {"total": 3, "completed": 1, "failed": 0},
         "metadata": {"batchgate_batch_id": "batch_gw"}}
    b.update(kw)
    return b


def test_poll_result_in_progress():
    r = m.batch_to_poll_result(_batch())
    assert r.status is JobStatus.IN_PROGRESS
    assert r.request_counts == RequestCounts(3, 1, 0)
    assert r.errors == []
    assert "batch_1" in r.detail and "in_progress" in r.detail


def test_poll_result_failed_with_line_errors():
    r = m.batch_to_poll_result(_batch(status="failed", failed_at=T + 9, errors={
        "object": "list", "data": [{"code": "url_mismatch", "message": "m", "param": "url",
                                    "line": 4}]}))
    assert r.status is JobStatus.FAILED
    assert r.errors == [BatchError("url_mismatch", "m", "url", 4)]


def test_poll_result_failed_without_details_gets_a_generic_error():
    r = m.batch_to_poll_result(_batch(status="failed"))
    assert r.status is JobStatus.FAILED
    assert [e.code for e in r.errors] == ["provider_failed"]


def test_errors_ignored_unless_failed():
    r = m.batch_to_poll_result(_batch(status="completed", errors={"data": [{"code": "x"}]}))
    assert r.status is JobStatus.COMPLETED and r.errors == []


def test_azure_quirks_batch():
    obj = _batch(status="Completed", request_counts=None, created_at="2024-07-19T18:00:00.0000000Z",
                 completed_at="2024-07-19T18:10:00Z", endpoint="/chat/completions",
                 output_file_id="file-out", error_file_id="file-empty")
    info = m.parse_batch(obj)
    assert info.status is JobStatus.COMPLETED
    assert info.request_counts is None
    assert info.timestamps["created_at"] == pytest.approx(T)
    assert info.timestamps["completed_at"] == pytest.approx(T + 600)
    assert (info.output_file_id, info.error_file_id) == ("file-out", "file-empty")
    r = m.to_poll_result(info, "azure")
    assert r.status is JobStatus.COMPLETED and r.request_counts is None


def test_empty_string_file_ids_are_none():
    info = m.parse_batch(_batch(output_file_id="", error_file_id=""))
    assert info.output_file_id is None and info.error_file_id is None


def test_unknown_status_and_non_batch():
    with pytest.raises(ValueError, match="unknown batch status"):
        m.batch_to_poll_result(_batch(status="paused"))
    with pytest.raises(ValueError):
        m.parse_batch({"object": "batch"})
    with pytest.raises(ValueError):
        m.parse_batch(["x"])


def test_parse_against_openai_types_roundtrip():
    from openai.types import Batch

    obj = _batch(status="completed", output_file_id="file-o", completed_at=T + 60,
                 request_counts={"total": 3, "completed": 3, "failed": 0})
    Batch.model_validate(obj)  # the fixture itself is a valid OpenAI Batch
    assert m.batch_to_poll_result(obj).request_counts == RequestCounts(3, 3, 0)


# ------------------------------------------------------------------ line rewriting

def _line(url="/v1/chat/completions", model="gpt-4o-mini", **extra):
    obj = {"custom_id": "r-1", "method": "POST", "url": url,
           "body": {"model": model, "messages": [{"role": "user", "content": "héllo \u2028 \"q\""}]}}
    obj.update(extra)
    return json.dumps(obj).encode()


def test_rewrite_model_openai():
    out = json.loads(m.rewrite_line(_line(), "gpt-4o-mini-2024-07-18"))
    assert out["body"]["model"] == "gpt-4o-mini-2024-07-18"
    assert out["url"] == "/v1/chat/completions"
    assert out["body"]["messages"][0]["content"] == "héllo \u2028 \"q\""
    assert list(out) == ["custom_id", "method", "url", "body"]  # order kept


def test_rewrite_azure_url_and_deployment():
    out = json.loads(m.rewrite_line(_line(), "my-gpt4o-batch", azure=True))
    assert out["url"] == "/chat/completions"
    assert out["body"]["model"] == "my-gpt4o-batch"
    out = json.loads(m.rewrite_line(_line(url="/chat/completions"), "d", azure=True))
    assert out["url"] == "/chat/completions"


def test_rewrite_unchanged_line_is_returned_as_is():
    raw = _line(model="same")
    assert m.rewrite_line(raw, "same") is raw


def test_rewrite_output_is_one_line():
    raw = _line()
    out = m.rewrite_line(raw, "other")
    assert b"\n" not in out


@pytest.mark.parametrize("raw", [b"{not json", b"[1,2]", b'"str"', b"", b'{"x": NaN, "body": {}}'])
def test_rewrite_passes_bad_lines_through(raw):
    assert m.rewrite_line(raw, "model") == raw


def test_rewrite_adds_missing_model():
    out = json.loads(m.rewrite_line(b'{"custom_id":"a","method":"POST","url":"/v1/embeddings",'
                                    b'"body":{"input":"x"}}', "text-embedding-3-small", azure=True))
    assert out["body"] == {"input": "x", "model": "text-embedding-3-small"}
    assert out["url"] == "/embeddings"


@pytest.mark.parametrize("url, expected", [
    ("/v1/chat/completions", "/chat/completions"),
    ("/v1/embeddings", "/embeddings"),
    ("/chat/completions", "/chat/completions"),
    ("/v1", "/v1"),
])
def test_azure_path(url, expected):
    assert m.azure_path(url) == expected


# ------------------------------------------------------------------ HTTP details

@pytest.mark.parametrize("body, expected", [
    (b'{"error": {"message": "Incorrect API key", "type": "invalid_request_error", '
     b'"code": "invalid_api_key"}}', ("Incorrect API key", "invalid_api_key")),
    (b'{"error": {"code": "401", "message": "Access denied"}}', ("Access denied", "401")),
    (b'{"error": {"message": "x", "type": "server_error", "code": null}}', ("x", "server_error")),
    (b'{"error": "plain"}', ("plain", None)),
    (b"<html>\n  Bad Gateway\n</html>", ("<html> Bad Gateway </html>", None)),
    (b"", ("(empty body)", None)),
])
def test_error_message(body, expected):
    assert m.error_message(body) == expected


def test_error_message_is_trimmed():
    msg, _ = m.error_message(json.dumps({"error": {"message": "x" * 5000}}).encode())
    assert len(msg) == 500


@pytest.mark.parametrize("headers, expected", [
    ({"Retry-After": "1"}, 1.0),
    ({"retry-after": "2.5"}, 2.5),
    ({"retry-after-ms": "1500", "Retry-After": "9"}, 1.5),
    ({"Retry-After": "Fri, 19 Jul 2024 18:00:30 GMT"}, 30.0),
    ({"Retry-After": "Fri, 19 Jul 2024 17:00:00 GMT"}, 0.0),  # in the past
    ({"Retry-After": "soon"}, None),
    ({"Retry-After": "-1"}, None),
    ({}, None),
])
def test_parse_retry_after(headers, expected):
    now = datetime(2024, 7, 19, 18, 0, 0, tzinfo=timezone.utc).timestamp()
    got = m.parse_retry_after(headers, now=now)
    assert got == (pytest.approx(expected) if expected is not None else None)
