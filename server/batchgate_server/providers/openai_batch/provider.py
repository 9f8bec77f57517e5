"""OpenAI and Azure OpenAI batch adapters (BatchProvider over the providers' Files + Batches APIs).

Deployment.params (LiteLLM litellm_params, secrets already resolved):

=================  =====================================================================
api_key            required (Azure: or ``azure_ad_token``, sent as a Bearer token)
api_base           OpenAI: default https://api.openai.com/v1 (a bare host gets /v1);
                   Azure: required, the resource endpoint, e.g. https://res.openai.azure.com
api_version        Azure only, default "2024-10-21"
organization       OpenAI only: OpenAI-Organization header
timeout            seconds per HTTP operation (connect capped at 10 s), default 60
max_retries        retries after the first attempt on 429/5xx/network errors, default 3
poll_interval      seconds between polls for this deployment (class default 5.0)
backoff_base       first backoff step in seconds (exponential, jittered), default 0.5
give_up_after      (the tracker's) seconds of only retryable errors before the batch fails, default 6 h
create_lookup_patience, not_found_grace   see providers/eventual.py (defaults 30 s and 300 s)
=================  =====================================================================

At most one provider batch per batch, whatever the crash
---------------------------------------------------------
job.state keys: ``upload_started``, ``upload_resumed_at``, ``input_file_id``, ``create_started_at``,
``create_ended_at``, ``provider_batch_id``, ``provider_created_at`` and ``duplicate_watch_until``.

* The input is uploaded as ``<batch id>.jsonl`` with purpose ``batch``. A submit that finds
  ``upload_started`` but no ``input_file_id`` (a crash during or right after the upload) first
  looks for that file and reuses it when its size is the full input's, deleting other copies.
* ``create_started_at`` is saved before POST /batches, whose metadata carries
  ``batchgate_batch_id``. A submit that finds it but no ``provider_batch_id`` looks the batch up by
  that metadata, again and again while the listing may still lag (``create_lookup_patience``
  after the create's answer, or after its timeout when it got none), before it ever creates again. If the lookup finds several (the
  listing lagged longer than the patience once), the oldest is adopted and the others are
  cancelled at once. If it does create again, polls keep looking for a late copy for a while
  (``duplicate_watch_until``) and cancel it as soon as it is listed.
* A 404 for the batch within ``not_found_grace`` seconds of its create is "not visible yet"
  (retried); after that it fails the batch with ``provider_job_not_found``.
* ``release()``, which the tracker calls on every ending (completed, failed, cancelled, also
  before any create), cancels the batch a create whose answer was lost may have made, and
  deletes the input file and any copy of it left by an interrupted upload at the provider
  (after an interrupted upload, no sooner than ``create_lookup_patience`` after the resumed
  submit, so that a late-listed copy is seen); output and error files stay with the
  provider's own retention.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from batchgate_server.domain.shards import JobLimits
from batchgate_server.providers.base import (
    BatchProvider,
    Deployment,
    PollResult,
    ProviderError,
    ProviderJob,
    ResultKind,
    ResultLine,
    UnsupportedRequest,
)
from batchgate_server.providers.eventual import Consistency, create_call
from batchgate_server.providers.params import float_param, int_param

from . import mapping
from .client import ApiClient, Conn, multipart_body, multipart_stream

log = logging.getLogger(__name__)

OPENAI_DEFAULT_BASE = "https://api.openai.com/v1"
AZURE_DEFAULT_API_VERSION = "2024-10-21"
METADATA_KEY = "batchgate_batch_id"
LOOKUP_PAGES = 5  # pages of 100 batches searched when reconciling an interrupted create
FILE_PAGE = 10_000  # files listed per page when looking for our input files
FILE_PAGES = 5
TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})


class _OpenAIFamilyProvider(BatchProvider):
    poll_interval = 5.0
    label = "OpenAI"
    azure = False
    supported_endpoints: tuple[str, ...] = mapping.OPENAI_ENDPOINTS
    job_limits = JobLimits(max_requests=mapping.OPENAI_MAX_LINES, max_bytes=mapping.MAX_FILE_BYTES)

    def __init__(self, *, http_client: httpx.AsyncClient | None = None,
                 poll_interval: float | None = None) -> None:
        self._api = ApiClient(http_client)
        if poll_interval is not None:
            self.poll_interval = poll_interval

    # ------------------------------------------------------------------ configuration
    def _config_problem(self, params: Mapping[str, Any]) -> str | None:
        if not params.get("api_key"):
            return f"the {self.label} deployment has no api_key"
        return None

    def _conn(self, dep: Deployment) -> Conn:
        p = dep.params
        problem = self._config_problem(p)
        if problem:
            raise ProviderError(problem, code="provider_not_configured", retryable=False)
        return Conn(label=self.label, base_url=self._base_url(p), headers=self._headers(p),
                    query=self._query(p), timeout=float_param(p, "timeout", 60.0),
                    max_retries=max(0, int_param(p, "max_retries", 3)),
                    backoff_base=max(0.0, float_param(p, "backoff_base", 0.5)),
                    requests=self.counted(dep))

    def probes(self, deployment: Deployment) -> bool:
        return self._config_problem(deployment.params) is None

    async def probe(self, deployment: Deployment) -> None:
        conn = dataclasses.replace(self._conn(deployment), max_retries=0, requests=None)
        await self._api.request_json(conn, "GET", "/models")

    def _base_url(self, p: Mapping[str, Any]) -> str:
        base = str(p.get("api_base") or OPENAI_DEFAULT_BASE).rstrip("/")
        if urlsplit(base).path in ("", "/"):
            base += "/v1"
        return base

    def _headers(self, p: Mapping[str, Any]) -> dict[str, str]:
        h = {"Authorization": f"Bearer {p['api_key']}"}
        if p.get("organization"):
            h["OpenAI-Organization"] = str(p["organization"])
        return h

    def _query(self, p: Mapping[str, Any]) -> dict[str, str]:
        return {}

    def _provider_endpoint(self, endpoint: str) -> str:
        return endpoint

    # ------------------------------------------------------------------ BatchProvider
    def check(self, endpoint: str, deployment: Deployment, line_count: int) -> None:
        if endpoint not in self.supported_endpoints:
            raise UnsupportedRequest(
                f"{self.label} batches don't support {endpoint}; supported: "
                + ", ".join(self.supported_endpoints),
                reason="UNSUPPORTED_ENDPOINT",
                details={"endpoint": endpoint, "provider": self.name})
        problem = self._config_problem(deployment.params)
        if problem:
            raise UnsupportedRequest(problem, reason="PROVIDER_NOT_CONFIGURED", precondition=True,
                                     details={"deployment": deployment.id, "provider": self.name})

    def request_size(self, endpoint: str, deployment: Deployment, line: bytes) -> int:
        """The line as uploaded in the job's input file (body.model set to the deployment's, the
        url without /v1 on Azure; custom_ids go as they are), with its newline."""
        return len(mapping.rewrite_line(line, deployment.model, azure=self.azure)) + 1

    def request_bytes(self, endpoint: str, deployment: Deployment, line: bytes) -> bytes:
        return mapping.rewrite_line(line, deployment.model, azure=self.azure)

    def job_id(self, state: Mapping[str, Any]) -> str:
        return str(state.get("provider_batch_id") or "")

    async def submit(self, job: ProviderJob) -> None:
        st = job.state
        if st.get("provider_batch_id"):
            return
        conn = self._conn(job.deployment)
        started = st.get("create_started_at") or (time.time() if st.get("create_started") else None)
        if started is not None:
            consistency = Consistency.from_params(job.deployment.params)
            deadline = consistency.lookup_deadline(float(started), conn.timeout, st.get("create_ended_at"))
            found = await consistency.look_for_create(lambda: self._adopt_created(conn, job), deadline)
            if found:
                return
            log.warning("batch %s: the %s create started at %s is not listed after %.0fs of looking; "
                        "creating the batch again (a late copy will be cancelled)", job.batch_id, self.label,
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(started))),
                        time.time() - float(started))
            st["duplicate_watch_until"] = consistency.duplicate_watch_until(deadline)
        if not st.get("input_file_id"):
            st["input_file_id"] = await self._input_file(conn, job)
            await job.save_state()
        st.pop("create_started", None)  # the flag of earlier versions: now a timestamp
        st.pop("create_ended_at", None)
        st["create_started_at"] = time.time()
        await job.save_state()
        async with create_call(job):
            batch = await self._api.request_json(
                conn, "POST", "/batches", idempotent=False,
                json_body={"input_file_id": st["input_file_id"],
                           "endpoint": self._provider_endpoint(job.endpoint),
                           "completion_window": "24h",
                           "metadata": {METADATA_KEY: job.batch_id}})
        if not isinstance(batch.get("id"), str):
            raise ProviderError(f"{self.label} POST /batches answered without an id",
                                code="provider_bad_response", retryable=True)
        st["provider_batch_id"] = batch["id"]
        st["provider_created_at"] = time.time()
        await job.save_state()

    async def poll(self, job: ProviderJob) -> PollResult:
        conn = self._conn(job.deployment)
        bid = self._batch_id(job)
        if job.state.get("duplicate_watch_until"):
            await self._cancel_late_copy(conn, job)
        obj = await self._job_call(conn, job, "GET", f"/batches/{bid}")
        try:
            result = mapping.batch_to_poll_result(obj, self.name)
        except ValueError as e:
            raise ProviderError(f"{self.label} batch {bid}: {e}", code="provider_bad_response",
                                retryable=True) from e
        return result

    async def cancel(self, job: ProviderJob) -> None:
        st = job.state
        conn = self._conn(job.deployment)
        if not st.get("provider_batch_id"):
            if not (st.get("create_started_at") or st.get("create_started")):
                return  # nothing was created at the provider
            if not await self._adopt_created(conn, job):
                return
        bid = st["provider_batch_id"]
        try:
            await self._job_call(conn, job, "POST", f"/batches/{bid}/cancel")
        except ProviderError as e:
            if e.code == "provider_invalid_request":  # already ended (409/400): poll tells how
                log.info("batch %s: cancel refused by %s: %s", job.batch_id, self.label, e.message)
                return
            raise

    async def results(self, job: ProviderJob) -> AsyncIterator[ResultLine]:
        conn = self._conn(job.deployment)
        bid = self._batch_id(job)
        try:
            info = mapping.parse_batch(await self._job_call(conn, job, "GET", f"/batches/{bid}"))
        except ValueError as e:
            raise ProviderError(f"{self.label} batch {bid}: {e}", code="provider_bad_response",
                                retryable=True) from e
        if info.output_file_id:
            try:
                async for line in self._api.stream_lines(conn, f"/files/{info.output_file_id}/content"):
                    yield ResultLine(ResultKind.OUTPUT, line)
            except ProviderError as e:
                if e.code == "provider_not_found":
                    log.warning("batch %s: %s output file %s of batch %s is gone", job.batch_id,
                                self.label, info.output_file_id, bid)
                    raise ProviderError(
                        f"the {self.label} output file of batch {job.batch_id} is gone "
                        f"(deleted, or past its retention)", code="provider_result_missing",
                        retryable=False) from e
                raise
        if info.error_file_id:
            try:
                async for line in self._api.stream_lines(conn, f"/files/{info.error_file_id}/content"):
                    yield ResultLine(ResultKind.ERROR, line)
            except ProviderError as e:
                if e.code != "provider_not_found":
                    raise
                log.warning("batch %s: error file %s not found; treating it as empty",
                            job.batch_id, info.error_file_id)

    async def release(self, job: ProviderJob) -> None:
        """Every ending (completed, failed, cancelled, also before the create): stop the provider
        batch a lost create may have made, then delete the uploaded input."""
        st = job.state
        if not st.get("provider_batch_id") and (st.get("create_started_at") or st.get("create_started")):
            await self.cancel(job)
        await self._delete_inputs(self._conn(job.deployment), job)

    async def wait_for_change(self, job: ProviderJob, timeout: float) -> None:
        interval = job.deployment.params.get("poll_interval")
        if interval is not None:
            try:
                timeout = min(timeout, float(interval))
            except (TypeError, ValueError):
                pass
        await asyncio.sleep(timeout)

    async def close(self) -> None:
        await self._api.aclose()

    # ------------------------------------------------------------------ helpers
    def _batch_id(self, job: ProviderJob) -> str:
        bid = job.state.get("provider_batch_id")
        if not bid:
            raise ProviderError(f"batch {job.batch_id} has no {self.label} batch id (not submitted)",
                                code="provider_job_not_found", retryable=False)
        return str(bid)

    async def _job_call(self, conn: Conn, job: ProviderJob, method: str, path: str) -> dict:
        try:
            return await self._api.request_json(conn, method, path)
        except ProviderError as e:
            if e.code == "provider_not_found":
                transient = Consistency.from_params(job.deployment.params).not_found_is_transient(
                    e, job.state.get("provider_created_at"), f"{self.label} batch of {job.batch_id}")
                if transient is not None:
                    raise transient from e
                # Callers see our ids only; the provider's go to the log for operators.
                log.warning("batch %s: %s answered 404 for its batch %s at %s: %s", job.batch_id,
                            self.label, job.state.get("provider_batch_id"), conn.base_url, e.message)
                raise ProviderError(
                    f"{self.label} no longer knows the batch that batchgate created for "
                    f"{job.batch_id} ({method} answered HTTP 404): it was deleted at the provider, "
                    f"or deployment {job.deployment.id!r} now points at another account/resource "
                    f"(api_base or api_key changed)",
                    code="provider_job_not_found", retryable=False) from e
            raise

    def _input_lines(self, job: ProviderJob) -> AsyncIterator[bytes]:
        model, azure = job.deployment.model, self.azure

        async def lines() -> AsyncIterator[bytes]:
            async for raw in job.open_input():
                yield mapping.rewrite_line(raw, model, azure=azure)

        return lines()

    async def _input_file(self, conn: Conn, job: ProviderJob) -> str:
        """The id of the input file at the provider: one an interrupted submit uploaded in full
        (other copies are deleted), else a fresh upload."""
        st = job.state
        if st.get("upload_started"):
            # A copy may still be missing from the listing: the end-of-batch cleanup looks again
            # once the listing has caught up (see _delete_inputs).
            st.setdefault("upload_resumed_at", time.time())
            copies = await self._uploaded_inputs(conn, job)
            if copies:
                size = 0
                async for line in self._input_lines(job):
                    size += len(line) + 1
                whole = [f for f in copies if f.get("bytes") == size]
                keep = whole[0]["id"] if whole else None
                for f in copies:
                    if f["id"] != keep:
                        await self._delete_file(conn, job, f["id"])
                if keep:
                    log.info("batch %s: reusing the input uploaded to %s before an interruption",
                             job.batch_id, self.label)
                    return keep
        else:
            st["upload_started"] = True
            await job.save_state()
        if job.open_prepared is not None:  # the split wrote it: sent as it is
            content_type, body = multipart_body({"purpose": "batch"}, "file", self._input_name(job),
                                                job.open_prepared)
        else:
            content_type, body = multipart_stream({"purpose": "batch"}, "file", self._input_name(job),
                                                  lambda: self._input_lines(job))
        obj = await self._api.request_json(conn, "POST", "/files", content=body,
                                           headers={"Content-Type": content_type})
        if not isinstance(obj.get("id"), str):
            raise ProviderError(f"{self.label} POST /files answered without an id",
                                code="provider_bad_response", retryable=True)
        return obj["id"]

    @staticmethod
    def _input_name(job: ProviderJob) -> str:
        return f"{job.batch_id}.jsonl"

    async def _uploaded_inputs(self, conn: Conn, job: ProviderJob) -> list[Mapping[str, Any]]:
        """Our input files at the provider (by name and purpose), oldest first."""
        name, found, after = self._input_name(job), [], None
        for _ in range(FILE_PAGES):
            params: dict[str, Any] = {"purpose": "batch", "limit": FILE_PAGE}
            if after:
                params["after"] = after
            page = await self._api.request_json(conn, "GET", "/files", params=params)
            data = [f for f in page.get("data") or [] if isinstance(f, Mapping) and f.get("id")]
            found += [f for f in data if f.get("filename") == name]
            if not page.get("has_more") or not data:
                break
            after = page.get("last_id") or data[-1]["id"]
        return sorted(found, key=lambda f: (f.get("created_at") or 0, f["id"]))

    async def _delete_file(self, conn: Conn, job: ProviderJob, file_id: str) -> None:
        try:
            await self._api.request_json(conn, "DELETE", f"/files/{file_id}")
        except ProviderError as e:
            if e.code != "provider_not_found":
                raise

    async def _delete_inputs(self, conn: Conn, job: ProviderJob) -> None:
        """Delete the input file and any copy an interrupted upload left (the batch has ended).
        Best effort: a failure is logged, never fails the batch."""
        ids = {job.state["input_file_id"]} if job.state.get("input_file_id") else set()
        resumed = job.state.get("upload_resumed_at")
        try:
            if resumed is not None:  # only an interrupted upload leaves copies; listed by then
                patience = Consistency.from_params(job.deployment.params).lookup_patience
                await asyncio.sleep(max(0.0, min(patience, float(resumed) + patience - time.time())))
                ids |= {f["id"] for f in await self._uploaded_inputs(conn, job)}
            for file_id in sorted(ids):
                await self._delete_file(conn, job, file_id)
        except ProviderError as e:
            log.warning("batch %s: could not delete its input file at %s: %s", job.batch_id,
                        self.label, e.message)

    async def _created_batches(self, conn: Conn, job: ProviderJob) -> list[Mapping[str, Any]]:
        """The provider batches whose metadata names this job, oldest first."""
        found, after = [], None
        for _ in range(LOOKUP_PAGES):
            params: dict[str, Any] = {"limit": 100}
            if after:
                params["after"] = after
            page = await self._api.request_json(conn, "GET", "/batches", params=params)
            data = [b for b in page.get("data") or [] if isinstance(b, Mapping) and b.get("id")]
            found += [b for b in data if (b.get("metadata") or {}).get(METADATA_KEY) == job.batch_id]
            if not page.get("has_more") or not data:
                break
            after = page.get("last_id") or data[-1]["id"]
        return sorted(found, key=lambda b: (mapping.parse_timestamp(b.get("created_at")) or 0, b["id"]))

    async def _adopt_created(self, conn: Conn, job: ProviderJob) -> str | None:
        """Adopt the provider batch an interrupted submit created for this job, if it is listed;
        cancel any further one (at most one provider batch per batch)."""
        created = await self._created_batches(conn, job)
        if not created:
            return None
        adopted, *duplicates = created
        st = job.state
        st.update(provider_batch_id=str(adopted["id"]), provider_created_at=time.time())
        if isinstance(adopted.get("input_file_id"), str):
            st["input_file_id"] = adopted["input_file_id"]
        await job.save_state()
        log.info("batch %s: adopting %s batch %s created before an interruption", job.batch_id,
                 self.label, adopted["id"])
        await self._cancel_copies(conn, job, duplicates)
        return str(adopted["id"])

    async def _cancel_late_copy(self, conn: Conn, job: ProviderJob) -> None:
        """After a repeated create, look for a late-listed copy of ours (for a while) and cancel it."""
        st = job.state
        copies = [b for b in await self._created_batches(conn, job) if b["id"] != st["provider_batch_id"]]
        await self._cancel_copies(conn, job, copies)
        if copies or time.time() > float(st["duplicate_watch_until"]):
            del st["duplicate_watch_until"]
            await job.save_state()

    async def _cancel_copies(self, conn: Conn, job: ProviderJob, copies: list[Mapping[str, Any]]) -> None:
        for dup in copies:
            if str(dup.get("status", "")).lower() in TERMINAL_STATUSES:
                continue
            log.warning("batch %s: cancelling %s batch %s, a duplicate of %s", job.batch_id,
                        self.label, dup["id"], job.state["provider_batch_id"])
            try:
                await self._api.request_json(conn, "POST", f"/batches/{dup['id']}/cancel")
            except ProviderError as e:
                if e.code not in ("provider_invalid_request", "provider_not_found"):
                    raise


class OpenAIBatchProvider(_OpenAIFamilyProvider):
    name = "openai"
    label = "OpenAI"


class AzureBatchProvider(_OpenAIFamilyProvider):
    name = "azure"
    label = "Azure OpenAI"
    azure = True
    supported_endpoints = mapping.AZURE_ENDPOINTS
    job_limits = JobLimits(max_requests=mapping.AZURE_MAX_LINES, max_bytes=mapping.MAX_FILE_BYTES)

    def _config_problem(self, params: Mapping[str, Any]) -> str | None:
        if not params.get("api_base"):
            return ("the Azure OpenAI deployment has no api_base "
                    "(e.g. https://<resource>.openai.azure.com)")
        if not (params.get("api_key") or params.get("azure_ad_token")):
            return "the Azure OpenAI deployment has no api_key (or azure_ad_token)"
        return None

    def _base_url(self, p: Mapping[str, Any]) -> str:
        base = str(p["api_base"]).rstrip("/")
        return base if base.endswith("/openai") else base + "/openai"

    def _headers(self, p: Mapping[str, Any]) -> dict[str, str]:
        if p.get("api_key"):
            return {"api-key": str(p["api_key"])}
        return {"Authorization": f"Bearer {p['azure_ad_token']}"}

    def _query(self, p: Mapping[str, Any]) -> dict[str, str]:
        return {"api-version": str(p.get("api_version") or AZURE_DEFAULT_API_VERSION)}

    def _provider_endpoint(self, endpoint: str) -> str:
        return mapping.azure_path(endpoint)
