"""Shared plumbing for the adapters that stage a batch in an object store (Vertex AI via GCS,
Bedrock via S3): translate the input into a local file, read results back line by line from a
blocking SDK stream without blocking the event loop, and answer every request exactly once.

Nothing here talks to a provider; the adapters pass in their translation functions and their
readers. State kept in `job.state` stays small: the custom_id mapping is deterministic (see
`custom_ids.CustomIdCodec`), so `results()` rebuilds it from the input file instead of storing
one entry per remapped id.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchgate_server.providers.base import ProviderJob, ResultKind, ResultLine
from batchgate_server.providers.custom_ids import CustomIdCodec

READ_CHUNK = 1024 * 1024
WRITE_FLUSH = 1024 * 1024
YIELD_EVERY = 500  # input lines between two `await asyncio.sleep(0)` in CPU-bound loops


@dataclass
class InputLine:
    index: int  # 0-based line number in the batch input file
    custom_id: str
    body: Any
    provider_id: str


async def input_lines(job: ProviderJob, codec: CustomIdCodec) -> AsyncIterator[InputLine]:
    """The batch's request lines with their provider-safe ids. Input files were validated at
    upload, so every line is a JSON object with a string custom_id and a body."""
    index = 0
    async for raw in job.open_input():
        obj = json.loads(raw)
        custom_id = str(obj.get("custom_id"))
        yield InputLine(index, custom_id, obj.get("body"), codec.encode(custom_id, index))
        index += 1
        if index % YIELD_EVERY == 0:
            await asyncio.sleep(0)


@dataclass
class Staged:
    """What `write_translated` produced."""

    path: Path
    sent: int = 0  # records written to `path`
    skipped: int = 0  # lines that failed translation (they come back as error lines)
    first_error: str = ""  # "line N (custom_id …): message" of the first skipped line
    bytes: int = 0


async def write_translated(job: ProviderJob, codec: CustomIdCodec, path: Path,
                           translate: Callable[[InputLine], dict],
                           errors: tuple[type[BaseException], ...]) -> Staged:
    """Translate every input line with `translate` and write the records as JSONL to `path`
    (flushed in ~1 MiB blocks, so memory stays flat). Lines whose translation raises one of
    `errors` are skipped and counted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    staged = Staged(path=path)
    buf = bytearray()
    with open(tmp, "wb") as fh:
        async for line in input_lines(job, codec):
            try:
                record = translate(line)
            except errors as err:
                staged.skipped += 1
                if not staged.first_error:
                    msg = getattr(err, "message", str(err))
                    param = getattr(err, "param", "")
                    staged.first_error = (f"line {line.index + 1} (custom_id {line.custom_id!r}): "
                                          f"{param + ': ' if param else ''}{msg}")
                continue
            buf += _dumps(record)
            buf += b"\n"
            staged.sent += 1
            if len(buf) >= WRITE_FLUSH:
                fh.write(buf)
                staged.bytes += len(buf)
                buf.clear()
        fh.write(buf)
        staged.bytes += len(buf)
    os.replace(tmp, path)
    return staged


async def index_input(job: ProviderJob, codec: CustomIdCodec) -> dict[str, tuple[int, str]]:
    """provider id -> (line index, caller's custom_id) for every request of the batch."""
    return {line.provider_id: (line.index, line.custom_id) async for line in input_lines(job, codec)}


async def aiter_lines(read: Callable[[int], bytes], close: Callable[[], Any] | None = None,
                      chunk: int = READ_CHUNK) -> AsyncIterator[bytes]:
    """Lines (no newline, blank lines skipped) of a blocking byte stream (a boto3 StreamingBody,
    a google-cloud-storage BlobReader, …); every read runs in a worker thread."""
    pending = bytearray()
    try:
        while True:
            block = await asyncio.to_thread(read, chunk)
            if not block:
                break
            pending += block
            start = 0
            while (nl := pending.find(b"\n", start)) >= 0:
                line = bytes(pending[start:nl]).rstrip(b"\r")
                start = nl + 1
                if line.strip():
                    yield line
            if start:
                del pending[:start]
        if pending.strip():
            yield bytes(pending).rstrip(b"\r")
    finally:
        if close is not None:
            await asyncio.to_thread(close)


def _dumps(obj: Any) -> bytes:
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates in a custom_id: keep them as \u escapes
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


def no_result_line(out_id: str, custom_id: str, code: str, message: str) -> ResultLine:
    """An error-file line for a request that got no answer (cancelled, expired, lost)."""
    return ResultLine(ResultKind.ERROR, _dumps({"id": out_id, "custom_id": custom_id, "response": None,
                                                "error": {"code": code, "message": message}}))


UNANSWERED = {
    "cancelled": ("batch_cancelled", "the batch was cancelled before this request ran"),
    "expired": ("batch_expired", "the batch's completion window ended before this request ran"),
}


@dataclass
class ResultTracker:
    """Which requests have been answered while streaming provider output."""

    index: dict[str, tuple[int, str]]
    answered: set[int] = field(default_factory=set)
    unknown: int = 0
    duplicates: int = 0

    def claim(self, provider_id: Any) -> tuple[int, str] | None:
        """(line index, custom_id) for a provider id seen in the output, once; None for an id
        that is not part of this batch or was already answered."""
        hit = self.index.get(provider_id) if isinstance(provider_id, str) else None
        if hit is None:
            self.unknown += 1
            return None
        if hit[0] in self.answered:
            self.duplicates += 1
            return None
        self.answered.add(hit[0])
        return hit


async def unanswered(job: ProviderJob, codec: CustomIdCodec, tracker: ResultTracker,
                     translate: Callable[[InputLine], Any], errors: tuple[type[BaseException], ...],
                     translation_error_line: Callable[..., ResultLine], out_id: Callable[[int], str],
                     outcome: str, provider_label: str) -> AsyncIterator[ResultLine]:
    """One error line for every request without an answer: the translation error for lines that
    were never sent, else batch_cancelled / batch_expired, else (a completed job that lost a
    record) provider_missing_result."""
    code, message = UNANSWERED.get(outcome, (
        "provider_missing_result", f"{provider_label} returned no result for this request"))
    async for line in input_lines(job, codec):
        if line.index in tracker.answered:
            continue
        try:
            translate(line)
        except errors as err:
            yield translation_error_line(line.custom_id, err, request_index=line.index, batch_id=job.batch_id)
            continue
        yield no_result_line(out_id(line.index), line.custom_id, code, message)
