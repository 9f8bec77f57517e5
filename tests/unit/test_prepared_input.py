"""The split's prepared shard inputs (core/prepared_input.py) and how measure_parts writes them.

The prepared input is a cache: what it gives must be the bytes the line-by-line rewrite gives, and
whatever goes wrong with it (a write that fails, a file cut short or gone) must leave the shard
to build its input the usual way, never send a partial one."""

from __future__ import annotations

import json

import pytest
from batchgate_server.core.prepared_input import (
    PartWriter,
    PreparedInputs,
    PreparedRange,
)
from batchgate_server.core.sharded import MEASURE_BLOCK_LINES, Measured, measure_parts
from batchgate_server.domain.deployment import Deployment
from batchgate_server.domain.shards import PlannedPart
from batchgate_server.providers.anthropic.provider import AnthropicBatchProvider
from batchgate_server.providers.openai_batch import (
    AzureBatchProvider,
    OpenAIBatchProvider,
    mapping,
)
from batchgate_server.store.blobs.local import LocalBlobStore


async def read_all(opener) -> bytes:
    return b"".join([block async for block in opener()])


async def test_a_range_is_given_exactly_and_only_for_its_deployment_and_model(tmp_path):
    prepared = PreparedInputs(tmp_path)
    path = prepared.part_path("batch_p", 0)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"0123456789" * 300_000)  # 3 MB: several read blocks
    prepared.register("batch_p_s2", PreparedRange(path, 5, 2_500_000, "dep-a", "openai", "gpt-x"))
    opener = prepared.opener("batch_p_s2", dep())
    assert opener is not None
    assert await read_all(opener) == path.read_bytes()[5:2_500_005]
    assert await read_all(opener) == path.read_bytes()[5:2_500_005], "re-openable: one body per attempt"
    assert prepared.opener("batch_p_s2", dep(id="dep-b")) is None
    assert prepared.opener("batch_p_s2", dep(model="gpt-y")) is None, "written for another model"
    assert prepared.opener("batch_p_s2", dep(provider="azure")) is None, "Azure's url is rewritten too"
    assert prepared.opener("batch_p_s1", dep()) is None
    prepared.forget("batch_p", ["batch_p_s2"])
    assert not path.parent.exists()
    assert prepared.opener("batch_p_s2", dep()) is None


def dep(id: str = "dep-a", provider: str = "openai", model: str = "gpt-x") -> Deployment:
    return Deployment(id=id, model_name="m", provider=provider, model=model)


async def test_a_parts_file_goes_when_the_last_of_its_shards_has_its_input_at_the_provider(tmp_path):
    prepared = PreparedInputs(tmp_path)
    part0, part1 = prepared.part_path("batch_p", 0), prepared.part_path("batch_p", 1)
    part0.parent.mkdir(parents=True)
    part0.write_bytes(b"a\nb\n")
    part1.write_bytes(b"c\n")
    prepared.register("batch_p_s1", PreparedRange(part0, 0, 2, "dep-a", "openai", "gpt-x"))
    prepared.register("batch_p_s2", PreparedRange(part0, 2, 2, "dep-a", "openai", "gpt-x"))
    prepared.register("batch_p_s3", PreparedRange(part1, 0, 2, "dep-a", "openai", "gpt-x"))
    prepared.release("batch_p_s1")
    assert part0.exists() and prepared.opener("batch_p_s1", dep()) is None
    assert await read_all(prepared.opener("batch_p_s2", dep())) == b"b\n"
    prepared.release("batch_p_s2")
    assert not part0.exists() and part1.exists()
    prepared.release("batch_p_s3")
    prepared.release("batch_p_s3")  # twice: a submit retried after its state was saved
    assert not part1.exists()


@pytest.mark.parametrize("damage", ["cut short", "removed"])
async def test_a_damaged_file_fails_the_read_and_the_retry_builds_the_input(tmp_path, damage):
    prepared = PreparedInputs(tmp_path)
    path = prepared.part_path("batch_p", 0)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x" * 100)
    prepared.register("batch_p_s1", PreparedRange(path, 0, 100, "d", "openai", "m"))
    opener = prepared.opener("batch_p_s1", dep(id="d", model="m"))
    if damage == "cut short":
        path.write_bytes(b"x" * 60)
    else:
        path.unlink()
    with pytest.raises(OSError):
        await read_all(opener)
    assert prepared.opener("batch_p_s1", dep(id="d", model="m")) is None, "the next attempt must not read it again"


def test_a_failed_write_marks_the_part_unprepared(tmp_path):
    (tmp_path / "work").write_text("a file where the directory goes")
    writer = PartWriter(tmp_path / "work" / "batch_p" / "prepared" / "part-0.jsonl")
    writer.write([b"a", b"b"])
    writer.write([b"c"])
    assert writer.failed and writer.close() is False


def _line(i: int, model: str = "gpt-4o-mini") -> bytes:
    return json.dumps({"custom_id": f"r-{i}", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": model, "messages": [{"role": "user", "content": "q \u00e9" * (i % 7)}]}}).encode()


@pytest.mark.parametrize("provider", [OpenAIBatchProvider(), AzureBatchProvider()])
async def test_the_split_writes_each_line_as_the_provider_receives_it(tmp_path, provider):
    # Blank lines, CRLF endings and more lines than a thread hop measures: the offsets and the
    # written lines are the line-by-line reader's.
    n = MEASURE_BLOCK_LINES + 11
    raw = [_line(i, model="gpt-4o-mini-2024-07-18" if i % 5 == 0 else "gpt-4o-mini") for i in range(n)]
    content = b"".join(line + (b"\r\n" if i % 3 else b"\n") + (b"\n  \n" if i % 97 == 0 else b"")
                       for i, line in enumerate(raw))
    blobs = await LocalBlobStore.open(tmp_path / "blobs")
    writer = blobs.open_writer()
    await writer.write(content)
    await writer.commit("file-in")
    deployment = Deployment(id="d", model_name="m", provider=provider.name, model="gpt-4o-mini-2024-07-18",
                            params={"api_key": "x", "api_base": "https://x.openai.azure.com"})
    path = tmp_path / "work" / "prepared" / "part-0.jsonl"
    m = Measured(PlannedPart("/v1/chat/completions", "gpt-4o-mini", "d", 0, n), deployment, provider,
                 writer=PartWriter(path))
    await measure_parts(blobs, "file-in", [m], single_group=True)
    assert m.writer.close()
    expected = [line async for line in blobs.lines_at("file-in")]
    assert list(m.offsets) == [offset for offset, _ in expected]
    sent = [mapping.rewrite_line(line, deployment.model, azure=provider.azure) for _, line in expected]
    assert path.read_bytes() == b"".join(line + b"\n" for line in sent)
    assert list(m.sizes) == [len(line) + 1 for line in sent]
    await blobs.close()


async def test_a_provider_that_makes_its_input_otherwise_writes_nothing(tmp_path):
    blobs = await LocalBlobStore.open(tmp_path / "blobs")
    writer = blobs.open_writer()
    await writer.write(b"".join(_line(i) + b"\n" for i in range(5)))
    await writer.commit("file-in")
    provider = AnthropicBatchProvider()
    deployment = Deployment(id="d", model_name="m", provider="anthropic", model="claude-x", params={"api_key": "x"})
    m = Measured(PlannedPart("/v1/chat/completions", "gpt-4o-mini", "d", 0, 5), deployment, provider,
                 writer=PartWriter(tmp_path / "work" / "part-0.jsonl"))
    await measure_parts(blobs, "file-in", [m], single_group=True)
    assert m.writer is None and not (tmp_path / "work").exists()
    assert list(m.sizes) == [provider.request_size(m.part.endpoint, deployment, _line(i)) for i in range(5)]
    await blobs.close()


def test_the_start_sweeps_what_an_earlier_process_prepared_and_nothing_else(tmp_path):
    for parent in ("batch_a", "batch_b"):
        part = PreparedInputs(tmp_path).part_path(parent, 0)
        part.parent.mkdir(parents=True)
        part.write_bytes(b"x\n")
    (tmp_path / "batch_a" / "results.log").write_bytes(b"an executor's work file")
    PreparedInputs(tmp_path).sweep()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "batch_a", "batch_a/results.log", "batch_b"]
