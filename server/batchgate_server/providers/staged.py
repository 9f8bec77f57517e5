"""Shared plumbing for the adapters that stage a batch in an object store (Vertex AI via GCS,
Bedrock via S3): translate the input into a local file, read results back line by line from a
blocking SDK stream without blocking the event loop, and answer every request exactly once.

Nothing here talks to a provider; the adapters pass in their translation functions and their
readers, and subclass `StagedBatchProvider` for the staging / poll / results steps they share.
State kept in `job.state` stays small: the custom_id mapping is deterministic (see
`custom_ids.CustomIdCodec`), so `results()` rebuilds it from the input file instead of storing
one entry per remapped id.

Eventual consistency: providers/eventual.py, with its `create_lookup_patience` and
`not_found_grace` (litellm_params, seconds):
- a job we created that answers 404 is taken as not visible yet (poll reports no change, a cancel
  is retried) until `not_found_grace` after we learned its id; then the batch fails with
  provider_job_not_found.
- a submit after a crash during the create looks the job up again until `create_lookup_patience`
  after that create's call ended (or its `timeout` would have) before it creates another; a batch
  that ended before we learned its job (cancelled while a crash had lost the create's answer) has
  that job looked up and cancelled by `release()`.

Retention of staged objects (everything under <prefix>/<batch_id>/ in the bucket: the translated
input, the provider's output, a duplicate job's output):
- `release()` deletes them once the batch has ended and its results are stored (the tracker
  calls it; a batch that failed with internal_error keeps them, like its work directory).
- A sweep, at most once an hour per bucket and prefix, run by `release()`, reads up to 1,000
  objects under <prefix>/ (resuming where the last sweep stopped) and deletes those of batches
  this process is not running that are older than `staged_retention` (default 7 days, far longer
  than any batch runs): leftovers of a crash between a batch's end and its release, output a
  cancelled duplicate wrote after it, staging of batches failed with internal_error. Only keys
  shaped like ours (<prefix>/batch_…/input…|output/…) are ever deleted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchgate_server.domain.models import BatchError, RequestCounts
from batchgate_server.providers.base import (
    BatchProvider,
    Deployment,
    JobStatus,
    PollResult,
    ProviderError,
    ProviderJob,
    ResultLine,
    UnsupportedRequest,
)
from batchgate_server.providers.custom_ids import LONGEST_LINE_NO, CustomIdCodec
from batchgate_server.providers.eventual import Consistency, create_call, wall_time
from batchgate_server.providers.lines import complete_lines, last_line
from batchgate_server.providers.output_lines import dumps, line_id, no_result_line
from batchgate_server.providers.params import float_param

READ_CHUNK = 1024 * 1024
WRITE_FLUSH = 1024 * 1024
YIELD_EVERY = 500  # input lines between two `await asyncio.sleep(0)` in CPU-bound loops
TERMINAL = {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.EXPIRED, JobStatus.CANCELLED}

DEFAULT_STAGED_RETENTION = 7 * 86400.0
SWEEP_EVERY = 3600.0
SWEEP_LIMIT = 1000  # objects one sweep reads
RELEASE_LIMIT = 10_000  # objects of one batch release deletes
STAGED_KEY = re.compile(r"(batch_[A-Za-z0-9_-]+)/(?:input\.jsonl$|input/|output/)")


@dataclass(frozen=True)
class StagedObject:
    key: str  # object name inside the bucket
    updated: float  # unix time of its last write


@dataclass
class InputLine:
    index: int  # 0-based line number in the batch input file
    custom_id: str
    body: Any
    provider_id: str


def input_line(raw: bytes, index: int, codec: CustomIdCodec) -> InputLine:
    """Input line `index` (0-based) with its provider-safe id. Input files were validated at
    upload, so every line is a JSON object with a string custom_id and a body."""
    obj = json.loads(raw)
    custom_id = str(obj.get("custom_id"))
    return InputLine(index, custom_id, obj.get("body"), codec.encode(custom_id, index))


async def input_lines(job: ProviderJob, codec: CustomIdCodec) -> AsyncIterator[InputLine]:
    """The batch's request lines with their provider-safe ids."""
    index = 0
    async for raw in job.open_input():
        yield input_line(raw, index, codec)
        index += 1
        if index % YIELD_EVERY == 0:
            await asyncio.sleep(0)


@dataclass
class Staged:
    """What `write_translated` produced."""

    path: Path
    sent: int = 0  # records written to `path`
    skipped: int = 0  # lines that failed translation (they come back as error lines)
    first_error: str = ""  # "line N (custom_id …): message" of the first skipped line
    bytes: int = 0
    # The first MAX_LINE_ERRORS skipped lines, each as the error a refused job names it by.
    line_errors: list[BatchError] = field(default_factory=list)


# Skipped lines a job refused for too few records names one by one (Batch.errors stays short).
MAX_LINE_ERRORS = 10


def untranslatable(job: ProviderJob, line: InputLine, err: BaseException) -> BatchError:
    """Line `line` of `job`, which cannot be translated, as a batch error: its line in the input file
    where the job knows it (ProviderJob.first_line), its custom_id, the parameter at fault."""
    msg = getattr(err, "message", str(err))
    param = getattr(err, "param", "")
    number = job.first_line + line.index if job.first_line is not None else None
    where = f"line {number} (custom_id {line.custom_id!r})" if number is not None else f"custom_id {line.custom_id!r}"
    return BatchError("untranslatable_request", f"{where}: {param + ': ' if param else ''}{msg}", param, number)


def record_bytes(record: dict) -> bytes:
    """A translated record as a line of the staged JSONL input (without its newline)."""
    return dumps(record)


async def write_translated(job: ProviderJob, codec: CustomIdCodec, path: Path,
                           translate: Callable[[InputLine], dict],
                           errors: tuple[type[BaseException], ...]) -> Staged:
    """Translate every input line with `translate` and write the records as JSONL to `path`
    (flushed in ~1 MiB blocks, so memory stays flat). Lines whose translation raises one of
    `errors` are skipped and counted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    staged = Staged(path=path)
    buf = bytearray()
    with open(tmp, "wb") as fh:
        async for line in input_lines(job, codec):
            try:
                record = translate(line)
            except errors as err:
                staged.skipped += 1
                if len(staged.line_errors) < MAX_LINE_ERRORS:
                    staged.line_errors.append(untranslatable(job, line, err))
                    staged.first_error = staged.first_error or staged.line_errors[0].message
                continue
            buf += record_bytes(record)
            buf += b"\n"
            staged.sent += 1
            if len(buf) >= WRITE_FLUSH:
                fh.write(buf)
                staged.bytes += len(buf)
                buf.clear()
        fh.write(buf)
        staged.bytes += len(buf)
    os.replace(tmp, path)
    return staged


async def index_input(job: ProviderJob, codec: CustomIdCodec) -> dict[str, tuple[int, str]]:
    """provider id -> (line index, caller's custom_id) for every request of the batch."""
    return {line.provider_id: (line.index, line.custom_id) async for line in input_lines(job, codec)}


async def aiter_lines(read: Callable[[int], bytes], close: Callable[[], Any] | None = None,
                      chunk: int = READ_CHUNK) -> AsyncIterator[bytes]:
    """Lines (no newline, blank lines skipped) of a blocking byte stream (a boto3 StreamingBody,
    a google-cloud-storage BlobReader, …); every read runs in a worker thread."""
    pending = bytearray()
    try:
        while True:
            block = await asyncio.to_thread(read, chunk)
            if not block:
                break
            pending += block
            for line in complete_lines(pending):
                yield line
        if (line := last_line(pending)) is not None:
            yield line
    finally:
        if close is not None:
            await asyncio.to_thread(close)


UNANSWERED = {
    "cancelled": ("batch_cancelled", "the batch was cancelled before this request ran"),
    "expired": ("batch_expired", "the batch's completion window ended before this request ran"),
    "failed": ("batch_failed", "the provider's job failed before this request was answered"),
}


@dataclass
class ResultTracker:
    """Which requests have been answered while streaming provider output."""

    index: dict[str, tuple[int, str]]
    answered: set[int] = field(default_factory=set)
    unknown: int = 0
    duplicates: int = 0

    def claim(self, provider_id: Any) -> tuple[int, str] | None:
        """(line index, custom_id) for a provider id seen in the output, once; None for an id
        that is not part of this batch or was already answered."""
        hit = self.index.get(provider_id) if isinstance(provider_id, str) else None
        if hit is None:
            self.unknown += 1
            return None
        if hit[0] in self.answered:
            self.duplicates += 1
            return None
        self.answered.add(hit[0])
        return hit


async def unanswered(job: ProviderJob, codec: CustomIdCodec, tracker: ResultTracker,
                     translate: Callable[[InputLine], Any], errors: tuple[type[BaseException], ...],
                     translation_error_line: Callable[..., ResultLine], out_id: Callable[[int], str],
                     outcome: str, provider_label: str) -> AsyncIterator[ResultLine]:
    """One error line for every request without an answer: the translation error for lines that
    were never sent, else batch_cancelled / batch_expired / batch_failed, else (a completed job that lost a
    record) provider_missing_result."""
    code, message = UNANSWERED.get(outcome, (
        "provider_missing_result", f"{provider_label} returned no result for this request"))
    async for line in input_lines(job, codec):
        if line.index in tracker.answered:
            continue
        try:
            translate(line)
        except errors as err:
            yield translation_error_line(line.custom_id, err, request_index=line.index, batch_id=job.batch_id)
            continue
        yield no_result_line(out_id(line.index), line.custom_id, code, message)


# ------------------------------------------------------------------------------ the adapter skeleton

class StagedBatchProvider(BatchProvider):
    """submit staging, poll, results and the configuration check shared by the object-store
    adapters (Bedrock, Vertex AI). A subclass names its provider-specific strings and fields in
    the class attributes below and implements the hooks; creating, cancelling and reading the
    provider's job stay in the subclass.

    job.state keys used here: sent / skipped, input_uri, no_job, expire_sent, cancel_sent and
    `job_key` (the provider's job id)."""

    poll_interval = 30.0
    log: logging.Logger = logging.getLogger(__name__)  # subclasses log under their own module
    label: str = ""  # the provider's name in messages: "Bedrock", "Vertex AI"
    scheme: str = ""  # of the object store's URIs: "gs", "s3"
    job_key: str = ""  # job.state key of the provider's job id (ARN, resource name)
    job_kind: str = ""  # "batch inference job", "batch prediction job"
    status_field: str = ""  # the job description's state field ("status", "state")
    status_map: Mapping[str, JobStatus] = {}
    expired_state = cancelled_state = cancelling_state = ""  # values of `status_field`
    end_verb = "cancelling"  # how the log line calls ending a job at the completion window
    output_noun = "record(s)"  # what the provider's output lines are called in the log
    translation_errors: tuple[type[BaseException], ...] = ()

    def __init__(self) -> None:
        self._live: set[str] = set()  # batches this process runs: the sweep leaves their objects alone
        self._swept: dict[tuple[str, str], float] = {}  # (bucket, prefix) -> monotonic time of the last sweep
        self._sweep_after: dict[tuple[str, str], str] = {}  # (bucket, prefix) -> where the next sweep goes on

    # -- hooks ----------------------------------------------------------------------------
    def _config(self, deployment: Deployment) -> Any:
        """The deployment's connection settings, with its request counts (`counted`)."""
        raise NotImplementedError

    def _codec(self) -> CustomIdCodec:
        raise NotImplementedError

    def _staging_path(self, job: ProviderJob) -> Path:
        raise NotImplementedError

    def _line_translator(self, endpoint: str, deployment: Deployment) -> Callable[[InputLine], dict]:
        """InputLine -> the provider's record for a job of `endpoint` on `deployment`; raises one of
        `translation_errors` for a line that cannot be sent."""
        raise NotImplementedError

    def _translation_error_line(self, custom_id: str, error: BaseException, *, request_index: int,
                                batch_id: str) -> ResultLine:
        raise NotImplementedError

    def _missing_setting(self, params: Mapping[str, Any]) -> tuple[str, str] | None:
        """(setting, environment variable to name) of the first required setting not set."""
        raise NotImplementedError

    def _check_staged(self, job: ProviderJob, staged: Staged) -> None:
        """Raise for a staged input the provider would refuse (after the no-job case)."""

    async def _upload(self, cfg: Any, job: ProviderJob, path: Path, base: str) -> None:
        """Upload the staged input; set job.state's input_uri (and where the output goes)."""
        raise NotImplementedError

    async def _get_job(self, cfg: Any, job: ProviderJob, job_id: str) -> dict:
        raise NotImplementedError

    async def _end_job(self, cfg: Any, job: ProviderJob, job_id: str) -> None:
        """Ask the provider to stop the job (an already ended job is no error)."""
        raise NotImplementedError

    def _counts(self, job: ProviderJob, info: Mapping[str, Any], skipped: int) -> RequestCounts | None:
        raise NotImplementedError

    def _failure_reason(self, info: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def _read_output(self, cfg: Any, job: ProviderJob, job_id: str, info: Mapping[str, Any],
                     tracker: ResultTracker, outcome: str) -> AsyncIterator[ResultLine]:
        """The result lines of the job's output files (each request claimed in `tracker`)."""
        raise NotImplementedError

    async def _list_staged(self, cfg: Any, bucket: str, prefix: str, after: str,
                           limit: int) -> list[StagedObject]:
        """Up to `limit` objects under `prefix` whose names sort after `after`, in name order."""
        raise NotImplementedError

    async def _delete_staged(self, cfg: Any, bucket: str, keys: list[str]) -> None:
        """Delete these objects (one already gone is no error)."""
        raise NotImplementedError

    # -- shared steps ---------------------------------------------------------------------
    def _translator(self, job: ProviderJob) -> Callable[[InputLine], dict]:
        return self._line_translator(job.endpoint, job.deployment)

    def request_size(self, endpoint: str, deployment: Deployment, line: bytes) -> int:
        """The record as staged in the job's input file (translated, its id remapped if the provider
        cannot take the custom_id), with its newline; 0 for a line that cannot be translated (it is
        never sent: an error line here)."""
        item = input_line(line, LONGEST_LINE_NO, self._codec())
        try:
            record = self._line_translator(endpoint, deployment)(item)
        except self.translation_errors:
            return 0
        return len(record_bytes(record)) + 1

    def job_id(self, state: Mapping[str, Any]) -> str:
        return str(state.get(self.job_key) or "")

    def _require_settings(self, deployment: Deployment) -> None:
        missing = self._missing_setting(deployment.params)
        if missing:
            name, env = missing
            raise UnsupportedRequest(
                f"deployment {deployment.model_name!r} ({self.name}) has no {name}: set litellm_params.{name} "
                f"or the environment variable {env}",
                reason="PROVIDER_NOT_CONFIGURED", precondition=True,
                details={"setting": name, "env": env, "deployment": deployment.id})

    async def _stage(self, job: ProviderJob, cfg: Any) -> bool:
        """Translate and upload the input unless that was done before a restart. False when no
        line could be translated (no job is created: state no_job)."""
        st = job.state
        if st.get("input_uri"):
            return True
        staged = await write_translated(job, self._codec(), self._staging_path(job), self._translator(job),
                                        self.translation_errors)
        try:
            st["sent"], st["skipped"] = staged.sent, staged.skipped
            if staged.sent == 0:
                self.log.info("batch %s: no line could be translated for %s; no job created", job.batch_id,
                              self.label)
                st["no_job"] = True
                await job.save_state()
                return False
            self._check_staged(job, staged)
            if staged.skipped:
                self.log.info("batch %s: %d line(s) cannot be sent to %s, first: %s", job.batch_id,
                              staged.skipped, self.label, staged.first_error)
            base = f"{cfg.prefix}/{job.batch_id}" if cfg.prefix else job.batch_id
            await self._marked(job, "staged_prefix", f"{self.scheme}://{cfg.bucket}/{base}/",
                               lambda: self._upload(cfg, job, staged.path, base))
        finally:
            staged.path.unlink(missing_ok=True)
        await job.save_state()
        return True

    def _output_object(self, job: ProviderJob, raw: bytes, where: str) -> Mapping[str, Any] | None:
        """A line of the provider's output file `where` as a JSON object; None (skipped) if it
        is not one."""
        try:
            obj = json.loads(raw)
        except ValueError:
            self.log.warning("batch %s: skipping a line of %s that is not JSON", job.batch_id, where)
            return None
        return obj if isinstance(obj, Mapping) else None

    # -- eventual consistency -------------------------------------------------------------
    @staticmethod
    async def _marked(job: ProviderJob, key: str, value: Any, call: Callable[[], Awaitable[Any]], *,
                      keep_on_refusal: bool = False) -> Any:
        """Save job.state[key] = value, then `await call()`: a crash during the call leaves the mark
        (the call may have done its work). A refusal (a non-retryable error) did nothing, so the
        mark goes again unless `keep_on_refusal`."""
        job.state[key] = value
        await job.save_state()
        try:
            return await call()
        except ProviderError as e:
            if not e.retryable and not keep_on_refusal:
                job.state.pop(key, None)
                await job.save_state()
            raise

    async def _create(self, job: ProviderJob, create: Callable[[], Awaitable[str]]) -> None:
        """Run the provider's create call (`create` answers the job id) marked by create_started:
        from then on a lost answer is looked for (by a re-submit, cancel, release). A refused
        create made no job, unless an earlier create whose answer was lost may have made one."""
        job.state.pop("create_ended_at", None)  # (of an earlier create)

        async def marked_create() -> str:
            async with create_call(job):
                return await create()

        job_id = await self._marked(job, "create_started", time.time(), marked_create,
                                    keep_on_refusal=bool(job.state.get("recreated")))
        await self._remember_job(job, job_id)

    async def _remember_job(self, job: ProviderJob, job_id: str) -> None:
        """Keep the provider's id of the batch's job, and when we learned it (the 404 grace)."""
        job.state[self.job_key] = job_id
        job.state["job_seen_at"] = time.time()
        await job.save_state()

    def _may_be_lagging(self, job: ProviderJob) -> bool:
        """True while a 404 for the batch's job may be the provider not showing it yet."""
        return Consistency.from_params(job.deployment.params).within_grace(wall_time(job.state.get("job_seen_at")))

    async def _look_for_created(self, job: ProviderJob, cfg: Any, find: Callable[[], Awaitable[Any]]) -> Any:
        """`find()` (None or empty: not found) again and again for as long as the listing may miss
        the job of the create marked by create_started (see providers/eventual.py)."""
        async def found() -> Any:
            return await find() or None

        return await Consistency.from_params(job.deployment.params).look_for_create(
            found, self._lookup_deadline(job, cfg))

    def _lookup_deadline(self, job: ProviderJob, cfg: Any) -> float:
        """Until when the listing may still miss a job whose create started at create_started."""
        return Consistency.from_params(job.deployment.params).lookup_deadline(
            wall_time(job.state.get("create_started")), cfg.timeout, job.state.get("create_ended_at"))

    async def _stop(self, cfg: Any, job: ProviderJob, job_id: str) -> None:
        """`_end_job`, where a 404 in the grace period is retried (the tracker backs off)."""
        try:
            await self._end_job(cfg, job, job_id)
        except ProviderError as e:
            if e.code == "provider_not_found" and self._may_be_lagging(job):
                raise ProviderError(f"{self.label} does not show job {job_id} yet: {e.message}",
                                    code="provider_job_not_visible", retryable=True) from e
            raise

    async def poll(self, job: ProviderJob) -> PollResult:
        self._live.add(job.batch_id)
        st = job.state
        skipped = int(st.get("skipped") or 0)
        if st.get("no_job"):
            return PollResult(JobStatus.COMPLETED, RequestCounts(job.line_count, 0, skipped))
        job_id = st.get(self.job_key)
        if not job_id:
            if job.cancel_requested.is_set():  # cancelled before a job existed (cancel() looked)
                return PollResult(JobStatus.CANCELLED)
            raise ProviderError(f"batch {job.batch_id} has no {self.label} job (not submitted)",
                                code="provider_job_not_found")
        cfg = self._config(job.deployment)
        try:
            info = await self._get_job(cfg, job, job_id)
        except ProviderError as e:
            if e.code != "provider_job_not_found" or not self._may_be_lagging(job):
                raise
            self.log.info("batch %s: %s does not show job %s yet; polling again", job.batch_id, self.label,
                          job_id)
            return PollResult(JobStatus.IN_PROGRESS, detail="not visible yet")
        raw = str(info.get(self.status_field) or "")
        status = self.status_map.get(raw)
        if status is None:
            self.log.warning("batch %s: unknown %s job %s %r; still waiting", job.batch_id, self.label,
                             self.status_field, raw)
            status = JobStatus.IN_PROGRESS
        counts = self._counts(job, info, skipped)
        if status is JobStatus.FAILED:
            return PollResult(JobStatus.FAILED, counts, errors=[BatchError(
                "provider_job_failed", f"{self.label} {self.job_kind} {job_id} failed: "
                f"{self._failure_reason(info)}")], detail=raw)
        if status is JobStatus.CANCELLED and st.get("expire_sent"):
            status = JobStatus.EXPIRED
        if status not in TERMINAL and job.cancel_requested.is_set() and not st.get("cancel_sent"):
            # A cancel that arrived while submit was still running: carry it out now.
            await self.cancel(job)
            status = JobStatus.CANCELLING
        elif status not in TERMINAL and not st.get("expire_sent") and time.time() > job.expires_at:
            self.log.info("batch %s: completion window over; %s %s job %s", job.batch_id, self.end_verb,
                          self.label, job_id)
            st["expire_sent"] = True
            await job.save_state()
            await self._stop(cfg, job, job_id)
        return PollResult(status, counts, detail=raw)

    async def results(self, job: ProviderJob) -> AsyncIterator[ResultLine]:
        st = job.state
        codec = self._codec()
        tracker = ResultTracker(await index_input(job, codec))
        outcome = "cancelled" if job.cancel_requested.is_set() else "completed"
        job_id = st.get(self.job_key)
        if job_id:
            cfg = self._config(job.deployment)
            info = await self._get_job(cfg, job, job_id)
            state = info.get(self.status_field)
            if state == self.expired_state or (state == self.cancelled_state and st.get("expire_sent")):
                outcome = "expired"
            elif state in (self.cancelled_state, self.cancelling_state):
                outcome = "cancelled"
            elif self.status_map.get(state) is JobStatus.FAILED:  # partial results of a failed job
                outcome = "failed"
            else:
                outcome = "completed"
            async for line in self._read_output(cfg, job, job_id, info, tracker, outcome):
                yield line
        if tracker.unknown or tracker.duplicates:
            self.log.warning("batch %s: ignored %d %s of other batches and %d duplicate(s)", job.batch_id,
                             tracker.unknown, self.output_noun, tracker.duplicates)
        async for line in unanswered(job, codec, tracker, self._translator(job), self.translation_errors,
                                     self._translation_error_line,
                                     lambda i: line_id(job.batch_id, i), outcome, self.label):
            yield line

    # -- retention ------------------------------------------------------------------------
    def _staged_location(self, job: ProviderJob, cfg: Any) -> tuple[str, str] | None:
        """(bucket, prefix/) holding everything staged for the batch; None if nothing was."""
        uri = job.state.get("staged_prefix")
        if uri:
            bucket, _, prefix = uri.partition("://")[2].partition("/")
            return bucket, prefix
        if job.state.get("input_uri"):  # staged before staged_prefix was kept
            return cfg.bucket, (f"{cfg.prefix}/{job.batch_id}/" if cfg.prefix else f"{job.batch_id}/")
        return None

    async def release(self, job: ProviderJob) -> None:
        self._live.discard(job.batch_id)
        st = job.state
        cfg = self._config(job.deployment)
        location = self._staged_location(job, cfg)
        if location is not None:
            bucket, prefix = location
            objects = await self._list_staged(cfg, bucket, prefix, "", RELEASE_LIMIT)
            if objects:
                await self._delete_staged(cfg, bucket, [o.key for o in objects])
                self.log.info("batch %s: deleted %d staged object(s) under %s://%s/%s", job.batch_id,
                              len(objects), self.scheme, bucket, prefix)
        if st.get("create_started") and not st.get(self.job_key):
            # Ended before we learned its job (cancelled while a crash had lost a create's answer):
            # stop the job that create may have made.
            await self.cancel(job)
        if location is not None:  # (a batch that staged nothing may have no usable bucket to sweep)
            await self._sweep(cfg, job.deployment.params)

    async def _sweep(self, cfg: Any, params: Mapping[str, Any]) -> None:
        """Delete stale objects of batches not running here (see the module docstring)."""
        where = (cfg.bucket, cfg.prefix)
        now = time.monotonic()
        if now - self._swept.get(where, -math.inf) < SWEEP_EVERY:
            return
        self._swept[where] = now
        root = f"{cfg.prefix}/" if cfg.prefix else ""
        objects = await self._list_staged(cfg, cfg.bucket, root, self._sweep_after.get(where, ""), SWEEP_LIMIT)
        self._sweep_after[where] = objects[-1].key if len(objects) >= SWEEP_LIMIT else ""
        cutoff = time.time() - float_param(params, "staged_retention", DEFAULT_STAGED_RETENTION)
        stale = []
        for obj in objects:
            m = STAGED_KEY.match(obj.key, len(root))
            if m and m.group(1) not in self._live and obj.updated <= cutoff:
                stale.append(obj.key)
        if stale:
            await self._delete_staged(cfg, cfg.bucket, stale)
            self.log.info("swept %d stale staged object(s) from %s://%s/%s", len(stale), self.scheme, cfg.bucket,
                          root)
