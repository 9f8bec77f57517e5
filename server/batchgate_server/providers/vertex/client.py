"""The I/O half of the Vertex AI adapter: Google credentials (google-auth), the
batchPredictionJobs REST API (httpx, bounded retries with backoff honouring Retry-After) and GCS
(google-cloud-storage, every blocking call in a worker thread). Translation lives in translate.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from batchgate_server.providers.base import DeploymentRequests, ProviderError
from batchgate_server.providers.http_spans import provider_call, retrying
from batchgate_server.providers.openai_batch.client import backoff_delay
from batchgate_server.providers.openai_batch.mapping import parse_retry_after
from batchgate_server.providers.params import float_param, param_or_env
from batchgate_server.providers.staged import aiter_lines

log = logging.getLogger(__name__)

SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
LABEL = "Vertex AI"
MAX_INLINE_RETRY_AFTER = 60.0
UPLOAD_CHUNK = 8 * 1024 * 1024  # resumable upload chunk for large inputs (multiple of 256 KiB)
ANONYMOUS = "anonymous"

# setting -> (aliases accepted in litellm_params, environment fallback)
SETTINGS: dict[str, tuple[tuple[str, ...], str]] = {
    "vertex_project": (("vertex_project", "vertex_ai_project"), "VERTEXAI_PROJECT"),
    "vertex_location": (("vertex_location", "vertex_ai_location"), "VERTEXAI_LOCATION"),
    "gcs_bucket_name": (("gcs_bucket_name",), "GCS_BUCKET_NAME"),
    "vertex_credentials": (("vertex_credentials", "vertex_ai_credentials"), "GOOGLE_APPLICATION_CREDENTIALS"),
}
REQUIRED = ("vertex_project", "vertex_location", "gcs_bucket_name")


def setting(params: Mapping[str, Any], name: str) -> Any:
    keys, env = SETTINGS[name]
    return param_or_env(params, keys, (env,))


def missing_setting(params: Mapping[str, Any]) -> str | None:
    """The first required setting that is neither in litellm_params nor in its env variable."""
    return next((name for name in REQUIRED if not setting(params, name)), None)


@dataclass(frozen=True)
class VertexConfig:
    project: str
    location: str
    bucket: str
    prefix: str  # object name prefix inside the bucket, no slashes at either end
    credentials: Any  # None (application default) | "anonymous" | path | JSON text | mapping
    api_base: str  # scheme://host, no trailing slash
    gcs_endpoint: str | None
    timeout: float = 60.0
    max_retries: int = 3
    backoff_base: float = 0.5
    # Whose calls these are (the job's deployment), counted in the metrics; None: not counted.
    requests: DeploymentRequests | None = field(default=None, compare=False)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], requests: DeploymentRequests | None = None) -> "VertexConfig":
        missing = missing_setting(params)
        if missing:
            raise ProviderError(f"the Vertex AI deployment has no {missing} (litellm_params.{missing} or "
                                f"${SETTINGS[missing][1]})", code="provider_not_configured")
        location = str(setting(params, "vertex_location"))
        bucket_setting = str(setting(params, "gcs_bucket_name")).removeprefix("gs://").strip("/")
        bucket, _, sub = bucket_setting.partition("/")
        prefix = "/".join(p for p in (sub, str(params.get("gcs_path_prefix", "batchgate")).strip("/")) if p)
        api_base = params.get("vertex_api_base")
        if not api_base:
            host = "aiplatform.googleapis.com" if location == "global" else f"{location}-aiplatform.googleapis.com"
            api_base = f"https://{host}"
        return cls(project=str(setting(params, "vertex_project")), location=location, bucket=bucket,
                   prefix=prefix, credentials=setting(params, "vertex_credentials"),
                   api_base=str(api_base).rstrip("/"),
                   gcs_endpoint=params.get("gcs_endpoint_url") or None,
                   timeout=float_param(params, "timeout", 60.0),
                   max_retries=max(0, int(float_param(params, "max_retries", 3))),
                   backoff_base=max(0.0, float_param(params, "backoff_base", 0.5)), requests=requests)

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.location}"

    def url(self, resource: str) -> str:
        """`resource` is relative to v1/ (e.g. "projects/p/locations/l/batchPredictionJobs")."""
        return f"{self.api_base}/v1/{resource}"

    @property
    def credentials_key(self) -> str:
        c = self.credentials
        return json.dumps(c, sort_keys=True) if isinstance(c, Mapping) else str(c)


# ------------------------------------------------------------------------------ credentials

def _load_credentials(spec: Any):
    """google-auth credentials for a vertex_credentials value (blocking: file reads, and for
    application default credentials possibly a metadata-server probe)."""
    import google.auth
    from google.auth.credentials import AnonymousCredentials

    if isinstance(spec, str) and spec.strip().lower() == ANONYMOUS:
        return AnonymousCredentials()
    if spec is None:
        creds, _ = google.auth.default(scopes=list(SCOPES))
        return creds
    if isinstance(spec, Mapping):
        creds, _ = google.auth.load_credentials_from_dict(dict(spec), scopes=list(SCOPES))
        return creds
    text = str(spec).strip()
    if text.startswith("{"):
        try:
            info = json.loads(text)
        except ValueError as e:
            raise ProviderError(f"vertex_credentials looks like JSON but does not parse: {e}",
                                code="provider_auth") from None
        creds, _ = google.auth.load_credentials_from_dict(info, scopes=list(SCOPES))
        return creds
    creds, _ = google.auth.load_credentials_from_file(os.path.expanduser(text), scopes=list(SCOPES))
    return creds


def auth_error(err: BaseException, cfg: VertexConfig) -> ProviderError:
    """A google-auth failure as a ProviderError."""
    from google.auth import exceptions as gexc

    where = ("application default credentials" if cfg.credentials is None
             else "vertex_credentials" if isinstance(cfg.credentials, Mapping)
             or str(cfg.credentials).strip().startswith("{") else f"vertex_credentials {cfg.credentials!r}")
    if isinstance(err, gexc.RefreshError):
        retryable = bool(getattr(err, "retryable", False))
        return ProviderError(f"Google rejected the {where}: {err}", code="provider_auth", retryable=retryable)
    if isinstance(err, gexc.TransportError):
        return ProviderError(f"could not reach Google's token endpoint for the {where}: {err}",
                             code="provider_unreachable", retryable=True)
    if isinstance(err, gexc.DefaultCredentialsError):
        return ProviderError(f"no usable Google credentials ({where}): {err}. Set vertex_credentials "
                             "(a service-account JSON file) or GOOGLE_APPLICATION_CREDENTIALS",
                             code="provider_auth")
    return ProviderError(f"Google credentials ({where}) failed: {type(err).__name__}: {err}",
                         code="provider_auth")


class _Creds:
    def __init__(self, creds: Any) -> None:
        self.creds = creds
        self.lock = asyncio.Lock()


# ------------------------------------------------------------------------------ the client

def _google_error(body: bytes) -> tuple[str, str]:
    """(message, status name) of a Google API error body {"error": {code, message, status}}."""
    text = body.decode("utf-8", "replace")
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if isinstance(obj, Mapping) and isinstance(obj.get("error"), Mapping):
        err = obj["error"]
        return str(err.get("message") or text)[:500], str(err.get("status") or "")
    return (" ".join(text.split())[:500] or "(empty body)"), ""


def _status_error(method: str, what: str, status: int, body: bytes,
                  retry_after: float | None) -> ProviderError:
    msg, name = _google_error(body)
    where = f"{LABEL} {method} {what}: HTTP {status}{' ' + name if name else ''}"
    if status in (401, 403):
        hint = ("check vertex_credentials" if status == 401 else
                "the credentials lack a permission on this project, or the API is not enabled")
        return ProviderError(f"{where}: {msg} ({hint})", code="provider_auth")
    if status == 404:
        return ProviderError(f"{where}: {msg}", code="provider_not_found")
    if status == 429:
        return ProviderError(f"{where}: {msg}", code="provider_rate_limited", retryable=True,
                             retry_after=retry_after)
    if status >= 500 or status == 408:
        return ProviderError(f"{where}: {msg}", code="provider_unavailable", retryable=True,
                             retry_after=retry_after)
    return ProviderError(f"{where}: {msg}", code="provider_invalid_request")


class VertexClient:
    def __init__(self, http_client: httpx.AsyncClient | None = None) -> None:
        self._http = http_client
        self._owns_http = http_client is None
        self._creds: dict[str, _Creds] = {}
        self._storage: dict[tuple, Any] = {}

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
                                           follow_redirects=False)
        return self._http

    async def aclose(self) -> None:
        if self._http is not None and self._owns_http:
            await self._http.aclose()
            self._http = None
        self._storage.clear()

    # -- credentials ------------------------------------------------------------------
    async def _credentials(self, cfg: VertexConfig) -> _Creds:
        key = cfg.credentials_key
        entry = self._creds.get(key)
        if entry is None:
            try:
                creds = await asyncio.to_thread(_load_credentials, cfg.credentials)
            except ProviderError:
                raise
            except Exception as e:  # noqa: BLE001 - every google-auth/OS failure is reported the same way
                raise auth_error(e, cfg) from e
            entry = self._creds.setdefault(key, _Creds(creds))
        return entry

    async def _auth_headers(self, cfg: VertexConfig) -> dict[str, str]:
        from google.auth.credentials import AnonymousCredentials
        from google.auth.transport.requests import Request

        entry = await self._credentials(cfg)
        if isinstance(entry.creds, AnonymousCredentials):
            return {}
        async with entry.lock:
            if not entry.creds.valid:
                try:
                    await asyncio.to_thread(entry.creds.refresh, Request())
                except Exception as e:  # noqa: BLE001
                    raise auth_error(e, cfg) from e
        headers: dict[str, str] = {"Authorization": f"Bearer {entry.creds.token}"}
        quota = getattr(entry.creds, "quota_project_id", None)
        if quota:
            headers["x-goog-user-project"] = str(quota)
        return headers

    # -- REST -------------------------------------------------------------------------
    async def request(self, cfg: VertexConfig, method: str, resource: str, *, what: str,
                      json_body: Any = None, params: Mapping[str, Any] | None = None,
                      idempotent: bool = True) -> dict:
        """Call the REST API with retries; returns the JSON object of a 2xx answer."""
        attempts = cfg.max_retries + 1
        last: ProviderError | None = None
        url = cfg.url(resource)
        for attempt in range(attempts):
            headers = await self._auth_headers(cfg)
            delay_hint: float | None = None
            try:
                with provider_call(method, what.partition(" ")[0], LABEL, cfg.requests) as call:
                    resp = await self.http.request(method, url, json=json_body, params=params, headers=headers,
                                                   timeout=httpx.Timeout(cfg.timeout, connect=min(cfg.timeout, 10.0)))
                    call.answered(resp.status_code)
            except httpx.TransportError as e:
                last = ProviderError(f"{LABEL} {method} {what}: network error: {type(e).__name__}: {e}".rstrip(": "),
                                     code="provider_unreachable", retryable=True)
                if not idempotent and not isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout,
                                                         httpx.PoolTimeout)):
                    raise last from e
            else:
                if resp.status_code < 400:
                    try:
                        data = resp.json()
                    except ValueError:
                        data = None
                    if not isinstance(data, dict):
                        raise ProviderError(f"{LABEL} {method} {what}: HTTP {resp.status_code} with a body that "
                                            f"is not a JSON object", code="provider_bad_response", retryable=True)
                    return data
                retry_after = parse_retry_after(resp.headers)
                err = _status_error(method, what, resp.status_code, resp.content, retry_after)
                if resp.status_code == 401 and attempt == 0:
                    # A token revoked early: drop the cached one and try once more.
                    entry = self._creds.get(cfg.credentials_key)
                    if entry is not None and getattr(entry.creds, "token", None):
                        entry.creds.token = None
                        last = err
                        retrying(cfg.requests, call.outcome, 0.0)
                        continue
                if not err.retryable:
                    raise err
                if not idempotent and resp.status_code != 429:
                    # A 5xx may come from a gateway that gave up on a backend that went on: the
                    # create may have been carried out, so the caller looks before creating again.
                    raise err
                if retry_after is not None and retry_after > MAX_INLINE_RETRY_AFTER:
                    raise err
                last, delay_hint = err, retry_after
            if attempt + 1 >= attempts:
                break
            delay = backoff_delay(attempt, cfg.backoff_base, delay_hint)
            retrying(cfg.requests, call.outcome, delay)
            log.info("%s; retry %d/%d in %.2fs", last.message, attempt + 1, attempts - 1, delay)
            await asyncio.sleep(delay)
        assert last is not None
        raise ProviderError(f"{last.message} (gave up after {attempts} attempts)", code=last.code,
                            retryable=last.retryable,
                            retry_after=last.retry_after)

    async def create_job(self, cfg: VertexConfig, body: Mapping[str, Any]) -> dict:
        return await self.request(cfg, "POST", f"{cfg.parent}/batchPredictionJobs", what="batchPredictionJobs.create",
                                  json_body=body, idempotent=False)

    async def get_job(self, cfg: VertexConfig, name: str) -> dict:
        return await self.request(cfg, "GET", name, what=f"batchPredictionJobs.get {name}")

    async def cancel_job(self, cfg: VertexConfig, name: str) -> None:
        await self.request(cfg, "POST", f"{name}:cancel", what=f"batchPredictionJobs.cancel {name}", json_body={})

    async def find_jobs(self, cfg: VertexConfig, label_key: str, label_value: str, pages: int = 5) -> list[dict]:
        found: list[dict] = []
        token = ""
        for _ in range(pages):
            params = {"filter": f'labels.{label_key}="{label_value}"', "pageSize": 100}
            if token:
                params["pageToken"] = token
            page = await self.request(cfg, "GET", f"{cfg.parent}/batchPredictionJobs",
                                      what="batchPredictionJobs.list", params=params)
            for j in page.get("batchPredictionJobs") or []:
                if isinstance(j, Mapping) and (j.get("labels") or {}).get(label_key) == label_value:
                    found.append(dict(j))
            token = page.get("nextPageToken") or ""
            if not token:
                break
        return found

    # -- GCS --------------------------------------------------------------------------
    async def _storage_client(self, cfg: VertexConfig):
        key = (cfg.credentials_key, cfg.project, cfg.gcs_endpoint)
        client = self._storage.get(key)
        if client is None:
            from google.cloud import storage

            entry = await self._credentials(cfg)
            options = {"api_endpoint": cfg.gcs_endpoint} if cfg.gcs_endpoint else None
            client = await asyncio.to_thread(storage.Client, project=cfg.project, credentials=entry.creds,
                                             client_options=options)
            self._storage[key] = client
        return client

    def _gcs_error(self, err: BaseException, cfg: VertexConfig, action: str, uri: str,
                   missing_code: str) -> ProviderError:
        from google.api_core import exceptions as gax
        from google.auth import exceptions as gexc

        if isinstance(err, ProviderError):
            return err
        if isinstance(err, gexc.GoogleAuthError):
            return auth_error(err, cfg)
        if isinstance(err, gax.NotFound):
            if missing_code == "provider_bucket_not_found":
                return ProviderError(f"GCS bucket {cfg.bucket!r} does not exist or is not visible to these "
                                     f"credentials (gcs_bucket_name); {action} {uri} failed: {err.message}",
                                     code=missing_code)
            return ProviderError(f"GCS object {uri} is gone ({action}): {err.message}", code=missing_code)
        if isinstance(err, (gax.Unauthorized, gax.Forbidden)):
            return ProviderError(f"GCS denied {action} {uri}: {err.message} (check vertex_credentials and the "
                                 f"bucket's permissions)", code="provider_auth")
        if isinstance(err, (gax.TooManyRequests, gax.ServerError, gax.RetryError, ConnectionError,
                            TimeoutError, OSError)) or type(err).__module__.startswith(("requests", "urllib3")):
            return ProviderError(f"GCS {action} {uri} failed: {type(err).__name__}: {err}",
                                 code="provider_unavailable", retryable=True)
        if isinstance(err, gax.GoogleAPICallError):
            return ProviderError(f"GCS {action} {uri} failed: {err.message}", code="provider_invalid_request")
        return ProviderError(f"GCS {action} {uri} failed: {type(err).__name__}: {err}", code="provider_error",
                             retryable=True)

    async def upload_file(self, cfg: VertexConfig, path: Path, object_name: str) -> str:
        """Upload a local file (resumable in 8 MiB chunks when large) and return its gs:// URI."""
        uri = f"gs://{cfg.bucket}/{object_name}"
        client = await self._storage_client(cfg)

        def upload() -> None:
            blob = client.bucket(cfg.bucket).blob(object_name)
            if path.stat().st_size > UPLOAD_CHUNK:
                blob.chunk_size = UPLOAD_CHUNK
            blob.upload_from_filename(str(path), content_type="application/jsonl", timeout=cfg.timeout)

        try:
            await asyncio.to_thread(upload)
        except Exception as e:  # noqa: BLE001
            raise self._gcs_error(e, cfg, "upload to", uri, "provider_bucket_not_found") from e
        return uri

    async def list_objects(self, cfg: VertexConfig, gs_prefix: str) -> list[str]:
        """gs:// URIs of the objects under `gs_prefix` (gs://bucket/path/)."""
        bucket, _, prefix = gs_prefix.removeprefix("gs://").partition("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        client = await self._storage_client(cfg)

        def ls() -> list[str]:
            return [f"gs://{bucket}/{b.name}" for b in client.list_blobs(bucket, prefix=prefix, timeout=cfg.timeout)]

        try:
            return await asyncio.to_thread(ls)
        except Exception as e:  # noqa: BLE001
            raise self._gcs_error(e, cfg, "list", gs_prefix, "provider_result_missing") from e

    async def list_blobs(self, cfg: VertexConfig, bucket: str, prefix: str, after: str,
                         limit: int) -> list[tuple[str, float]]:
        """(name, unix time of the last write) of up to `limit` objects under `prefix` whose names
        sort after `after`, in name order."""
        client = await self._storage_client(cfg)

        def ls() -> list[tuple[str, float]]:
            out: list[tuple[str, float]] = []
            for blob in client.list_blobs(bucket, prefix=prefix, start_offset=after or None, timeout=cfg.timeout):
                if blob.name > after:
                    out.append((blob.name, blob.updated.timestamp() if blob.updated else time.time()))
                    if len(out) >= limit:
                        break
            return out

        try:
            return await asyncio.to_thread(ls)
        except Exception as e:  # noqa: BLE001
            raise self._gcs_error(e, cfg, "list", f"gs://{bucket}/{prefix}", "provider_bucket_not_found") from e

    async def delete_blobs(self, cfg: VertexConfig, bucket: str, names: list[str]) -> None:
        """Delete these objects; one already gone is no error."""
        from google.api_core import exceptions as gax

        client = await self._storage_client(cfg)

        def rm() -> None:
            target = client.bucket(bucket)
            for name in names:
                try:
                    target.blob(name).delete(timeout=cfg.timeout)
                except gax.NotFound:
                    pass

        try:
            await asyncio.to_thread(rm)
        except Exception as e:  # noqa: BLE001
            raise self._gcs_error(e, cfg, "delete from", f"gs://{bucket}", "provider_bucket_not_found") from e

    async def iter_lines(self, cfg: VertexConfig, uri: str) -> AsyncIterator[bytes]:
        """Lines of a gs:// object, read in 1 MiB ranges in a worker thread."""
        bucket, _, name = uri.removeprefix("gs://").partition("/")
        client = await self._storage_client(cfg)
        try:
            reader = await asyncio.to_thread(
                lambda: client.bucket(bucket).blob(name).open("rb", chunk_size=1024 * 1024, timeout=cfg.timeout))
        except Exception as e:  # noqa: BLE001
            raise self._gcs_error(e, cfg, "open", uri, "provider_result_missing") from e
        try:
            async for line in aiter_lines(reader.read, reader.close):
                yield line
        except ProviderError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._gcs_error(e, cfg, "read", uri, "provider_result_missing") from e

