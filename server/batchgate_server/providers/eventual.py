"""Living with eventually consistent providers: a job just created may be missing from the
listing for a while, and a GET may answer 404 for it.

Two provider-neutral pieces, both driven by Deployment.params:

=======================  ==============================================================
create_lookup_patience   seconds a create we lost the answer of (a crash, a network
                         failure after sending) is looked for before creating again,
                         counted from the end of that create call (or of its
                         timeout, when it got no answer); default 30
not_found_grace          seconds after a job was created during which a 404 for it is
                         taken as "not visible yet" (retried) instead of "gone"; default 60
=======================  ==============================================================

`look_until` repeats a lookup until it finds something or a deadline passes (always at least
once), so an interrupted create is adopted rather than duplicated when the listing lags.
`create_call` wraps the create call itself: when the provider answers it with an error, the time
is saved (``create_ended_at``): the job, if the provider made one, exists by then.
`not_found_is_transient` turns a 404 on a job created within the grace period into a retryable
ProviderError; after it, the caller fails the batch as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from batchgate_server.providers.base import ProviderError, ProviderJob
from batchgate_server.providers.params import float_param

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_LOOKUP_PATIENCE = 30.0
DEFAULT_NOT_FOUND_GRACE = 60.0
MIN_LOOKUP_INTERVAL = 0.1
MAX_LOOKUP_INTERVAL = 5.0
NOT_VISIBLE_RETRY_AFTER = 1.0  # seconds the tracker waits before polling a not-yet-visible job
# ProviderError codes of calls that got no answer: the provider may still be making the job.
UNANSWERED_CODES = frozenset({"provider_unreachable"})


@dataclass(frozen=True)
class Consistency:
    """How long to wait for a provider's eventual consistency (see the module docstring)."""

    lookup_patience: float = DEFAULT_LOOKUP_PATIENCE
    not_found_grace: float = DEFAULT_NOT_FOUND_GRACE

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Consistency:
        return cls(lookup_patience=max(0.0, float_param(params, "create_lookup_patience",
                                                        DEFAULT_LOOKUP_PATIENCE)),
                   not_found_grace=max(0.0, float_param(params, "not_found_grace",
                                                        DEFAULT_NOT_FOUND_GRACE)))

    def lookup_deadline(self, create_started_at: float, call_timeout: float,
                        create_ended_at: float | None = None) -> float:
        """Wall-clock time until which a create started at `create_started_at` may still show
        up: the provider may have created it as late as the end of the call (when we saw it end
        with an error, `create_ended_at`; after a crash, the end of its timeout), and the
        listing may lag behind by up to the patience."""
        ended = create_ended_at if create_ended_at is not None else create_started_at + max(0.0, call_timeout)
        return ended + self.lookup_patience

    def lookup_interval(self) -> float:
        return min(MAX_LOOKUP_INTERVAL, max(MIN_LOOKUP_INTERVAL, self.lookup_patience / 10))

    def not_found_is_transient(self, err: ProviderError, created_at: float | None,
                               what: str) -> ProviderError | None:
        """A retryable error to raise instead of `err` (a 404 on `what`) when the job was created
        less than `not_found_grace` seconds ago; None when the 404 should stand."""
        if created_at is None:
            return None
        age = time.time() - float(created_at)
        if age >= self.not_found_grace:
            return None
        log.info("%s answered 404 %.1fs after its create; taken as not visible yet (grace %.0fs)",
                 what, age, self.not_found_grace)
        return ProviderError(f"{what} is not visible at the provider yet ({age:.1f}s after its "
                             f"create; retrying for up to {self.not_found_grace:.0f}s): {err.message}",
                             code="provider_job_not_visible", retryable=True,
                             retry_after=min(NOT_VISIBLE_RETRY_AFTER, self.not_found_grace - age))


async def look_until(find: Callable[[], Awaitable[T | None]], *, deadline: float,
                     interval: float) -> T | None:
    """`await find()` until it returns something other than None or the wall clock passes
    `deadline`; at least one call. Each call must itself be bounded (provider timeouts)."""
    while True:
        found = await find()
        if found is not None:
            return found
        remaining = deadline - time.time()
        if remaining <= 0:
            return None
        await asyncio.sleep(min(interval, remaining))


@contextlib.asynccontextmanager
async def create_call(job: ProviderJob) -> AsyncIterator[None]:
    """Around a provider's create call (after ``create_started_at`` was saved): if the provider
    answers it with an error, save ``create_ended_at`` so the lookup that follows knows the job,
    if any, exists by then. A call without an answer (network error, timeout) saves nothing:
    the provider may still be working on it."""
    try:
        yield
    except ProviderError as err:
        if err.code in UNANSWERED_CODES:
            raise
        job.state["create_ended_at"] = time.time()
        try:
            await job.save_state()
        except Exception:  # the lookup then waits out the call's timeout: slower, still correct
            log.warning("batch %s: could not save when its create call failed", job.batch_id,
                        exc_info=True)
        raise
