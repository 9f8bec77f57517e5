"""`batch_completion` and `embed`: a list in, a batch run, the answers back in the same order.

The steps (shared by the sync and asyncio clients, see _steps.py): build the JSONL, upload it,
create the batch, watch it to its end, read the output and error files, and match every line to
its input by custom_id. A request that failed is an Answer with `error` set, not an exception: one
bad item does not cost the caller the other answers.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from typing import Any

from batchgate import _steps
from batchgate.types import Batch, BatchStatus
from batchgate.v1 import file_pb2

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"


@dataclasses.dataclass(frozen=True)
class Answer:
    """The result of one input: `body` is the provider's response body (OpenAI format) when it
    succeeded, `error` the error object ({"code", "message", …}) when it did not."""

    index: int
    custom_id: str
    status_code: int | None
    body: dict[str, Any] | None
    error: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        return self.error is None and self.body is not None

    @property
    def content(self) -> str | None:
        """A chat answer's text (the first choice's message)."""
        try:
            return self.body["choices"][0]["message"]["content"]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            return None

    @property
    def embedding(self) -> list[float] | None:
        """An embedding answer's vector."""
        try:
            return self.body["data"][0]["embedding"]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            return None


class Answers(list):
    """The answers in input order; `batch` is the batch that produced them (cost, usage, ids)."""

    def __init__(self, answers: Iterable[Answer], batch: Batch) -> None:
        super().__init__(answers)
        self.batch = batch

    @property
    def errors(self) -> list[Answer]:
        return [a for a in self if not a.ok]


class BatchFailedError(Exception):
    """The batch ended without a single answer (it failed, or was cancelled before anything ran):
    `batch.errors` say why."""

    def __init__(self, batch: Batch) -> None:
        reasons = "; ".join(f"{e.code}: {e.message}" for e in batch.errors) or "no reason given"
        super().__init__(f"batch {batch.id} ended {batch.status}: {reasons}")
        self.batch = batch


def request_lines(model: str, endpoint: str, bodies: Sequence[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps({"custom_id": f"item-{i}", "method": "POST", "url": endpoint,
                                "body": {"model": model, **body}}, ensure_ascii=False).encode() + b"\n"
                    for i, body in enumerate(bodies))


def parse_result_line(raw: bytes) -> tuple[str, int | None, dict | None, dict | None]:
    """(custom_id, status_code, body, error) of an output or error file line."""
    line = json.loads(raw)
    response = line.get("response") or {}
    status, body = response.get("status_code"), response.get("body")
    error = line.get("error")
    if error is None and (status is None or status >= 400):
        error = body.get("error") if isinstance(body, dict) and body.get("error") else {
            "code": f"http_{status}", "message": json.dumps(body)[:500]}
    return line.get("custom_id", ""), status, (body if error is None else None), error


def run(options: _steps.Options, model: str, endpoint: str, bodies: Sequence[dict[str, Any]], *,
        metadata: dict[str, str] | None = None, completion_window: str = "24h") -> _steps.Steps[Answers]:
    if not bodies:
        raise ValueError("nothing to run: the list is empty")
    upload = yield from _steps.upload_file(
        options, request_lines(model, endpoint, bodies), filename=f"{endpoint.rsplit('/', 1)[-1]}.jsonl",
        purpose=file_pb2.FILE_PURPOSE_BATCH, request_id="", expires_after_seconds=None,
        chunk_size=_steps.DEFAULT_CHUNK)
    batch = yield from _steps.create_batch(options, upload.id, endpoint, completion_window=completion_window,
                                           metadata=metadata, model=model, provider="", request_id="")
    final = yield from _steps.wait(options, batch.id)
    found: dict[str, Answer] = {}
    for file_id in (final.output_file_id, final.error_file_id):
        if file_id:
            for raw in (yield from _steps.read_file(options, file_id)).splitlines():
                custom_id, status, body, error = parse_result_line(raw)
                if custom_id.startswith("item-"):
                    index = int(custom_id.removeprefix("item-"))
                    found[custom_id] = Answer(index, custom_id, status, body, error)
    if not found and final.status != BatchStatus.COMPLETED:
        raise BatchFailedError(final)
    unanswered = {"code": f"batch_{final.status}", "message": f"no result: batch {final.id} ended {final.status}"}
    return Answers((found.get(f"item-{i}") or Answer(i, f"item-{i}", None, None, unanswered)
                    for i in range(len(bodies))), final)


def completion_bodies(messages: Sequence[Sequence[dict[str, Any]]], params: dict[str, Any]) -> list[dict]:
    return [{"messages": list(m), **params} for m in messages]


def embedding_bodies(texts: Sequence[str], params: dict[str, Any]) -> list[dict]:
    return [{"input": text, **params} for text in texts]
