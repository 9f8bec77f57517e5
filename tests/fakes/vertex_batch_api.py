"""A fake Vertex AI batchPredictionJobs REST API (plus Google's OAuth token endpoint) that keeps its
data in a real GCS emulator (gcp-storage-emulator, reached with google-cloud-storage).

    gcs = GcsEmulator(); gcs.start()                        # sets nothing global by itself
    api = FakeVertexAPI(storage_client=gcs.client())
    base = await api.start()                                 # "http://127.0.0.1:PORT" (vertex_api_base)
    sa = api.service_account("batch@proj.iam.gserviceaccount.com")   # service-account JSON (dict)
    ...
    await api.stop(); gcs.stop()

REST surface (v1): POST/GET  /v1/projects/{p}/locations/{l}/batchPredictionJobs (create, list with
``filter=labels.k="v"``, pageSize, pageToken), GET .../batchPredictionJobs/{id}, POST
.../batchPredictionJobs/{id}:cancel; errors are Google's {"error": {code, message, status}}.

Auth: every call needs ``Authorization: Bearer <token>``; tokens come from POST /token, the OAuth
JWT-bearer grant google-auth's service-account credentials use (the assertion's RS256 signature
is checked against the key registered with ``service_account()``; an unknown key gets 400
invalid_grant "Invalid JWT Signature." like Google's). ``static_tokens`` are accepted as well;
``allow_anonymous=True`` drops the check. ``denied_projects``: 403 PERMISSION_DENIED.

Lifecycle (one step per GET of the job with ``clock="poll"``, or ``advance()`` with "manual"):
JOB_STATE_PENDING -> RUNNING (the input JSONL is read from GCS; an unreadable input fails the
job) -> ``lines_per_tick`` lines per step (None: all) -> SUCCEEDED, or PARTIALLY_SUCCEEDED when
some lines failed. ``hold_after=n`` stops processing after n lines (the job stays RUNNING until
cancelled). POST :cancel -> JOB_STATE_CANCELLING -> (next step) JOB_STATE_CANCELLED with the
predictions of the lines processed so far. A request whose text contains "VERTEX:fail" gets a
status error line; "VERTEX:fail_job" fails the whole job (JOB_STATE_FAILED with error).
``fail_after=n`` fails a job mid-way, once n lines are processed: JOB_STATE_FAILED with an error,
and (as Vertex does) the predictions made so far in its output directory.

Eventual consistency (``lag``, see consistency.py): a new job is missing from the listing for
``lag.listing`` seconds and GET / :cancel of it answer 404 NOT_FOUND for ``lag.get`` seconds.
``gate`` holds create answers (the job exists already) so a test can kill the caller mid-create.
``create_errors``: statuses the next creates answer *after* making the job, as a gateway that
timed out on a backend that went on (504 DEADLINE_EXCEEDED, 502 …).

Output: <outputUriPrefix>/prediction-model-<timestamp>/predictions.jsonl, in shuffled order, each
line {"status", "processed_time", "request" (echoed, labels included), "response"
(GenerateContentResponse: candidates, usageMetadata, modelVersion, createTime, responseId)}.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import json
import random
import re
import secrets
import socket
import time
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from tests.fakes.consistency import CreateGate, Lag

__all__ = ["FakeVertexAPI", "GcsEmulator", "VertexJob"]

TERMINAL = {"JOB_STATE_SUCCEEDED", "JOB_STATE_PARTIALLY_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED",
            "JOB_STATE_EXPIRED"}
HTTP_STATUS = {500: "INTERNAL", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
_LABEL_RE = re.compile(r"[a-z0-9_-]{0,63}")
_LABEL_KEY_RE = re.compile(r"[a-z][a-z0-9_-]{0,62}")


def _iso(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).isoformat(
        timespec="microseconds").replace("+00:00", "Z")


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class GcsEmulator:
    """gcp-storage-emulator in this process (its own thread), in memory, on a free port."""

    def __init__(self) -> None:
        self._server = None
        self.url = ""

    def start(self) -> str:
        from gcp_storage_emulator.server import create_server

        self._server = create_server("127.0.0.1", 0, in_memory=True)
        self._server.start()
        self.url = f"http://127.0.0.1:{self._server._api._httpd.server_port}"
        return self.url

    def client(self, project: str = "test-project"):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project=project, credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.url})

    def wipe(self) -> None:
        self._server.wipe()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@dataclasses.dataclass
class VertexJob:
    id: str
    project: str
    location: str
    body: dict
    state: str = "JOB_STATE_PENDING"
    create_time: float = dataclasses.field(default_factory=time.time)
    start_time: float | None = None
    end_time: float | None = None
    update_time: float = dataclasses.field(default_factory=time.time)
    lines: list = dataclasses.field(default_factory=list)  # parsed input lines (dict | None for bad JSON)
    processed: int = 0
    predictions: list = dataclasses.field(default_factory=list)
    successful: int = 0
    failed: int = 0
    error: dict | None = None
    output_dir: str | None = None
    cancel_requested: bool = False

    @property
    def name(self) -> str:
        return f"projects/{self.project}/locations/{self.location}/batchPredictionJobs/{self.id}"

    def json(self) -> dict:
        out: dict[str, Any] = {
            "name": self.name,
            "displayName": self.body.get("displayName", ""),
            "model": self.body["model"],
            "modelVersionId": "1",
            "inputConfig": self.body["inputConfig"],
            "outputConfig": self.body["outputConfig"],
            "state": self.state,
            "createTime": _iso(self.create_time),
            "updateTime": _iso(self.update_time),
            "labels": self.body.get("labels") or {},
        }
        if self.start_time:
            out["startTime"] = _iso(self.start_time)
        if self.end_time:
            out["endTime"] = _iso(self.end_time)
        if self.state != "JOB_STATE_PENDING":
            out["completionStats"] = {"successfulCount": str(self.successful), "failedCount": str(self.failed),
                                      "incompleteCount": str(max(0, len(self.lines) - self.processed))}
        if self.error:
            out["error"] = self.error
        if self.output_dir:
            out["outputInfo"] = {"gcsOutputDirectory": self.output_dir}
        return out


class FakeVertexAPI:
    def __init__(self, *, storage_client, clock: str = "poll", lines_per_tick: int | None = None,
                 hold_after: int | None = None, static_tokens: set[str] | None = None,
                 allow_anonymous: bool = False, denied_projects: set[str] | None = None,
                 model_version: str = "gemini-2.5-flash-001") -> None:
        self.storage = storage_client
        self.clock = clock
        self.lines_per_tick = lines_per_tick
        self.hold_after = hold_after
        self.fail_after: int | None = None
        self.static_tokens = set(static_tokens or ())
        self.allow_anonymous = allow_anonymous
        self.denied_projects = set(denied_projects or ())
        self.model_version = model_version
        self.jobs: dict[str, VertexJob] = {}
        self.accounts: dict[str, Any] = {}  # client_email -> RSA public key
        self.tokens: dict[str, str] = {}  # issued access token -> client_email
        self.calls: list[tuple[str, str]] = []
        self.token_requests = 0
        self.lag = Lag()
        self.gate = CreateGate()
        self.create_errors: list[int] = []
        self._ids = itertools.count(7_814_463_557_919_047_680)
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    # ------------------------------------------------------------------ control
    def service_account(self, email: str, *, project: str = "test-project", register: bool = True) -> dict:
        """A service-account key file (as a dict) whose token_uri is this fake; register=False gives
        a key the fake does not know (its tokens are refused: "bad credentials")."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        if register:
            self.accounts[email] = key.public_key()
        return {"type": "service_account", "project_id": project, "private_key_id": secrets.token_hex(20),
                "private_key": pem, "client_email": email, "client_id": str(random.randrange(10**20)),
                "token_uri": f"{self.base_url}/token"}

    def advance(self, job_id: str, n: int = 1) -> VertexJob:
        job = self.jobs[job_id]
        for _ in range(n):
            self._step_sync(job)
        return job

    def job_by_label(self, key: str, value: str) -> VertexJob | None:
        return next((j for j in self.jobs.values() if (j.body.get("labels") or {}).get(key) == value), None)

    def jobs_by_label(self, key: str, value: str) -> list[VertexJob]:
        return [j for j in self.jobs.values() if (j.body.get("labels") or {}).get(key) == value]

    # ------------------------------------------------------------------ server
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        app.router.add_post("/token", self._token)
        jobs = "/v1/projects/{project}/locations/{location}/batchPredictionJobs"
        app.router.add_post(jobs, self._create)
        app.router.add_get(jobs, self._list)
        app.router.add_get(jobs + "/{job}", self._get)
        app.router.add_post(jobs + "/{job}", self._post_job)  # {id}:cancel
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind((host, port))
        site = web.SockSite(self._runner, sock)
        await site.start()
        self.base_url = f"http://{host}:{sock.getsockname()[1]}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @staticmethod
    def _error(status: int, rpc: str, message: str) -> web.Response:
        return web.json_response({"error": {"code": status, "message": message, "status": rpc}}, status=status)

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        self.calls.append((request.method, request.path_qs))
        if request.path == "/token":
            return await handler(request)
        if not self.allow_anonymous:
            auth = request.headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
            if not token or (token not in self.tokens and token not in self.static_tokens):
                return self._error(401, "UNAUTHENTICATED",
                                   "Request had invalid authentication credentials. Expected OAuth 2 access token, "
                                   "login cookie or other valid authentication credential.")
        project = request.match_info.get("project")
        if project in self.denied_projects:
            return self._error(403, "PERMISSION_DENIED",
                               f"Permission 'aiplatform.batchPredictionJobs.{'create' if request.method == 'POST' else 'get'}'"
                               f" denied on resource '//aiplatform.googleapis.com/projects/{project}/locations/"
                               f"{request.match_info.get('location')}' (or it may not exist).")
        return await handler(request)

    # ------------------------------------------------------------------ OAuth
    async def _token(self, request: web.Request) -> web.Response:
        from google.auth import crypt

        self.token_requests += 1
        form = await request.post()
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        assertion = str(form.get("assertion") or "")
        try:
            header_b64, payload_b64, sig_b64 = assertion.split(".")
            payload = json.loads(_b64url_decode(payload_b64))
            signature = _b64url_decode(sig_b64)
        except ValueError:
            return web.json_response({"error": "invalid_grant", "error_description": "Invalid JWT."}, status=400)
        email = payload.get("iss")
        public_key = self.accounts.get(email)
        verified = public_key is not None and crypt.RSAVerifier(public_key).verify(
            f"{header_b64}.{payload_b64}".encode(), signature)
        if not verified:
            return web.json_response({"error": "invalid_grant", "error_description": "Invalid JWT Signature."},
                                     status=400)
        if payload.get("exp", 0) < time.time():
            return web.json_response({"error": "invalid_grant", "error_description": "Invalid JWT: Token must be "
                                      "a short-lived token"}, status=400)
        token = "ya29.fake-" + secrets.token_urlsafe(24)
        self.tokens[token] = email
        return web.json_response({"access_token": token, "expires_in": 3599, "token_type": "Bearer"})

    # ------------------------------------------------------------------ jobs API
    async def _create(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return self._error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        problem = self._validate(body)
        if problem:
            return self._error(400, "INVALID_ARGUMENT", problem)
        job = VertexJob(id=str(next(self._ids)), project=request.match_info["project"],
                        location=request.match_info["location"], body=body)
        self.jobs[job.id] = job
        await self.gate.passed()
        if self.create_errors:
            status = self.create_errors.pop(0)
            return self._error(status, HTTP_STATUS.get(status, "UNKNOWN"), "The service timed out waiting for "
                               "the backend." if status == 504 else "The service answered badly.")
        return web.json_response(job.json())

    @staticmethod
    def _validate(body: Any) -> str | None:
        if not isinstance(body, dict):
            return "Invalid JSON payload received."
        model = body.get("model")
        if not isinstance(model, str) or not (model.startswith("publishers/") or model.startswith("projects/")):
            return f"Invalid Model resource name: {model!r}."
        ic = body.get("inputConfig") or {}
        if ic.get("instancesFormat") != "jsonl":
            return "inputConfig.instancesFormat must be jsonl for Gemini batch prediction."
        uris = (ic.get("gcsSource") or {}).get("uris")
        if not isinstance(uris, list) or not uris or not all(isinstance(u, str) and u.startswith("gs://") for u in uris):
            return "inputConfig.gcsSource.uris must be gs:// URIs."
        oc = body.get("outputConfig") or {}
        if oc.get("predictionsFormat") != "jsonl":
            return "outputConfig.predictionsFormat must be jsonl."
        prefix = (oc.get("gcsDestination") or {}).get("outputUriPrefix")
        if not isinstance(prefix, str) or not prefix.startswith("gs://"):
            return "outputConfig.gcsDestination.outputUriPrefix must be a gs:// URI."
        for k, v in (body.get("labels") or {}).items():
            if not _LABEL_KEY_RE.fullmatch(k) or not isinstance(v, str) or not _LABEL_RE.fullmatch(v):
                return f"Invalid label {k!r}: {v!r}."
        return None

    def _job_or_error(self, request: web.Request) -> VertexJob | web.Response:
        job_id = request.match_info["job"].split(":", 1)[0]
        job = self.jobs.get(job_id)
        if job is None or job.project != request.match_info["project"] or not self.lag.found(job.create_time):
            return self._error(404, "NOT_FOUND", f"The BatchPredictionJob does not exist: {job_id}.")
        return job

    async def _get(self, request: web.Request) -> web.Response:
        job = self._job_or_error(request)
        if isinstance(job, web.Response):
            return job
        if self.clock == "poll":
            await self.step(job)
        return web.json_response(job.json())

    async def _post_job(self, request: web.Request) -> web.Response:
        job = self._job_or_error(request)
        if isinstance(job, web.Response):
            return job
        if not request.match_info["job"].endswith(":cancel"):
            return self._error(404, "NOT_FOUND", "Unknown method.")
        if job.state in TERMINAL or job.state == "JOB_STATE_CANCELLING":
            return self._error(400, "FAILED_PRECONDITION",
                               f"Cannot cancel BatchPredictionJob {job.name} in state {job.state}.")
        job.cancel_requested = True
        job.state = "JOB_STATE_CANCELLING"
        job.update_time = time.time()
        return web.json_response({})

    async def _list(self, request: web.Request) -> web.Response:
        jobs = [j for j in self.jobs.values() if j.project == request.match_info["project"]
                and j.location == request.match_info["location"] and self.lag.listed(j.create_time)]
        flt = request.query.get("filter", "")
        for key, value in re.findall(r'labels\.([\w-]+)\s*=\s*"?([^"\s]*)"?', flt):
            jobs = [j for j in jobs if (j.body.get("labels") or {}).get(key) == value]
        size = int(request.query.get("pageSize") or 100)
        start = int(request.query.get("pageToken") or 0)
        page = jobs[start:start + size]
        out: dict[str, Any] = {"batchPredictionJobs": [j.json() for j in page]}
        if start + size < len(jobs):
            out["nextPageToken"] = str(start + size)
        return web.json_response(out)

    # ------------------------------------------------------------------ lifecycle
    async def step(self, job: VertexJob) -> None:
        await asyncio.to_thread(self._step_sync, job)

    def _step_sync(self, job: VertexJob) -> None:
        if job.state in TERMINAL:
            return
        job.update_time = time.time()
        if job.state == "JOB_STATE_CANCELLING":
            self._finish(job, "JOB_STATE_CANCELLED")
            return
        if job.state == "JOB_STATE_PENDING":
            job.state = "JOB_STATE_RUNNING"
            job.start_time = time.time()
            try:
                job.lines = self._read_input(job)
            except Exception as e:  # noqa: BLE001
                job.error = {"code": 5, "message": f"Failed to read input {job.body['inputConfig']['gcsSource']['uris']}:"
                                                   f" {getattr(e, 'message', e)}"}
                self._finish(job, "JOB_STATE_FAILED", write=False)
                return
            if any("VERTEX:fail_job" in json.dumps(line) for line in job.lines):
                job.error = {"code": 13, "message": "Internal error occurred while running the batch prediction "
                                                    "job. Please retry."}
                self._finish(job, "JOB_STATE_FAILED", write=False)
            return
        if job.state == "JOB_STATE_RUNNING":
            budget = self.lines_per_tick or len(job.lines)
            limit = len(job.lines) if self.hold_after is None else min(len(job.lines), self.hold_after)
            while budget > 0 and job.processed < limit:
                job.predictions.append(self._predict(job, job.lines[job.processed]))
                job.processed += 1
                budget -= 1
                if self.fail_after is not None and job.processed >= self.fail_after:
                    job.error = {"code": 13, "message": "Internal error occurred while running the batch "
                                                        "prediction job. Please retry."}
                    self._finish(job, "JOB_STATE_FAILED")
                    return
            if job.processed >= len(job.lines):
                self._finish(job, "JOB_STATE_PARTIALLY_SUCCEEDED" if job.failed else "JOB_STATE_SUCCEEDED")

    def _read_input(self, job: VertexJob) -> list:
        lines: list = []
        for uri in job.body["inputConfig"]["gcsSource"]["uris"]:
            bucket, _, name = uri.removeprefix("gs://").partition("/")
            data = self.storage.bucket(bucket).blob(name).download_as_bytes()
            for raw in data.splitlines():
                if raw.strip():
                    try:
                        lines.append(json.loads(raw))
                    except ValueError:
                        lines.append(None)
        return lines

    def _finish(self, job: VertexJob, state: str, *, write: bool = True) -> None:
        if write and job.predictions:
            prefix = job.body["outputConfig"]["gcsDestination"]["outputUriPrefix"].rstrip("/")
            stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            out_dir = f"{prefix}/prediction-model-{stamp}"
            bucket, _, path = out_dir.removeprefix("gs://").partition("/")
            lines = list(job.predictions)
            random.Random(job.id).shuffle(lines)  # Vertex does not keep input order
            data = b"".join(json.dumps(p).encode() + b"\n" for p in lines)
            self.storage.bucket(bucket).blob(f"{path}/predictions.jsonl").upload_from_string(
                data, content_type="application/jsonl")
            job.output_dir = out_dir
        job.state = state
        job.end_time = time.time()

    def _predict(self, job: VertexJob, line: Any) -> dict:
        processed_time = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        request = line.get("request") if isinstance(line, dict) else None
        if not isinstance(request, dict) or not isinstance(request.get("contents"), list) or not request["contents"]:
            job.failed += 1
            return {"status": 'Bad Request: {"error": {"code": 400, "message": "* GenerateContentRequest.contents: '
                              'contents is not specified", "status": "INVALID_ARGUMENT"}}',
                    "processed_time": processed_time, "request": request if isinstance(request, dict) else line}
        text = " ".join(p.get("text", "") for c in request["contents"] if c.get("role") == "user"
                        for p in c.get("parts", []) if isinstance(p, dict))
        if "VERTEX:fail" in text:
            job.failed += 1
            return {"status": 'Bad Request: {"error": {"code": 400, "message": "Request contains an invalid '
                              'argument.", "status": "INVALID_ARGUMENT"}}',
                    "processed_time": processed_time, "request": request}
        job.successful += 1
        gen = request.get("generationConfig") or {}
        n = int(gen.get("candidateCount") or 1)
        prompt_tokens = max(1, len(json.dumps(request["contents"])) // 4)
        candidates, out_tokens = [], 0
        for i in range(n):
            answer = f"[gemini] {text[-200:]}" + (f" #{i}" if n > 1 else "")
            max_out = gen.get("maxOutputTokens")
            finish = "STOP"
            words = answer.split()
            if max_out is not None and len(words) > max_out:
                answer, finish = " ".join(words[:max_out]), "MAX_TOKENS"
            out_tokens += len(answer.split())
            cand: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": answer}]},
                                    "finishReason": finish, "avgLogprobs": -0.12}
            if i:
                cand["index"] = i  # proto3 JSON omits index 0
            candidates.append(cand)
        return {"status": "", "processed_time": processed_time, "request": request, "response": {
            "candidates": candidates,
            "usageMetadata": {"promptTokenCount": prompt_tokens, "candidatesTokenCount": out_tokens,
                              "totalTokenCount": prompt_tokens + out_tokens, "trafficType": "ON_DEMAND",
                              "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}]},
            "modelVersion": self.model_version,
            "createTime": _iso(),
            "responseId": secrets.token_urlsafe(16),
        }}
