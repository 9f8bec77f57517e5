"""`simulated`: a deterministic in-process model for demos and tests.

Replies echo the request, plainly marked as simulated, with token counts
computed from the text (a word or punctuation mark is one token). Optional
latency and a deterministic failure rate (by custom_id) exercise the executor.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from typing import Any

from batchgate_server.providers.executor.transport import TransportResponse

TOKEN = re.compile(r"\w+|[^\w\s]")
FINGERPRINT = "batchgate-simulated"


def count_tokens(text: str) -> int:
    return len(TOKEN.findall(text))


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _unit(custom_id: str) -> float:
    return int.from_bytes(hashlib.sha256(custom_id.encode()).digest()[:8], "big") / 2**64


class SimulatedTransport:
    def __init__(self, model: str, *, latency_ms: float = 0.0, failure_rate: float = 0.0) -> None:
        self.model = model
        self.latency = latency_ms / 1000.0
        self.failure_rate = failure_rate

    async def send(self, path: str, body: bytes, custom_id: str) -> TransportResponse:
        if self.latency:
            await asyncio.sleep(self.latency)
        request = json.loads(body)
        if self.failure_rate and _unit(custom_id) < self.failure_rate:
            error = {"error": {"message": "simulated failure (failure_rate)", "type": "invalid_request_error",
                               "param": None, "code": "simulated_failure"}}
            return TransportResponse(400, {}, json.dumps(error).encode())
        handler = {
            "/v1/chat/completions": self._chat, "/v1/completions": self._completion,
            "/v1/embeddings": self._embedding, "/v1/responses": self._response,
            "/v1/moderations": self._moderation,
        }[path]
        reply = handler(request, custom_id)
        rid = "req_" + hashlib.sha256(custom_id.encode()).hexdigest()[:24]
        return TransportResponse(200, {"x-request-id": rid}, json.dumps(reply).encode())

    def _base(self, obj: str, custom_id: str) -> dict[str, Any]:
        return {"id": f"sim-{hashlib.sha256(custom_id.encode()).hexdigest()[:20]}", "object": obj,
                "created": int(time.time()), "model": self.model}

    def _chat(self, req: dict, custom_id: str) -> dict:
        messages = req.get("messages") or []
        prompt = " ".join(_text_of(m.get("content")) for m in messages if isinstance(m, dict))
        last_user = next((_text_of(m.get("content")) for m in reversed(messages)
                          if isinstance(m, dict) and m.get("role") == "user"), "")
        reply = f"[simulated] You said: {last_user[:300]}"
        limit = req.get("max_completion_tokens") or req.get("max_tokens")
        finish = "stop"
        if limit and count_tokens(reply) > limit:
            reply = " ".join(TOKEN.findall(reply)[:limit])
            finish = "length"
        p, c = count_tokens(prompt), count_tokens(reply)
        return {**self._base("chat.completion", custom_id), "system_fingerprint": FINGERPRINT,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply, "refusal": None},
                             "logprobs": None, "finish_reason": finish}],
                "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                          "prompt_tokens_details": {"cached_tokens": 0},
                          "completion_tokens_details": {"reasoning_tokens": 0}}}

    def _completion(self, req: dict, custom_id: str) -> dict:
        prompt = req.get("prompt") or ""
        prompt = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
        reply = f"[simulated] {prompt[:300]}"
        p, c = count_tokens(prompt), count_tokens(reply)
        return {**self._base("text_completion", custom_id), "system_fingerprint": FINGERPRINT,
                "choices": [{"index": 0, "text": reply, "logprobs": None, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}}

    def _embedding(self, req: dict, custom_id: str) -> dict:
        inputs = req.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        data, tokens = [], 0
        for i, item in enumerate(inputs):
            text = item if isinstance(item, str) else json.dumps(item)
            tokens += count_tokens(text)
            digest = hashlib.sha256(text.encode()).digest()
            data.append({"object": "embedding", "index": i,
                         "embedding": [round(b / 255.0 - 0.5, 6) for b in digest[:16]]})
        return {"object": "list", "data": data, "model": self.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def _response(self, req: dict, custom_id: str) -> dict:
        source = req.get("input")
        text = source if isinstance(source, str) else json.dumps(source)
        reply = f"[simulated] You said: {text[:300]}"
        p, c = count_tokens(text), count_tokens(reply)
        base = self._base("response", custom_id)
        return {"id": "resp_" + base["id"], "object": "response", "created_at": base["created"], "status": "completed",
                "model": self.model, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                "output": [{"type": "message", "id": "msg_" + base["id"], "status": "completed", "role": "assistant",
                            "content": [{"type": "output_text", "text": reply, "annotations": []}]}],
                "usage": {"input_tokens": p, "output_tokens": c, "total_tokens": p + c,
                          "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens_details": {"reasoning_tokens": 0}}}

    def _moderation(self, req: dict, custom_id: str) -> dict:
        inputs = req.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        categories = ["harassment", "hate", "self-harm", "sexual", "violence"]
        return {"id": "modr-" + self._base("", custom_id)["id"], "model": self.model,
                "results": [{"flagged": False, "categories": {c: False for c in categories},
                             "category_scores": {c: 0.0 for c in categories}} for _ in inputs]}

    async def close(self) -> None:
        pass
