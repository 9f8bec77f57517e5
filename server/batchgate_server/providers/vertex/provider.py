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
create_lookup_patience, not_found_grace
                     see providers/eventual.py (defaults 30 s and 300 s)
staged_retention     see providers/staged.py (retention of the staged objects)
===================  ===========================================================================

At most one job per batch: Vertex AI's create takes no idempotency key, so every job carries the
batch id in its `batchgate_batch_id` label, and create_started (the wall time) is saved before the
create call. A submit that finds create_started set (a crash during the create) lists the jobs
with that label, again and again until create_lookup_patience after that create's call ended (or
would have timed out), and adopts the oldest; it creates another only when none shows up. After
such a re-create, every poll until the same deadline for the re-create lists the label again and cancels any job but ours (its output, under the batch's prefix,
goes when the batch is released).

job.state keys: sent / skipped (records uploaded / lines that failed translation), staged_prefix,
input_uri, output_prefix, create_started, create_ended_at (when Vertex AI answered that create with an
error), recreated (the last create may have a twin that the
listing did not show yet: polls look for it), twins_pending (a twin found could not be cancelled
yet: polls try again), job_name, job_seen_at (when we learned job_name: the 404 grace), no_job
(nothing was translatable: no job was created), expire_sent (batchgate cancelled the job when the
batch's completion window ended; a CANCELLED job is then reported as EXPIRED), cancel_sent (the
cancel call went out; poll sends it if a cancel arrived while submit was still running).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from batchgate_server.domain.models import RequestCounts
from batchgate_server.domain.shards import JobLimits
from batchgate_server.providers.base import (
    Deployment,
    PollResult,
    ProviderError,
    ProviderJob,
    ResultLine,
    UnsupportedRequest,
)
from batchgate_server.providers.custom_ids import CustomIdCodec, vertex_codec
from batchgate_server.providers.staged import (
    TERMINAL,
    InputLine,
    ResultTracker,
    StagedBatchProvider,
    StagedObject,
)

from . import translate
from .client import SETTINGS, VertexClient, VertexConfig, missing_setting

log = logging.getLogger(__name__)

# Vertex AI Gemini batch prediction: requests per job, and bytes of its GCS input file ("1 GB":
# decimal, the stricter reading).
MAX_REQUESTS = 200_000
MAX_INPUT_BYTES = 1_000_000_000
JOB_LABEL = "batchgate_batch_id"


def job_label(batch_id: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "-", batch_id.lower())[:63] or "batch"


def model_resource(model: str) -> str:
    """"gemini-2.5-flash" -> "publishers/google/models/gemini-2.5-flash"; full resource names
    (projects/…/models/…, publishers/…) pass through."""
    return model if "/" in model else f"publishers/google/models/{model}"


def _translate(line: InputLine) -> dict:
    return translate.chat_to_vertex_instance(line.body, custom_id_label=line.provider_id)


class VertexBatchProvider(StagedBatchProvider):
    name = "vertex_ai"
    log = log
    label = "Vertex AI"
    scheme = "gs"
    job_key = "job_name"
    job_kind = "batch prediction job"
    status_field = "state"
    status_map = translate.JOB_STATE_TO_STATUS
    expired_state, cancelled_state, cancelling_state = (
        "JOB_STATE_EXPIRED", "JOB_STATE_CANCELLED", "JOB_STATE_CANCELLING")
    end_verb = "cancelling"
    output_noun = "prediction line(s)"
    translation_errors = (translate.TranslationError,)
    _translation_error_line = staticmethod(translate.translation_error_line)
    job_limits = JobLimits(max_requests=MAX_REQUESTS, max_bytes=MAX_INPUT_BYTES)

    def __init__(self, *, client: VertexClient | None = None) -> None:
        super().__init__()
        self._client = client or VertexClient()

    # ------------------------------------------------------------------ BatchProvider
    def check(self, endpoint: str, deployment: Deployment, line_count: int) -> None:
        if endpoint not in translate.SUPPORTED_ENDPOINTS:
            raise UnsupportedRequest(
                f"Vertex AI batch prediction supports {', '.join(translate.SUPPORTED_ENDPOINTS)} (Gemini "
                f"models) only; {endpoint} is not supported",
                reason="UNSUPPORTED_ENDPOINT",
                details={"endpoint": endpoint, "supported": ",".join(translate.SUPPORTED_ENDPOINTS)})
        self._require_settings(deployment)

    async def submit(self, job: ProviderJob) -> None:
        self._live.add(job.batch_id)
        st = job.state
        if st.get("job_name") or st.get("no_job"):
            return
        cfg = self._config(job.deployment)
        if not await self._stage(job, cfg):
            return
        if st.get("create_started"):
            if await self._adopt_earlier(cfg, job):
                return
            st["recreated"] = True
        body = {
            "displayName": f"batchgate-{job.batch_id}"[:128],
            "model": model_resource(job.deployment.model),
            "inputConfig": {"instancesFormat": "jsonl", "gcsSource": {"uris": [st["input_uri"]]}},
            "outputConfig": {"predictionsFormat": "jsonl",
                             "gcsDestination": {"outputUriPrefix": st["output_prefix"]}},
            "labels": {JOB_LABEL: job_label(job.batch_id)},
        }

        async def create() -> str:
            name = (await self._client.create_job(cfg, body)).get("name")
            if not isinstance(name, str) or not name:
                raise ProviderError("Vertex AI batchPredictionJobs.create answered without a job name",
                                    code="provider_bad_response", retryable=True)
            return name

        await self._create(job, create)

    async def poll(self, job: ProviderJob) -> PollResult:
        if job.state.get("recreated") and job.state.get("job_name"):
            await self._cancel_twins(job)
        return await super().poll(job)

    async def cancel(self, job: ProviderJob) -> None:
        st = job.state
        cfg = self._config(job.deployment)
        if not st.get("job_name"):
            if not (st.get("create_started") and st.get("input_uri")):
                return  # nothing was created at Vertex AI
            if not await self._adopt_earlier(cfg, job):
                return
        st["cancel_sent"] = True
        await self._stop(cfg, job, st["job_name"])

    async def close(self) -> None:
        await self._client.aclose()

    # ------------------------------------------------------------------ StagedBatchProvider hooks
    def _config(self, deployment: Deployment) -> VertexConfig:
        return VertexConfig.from_params(deployment.params, self.counted(deployment))

    def _codec(self) -> CustomIdCodec:
        return vertex_codec()

    def _staging_path(self, job: ProviderJob) -> Path:
        return job.workdir / "vertex-input.jsonl"

    async def _list_staged(self, cfg: VertexConfig, bucket: str, prefix: str, after: str,
                           limit: int) -> list[StagedObject]:
        return [StagedObject(name, updated)
                for name, updated in await self._client.list_blobs(cfg, bucket, prefix, after, limit)]

    async def _delete_staged(self, cfg: VertexConfig, bucket: str, keys: list[str]) -> None:
        await self._client.delete_blobs(cfg, bucket, keys)

    def _line_translator(self, endpoint: str, deployment: Deployment):
        return _translate

    def _missing_setting(self, params: Mapping) -> tuple[str, str] | None:
        missing = missing_setting(params)
        return (missing, SETTINGS[missing][1]) if missing else None

    async def _upload(self, cfg: VertexConfig, job: ProviderJob, path: Path, base: str) -> None:
        job.state["input_uri"] = await self._client.upload_file(cfg, path, f"{base}/input.jsonl")
        job.state["output_prefix"] = f"gs://{cfg.bucket}/{base}/output"

    def _counts(self, job: ProviderJob, info: Mapping, skipped: int) -> RequestCounts:
        stats = translate.completion_stats_to_counts(info.get("completionStats"), 0)
        return RequestCounts(job.line_count, stats.completed, stats.failed + skipped)

    def _failure_reason(self, info: Mapping) -> str:
        err = info.get("error") if isinstance(info.get("error"), Mapping) else {}
        return str(err.get("message") or "no reason given")

    async def _read_output(self, cfg: VertexConfig, job: ProviderJob, name: str, info: Mapping,
                           tracker: ResultTracker, outcome: str) -> AsyncIterator[ResultLine]:
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
                        name, info.get("state"))

    # ------------------------------------------------------------------ helpers
    async def _labelled_jobs(self, cfg: VertexConfig, job: ProviderJob) -> list[dict]:
        """The jobs carrying the batch's label, oldest first."""
        found = await self._client.find_jobs(cfg, JOB_LABEL, job_label(job.batch_id))
        return sorted(found, key=lambda j: (str(j.get("createTime") or ""), str(j.get("name") or "")))

    async def _adopt_earlier(self, cfg: VertexConfig, job: ProviderJob) -> bool:
        """After a crash during the create: look for the job it made, for as long as the listing may
        lag; adopt the oldest found (cancelling any other). False when none shows up."""
        found = await self._look_for_created(job, cfg, lambda: self._labelled_jobs(cfg, job))
        if not found:
            return False
        name = str(found[0].get("name"))
        log.info("batch %s: adopting Vertex AI job %s created before an interruption", job.batch_id, name)
        await self._remember_job(job, name)
        await self._cancel_jobs(cfg, job, found[1:])
        return True

    async def _cancel_twins(self, job: ProviderJob) -> None:
        """Until the listing shows every job of a re-create (see _lookup_deadline), cancel any job of
        this batch but ours: a create that was in flight at a crash and that the listing showed too late."""
        st = job.state
        cfg = self._config(job.deployment)
        if time.time() > self._lookup_deadline(job, cfg) and not st.get("twins_pending"):
            st.pop("recreated", None)
            await job.save_state()
            return
        twins = [j for j in await self._labelled_jobs(cfg, job) if j.get("name") != st["job_name"]]
        pending = not await self._cancel_jobs(cfg, job, twins)
        if pending != bool(st.get("twins_pending")):
            st["twins_pending"] = pending
            await job.save_state()

    async def _cancel_jobs(self, cfg: VertexConfig, job: ProviderJob, jobs: list[dict]) -> bool:
        """Cancel these duplicates of the batch's job; False if one could not be cancelled yet."""
        done = True
        for twin in jobs:
            state = str(twin.get("state") or "")
            if self.status_map.get(state) in TERMINAL or state == self.cancelling_state:
                continue
            try:
                await self._client.cancel_job(cfg, str(twin.get("name")))
            except ProviderError as e:
                log.warning("batch %s: could not cancel duplicate Vertex AI job %s yet: %s", job.batch_id,
                            twin.get("name"), e.message)
                done = False
            else:
                log.warning("batch %s: cancelled duplicate Vertex AI job %s", job.batch_id, twin.get("name"))
        return done

    def _prediction(self, job: ProviderJob, tracker: ResultTracker, raw: bytes, uri: str) -> ResultLine | None:
        obj = self._output_object(job, raw, uri)
        if obj is None:
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

    async def _end_job(self, cfg: VertexConfig, job: ProviderJob, name: str) -> None:
        try:
            await self._client.cancel_job(cfg, name)
        except ProviderError as e:
            if e.code == "provider_invalid_request":  # 400 FAILED_PRECONDITION: already ended
                log.info("batch %s: Vertex AI refused to cancel %s: %s", job.batch_id, name, e.message)
                return
            raise
