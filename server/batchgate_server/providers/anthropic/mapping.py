"""Pure mapping of Anthropic MessageBatch objects onto the provider seam (no I/O, no clock).

Unit-tested in tests/unit/test_anthropic_mapping.py.

Status mapping (``batch_to_poll_result``)
-----------------------------------------

=====================  =========================================================================
processing_status      JobStatus
=====================  =========================================================================
in_progress            IN_PROGRESS, or CANCELLING once a cancel was requested (by us or at
                       Anthropic: cancel_initiated_at set) but Anthropic hasn't moved yet
canceling              CANCELLING
ended                  CANCELLED  when a cancel was initiated (cancel_initiated_at, or our own
                                  request) or any request was canceled - even if every request
                                  still finished: the caller asked to cancel, and OpenAI reports
                                  such a batch as cancelled too;
                       EXPIRED    otherwise, when any request expired. Anthropic gives a request
                                  the result ``expired`` only when the batch reached its 24 h
                                  expiry before sending it, so expired > 0 *is* "the batch
                                  expired" (OpenAI's status for a batch that ran out of its
                                  window, partial results kept). We don't compare clocks with
                                  expires_at: skew would misclassify, and the counts are
                                  Anthropic's own verdict;
                       COMPLETED  otherwise (errored requests don't change that: on OpenAI too a
                                  batch with failed lines is still completed).
=====================  =========================================================================

request_counts: Anthropic keeps succeeded/errored/canceled/expired at zero until the batch
ends (only ``processing`` is meaningful before), so progress shows as 0 until the end.
``completed`` = succeeded; ``failed`` = errored + canceled + expired + the requests batchgate
never sent because they couldn't be translated; ``total`` is the batch's input line count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batchgate_server.domain.models import RequestCounts
from batchgate_server.providers.base import JobStatus, PollResult
from batchgate_server.providers.openai_batch.mapping import iso_to_unix

PROCESSING_STATUSES = ("in_progress", "canceling", "ended")
COUNT_FIELDS = ("processing", "succeeded", "errored", "canceled", "expired")
TIMESTAMP_FIELDS = ("created_at", "expires_at", "ended_at", "cancel_initiated_at", "archived_at")


def parse_rfc3339(value: Any) -> float | None:
    """RFC 3339 / ISO 8601 string (``2024-08-20T18:37:24.100435Z``, any fraction length, any
    offset) -> unix seconds; None for null, empty or unparseable values."""
    if not isinstance(value, str) or not value.strip():
        return None
    s = value.strip()
    if s[-1] in "Zz":
        s = s[:-1] + "+00:00"
    if len(s) > 10 and s[10] in " t":
        s = s[:10] + "T" + s[11:]
    ts = iso_to_unix(s)
    return ts if ts is not None and math.isfinite(ts) else None


def _count(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(0, value)
    if isinstance(value, float) and value.is_integer():
        return max(0, int(value))
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return 0


@dataclass(frozen=True)
class BatchInfo:
    id: str
    processing_status: str
    processing: int = 0
    succeeded: int = 0
    errored: int = 0
    canceled: int = 0
    expired: int = 0
    created_at: float | None = None
    expires_at: float | None = None
    ended_at: float | None = None
    cancel_initiated_at: float | None = None
    archived_at: float | None = None
    results_url: str | None = None

    @property
    def total(self) -> int:
        return self.processing + self.succeeded + self.errored + self.canceled + self.expired


def parse_batch(obj: Any) -> BatchInfo:
    """A MessageBatch JSON object -> BatchInfo. Raises ValueError when it isn't one."""
    if not isinstance(obj, Mapping):
        raise ValueError("the answer is not a JSON object")
    bid = obj.get("id")
    if not isinstance(bid, str) or not bid:
        raise ValueError("the message batch has no id")
    status = obj.get("processing_status")
    if status not in PROCESSING_STATUSES:
        raise ValueError(f"unknown processing_status {status!r}")
    counts = obj.get("request_counts")
    counts = counts if isinstance(counts, Mapping) else {}
    url = obj.get("results_url")
    return BatchInfo(
        id=bid, processing_status=status,
        **{k: _count(counts.get(k)) for k in COUNT_FIELDS},
        **{k: parse_rfc3339(obj.get(k)) for k in TIMESTAMP_FIELDS},
        results_url=url if isinstance(url, str) and url else None,
    )


def ended_status(info: BatchInfo, *, cancel_requested: bool) -> JobStatus:
    """The terminal JobStatus of an ended batch (see the module docstring)."""
    if cancel_requested or info.cancel_initiated_at is not None or info.canceled > 0:
        return JobStatus.CANCELLED
    if info.expired > 0:
        return JobStatus.EXPIRED
    return JobStatus.COMPLETED


def batch_to_poll_result(obj: Any, *, total: int, not_sent: int = 0,
                         cancel_requested: bool = False) -> PollResult:
    """A MessageBatch JSON object -> PollResult.

    total: the batch's input line count; not_sent: lines batchgate didn't send (untranslatable),
    counted as failed; cancel_requested: batchgate asked to cancel this batch."""
    info = parse_batch(obj)
    if info.processing_status == "ended":
        status = ended_status(info, cancel_requested=cancel_requested)
    elif info.processing_status == "canceling" or cancel_requested \
            or info.cancel_initiated_at is not None:
        status = JobStatus.CANCELLING
    else:
        status = JobStatus.IN_PROGRESS
    counts = RequestCounts(total=max(total, info.total + not_sent), completed=info.succeeded,
                           failed=info.errored + info.canceled + info.expired + not_sent)
    detail = (f"Anthropic {info.id}: {info.processing_status} (processing {info.processing}, "
              f"succeeded {info.succeeded}, errored {info.errored}, canceled {info.canceled}, "
              f"expired {info.expired})")
    return PollResult(status, counts, detail=detail)
