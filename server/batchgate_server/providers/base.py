"""The provider seam: one small interface every batch backend implements.

The tracker is the only caller. A provider never touches the store or the API
layer; it gets a `ProviderJob` describing the batch and returns plain values.
Everything a provider needs to survive a restart goes into `job.state` and is
persisted by `await job.save_state()` (one SQLite transaction with a revision
bump), so `submit` must be idempotent: after a crash it may be called again for
a job whose state says it was already (partly) submitted. A remote provider may
list a job it just created late, or answer 404 for it for a while:
providers/eventual.py has the bounded re-lookup and the 404 grace for that.
"""

from __future__ import annotations

import abc
import asyncio
import enum
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchgate_server.domain.deployment import Deployment
from batchgate_server.domain.models import BatchError, FailureCount, RequestCounts
from batchgate_server.domain.shards import JobLimits


# A provider (or, on the executor, an upstream) that answers nothing but retryable errors
# (429/5xx/network) for this long is given up on: the batch fails, or its waiting requests do.
DEFAULT_GIVE_UP_AFTER = 6 * 3600.0


def give_up_after(deployment: Deployment) -> float:
    """litellm_params.give_up_after (seconds), else DEFAULT_GIVE_UP_AFTER."""
    try:
        return float(deployment.params.get("give_up_after", DEFAULT_GIVE_UP_AFTER))
    except (TypeError, ValueError):
        return DEFAULT_GIVE_UP_AFTER


class JobStatus(str, enum.Enum):
    """Provider-neutral status a poll reports; the tracker maps it onto BatchStatus."""

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


@dataclass
class PollResult:
    status: JobStatus
    request_counts: RequestCounts | None = None  # None: unknown, keep what we have
    errors: list[BatchError] = field(default_factory=list)  # set when status is FAILED
    detail: str = ""
    # Why requests fail so far, by error code (bounded); None: the provider does not say.
    failures: list[FailureCount] | None = None


class ResultKind(str, enum.Enum):
    OUTPUT = "output"  # goes to the batch's output file (HTTP 2xx responses)
    ERROR = "error"  # goes to the error file (non-2xx responses and non-HTTP failures)


@dataclass
class ResultLine:
    kind: ResultKind
    # One OpenAI batch output line, serialised JSON without the trailing newline:
    # {"id": "batch_req_…", "custom_id": …, "response": {"status_code", "request_id", "body"} | null,
    #  "error": {"code", "message"} | null}
    data: bytes


class SharedProgress(abc.ABC):
    """Where a provider that does the work in this process (the executor) keeps its answers so
    that another replica taking the batch over resumes them: numbered segments of whole result
    lines, each tagged with the run that wrote it. Given by the tracker when several replicas
    share the database; writes fail (LeaseLost) once this replica no longer owns the batch."""

    @abc.abstractmethod
    async def append(self, seq: int, writer: str, output: bytes, errors: bytes) -> None:
        """Store segment `seq`; a segment stored already (by anyone) raises Duplicate."""

    @abc.abstractmethod
    async def read(self) -> list[tuple[str, bytes, bytes]]:
        """Every segment in order: (writer, output lines, error lines)."""

    @abc.abstractmethod
    async def delete(self) -> None: ...


class OutputUsage(abc.ABC):
    """Counts the usage of a batch's output lines (core's UsageCounter), for a provider that
    holds each line parsed as it writes it (the executor): see BatchProvider.counted_usage."""

    @abc.abstractmethod
    def add_parsed(self, line: dict) -> None:
        """One output line, parsed."""


@dataclass
class ProviderJob:
    batch_id: str
    endpoint: str  # "/v1/chat/completions", ...
    deployment: Deployment
    line_count: int
    created_at: float
    expires_at: float  # completion window end (unix seconds)
    state: dict[str, Any]
    # Re-openable stream of the input file's lines (raw bytes, no newline), in order, read through
    # the blob store (BlobStore.lines): never a local path, the blob may live in a bucket.
    open_input: Callable[[], AsyncIterator[bytes]]
    save_state: Callable[[], Awaitable[None]]
    # A private scratch directory that survives restarts (local disk).
    workdir: Path
    # Set when the batch is being cancelled.
    cancel_requested: asyncio.Event = field(default_factory=asyncio.Event)
    # Several replicas: answers of work done here are kept there too (None: one server).
    progress: SharedProgress | None = None
    # A fresh counter of the batch's usage (its price's long-context tiers), for counted_usage.
    new_usage: Callable[[], OutputUsage] | None = None
    # The input file's line number of the job's first line (its lines follow it in the file); None when
    # they do not (a shard of a file that mixes groups): messages then name a line by its custom_id only.
    first_line: int | None = 1
    # The job's input as this provider's request_bytes wrote it (newline-terminated lines, in
    # blocks), when the split of its sharded parent kept it on this server (core/prepared_input.py);
    # None: build it from open_input. The same bytes either way.
    open_prepared: Callable[[], AsyncIterator[bytes]] | None = None


def limits_with_overrides(own: JobLimits, params: Mapping[str, Any]) -> JobLimits:
    """`own`, with max_batch_requests / max_batch_bytes / min_batch_requests from the deployment's
    params where they are positive integers."""
    def positive(key: str) -> int | None:
        try:
            value = int(params.get(key) or 0)
        except (TypeError, ValueError):
            return None
        return value if value > 0 else None

    return JobLimits(max_requests=positive("max_batch_requests") or own.max_requests,
                     max_bytes=positive("max_batch_bytes") or own.max_bytes,
                     min_requests=positive("min_batch_requests") or own.min_requests)


class ProviderError(Exception):
    """A failure talking to a provider.

    retryable=True: transient (429/5xx/network); the tracker backs off and polls again.
    retryable=False: the batch fails with `code` (e.g. "provider_auth") and `message`.
    """

    def __init__(self, message: str, *, code: str = "provider_error", retryable: bool = False,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after


class UnsupportedRequest(Exception):
    """Raised by `check` at CreateBatch: the batch cannot run on this provider (INVALID_ARGUMENT
    or FAILED_PRECONDITION with `reason`)."""

    def __init__(self, message: str, *, reason: str = "UNSUPPORTED_ENDPOINT",
                 precondition: bool = False, details: Mapping[str, str] | None = None,
                 line_errors: Sequence[BatchError] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.precondition = precondition
        self.details = dict(details or {})
        # Raised by submit: the lines at fault, each its own error after the batch's (Batch.errors, as
        # OpenAI's errors.data names a line).
        self.line_errors = list(line_errors)


class RequestEvents:
    """What a provider tells observers about the requests it sends upstream, by deployment id.
    This no-op is the default; app.py hands the registry the metrics' implementation. Hooks must
    be cheap and must not raise: they run on every request."""

    def sent(self, deployment_id: str) -> None:
        """A request (an attempt: a retry is sent again) went out."""

    def answered(self, deployment_id: str, outcome: str) -> None:
        """A sent request ended: "ok", or its error code (http_429, connection_error, …)."""

    def retried(self, deployment_id: str, code: str) -> None:
        """A failed attempt will be sent again."""

    def rate_limited(self, deployment_id: str, seconds: float) -> None:
        """A request waited `seconds` for the deployment's rpm/tpm limits or a 429's pause."""


@dataclass(frozen=True)
class DeploymentRequests:
    """The request hooks bound to one deployment (`BatchProvider.counted`). A remote provider hands
    it to its HTTP client with each call's connection settings, so every call the client sends,
    retries or waits for is counted against the deployment the job runs on."""

    events: RequestEvents
    deployment_id: str

    def sent(self) -> None:
        self.events.sent(self.deployment_id)

    def answered(self, outcome: str) -> None:
        self.events.answered(self.deployment_id, outcome)

    def retried(self, code: str) -> None:
        self.events.retried(self.deployment_id, code)

    def rate_limited(self, seconds: float) -> None:
        self.events.rate_limited(self.deployment_id, seconds)


class BatchProvider(abc.ABC):
    name: str = ""
    # Set by ProviderRegistry: where request counts go.
    requests: RequestEvents = RequestEvents()
    # Seconds between polls while a job runs (the tracker backs off on errors).
    poll_interval: float = 10.0
    # `results` reads only what this process keeps (the job's work directory), not the provider's
    # service: a batch whose deployment left the model list still gets its answers (and is
    # charged for them) when it fails.
    keeps_results_locally: bool = False

    def counted(self, deployment: Deployment) -> DeploymentRequests:
        """This provider's request hooks bound to `deployment`: what its HTTP client is given."""
        return DeploymentRequests(self.requests, deployment.id)

    def check(self, endpoint: str, deployment: Deployment, line_count: int) -> None:
        """Called at CreateBatch for every job the batch will need. Raise UnsupportedRequest for a
        job this provider can't run (endpoint, missing configuration). Sizes are not refused
        here: a batch over `limits` is split into several jobs (domain/shards.py)."""

    # What one job of this provider takes; providers set their own (see `limits`).
    job_limits: JobLimits = JobLimits()

    def limits(self, endpoint: str, deployment: Deployment) -> JobLimits:
        """What one job of this provider takes (requests and bytes after translation, and the
        minimum): `job_limits`, with the deployment's params max_batch_requests, max_batch_bytes
        and min_batch_requests taking their place where set (an account's lower quotas)."""
        return limits_with_overrides(self.job_limits, deployment.params)

    def request_size(self, endpoint: str, deployment: Deployment, line: bytes) -> int:
        """Bytes the input line `line` (raw JSONL, no newline) takes in this provider's job input
        once translated, counted the way the provider counts its byte limit."""
        return len(line) + 1

    def request_bytes(self, endpoint: str, deployment: Deployment, line: bytes) -> bytes | None:
        """The input line `line` as it goes into this provider's job input file (no newline), when
        the job's input is that file's lines one for one (then request_size is its length + 1);
        None (the default): the job's input is made otherwise. The split measures with it and keeps
        what it wrote for the submit (ProviderJob.open_prepared)."""
        return None

    def job_id(self, state: Mapping[str, Any]) -> str:
        """The provider's id of the job described by `state` (job.state), "" before submission:
        shown to operators in Batch.shards."""
        return ""

    @abc.abstractmethod
    async def submit(self, job: ProviderJob) -> None:
        """Start the job at the provider. Idempotent (see module docstring)."""

    @abc.abstractmethod
    async def poll(self, job: ProviderJob) -> PollResult:
        """Report the job's status and progress."""

    @abc.abstractmethod
    async def cancel(self, job: ProviderJob) -> None:
        """Ask the provider to stop the job; poll then reports CANCELLING/CANCELLED."""

    @abc.abstractmethod
    def results(self, job: ProviderJob) -> AsyncIterator[ResultLine]:
        """Every result line of an ended job (completed, cancelled or expired), already
        normalised to OpenAI batch output lines with the caller's original custom_ids. Also
        called for a submitted job that is failing (the provider reported it failed, or batchgate
        gave up on it): the answers the provider has are kept and charged; raise (ProviderError)
        when there is nothing to fetch, and the batch fails charged nothing."""

    def counted_usage(self, job: ProviderJob) -> OutputUsage | None:
        """The usage of every output line `results` is about to give, counted (job.new_usage) as
        each was written, or None: the tracker then sums it from the lines. Asked right before
        `results`, of an ended job."""
        return None

    async def release(self, job: ProviderJob) -> None:
        """Called once on every ending (completed, expired, failed, cancelled, also before any
        create), after the terminal state and any results are stored: stop the job a create whose
        answer was lost may have made, and delete what the job left at the provider (staged
        objects, uploaded files). Best effort and bounded; a failure is only logged, and what is
        left is the provider's own retention policy's business. (A batch failed with
        internal_error is not released: its leftovers are kept for inspection.)"""

    async def detach(self, job: ProviderJob) -> None:
        """Another replica owns the batch now: stop whatever this process does for the job
        (nothing is cancelled at the provider; the new owner resumes the job from its state)."""

    async def wait_for_change(self, job: ProviderJob, timeout: float) -> None:
        """Return when the job may have changed, or after `timeout` seconds. Remote providers
        just sleep (the tracker also wakes on cancel); the in-process executor returns as soon
        as it has progressed."""
        await asyncio.sleep(timeout)

    async def coalesce(self, job: ProviderJob, seconds: float) -> None:
        """The pause after a change before the next poll, so that a burst of progress makes one
        revision, not one per request. The in-process executor cuts it short when its run has
        ended: the outcome is all that is left to report, and waiting only delays it."""
        await asyncio.sleep(seconds)

    def probes(self, deployment: Deployment) -> bool:
        """Whether `probe` can check this deployment (never for one that needs no network)."""
        return False

    async def probe(self, deployment: Deployment) -> None:
        """One cheap authenticated call (a models list), no retries: returns when the deployment
        answers, raises ProviderError when it does not (core/deployment_health.py schedules it)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release clients (HTTP pools) at shutdown."""
