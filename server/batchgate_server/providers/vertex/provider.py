"""Vertex AI Gemini batch prediction adapter (BatchProvider over GCS + batchPredictionJobs).

Flow: translate each OpenAI chat line into a `{"request": GenerateContentRequest}` line (the
caller's custom_id rides in request.labels, see translate.py), upload the JSONL to
gs://<bucket>/<prefix>/<batch_id>/input.jsonl, create a batchPredictionJob writing under
.../<batch_id>/output, poll it, cancel it, and read `predictions*.jsonl` back from
outputInfo.gcsOutputDirectory. Lines that cannot be translated are never sent; they come back as
error lines. Every request gets exactly one result line.

Deployment.params (litellm_params; each setting falls back to its environment variable):

===================  ===========================================================================
vertex_project       required (VERTEXAI_PROJECT)
vertex_location      required, e.g. us-central1 or global (VERTEXAI_LOCATION)
gcs_bucket_name      required, "bucket" or "bucket/some/prefix" (GCS_BUCKET_NAME)
vertex_credentials   service-account JSON file path, or its JSON text / mapping, or "anonymous"
                     (no auth: emulators); default: application default credentials
                     (GOOGLE_APPLICATION_CREDENTIALS, gcloud, metadata server)
gcs_path_prefix      object prefix inside the bucket, default "batchgate"
vertex_api_base      REST base override (scheme://host), default https://{location}-aiplatform.googleapis.com
gcs_endpoint_url     GCS endpoint override (STORAGE_EMULATOR_HOST is honoured as well)
timeout, max_retries, backoff_base   per REST call, as for the OpenAI adapter
poll_interval        seconds between polls (read by the tracker; class default 30)
===================  ===========================================================================

job.state keys: sent / skipped (records uploaded / lines that failed translation), input_uri,
output_prefix, create_started (set before the create call: after a crash the job is found again
by its batchgate_batch_id label instead of being created twice), job_name, no_job (nothing was
translatable: no job was created), expire_sent (batchgate cancelled the job when the batch's
completion window ended; a CANCELLED job is then reported as EXPIRED), cancel_sent (the cancel
call went out; poll sends it if a cancel arrived while submit was still running).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping

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
from batchgate_server.providers.custom_ids import vertex_codec
from batchgate_server.providers.staged import (
    InputLine,
    ResultTracker,
    index_input,
    unanswered,
    write_translated,
)

from . import translate
from .client import SETTINGS, VertexClient, VertexConfig, missing_setting

log = logging.getLogger(__name__)

MAX_REQUESTS = 200_000  # Vertex AI Gemini batch prediction: requests per job
JOB_LABEL = "batchgate_batch_id"
TERMINAL = {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.EXPIRED, JobStatus.CANCELLED}


def job_label(batch_id: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "-", batch_id.lower())[:63] or "batch"


def model_resource(model: str) -> str:
    """"gemini-2.5-flash" -> "publishers/google/models/gemini-2.5-flash"; full resource names
    (projects/…/models/…, publishers/…) pass through."""
    return model if "/" in model else f"publishers/google/models/{model}"


def _translate(line: InputLine) -> dict:
    return translate.chat_to_vertex_instance(line.body, custom_id_label=line.provider_id)


class VertexBatchProvider(BatchProvider):
    name = "vertex_ai"
    poll_interval = 30.0

    def __init__(self, *, client: VertexClient | None = None) -> None:
        self._client = client or VertexClient()

    # ------------------------------------------------------------------ BatchProvider
    def check(self, endpoint: str, deployment: Deployment, line_count: int) -> None:
        if endpoint not in translate.SUPPORTED_ENDPOINTS:
            raise UnsupportedRequest(
                f"Vertex AI batch prediction supports {', '.join(translate.SUPPORTED_ENDPOINTS)} (Gemini "
                f"models) only; {endpoint} is not supported",
                reason="UNSUPPORTED_ENDPOINT",
                details={"endpoint": endpoint, "supported": ",".join(translate.SUPPORTED_ENDPOINTS)})
        missing = missing_setting(deployment.params)
        if missing:
            raise UnsupportedRequest(
                f"deployment {deployment.model_name!r} (vertex_ai) has no {missing}: set "
                f"litellm_params.{missing} or the environment variable {SETTINGS[missing][1]}",
                reason="PROVIDER_NOT_CONFIGURED", precondition=True,
                details={"setting": missing, "env": SETTINGS[missing][1], "deployment": deployment.id})
        if line_count > MAX_REQUESTS:
            raise UnsupportedRequest(
                f"Vertex AI accepts at most {MAX_REQUESTS} requests per batch prediction job; this file has "
                f"{line_count}", reason="BATCH_TOO_LARGE", precondition=True,
                details={"limit": str(MAX_REQUESTS), "line_count": str(line_count)})

    async def submit(self, job: ProviderJob) -> None:
        st = job.state
        if st.get("job_name") or st.get("no_job"):
            return
        cfg = VertexConfig.from_params(job.deployment.params)
        if not st.get("input_uri"):
            staged = await write_translated(job, vertex_codec(), job.workdir / "vertex-input.jsonl",
                                            _translate, (translate.TranslationError,))
            try:
                st["sent"], st["skipped"] = staged.sent, staged.skipped
                if staged.sent == 0:
                    log.info("batch %s: no line could be translated for Vertex AI; no job created", job.batch_id)
                    st["no_job"] = True
                    await job.save_state()
                    return
                if staged.skipped:
                    log.info("batch %s: %d line(s) cannot be sent to Vertex AI, first: %s", job.batch_id,
                             staged.skipped, staged.first_error)
                base = f"{cfg.prefix}/{job.batch_id}" if cfg.prefix else job.batch_id
                st["input_uri"] = await self._client.upload_file(cfg, staged.path, f"{base}/input.jsonl")
                st["output_prefix"] = f"gs://{cfg.bucket}/{base}/output"
            finally:
                staged.path.unlink(missing_ok=True)
            await job.save_state()
        label = job_label(job.batch_id)
        if st.get("create_started"):
            found = await self._client.find_jobs(cfg, JOB_LABEL, label)
            same_input = [j for j in found
                          if ((j.get("inputConfig") or {}).get("gcsSource") or {}).get("uris") == [st["input_uri"]]]
            if same_input or found:
                name = (same_input or found)[0].get("name")
                log.info("batch %s: adopting Vertex AI job %s created before an interruption", job.batch_id, name)
                st["job_name"] = name
                await job.save_state()
                return
        else:
            st["create_started"] = True
            await job.save_state()
        body = {
            "displayName": f"batchgate-{job.batch_id}"[:128],
            "model": model_resource(job.deployment.model),
            "inputConfig": {"instancesFormat": "jsonl", "gcsSource": {"uris": [st["input_uri"]]}},
            "outputConfig": {"predictionsFormat": "jsonl",
                             "gcsDestination": {"outputUriPrefix": st["output_prefix"]}},
            "labels": {JOB_LABEL: label},
        }
        created = await self._client.create_job(cfg, body)
        name = created.get("name")
        if not isinstance(name, str) or not name:
            raise ProviderError("Vertex AI batchPredictionJobs.create answered without a job name",
                                code="provider_bad_response", retryable=True)
        st["job_name"] = name
        await job.save_state()

    async def poll(self, job: ProviderJob) -> PollResult:
        st = job.state
        skipped = int(st.get("skipped") or 0)
        if st.get("no_job"):
            return PollResult(JobStatus.COMPLETED, RequestCounts(job.line_count, 0, skipped))
        name = st.get("job_name")
        if not name:
            if job.cancel_requested.is_set():  # cancelled before a job existed (cancel() looked)
                return PollResult(JobStatus.CANCELLED)
            raise ProviderError(f"batch {job.batch_id} has no Vertex AI job (not submitted)",
                                code="provider_job_not_found")
        cfg = VertexConfig.from_params(job.deployment.params)
        info = await self._get_job(cfg, job, name)
        state = str(info.get("state") or "")
        status = translate.JOB_STATE_TO_STATUS.get(state)
        if status is None:
            log.warning("batch %s: unknown Vertex AI job state %r; still waiting", job.batch_id, state)
            status = JobStatus.IN_PROGRESS
        stats = translate.completion_stats_to_counts(info.get("completionStats"), 0)
        counts = RequestCounts(job.line_count, stats.completed, stats.failed + skipped)
        if status is JobStatus.FAILED:
            err = info.get("error") if isinstance(info.get("error"), Mapping) else {}
            message = str(err.get("message") or "no reason given")
            return PollResult(JobStatus.FAILED, counts, errors=[BatchError(
                "provider_job_failed", f"Vertex AI batch prediction job {name} failed: {message}")], detail=state)
        if status is JobStatus.CANCELLED and st.get("expire_sent"):
            status = JobStatus.EXPIRED
        if status not in TERMINAL and job.cancel_requested.is_set() and not st.get("cancel_sent"):
            # A cancel that arrived while submit was still running: carry it out now.
            await self.cancel(job)
            status = JobStatus.CANCELLING
        elif status not in TERMINAL and not st.get("expire_sent") and time.time() > job.expires_at:
            log.info("batch %s: completion window over; cancelling Vertex AI job %s", job.batch_id, name)
            st["expire_sent"] = True
            await job.save_state()
            await self._cancel_job(cfg, job, name)
        return PollResult(status, counts, detail=state)

    async def cancel(self, job: ProviderJob) -> None:
        st = job.state
        name = st.get("job_name")
        cfg = VertexConfig.from_params(job.deployment.params)
        if not name:
            if not (st.get("create_started") and st.get("input_uri")):
                return  # nothing was created at Vertex AI
            found = await self._client.find_jobs(cfg, JOB_LABEL, job_label(job.batch_id))
            if not found:
                return
            name = st["job_name"] = found[0].get("name")
            await job.save_state()
        st["cancel_sent"] = True
        await self._cancel_job(cfg, job, name)

    async def results(self, job: ProviderJob) -> AsyncIterator[ResultLine]:
        st = job.state
        codec = vertex_codec()
        tracker = ResultTracker(await index_input(job, codec))
        outcome = "cancelled" if job.cancel_requested.is_set() else "completed"
        name = st.get("job_name")
        if name:
            cfg = VertexConfig.from_params(job.deployment.params)
            info = await self._get_job(cfg, job, name)
            state = info.get("state")
            if state == "JOB_STATE_EXPIRED" or (state == "JOB_STATE_CANCELLED" and st.get("expire_sent")):
                outcome = "expired"
            elif state in ("JOB_STATE_CANCELLED", "JOB_STATE_CANCELLING"):
                outcome = "cancelled"
            else:
                outcome = "completed"
            out_dir = (info.get("outputInfo") or {}).get("gcsOutputDirectory")
            if out_dir:
                uris = [u for u in await self._client.list_objects(cfg, out_dir)
                        if u.rsplit("/", 1)[-1].startswith("predictions") and u.endswith(".jsonl")]
                for uri in sorted(uris):
                    async for raw in self._client.iter_lines(cfg, uri):
                        line = self._prediction(job, tracker, raw, uri)
                        if line is not None:
                            yield line
            elif outcome == "completed":
                log.warning("batch %s: Vertex AI job %s ended %s without an output directory", job.batch_id,
                            name, state)
        if tracker.unknown or tracker.duplicates:
            log.warning("batch %s: ignored %d prediction line(s) of other batches and %d duplicate(s)",
                        job.batch_id, tracker.unknown, tracker.duplicates)
        async for line in unanswered(job, codec, tracker, _translate, (translate.TranslationError,),
                                     translate.translation_error_line,
                                     lambda i: translate.batch_request_output_id(job.batch_id, i),
                                     outcome, "Vertex AI"):
            yield line

    async def close(self) -> None:
        await self._client.aclose()

    # ------------------------------------------------------------------ helpers
    def _prediction(self, job: ProviderJob, tracker: ResultTracker, raw: bytes, uri: str) -> ResultLine | None:
        try:
            obj = json.loads(raw)
        except ValueError:
            log.warning("batch %s: skipping a line of %s that is not JSON", job.batch_id, uri)
            return None
        if not isinstance(obj, Mapping):
            return None
        request = obj.get("request")
        labels = request.get("labels") if isinstance(request, Mapping) else None
        label = labels.get(translate.CUSTOM_ID_LABEL_KEY) if isinstance(labels, Mapping) else None
        hit = tracker.claim(label)
        if hit is None:
            return None
        index, custom_id = hit
        return translate.vertex_prediction_to_openai(obj, decode_custom_id=lambda _label: custom_id,
                                                     request_index=index, batch_id=job.batch_id,
                                                     model=job.deployment.model)

    async def _get_job(self, cfg: VertexConfig, job: ProviderJob, name: str) -> dict:
        try:
            return await self._client.get_job(cfg, name)
        except ProviderError as e:
            if e.code == "provider_not_found":
                raise ProviderError(
                    f"Vertex AI doesn't know job {name} that batchgate created for {job.batch_id} (404): it was "
                    f"deleted, or deployment {job.deployment.id!r} now points at another project. {e.message}",
                    code="provider_job_not_found") from e
            raise

    async def _cancel_job(self, cfg: VertexConfig, job: ProviderJob, name: str) -> None:
        try:
            await self._client.cancel_job(cfg, name)
        except ProviderError as e:
            if e.code == "provider_invalid_request":  # 400 FAILED_PRECONDITION: already ended
                log.info("batch %s: Vertex AI refused to cancel %s: %s", job.batch_id, name, e.message)
                return
            raise
