"""Living with eventually consistent providers: a job just created may be missing from the
listing for a while, and a GET may answer 404 for it. One toolkit for every remote adapter
(OpenAI, Azure, Anthropic, Vertex AI, Bedrock), driven by Deployment.params:

=======================  ==============================================================
create_lookup_patience   seconds a create we lost the answer of (a crash, a network
                         failure after sending) is looked for before creating again,
                         counted from the end of that create call (or of its
                         timeout, when it got no answer); default 30
not_found_grace          seconds after a job was created during which a 404 for it is
                         taken as "not visible yet" (retried) instead of "gone";
                         default 300
=======================  ==============================================================

Why 300 s of grace: a 404 that ends the grace fails the batch, while a job that was only slow
to show runs on at the provider, billed, with its results lost to us. A job that really is
gone (deleted at the provider) only fails five minutes later. The patience stays short because
it is counted from the end of the create call: by then the job exists, and listings that lag
do so by seconds.

`look_until` (`Consistency.look_for_create`) repeats a lookup until it finds something or a
deadline passes (always at least once), so an interrupted create is adopted rather than
duplicated when the listing lags; `duplicate_watch_until` bounds how long polls look for a late
copy after a create had to be sent again.
`create_call` wraps the create call itself: when the provider answers it with an error, the time
is saved (``create_ended_at``): the job, if the provider made one, exists by then.
`Consistency.within_grace` says whether a 404 may still be lag; `not_found_is_transient` turns
such a 404 into a retryable ProviderError; after the grace, the caller fails the batch as before.
`wall_time` reads a time kept in job.state.
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
DEFAULT_NOT_FOUND_GRACE = 300.0
MIN_LOOKUP_INTERVAL = 0.1
MAX_LOOKUP_INTERVAL = 5.0
DUPLICATE_WATCH = 10  # after a repeated create, polls look for a late copy this many patiences more
NOT_VISIBLE_RETRY_AFTER = 1.0  # seconds the tracker waits before polling a not-yet-visible job
# ProviderError codes of calls that got no answer: the provider may still be making the job.
UNANSWERED_CODES = frozenset({"provider_unreachable"})


def wall_time(value: Any) -> float:
    """A unix time kept in job.state; 0 for a missing or old-style (boolean flag) entry."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


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

    async def look_for_create(self, find: Callable[[], Awaitable[T | None]], deadline: float) -> T | None:
        """`look_until(find)` up to `deadline` (a `lookup_deadline`), at this patience's interval."""
        return await look_until(find, deadline=deadline, interval=self.lookup_interval())

    def duplicate_watch_until(self, lookup_deadline: float) -> float:
        """After a create was sent again once the lookup up to `lookup_deadline` found nothing: until
        when polls keep looking for a late-listed copy of the lost create (to cancel it)."""
        return lookup_deadline + DUPLICATE_WATCH * self.lookup_patience

    def within_grace(self, created_at: float | None) -> bool:
        """True while a 404 for a job created (or learned of) at `created_at` may be the
        provider not showing it yet; False for a job we never created here."""
        return bool(created_at) and time.time() - float(created_at) < self.not_found_grace

    def not_found_is_transient(self, err: ProviderError, created_at: float | None,
                               what: str) -> ProviderError | None:
        """A retryable error to raise instead of `err` (a 404 on `what`) when the job was created
        less than `not_found_grace` seconds ago; None when the 404 should stand."""
        if not self.within_grace(created_at):
            return None
        age = time.time() - float(created_at)
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
