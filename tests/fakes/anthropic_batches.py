"""A fake Anthropic Message Batches API with the real lifecycle.

    api = FakeAnthropicBatches(api_key="test-key")
    base_url = await api.start()          # "http://127.0.0.1:PORT" (the SDK's base_url / api_base)
    ...
    await api.stop()

Endpoints: POST /v1/messages/batches, GET /v1/messages/batches (after_id, before_id, limit),
GET /v1/messages/batches/{id}, POST /v1/messages/batches/{id}/cancel,
DELETE /v1/messages/batches/{id}, GET /v1/messages/batches/{id}/results (JSONL stream).
Every JSON answer parses with the official ``anthropic`` types (MessageBatch,
MessageBatchIndividualResponse, DeletedMessageBatch, ErrorResponse); the official SDK client
itself works against it (tests/integration/test_anthropic_provider.py checks both).

Like Anthropic:

* every call needs the key (``x-api-key``, or ``Authorization: Bearer`` as the newest SDKs send
  it; 401 authentication_error otherwise) and an ``anthropic-version`` date (400
  invalid_request_error when missing, malformed or older than 2023-01-01); ``calls`` shows which
  headers a client really sent;
* create validates the envelope synchronously and refuses the whole batch with 400: body not
  JSON, ``requests`` not a 1..``max_requests`` array, a request that isn't
  ``{"custom_id", "params"}``, a custom_id not matching ``^[a-zA-Z0-9_-]{1,64}$`` or duplicated,
  ``params`` not an object; a body over ``max_body_bytes`` is 413 request_too_large;
* ``params`` are validated asynchronously, as Anthropic documents: a bad request (no model,
  max_tokens missing or < 1, no messages, a role other than user/assistant, an unknown
  parameter, ``stream``) ends as an ``errored`` result with invalid_request_error;
* request_counts stay ``processing == total`` until the batch ends; results_url and ended_at
  appear when it ends; results come back in a shuffled (seeded) order, not the request order.

Lifecycle: in_progress -> ended; cancel: in_progress -> canceling -> ended, requests not yet
processed become ``canceled``; ``expire(batch_id)``: the next step ends the batch with the
unprocessed requests ``expired``. The clock is one of

* ``clock="time"`` (default): one step every ``tick_ms`` since creation (caught up lazily on
  every call);
* ``clock="poll"``: each GET /v1/messages/batches/{id} advances that batch one step;
* ``clock="manual"``: only ``advance(batch_id, n)`` / ``run_to_end(batch_id)`` move it.

A step processes ``requests_per_tick`` requests (None: all). ``paused = True`` freezes every
batch (cancel still flips it to canceling), to cancel "mid-run" deterministically.

Per-request outcome by a marker in the request's user text:

=========================  ===================================================================
ANTHROPIC:errored          errored, invalid_request_error
ANTHROPIC:errored:<type>   errored with that error type (e.g. overloaded_error, api_error)
ANTHROPIC:expired          expired (the batch then ends as an expired batch would)
ANTHROPIC:tool             with ``tools``: a tool_use block calling the first tool
(none)                     succeeded: a deterministic echo Message with usage
=========================  ===================================================================

Prompt caching, by markers in the user text of a succeeded request: ``CACHE_READ:<n>`` reports n
cache_read_input_tokens, ``CACHE_WRITE_5M:<n>`` / ``CACHE_WRITE_1H:<n>`` n cache writes of that
lifetime (cache_creation_input_tokens is their sum, split in cache_creation.ephemeral_5m/1h_input_tokens
as Anthropic does); input_tokens stays the uncached words, as Anthropic counts it.

The echo: text ``"echo: " + <last user text>``; ``input_tokens`` = words in system + all
message text (at least 1), ``output_tokens`` = words of the reply, cut to max_tokens words
(stop_reason max_tokens) - so usage can be checked by hand.

Eventual consistency (``lag``, see consistency.py): a new batch stays out of GET
/v1/messages/batches for ``lag.listing`` seconds, and retrieve, cancel and results of it answer
404 not_found_error for ``lag.get`` seconds. ``gate`` holds create answers (the batch exists from
the moment the body was read, as at Anthropic) so a test can kill the caller mid-create.

Failure injection: ``inject(status, n, retry_after=None, path_contains=None, method=None,
hang=False)`` - the next n matching calls answer `status` with an Anthropic error body.

Observation: ``calls`` (method, path_qs, headers), ``created`` (per batch: request count, body
bytes, content-length header, chunked or not), ``batches``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import itertools
import json
import random
import re
import time
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from .consistency import CreateGate, Lag

__all__ = ["FakeAnthropicBatches", "FakeMessageBatch", "echo_message", "request_text"]

VERSION_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
OLDEST_VERSION = "2023-01-01"
CUSTOM_ID_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")
KNOWN_PARAMS = frozenset({
    "model", "max_tokens", "messages", "system", "temperature", "top_p", "top_k", "stop_sequences",
    "tools", "tool_choice", "metadata", "thinking", "output_config", "service_tier", "container",
    "mcp_servers", "context_management",
})
ERROR_TYPES = ("invalid_request_error", "authentication_error", "billing_error", "permission_error",
               "not_found_error", "rate_limit_error", "api_error", "overloaded_error", "timeout_error")
_ERRORED_RE = re.compile(r"ANTHROPIC:errored(?::([a-z_]+))?")
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def rfc3339(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    out = []
    if isinstance(content, list):
        for block in content:
            if isinstance(block, dict):
                if isinstance(block.get("text"), str):
                    out.append(block["text"])
                elif block.get("type") == "tool_result":
                    out.extend(_texts(block.get("content")))
    return out


def request_text(params: dict) -> str:
    """The text of the last user message (where the markers go)."""
    for msg in reversed(params.get("messages") or []):
        if isinstance(msg, dict) and msg.get("role") == "user":
            return " ".join(_texts(msg.get("content")))
    return ""


def _words(texts: list[str]) -> int:
    return sum(len(t.split()) for t in texts)


def echo_message(params: dict, msg_id: str) -> dict:
    """The deterministic Message for a succeeded request."""
    texts = _texts(params.get("system"))
    for msg in params.get("messages") or []:
        if isinstance(msg, dict):
            texts.extend(_texts(msg.get("content")))
    input_tokens = max(1, _words(texts))
    user = request_text(params)
    cache = {"CACHE_READ": 0, "CACHE_WRITE_5M": 0, "CACHE_WRITE_1H": 0}
    cache.update({k: int(n) for k, n in re.findall(r"(CACHE_READ|CACHE_WRITE_5M|CACHE_WRITE_1H):(\d+)", user)})
    max_tokens = params["max_tokens"]
    tools = params.get("tools") or []
    if "ANTHROPIC:tool" in user and tools:
        content = [{"type": "tool_use", "id": "toolu_" + msg_id[4:], "name": tools[0]["name"],
                    "input": {"query": user}}]
        output_tokens, stop_reason = min(max_tokens, 8), "tool_use"
    else:
        words = ("echo: " + user).split()
        stop_reason = "end_turn"
        if len(words) > max_tokens:
            words, stop_reason = words[:max_tokens], "max_tokens"
        content = [{"type": "text", "text": " ".join(words), "citations": None}]
        output_tokens = len(words)
    return {
        "id": msg_id, "type": "message", "role": "assistant", "model": params["model"],
        "content": content, "stop_reason": stop_reason, "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                  "cache_creation_input_tokens": cache["CACHE_WRITE_5M"] + cache["CACHE_WRITE_1H"],
                  "cache_read_input_tokens": cache["CACHE_READ"],
                  "cache_creation": {"ephemeral_5m_input_tokens": cache["CACHE_WRITE_5M"],
                                     "ephemeral_1h_input_tokens": cache["CACHE_WRITE_1H"]},
                  "service_tier": "batch"},
    }


def _param_problem(params: dict) -> str | None:
    """Anthropic's (asynchronous) validation of one request's params."""
    unknown = sorted(set(params) - KNOWN_PARAMS)
    if "stream" in params:
        return "stream: Streaming is not supported in the Message Batches API."
    if unknown:
        return f"{unknown[0]}: Extra inputs are not permitted"
    if not isinstance(params.get("model"), str) or not params["model"]:
        return "model: Field required"
    mt = params.get("max_tokens")
    if mt is None:
        return "max_tokens: Field required"
    if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
        return "max_tokens: Input should be greater than or equal to 1"
    msgs = params.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "messages: at least one message is required"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        if "content" not in m:
            return f"messages.{i}.content: Field required"
    if msgs[0]["role"] != "user":
        return "messages: first message must use the \"user\" role"
    t = params.get("temperature")
    if t is not None and (not isinstance(t, (int, float)) or not 0 <= t <= 1):
        return "temperature: Input should be less than or equal to 1"
    return None


@dataclasses.dataclass
class FakeMessageBatch:
    id: str
    created_at: float
    expires_at: float
    requests: list[tuple[str, dict]]
    processing_status: str = "in_progress"
    results: dict[str, dict] = dataclasses.field(default_factory=dict)  # custom_id -> result
    processed: int = 0
    ended_at: float | None = None
    cancel_initiated_at: float | None = None
    archived_at: float | None = None
    expire_requested: bool = False
    next_tick_at: float = 0.0
    born: float = dataclasses.field(default_factory=time.time)  # for lag

    def counts(self) -> dict[str, int]:
        c = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        if self.processing_status != "ended":
            c["processing"] = len(self.requests)
            return c
        for r in self.results.values():
            c[r["type"]] += 1
        return c


class FakeAnthropicBatches:
    def __init__(self, *, api_key: str | None = "test-key", clock: str = "time", tick_ms: float = 20.0,
                 requests_per_tick: int | None = None, max_requests: int = 100_000,
                 max_body_bytes: int = 256_000_000, shuffle_seed: int | None = 7) -> None:
        assert clock in ("time", "poll", "manual")
        self.api_key = api_key
        self.clock = clock
        self.tick_ms = tick_ms
        self.requests_per_tick = requests_per_tick
        self.max_requests = max_requests
        self.max_body_bytes = max_body_bytes
        self.shuffle_seed = shuffle_seed
        self.paused = False
        self.lag = Lag()
        self.gate = CreateGate()
        self.batches: dict[str, FakeMessageBatch] = {}
        self.calls: list[tuple[str, str, dict]] = []
        self.created: list[dict] = []
        self._injections: collections.deque[dict] = collections.deque()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self.port = 0
        self.base_url = ""

    # ------------------------------------------------------------------ control
    def inject(self, status: int, n: int = 1, *, retry_after: float | None = None,
               path_contains: str | None = None, method: str | None = None, hang: bool = False,
               error_type: str | None = None) -> None:
        for _ in range(n):
            self._injections.append({"status": status, "retry_after": retry_after,
                                     "path_contains": path_contains, "method": method, "hang": hang,
                                     "error_type": error_type})

    def expire(self, batch_id: str) -> None:
        self.batches[batch_id].expire_requested = True

    def advance(self, batch_id: str, n: int = 1) -> FakeMessageBatch:
        b = self.batches[batch_id]
        for _ in range(n):
            self._tick(b)
        return b

    def run_to_end(self, batch_id: str) -> FakeMessageBatch:
        b = self.batches[batch_id]
        while b.processing_status != "ended":
            self._tick(b)
        return b

    def calls_to(self, method: str, path_part: str) -> int:
        return sum(1 for m, p, _ in self.calls if m == method and path_part in p)

    def sent_custom_ids(self) -> list[str]:
        return [cid for b in self.batches.values() for cid, _ in b.requests]

    # ------------------------------------------------------------------ server
    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=1024 ** 3)
        r = app.router
        r.add_post("/v1/messages/batches", self._create)
        r.add_get("/v1/messages/batches", self._list)
        r.add_get("/v1/messages/batches/{id}", self._retrieve)
        r.add_post("/v1/messages/batches/{id}/cancel", self._cancel)
        r.add_delete("/v1/messages/batches/{id}", self._delete)
        r.add_get("/v1/messages/batches/{id}/results", self._results)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._stopping = asyncio.Event()
        self._runner = web.AppRunner(self._make_app(), access_log=None, handle_signals=False,
                                     shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port or self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.base_url = f"http://{host}:{self.port}"
        return self.base_url

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ helpers
    def _new_id(self, prefix: str) -> str:
        return f"{prefix}01{next(self._ids):022x}"

    def _err(self, status: int, type_: str, message: str, headers: dict | None = None) -> web.Response:
        body = {"type": "error", "error": {"type": type_, "message": message},
                "request_id": self._new_id("req_")}
        return web.Response(status=status, content_type="application/json", headers=headers,
                            body=_dumps(body).encode())

    def batch_json(self, b: FakeMessageBatch) -> dict:
        ended = b.processing_status == "ended"
        return {
            "id": b.id, "type": "message_batch", "processing_status": b.processing_status,
            "request_counts": b.counts(), "ended_at": rfc3339(b.ended_at),
            "created_at": rfc3339(b.created_at), "expires_at": rfc3339(b.expires_at),
            "archived_at": rfc3339(b.archived_at), "cancel_initiated_at": rfc3339(b.cancel_initiated_at),
            "results_url": f"{self.base_url}/v1/messages/batches/{b.id}/results" if ended else None,
        }

    def _catch_up(self, b: FakeMessageBatch) -> None:
        if self.clock != "time":
            return
        now = time.monotonic()
        while b.processing_status != "ended" and now >= b.next_tick_at and not self.paused:
            self._tick(b)
            b.next_tick_at += self.tick_ms / 1000.0

    def _outcome(self, b: FakeMessageBatch, params: dict) -> dict:
        problem = _param_problem(params)
        if problem:
            return {"type": "errored", "error": {"type": "error", "request_id": self._new_id("req_"),
                                                 "error": {"type": "invalid_request_error",
                                                           "message": problem}}}
        text = request_text(params)
        m = _ERRORED_RE.search(text)
        if m:
            etype = m.group(1) if m.group(1) in ERROR_TYPES else "invalid_request_error"
            return {"type": "errored", "error": {"type": "error", "request_id": self._new_id("req_"),
                                                 "error": {"type": etype,
                                                           "message": f"Injected {etype} (ANTHROPIC:errored)."}}}
        if "ANTHROPIC:expired" in text:
            return {"type": "expired"}
        return {"type": "succeeded", "message": echo_message(params, self._new_id("msg_"))}

    def _end(self, b: FakeMessageBatch, rest: str) -> None:
        for cid, _ in b.requests[b.processed:]:
            b.results[cid] = {"type": rest}
        b.processed = len(b.requests)
        b.processing_status = "ended"
        b.ended_at = time.time()

    def _tick(self, b: FakeMessageBatch) -> None:
        if b.processing_status == "ended" or self.paused:
            return
        if b.processing_status == "canceling":
            self._end(b, "canceled")
            return
        if b.expire_requested:
            self._end(b, "expired")
            return
        n = len(b.requests) - b.processed if self.requests_per_tick is None else self.requests_per_tick
        for cid, params in b.requests[b.processed:b.processed + n]:
            b.results[cid] = self._outcome(b, params)
        b.processed = min(len(b.requests), b.processed + n)
        if b.processed >= len(b.requests):
            b.processing_status = "ended"
            b.ended_at = time.time()

    def _batch_or_404(self, request: web.Request) -> FakeMessageBatch | web.Response:
        b = self.batches.get(request.match_info["id"])
        if b is None or not self.lag.found(b.born):
            return self._err(404, "not_found_error", f"Message batch {request.match_info['id']} not found.")
        self._catch_up(b)
        return b

    # ------------------------------------------------------------------ middleware
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.calls.append((request.method, request.path_qs, dict(request.headers)))
        if self.api_key is not None and request.headers.get("x-api-key") != self.api_key and \
                request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._err(401, "authentication_error", "invalid x-api-key")
        version = request.headers.get("anthropic-version")
        if not version:
            return self._err(400, "invalid_request_error", "anthropic-version: header is required")
        if not VERSION_RE.fullmatch(version) or version < OLDEST_VERSION:
            return self._err(400, "invalid_request_error", f"anthropic-version: {version!r} is not a valid version")
        for inj in list(self._injections):
            if (inj["path_contains"] is None or inj["path_contains"] in request.path) and \
                    (inj["method"] is None or inj["method"] == request.method):
                self._injections.remove(inj)
                if request.can_read_body:
                    await request.read()
                if inj["hang"]:
                    await self._stopping.wait()
                    raise web.HTTPServiceUnavailable()
                status = inj["status"]
                etype = inj["error_type"] or {429: "rate_limit_error", 529: "overloaded_error",
                                              401: "authentication_error", 403: "permission_error",
                                              404: "not_found_error"}.get(status, "api_error")
                headers = {"retry-after": str(inj["retry_after"])} if inj["retry_after"] is not None else None
                return self._err(status, etype, f"Injected failure ({status}).", headers)
        return await handler(request)

    # ------------------------------------------------------------------ handlers
    async def _create(self, request: web.Request) -> web.Response:
        stats = {"content_length": request.headers.get("Content-Length"),
                 "chunked": request.headers.get("Transfer-Encoding", "").lower() == "chunked",
                 "bytes": 0, "requests": 0, "status": None}
        self.created.append(stats)
        raw = bytearray()
        async for chunk in request.content.iter_chunked(256 * 1024):
            raw += chunk
            if len(raw) > self.max_body_bytes:
                stats["status"] = 413
                return self._err(413, "request_too_large",
                                 f"Request exceeds the maximum allowed number of bytes ({self.max_body_bytes}).")
        stats["bytes"] = len(raw)

        def bad(message: str) -> web.Response:
            stats["status"] = 400
            return self._err(400, "invalid_request_error", message)

        try:
            body = json.loads(raw)
        except ValueError:
            return bad("Request body is not valid JSON.")
        del raw
        reqs = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(reqs, list):
            return bad("requests: Field required")
        if not reqs:
            return bad("requests: List should have at least 1 item after validation, not 0")
        if len(reqs) > self.max_requests:
            return bad(f"requests: List should have at most {self.max_requests} items after validation, "
                       f"not {len(reqs)}")
        seen: set[str] = set()
        parsed: list[tuple[str, dict]] = []
        for i, r in enumerate(reqs):
            if not isinstance(r, dict) or set(r) != {"custom_id", "params"}:
                return bad(f"requests.{i}: each request needs exactly 'custom_id' and 'params'")
            cid = r["custom_id"]
            if not isinstance(cid, str) or not CUSTOM_ID_RE.fullmatch(cid):
                return bad(f"requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'")
            if cid in seen:
                return bad(f"requests.{i}.custom_id: Duplicate custom_id {cid!r}; custom_id must be "
                           "unique within a batch")
            seen.add(cid)
            if not isinstance(r["params"], dict):
                return bad(f"requests.{i}.params: Input should be a valid dictionary")
            parsed.append((cid, r["params"]))
        stats["requests"] = len(parsed)
        stats["status"] = 200
        now = time.time()
        b = FakeMessageBatch(id=self._new_id("msgbatch_"), created_at=now, expires_at=now + 86400,
                             requests=parsed, next_tick_at=time.monotonic() + self.tick_ms / 1000.0)
        self.batches[b.id] = b
        await self.gate.passed()
        return web.json_response(self.batch_json(b))

    async def _list(self, request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", 20))
        except ValueError:
            return self._err(400, "invalid_request_error", "limit: Input should be a valid integer")
        if not 1 <= limit <= 1000:
            return self._err(400, "invalid_request_error", "limit: Input should be between 1 and 1000")
        items = sorted((b for b in self.batches.values() if self.lag.listed(b.born)),
                       key=lambda b: b.id, reverse=True)  # newest first
        for b in items:
            self._catch_up(b)
        ids = [b.id for b in items]
        if request.query.get("after_id") in ids:
            items = items[ids.index(request.query["after_id"]) + 1:]
        elif request.query.get("before_id") in ids:
            items = items[:ids.index(request.query["before_id"])][-limit:]
        page = items[:limit]
        return web.json_response({"data": [self.batch_json(b) for b in page], "has_more": len(items) > limit,
                                  "first_id": page[0].id if page else None,
                                  "last_id": page[-1].id if page else None})

    async def _retrieve(self, request: web.Request) -> web.Response:
        b = self._batch_or_404(request)
        if isinstance(b, web.Response):
            return b
        if self.clock == "poll":
            self._tick(b)
        return web.json_response(self.batch_json(b))

    async def _cancel(self, request: web.Request) -> web.Response:
        b = self._batch_or_404(request)
        if isinstance(b, web.Response):
            return b
        if b.processing_status == "ended":
            return self._err(400, "invalid_request_error",
                             f"Message batch {b.id} has already ended and cannot be canceled.")
        if b.processing_status == "in_progress":
            b.processing_status = "canceling"
            b.cancel_initiated_at = time.time()
        return web.json_response(self.batch_json(b))

    async def _delete(self, request: web.Request) -> web.Response:
        b = self._batch_or_404(request)
        if isinstance(b, web.Response):
            return b
        if b.processing_status != "ended":
            return self._err(400, "invalid_request_error",
                             f"Message batch {b.id} is still processing; cancel it before deleting it.")
        del self.batches[b.id]
        return web.json_response({"id": b.id, "type": "message_batch_deleted"})

    async def _results(self, request: web.Request) -> web.StreamResponse:
        b = self._batch_or_404(request)
        if isinstance(b, web.Response):
            return b
        if b.processing_status != "ended":
            return self._err(400, "invalid_request_error",
                             f"Message batch {b.id} has not finished processing; results are not available yet.")
        order = [cid for cid, _ in b.requests]
        if self.shuffle_seed is not None:
            seed = int(hashlib.sha256(f"{self.shuffle_seed}:{b.id}".encode()).hexdigest()[:8], 16)
            random.Random(seed).shuffle(order)
        resp = web.StreamResponse(headers={"Content-Type": "application/binary"})
        await resp.prepare(request)
        buf = bytearray()
        for cid in order:
            buf += _dumps({"custom_id": cid, "result": b.results[cid]}).encode() + b"\n"
            if len(buf) >= 64 * 1024:
                await resp.write(bytes(buf))
                buf.clear()
        if buf:
            await resp.write(bytes(buf))
        await resp.write_eof()
        return resp
