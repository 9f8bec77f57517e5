"""Anthropic MessageBatch -> PollResult mapping (pure): statuses, counts, RFC 3339 timestamps.
Fixtures are built with the official anthropic types so their shape is the real one."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from anthropic.types.messages import MessageBatch

from batchgate_server.domain.models import RequestCounts
from batchgate_server.providers.anthropic.mapping import (
    batch_to_poll_result,
    parse_batch,
    parse_rfc3339,
)
from batchgate_server.providers.base import JobStatus

CREATED = "2024-08-20T18:37:24.100435Z"


def batch(status: str = "in_progress", *, processing: int = 0, succeeded: int = 0, errored: int = 0,
          canceled: int = 0, expired: int = 0, cancel_initiated_at: str | None = None,
          ended_at: str | None = None) -> dict:
    obj = {
        "id": "msgbatch_013Zva2CMHLNnXjNJJKqJ2EF", "type": "message_batch", "processing_status": status,
        "request_counts": {"processing": processing, "succeeded": succeeded, "errored": errored,
                           "canceled": canceled, "expired": expired},
        "ended_at": ended_at if ended_at else ("2024-08-20T19:37:24Z" if status == "ended" else None),
        "created_at": CREATED, "expires_at": "2024-08-21T18:37:24.100435Z", "archived_at": None,
        "cancel_initiated_at": cancel_initiated_at,
        "results_url": ("https://api.anthropic.com/v1/messages/batches/msgbatch_013Zva2CMHLNnXjNJJKqJ2EF/results"
                        if status == "ended" else None),
    }
    MessageBatch.model_validate(obj)  # the fixture is a real MessageBatch
    return obj


@pytest.mark.parametrize("text,expected", [
    ("2024-08-20T18:37:24.100435Z", datetime(2024, 8, 20, 18, 37, 24, 100435, tzinfo=timezone.utc)),
    ("2024-08-20T18:37:24Z", datetime(2024, 8, 20, 18, 37, 24, tzinfo=timezone.utc)),
    ("2024-08-20T18:37:24.1234567891Z", datetime(2024, 8, 20, 18, 37, 24, 123456, tzinfo=timezone.utc)),
    ("2024-08-20T20:37:24+02:00", datetime(2024, 8, 20, 18, 37, 24, tzinfo=timezone.utc)),
    ("2024-08-20t18:37:24z", datetime(2024, 8, 20, 18, 37, 24, tzinfo=timezone.utc)),
    ("2024-08-20 18:37:24.5Z", datetime(2024, 8, 20, 18, 37, 24, 500000, tzinfo=timezone.utc)),
    ("2024-08-20T18:37:24", datetime(2024, 8, 20, 18, 37, 24, tzinfo=timezone.utc)),
])
def test_rfc3339_timestamps(text, expected):
    assert parse_rfc3339(text) == pytest.approx(expected.timestamp())


@pytest.mark.parametrize("value", [None, "", "  ", "yesterday", "2024-13-01T00:00:00Z", 1724179044, {}])
def test_unparseable_timestamps_are_none(value):
    assert parse_rfc3339(value) is None


def test_parse_batch_reads_counts_and_times():
    info = parse_batch(batch("ended", succeeded=3, errored=1, canceled=0, expired=2))
    assert (info.succeeded, info.errored, info.canceled, info.expired, info.processing) == (3, 1, 0, 2, 0)
    assert info.total == 6
    assert info.created_at == pytest.approx(datetime(2024, 8, 20, 18, 37, 24, 100435,
                                                     tzinfo=timezone.utc).timestamp())
    assert info.ended_at == pytest.approx(datetime(2024, 8, 20, 19, 37, 24, tzinfo=timezone.utc).timestamp())
    assert info.cancel_initiated_at is None and info.archived_at is None
    assert info.results_url.endswith("/results")


@pytest.mark.parametrize("obj,match", [
    ([], "not a JSON object"),
    ({"processing_status": "ended"}, "no id"),
    ({"id": "msgbatch_1", "processing_status": "finalizing"}, "unknown processing_status"),
    ({"id": "msgbatch_1"}, "unknown processing_status"),
])
def test_parse_batch_rejects_what_is_not_a_message_batch(obj, match):
    with pytest.raises(ValueError, match=match):
        parse_batch(obj)


def test_missing_or_odd_counts_read_as_zero():
    info = parse_batch({"id": "msgbatch_1", "processing_status": "in_progress",
                        "request_counts": {"processing": "7", "succeeded": None, "errored": True,
                                           "canceled": -3, "expired": 2.0}})
    assert (info.processing, info.succeeded, info.errored, info.canceled, info.expired) == (7, 0, 0, 0, 2)


# -- status mapping --------------------------------------------------------------------------


@pytest.mark.parametrize("obj,cancel_requested,expected", [
    (batch("in_progress", processing=5), False, JobStatus.IN_PROGRESS),
    # we asked to cancel, Anthropic hasn't flipped yet
    (batch("in_progress", processing=5), True, JobStatus.CANCELLING),
    # cancelled in the Anthropic console
    (batch("in_progress", processing=5, cancel_initiated_at=CREATED), False, JobStatus.CANCELLING),
    (batch("canceling", processing=5, cancel_initiated_at=CREATED), False, JobStatus.CANCELLING),
    (batch("canceling", processing=5, cancel_initiated_at=CREATED), True, JobStatus.CANCELLING),
    # ended without a cancel: expired requests make it an expired batch, errored ones don't
    (batch("ended", succeeded=5), False, JobStatus.COMPLETED),
    (batch("ended", succeeded=3, errored=2), False, JobStatus.COMPLETED),
    (batch("ended", errored=5), False, JobStatus.COMPLETED),
    (batch("ended", succeeded=3, expired=2), False, JobStatus.EXPIRED),
    (batch("ended", succeeded=2, errored=1, expired=2), False, JobStatus.EXPIRED),
    (batch("ended", expired=5), False, JobStatus.EXPIRED),
    # ended after a cancel: cancelled, whatever the counts say
    (batch("ended", succeeded=3, canceled=2, cancel_initiated_at=CREATED), False, JobStatus.CANCELLED),
    (batch("ended", succeeded=5, cancel_initiated_at=CREATED), False, JobStatus.CANCELLED),
    (batch("ended", succeeded=5), True, JobStatus.CANCELLED),
    (batch("ended", succeeded=2, canceled=1, expired=2, cancel_initiated_at=CREATED), False,
     JobStatus.CANCELLED),
    # canceled requests without a cancel timestamp still mean someone cancelled
    (batch("ended", succeeded=3, canceled=2), False, JobStatus.CANCELLED),
])
def test_status_mapping(obj, cancel_requested, expected):
    assert batch_to_poll_result(obj, total=5, cancel_requested=cancel_requested).status is expected


def test_counts_include_requests_that_were_never_sent():
    # 7 input lines, 2 untranslatable, 5 sent: counts are frozen until the end ...
    running = batch_to_poll_result(batch("in_progress", processing=5), total=7, not_sent=2)
    assert running.request_counts == RequestCounts(total=7, completed=0, failed=2)
    # ... then succeeded -> completed, everything else -> failed
    ended = batch_to_poll_result(batch("ended", succeeded=2, errored=1, canceled=0, expired=2),
                                 total=7, not_sent=2)
    assert ended.request_counts == RequestCounts(total=7, completed=2, failed=5)
    assert "msgbatch_013Zva2CMHLNnXjNJJKqJ2EF" in ended.detail


def test_total_never_below_what_anthropic_counts():
    r = batch_to_poll_result(batch("in_progress", processing=9), total=0)
    assert r.request_counts.total == 9
