"""AWS Bedrock batch inference adapter (BatchProvider over S3 + CreateModelInvocationJob).

Flow: translate each OpenAI line into a `{"recordId", "modelInput"}` record (Claude Messages body
for anthropic.claude models, Converse for other chat models, Titan Text Embeddings V2 for
/v1/embeddings; see translate.py), upload the JSONL to
s3://<bucket>/<prefix>/<batch_id>/input/<batch_id>.jsonl, CreateModelInvocationJob (idempotent
through clientRequestToken, derived from the batch id), poll GetModelInvocationJob (record counts
while it runs), StopModelInvocationJob on cancel, then read <output>/<jobId>/*.jsonl.out (and
manifest.json.out) back. Lines that cannot be translated are never sent and come back as error
lines; every request gets exactly one result line.

Bedrock refuses jobs under a minimum record count (100 by default) and over 50,000 records (and
input files over 1 GB): `limits()` gives them to CreateBatch, which routes a batch under the
minimum elsewhere or refuses it and splits one over the maximum into several jobs; submit
re-checks the number of records actually sent (untranslatable lines are not sent).

Deployment.params (litellm_params):

======================  ======================================================================
aws_region_name         required (AWS_REGION_NAME, AWS_REGION, AWS_DEFAULT_REGION)
s3_bucket_name          required, "bucket" or "bucket/some/prefix" (AWS_S3_BUCKET_NAME)
aws_batch_role_arn      required: the service role Bedrock assumes to read/write S3 (AWS_BATCH_ROLE_ARN)
aws_access_key_id, aws_secret_access_key, aws_session_token, aws_profile_name
                        credentials; default: boto3's usual chain (env, profile, instance role)
s3_path_prefix          key prefix inside the bucket, default "batchgate"
aws_bedrock_endpoint    Bedrock control-plane endpoint override (tests, VPC endpoints)
s3_endpoint_url         S3 endpoint override
bedrock_min_records     minimum records per job, default 100 (the Bedrock quota)
bedrock_max_records     maximum records per job, default 50,000
max_tokens              max_tokens for Claude requests that set none, default 4096
timeout, max_retries    per AWS call (botocore standard retry mode)
poll_interval           seconds between polls (read by the tracker; class default 30)
create_lookup_patience, not_found_grace
                        see providers/eventual.py (defaults 30 s and 300 s)
staged_retention        see providers/staged.py (retention of the staged objects)
======================  ======================================================================

job.state keys: sent / skipped, staged_prefix, input_uri, output_uri, create_started, create_ended_at,
job_arn,
job_seen_at, no_job, expire_sent, cancel_sent (see the Vertex adapter: the same meanings). A
re-submit after a crash is safe without a lookup: the clientRequestToken makes Bedrock answer
with the job it already created (so a crash during the create leaves one job, not two).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from pathlib import Path

from batchgate_server.domain.models import RequestCounts
from batchgate_server.domain.shards import JobLimits
from batchgate_server.providers.base import (
    Deployment,
    ProviderError,
    ProviderJob,
    ResultLine,
    UnsupportedRequest,
    limits_with_overrides,
)
from batchgate_server.providers.custom_ids import CustomIdCodec, bedrock_codec
from batchgate_server.providers.params import int_param
from batchgate_server.providers.staged import (
    InputLine,
    ResultTracker,
    Staged,
    StagedBatchProvider,
    StagedObject,
)

from . import translate
from .client import SETTINGS, BedrockClient, BedrockConfig, missing_setting

log = logging.getLogger(__name__)

DEFAULT_MIN_RECORDS = 100
DEFAULT_MAX_RECORDS = 50_000
# Bedrock batch inference quotas (defaults an account may have raised): 1 GB per input file (and
# 5 GB per job; a job here is one file). Decimal gigabytes, the stricter reading.
MAX_INPUT_FILE_BYTES = 1_000_000_000
SUPPORTED_TEXT = ("/v1/chat/completions (Anthropic Claude models via InvokeModel, other chat models via "
                  "Converse) and /v1/embeddings (Amazon Titan Text Embeddings V2 only)")


def model_id(deployment: Deployment) -> str:
    """The Bedrock modelId: LiteLLM's route prefixes (bedrock/converse/…, bedrock/invoke/…) dropped."""
    model = deployment.model
    for route in ("converse/", "invoke/"):
        model = model.removeprefix(route)
    return model


def client_request_token(batch_id: str) -> str:
    """A valid clientRequestToken ([a-zA-Z0-9](-*[a-zA-Z0-9])*) that is stable per batch."""
    token = re.sub(r"-+", "-", re.sub(r"[^a-zA-Z0-9]", "-", batch_id)).strip("-")
    return ("batchgate-" + token)[:256].rstrip("-")


def record_limits(params: Mapping) -> tuple[int, int]:
    return (max(1, int_param(params, "bedrock_min_records", DEFAULT_MIN_RECORDS)),
            max(1, int_param(params, "bedrock_max_records", DEFAULT_MAX_RECORDS)))


def _epoch(value) -> int:
    if isinstance(value, datetime):
        return int(value.timestamp())
    return int(time.time())


class BedrockBatchProvider(StagedBatchProvider):
    name = "bedrock"
    log = log
    label = "Bedrock"
    scheme = "s3"
    job_key = "job_arn"
    job_kind = "batch inference job"
    status_field = "status"
    status_map = translate.BEDROCK_STATUS_TO_STATUS
    expired_state, cancelled_state, cancelling_state = "Expired", "Stopped", "Stopping"
    end_verb = "stopping"
    output_noun = "record(s)"
    translation_errors = (translate.TranslationError,)
    _translation_error_line = staticmethod(translate.translation_error_line)
    job_limits = JobLimits(max_requests=DEFAULT_MAX_RECORDS, max_bytes=MAX_INPUT_FILE_BYTES,
                           min_requests=DEFAULT_MIN_RECORDS)

    def __init__(self, *, client: BedrockClient | None = None) -> None:
        super().__init__()
        self._client = client or BedrockClient()

    # ------------------------------------------------------------------ BatchProvider
    def check(self, endpoint: str, deployment: Deployment, line_count: int) -> None:
        mid = model_id(deployment)
        if endpoint not in translate.SUPPORTED_ENDPOINTS:
            raise UnsupportedRequest(f"Bedrock batch inference supports {SUPPORTED_TEXT}; {endpoint} is not "
                                     "supported", reason="UNSUPPORTED_ENDPOINT",
                                     details={"endpoint": endpoint,
                                              "supported": ",".join(translate.SUPPORTED_ENDPOINTS)})
        if endpoint == translate.EMBEDDINGS_ENDPOINT and not translate.is_titan_embedding_model(mid):
            raise UnsupportedRequest(f"Bedrock batch embeddings need an Amazon Titan Text Embeddings V2 model "
                                     f"(amazon.titan-embed-text-v2:0); deployment {deployment.model_name!r} runs "
                                     f"{mid!r}. Bedrock supports {SUPPORTED_TEXT}",
                                     reason="UNSUPPORTED_ENDPOINT_FOR_MODEL",
                                     details={"endpoint": endpoint, "model": mid})
        if endpoint == translate.CHAT_ENDPOINT and translate.is_titan_embedding_model(mid):
            raise UnsupportedRequest(f"{mid!r} is an embedding model; use /v1/embeddings. Bedrock supports "
                                     f"{SUPPORTED_TEXT}", reason="UNSUPPORTED_ENDPOINT_FOR_MODEL",
                                     details={"endpoint": endpoint, "model": mid})
        self._require_settings(deployment)

    def limits(self, endpoint: str, deployment: Deployment) -> JobLimits:
        """`job_limits` with bedrock_min_records / bedrock_max_records (the account's quotas), and
        the generic max_batch_requests, max_batch_bytes and min_batch_requests over those."""
        low, high = record_limits(deployment.params)
        own = JobLimits(max_requests=high, max_bytes=self.job_limits.max_bytes, min_requests=low)
        return limits_with_overrides(own, deployment.params)

    async def submit(self, job: ProviderJob) -> None:
        self._live.add(job.batch_id)
        st = job.state
        if st.get("job_arn") or st.get("no_job"):
            return
        cfg = self._config(job.deployment)
        mid = model_id(job.deployment)
        if not await self._stage(job, cfg):
            return
        hours = min(168, max(24, math.ceil((job.expires_at - job.created_at) / 3600)))
        await self._create(job, lambda: self._client.create_job(
            cfg, jobName=translate.make_job_name(job.batch_id), roleArn=cfg.role_arn,
            clientRequestToken=client_request_token(job.batch_id), modelId=mid,
            inputDataConfig={"s3InputDataConfig": {"s3Uri": st["input_uri"], "s3InputFormat": "JSONL"}},
            outputDataConfig={"s3OutputDataConfig": {"s3Uri": st["output_uri"]}},
            timeoutDurationInHours=hours, modelInvocationType=translate.invocation_type(mid, job.endpoint),
            tags=[{"key": "batchgate_batch_id", "value": job.batch_id}]))

    async def cancel(self, job: ProviderJob) -> None:
        st = job.state
        cfg = self._config(job.deployment)
        arn = st.get("job_arn")
        if not arn:
            if not (st.get("create_started") or st.get("input_uri")):
                return  # nothing was created at Bedrock
            # A create may have reached Bedrock before an interruption: look the job up by name, for
            # as long as the listing may not show it yet.
            arn = await self._look_for_created(job, cfg, lambda: self._client.find_job(
                cfg, translate.make_job_name(job.batch_id), client_request_token(job.batch_id)))
            if not arn:
                return
            await self._remember_job(job, arn)
        st["cancel_sent"] = True
        await self._stop(cfg, job, arn)

    async def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------------ StagedBatchProvider hooks
    def _config(self, deployment: Deployment) -> BedrockConfig:
        return BedrockConfig.from_params(deployment.params, self.counted(deployment))

    def _codec(self) -> CustomIdCodec:
        return bedrock_codec()

    def _staging_path(self, job: ProviderJob) -> Path:
        return job.workdir / f"{job.batch_id}.jsonl"

    async def _list_staged(self, cfg: BedrockConfig, bucket: str, prefix: str, after: str,
                           limit: int) -> list[StagedObject]:
        return [StagedObject(key, updated)
                for key, updated in await self._client.list_objects(cfg, bucket, prefix, after, limit)]

    async def _delete_staged(self, cfg: BedrockConfig, bucket: str, keys: list[str]) -> None:
        await self._client.delete_keys(cfg, bucket, keys)

    def _missing_setting(self, params: Mapping) -> tuple[str, str] | None:
        missing = missing_setting(params)
        return (missing, SETTINGS[missing][1][0]) if missing else None

    def _check_staged(self, job: ProviderJob, staged: Staged) -> None:
        # CreateBatch planned and split the batch under limits() by lines (so no job has more records
        # than the maximum); lines that cannot be translated are not sent, which may leave a job under
        # the minimum.
        low = self.limits(job.endpoint, job.deployment).min_requests
        if staged.sent < low:
            raise UnsupportedRequest(
                f"only {staged.sent} of {job.line_count} requests can be sent to Bedrock "
                f"({staged.skipped} cannot be translated, first: {staged.first_error}); Bedrock batch "
                f"inference needs at least {low} records per job", reason="BATCH_TOO_SMALL",
                precondition=True, line_errors=staged.line_errors)

    async def _upload(self, cfg: BedrockConfig, job: ProviderJob, path: Path, base: str) -> None:
        job.state["input_uri"] = await self._client.upload_file(cfg, path, f"{base}/input/{job.batch_id}.jsonl")
        job.state["output_uri"] = f"s3://{cfg.bucket}/{base}/output/"

    def _counts(self, job: ProviderJob, info: Mapping, skipped: int) -> RequestCounts | None:
        if any(k in info for k in ("successRecordCount", "errorRecordCount")):
            return RequestCounts(job.line_count, int(info.get("successRecordCount") or 0),
                                 int(info.get("errorRecordCount") or 0) + skipped)
        return None

    def _failure_reason(self, info: Mapping):
        return info.get("message") or "no reason given"

    async def _read_output(self, cfg: BedrockConfig, job: ProviderJob, arn: str, info: Mapping,
                           tracker: ResultTracker, outcome: str) -> AsyncIterator[ResultLine]:
        st = job.state
        created = _epoch(info.get("endTime") or info.get("lastModifiedTime"))
        out_uri = (((info.get("outputDataConfig") or {}).get("s3OutputDataConfig") or {}).get("s3Uri")
                   or st["output_uri"])
        bucket, _, prefix = out_uri.removeprefix("s3://").partition("/")
        job_id = arn.rsplit("/", 1)[-1]
        prefix = f"{prefix.rstrip('/')}/{job_id}/" if prefix.strip("/") else f"{job_id}/"
        keys = await self._client.list_keys(cfg, bucket, prefix)
        for key in sorted(k for k in keys if k.endswith(".jsonl.out")):
            async for raw in self._client.iter_lines(cfg, bucket, key):
                line = self._record(job, tracker, raw, key, created)
                if line is not None:
                    yield line
        manifest = next((k for k in keys if k.endswith("manifest.json.out")), None)
        if manifest is not None:
            await self._check_manifest(cfg, job, bucket, manifest, tracker)
        elif outcome == "completed":
            log.warning("batch %s: Bedrock job %s wrote no manifest.json.out", job.batch_id, arn)

    # ------------------------------------------------------------------ helpers
    def _line_translator(self, endpoint: str, deployment: Deployment):
        mid = model_id(deployment)
        embeddings = endpoint == translate.EMBEDDINGS_ENDPOINT
        max_tokens = int_param(deployment.params, "max_tokens", 4096)

        def translate_line(line: InputLine) -> dict:
            if not isinstance(line.body, Mapping):
                raise translate.TranslationError("body", "the request body must be a JSON object")
            if embeddings:
                return translate.embedding_to_bedrock_record(line.body, record_id=line.provider_id, model_id=mid)
            return translate.chat_to_bedrock_record(line.body, record_id=line.provider_id, model_id=mid,
                                                    default_max_tokens=max_tokens)

        return translate_line

    def _record(self, job: ProviderJob, tracker: ResultTracker, raw: bytes, key: str,
                created: int) -> ResultLine | None:
        record = self._output_object(job, raw, key)
        if record is None:
            return None
        hit = tracker.claim(record.get("recordId"))
        if hit is None:
            return None
        index, custom_id = hit
        return translate.bedrock_output_to_openai(record, decode_custom_id=lambda _rid: custom_id,
                                                  request_index=index, batch_id=job.batch_id,
                                                  model_id=model_id(job.deployment), endpoint=job.endpoint,
                                                  created=created)

    async def _check_manifest(self, cfg: BedrockConfig, job: ProviderJob, bucket: str, key: str,
                              tracker: ResultTracker) -> None:
        try:
            manifest = json.loads(await self._client.read_object(cfg, bucket, key))
            counts, usage = translate.parse_manifest(manifest)
        except (ValueError, TypeError, AttributeError) as e:
            log.warning("batch %s: unreadable %s: %s", job.batch_id, key, e)
            return
        if counts.completed + counts.failed != len(tracker.answered):
            log.warning("batch %s: manifest reports %d processed records, the output files hold %d",
                        job.batch_id, counts.completed + counts.failed, len(tracker.answered))
        log.info("batch %s: Bedrock manifest: %d ok, %d failed, %d input / %d output tokens", job.batch_id,
                 counts.completed, counts.failed, usage.input_tokens, usage.output_tokens)

    async def _get_job(self, cfg: BedrockConfig, job: ProviderJob, arn: str) -> dict:
        try:
            return await self._client.get_job(cfg, arn)
        except ProviderError as e:
            if e.code == "provider_not_found":
                raise ProviderError(f"Bedrock doesn't know job {arn} that batchgate created for {job.batch_id}: "
                                    f"it was deleted, or deployment {job.deployment.id!r} now points at another "
                                    f"account or region. {e.message}", code="provider_job_not_found") from e
            raise

    async def _end_job(self, cfg: BedrockConfig, job: ProviderJob, arn: str) -> None:
        try:
            await self._client.stop_job(cfg, arn)
        except ProviderError as e:
            if e.code == "provider_invalid_request":  # ValidationException/ConflictException: already ended
                log.info("batch %s: Bedrock refused to stop %s: %s", job.batch_id, arn, e.message)
                return
            raise
