"""Helpers for the cost-tracking and UsageService tests: priced deployments against the fake
upstream, request texts whose token counts are known, and the UsageService stub."""

from __future__ import annotations

import json
import re

from aiohttp import web

from batchgate.v1 import batch_pb2, usage_pb2, usage_pb2_grpc
from tests.backends_pg import run_sql
from tests.conftest import Caller, Harness, jsonl, request_line
from tests.fakes.openai_compatible_upstream import FakeUpstream, key_text
from tests.integration.batch_helpers import create, upstream_entry, watch_all

# Every request text is exactly 400 characters. The fake counts ceil(len / 4) tokens, so each
# chat request costs 100 prompt tokens, and its answer "echo: " + the first 200 characters
# (206 characters) costs ceil(206 / 4) = 52 completion tokens.
PROMPT_TOKENS = 100
COMPLETION_TOKENS = 52


def text(marker: str = "") -> str:
    return (marker + " " if marker else "").ljust(400, ".")


class UsageUpstream(FakeUpstream):
    """The fake OpenAI-compatible server, plus prompt-cache hits and reasoning tokens: a key text
    containing CACHED:<n> / REASONING:<n> reports n cached prompt tokens / n reasoning tokens (inside
    prompt_tokens / completion_tokens, as OpenAI counts them); WRITE:<n> / WRITE_1H:<n> report n
    prompt-cache writes / n of them with a 1-hour lifetime (prompt_tokens_details.cache_creation_tokens
    / cache_creation_1h_tokens, as batchgate normalises Anthropic's); PROMPT:<n> reports n prompt
    tokens (a long-context request without sending one)."""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        response = await super()._handle(request)
        if response.status != 200 or not isinstance(response, web.Response):
            return response
        try:
            body = json.loads(await request.read())
            answer = json.loads(response.body)
        except (ValueError, TypeError):
            return response  # FAIL:malformed and the like: leave them alone
        marks = dict(re.findall(r"(CACHED|REASONING|WRITE_1H|WRITE|PROMPT):(\d+)", key_text(request.path, body)))
        usage = answer.get("usage")
        if not marks or "prompt_tokens_details" not in (usage or {}):
            return response
        usage["prompt_tokens_details"]["cached_tokens"] = int(marks.get("CACHED", 0))
        usage["completion_tokens_details"]["reasoning_tokens"] = int(marks.get("REASONING", 0))
        for mark, key in (("WRITE", "cache_creation_tokens"), ("WRITE_1H", "cache_creation_1h_tokens")):
            if mark in marks:
                usage["prompt_tokens_details"][key] = int(marks[mark])
        if "PROMPT" in marks:
            usage["prompt_tokens"] = int(marks["PROMPT"])
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return web.Response(body=json.dumps(answer).encode(), content_type="application/json")


def priced_entry(name: str, base_url: str, model: str, model_info: dict | None = None, **params) -> dict:
    entry = upstream_entry(name, base_url, model=model, **params)
    if model_info is not None:
        entry["model_info"] = model_info
    return entry


async def run_batch(h: Harness, caller: Caller, model: str, texts: list[str], *, metadata: dict | None = None,
                    wait: bool = True) -> batch_pb2.Batch:
    f = await h.upload(caller, jsonl([request_line(f"r{i}", model=model, content=t) for i, t in enumerate(texts)]))
    batch = await create(caller, f.id, metadata=metadata or {})
    return (await watch_all(caller, batch.id))[-1] if wait else batch


def usage_stub(h: Harness) -> usage_pb2_grpc.UsageServiceStub:
    return usage_pb2_grpc.UsageServiceStub(h.channel)


async def query(h: Harness, caller: Caller, **fields) -> usage_pb2.QueryUsageResponse:
    return await usage_stub(h).QueryUsage(usage_pb2.QueryUsageRequest(**fields), metadata=caller.metadata)


async def ledger_rows(h: Harness, batch_id: str) -> list[dict]:
    """The committed ledger rows of a batch."""
    return await run_sql(h.server.store, "SELECT * FROM usage_ledger WHERE batch_id=?", batch_id)


async def stop(h: Harness) -> None:
    await h.channel.close()
    await h.server.stop(grace=0)
