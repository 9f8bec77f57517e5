"""A fake OpenAI-compatible inference server (vLLM / Ollama / llama.cpp stand-in).

For executor tests and benchmarks. Answers are deterministic echoes whose JSON parses with the
official `openai` types (ChatCompletion, CreateEmbeddingResponse, Completion, Response,
ModerationCreateResponse), with usage.

In-process::

    up = FakeUpstream(latency_ms=0)
    base_url = await up.start()          # "http://127.0.0.1:PORT/v1"
    ...
    up.count("hello")                    # requests whose key text was "hello"
    await up.stop()

As a script (benchmarks)::

    python -m tests.fakes.openai_compatible_upstream --port 8089 --latency-ms 20

Behaviour switches, per server (attributes, or POST /_fake/config with the same names as JSON)
and per request, by a marker inside the request's *key text* (the last user message for chat,
the prompt for completions, the input for embeddings / moderations / responses):

=================  ==========================================================================
FAIL:429           429 with ``Retry-After: <retry_after_s>`` every time
FAIL:429-once      429 (Retry-After: 1) on the first request with this key text, then OK
FAIL:500           500 server_error
FAIL:400           400 invalid_request_error
FAIL:malformed     200 with a truncated JSON body
FAIL:bigheaders    200 with a whole, valid answer behind 80 KB of headers (over an HTTP client's limit)
FAIL:hang          never answers (until the server stops)
SLOW:<ms>          answer after <ms> milliseconds (on top of ``latency_ms``)
=================  ==========================================================================

Server-wide: ``latency_ms``, ``fail_mode`` (one of "429", "500", "400", "malformed", "hang"),
``retry_after_s``, ``api_key`` (401 when a Bearer key is set and doesn't match) and
``fail_next(mode, n)`` (the next n requests fail with mode).

Counting: ``counts[key_text]`` (collections.Counter) counts every request received (including
ones that were failed on purpose), ``by_path`` counts per endpoint, ``requests_total`` overall.
GET /_fake/stats returns them as JSON; POST /_fake/reset clears them.

The hot path is deliberately cheap (one json.loads, one json.dumps, no logging): it serves well
over 5,000 req/s on one core at latency 0.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import struct
import time
from typing import Any

import uvloop
from aiohttp import web

__all__ = ["FakeUpstream", "build_response", "key_text", "error_body", "MODERATION_CATEGORIES"]

ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/responses",
             "/v1/moderations")

MODERATION_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
    "self-harm", "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence",
    "violence/graphic",
)

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


# --------------------------------------------------------------------------- pure helpers

def _text_of_content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, {"type": "input_text", ...}]
        parts = []
        for part in content:
            if isinstance(part, dict):
                t = part.get("text")
                if isinstance(t, str):
                    parts.append(t)
            elif isinstance(part, str):
                parts.append(part)
        return " ".join(parts)
    return "" if content is None else str(content)


def _last_user_message(messages: Any) -> str:
    if isinstance(messages, list):
        for msg in reversed(messages):
            if isinstance(msg, dict) and msg.get("role", "user") == "user":
                return _text_of_content(msg.get("content"))
        if messages and isinstance(messages[-1], dict):
            return _text_of_content(messages[-1].get("content"))
    return _text_of_content(messages)


def key_text(path: str, body: Any) -> str:
    """The text a request is keyed (and counted) by."""
    if not isinstance(body, dict):
        return ""
    if path.endswith("/chat/completions"):
        return _last_user_message(body.get("messages"))
    if path.endswith("/completions"):
        prompt = body.get("prompt")
        return prompt[0] if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) \
            else _text_of_content(prompt)
    if path.endswith("/responses"):
        inp = body.get("input")
        return inp if isinstance(inp, str) else _last_user_message(inp)
    inp = body.get("input")  # embeddings, moderations
    if isinstance(inp, list):
        return inp[0] if inp and isinstance(inp[0], str) else _text_of_content(inp)
    return _text_of_content(inp)


def _tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


def _answer(text: str) -> str:
    return "echo: " + (text if len(text) <= 200 else text[:200])


def _vector(text: str, dims: int) -> list[float]:
    out: list[float] = []
    seed = text.encode()
    counter = 0
    while len(out) < dims:
        digest = hashlib.blake2b(seed + struct.pack("<I", counter), digest_size=32).digest()
        out.extend(round(b / 127.5 - 1.0, 6) for b in digest)
        counter += 1
    return out[:dims]


def _as_list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else [v]


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def build_response(path: str, body: dict, *, seq: int = 0, created: int | None = None,
                   text: str | None = None) -> dict:
    """A realistic, deterministic answer for `body` sent to `path` (with or without /v1)."""
    created = int(time.time()) if created is None else created
    model = body.get("model") or "fake-model"
    if text is None:
        text = key_text(path, body)
    if path.endswith("/chat/completions"):
        answer = _answer(text)
        prompt_tokens = sum(_tokens(_text_of_content(m.get("content")))
                            for m in body.get("messages") or [] if isinstance(m, dict)) or 1
        completion_tokens = _tokens(answer)
        n = body.get("n") or 1
        return {
            "id": f"chatcmpl-fake{seq:08d}", "object": "chat.completion", "created": created,
            "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": answer,
                                                 "refusal": None, "annotations": []},
                         "logprobs": None, "finish_reason": "stop"} for i in range(n)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens * n,
                      "total_tokens": prompt_tokens + completion_tokens * n,
                      "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                      "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                    "accepted_prediction_tokens": 0,
                                                    "rejected_prediction_tokens": 0}},
            "service_tier": "default", "system_fingerprint": "fp_fake",
        }
    if path.endswith("/completions"):
        prompts = [_text_of_content(p) for p in _as_list(body.get("prompt", ""))]
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, p in enumerate(prompts):
            answer = _answer(p)
            prompt_tokens += _tokens(p)
            completion_tokens += _tokens(answer)
            choices.append({"index": i, "text": answer, "logprobs": None, "finish_reason": "stop"})
        return {"id": f"cmpl-fake{seq:08d}", "object": "text_completion", "created": created,
                "model": model, "choices": choices, "system_fingerprint": "fp_fake",
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}
    if path.endswith("/embeddings"):
        inputs = [_text_of_content(x) for x in _as_list(body.get("input", ""))]
        dims = body.get("dimensions") or 8
        tokens = sum(_tokens(x) for x in inputs)
        return {"object": "list", "model": model,
                "data": [{"object": "embedding", "index": i, "embedding": _vector(x, dims)}
                         for i, x in enumerate(inputs)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    if path.endswith("/responses"):
        answer = _answer(text)
        inp = body.get("input")
        input_tokens = _tokens(inp if isinstance(inp, str) else
                               " ".join(_text_of_content(m.get("content")) for m in _as_list(inp)
                                        if isinstance(m, dict)))
        output_tokens = _tokens(answer)
        return {
            "id": f"resp_fake{seq:08d}", "object": "response", "created_at": created,
            "completed_at": created, "status": "completed", "model": model, "error": None,
            "incomplete_details": None, "instructions": body.get("instructions"),
            "metadata": {}, "parallel_tool_calls": True, "temperature": 1.0, "top_p": 1.0,
            "tool_choice": "auto", "tools": [], "max_output_tokens": body.get("max_output_tokens"),
            "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
            "text": {"format": {"type": "text"}}, "truncation": "disabled", "user": None,
            "service_tier": "default",
            "output": [{"type": "message", "id": f"msg_fake{seq:08d}", "status": "completed",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": answer, "annotations": []}]}],
            "usage": {"input_tokens": input_tokens,
                      "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                      "output_tokens": output_tokens,
                      "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": input_tokens + output_tokens},
        }
    if path.endswith("/moderations"):
        inputs = [_text_of_content(x) for x in _as_list(body.get("input", ""))]
        results = []
        for x in inputs:
            flagged = "violence" in x.lower()
            results.append({
                "flagged": flagged,
                "categories": {c: (flagged and c == "violence") for c in MODERATION_CATEGORIES},
                "category_scores": {c: (0.9 if flagged and c == "violence" else 0.0001)
                                    for c in MODERATION_CATEGORIES},
                "category_applied_input_types": {
                    c: ["text"] for c in MODERATION_CATEGORIES},
            })
        return {"id": f"modr-fake{seq:08d}", "model": body.get("model") or "omni-moderation-latest",
                "results": results}
    raise KeyError(path)


# --------------------------------------------------------------------------- the server

_JSON = "application/json"
_BODY_429 = _dumps(error_body("Rate limit reached for requests", "requests", "rate_limit_exceeded")).encode()
_BODY_500 = _dumps(error_body("The server had an error while processing your request.",
                              "server_error")).encode()
_BODY_401 = _dumps(error_body("Incorrect API key provided.", "invalid_request_error",
                              "invalid_api_key")).encode()


class FakeUpstream:
    def __init__(self, *, latency_ms: float = 0.0, fail_mode: str | None = None,
                 retry_after_s: float = 1.0, api_key: str | None = None) -> None:
        self.latency_ms = latency_ms
        self.fail_mode = fail_mode
        self.retry_after_s = retry_after_s
        self.api_key = api_key
        self.counts: collections.Counter[str] = collections.Counter()
        self.by_path: collections.Counter[str] = collections.Counter()
        self.requests_total = 0
        self.last_bodies: collections.deque[dict] = collections.deque(maxlen=100)
        self._fail_next: collections.deque[str] = collections.deque()
        self._seq = 0
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self.port = 0
        self.app = self._make_app()

    # ---- control
    def fail_next(self, mode: str, n: int = 1) -> None:
        self._fail_next.extend([mode] * n)

    def count(self, key: str) -> int:
        return self.counts.get(key, 0)

    def reset(self) -> None:
        self.counts.clear()
        self.by_path.clear()
        self.requests_total = 0
        self.last_bodies.clear()
        self._fail_next.clear()

    def stats(self) -> dict:
        return {"requests_total": self.requests_total, "by_path": dict(self.by_path),
                "counts": dict(self.counts.most_common(1000))}

    # ---- lifecycle
    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for ep in ENDPOINTS:
            app.router.add_post(ep, self._handle)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/_fake/stats", self._stats)
        app.router.add_post("/_fake/config", self._config)
        app.router.add_post("/_fake/reset", self._reset)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._stopping = asyncio.Event()
        self.app = self._make_app()  # a fresh app: an aiohttp app can't be set up twice
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                   shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port or self.port,
                           reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.base_url = f"http://{host}:{self.port}/v1"
        return self.base_url

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- handlers
    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}]})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def _config(self, request: web.Request) -> web.Response:
        cfg = await request.json()
        for k in ("latency_ms", "fail_mode", "retry_after_s", "api_key"):
            if k in cfg:
                setattr(self, k, cfg[k])
        return web.json_response({"ok": True})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.requests_total += 1
        self.by_path[path] += 1
        if self.api_key is not None and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.Response(status=401, body=_BODY_401, content_type=_JSON)
        raw = await request.read()
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            return web.Response(status=400, content_type=_JSON, body=_dumps(error_body(
                "We could not parse the JSON body of your request.", "invalid_request_error")).encode())
        text = key_text(path, body)
        self.counts[text] += 1
        self.last_bodies.append(body)

        mode = self._fail_next.popleft() if self._fail_next else self.fail_mode
        delay = self.latency_ms
        if "FAIL:" in text or "SLOW:" in text:
            if "FAIL:429-once" in text:
                if self.counts[text] == 1:
                    mode = "429-once"
            elif "FAIL:429" in text:
                mode = "429"
            elif "FAIL:500" in text:
                mode = "500"
            elif "FAIL:400" in text:
                mode = "400"
            elif "FAIL:malformed" in text:
                mode = "malformed"
            elif "FAIL:bigheaders" in text:
                mode = "bigheaders"
            elif "FAIL:hang" in text:
                mode = "hang"
            i = text.find("SLOW:")
            if i >= 0:
                j = i + 5
                while j < len(text) and (text[j].isdigit() or text[j] == "."):
                    j += 1
                try:
                    delay += float(text[i + 5:j])
                except ValueError:
                    pass
        if delay:
            await asyncio.sleep(delay / 1000.0)
        if mode:
            if mode == "429":
                return web.Response(status=429, body=_BODY_429, content_type=_JSON,
                                    headers={"Retry-After": _fmt_retry(self.retry_after_s)})
            if mode == "429-once":
                return web.Response(status=429, body=_BODY_429, content_type=_JSON,
                                    headers={"Retry-After": "1"})
            if mode == "500":
                return web.Response(status=500, body=_BODY_500, content_type=_JSON)
            if mode == "400":
                return web.Response(status=400, content_type=_JSON, body=_dumps(error_body(
                    "Invalid request (injected by FAIL:400).", "invalid_request_error",
                    "invalid_request")).encode())
            if mode == "malformed":
                return web.Response(status=200, content_type=_JSON,
                                    body=b'{"id": "chatcmpl-broken", "object": "chat.comp')
            if mode == "bigheaders":
                self._seq += 1
                return web.Response(body=_dumps(build_response(path, body, seq=self._seq, text=text)).encode(),
                                    content_type=_JSON, headers={f"x-debug-{i}": "d" * 1000 for i in range(80)})
            if mode == "hang":
                await self._stopping.wait()
                raise web.HTTPServiceUnavailable()
        self._seq += 1
        return web.Response(body=_dumps(build_response(path, body, seq=self._seq, text=text)).encode(),
                            content_type=_JSON)


def _fmt_retry(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else str(seconds)


async def _serve(host: str, port: int, latency_ms: float, fail_mode: str | None) -> None:
    up = FakeUpstream(latency_ms=latency_ms, fail_mode=fail_mode)
    url = await up.start(host, port)
    print(f"fake upstream listening on {url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await up.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8089)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--fail-mode", default=None, choices=["429", "500", "400", "malformed", "hang"])
    ap.add_argument("--plain-asyncio", action="store_true", help="the stdlib event loop instead of uvloop")
    args = ap.parse_args()
    # On uvloop, as the servers it stands in for run (vLLM's and SGLang's API servers are uvicorn on
    # uvloop): the benchmarks' ceiling is wrk against this process, and a fake slower than those
    # servers would make its own CPU the ceiling instead of the latency it is told to answer in.
    run = asyncio.run if args.plain_asyncio else uvloop.run
    try:
        run(_serve(args.host, args.port, args.latency_ms, args.fail_mode))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
