"""A fake Amazon Bedrock control plane for batch inference (the REST paths boto3's `bedrock`
client calls) that keeps its data in a real S3 emulator (moto's server, reached with boto3).

    s3 = MotoS3(); s3.start()                                  # ThreadedMotoServer on a free port
    cp = FakeBedrockControlPlane(s3_endpoint=s3.url)
    endpoint = await cp.start()                                 # aws_bedrock_endpoint
    boto3.client("bedrock", endpoint_url=endpoint, ...).create_model_invocation_job(...)

Operations: CreateModelInvocationJob (POST /model-invocation-job; clientRequestToken makes it
idempotent), GetModelInvocationJob (GET /model-invocation-job/{jobIdentifier}),
StopModelInvocationJob (POST /model-invocation-job/{jobIdentifier}/stop), ListModelInvocationJobs
(GET /model-invocation-jobs: statusEquals, nameContains, maxResults, nextToken). Errors use the
restJson shape botocore parses: the x-amzn-ErrorType header plus {"message": …}. Requests must be
SigV4-signed by an access key in ``access_keys`` (else 403 UnrecognizedClientException);
``denied_roles`` get 403 AccessDeniedException (iam:PassRole) at create.

Lifecycle (one step per GetModelInvocationJob with ``clock="poll"``, or ``advance()``):
Submitted -> Validating (reads the input from S3: an unreadable input, fewer than ``min_records``
or more than ``max_records`` records, or malformed JSONL fail the job) -> Scheduled -> InProgress
(``records_per_tick`` records per step, None: all; ``hold_after=n`` stops after n) -> Completed,
or PartiallyCompleted when some records errored. StopModelInvocationJob -> Stopping -> Stopped with
the records processed so far. A record whose text contains "BEDROCK:fail" gets an error record;
"BEDROCK:fail_job" fails the job at validation.

Output, as Bedrock writes it: <outputUri>/<jobId>/<input file name>.out (one line per record:
recordId, modelInput and modelOutput or error{errorCode, errorMessage}) and manifest.json.out
(record and token counts). modelOutput depends on the job: Anthropic Messages responses for Claude
InvokeModel jobs, Converse responses for Converse jobs, Titan embeddings for Titan InvokeModel.

Eventual consistency (``lag``, see consistency.py): a new job is missing from
ListModelInvocationJobs for ``lag.listing`` seconds, and Get/Stop of it answer 404
ResourceNotFoundException for ``lag.get`` seconds. ``gate`` holds create answers (the job exists
already) so a test can kill the caller mid-create.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import json
import math
import re
import secrets
import socket
import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from tests.fakes.consistency import CreateGate, Lag

__all__ = ["FakeBedrockControlPlane", "MotoS3", "InvocationJob"]

TERMINAL = {"Completed", "PartiallyCompleted", "Failed", "Stopped", "Expired"}
JOB_NAME_RE = re.compile(r"[a-zA-Z0-9]{1,63}(-*[a-zA-Z0-9\+\-\.]){0,63}")
TOKEN_RE = re.compile(r"[a-zA-Z0-9]{1,256}(-*[a-zA-Z0-9]){0,256}")
ROLE_RE = re.compile(r"arn:aws(-[^:]+)?:iam::([0-9]{12})?:role/.+")
S3_URI_RE = re.compile(r"s3://[a-z0-9][-.a-z0-9]{1,61}[a-z0-9](?:/[-!_*'().a-z0-9A-Z]+(?:/[-!_*'().a-z0-9A-Z]+)*)?/?")
RECORD_ID_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
CREDENTIAL_RE = re.compile(r"Credential=([^/,\s]+)/\d{8}/([^/]+)/([^/]+)/aws4_request")


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class MotoS3:
    """moto's server (all services, S3 used here) in this process, on a free port."""

    def __init__(self) -> None:
        self._server = None
        self.url = ""

    def start(self) -> str:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        return self.url

    def client(self, region: str = "us-east-1"):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name=region, aws_access_key_id="testing",
                            aws_secret_access_key="testing")

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@dataclasses.dataclass
class InvocationJob:
    job_id: str
    arn: str
    request: dict
    status: str = "Submitted"
    message: str | None = None
    submit_time: float = dataclasses.field(default_factory=time.time)
    last_modified: float = dataclasses.field(default_factory=time.time)
    end_time: float | None = None
    inputs: list = dataclasses.field(default_factory=list)  # (input key, [raw record dict])
    processed: int = 0
    outputs: list = dataclasses.field(default_factory=list)  # output record dicts, input order
    success: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def records(self) -> list:
        return [r for _, recs in self.inputs for r in recs]

    def json(self) -> dict:
        r = self.request
        out: dict[str, Any] = {
            "jobArn": self.arn, "jobName": r["jobName"], "modelId": r["modelId"], "roleArn": r["roleArn"],
            "clientRequestToken": r.get("clientRequestToken"), "status": self.status,
            "submitTime": _iso(self.submit_time), "lastModifiedTime": _iso(self.last_modified),
            "inputDataConfig": r["inputDataConfig"], "outputDataConfig": r["outputDataConfig"],
            "timeoutDurationInHours": r.get("timeoutDurationInHours", 24),
            "jobExpirationTime": _iso(self.submit_time + 3600 * r.get("timeoutDurationInHours", 24)),
            "modelInvocationType": r.get("modelInvocationType", "InvokeModel"),
        }
        if self.message:
            out["message"] = self.message
        if self.end_time:
            out["endTime"] = _iso(self.end_time)
        if self.status not in ("Submitted", "Validating"):
            total = len(self.records)
            out.update(totalRecordCount=total, processedRecordCount=self.processed,
                       successRecordCount=self.success, errorRecordCount=self.errors)
        return {k: v for k, v in out.items() if v is not None}


class FakeBedrockControlPlane:
    def __init__(self, *, s3_endpoint: str, region: str = "us-east-1", account: str = "123456789012",
                 access_keys: set[str] | None = None, denied_roles: set[str] | None = None,
                 min_records: int = 100, max_records: int = 50_000, clock: str = "poll",
                 records_per_tick: int | None = None, hold_after: int | None = None) -> None:
        self.s3_endpoint = s3_endpoint
        self.region = region
        self.account = account
        self.access_keys = set(access_keys or {"testing"})
        self.denied_roles = set(denied_roles or ())
        self.min_records = min_records
        self.max_records = max_records
        self.clock = clock
        self.records_per_tick = records_per_tick
        self.hold_after = hold_after
        self.jobs: dict[str, InvocationJob] = {}
        self.by_token: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        self.create_requests: list[dict] = []
        self.lag = Lag()
        self.gate = CreateGate()
        self._s3 = None
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    @property
    def s3(self):
        if self._s3 is None:
            import boto3

            self._s3 = boto3.client("s3", endpoint_url=self.s3_endpoint, region_name=self.region,
                                    aws_access_key_id="testing", aws_secret_access_key="testing")
        return self._s3

    # ------------------------------------------------------------------ control
    def advance(self, job_id: str, n: int = 1) -> InvocationJob:
        job = self.jobs[job_id]
        for _ in range(n):
            self._step_sync(job)
        return job

    def job_for_token(self, token: str) -> InvocationJob | None:
        arn = self.by_token.get(token)
        return self.jobs[arn.rsplit("/", 1)[1]] if arn else None

    # ------------------------------------------------------------------ server
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post("/model-invocation-job", self._create)
        app.router.add_get("/model-invocation-jobs", self._list)
        app.router.add_post("/model-invocation-job/{ident:.+}/stop", self._stop)
        app.router.add_get("/model-invocation-job/{ident:.+}", self._get)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind((host, port))
        await web.SockSite(self._runner, sock).start()
        self.base_url = f"http://{host}:{sock.getsockname()[1]}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @staticmethod
    def _error(status: int, code: str, message: str) -> web.Response:
        return web.json_response({"message": message}, status=status,
                                 headers={"x-amzn-ErrorType": f"{code}:http://internal.amazon.com/coral/"
                                                              "com.amazon.bedrock/"})

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        self.calls.append((request.method, request.path_qs))
        m = CREDENTIAL_RE.search(request.headers.get("Authorization", ""))
        if not m:
            return self._error(403, "MissingAuthenticationTokenException", "Missing Authentication Token")
        key, region, service = m.groups()
        if key not in self.access_keys:
            return self._error(403, "UnrecognizedClientException",
                               "The security token included in the request is invalid.")
        if service != "bedrock" or region != self.region:
            return self._error(403, "InvalidSignatureException",
                               f"Credential should be scoped to a valid region ({self.region}) and service bedrock.")
        return await handler(request)

    def _job(self, request: web.Request) -> InvocationJob | web.Response:
        ident = unquote(request.match_info["ident"])
        job = self.jobs.get(ident.rsplit("/", 1)[-1])
        if (job is None or (ident.startswith("arn:") and ident != job.arn)
                or not self.lag.found(job.submit_time)):
            return self._error(404, "ResourceNotFoundException", f"Could not find job {ident}")
        return job

    # ------------------------------------------------------------------ operations
    async def _create(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return self._error(400, "SerializationException", "Request body is not valid JSON")
        self.create_requests.append(body)
        problem = self._validate(body)
        if problem:
            return self._error(400, "ValidationException", problem)
        if body["roleArn"] in self.denied_roles:
            return self._error(403, "AccessDeniedException",
                               f"User: arn:aws:iam::{self.account}:user/batchgate is not authorized to perform: "
                               f"iam:PassRole on resource: {body['roleArn']}")
        token = body.get("clientRequestToken")
        if token and token in self.by_token:
            await self.gate.passed()
            return web.json_response({"jobArn": self.by_token[token]})
        if any(j.request["jobName"] == body["jobName"] for j in self.jobs.values()):
            return self._error(400, "ConflictException",
                               f"A job with the name {body['jobName']} already exists in this account")
        job_id = secrets.token_hex(6)
        arn = f"arn:aws:bedrock:{self.region}:{self.account}:model-invocation-job/{job_id}"
        self.jobs[job_id] = InvocationJob(job_id=job_id, arn=arn, request=body)
        if token:
            self.by_token[token] = arn
        await self.gate.passed()
        return web.json_response({"jobArn": arn})

    @staticmethod
    def _validate(body: Any) -> str | None:
        if not isinstance(body, dict):
            return "Request body must be an object"
        for key in ("jobName", "roleArn", "modelId", "inputDataConfig", "outputDataConfig"):
            if key not in body:
                return f"1 validation error detected: Value null at '{key}' failed to satisfy constraint: " \
                       "Member must not be null"
        if not JOB_NAME_RE.fullmatch(body["jobName"]) or len(body["jobName"]) > 63:
            return f"Value '{body['jobName']}' at 'jobName' failed to satisfy constraint: Member must satisfy " \
                   f"regular expression pattern: {JOB_NAME_RE.pattern}"
        if not ROLE_RE.fullmatch(body["roleArn"]):
            return f"Value '{body['roleArn']}' at 'roleArn' failed to satisfy constraint"
        token = body.get("clientRequestToken")
        if token is not None and not TOKEN_RE.fullmatch(token):
            return f"Value '{token}' at 'clientRequestToken' failed to satisfy constraint: Member must satisfy " \
                   f"regular expression pattern: {TOKEN_RE.pattern}"
        hours = body.get("timeoutDurationInHours", 24)
        if not 24 <= hours <= 168:
            return "timeoutDurationInHours must be between 24 and 168"
        if body.get("modelInvocationType", "InvokeModel") not in ("InvokeModel", "Converse"):
            return "modelInvocationType must be InvokeModel or Converse"
        s3_in = (body["inputDataConfig"] or {}).get("s3InputDataConfig") or {}
        s3_out = (body["outputDataConfig"] or {}).get("s3OutputDataConfig") or {}
        for where, uri in (("inputDataConfig.s3InputDataConfig.s3Uri", s3_in.get("s3Uri")),
                           ("outputDataConfig.s3OutputDataConfig.s3Uri", s3_out.get("s3Uri"))):
            if not isinstance(uri, str) or not S3_URI_RE.fullmatch(uri):
                return f"Value '{uri}' at '{where}' failed to satisfy constraint"
        if s3_in.get("s3InputFormat", "JSONL") != "JSONL":
            return "s3InputFormat must be JSONL"
        return None

    async def _get(self, request: web.Request) -> web.Response:
        job = self._job(request)
        if isinstance(job, web.Response):
            return job
        if self.clock == "poll":
            await asyncio.to_thread(self._step_sync, job)
        return web.json_response(job.json())

    async def _stop(self, request: web.Request) -> web.Response:
        job = self._job(request)
        if isinstance(job, web.Response):
            return job
        if job.status in TERMINAL or job.status == "Stopping":
            return self._error(400, "ValidationException",
                               f"Job {job.arn} cannot be stopped in status {job.status}")
        job.status = "Stopping"
        job.last_modified = time.time()
        return web.json_response({})

    async def _list(self, request: web.Request) -> web.Response:
        jobs = [j for j in self.jobs.values() if self.lag.listed(j.submit_time)]
        q = request.query
        if q.get("statusEquals"):
            jobs = [j for j in jobs if j.status == q["statusEquals"]]
        if q.get("nameContains"):
            jobs = [j for j in jobs if q["nameContains"] in j.request["jobName"]]
        size = int(q.get("maxResults") or 100)
        start = int(q.get("nextToken") or 0)
        out: dict[str, Any] = {"invocationJobSummaries": [j.json() for j in jobs[start:start + size]]}
        if start + size < len(jobs):
            out["nextToken"] = str(start + size)
        return web.json_response(out)

    # ------------------------------------------------------------------ lifecycle
    def _step_sync(self, job: InvocationJob) -> None:
        if job.status in TERMINAL:
            return
        job.last_modified = time.time()
        if job.status == "Stopping":
            self._finish(job, "Stopped")
        elif job.status == "Submitted":
            job.status = "Validating"
        elif job.status == "Validating":
            problem = self._load_input(job)
            if problem:
                job.message = problem
                self._finish(job, "Failed", write=False)
            else:
                job.status = "Scheduled"
        elif job.status == "Scheduled":
            job.status = "InProgress"
        elif job.status == "InProgress":
            records = job.records
            budget = self.records_per_tick or len(records)
            limit = len(records) if self.hold_after is None else min(len(records), self.hold_after)
            while budget > 0 and job.processed < limit:
                job.outputs.append(self._invoke(job, records[job.processed]))
                job.processed += 1
                budget -= 1
            if job.processed >= len(records):
                self._finish(job, "PartiallyCompleted" if job.errors else "Completed")

    def _load_input(self, job: InvocationJob) -> str | None:
        uri = job.request["inputDataConfig"]["s3InputDataConfig"]["s3Uri"]
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        try:
            if key.endswith(".jsonl"):
                keys = [key]
            else:
                listing = self.s3.list_objects_v2(Bucket=bucket, Prefix=key)
                keys = [o["Key"] for o in listing.get("Contents") or [] if o["Key"].endswith(".jsonl")]
            inputs = []
            for k in keys:
                data = self.s3.get_object(Bucket=bucket, Key=k)["Body"].read()
                records = []
                for n, raw in enumerate(data.splitlines(), 1):
                    if not raw.strip():
                        continue
                    try:
                        rec = json.loads(raw)
                    except ValueError:
                        return f"Invalid JSON in {k} at line {n}"
                    if not isinstance(rec, dict) or not RECORD_ID_RE.fullmatch(str(rec.get("recordId", ""))) \
                            or not isinstance(rec.get("modelInput"), dict):
                        return f"Invalid record format in {k} at line {n}: each record needs a recordId and a " \
                               "modelInput object"
                    records.append(rec)
                inputs.append((k, records))
        except Exception as e:  # noqa: BLE001 - botocore errors
            return f"Amazon Bedrock is unable to read the input at {uri}: {e}"
        job.inputs = inputs
        total = len(job.records)
        if total < self.min_records:
            return (f"The number of records in the input ({total}) is below the minimum of {self.min_records} "
                    "records per batch inference job")
        if total > self.max_records:
            return f"The number of records in the input ({total}) exceeds the maximum of {self.max_records}"
        if any("BEDROCK:fail_job" in json.dumps(r) for r in job.records):
            return "Internal server error while processing the batch inference job"
        return None

    def _finish(self, job: InvocationJob, status: str, *, write: bool = True) -> None:
        if write:
            out_uri = job.request["outputDataConfig"]["s3OutputDataConfig"]["s3Uri"]
            bucket, _, prefix = out_uri.removeprefix("s3://").partition("/")
            base = f"{prefix.rstrip('/')}/{job.job_id}/" if prefix.strip("/") else f"{job.job_id}/"
            done = iter(job.outputs)
            for key, records in job.inputs:
                chunk = list(itertools.islice(done, len(records)))
                if chunk:
                    data = b"".join(json.dumps(o).encode() + b"\n" for o in chunk)
                    self.s3.put_object(Bucket=bucket, Key=base + key.rsplit("/", 1)[-1] + ".out", Body=data)
            manifest = {"totalRecordCount": len(job.records), "processedRecordCount": job.processed,
                        "successRecordCount": job.success, "errorRecordCount": job.errors,
                        "inputTokenCount": job.input_tokens, "outputTokenCount": job.output_tokens}
            self.s3.put_object(Bucket=bucket, Key=base + "manifest.json.out", Body=json.dumps(manifest).encode())
        job.status = status
        job.end_time = time.time()

    # ------------------------------------------------------------------ the "model"
    def _invoke(self, job: InvocationJob, record: dict) -> dict:
        model_input = record["modelInput"]
        out = {"recordId": record["recordId"], "modelInput": model_input}
        if "BEDROCK:fail" in json.dumps(model_input):
            job.errors += 1
            out["error"] = {"errorCode": 400, "errorMessage": "ValidationException: The model returned the "
                                                              "following errors: request refused by the fake"}
            return out
        model_id = job.request["modelId"]
        kind = job.request.get("modelInvocationType", "InvokeModel")
        try:
            if kind == "Converse":
                output, tokens = self._converse(model_input)
            elif "titan-embed" in model_id:
                output, tokens = self._titan_embedding(model_input)
            elif "anthropic." in model_id:
                output, tokens = self._claude(model_input, model_id)
            else:
                raise ValueError(f"the fake has no InvokeModel format for {model_id}")
        except ValueError as e:
            job.errors += 1
            out["error"] = {"errorCode": 400, "errorMessage": f"Malformed input request: {e}, please reformat "
                                                              "your input and try again."}
            return out
        job.success += 1
        job.input_tokens += tokens[0]
        job.output_tokens += tokens[1]
        out["modelOutput"] = output
        return out

    def _tokens(self, obj: Any) -> int:
        return max(1, len(json.dumps(obj)) // 4)

    def _claude(self, body: dict, model_id: str) -> tuple[dict, tuple[int, int]]:
        if body.get("anthropic_version") != "bedrock-2023-05-31":
            raise ValueError("#: required key [anthropic_version] not found")
        if "model" in body:
            raise ValueError("#: extraneous key [model] is not permitted")
        if not isinstance(body.get("max_tokens"), int):
            raise ValueError("#: required key [max_tokens] not found")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or messages[0].get("role") != "user":
            raise ValueError("#/messages: first message must use the user role")
        last = messages[-1].get("content")
        text = last if isinstance(last, str) else " ".join(
            b.get("text", "") for b in last if isinstance(b, dict) and b.get("type") == "text")
        answer = f"[claude] {text[-200:]}"
        words = answer.split()
        stop = "end_turn"
        if len(words) > body["max_tokens"]:
            answer, stop = " ".join(words[:body["max_tokens"]]), "max_tokens"
        in_tokens, out_tokens = self._tokens(body), len(answer.split())
        return {"id": "msg_bdrk_" + secrets.token_hex(12), "type": "message", "role": "assistant",
                "model": re.sub(r"^(?:[a-z]+\.)?anthropic\.|-v\d+:\d+$", "", model_id),
                "content": [{"type": "text", "text": answer}], "stop_reason": stop, "stop_sequence": None,
                "usage": {"input_tokens": in_tokens, "output_tokens": out_tokens}}, (in_tokens, out_tokens)

    def _converse(self, body: dict) -> tuple[dict, tuple[int, int]]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        for m in messages:
            if m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), list):
                raise ValueError("each message needs role user|assistant and a content list")
        text = " ".join(b.get("text", "") for b in messages[-1]["content"] if isinstance(b, dict))
        answer = f"[converse] {text[-200:]}"
        in_tokens, out_tokens = self._tokens(body), len(answer.split())
        return {"output": {"message": {"role": "assistant", "content": [{"text": answer}]}},
                "stopReason": "end_turn",
                "usage": {"inputTokens": in_tokens, "outputTokens": out_tokens,
                          "totalTokens": in_tokens + out_tokens},
                "metrics": {"latencyMs": 123}}, (in_tokens, out_tokens)

    def _titan_embedding(self, body: dict) -> tuple[dict, tuple[int, int]]:
        text = body.get("inputText")
        if not isinstance(text, str) or not text:
            raise ValueError("#: required key [inputText] not found")
        dims = body.get("dimensions", 1024)
        seed = hashlib.sha256(text.encode()).digest()
        raw = [((seed[i % 32] + i) % 251) / 125.0 - 1.0 for i in range(dims)]
        norm = math.sqrt(sum(v * v for v in raw)) or 1.0
        vector = [v / norm for v in raw] if body.get("normalize", True) else raw
        tokens = max(1, len(text.split()))
        return {"embedding": vector, "embeddingsByType": {"float": vector}, "inputTextTokenCount": tokens}, \
            (tokens, 0)
