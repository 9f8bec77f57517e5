"""Provider `openai_compatible`: batchgate runs the batch itself against an
OpenAI-compatible HTTP server (vLLM, Ollama, llama.cpp …), or the in-process
`simulated` model.

Deployment params (litellm_params): api_base, api_key, max_concurrency, rpm, tpm,
timeout (per request), max_retries (for a request's own failures), backoff_base and
backoff_cap (seconds, between retries and between probes of an upstream that is out),
give_up_after (seconds of outage before waiting requests fail), completion_window
(seconds, caps the batch's window); for transport "simulated": latency_ms, failure_rate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from batchgate_server.domain.models import RequestCounts
from batchgate_server.providers.base import (
    BatchProvider,
    Deployment,
    JobStatus,
    OutputUsage,
    PollResult,
    ProviderError,
    ProviderJob,
    ResultKind,
    ResultLine,
    UnsupportedRequest,
    give_up_after,
)
from batchgate_server.providers.executor.health import UpstreamHealth
from batchgate_server.providers.executor.progress import restore
from batchgate_server.providers.executor.rate_limit import RateLimiter
from batchgate_server.providers.executor.run import ExecutorOptions, ExecutorRun, upstream_health
from batchgate_server.providers.executor.simulated import SimulatedTransport
from batchgate_server.providers.executor.transport import HttpTransport, TransportFailure

SUPPORTED_ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/responses",
                       "/v1/moderations")
OUTCOME_STATUS = {"completed": JobStatus.COMPLETED, "expired": JobStatus.EXPIRED, "cancelled": JobStatus.CANCELLED}


def _number(params, key, cast=float):
    value = params.get(key)
    return None if value is None else cast(value)


def options_for(deployment: Deployment) -> ExecutorOptions:
    p = deployment.params
    simulated = p.get("transport") == "simulated"
    return ExecutorOptions(
        max_concurrency=_number(p, "max_concurrency", int) or (256 if simulated else 64),
        rpm=_number(p, "rpm"), tpm=_number(p, "tpm"),
        timeout=_number(p, "timeout") or 120.0,
        max_retries=_number(p, "max_retries", int) if p.get("max_retries") is not None else 5,
        backoff_base=_number(p, "backoff_base") or 0.5,
        backoff_cap=_number(p, "backoff_cap") or 30.0,
        completion_window=_number(p, "completion_window"),
        rewrite_model=None if simulated else deployment.model,
        give_up_after=give_up_after(deployment),
    )


async def _at_most(seconds: float, event: asyncio.Event | None) -> None:
    """Wait until `event` is set (none: never), for `seconds` at most."""
    if event is None:
        await asyncio.sleep(seconds)
        return
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except asyncio.TimeoutError:
        pass


class ExecutorProvider(BatchProvider):
    name = "openai_compatible"
    poll_interval = 1.0
    keeps_results_locally = True  # the answers are in the job's work directory

    def __init__(self) -> None:
        self._runs: dict[str, ExecutorRun] = {}
        self._transports: dict[str, object] = {}
        self._limiters: dict[str, RateLimiter] = {}
        self._health: dict[str, UpstreamHealth] = {}

    def check(self, endpoint: str, deployment: Deployment, line_count: int) -> None:
        if endpoint not in SUPPORTED_ENDPOINTS:
            raise UnsupportedRequest(f"the built-in executor supports {', '.join(SUPPORTED_ENDPOINTS)}")
        if deployment.params.get("transport") == "simulated":
            return
        if not deployment.params.get("api_base"):
            raise UnsupportedRequest(
                f"deployment {deployment.model_name!r} needs litellm_params.api_base (the OpenAI-compatible "
                "server to run the batch against)", reason="DEPLOYMENT_MISCONFIGURED", precondition=True)
        try:  # an api_base or api_key the client cannot send with: said now, not request by request
            HttpTransport.check(deployment.params["api_base"], deployment.params.get("api_key"))
        except ValueError as err:
            raise UnsupportedRequest(f"deployment {deployment.model_name!r}: {err}",
                                     reason="DEPLOYMENT_MISCONFIGURED", precondition=True) from None

    def probes(self, deployment: Deployment) -> bool:
        return deployment.params.get("transport") != "simulated" and bool(deployment.params.get("api_base"))

    async def probe(self, deployment: Deployment) -> None:
        try:
            status = await self._transport(deployment).probe("/v1/models")
        except TransportFailure as err:
            raise ProviderError(err.message, code=err.code, retryable=True) from None
        if status >= 400:
            raise ProviderError(f"GET /v1/models: HTTP {status}", code=f"http_{status}", retryable=True)

    def _transport(self, deployment: Deployment):
        transport = self._transports.get(deployment.id)
        if transport is None:
            p = deployment.params
            if p.get("transport") == "simulated":
                transport = SimulatedTransport(deployment.model, latency_ms=float(p.get("latency_ms", 0)),
                                               failure_rate=float(p.get("failure_rate", 0)))
            else:
                options = options_for(deployment)
                transport = HttpTransport(p["api_base"], p.get("api_key"), timeout=options.timeout,
                                          max_connections=options.max_concurrency)
            self._transports[deployment.id] = transport
        return transport

    async def _run(self, job: ProviderJob) -> ExecutorRun:
        run = self._runs.get(job.batch_id)
        if run is None:
            # First poll in this process: a new batch, or one resumed after a restart (the
            # results log tells the run which requests are already answered).
            deployment = job.deployment
            options = options_for(deployment)
            # Shared by every batch of the deployment: its rate limits and its outages.
            limiter = self._limiters.get(deployment.id)
            if limiter is None:
                limiter = self._limiters[deployment.id] = RateLimiter(options.rpm, options.tpm)
            health = self._health.get(deployment.id)
            if health is None:
                health = self._health[deployment.id] = upstream_health(deployment, options)
            # Taken over from another replica: its stored answers become this run's results log.
            flushed = await restore(job)
            # Built on a worker thread: after a restart the results log is read back whole
            # (answered ids, a torn last line), which must not stall the event loop.
            run = await asyncio.to_thread(ExecutorRun, job, self._transport(deployment), options, limiter, health,
                                          flushed, events=self.requests)
            if job.batch_id in self._runs:  # another caller got there first
                run.log.close()
                return self._runs[job.batch_id]
            self._runs[job.batch_id] = run
            saved = job.state.get("executor_outcome")
            if saved in OUTCOME_STATUS:
                run.outcome = saved  # finished before a restart: report it, send nothing
            else:
                run.start()
        return run

    async def submit(self, job: ProviderJob) -> None:
        await self._run(job)

    async def poll(self, job: ProviderJob) -> PollResult:
        run = await self._run(job)
        if run._task is not None and run._task.done() and run.outcome is None:
            error = run._task.exception()
            self._runs.pop(job.batch_id, None)
            run.log.close()
            await self._release_ad_hoc(job.deployment)
            # Raised as it is: the tracker retries its own storage errors (saving the outcome on a
            # full disk), and the next poll resumes the run from its results log; anything else
            # fails the batch.
            raise error
        counts = RequestCounts(total=job.line_count, completed=run.completed, failed=run.failed)
        if run.outcome is not None:
            status = OUTCOME_STATUS[run.outcome]
        else:
            status = JobStatus.CANCELLING if job.cancel_requested.is_set() else JobStatus.IN_PROGRESS
        return PollResult(status, counts, failures=run.failures.summary())

    async def cancel(self, job: ProviderJob) -> None:
        job.cancel_requested.set()
        await self._run(job)

    async def detach(self, job: ProviderJob) -> None:
        run = self._runs.pop(job.batch_id, None)
        if run is not None:
            await run.stop()

    async def release(self, job: ProviderJob) -> None:
        if job.progress is not None:
            await job.progress.delete()

    async def wait_for_change(self, job: ProviderJob, timeout: float) -> None:
        run = self._runs.get(job.batch_id)
        await _at_most(timeout, run.changed if run is not None else None)
        if run is not None:
            run.changed.clear()

    async def coalesce(self, job: ProviderJob, seconds: float) -> None:
        run = self._runs.get(job.batch_id)
        await _at_most(seconds, run.ended if run is not None else None)

    def counted_usage(self, job: ProviderJob) -> OutputUsage | None:
        # The run's results log counted every line it holds (recovered or written) for this job.
        run = self._runs.get(job.batch_id)
        if run is None or run.job is not job or run.outcome is None:
            return None
        return run.log.usage

    async def results(self, job: ProviderJob) -> AsyncIterator[ResultLine]:
        run = self._runs.pop(job.batch_id, None)
        if run is not None:
            await run.stop()
        await self._release_ad_hoc(job.deployment)
        for kind, path in ((ResultKind.OUTPUT, job.workdir / "output.jsonl"),
                           (ResultKind.ERROR, job.workdir / "errors.jsonl")):
            if not path.exists():
                continue
            with open(path, "rb") as fh:
                for number, raw in enumerate(fh, 1):
                    if raw.endswith(b"\n"):
                        yield ResultLine(kind, raw[:-1])
                    if number % 2000 == 0:
                        await asyncio.sleep(0)  # long files: let other work run

    async def _release_ad_hoc(self, deployment: Deployment) -> None:
        """An ad-hoc deployment's transport, limiter and health go with its last run."""
        if not deployment.ad_hoc or any(r.job.deployment.id == deployment.id for r in self._runs.values()):
            return
        self._limiters.pop(deployment.id, None)
        self._health.pop(deployment.id, None)
        transport = self._transports.pop(deployment.id, None)
        if transport is not None:
            await transport.close()

    async def close(self) -> None:
        for run in list(self._runs.values()):
            await run.stop()
        self._runs.clear()
        for transport in self._transports.values():
            await transport.close()
