"""The I/O half of the Bedrock adapter: boto3 clients for the Bedrock control plane and S3. Every
boto3 call blocks, so each runs in a worker thread (boto3 clients are thread-safe). Errors become
ProviderErrors (auth, missing bucket, throttling …). Translation lives in translate.py.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from batchgate_server.providers.base import DeploymentRequests, ProviderError
from batchgate_server.providers.http_spans import failure_outcome, status_outcome
from batchgate_server.providers.params import float_param, param_or_env
from batchgate_server.providers.staged import aiter_lines

log = logging.getLogger(__name__)

T = TypeVar("T")

# setting -> (aliases accepted in litellm_params, environment fallbacks)
SETTINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "aws_region_name": (("aws_region_name",), ("AWS_REGION_NAME", "AWS_REGION", "AWS_DEFAULT_REGION")),
    "s3_bucket_name": (("s3_bucket_name",), ("AWS_S3_BUCKET_NAME", "AWS_S3_BUCKET")),
    "aws_batch_role_arn": (("aws_batch_role_arn",), ("AWS_BATCH_ROLE_ARN",)),
}
REQUIRED = ("aws_region_name", "s3_bucket_name", "aws_batch_role_arn")
MULTIPART_CHUNK = 8 * 1024 * 1024
DELETE_BATCH = 1000  # keys per S3 DeleteObjects call (its limit)

AUTH_CODES = {"AccessDeniedException", "AccessDenied", "UnrecognizedClientException", "InvalidClientTokenId",
              "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "ExpiredTokenException",
              "InvalidToken", "IncompleteSignature", "MissingAuthenticationToken", "AllAccessDisabled"}
RETRYABLE_CODES = {"ThrottlingException", "Throttling", "TooManyRequestsException", "SlowDown",
                   "ServiceQuotaExceededException", "InternalServerException", "InternalError",
                   "ServiceUnavailable", "ServiceUnavailableException", "RequestTimeout", "RequestTimeoutException"}


def setting(params: Mapping[str, Any], name: str) -> Any:
    keys, envs = SETTINGS[name]
    return param_or_env(params, keys, envs)


def missing_setting(params: Mapping[str, Any]) -> str | None:
    return next((name for name in REQUIRED if not setting(params, name)), None)


@dataclass(frozen=True)
class BedrockConfig:
    region: str
    bucket: str
    prefix: str  # key prefix inside the bucket, no slashes at either end
    role_arn: str
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    profile: str | None = None
    bedrock_endpoint: str | None = None
    s3_endpoint: str | None = None
    timeout: float = 60.0
    max_retries: int = 3
    # Whose calls these are (the job's deployment), counted in the metrics; None: not counted.
    requests: DeploymentRequests | None = field(default=None, compare=False)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], requests: DeploymentRequests | None = None) -> "BedrockConfig":
        missing = missing_setting(params)
        if missing:
            raise ProviderError(f"the Bedrock deployment has no {missing} (litellm_params.{missing} or "
                                f"${SETTINGS[missing][1][0]})", code="provider_not_configured")
        bucket_setting = str(setting(params, "s3_bucket_name")).removeprefix("s3://").strip("/")
        bucket, _, sub = bucket_setting.partition("/")
        prefix = "/".join(p for p in (sub, str(params.get("s3_path_prefix", "batchgate")).strip("/")) if p)
        return cls(region=str(setting(params, "aws_region_name")), bucket=bucket, prefix=prefix,
                   role_arn=str(setting(params, "aws_batch_role_arn")),
                   access_key_id=params.get("aws_access_key_id") or None,
                   secret_access_key=params.get("aws_secret_access_key") or None,
                   session_token=params.get("aws_session_token") or None,
                   profile=params.get("aws_profile_name") or None,
                   bedrock_endpoint=params.get("aws_bedrock_endpoint") or None,
                   s3_endpoint=params.get("s3_endpoint_url") or None,
                   timeout=float_param(params, "timeout", 60.0),
                   max_retries=max(0, int(float_param(params, "max_retries", 3))), requests=requests)

    @property
    def session_key(self) -> tuple:
        return (self.region, self.access_key_id, self.secret_access_key, self.session_token, self.profile)


def client_error(err: BaseException, what: str, *, bucket: str = "") -> ProviderError:
    """A botocore/boto3 failure as a ProviderError."""
    from botocore import exceptions as bexc

    if isinstance(err, ProviderError):
        return err
    if isinstance(err, bexc.ClientError):
        error = err.response.get("Error") or {}
        code = str(error.get("Code") or "")
        message = str(error.get("Message") or err)
        status = int((err.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
        where = f"{what}: {code or 'HTTP ' + str(status)}: {message}"
        if code in AUTH_CODES or status in (401, 403):
            return ProviderError(f"{where} (check the deployment's AWS credentials and the permissions of "
                                 "aws_batch_role_arn)", code="provider_auth")
        if code == "NoSuchBucket":
            return ProviderError(f"S3 bucket {bucket!r} does not exist (s3_bucket_name); {where}",
                                 code="provider_bucket_not_found")
        if code in ("NoSuchKey", "NotFound") or (status == 404 and code != "ResourceNotFoundException"):
            return ProviderError(where, code="provider_result_missing")
        if code == "ResourceNotFoundException":
            return ProviderError(where, code="provider_not_found")
        if code in RETRYABLE_CODES or status >= 500 or status == 429:
            return ProviderError(where, code="provider_rate_limited" if "throttl" in code.lower() or status == 429
                                 else "provider_unavailable", retryable=True)
        return ProviderError(where, code="provider_invalid_request")
    if isinstance(err, (bexc.NoCredentialsError, bexc.PartialCredentialsError, bexc.ProfileNotFound)):
        return ProviderError(f"{what}: no usable AWS credentials ({err}); set aws_access_key_id / "
                             "aws_secret_access_key or the usual AWS environment", code="provider_auth")
    if isinstance(err, (bexc.EndpointConnectionError, bexc.ConnectTimeoutError, bexc.ReadTimeoutError,
                        bexc.ConnectionClosedError)):
        return ProviderError(f"{what}: network error: {err}", code="provider_unreachable", retryable=True)
    if isinstance(err, bexc.ParamValidationError):
        return ProviderError(f"{what}: {err}", code="provider_invalid_request")
    if isinstance(err, bexc.BotoCoreError):
        return ProviderError(f"{what}: {type(err).__name__}: {err}", code="provider_error", retryable=True)
    return ProviderError(f"{what}: {type(err).__name__}: {err}", code="provider_error", retryable=True)


def count_calls(client: Any, requests: DeploymentRequests) -> None:
    """Count every HTTP attempt of a boto3 client against `requests`, through botocore's events:
    botocore retries inside the call (and boto3's S3 transfers run on threads of their own), so
    its events are the one place that sees each attempt. The outcomes are the executor's codes."""
    def before_send(request: Any, **_: Any) -> None:
        context = request.context
        previous = context.get("batchgate_outcome")
        if previous is not None:  # a later attempt of the same call: botocore retried it
            requests.retried(previous)
            if previous == "http_429":
                requests.rate_limited(time.monotonic() - context["batchgate_ended"])
        requests.sent()

    def response_received(response_dict: Any, exception: Any, context: dict, **_: Any) -> None:
        if exception is not None:
            outcome = failure_outcome(exception)
        else:
            outcome = status_outcome(int(response_dict.get("status_code") or 0))
        context["batchgate_outcome"], context["batchgate_ended"] = outcome, time.monotonic()
        requests.answered(outcome)

    client.meta.events.register("before-send", before_send)
    client.meta.events.register("response-received", response_received)


class BedrockClient:
    def __init__(self) -> None:
        self._sessions: dict[tuple, Any] = {}
        self._clients: dict[tuple, Any] = {}
        self._lock = threading.Lock()  # boto3 sessions are not thread-safe to create clients from

    def _client(self, cfg: BedrockConfig, service: str) -> Any:
        import boto3
        from botocore.config import Config

        endpoint = cfg.bedrock_endpoint if service == "bedrock" else cfg.s3_endpoint
        counted = cfg.requests
        # A client per deployment: its event handlers count its calls against that deployment.
        key = (service, endpoint, cfg.timeout, cfg.max_retries, counted.deployment_id if counted else "") \
            + cfg.session_key
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                session = self._sessions.get(cfg.session_key)
                if session is None:
                    session = boto3.session.Session(
                        aws_access_key_id=cfg.access_key_id, aws_secret_access_key=cfg.secret_access_key,
                        aws_session_token=cfg.session_token, region_name=cfg.region, profile_name=cfg.profile)
                    self._sessions[cfg.session_key] = session
                config = Config(connect_timeout=min(cfg.timeout, 10.0), read_timeout=cfg.timeout,
                                retries={"mode": "standard", "total_max_attempts": cfg.max_retries + 1})
                client = session.client(service, region_name=cfg.region, endpoint_url=endpoint, config=config)
                if counted is not None:
                    count_calls(client, counted)
                self._clients[key] = client
            return client

    async def _call(self, what: str, fn: Callable[[], T], *, bucket: str = "") -> T:
        try:
            return await asyncio.to_thread(fn)
        except Exception as e:  # noqa: BLE001 - mapped by client_error
            raise client_error(e, what, bucket=bucket) from e

    # -- Bedrock control plane ----------------------------------------------------------
    async def create_job(self, cfg: BedrockConfig, **request: Any) -> str:
        def call() -> str:
            return self._client(cfg, "bedrock").create_model_invocation_job(**request)["jobArn"]
        return await self._call("Bedrock CreateModelInvocationJob", call)

    async def get_job(self, cfg: BedrockConfig, job_arn: str) -> dict:
        def call() -> dict:
            return self._client(cfg, "bedrock").get_model_invocation_job(jobIdentifier=job_arn)
        return await self._call(f"Bedrock GetModelInvocationJob {job_arn}", call)

    async def stop_job(self, cfg: BedrockConfig, job_arn: str) -> None:
        def call() -> None:
            self._client(cfg, "bedrock").stop_model_invocation_job(jobIdentifier=job_arn)
        await self._call(f"Bedrock StopModelInvocationJob {job_arn}", call)

    async def find_job(self, cfg: BedrockConfig, job_name: str, token: str) -> str | None:
        """The ARN of the job named `job_name` created with `token`, if any."""
        def call() -> str | None:
            paginator = self._client(cfg, "bedrock").get_paginator("list_model_invocation_jobs")
            for page in paginator.paginate(nameContains=job_name):
                for summary in page.get("invocationJobSummaries") or []:
                    if summary.get("jobName") == job_name and summary.get("clientRequestToken") in (None, token):
                        return summary["jobArn"]
            return None
        return await self._call("Bedrock ListModelInvocationJobs", call)

    # -- S3 -----------------------------------------------------------------------------
    async def upload_file(self, cfg: BedrockConfig, path: Path, key: str) -> str:
        """Upload a local file (multipart in 8 MiB parts when large); returns its s3:// URI."""
        from boto3.s3.transfer import TransferConfig

        transfer = TransferConfig(multipart_threshold=MULTIPART_CHUNK, multipart_chunksize=MULTIPART_CHUNK,
                                  max_concurrency=4, use_threads=True)

        def call() -> None:
            self._client(cfg, "s3").upload_file(str(path), cfg.bucket, key, Config=transfer,
                                                ExtraArgs={"ContentType": "application/jsonl"})
        uri = f"s3://{cfg.bucket}/{key}"
        try:
            await asyncio.to_thread(call)
        except Exception as e:  # noqa: BLE001
            from boto3.exceptions import S3UploadFailedError

            if isinstance(e, S3UploadFailedError):  # boto3 wraps the ClientError in a message
                text = str(e)
                if "NoSuchBucket" in text:
                    raise ProviderError(f"S3 bucket {cfg.bucket!r} does not exist (s3_bucket_name); upload of "
                                        f"{uri} failed: {text}", code="provider_bucket_not_found") from e
                if any(code in text for code in AUTH_CODES) or "403" in text:
                    raise ProviderError(f"S3 denied the upload of {uri}: {text} (check the deployment's AWS "
                                        "credentials)", code="provider_auth") from e
                raise ProviderError(f"S3 upload of {uri} failed: {text}", code="provider_unavailable",
                                    retryable=True) from e
            raise client_error(e, f"S3 upload of {uri}", bucket=cfg.bucket) from e
        return uri

    async def list_keys(self, cfg: BedrockConfig, bucket: str, prefix: str) -> list[str]:
        def call() -> list[str]:
            keys: list[str] = []
            paginator = self._client(cfg, "s3").get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                keys.extend(obj["Key"] for obj in page.get("Contents") or [])
            return keys
        return await self._call(f"S3 list s3://{bucket}/{prefix}", call, bucket=bucket)

    async def list_objects(self, cfg: BedrockConfig, bucket: str, prefix: str, after: str,
                           limit: int) -> list[tuple[str, float]]:
        """(key, unix time of the last write) of up to `limit` objects under `prefix` whose keys
        sort after `after`, in key order."""
        def call() -> list[tuple[str, float]]:
            paginator = self._client(cfg, "s3").get_paginator("list_objects_v2")
            pages = paginator.paginate(Bucket=bucket, Prefix=prefix, StartAfter=after,
                                       PaginationConfig={"MaxItems": limit})
            return [(obj["Key"], obj["LastModified"].timestamp()) for page in pages
                    for obj in page.get("Contents") or []]
        return await self._call(f"S3 list s3://{bucket}/{prefix}", call, bucket=bucket)

    async def delete_keys(self, cfg: BedrockConfig, bucket: str, keys: list[str]) -> None:
        """Delete these objects, 1,000 per DeleteObjects call; one already gone is no error."""
        def call() -> None:
            s3 = self._client(cfg, "s3")
            for start in range(0, len(keys), DELETE_BATCH):
                answer = s3.delete_objects(Bucket=bucket, Delete={
                    "Objects": [{"Key": k} for k in keys[start:start + DELETE_BATCH]], "Quiet": True})
                failed = answer.get("Errors") or []
                if failed:
                    first = failed[0]
                    raise ProviderError(f"S3 could not delete {len(failed)} object(s) of s3://{bucket}, first "
                                        f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}",
                                        code="provider_unavailable", retryable=True)
        await self._call(f"S3 delete from s3://{bucket}", call, bucket=bucket)

    async def read_object(self, cfg: BedrockConfig, bucket: str, key: str) -> bytes:
        def call() -> bytes:
            return self._client(cfg, "s3").get_object(Bucket=bucket, Key=key)["Body"].read()
        return await self._call(f"S3 read s3://{bucket}/{key}", call, bucket=bucket)

    async def iter_lines(self, cfg: BedrockConfig, bucket: str, key: str) -> AsyncIterator[bytes]:
        what = f"S3 read s3://{bucket}/{key}"

        def open_body() -> Any:
            return self._client(cfg, "s3").get_object(Bucket=bucket, Key=key)["Body"]
        body = await self._call(what, open_body, bucket=bucket)
        try:
            async for line in aiter_lines(body.read, body.close):
                yield line
        except ProviderError:
            raise
        except Exception as e:  # noqa: BLE001
            raise client_error(e, what, bucket=bucket) from e

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                try:
                    client.close()
                except Exception:  # noqa: BLE001 - best effort at shutdown
                    pass
            self._clients.clear()
            self._sessions.clear()
