"""A sharded batch's provider hop sends what its split wrote (core/prepared_input.py).

The real server on loopback, the fake OpenAI / Azure Batch API: the split writes each line as the
provider receives it (body.model set, Azure's url without /v1), and each shard's submit uploads
its byte range of that as it is. The provider must get exactly the lines the line-by-line rewrite
gives, whichever way the input was made; the written file goes once every job has its input, its
directory with the batch's end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from batchgate.v1 import batch_pb2
from batchgate_server.providers.openai_batch import mapping

from tests.conftest import jsonl, request_line, serving
from tests.fakes.openai_batch_api import FakeBatchAPI
from tests.integration.batch_helpers import create, results, watch_all
from tests.integration.test_openai_provider_e2e import (
    azure_entry,
    openai_entry,
    write_litellm_config,
)
from tests.integration.test_sharded_batches import assert_each_once, eventually

CONTENTS = ["plain question", "caf\u00e9 \u2028 \"quoted\" \\ back", "tab\there\nnewline", "\U0001f600 emoji",
            "x" * 3000, "", "last one"]


def hostile_lines() -> list[dict]:
    lines = [request_line(f"req-{i}", content=CONTENTS[i % len(CONTENTS)]) for i in range(11)]
    lines[3]["body"]["temperature"] = 1e-7  # a number the re-encode would write otherwise
    lines[5]["body"]["metadata"] = {"model": "nested, not the member"}
    return lines


def as_sent(raw_lines: list[bytes], model: str, azure: bool) -> bytes:
    """What the line-by-line rewrite (the path without a prepared input) sends, in file order."""
    return b"".join(mapping.rewrite_line(line, model, azure=azure) + b"\n" for line in raw_lines)


@pytest.fixture(params=["openai", "azure"])
async def provider(request, tmp_path: Path):
    """(fake, config, the deployment's model, azure): jobs move only when the test advances them."""
    azure = request.param == "azure"
    fake = FakeBatchAPI(azure=azure, clock="time", step_ms=10**9)
    await fake.start()
    if azure:
        entry = azure_entry("gpt-4o-mini", fake, "az-main", api_key="sk-test", max_batch_requests=4)
        model = "my-gpt4o-batch"
    else:
        entry = openai_entry("gpt-4o-mini", fake, "oai-main", key="sk-test", max_batch_requests=4)
        model = "gpt-4o-mini-2024-07-18"
    yield fake, write_litellm_config(tmp_path / "models.yaml", [entry]), model, azure
    await fake.stop()


def uploaded_inputs(fake: FakeBatchAPI) -> bytes:
    """The jobs' input files at the provider, in the order of their shards (= file order)."""
    jobs = sorted(fake.batches.values(), key=lambda b: int(b.metadata["batchgate_batch_id"].rsplit("_s", 1)[1]))
    return b"".join(fake.files[b.input_file_id].content for b in jobs)


async def submitted(h, fake: FakeBatchAPI) -> tuple[list[dict], bytes, batch_pb2.Batch]:
    """Uploads hostile_lines() and creates a batch of them: (lines, the file, the batch) once its
    three jobs are at the provider (and stay there until the test ends them)."""
    lines = hostile_lines()
    content = jsonl(lines)
    f = await h.upload(h.alice, content)
    batch = await create(h.alice, f.id)
    await eventually(lambda: len(fake.batches) == 3)
    return lines, content, batch


async def completed(h, fake: FakeBatchAPI, batch: batch_pb2.Batch, lines: list[dict]) -> None:
    """Ends every job at the provider: the batch completes with every request answered once."""
    for b in list(fake.batches.values()):
        fake.run_to_end(b.id)
    final = (await watch_all(h.alice, batch.id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final
    out, err = await results(h.alice, final)
    assert_each_once(out, [line["custom_id"] for line in lines])
    assert err == []


async def test_the_shards_upload_what_the_split_wrote_and_it_goes_with_the_batch(tmp_path, provider):
    fake, config, model, azure = provider
    async with serving(tmp_path / "data", config_file=config) as h:
        lines, content, batch = await submitted(h, fake)
        # The provider got exactly the lines the line-by-line rewrite gives ...
        sent = uploaded_inputs(fake)
        assert sent == as_sent(content.splitlines(), model, azure)
        first = json.loads(sent.splitlines()[0])
        assert first["body"]["model"] == model
        assert first["url"] == ("/chat/completions" if azure else "/v1/chat/completions")
        # ... and once every job has its input, the split's copy is gone (the jobs may run for a day).
        prepared = h.data_dir / "work" / batch.id / "prepared"
        await eventually(lambda: list(prepared.iterdir()) == [])
        await completed(h, fake, batch, lines)
        assert not prepared.exists(), "the prepared input's directory outlived its batch"


async def test_a_split_that_cannot_write_its_files_sends_the_same_lines(tmp_path, provider):
    fake, config, model, azure = provider
    data = tmp_path / "data"
    data.mkdir()
    (data / "work").write_text("not a directory")  # every write under work/ fails, as on a full disk
    async with serving(data, config_file=config) as h:
        lines, content, batch = await submitted(h, fake)
        assert uploaded_inputs(fake) == as_sent(content.splitlines(), model, azure)
        await completed(h, fake, batch, lines)


async def test_a_prepared_file_cut_short_before_the_upload_is_retried_from_the_stored_input(tmp_path, provider):
    fake, config, model, azure = provider
    # Every job's first upload is answered 503 with a Retry-After: the split has written its file, the
    # jobs have not sent it yet. It is cut short then, as a disk error would leave it.
    fake.inject(503, 3, retry_after=1.0, path_contains="/files", method="POST")
    async with serving(tmp_path / "data", config_file=config) as h:
        lines = hostile_lines()
        content = jsonl(lines)
        f = await h.upload(h.alice, content)
        batch = await create(h.alice, f.id)
        await eventually(lambda: fake.calls_to("POST", "/files") >= 3)
        part = h.data_dir / "work" / batch.id / "prepared" / "part-0.jsonl"
        part.write_bytes(part.read_bytes()[:100])
        await eventually(lambda: len(fake.batches) == 3)
        assert uploaded_inputs(fake) == as_sent(content.splitlines(), model, azure)
        await completed(h, fake, batch, lines)
