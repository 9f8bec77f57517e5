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
=================  =====================================================================

job.state keys: ``input_file_id``, ``create_started`` (set before POST /batches, so a crash
between the provider creating the batch and us saving its id is reconciled by looking the batch up
by metadata.batchgate_batch_id instead of creating a second one) and ``provider_batch_id``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

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
from batchgate_server.providers.params import float_param, int_param

from . import mapping
from .client import ApiClient, Conn, multipart_stream

log = logging.getLogger(__name__)

OPENAI_DEFAULT_BASE = "https://api.openai.com/v1"
AZURE_DEFAULT_API_VERSION = "2024-10-21"
METADATA_KEY = "batchgate_batch_id"
LOOKUP_PAGES = 5  # pages of 100 batches searched when reconciling an interrupted create


class _OpenAIFamilyProvider(BatchProvider):
    poll_interval = 5.0
    label = "OpenAI"
    azure = False
    supported_endpoints: tuple[str, ...] = mapping.OPENAI_ENDPOINTS
    max_lines = mapping.OPENAI_MAX_LINES

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
                    backoff_base=max(0.0, float_param(p, "backoff_base", 0.5)))

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
        if line_count > self.max_lines:
            raise UnsupportedRequest(
                f"{self.label} accepts at most {self.max_lines} requests per batch; this file has "
                f"{line_count}",
                reason="TOO_MANY_REQUESTS",
                details={"limit": str(self.max_lines), "line_count": str(line_count),
                         "provider": self.name})
        problem = self._config_problem(deployment.params)
        if problem:
            raise UnsupportedRequest(problem, reason="PROVIDER_NOT_CONFIGURED", precondition=True,
                                     details={"deployment": deployment.id, "provider": self.name})

    async def submit(self, job: ProviderJob) -> None:
        st = job.state
        if st.get("provider_batch_id"):
            return
        conn = self._conn(job.deployment)
        if not st.get("input_file_id"):
            file_obj = await self._upload(conn, job)
            st["input_file_id"] = file_obj["id"]
            await job.save_state()
        if st.get("create_started"):
            found = await self._find_created(conn, job)
            if found:
                log.info("batch %s: adopting %s batch %s created before an interruption",
                         job.batch_id, self.label, found)
                st["provider_batch_id"] = found
                await job.save_state()
                return
        else:
            st["create_started"] = True
            await job.save_state()
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
        await job.save_state()

    async def poll(self, job: ProviderJob) -> PollResult:
        conn = self._conn(job.deployment)
        bid = self._batch_id(job)
        obj = await self._job_call(conn, job, "GET", f"/batches/{bid}")
        try:
            return mapping.batch_to_poll_result(obj, self.name)
        except ValueError as e:
            raise ProviderError(f"{self.label} batch {bid}: {e}", code="provider_bad_response",
                                retryable=True) from e

    async def cancel(self, job: ProviderJob) -> None:
        st = job.state
        conn = self._conn(job.deployment)
        if not st.get("provider_batch_id"):
            if not (st.get("create_started") and st.get("input_file_id")):
                return  # nothing was created at the provider
            found = await self._find_created(conn, job)
            if not found:
                return
            st["provider_batch_id"] = found
            await job.save_state()
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

    async def _upload(self, conn: Conn, job: ProviderJob) -> dict:
        model = job.deployment.model
        azure = self.azure

        async def lines() -> AsyncIterator[bytes]:
            async for raw in job.open_input():
                yield mapping.rewrite_line(raw, model, azure=azure)

        content_type, body = multipart_stream({"purpose": "batch"}, "file",
                                              f"{job.batch_id}.jsonl", lines)
        obj = await self._api.request_json(conn, "POST", "/files", content=body,
                                           headers={"Content-Type": content_type})
        if not isinstance(obj.get("id"), str):
            raise ProviderError(f"{self.label} POST /files answered without an id",
                                code="provider_bad_response", retryable=True)
        return obj

    async def _find_created(self, conn: Conn, job: ProviderJob) -> str | None:
        """The provider batch a previous, interrupted submit created for this job, if any."""
        after: str | None = None
        for _ in range(LOOKUP_PAGES):
            params: dict[str, Any] = {"limit": 100}
            if after:
                params["after"] = after
            page = await self._api.request_json(conn, "GET", "/batches", params=params)
            data = page.get("data") or []
            for b in data:
                if not isinstance(b, Mapping):
                    continue
                md = b.get("metadata") or {}
                if md.get(METADATA_KEY) == job.batch_id and \
                        b.get("input_file_id") == job.state.get("input_file_id"):
                    return str(b["id"])
            if not page.get("has_more") or not data:
                return None
            after = page.get("last_id") or data[-1].get("id")
        return None


class OpenAIBatchProvider(_OpenAIFamilyProvider):
    name = "openai"
    label = "OpenAI"


class AzureBatchProvider(_OpenAIFamilyProvider):
    name = "azure"
    label = "Azure OpenAI"
    azure = True
    supported_endpoints = mapping.AZURE_ENDPOINTS
    max_lines = mapping.AZURE_MAX_LINES

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
