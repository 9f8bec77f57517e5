"""Shared plumbing for the adapters that stage a batch in an object store (Vertex AI via GCS,
Bedrock via S3): translate the input into a local file, read results back line by line from a
blocking SDK stream without blocking the event loop, and answer every request exactly once.

Nothing here talks to a provider; the adapters pass in their translation functions and their
readers, and subclass `StagedBatchProvider` for the staging / poll / results steps they share.
State kept in `job.state` stays small: the custom_id mapping is deterministic (see
`custom_ids.CustomIdCodec`), so `results()` rebuilds it from the input file instead of storing
one entry per remapped id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchgate_server.core.models import BatchError, RequestCounts
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
from batchgate_server.providers.custom_ids import CustomIdCodec
from batchgate_server.providers.lines import complete_lines, last_line
from batchgate_server.providers.output_lines import dumps, line_id, no_result_line

READ_CHUNK = 1024 * 1024
WRITE_FLUSH = 1024 * 1024
YIELD_EVERY = 500  # input lines between two `await asyncio.sleep(0)` in CPU-bound loops
TERMINAL = {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.EXPIRED, JobStatus.CANCELLED}


@dataclass
class InputLine:
    index: int  # 0-based line number in the batch input file
    custom_id: str
    body: Any
    provider_id: str


async def input_lines(job: ProviderJob, codec: CustomIdCodec) -> AsyncIterator[InputLine]:
    """The batch's request lines with their provider-safe ids. Input files were validated at
    upload, so every line is a JSON object with a string custom_id and a body."""
    index = 0
    async for raw in job.open_input():
        obj = json.loads(raw)
        custom_id = str(obj.get("custom_id"))
        yield InputLine(index, custom_id, obj.get("body"), codec.encode(custom_id, index))
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
                if not staged.first_error:
                    msg = getattr(err, "message", str(err))
                    param = getattr(err, "param", "")
                    staged.first_error = (f"line {line.index + 1} (custom_id {line.custom_id!r}): "
                                          f"{param + ': ' if param else ''}{msg}")
                continue
            buf += dumps(record)
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
    were never sent, else batch_cancelled / batch_expired, else (a completed job that lost a
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
    job_key: str = ""  # job.state key of the provider's job id (ARN, resource name)
    job_kind: str = ""  # "batch inference job", "batch prediction job"
    status_field: str = ""  # the job description's state field ("status", "state")
    status_map: Mapping[str, JobStatus] = {}
    expired_state = cancelled_state = cancelling_state = ""  # values of `status_field`
    end_verb = "cancelling"  # how the log line calls ending a job at the completion window
    output_noun = "record(s)"  # what the provider's output lines are called in the log
    translation_errors: tuple[type[BaseException], ...] = ()

    # -- hooks ----------------------------------------------------------------------------
    def _config(self, params: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def _codec(self) -> CustomIdCodec:
        raise NotImplementedError

    def _staging_path(self, job: ProviderJob) -> Path:
        raise NotImplementedError

    def _translator(self, job: ProviderJob) -> Callable[[InputLine], dict]:
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

    # -- shared steps ---------------------------------------------------------------------
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
            await self._upload(cfg, job, staged.path, base)
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

    async def poll(self, job: ProviderJob) -> PollResult:
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
        cfg = self._config(job.deployment.params)
        info = await self._get_job(cfg, job, job_id)
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
            await self._end_job(cfg, job, job_id)
        return PollResult(status, counts, detail=raw)

    async def results(self, job: ProviderJob) -> AsyncIterator[ResultLine]:
        st = job.state
        codec = self._codec()
        tracker = ResultTracker(await index_input(job, codec))
        outcome = "cancelled" if job.cancel_requested.is_set() else "completed"
        job_id = st.get(self.job_key)
        if job_id:
            cfg = self._config(job.deployment.params)
            info = await self._get_job(cfg, job, job_id)
            state = info.get(self.status_field)
            if state == self.expired_state or (state == self.cancelled_state and st.get("expire_sent")):
                outcome = "expired"
            elif state in (self.cancelled_state, self.cancelling_state):
                outcome = "cancelled"
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
