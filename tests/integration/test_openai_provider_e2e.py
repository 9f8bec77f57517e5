"""OpenAI and Azure OpenAI batches end to end: the real server (in-process, generated stubs) with a
LiteLLM-format config pointing at the fake OpenAI / Azure batch APIs (tests/fakes/openai_batch_api.py).

Covers routing (alias, provider/model from the environment, several deployments, cooldown,
stickiness across a restart), the line rewrite as the provider sees it, every provider failure path,
and that callers only ever see our ids and never a secret (logs included)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf import text_format
from openai.types import Batch as OpenAIBatch
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

from batchgate.v1 import batch_pb2, file_pb2
from batchgate_server.providers.openai_batch import OpenAIBatchProvider
from tests.conftest import error_details, jsonl, request_line, start_harness
from tests.fakes.openai_batch_api import FakeBatchAPI
from tests.integration.batch_helpers import (
    assert_lifecycle,
    create,
    eventually_empty,
    results,
    status_names,
    watch_all,
)

OPENAI_KEY = "sk-e2e-openai-SECRET-7f3a9c"
AZURE_KEY = "az-e2e-azure-SECRET-91bc44"
POOL_A_KEY = "sk-e2e-pool-a-SECRET-0d1e"
POOL_B_KEY = "sk-e2e-pool-b-SECRET-5a6b"
WRONG_KEY = "sk-e2e-wrong-SECRET-eeee"
SECRETS = (OPENAI_KEY, AZURE_KEY, POOL_A_KEY, POOL_B_KEY, WRONG_KEY)

FAST = {"poll_interval": 0.05, "max_retries": 2, "backoff_base": 0.01, "timeout": 5,
        "create_lookup_patience": 0.5, "not_found_grace": 1}


# ------------------------------------------------------------------ fixtures & helpers

@pytest.fixture(autouse=True)
def secrets_env(monkeypatch):
    monkeypatch.setenv("BG_E2E_OPENAI_KEY", OPENAI_KEY)
    monkeypatch.setenv("BG_E2E_AZURE_KEY", AZURE_KEY)
    monkeypatch.setenv("BG_E2E_POOL_A_KEY", POOL_A_KEY)
    monkeypatch.setenv("BG_E2E_POOL_B_KEY", POOL_B_KEY)


@pytest.fixture(autouse=True)
def no_secret_in_logs(caplog):
    """Every test here runs with DEBUG logging; no key may show up in any record."""
    caplog.set_level(logging.DEBUG)
    yield caplog
    text = caplog.text
    for secret in SECRETS:
        assert secret not in text, "a secret reached the logs"


async def started(fake: FakeBatchAPI) -> FakeBatchAPI:
    await fake.start()
    return fake


@pytest.fixture
async def oai():
    fake = await started(FakeBatchAPI(api_key=OPENAI_KEY))
    yield fake
    await fake.stop()


@pytest.fixture
async def az():
    fake = await started(FakeBatchAPI(azure=True, api_key=AZURE_KEY))
    yield fake
    await fake.stop()


def openai_entry(name: str, fake: FakeBatchAPI, dep_id: str, *, model: str = "openai/gpt-4o-mini-2024-07-18",
                 key: str = "os.environ/BG_E2E_OPENAI_KEY", **params) -> dict:
    return {"model_name": name,
            "litellm_params": {"model": model, "api_key": key, "api_base": fake.base_url, **FAST, **params},
            "model_info": {"id": dep_id, "mode": "batch", "input_cost_per_token_batches": 7.5e-8,
                           "output_cost_per_token_batches": 3.0e-7}}


def azure_entry(name: str, fake: FakeBatchAPI, dep_id: str, **params) -> dict:
    return {"model_name": name,
            "litellm_params": {"model": "azure/my-gpt4o-batch", "api_key": "os.environ/BG_E2E_AZURE_KEY",
                               "api_base": fake.base_url, "api_version": "2024-10-21", **FAST, **params},
            "model_info": {"id": dep_id, "mode": "batch"}}


def write_litellm_config(path: Path, entries: list[dict], **sections) -> Path:
    doc = {"model_list": entries,
           "litellm_settings": {"drop_params": True, "num_retries": 3},
           "general_settings": {"master_key": "sk-litellm-proxy-only"}}
    doc.update(sections)
    path.write_text(yaml.safe_dump(doc))
    return path


class Servers:
    """Starts harnesses on a data dir + config and stops them all at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.running: list = []

    async def start(self, config: Path, data: str = "data"):
        h = await start_harness(self.tmp_path / data, config_file=config)
        self.running.append(h)
        return h

    async def stop(self, h) -> None:
        self.running.remove(h)
        await h.channel.close()
        await h.server.stop(grace=0)

    async def close(self) -> None:
        for h in list(self.running):
            await self.stop(h)


@pytest.fixture
async def servers(tmp_path):
    s = Servers(tmp_path)
    yield s
    await s.close()


@pytest.fixture
async def harness_oai_az(tmp_path, servers, oai, az):
    config = write_litellm_config(tmp_path / "litellm.yaml", [
        openai_entry("gpt-4o-mini", oai, "oai-main"),
        azure_entry("gpt-4o", az, "az-main"),
        openai_entry("gpt-4o-mini-badkey", oai, "oai-badkey", model="openai/gpt-4o-mini", key=WRONG_KEY),
        openai_entry("gpt-4o-mini-fragile", oai, "oai-fragile", give_up_after=1.5),
    ])
    return await servers.start(config)


def chat_lines(n: int, model: str, *, fail: tuple[int, ...] = (), prefix: str = "req") -> list[dict]:
    return [request_line(f"{prefix}-{i}", model=model, content=("please FAIL" if i in fail else f"question {i}"))
            for i in range(n)]


def provider_batch(fake: FakeBatchAPI, our_id: str):
    found = [b for b in fake.batches.values() if (b.metadata or {}).get("batchgate_batch_id") == our_id]
    assert len(found) == 1, f"{len(found)} provider batches for {our_id}"
    return found[0]


def provider_ids(*fakes: FakeBatchAPI) -> set[str]:
    ids: set[str] = set()
    for fake in fakes:
        ids |= set(fake.batches) | set(fake.files)
    return ids


def assert_ours_only(batch: batch_pb2.Batch, *fakes: FakeBatchAPI) -> None:
    text = text_format.MessageToString(batch)
    leaked = [i for i in provider_ids(*fakes) if i in text]
    assert not leaked, f"provider ids visible in the Batch: {leaked}"
    for secret in SECRETS:
        assert secret not in text
    assert batch.id.startswith("batch_") and batch.input_file_id.startswith("file-")


def as_openai_batch(b: batch_pb2.Batch) -> OpenAIBatch:
    """Our Batch read as OpenAI's Batch object (it mirrors it field for field)."""
    d = {"id": b.id, "object": "batch", "endpoint": b.endpoint, "input_file_id": b.input_file_id,
         "completion_window": b.completion_window,
         "status": batch_pb2.BatchStatus.Name(b.status).removeprefix("BATCH_STATUS_").lower(),
         "created_at": b.created_at.seconds, "output_file_id": b.output_file_id or None,
         "error_file_id": b.error_file_id or None, "metadata": dict(b.metadata) or None,
         "request_counts": {"total": b.request_counts.total, "completed": b.request_counts.completed,
                            "failed": b.request_counts.failed},
         "errors": {"object": "list", "data": [{"code": e.code, "message": e.message, "param": e.param or None,
                                                "line": e.line if e.HasField("line") else None}
                                               for e in b.errors]} if b.errors else None}
    for name in ("in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
                 "cancelling_at", "cancelled_at"):
        if b.HasField(name):
            d[name] = getattr(b, name).seconds
    return OpenAIBatch.model_validate(d)


async def get(caller, batch_id: str) -> batch_pb2.Batch:
    return (await caller.batches.GetBatch(batch_pb2.GetBatchRequest(batch_id=batch_id),
                                          metadata=caller.metadata)).batch


async def wait_status(caller, batch_id: str, *statuses: int, timeout: float = 20) -> batch_pb2.Batch:
    call = caller.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=batch_id), metadata=caller.metadata,
                                     timeout=timeout)
    try:
        async for event in call:
            if event.WhichOneof("event") == "batch" and event.batch.status in statuses:
                return event.batch
    finally:
        call.cancel()
    raise AssertionError(f"batch {batch_id} ended without reaching {statuses}: {(await get(caller, batch_id))}")


async def upload_create(h, lines: list[dict], **fields) -> batch_pb2.Batch:
    f = await h.upload(h.alice, jsonl(lines))
    return await create(h.alice, f.id, **fields)


# ------------------------------------------------------------------ end to end, per provider

async def test_openai_end_to_end_through_watch(harness_oai_az, oai, az):
    h = harness_oai_az
    a = h.alice
    # the file names the alias; no model in CreateBatch: the file's body.model picks the deployment
    batch = await upload_create(h, chat_lines(30, "gpt-4o-mini", fail=(7, 21)), metadata={"team": "e2e"})
    assert (batch.model, batch.provider) == ("gpt-4o-mini", "openai")
    states = await watch_all(a, batch.id)
    assert_lifecycle(states)
    final = states[-1]
    assert final.request_counts.total == 30
    assert (final.request_counts.completed, final.request_counts.failed) == (28, 2)

    out, err = await results(a, final)
    assert sorted(x["custom_id"] for x in out + err) == sorted(f"req-{i}" for i in range(30))
    for line in out:
        completion = ChatCompletion.model_validate(line["response"]["body"])
        assert completion.model == "gpt-4o-mini-2024-07-18"  # the deployment's real model answered
        assert line["response"]["status_code"] == 200 and line["error"] is None
    assert {x["custom_id"] for x in err} == {"req-7", "req-21"}
    assert all(x["response"]["status_code"] == 400 for x in err)
    for file_id in (final.output_file_id, final.error_file_id):
        f = (await a.files.GetFile(file_pb2.GetFileRequest(file_id=file_id), metadata=a.metadata)).file
        assert f.purpose == file_pb2.FILE_PURPOSE_BATCH_OUTPUT and f.filename.startswith(batch.id)

    # usage is what the provider's output says, cost from the deployment's model_info prices
    pb = provider_batch(oai, batch.id)
    assert final.usage.input_tokens == pb.usage["input_tokens"] > 0
    assert final.usage.output_tokens == pb.usage["output_tokens"] > 0
    assert final.cost.status == batch_pb2.COST_STATUS_KNOWN and float(final.cost.amount) > 0

    # the line rewrite, as the provider received it: alias -> real model, streamed upload
    stats = oai.uploads[pb.input_file_id]
    assert stats.models == {"gpt-4o-mini-2024-07-18"} and stats.urls == {"/v1/chat/completions"}
    assert stats.lines == 30 and stats.chunked
    assert json.loads(stats.first_line)["custom_id"] == "req-0"
    assert oai.created_batch_requests[-1]["endpoint"] == "/v1/chat/completions"
    assert oai.created_batch_requests[-1]["metadata"] == {"batchgate_batch_id": batch.id}
    assert all(hdrs.get("Authorization") == f"Bearer {OPENAI_KEY}" for _, _, hdrs in oai.calls)

    for state in states:
        assert_ours_only(state, oai, az)
    assert as_openai_batch(final).status == "completed"
    assert final.metadata == {"team": "e2e"}


@pytest.mark.parametrize("quirks", [{}, {"capitalized_status": True, "iso_timestamps": True,
                                         "null_request_counts": True, "empty_error_file": True}],
                         ids=["plain", "quirks"])
async def test_azure_end_to_end_through_watch(tmp_path, servers, oai, quirks):
    az = await started(FakeBatchAPI(azure=True, api_key=AZURE_KEY, **quirks))
    try:
        h = await servers.start(write_litellm_config(tmp_path / "azure.yaml", [azure_entry("gpt-4o", az, "az")]))
        a = h.alice
        batch = await upload_create(h, chat_lines(12, "gpt-4o", fail=(3,)))
        assert (batch.model, batch.provider) == ("gpt-4o", "azure")
        states = await watch_all(a, batch.id)
        assert_lifecycle(states)
        final = states[-1]
        assert (final.request_counts.total, final.request_counts.completed, final.request_counts.failed) == (12, 11, 1)
        out, err = await results(a, final)
        assert len(out) == 11 and [x["custom_id"] for x in err] == ["req-3"]
        for line in out:
            assert ChatCompletion.model_validate(line["response"]["body"]).model == "my-gpt4o-batch"
        for stamp in ("in_progress_at", "finalizing_at", "completed_at"):
            assert final.HasField(stamp)

        # Azure's surface: deployment name as the model, urls without /v1, api-key header, api-version
        pb = provider_batch(az, batch.id)
        stats = az.uploads[pb.input_file_id]
        assert stats.models == {"my-gpt4o-batch"} and stats.urls == {"/chat/completions"}
        assert az.created_batch_requests[-1]["endpoint"] == "/chat/completions"
        for _method, path_qs, hdrs in az.calls:
            assert path_qs.startswith("/openai/") and "api-version=2024-10-21" in path_qs
            assert hdrs.get("api-key") == AZURE_KEY and "Authorization" not in hdrs
        for state in states:
            assert_ours_only(state, az)
    finally:
        await az.stop()


async def test_embeddings_batch_on_openai(harness_oai_az, oai):
    h = harness_oai_az
    lines = [request_line(f"e-{i}", model="gpt-4o-mini", url="/v1/embeddings", content=f"text {i}")
             for i in range(5)]
    f = await h.upload(h.alice, jsonl(lines))
    final = (await watch_all(h.alice, (await create(h.alice, f.id, endpoint="/v1/embeddings")).id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
    out, _ = await results(h.alice, final)
    assert len(out) == 5
    for line in out:
        CreateEmbeddingResponse.model_validate(line["response"]["body"])


async def test_provider_validation_errors_keep_their_line_numbers(harness_oai_az, oai, az):
    h = harness_oai_az
    oai.known_models = {"gpt-4o-2024-08-06"}  # the deployment's model is unknown to this account
    batch = await upload_create(h, chat_lines(3, "gpt-4o-mini"))
    final = (await watch_all(h.alice, batch.id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_FAILED
    assert [(e.code, e.line, e.param) for e in final.errors] == [("model_not_found", 1, "body.model")]
    assert "gpt-4o-mini-2024-07-18" in final.errors[0].message
    assert final.HasField("failed_at") and not final.output_file_id
    assert final.cost.status == batch_pb2.COST_STATUS_KNOWN and final.cost.amount == "0"
    mirrored = as_openai_batch(final)
    assert mirrored.errors.data[0].line == 1 and mirrored.errors.data[0].code == "model_not_found"
    assert_ours_only(final, oai, az)


async def test_model_resolution(harness_oai_az, oai, az):
    h = harness_oai_az
    # CreateBatch.model wins over the file's
    b = await upload_create(h, chat_lines(2, "something-else"), model="gpt-4o")
    assert (b.model, b.provider) == ("gpt-4o", "azure")
    final = (await watch_all(h.alice, b.id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
    assert az.uploads[provider_batch(az, b.id).input_file_id].models == {"my-gpt4o-batch"}
    # provider filter on CreateBatch
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await upload_create(h, chat_lines(2, "gpt-4o"), provider="openai")
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # no match anywhere: INVALID_ARGUMENT naming the model
    for fields, field_name in (({}, "input_file.model"), ({"model": "gpt-9-turbo"}, "model")):
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await upload_create(h, chat_lines(2, "gpt-9-turbo"), **fields)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "gpt-9-turbo" in ei.value.details()
        info, bad = error_details(ei.value)
        assert info.reason == "MODEL_NOT_FOUND" and info.metadata["model"] == "gpt-9-turbo"
        assert bad.field_violations[0].field == field_name


async def test_provider_model_with_credentials_from_the_environment(tmp_path, servers, oai, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("OPENAI_API_BASE", oai.base_url)
    h = await servers.start(write_litellm_config(tmp_path / "none.yaml", []))
    # adhoc deployments have no poll_interval param: a quick provider for this test
    h.server.providers.register("openai", lambda: OpenAIBatchProvider(poll_interval=0.05))
    batch = await upload_create(h, chat_lines(4, "gpt-4.1-mini"), model="openai/gpt-4.1-mini")
    assert (batch.model, batch.provider) == ("openai/gpt-4.1-mini", "openai")
    final = (await watch_all(h.alice, batch.id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED and final.request_counts.completed == 4
    assert oai.uploads[provider_batch(oai, batch.id).input_file_id].models == {"gpt-4.1-mini"}
    # also from the file's model
    batch = await upload_create(h, chat_lines(2, "openai/gpt-4.1-nano"))
    final = (await watch_all(h.alice, batch.id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
    assert oai.uploads[provider_batch(oai, batch.id).input_file_id].models == {"gpt-4.1-nano"}
    # without credentials in the environment: FAILED_PRECONDITION saying what is missing
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await upload_create(h, chat_lines(2, "gpt-4.1"), model="openai/gpt-4.1")
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "api_key" in ei.value.details()


async def test_a_provider_that_keeps_no_upload_still_answers_every_line(tmp_path, servers):
    """The fake mode bench/passthrough.py uses: statistics-only uploads, output generated on read."""
    fake = await started(FakeBatchAPI(api_key=OPENAI_KEY, store_uploads=False, synthetic_output=True))
    try:
        h = await servers.start(write_litellm_config(tmp_path / "synthetic.yaml",
                                                     [openai_entry("gpt-4o-mini", fake, "synthetic")]))
        lines = [request_line(f"req-{i}", model="gpt-4o-mini", content=f"question {i} " + "lorem ipsum " * 300)
                 for i in range(25)]
        batch = await upload_create(h, lines)
        final = (await watch_all(h.alice, batch.id))[-1]
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED and final.request_counts.completed == 25
        out, err = await results(h.alice, final)
        assert [x["custom_id"] for x in out] == [f"req-{i}" for i in range(25)] and err == []
        for line in out:
            assert ChatCompletion.model_validate(line["response"]["body"]).model == "gpt-4o-mini-2024-07-18"
        (stats,) = fake.uploads.values()
        assert all(f.content is None for f in fake.files.values())
        sent = next(iter(fake.downloads.values()))[2]
        assert 0.8 < sent / stats.bytes < 1.25  # output about as large as the input
    finally:
        await fake.stop()


# ------------------------------------------------------------------ provider failures

@pytest.mark.parametrize("status", [401, 403])
async def test_auth_failure_fails_the_batch_and_spares_the_others(harness_oai_az, oai, az, status):
    h = harness_oai_az
    good = await upload_create(h, chat_lines(5, "gpt-4o-mini"))
    if status == 401:  # a wrong key: the fake itself answers 401
        bad = await upload_create(h, chat_lines(5, "gpt-4o-mini-badkey"))
    else:  # a key without the right role on the Azure resource
        az.inject(403, path_contains="/files", method="POST",
                  body={"error": {"code": "PermissionDenied", "message": "Principal does not have access "
                                                                         "to API/Operation."}})
        bad = await upload_create(h, chat_lines(5, "gpt-4o"))
    bad_final, good_final = await asyncio.gather(wait_status(h.alice, bad.id, batch_pb2.BATCH_STATUS_FAILED),
                                                 watch_all(h.alice, good.id))
    assert good_final[-1].status == batch_pb2.BATCH_STATUS_COMPLETED
    assert [e.code for e in bad_final.errors] == ["provider_auth"]
    message = bad_final.errors[0].message
    assert f"HTTP {status}" in message and "api_key" in message
    assert WRONG_KEY not in message and OPENAI_KEY not in message and AZURE_KEY not in message
    assert_ours_only(bad_final, oai, az)
    # the server keeps serving: another batch on the same deployment still runs
    again = await upload_create(h, chat_lines(2, "gpt-4o-mini"))
    assert (await watch_all(h.alice, again.id))[-1].status == batch_pb2.BATCH_STATUS_COMPLETED


async def test_a_key_echoed_by_the_provider_is_masked(harness_oai_az, oai):
    h = harness_oai_az
    oai.inject(401, path_contains="/files", method="POST",
               body={"error": {"message": f"Incorrect API key provided: {OPENAI_KEY}.",
                               "type": "invalid_request_error", "code": "invalid_api_key", "param": None}})
    batch = await upload_create(h, chat_lines(2, "gpt-4o-mini"))
    final = (await watch_all(h.alice, batch.id))[-1]
    assert final.errors[0].code == "provider_auth"
    assert OPENAI_KEY not in final.errors[0].message and "Incorrect API key provided: ***" in final.errors[0].message


async def test_rate_limit_is_retried_honouring_retry_after(harness_oai_az, oai):
    h = harness_oai_az
    oai.inject(429, 2, retry_after=0.4, path_contains="/files", method="POST")
    oai.inject(429, 1, retry_after=0.3, path_contains="/batches/", method="GET")
    started_at = time.monotonic()
    batch = await upload_create(h, chat_lines(4, "gpt-4o-mini"))
    final = (await watch_all(h.alice, batch.id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED and final.request_counts.completed == 4
    assert time.monotonic() - started_at >= 0.4 * 2 + 0.3  # waited as asked
    assert oai.calls_to("POST", "/v1/files") == 3  # two 429s, then accepted
    assert len(oai.batches) == 1 and not final.errors


async def test_quota_exhausted_is_not_retried(harness_oai_az, oai):
    h = harness_oai_az
    oai.inject(429, 1, path_contains="/batches", method="POST",
               body={"error": {"message": "You exceeded your current quota.", "type": "insufficient_quota",
                               "code": "insufficient_quota", "param": None}})
    batch = await upload_create(h, chat_lines(2, "gpt-4o-mini"))
    final = (await watch_all(h.alice, batch.id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_FAILED
    assert final.errors[0].code == "provider_quota_exceeded" and "quota" in final.errors[0].message


async def test_server_errors_are_retried(harness_oai_az, oai):
    h = harness_oai_az
    oai.inject(503, 1, path_contains="/files", method="POST")
    # a 500 on create may have created the batch: the tracker reconciles instead of creating twice
    oai.inject(500, 1, path_contains="/batches", method="POST")
    oai.inject(502, 2, path_contains="/batches/", method="GET")
    oai.inject(500, 1, path_contains="/content", method="GET")
    batch = await upload_create(h, chat_lines(6, "gpt-4o-mini"))
    final = (await watch_all(h.alice, batch.id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED and final.request_counts.completed == 6
    assert len(oai.batches) == 1, "one provider batch despite the 500 on create"
    assert not oai._injections, "every injected failure was met"
    out, _ = await results(h.alice, final)
    assert len(out) == 6


async def test_404_on_our_job_fails_with_an_explanation(harness_oai_az, oai, az):
    h = harness_oai_az
    oai.clock = "manual"  # keep it running at the provider until we remove it
    batch = await upload_create(h, chat_lines(3, "gpt-4o-mini"))
    await wait_status(h.alice, batch.id, batch_pb2.BATCH_STATUS_IN_PROGRESS)
    pb = provider_batch(oai, batch.id)
    del oai.batches[pb.id]  # deleted at the provider (or the key now points at another account)
    final = await wait_status(h.alice, batch.id, batch_pb2.BATCH_STATUS_FAILED)
    assert [e.code for e in final.errors] == ["provider_job_not_found"]
    message = final.errors[0].message
    assert "404" in message and batch.id in message and "deleted" in message and "oai-main" in message
    assert pb.id not in message
    # The job's answers can't be fetched either: the error says so, and nothing is charged.
    assert "could not be fetched" in message and "nothing was charged" in message and final.cost.amount == "0"
    assert_ours_only(final, oai, az)


async def test_network_errors_are_retried_until_the_provider_is_back(harness_oai_az, oai, caplog):
    h = harness_oai_az
    oai.clock = "manual"
    batch = await upload_create(h, chat_lines(5, "gpt-4o-mini"))
    await wait_status(h.alice, batch.id, batch_pb2.BATCH_STATUS_IN_PROGRESS)
    pb = provider_batch(oai, batch.id)
    await oai.stop()
    await asyncio.sleep(1.5)
    assert (await get(h.alice, batch.id)).status == batch_pb2.BATCH_STATUS_IN_PROGRESS
    assert "network error" in caplog.text
    await oai.start(port=oai.port)  # same address, same state
    oai.run_to_end(pb.id)
    final = await wait_status(h.alice, batch.id, batch_pb2.BATCH_STATUS_COMPLETED, timeout=30)
    assert final.request_counts.completed == 5 and not final.errors


async def test_network_errors_that_last_fail_the_batch(harness_oai_az, oai, az):
    h = harness_oai_az
    oai.clock = "manual"
    batch = await upload_create(h, chat_lines(2, "gpt-4o-mini-fragile"))  # give_up_after: 1.5 s
    await wait_status(h.alice, batch.id, batch_pb2.BATCH_STATUS_IN_PROGRESS)
    other = await upload_create(h, chat_lines(2, "gpt-4o"))  # Azure is fine meanwhile
    await oai.stop()
    final = await wait_status(h.alice, batch.id, batch_pb2.BATCH_STATUS_FAILED, timeout=30)
    assert [e.code for e in final.errors] == ["provider_unreachable"]
    assert "network error" in final.errors[0].message and "gave up" in final.errors[0].message
    assert_ours_only(final, oai, az)
    assert (await watch_all(h.alice, other.id))[-1].status == batch_pb2.BATCH_STATUS_COMPLETED


# ------------------------------------------------------------------ several deployments

@pytest.fixture
async def pool_fakes():
    a = await started(FakeBatchAPI(api_key=POOL_A_KEY, clock="manual"))
    b = await started(FakeBatchAPI(api_key=POOL_B_KEY, clock="manual"))
    yield a, b
    await a.stop()
    await b.stop()


def pool_config(path: Path, a: FakeBatchAPI, b: FakeBatchAPI, **sections) -> Path:
    return write_litellm_config(path, [
        openai_entry("pool", a, "pool-a", key="os.environ/BG_E2E_POOL_A_KEY"),
        openai_entry("pool", b, "pool-b", key="os.environ/BG_E2E_POOL_B_KEY"),
    ], **sections)


async def test_two_deployments_share_the_load(tmp_path, servers, pool_fakes):
    a, b = pool_fakes
    h = await servers.start(pool_config(tmp_path / "pool.yaml", a, b))
    files = [await h.upload(h.alice, jsonl(chat_lines(10, "pool", prefix=f"f{i}"))) for i in range(6)]
    # created concurrently: each create must see the load the others just added
    batches = await asyncio.gather(*(create(h.alice, f.id) for f in files))
    for batch in batches:
        await wait_status(h.alice, batch.id, batch_pb2.BATCH_STATUS_IN_PROGRESS)
    assert (len(a.batches), len(b.batches)) == (3, 3)
    deployment_of = {bid: (await h.server.store.get_batch(bid)).deployment_id for bid in (x.id for x in batches)}
    assert Counter(deployment_of.values()) == Counter({"pool-a": 3, "pool-b": 3})
    for batch in batches:
        fake = a if deployment_of[batch.id] == "pool-a" else b
        fake.run_to_end(provider_batch(fake, batch.id).id)
    for batch in batches:
        final = await wait_status(h.alice, batch.id, batch_pb2.BATCH_STATUS_COMPLETED)
        assert final.model == "pool" and final.request_counts.completed == 10
        assert_ours_only(final, a, b)


async def test_a_failing_deployment_cools_down(tmp_path, servers, pool_fakes):
    a, b = pool_fakes
    a.api_key = "a-rotated-key"  # every call with our key for A now gets 401
    h = await servers.start(pool_config(tmp_path / "pool.yaml", a, b,
                                        router_settings={"allowed_fails": 1, "cooldown_time": 300}))
    placed = []
    for i in range(4):
        batch = await upload_create(h, chat_lines(2, "pool", prefix=f"c{i}"))
        placed.append((await h.server.store.get_batch(batch.id)).deployment_id)
        if placed[-1] == "pool-a":
            await wait_status(h.alice, batch.id, batch_pb2.BATCH_STATUS_FAILED)
        else:
            await wait_status(h.alice, batch.id, batch_pb2.BATCH_STATUS_IN_PROGRESS)
    # idle deployments tie and the first wins, until A has failed more than allowed_fails times
    assert placed == ["pool-a", "pool-a", "pool-b", "pool-b"]


async def test_a_batch_stays_on_its_deployment_across_a_restart(tmp_path, servers, pool_fakes):
    a, b = pool_fakes
    config = pool_config(tmp_path / "pool.yaml", a, b)
    h = await servers.start(config)
    first = await upload_create(h, chat_lines(4, "pool", prefix="one"))
    second = await upload_create(h, chat_lines(6, "pool", prefix="two"))
    for batch in (first, second):
        await wait_status(h.alice, batch.id, batch_pb2.BATCH_STATUS_IN_PROGRESS)
    assert (await h.server.store.get_batch(first.id)).deployment_id == "pool-a"
    assert (await h.server.store.get_batch(second.id)).deployment_id == "pool-b"
    pa, pb = provider_batch(a, first.id), provider_batch(b, second.id)
    await servers.stop(h)

    # Same data dir, same config. A new router has no load: a new batch would go to A, but the
    # stored ones go on with the deployment (account) they were placed on.
    calls_a, calls_b = len(a.calls), len(b.calls)
    h = await servers.start(config)
    a.run_to_end(pa.id)
    final = await wait_status(h.alice, first.id, batch_pb2.BATCH_STATUS_COMPLETED)
    assert final.request_counts.completed == 4
    out, _ = await results(h.alice, final)
    assert sorted(x["custom_id"] for x in out) == [f"one-{i}" for i in range(4)]

    cancelled = await h.alice.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=second.id),
                                                  metadata=h.alice.metadata)
    assert cancelled.batch.status == batch_pb2.BATCH_STATUS_CANCELLING
    for _ in range(200):
        if b.calls_to("POST", f"/batches/{pb.id}/cancel"):
            break
        await asyncio.sleep(0.02)
    assert b.batches[pb.id].status == "cancelling"
    assert a.calls_to("POST", "/cancel") == 0
    b.advance(pb.id)
    final = await wait_status(h.alice, second.id, batch_pb2.BATCH_STATUS_CANCELLED)
    assert final.HasField("cancelled_at")
    # after the restart every call went to the batch's own account, with its own key
    assert all(hdrs["Authorization"] == f"Bearer {POOL_A_KEY}" for _, _, hdrs in a.calls[calls_a:])
    assert all(hdrs["Authorization"] == f"Bearer {POOL_B_KEY}" for _, _, hdrs in b.calls[calls_b:])
    assert any(f"/batches/{pb.id}" in p for _, p, _ in b.calls[calls_b:])
    assert (len(a.batches), len(b.batches)) == (1, 1), "nothing was submitted twice"


async def test_a_batch_whose_deployment_left_the_config_fails_clearly(tmp_path, servers, pool_fakes):
    a, b = pool_fakes
    h = await servers.start(pool_config(tmp_path / "pool.yaml", a, b))
    batch = await upload_create(h, chat_lines(2, "pool"))
    await wait_status(h.alice, batch.id, batch_pb2.BATCH_STATUS_IN_PROGRESS)
    await servers.stop(h)
    only_b = write_litellm_config(tmp_path / "only-b.yaml", [
        openai_entry("pool", b, "pool-b", key="os.environ/BG_E2E_POOL_B_KEY")])
    h = await servers.start(only_b)
    final = await wait_status(h.alice, batch.id, batch_pb2.BATCH_STATUS_FAILED)
    assert final.errors[0].code == "deployment_not_found" and "pool-a" in final.errors[0].message
    assert len(b.batches) == 0, "never moved to another account"


# ------------------------------------------------------------------ start-up errors

def test_a_bad_config_is_a_clear_start_up_error(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"model_list": [
        {"model_name": "ok", "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "os.environ/BG_E2E_KEY"}},
        {"model_name": "broken", "litellm_params": {"model": "azure/x", "api_key": "os.environ/BG_E2E_KEY",
                                                    "api_base": ["https://a", "https://b"]}},
    ]}))
    env = dict(os.environ, BG_E2E_KEY=OPENAI_KEY, BATCHGATE_MASTER_KEY="k")
    proc = subprocess.run([sys.executable, "-m", "batchgate_server.cli", "--config", str(config),
                           "--data-dir", str(tmp_path / "data"), "--address", "127.0.0.1:0"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "model_list[1] (broken)" in proc.stderr and "api_base must be a string" in proc.stderr
    assert "Traceback" not in proc.stderr and OPENAI_KEY not in proc.stderr + proc.stdout

    config.write_text(yaml.safe_dump({"model_list": [
        {"model_name": "ok", "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "os.environ/BG_UNSET"}}]}))
    env.pop("BG_UNSET", None)
    proc = subprocess.run([sys.executable, "-m", "batchgate_server.cli", "--config", str(config),
                           "--data-dir", str(tmp_path / "data")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "BG_UNSET is not set" in proc.stderr and "model_list[0] (ok)" in proc.stderr


# ------------------------------------------------------------------ nothing left at the provider

def input_files(fake: FakeBatchAPI, batch_id: str):
    """The blocking lister `eventually_empty` polls: our input files at the fake for that batch."""
    return lambda: [f.id for f in fake.files.values() if f.filename == f"{batch_id}.jsonl"]


async def test_a_batch_failed_after_its_upload_leaves_no_input_file(harness_oai_az, oai):
    h = harness_oai_az
    oai.inject(401, path_contains="/batches", method="POST")  # the upload went through, the create is refused
    batch = await upload_create(h, chat_lines(2, "gpt-4o-mini"))
    final = await wait_status(h.alice, batch.id, batch_pb2.BATCH_STATUS_FAILED)
    assert [e.code for e in final.errors] == ["provider_auth"]
    assert oai.calls_to("POST", "/v1/files") == 1 and not oai.batches
    assert await eventually_empty(input_files(oai, batch.id)) == [], "the input file outlived its batch"


async def test_a_batch_cancelled_between_upload_and_create_leaves_no_input_file(harness_oai_az, oai):
    h = harness_oai_az
    oai.inject(503, 1000, path_contains="/batches", method="POST")  # every create fails for now
    batch = await upload_create(h, chat_lines(2, "gpt-4o-mini"))
    while not input_files(oai, batch.id)() or not oai.calls_to("POST", "/v1/batches"):
        await asyncio.sleep(0.02)  # uploaded, and the create was tried
    await h.alice.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch.id), metadata=h.alice.metadata)
    final = await wait_status(h.alice, batch.id, batch_pb2.BATCH_STATUS_CANCELLED)
    assert final.request_counts.completed == 0 and not oai.batches
    assert await eventually_empty(input_files(oai, batch.id)) == [], "the input file outlived its batch"
