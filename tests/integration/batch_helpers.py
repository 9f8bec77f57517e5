"""Helpers for batch tests: model-list configs pointing at fakes, waiting, reading results."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from batchgate.v1 import batch_pb2, file_pb2
from batchgate_server.domain.deployment import Deployment
from batchgate_server.pricing.usage import sum_usage_from_output
from batchgate_server.providers.base import ProviderJob
from tests.conftest import jsonl

TERMINAL = {batch_pb2.BATCH_STATUS_COMPLETED, batch_pb2.BATCH_STATUS_FAILED, batch_pb2.BATCH_STATUS_EXPIRED,
            batch_pb2.BATCH_STATUS_CANCELLED}


def write_config(path: Path, entries: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"model_list": entries}))
    return path


def upstream_entry(name: str, base_url: str, **params) -> dict:
    litellm_params = {"model": "hosted_vllm/fake-model", "api_base": base_url, "max_concurrency": 8,
                      "max_retries": 2, "backoff_base": 0.05, "timeout": 2}
    litellm_params.update(params)
    return {"model_name": name, "litellm_params": litellm_params}


async def create(caller, file_id: str, **fields) -> batch_pb2.Batch:
    request = batch_pb2.CreateBatchRequest(input_file_id=file_id, endpoint=fields.pop("endpoint", "/v1/chat/completions"),
                                           completion_window=fields.pop("completion_window", "24h"), **fields)
    return (await caller.batches.CreateBatch(request, metadata=caller.metadata)).batch


async def watch_all(caller, batch_id: str, start_revision: int = 0, timeout: float = 60) -> list[batch_pb2.Batch]:
    states = []
    async for event in caller.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=batch_id,
                                                                             start_revision=start_revision),
                                                 metadata=caller.metadata, timeout=timeout):
        if event.WhichOneof("event") == "batch":
            states.append(event.batch)
    return states


async def download_lines(caller, file_id: str) -> list[dict]:
    if not file_id:
        return []
    data = b"".join([m.data async for m in caller.files.DownloadFile(
        file_pb2.DownloadFileRequest(file_id=file_id), metadata=caller.metadata)])
    return [json.loads(line) for line in data.splitlines()]


async def results(caller, batch: batch_pb2.Batch) -> tuple[list[dict], list[dict]]:
    return await download_lines(caller, batch.output_file_id), await download_lines(caller, batch.error_file_id)


def output_usage(out: list[dict]) -> tuple[int, int]:
    """(input, output tokens) the output lines `out` report, summed by the server's own parser of
    output files: what the batch's usage must be, however the server counted it."""
    by_model = sum_usage_from_output(json.dumps(line).encode() for line in out)
    return (sum(u.input_tokens for u in by_model.values()), sum(u.output_tokens for u in by_model.values()))


async def run_batch(h, lines: list[dict], **create_fields) -> tuple[batch_pb2.Batch, list, list, list]:
    """Upload `lines` as alice, create a batch, watch it to its end: (final state, all states,
    output lines, error lines)."""
    a = h.alice
    f = await h.upload(a, jsonl(lines))
    batch = await create(a, f.id, **create_fields)
    states = await watch_all(a, batch.id)
    out, err = await results(a, states[-1])
    return states[-1], states, out, err


def provider_job(path: Path, deployment: Deployment, lines: list[dict], batch_id: str,
                 expires_in: float = 86400) -> ProviderJob:
    """A ProviderJob for driving an adapter directly: its input (`lines`, written to `path`) is
    read back from disk, state saving is a no-op, work files go to `path`'s folder / "work"."""
    path.write_bytes(jsonl(lines))

    async def open_input():
        for raw in path.read_bytes().splitlines():
            yield raw

    async def save_state():
        pass

    now = time.time()
    return ProviderJob(batch_id=batch_id, endpoint="/v1/chat/completions", deployment=deployment,
                       line_count=len(lines), created_at=now, expires_at=now + expires_in, state={},
                       open_input=open_input, save_state=save_state, workdir=path.parent / "work")


def status_names(states) -> list[str]:
    names = []
    for s in states:
        name = batch_pb2.BatchStatus.Name(s.status).removeprefix("BATCH_STATUS_").lower()
        if not names or names[-1] != name:
            names.append(name)
    return names


LIFECYCLE = ["validating", "in_progress", "finalizing", "completed"]
STAMPS = {"in_progress": "in_progress_at", "finalizing": "finalizing_at", "completed": "completed_at",
          "cancelling": "cancelling_at", "cancelled": "cancelled_at", "expired": "expired_at",
          "failed": "failed_at"}


def assert_lifecycle(states, expected: list[str] = LIFECYCLE) -> None:
    """The statuses a watcher saw are, in order, part of `expected` and end with its last one;
    the final Batch carries the timestamp of every transition after the first, so the steps a
    late watcher missed still provably happened, in order."""
    seen = status_names(states)
    assert seen[-1] == expected[-1], seen
    positions = [expected.index(name) for name in seen]
    assert positions == sorted(positions), f"{seen} is not in lifecycle order {expected}"
    final = states[-1]
    stamps = [getattr(final, STAMPS[name]).ToNanoseconds() for name in expected[1:]]
    assert all(stamps), f"missing a transition timestamp in {final}"
    assert stamps == sorted(stamps)


async def eventually_empty(list_names: Callable[[], list[str]], timeout: float = 10.0) -> list[str]:
    """Poll the blocking `list_names` (objects left in a bucket …) until it answers nothing or
    `timeout` passes; returns its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        names = await asyncio.to_thread(list_names)
        if not names or time.monotonic() > deadline:
            return names
        await asyncio.sleep(0.05)


def assert_sizes_are_the_staged_records(lines: list[dict], sizes: list[int], staged: list[bytes],
                                        provider_id: Callable[[dict], str]) -> None:
    """request_size of each input line against the record a staging adapter wrote for it (`staged`,
    in order): equal for a line whose custom_id went as is (`provider_id` reads it from the record), at
    most 9 bytes over for a remapped one (measured as bgl_ and nine digits), 0 for the one line that
    could not be translated (never staged)."""
    sent = [(line, size) for line, size in zip(lines, sizes, strict=True) if size]
    assert len(sent) == len(staged) == len(lines) - 1
    for (line, size), record in zip(sent, staged):
        kept = provider_id(json.loads(record)) == line["custom_id"]
        assert kept == (size == len(record) + 1), line["custom_id"]
        assert 0 <= size - (len(record) + 1) <= 9
