"""A fake OpenAI Files + Batches API (and its Azure OpenAI variant) with the real lifecycle.

    api = FakeBatchAPI(api_key="sk-test")                    # OpenAI: /v1/files, /v1/batches
    base_url = await api.start()                              # "http://127.0.0.1:PORT/v1"
    ...
    await api.stop()

    az = FakeBatchAPI(azure=True, api_key="az-key")           # /openai/files?api-version=…
    endpoint = await az.start()                               # "http://127.0.0.1:PORT" (azure_endpoint)

Lifecycle: validating -> (failed | in_progress) -> finalizing -> completed, plus
cancelling -> cancelled and expired. The clock is one of:

* ``clock="poll"`` (default): each GET /batches/{id} advances that batch one step, then answers;
* ``clock="time"``: one step every ``step_ms`` milliseconds since creation (caught up lazily);
* ``clock="manual"``: only ``api.advance(batch_id, n)`` / ``api.run_to_end(batch_id)`` move it.

While in_progress a step processes ``lines_per_tick`` lines (None: all), so a cancel or an expiry
can land with partial output. Processing is a deterministic echo (see openai_compatible_upstream):
a line whose body contains "FAIL" gets an error line with status 400 instead.

Validation (at the validating -> step) mirrors OpenAI's: empty_file, too_many_tasks,
invalid_json_line, invalid_request (missing custom_id/method/url/body, method not POST),
url_mismatch, duplicate_custom_id, model_mismatch, model_not_found (when ``known_models`` is set),
each with its 1-based line; any error fails the batch with errors.data.

Switches: ``api_key`` (401 on a wrong key: Bearer for OpenAI, ``api-key`` header for Azure),
``inject(status, n, retry_after=None, path_contains=None, body=None)`` (the next n matching calls
fail), ``expire(batch_id)`` / ``expire_all`` (the next in_progress step expires the batch:
partial output + batch_expired error lines), ``store_uploads=False`` (keep only statistics of
uploaded files: for memory tests; with ``synthetic_output=True`` each uploaded line's custom_id and
size are kept and answered by an output line of about the same size, generated while the output file
is downloaded: a 200 MB round trip without the fake holding 200 MB), and the Azure quirks ``capitalized_status``,
``iso_timestamps``, ``null_request_counts``, ``empty_error_file``.

Eventual consistency (``lag``, see consistency.py): a new batch or file stays out of GET /batches
and GET /files for ``lag.listing`` seconds, and GET and cancel of a new batch answer 404 for
``lag.get`` seconds. ``gate`` holds POST /batches answers (the batch exists already, as at a real
provider that received the request) so a test can kill the caller mid-create.

Observation: ``calls`` (list of (method, path_qs, headers)), ``uploads`` (UploadStats per file id),
``files``, ``batches``, ``created_batch_requests`` (the JSON bodies of POST /batches).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import json
import time
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from .consistency import CreateGate, Lag
from .openai_compatible_upstream import build_response, error_body

__all__ = ["FakeBatchAPI", "FakeFile", "FakeBatch", "UploadStats"]

OPENAI_ENDPOINTS = ("/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions",
                    "/v1/moderations")
AZURE_ENDPOINTS = ("/chat/completions", "/embeddings", "/responses")
TERMINAL = {"failed", "completed", "expired", "cancelled"}
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclasses.dataclass
class UploadStats:
    lines: int = 0
    bytes: int = 0
    models: set = dataclasses.field(default_factory=set)
    urls: set = dataclasses.field(default_factory=set)
    first_line: bytes = b""
    chunked: bool = False
    content_type: str = ""
    records: list | None = None  # (custom_id, line bytes) per line, when synthetic_output is on
    started_at: float = 0.0  # time.monotonic() of the first and the last body chunk
    finished_at: float = 0.0


@dataclasses.dataclass
class FakeFile:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    content: bytes | None  # None when uploads are not stored
    expires_at: int | None = None
    source: Any = None  # () -> iterator of bytes: content generated while it is downloaded
    born: float = dataclasses.field(default_factory=time.time)  # for lag

    def json(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "expires_at": self.expires_at, "status_details": None}


@dataclasses.dataclass
class FakeBatch:
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: dict | None
    created_at: int
    expires_at: int
    status: str = "validating"
    model: str | None = None
    times: dict = dataclasses.field(default_factory=dict)  # in_progress_at, ...
    errors: list = dataclasses.field(default_factory=list)
    total: int = 0
    completed: int = 0
    failed: int = 0
    lines: list = dataclasses.field(default_factory=list)  # validated input lines (dicts)
    processed: int = 0
    out_lines: list = dataclasses.field(default_factory=list)
    err_lines: list = dataclasses.field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None
    usage: dict = dataclasses.field(default_factory=lambda: {"input_tokens": 0, "output_tokens": 0})
    expire_requested: bool = False
    next_tick_at: float = 0.0
    born: float = dataclasses.field(default_factory=time.time)  # for lag


class FakeBatchAPI:
    def __init__(self, *, azure: bool = False, api_key: str | None = "sk-test", clock: str = "poll",
                 step_ms: float = 50.0, lines_per_tick: int | None = None,
                 max_lines: int | None = None, known_models: set[str] | None = None,
                 store_uploads: bool = True, synthetic_output: bool = False,
                 capitalized_status: bool = False,
                 iso_timestamps: bool = False, null_request_counts: bool = False,
                 empty_error_file: bool = False) -> None:
        self.azure = azure
        self.api_key = api_key
        self.clock = clock
        self.step_ms = step_ms
        self.lines_per_tick = lines_per_tick
        self.max_lines = max_lines if max_lines is not None else (100_000 if azure else 50_000)
        self.known_models = known_models
        self.store_uploads = store_uploads
        self.synthetic_output = synthetic_output
        # file id -> (first byte sent, last byte sent, bytes) of GET /files/{id}/content
        self.downloads: dict[str, tuple[float, float, int]] = {}
        self.capitalized_status = capitalized_status
        self.iso_timestamps = iso_timestamps
        self.null_request_counts = null_request_counts
        self.empty_error_file = empty_error_file
        self.expire_all = False
        self.lag = Lag()
        self.gate = CreateGate()
        self.prefix = "/openai" if azure else "/v1"
        self.files: dict[str, FakeFile] = {}
        self.batches: dict[str, FakeBatch] = {}
        self.uploads: dict[str, UploadStats] = {}
        self.calls: list[tuple[str, str, dict]] = []
        self.created_batch_requests: list[dict] = []
        self._injections: collections.deque[dict] = collections.deque()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self.host = "127.0.0.1"
        self.port = 0
        self.base_url = ""
        self.app = self._make_app()

    # ------------------------------------------------------------------ control
    def inject(self, status: int, n: int = 1, *, retry_after: float | None = None,
               path_contains: str | None = None, body: dict | None = None,
               method: str | None = None, hang: bool = False) -> None:
        """The next n calls (whose path contains path_contains, with that method) answer
        `status` (hang=True: never answer, until the server stops)."""
        for _ in range(n):
            self._injections.append({"status": status, "retry_after": retry_after,
                                     "path_contains": path_contains, "body": body,
                                     "method": method, "hang": hang})

    def expire(self, batch_id: str) -> None:
        self.batches[batch_id].expire_requested = True

    def advance(self, batch_id: str, n: int = 1) -> FakeBatch:
        b = self.batches[batch_id]
        for _ in range(n):
            self._tick(b)
        return b

    def run_to_end(self, batch_id: str) -> FakeBatch:
        b = self.batches[batch_id]
        for _ in range(10_000):
            if b.status in TERMINAL:
                break
            self._tick(b)
        return b

    def calls_to(self, method: str, path_part: str) -> int:
        return sum(1 for m, p, _ in self.calls if m == method and path_part in p)

    # ------------------------------------------------------------------ lifecycle
    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=1024 ** 3)
        p = self.prefix
        r = app.router
        r.add_post(f"{p}/files", self._create_file)
        r.add_get(f"{p}/files", self._list_files)
        r.add_get(f"{p}/files/{{id}}", self._get_file)
        r.add_get(f"{p}/files/{{id}}/content", self._file_content)
        r.add_delete(f"{p}/files/{{id}}", self._delete_file)
        r.add_post(f"{p}/batches", self._create_batch)
        r.add_get(f"{p}/batches", self._list_batches)
        r.add_get(f"{p}/batches/{{id}}", self._get_batch)
        r.add_post(f"{p}/batches/{{id}}/cancel", self._cancel_batch)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start serving; returns the base URL (OpenAI: .../v1; Azure: the resource endpoint)."""
        self._stopping = asyncio.Event()
        self.app = self._make_app()  # a fresh app: an aiohttp app can't be set up twice
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                   shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port or self.port,
                           reuse_address=True)
        await site.start()
        self.host = host
        self.port = self._runner.addresses[0][1]
        root = f"http://{host}:{self.port}"
        self.base_url = root if self.azure else root + "/v1"
        return self.base_url

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ helpers
    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):024x}"

    def _err(self, status: int, message: str, type_: str = "invalid_request_error",
             code: str | None = None, param: str | None = None,
             headers: dict | None = None) -> web.Response:
        if self.azure and status in (401, 404) and code is None:
            code = str(status)
        return web.Response(status=status, content_type="application/json", headers=headers,
                            body=_dumps(error_body(message, type_, code, param)).encode())

    def _ts(self, t: int | float | None) -> Any:
        if t is None:
            return None
        if self.iso_timestamps:
            return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")
        return int(t)

    def _batch_json(self, b: FakeBatch) -> dict:
        status = b.status.capitalize() if self.capitalized_status else b.status
        d: dict[str, Any] = {
            "id": b.id, "object": "batch", "endpoint": b.endpoint, "model": b.model,
            "errors": ({"object": "list", "data": b.errors} if b.errors else None),
            "input_file_id": b.input_file_id, "completion_window": b.completion_window,
            "status": status, "output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
            "created_at": self._ts(b.created_at), "expires_at": self._ts(b.expires_at),
        }
        for k in ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
                  "cancelling_at", "cancelled_at"):
            d[k] = self._ts(b.times.get(k))
        d["request_counts"] = None if self.null_request_counts else {
            "total": b.total, "completed": b.completed, "failed": b.failed}
        d["metadata"] = b.metadata
        u = b.usage
        d["usage"] = {"input_tokens": u["input_tokens"], "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": u["output_tokens"],
                      "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": u["input_tokens"] + u["output_tokens"]}
        return d

    def _add_file(self, filename: str, purpose: str, content: bytes) -> FakeFile:
        f = FakeFile(id=self._new_id("file-"), filename=filename, purpose=purpose,
                     bytes=len(content), created_at=int(time.time()), content=content)
        self.files[f.id] = f
        return f

    def _catch_up(self, b: FakeBatch) -> None:
        if self.clock != "time":
            return
        now = time.monotonic()
        while b.status not in TERMINAL and now >= b.next_tick_at:
            self._tick(b)
            b.next_tick_at += self.step_ms / 1000.0

    # ------------------------------------------------------------------ the state machine
    def _tick(self, b: FakeBatch) -> None:
        now = int(time.time())
        if b.status == "validating":
            self._validate(b)
            if b.errors:
                b.status = "failed"
                b.times["failed_at"] = now
            else:
                b.status = "in_progress"
                b.times["in_progress_at"] = now
                b.total = len(b.lines)
        elif b.status == "in_progress":
            if b.expire_requested or self.expire_all:
                for line in b.lines[b.processed:]:
                    b.err_lines.append(_dumps({
                        "id": self._new_id("batch_req_"), "custom_id": line["custom_id"],
                        "response": None,
                        "error": {"code": "batch_expired",
                                  "message": "This request could not be executed before the "
                                             "completion window expired."}}))
                self._write_results(b)
                b.status = "expired"
                b.times["expired_at"] = now
                return
            n = len(b.lines) - b.processed if self.lines_per_tick is None else self.lines_per_tick
            for line in b.lines[b.processed:b.processed + n]:
                self._process(b, line)
            b.processed = min(len(b.lines), b.processed + n)
            if b.processed >= len(b.lines):
                b.status = "finalizing"
                b.times["finalizing_at"] = now
        elif b.status == "finalizing":
            self._write_results(b)
            b.status = "completed"
            b.times["completed_at"] = now
        elif b.status == "cancelling":
            self._write_results(b)
            b.status = "cancelled"
            b.times["cancelled_at"] = now

    def _validate(self, b: FakeBatch) -> None:
        f = self.files.get(b.input_file_id)
        errors: list[dict] = []

        def err(code: str, message: str, line: int | None = None, param: str | None = None) -> None:
            if len(errors) < 100:
                errors.append({"code": code, "message": message, "param": param, "line": line})

        if f is None:
            err("invalid_request", f"Input file {b.input_file_id} no longer exists.")
            b.errors = errors
            return
        stats = self.uploads.get(f.id)
        if f.content is None and stats is not None and stats.records is not None:
            b.model = next(iter(stats.models), None)
            b.lines = [{"custom_id": cid, "_size": size} for cid, size in stats.records]
            return
        if f.content is None:  # statistics-only upload: accept, nothing to process
            b.lines = []
            return
        raw_lines = [ln.rstrip(b"\r") for ln in f.content.split(b"\n")]
        if raw_lines and raw_lines[-1].strip() == b"":
            raw_lines.pop()
        if not raw_lines:
            err("empty_file", "The input file is empty.")
        elif len(raw_lines) > self.max_lines:
            err("too_many_tasks", f"The batch input file has {len(raw_lines)} requests; the "
                                  f"maximum is {self.max_lines}.")
        seen: set[str] = set()
        model: str | None = None
        lines: list[dict] = []
        for no, raw in enumerate(raw_lines if len(raw_lines) <= self.max_lines else [], start=1):
            try:
                obj = json.loads(raw)
            except ValueError:
                err("invalid_json_line", "This line is not parseable as valid JSON.", no)
                continue
            if not isinstance(obj, dict):
                err("invalid_json_line", "Each line must be a JSON object.", no)
                continue
            missing = [k for k in ("custom_id", "method", "url", "body") if k not in obj]
            if missing:
                err("invalid_request", f"Missing required parameter: '{missing[0]}'.", no, missing[0])
                continue
            if obj["method"] != "POST":
                err("invalid_request", "Only POST is supported.", no, "method")
                continue
            if obj["url"] != b.endpoint:
                err("url_mismatch", f"The provided URL '{obj['url']}' does not match the batch "
                                    f"endpoint '{b.endpoint}'.", no, "url")
                continue
            cid = obj["custom_id"]
            if not isinstance(cid, str) or cid in seen:
                err("duplicate_custom_id", f"The custom_id '{cid}' is duplicated.", no, "custom_id")
                continue
            seen.add(cid)
            body = obj["body"]
            m = body.get("model") if isinstance(body, dict) else None
            if not isinstance(m, str):
                err("invalid_request", "Missing required parameter: 'body.model'.", no, "body.model")
                continue
            if model is None:
                model = m
                if self.known_models is not None and m not in self.known_models:
                    err("model_not_found", f"The model '{m}' does not exist.", no, "body.model")
            elif m != model:
                err("model_mismatch", f"Each input file must use a single model; line uses "
                                      f"'{m}', expected '{model}'.", no, "body.model")
                continue
            obj["_raw"] = raw
            lines.append(obj)
        b.errors = errors
        b.model = model
        b.lines = [] if errors else lines

    def _process(self, b: FakeBatch, line: dict) -> None:
        if "_size" in line:  # synthetic: answered when the output file is read
            b.completed += 1
            b.usage["input_tokens"] += line["_size"] // 4
            b.usage["output_tokens"] += line["_size"] // 4
            return
        req_id = self._new_id("req_")
        if b"FAIL" in line["_raw"]:
            b.failed += 1
            b.err_lines.append(_dumps({
                "id": self._new_id("batch_req_"), "custom_id": line["custom_id"],
                "response": {"status_code": 400, "request_id": req_id, "body": error_body(
                    "Invalid request: the body contains FAIL.", "invalid_request_error",
                    "invalid_value", "messages")},
                "error": None}))
            return
        body = build_response(b.endpoint, line["body"], seq=next(self._ids))
        usage = body.get("usage") or {}
        b.usage["input_tokens"] += usage.get("prompt_tokens", usage.get("input_tokens", 0))
        b.usage["output_tokens"] += usage.get("completion_tokens", usage.get("output_tokens", 0))
        b.completed += 1
        b.out_lines.append(_dumps({"id": self._new_id("batch_req_"), "custom_id": line["custom_id"],
                                   "response": {"status_code": 200, "request_id": req_id,
                                                "body": body},
                                   "error": None}))

    def _synthetic_output(self, b: FakeBatch, lines: list):
        template = build_response(b.endpoint, {"model": b.model, "messages": []}, text="")
        template["choices"][0]["message"]["content"] = ""
        overhead = 140 + len(_dumps(template))  # + the envelope around the body, roughly
        for no, line in enumerate(lines):
            size = line["_size"]
            template["id"] = f"chatcmpl-synth{no:08d}"
            template["choices"][0]["message"]["content"] = "y" * max(16, size - overhead)
            template["usage"]["prompt_tokens"] = template["usage"]["completion_tokens"] = size // 4
            template["usage"]["total_tokens"] = size // 2
            yield _dumps({"id": f"batch_req_synth{no:08d}", "custom_id": line["custom_id"],
                          "response": {"status_code": 200, "request_id": f"req_synth{no:08d}",
                                       "body": template},
                          "error": None}).encode() + b"\n"

    def _write_results(self, b: FakeBatch) -> None:
        synthetic = [line for line in b.lines[:b.processed] if "_size" in line]
        if synthetic:
            f = FakeFile(id=self._new_id("file-"), filename=f"{b.id}_output.jsonl",
                         purpose="batch_output", bytes=sum(line["_size"] for line in synthetic),
                         created_at=int(time.time()), content=None,
                         source=lambda: self._synthetic_output(b, synthetic))
            self.files[f.id] = f
            b.output_file_id = f.id
        if b.out_lines:
            b.output_file_id = self._add_file(f"{b.id}_output.jsonl", "batch_output",
                                              ("\n".join(b.out_lines) + "\n").encode()).id
        if b.err_lines:
            b.error_file_id = self._add_file(f"{b.id}_error.jsonl", "batch_output",
                                             ("\n".join(b.err_lines) + "\n").encode()).id
        elif self.empty_error_file:
            b.error_file_id = self._add_file(f"{b.id}_error.jsonl", "batch_output", b"").id

    # ------------------------------------------------------------------ middleware
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.calls.append((request.method, request.path_qs, dict(request.headers)))
        if self.azure:
            if self.api_key is not None and request.headers.get("api-key") != self.api_key:
                return self._err(401, "Access denied due to invalid subscription key or wrong API "
                                      "endpoint. Make sure to provide a valid key for an active "
                                      "subscription and use a correct regional API endpoint for "
                                      "your resource.")
            if not request.query.get("api-version"):
                return self._err(404, "Resource not found (missing api-version).")
        elif self.api_key is not None and \
                request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._err(401, "Incorrect API key provided.", code="invalid_api_key")
        for inj in list(self._injections):
            if (inj["path_contains"] is None or inj["path_contains"] in request.path) and \
                    (inj["method"] is None or inj["method"] == request.method):
                self._injections.remove(inj)
                if request.can_read_body:
                    await request.read()
                if inj["hang"]:
                    await self._stopping.wait()
                    raise web.HTTPServiceUnavailable()
                headers = {}
                if inj["retry_after"] is not None:
                    headers["Retry-After"] = str(inj["retry_after"])
                body = inj["body"] or error_body(
                    "Injected failure.", "rate_limit_exceeded" if inj["status"] == 429 else
                    "server_error", "rate_limit_exceeded" if inj["status"] == 429 else None)
                return web.Response(status=inj["status"], content_type="application/json",
                                    headers=headers, body=_dumps(body).encode())
        return await handler(request)

    # ------------------------------------------------------------------ files
    async def _create_file(self, request: web.Request) -> web.Response:
        if not request.content_type.startswith("multipart/"):
            return self._err(400, "The request must be multipart/form-data.")
        reader = await request.multipart()
        purpose = None
        filename = None
        stats = UploadStats(chunked=request.headers.get("Transfer-Encoding", "").lower() == "chunked",
                            content_type=request.headers.get("Content-Type", ""))
        content = bytearray() if self.store_uploads else None
        if not self.store_uploads and self.synthetic_output:
            stats.records = []
        got_file = False
        async for part in reader:
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "file":
                got_file = True
                filename = part.filename or "upload.jsonl"
                pending = b""
                while True:
                    chunk = await part.read_chunk(256 * 1024)
                    if not chunk:
                        break
                    if not stats.started_at:
                        stats.started_at = time.monotonic()
                    stats.finished_at = time.monotonic()
                    stats.bytes += len(chunk)
                    if content is not None:
                        content += chunk
                    pending += chunk
                    *complete, pending = pending.split(b"\n")
                    for ln in complete:
                        self._line_stats(stats, ln)
                if pending:
                    self._line_stats(stats, pending)
            else:
                await part.read()
        if not got_file:
            return self._err(400, "Missing required parameter: 'file'.", param="file")
        if purpose is None:
            return self._err(400, "Missing required parameter: 'purpose'.", param="purpose")
        if purpose not in ("batch", "fine-tune", "assistants", "vision", "user_data", "evals"):
            return self._err(400, f"'{purpose}' is not one of the supported purposes.",
                             param="purpose")
        f = FakeFile(id=self._new_id("file-"), filename=filename or "upload.jsonl", purpose=purpose,
                     bytes=stats.bytes, created_at=int(time.time()),
                     content=bytes(content) if content is not None else None,
                     expires_at=int(time.time()) + 30 * 86400 if purpose == "batch" else None)
        self.files[f.id] = f
        self.uploads[f.id] = stats
        return web.json_response(f.json())

    @staticmethod
    def _line_stats(stats: UploadStats, ln: bytes) -> None:
        if not ln.strip():
            return
        stats.lines += 1
        if not stats.first_line:
            stats.first_line = ln
        try:
            obj = json.loads(ln)
            stats.urls.add(obj.get("url"))
            stats.models.add((obj.get("body") or {}).get("model"))
            if stats.records is not None:
                stats.records.append((obj.get("custom_id"), len(ln)))
        except (ValueError, AttributeError):
            stats.urls.add(None)

    async def _list_files(self, request: web.Request) -> web.Response:
        files = sorted((f for f in self.files.values() if self.lag.listed(f.born)), key=lambda f: f.id,
                       reverse=request.query.get("order", "desc") == "desc")
        purpose = request.query.get("purpose")
        if purpose:
            files = [f for f in files if f.purpose == purpose]
        return web.json_response(self._page(request, [f.json() for f in files], default_limit=10000,
                                                   max_limit=10000))

    def _file_or_404(self, request: web.Request) -> FakeFile | web.Response:
        f = self.files.get(request.match_info["id"])
        if f is None:
            return self._err(404, f"No such File object: {request.match_info['id']}", param="id")
        return f

    async def _get_file(self, request: web.Request) -> web.Response:
        f = self._file_or_404(request)
        return f if isinstance(f, web.Response) else web.json_response(f.json())

    async def _file_content(self, request: web.Request) -> web.StreamResponse:
        f = self._file_or_404(request)
        if isinstance(f, web.Response):
            return f
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        started, sent = time.monotonic(), 0
        if f.source is not None:  # generated as it goes out (chunked)
            await resp.prepare(request)
            buf = bytearray()
            for piece in f.source():
                buf += piece
                if len(buf) >= 256 * 1024:
                    await resp.write(bytes(buf))
                    sent += len(buf)
                    buf.clear()
            if buf:
                await resp.write(bytes(buf))
                sent += len(buf)
        else:
            data = f.content or b""
            resp.content_length = len(data)
            await resp.prepare(request)
            for i in range(0, len(data), 64 * 1024):
                await resp.write(data[i:i + 64 * 1024])
            sent = len(data)
        await resp.write_eof()
        self.downloads[f.id] = (started, time.monotonic(), sent)
        return resp

    async def _delete_file(self, request: web.Request) -> web.Response:
        f = self._file_or_404(request)
        if isinstance(f, web.Response):
            return f
        del self.files[f.id]
        return web.json_response({"id": f.id, "object": "file", "deleted": True})

    # ------------------------------------------------------------------ batches
    def _page(self, request: web.Request, items: list[dict], default_limit: int = 20,
              max_limit: int = 100) -> dict:
        try:
            limit = int(request.query.get("limit", default_limit))
        except ValueError:
            limit = default_limit
        limit = max(1, min(limit, max_limit))
        after = request.query.get("after")
        if after:
            ids = [i["id"] for i in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}

    async def _create_batch(self, request: web.Request) -> web.Response:
        try:
            req = await request.json()
        except ValueError:
            return self._err(400, "We could not parse the JSON body of your request.")
        self.created_batch_requests.append(req)
        for k in ("input_file_id", "endpoint", "completion_window"):
            if k not in req:
                return self._err(400, f"Missing required parameter: '{k}'.", param=k)
        endpoints = AZURE_ENDPOINTS if self.azure else OPENAI_ENDPOINTS
        if req["endpoint"] not in endpoints:
            return self._err(400, f"Invalid value: '{req['endpoint']}'. Supported values are: "
                                  + ", ".join(f"'{e}'" for e in endpoints) + ".", param="endpoint",
                             code="invalid_value")
        if req["completion_window"] != "24h":
            return self._err(400, "Invalid value for 'completion_window': only '24h' is supported.",
                             param="completion_window", code="invalid_value")
        f = self.files.get(req["input_file_id"])
        if f is None:
            return self._err(404, f"No such File object: {req['input_file_id']}",
                             param="input_file_id")
        if f.purpose != "batch":
            return self._err(400, "The input file must have purpose 'batch'.",
                             param="input_file_id")
        md = req.get("metadata")
        if md is not None and (not isinstance(md, dict) or len(md) > 16):
            return self._err(400, "Invalid metadata: at most 16 string pairs.", param="metadata")
        now = int(time.time())
        b = FakeBatch(id=self._new_id("batch_"), endpoint=req["endpoint"],
                      input_file_id=f.id, completion_window="24h", metadata=md,
                      created_at=now, expires_at=now + 86400,
                      next_tick_at=time.monotonic() + self.step_ms / 1000.0)
        self.batches[b.id] = b
        await self.gate.passed()
        return web.json_response(self._batch_json(b))

    def _batch_or_404(self, request: web.Request) -> FakeBatch | web.Response:
        b = self.batches.get(request.match_info["id"])
        if b is None or not self.lag.found(b.born):
            return self._err(404, f"No batch found with id '{request.match_info['id']}'.")
        return b

    async def _get_batch(self, request: web.Request) -> web.Response:
        b = self._batch_or_404(request)
        if isinstance(b, web.Response):
            return b
        if self.clock == "poll":
            self._tick(b)
        self._catch_up(b)
        return web.json_response(self._batch_json(b))

    async def _list_batches(self, request: web.Request) -> web.Response:
        batches = sorted((b for b in self.batches.values() if self.lag.listed(b.born)), key=lambda b: b.id,
                         reverse=True)
        for b in batches:
            self._catch_up(b)
        return web.json_response(self._page(request, [self._batch_json(b) for b in batches]))

    async def _cancel_batch(self, request: web.Request) -> web.Response:
        b = self._batch_or_404(request)
        if isinstance(b, web.Response):
            return b
        self._catch_up(b)
        if b.status in TERMINAL:
            return self._err(409, f"Cannot cancel a batch with status '{b.status}'.")
        if b.status != "cancelling":
            b.status = "cancelling"
            b.times["cancelling_at"] = int(time.time())
        return web.json_response(self._batch_json(b))


async def _main() -> None:  # pragma: no cover - manual use
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8090)
    ap.add_argument("--azure", action="store_true")
    ap.add_argument("--api-key", default="sk-test")
    ap.add_argument("--clock", default="time")
    ap.add_argument("--step-ms", type=float, default=1000)
    a = ap.parse_args()
    api = FakeBatchAPI(azure=a.azure, api_key=a.api_key, clock=a.clock, step_ms=a.step_ms)
    print("fake batch API on", await api.start(port=a.port), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":  # pragma: no cover
    asyncio.run(_main())
