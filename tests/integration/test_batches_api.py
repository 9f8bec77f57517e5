"""BatchService and the built-in executor against the real server, through the generated stubs,
with a fake OpenAI-compatible upstream."""

from __future__ import annotations

import asyncio
import gc
import json
import logging

import grpc
import pytest
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

from batchgate.v1 import batch_pb2, file_pb2
from tests.conftest import batch_file, error_details, jsonl, request_line, start_harness
from tests.integration.batch_helpers import (
    assert_lifecycle,
    create,
    results,
    status_names,
    upstream_entry,
    watch_all,
    write_config,
)


@pytest.fixture
async def fake_harness(tmp_path, upstream):
    config = write_config(tmp_path / "models.yaml", [
        upstream_entry("fake-llm", upstream.base_url),
        upstream_entry("fake-expiring", upstream.base_url, completion_window=1.5),
    ])
    h = await start_harness(tmp_path / "data", config_file=config)
    try:
        yield h
    finally:
        await h.channel.close()
        await h.server.stop(grace=0)


def assert_openai_line(line: dict) -> None:
    assert set(line) == {"id", "custom_id", "response", "error"}
    assert line["id"].startswith("batch_req_")


# -- lifecycle ------------------------------------------------------------------------------------


async def test_simulated_batch_runs_to_completion_through_watch(harness):
    a = harness.alice
    f = await harness.upload(a, batch_file(300))
    batch = await create(a, f.id, model="simulated", metadata={"team": "search"})
    assert batch.id.startswith("batch_")
    assert batch.status == batch_pb2.BATCH_STATUS_VALIDATING
    assert batch.provider == "openai_compatible" and batch.model == "simulated"
    assert batch.metadata == {"team": "search"}
    assert batch.expires_at.seconds - batch.created_at.seconds == 24 * 3600

    states = await watch_all(a, batch.id)
    assert_lifecycle(states)
    revisions = [s.revision for s in states]
    assert revisions == sorted(set(revisions)), "revisions only grow"
    final = states[-1]
    assert final.request_counts.total == 300 and final.request_counts.completed == 300
    assert final.request_counts.failed == 0
    for stamp in ("created_at", "in_progress_at", "finalizing_at", "completed_at"):
        assert final.HasField(stamp), stamp
    assert final.in_progress_at.ToNanoseconds() <= final.finalizing_at.ToNanoseconds() <= final.completed_at.ToNanoseconds()
    assert not final.HasField("failed_at") and not final.HasField("cancelled_at")

    out, err = await results(a, final)
    assert err == [] and not final.error_file_id
    assert sorted(line["custom_id"] for line in out) == sorted(f"req-{i}" for i in range(300))
    for line in out:
        assert_openai_line(line)
        assert line["response"]["status_code"] == 200 and line["error"] is None
        completion = ChatCompletion.model_validate(line["response"]["body"])
        assert completion.choices[0].message.content.startswith("[simulated]")
        assert completion.system_fingerprint == "batchgate-simulated"
    # Usage is the sum of the output lines' usage.
    prompt = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in out)
    completion_tokens = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in out)
    assert final.usage.input_tokens == prompt and final.usage.output_tokens == completion_tokens
    assert final.usage.total_tokens == prompt + completion_tokens
    # The output file is a batch_output File of the same project.
    output_file = (await a.files.GetFile(file_pb2.GetFileRequest(file_id=final.output_file_id),
                                         metadata=a.metadata)).file
    assert output_file.purpose == file_pb2.FILE_PURPOSE_BATCH_OUTPUT and output_file.line_count == 300
    got = (await a.batches.GetBatch(batch_pb2.GetBatchRequest(batch_id=batch.id), metadata=a.metadata)).batch
    assert got == final


async def test_executor_against_upstream_every_result_kind(fake_harness, upstream):
    a = fake_harness.alice
    lines = [request_line(f"ok-{i}", model="fake-llm", content=f"hello {i}") for i in range(20)]
    lines += [
        request_line("retry-429", model="fake-llm", content="FAIL:429-once please"),
        request_line("always-500", model="fake-llm", content="FAIL:500 please"),
        request_line("bad-400", model="fake-llm", content="FAIL:400 please"),
        request_line("broken-json", model="fake-llm", content="FAIL:malformed please"),
    ]
    f = await fake_harness.upload(a, jsonl(lines))
    final = (await watch_all(a, (await create(a, f.id)).id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
    assert final.model == "fake-llm"
    out, err = await results(a, final)
    by_id = {line["custom_id"]: line for line in out + err}
    assert len(by_id) == len(out) + len(err) == 24, "every request answered exactly once"
    assert final.request_counts.completed == len(out) == 21
    assert final.request_counts.failed == len(err) == 3

    # 429 with Retry-After: retried after at least a second, then answered.
    assert by_id["retry-429"]["response"]["status_code"] == 200
    assert upstream.count("FAIL:429-once please") == 2
    # 500 is retried max_retries (2) times, then reported with the upstream's status and body.
    assert upstream.count("FAIL:500 please") == 3
    assert by_id["always-500"]["response"]["status_code"] == 500
    assert by_id["always-500"]["response"]["body"]["error"]["type"] == "server_error"
    # 400 is not retried.
    assert upstream.count("FAIL:400 please") == 1
    assert by_id["bad-400"]["response"]["status_code"] == 400
    # A body that is not JSON becomes a non-HTTP error after retries.
    assert by_id["broken-json"]["response"] is None
    assert by_id["broken-json"]["error"]["code"] == "invalid_response"
    for line in out:
        assert_openai_line(line)
        ChatCompletion.model_validate(line["response"]["body"])
    # Each ok request was sent exactly once, with the deployment's model written in.
    assert all(upstream.count(f"hello {i}") == 1 for i in range(20))
    assert {b["model"] for b in upstream.last_bodies} == {"fake-model"}


async def test_embeddings_batch(fake_harness, upstream):
    a = fake_harness.alice
    lines = [request_line(f"e{i}", model="fake-llm", url="/v1/embeddings", content=f"doc {i}") for i in range(10)]
    f = await fake_harness.upload(a, jsonl(lines))
    final = (await watch_all(a, (await create(a, f.id, endpoint="/v1/embeddings")).id))[-1]
    out, _ = await results(a, final)
    assert len(out) == 10
    for line in out:
        CreateEmbeddingResponse.model_validate(line["response"]["body"])
    assert final.usage.input_tokens == sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in out)


async def test_cancel_mid_run_keeps_finished_results(fake_harness, upstream):
    a = fake_harness.alice
    lines = [request_line(f"fast-{i}", model="fake-llm", content=f"quick {i}") for i in range(8)]
    lines += [request_line(f"slow-{i}", model="fake-llm", content=f"SLOW:60000 wait {i}") for i in range(40)]
    f = await fake_harness.upload(a, jsonl(lines))
    batch = await create(a, f.id)
    # Wait until the fast ones are done and the slow ones are in flight.
    async for event in a.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=batch.id), metadata=a.metadata):
        if event.WhichOneof("event") == "batch" and event.batch.request_counts.completed >= 8:
            break
    cancelled = (await a.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch.id),
                                             metadata=a.metadata)).batch
    assert cancelled.status == batch_pb2.BATCH_STATUS_CANCELLING
    assert cancelled.HasField("cancelling_at")
    states = await watch_all(a, batch.id, start_revision=cancelled.revision)
    final = states[-1]
    assert final.status == batch_pb2.BATCH_STATUS_CANCELLED and final.HasField("cancelled_at")
    out, err = await results(a, final)
    assert sorted(line["custom_id"] for line in out) == [f"fast-{i}" for i in range(8)]
    assert len(err) == 40 and {line["error"]["code"] for line in err} == {"batch_cancelled"}
    assert final.request_counts.completed == 8 and final.request_counts.failed == 40
    sent = upstream.requests_total
    await asyncio.sleep(0.3)
    assert upstream.requests_total == sent, "nothing is sent after the cancel"
    # Only requests that were dispatched before the cancel reached the upstream (concurrency 8).
    assert sum(upstream.count(f"SLOW:60000 wait {i}") for i in range(40)) <= 8

    with pytest.raises(grpc.aio.AioRpcError) as err_info:
        await a.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch.id), metadata=a.metadata)
    assert err_info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_details(err_info.value)[0].reason == "BATCH_ALREADY_ENDED"



async def get_batch(caller, batch_id: str) -> batch_pb2.Batch:
    return (await caller.batches.GetBatch(batch_pb2.GetBatchRequest(batch_id=batch_id), metadata=caller.metadata)).batch


async def test_a_poller_sees_each_new_state_at_once(fake_harness, upstream):
    """GetBatch answers a batch unchanged since its last read from the state it kept (api/batches.py
    LatestStates, the store's refresh_batch): a change must show in the very next read."""
    a = fake_harness.alice
    f = await fake_harness.upload(a, jsonl([request_line(f"r-{i}", model="fake-llm", content=f"SLOW:60000 q {i}")
                                            for i in range(20)]))
    batch = await create(a, f.id)
    first = await get_batch(a, batch.id)
    assert (await get_batch(a, batch.id)).revision >= first.revision
    cancelled = (await a.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch.id),
                                             metadata=a.metadata)).batch
    assert cancelled.revision > first.revision
    seen = await get_batch(a, batch.id)
    assert seen.revision >= cancelled.revision
    assert seen.status in (batch_pb2.BATCH_STATUS_CANCELLING, batch_pb2.BATCH_STATUS_CANCELLED)
    final = (await watch_all(a, batch.id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_CANCELLED
    assert await get_batch(a, batch.id) == final

async def test_completion_window_expires_unfinished_requests(fake_harness, upstream):
    a = fake_harness.alice
    lines = [request_line("done", model="fake-expiring", content="fine")]
    lines += [request_line(f"stuck-{i}", model="fake-expiring", content=f"FAIL:hang {i}") for i in range(3)]
    lines += [request_line(f"queued-{i}", model="fake-expiring", content=f"queued {i}") for i in range(30)]
    f = await fake_harness.upload(a, jsonl(lines))
    final = (await watch_all(a, (await create(a, f.id, model="fake-expiring")).id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_EXPIRED and final.HasField("expired_at")
    out, err = await results(a, final)
    answered = {line["custom_id"] for line in out} | {line["custom_id"] for line in err}
    assert len(answered) == len(out) + len(err) == 34
    assert "done" in {line["custom_id"] for line in out}
    expired = {line["custom_id"] for line in err if line["error"] and line["error"]["code"] == "batch_expired"}
    assert {f"stuck-{i}" for i in range(3)} <= expired


# -- watch ----------------------------------------------------------------------------------------


async def test_watch_resumes_from_a_revision_and_heartbeats(fake_harness, upstream):
    a = fake_harness.alice
    f = await fake_harness.upload(a, jsonl([request_line("h", model="fake-llm", content="SLOW:1500 hi")]))
    batch = await create(a, f.id)
    events = []
    async for event in a.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=batch.id), metadata=a.metadata,
                                            timeout=30):
        events.append(event)
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "batch" and kinds[-1] == "batch"
    assert "heartbeat" in kinds, "an idle stream gets heartbeats (interval 0.5 s in tests)"
    beats = [e.heartbeat for e in events if e.WhichOneof("event") == "heartbeat"]
    assert all(b.revision >= 1 and b.sent_at.seconds > 0 for b in beats)
    states = [e.batch for e in events if e.WhichOneof("event") == "batch"]
    assert states[-1].status == batch_pb2.BATCH_STATUS_COMPLETED

    middle = states[len(states) // 2].revision
    resumed = await watch_all(a, batch.id, start_revision=middle)
    assert [s.revision for s in resumed] == [states[-1].revision], "only what is newer than start_revision"
    assert await watch_all(a, batch.id, start_revision=states[-1].revision) == []


async def test_watch_from_a_future_revision_sends_the_current_state_and_ends_with_the_terminal_one(
        fake_harness, upstream):
    # No client can have seen a revision beyond the current one: it gets the current state at once,
    # then every change, and the stream closes after the terminal state.
    a = fake_harness.alice
    f = await fake_harness.upload(a, jsonl([request_line("h", model="fake-llm", content="SLOW:1000 hi")]))
    batch = await create(a, f.id)
    running = await asyncio.wait_for(watch_all(a, batch.id, start_revision=batch.revision + 1000), 20)
    assert running[0].revision >= batch.revision
    assert running[-1].status == batch_pb2.BATCH_STATUS_COMPLETED
    final = running[-1]
    for future in (final.revision + 1, 2**63 - 1):
        assert await asyncio.wait_for(watch_all(a, batch.id, start_revision=future), 20) == [final]
    assert await watch_all(a, batch.id, start_revision=final.revision) == [], "nothing newer than what it has"


async def test_watch_and_get_are_isolated_between_projects(harness):
    f = await harness.upload(harness.alice, batch_file(5))
    batch = await create(harness.alice, f.id, model="simulated")
    b = harness.bob
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await watch_all(b, batch.id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_details(err.value)[0].reason == "BATCH_NOT_FOUND"
    for call in (b.batches.GetBatch(batch_pb2.GetBatchRequest(batch_id=batch.id), metadata=b.metadata),
                 b.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch.id), metadata=b.metadata)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await b.batches.ListBatches(batch_pb2.ListBatchesRequest(), metadata=b.metadata)).batches == []
    # Bob cannot run a batch over Alice's file either.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(b, f.id, model="simulated")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_details(err.value)[0].reason == "FILE_NOT_FOUND"



async def test_another_project_cannot_read_a_batch_its_owner_polls(harness):
    a, b = harness.alice, harness.bob
    f = await harness.upload(a, batch_file(1))
    batch = await create(a, f.id, model="simulated")
    polled = await get_batch(a, batch.id)  # the server now keeps this state for the next read
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await get_batch(b, batch.id)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_details(err.value)[0].reason == "BATCH_NOT_FOUND"
    assert (await get_batch(a, batch.id)).id == polled.id

async def test_many_watchers_one_poll(harness):
    a = harness.alice
    f = await harness.upload(a, batch_file(500))
    batch = await create(a, f.id, model="simulated")
    finals = await asyncio.gather(*[watch_all(a, batch.id) for _ in range(50)])
    assert {states[-1].revision for states in finals} == {finals[0][-1].revision}
    assert all(states[-1].status == batch_pb2.BATCH_STATUS_COMPLETED for states in finals)


# -- create validation ----------------------------------------------------------------------------


CREATE_CASES = [
    ({"input_file_id": ""}, grpc.StatusCode.INVALID_ARGUMENT, "MISSING_INPUT_FILE_ID"),
    ({"endpoint": "/v1/images/generations"}, grpc.StatusCode.INVALID_ARGUMENT, "UNSUPPORTED_ENDPOINT"),
    ({"endpoint": "/v1/embeddings"}, grpc.StatusCode.INVALID_ARGUMENT, "ENDPOINT_MISMATCH"),
    ({"completion_window": "48h"}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_COMPLETION_WINDOW"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_METADATA"),
    ({"metadata": {"k" * 65: "v"}}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_METADATA"),
    ({"metadata": {"k": "v" * 513}}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_METADATA"),
    ({"model": "no-such-model"}, grpc.StatusCode.INVALID_ARGUMENT, "MODEL_NOT_FOUND"),
    ({"model": "simulated", "provider": "anthropic"}, grpc.StatusCode.INVALID_ARGUMENT, "MODEL_NOT_FOUND"),
    ({"input_file_id": "file-doesnotexist"}, grpc.StatusCode.NOT_FOUND, "FILE_NOT_FOUND"),
    ({"request_id": "r" * 129}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST_ID"),
    ({"metadata": {"": "v"}}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_METADATA"),
    ({"model": "m" * 257}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_MODEL"),
    ({"model": "simulated", "provider": "p" * 65}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PROVIDER"),
]


@pytest.mark.parametrize("fields, code, reason", CREATE_CASES, ids=[f"{r}-{i}" for i, (_, _, r) in enumerate(CREATE_CASES)])
async def test_create_rejects_bad_input(harness, fields, code, reason):
    a = harness.alice
    f = await harness.upload(a, batch_file(2))
    request = {"input_file_id": f.id, "model": "simulated", **fields}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(a, request.pop("input_file_id"), **request)
    assert err.value.code() == code
    info, _ = error_details(err.value)
    assert info.reason == reason
    assert (await a.batches.ListBatches(batch_pb2.ListBatchesRequest(), metadata=a.metadata)).batches == []


async def test_create_needs_a_batch_input_file(harness):
    a = harness.alice
    f = await harness.upload(a, batch_file(3))
    done = (await watch_all(a, (await create(a, f.id, model="simulated")).id))[-1]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(a, done.output_file_id, model="simulated")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info, _ = error_details(err.value)
    assert info.reason == "FILE_NOT_BATCH_INPUT" and info.metadata["purpose"] == "batch_output"


async def test_unmatched_file_model_names_the_model(harness):
    a = harness.alice
    f = await harness.upload(a, batch_file(2, model="mystery-model"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await create(a, f.id)
    info, bad = error_details(err.value)
    assert info.reason == "MODEL_NOT_FOUND" and info.metadata["model"] == "mystery-model"
    assert "mystery-model" in err.value.details()


async def test_request_id_replays_the_first_batch(harness):
    a = harness.alice
    f = await harness.upload(a, batch_file(2))
    first = await create(a, f.id, model="simulated", request_id="nightly-1")
    again = await create(a, f.id, model="simulated", request_id="nightly-1")
    assert again.id == first.id
    listed = (await a.batches.ListBatches(batch_pb2.ListBatchesRequest(), metadata=a.metadata)).batches
    assert [b.id for b in listed] == [first.id]


async def test_request_id_reused_with_other_parameters_is_refused(harness):
    a = harness.alice
    f = await harness.upload(a, batch_file(2))
    other = await harness.upload(a, batch_file(3))
    asked = dict(model="simulated", request_id="nightly-2", metadata={"team": "search"})
    first = await create(a, f.id, **asked)
    changes = {
        "input_file_id": dict(file_id=other.id),
        "endpoint": dict(endpoint="/v1/embeddings"),
        "model": dict(model="simulated/echo"),
        "provider": dict(provider="openai_compatible"),
        "metadata": dict(metadata={"team": "ads"}),
    }
    for field, change in changes.items():
        fields = {**asked, **change}
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await create(a, fields.pop("file_id", f.id), **fields)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, field
        info, _ = error_details(err.value)
        assert info.reason == "REQUEST_ID_REUSED", field
        assert info.metadata["batch_id"] == first.id and info.metadata["field"] == field
        assert first.id in err.value.details() and field in err.value.details()
    again = await create(a, f.id, model="simulated", request_id="nightly-2", metadata={"team": "search"})
    assert again.id == first.id, "identical parameters still replay"
    # Another project's key is another namespace.
    assert (await create(harness.bob, (await harness.upload(harness.bob, batch_file(1))).id,
                         model="simulated", request_id="nightly-2")).id != first.id


async def test_list_newest_first_paginated_and_filtered(harness):
    a = harness.alice
    f = await harness.upload(a, batch_file(1))
    ids = [(await create(a, f.id, model="simulated")).id for _ in range(5)]
    for batch_id in ids:
        await watch_all(a, batch_id)
    seen, token = [], ""
    while True:
        page = await a.batches.ListBatches(batch_pb2.ListBatchesRequest(page_size=2, page_token=token),
                                           metadata=a.metadata)
        seen += [b.id for b in page.batches]
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(ids))
    done = await a.batches.ListBatches(batch_pb2.ListBatchesRequest(
        statuses=[batch_pb2.BATCH_STATUS_COMPLETED]), metadata=a.metadata)
    assert len(done.batches) == 5
    running = await a.batches.ListBatches(batch_pb2.ListBatchesRequest(
        statuses=[batch_pb2.BATCH_STATUS_IN_PROGRESS, batch_pb2.BATCH_STATUS_VALIDATING]), metadata=a.metadata)
    assert running.batches == []


async def test_rpm_limit_paces_requests(tmp_path, upstream):
    config = write_config(tmp_path / "models.yaml", [upstream_entry("paced", upstream.base_url, rpm=300)])
    h = await start_harness(tmp_path / "data", config_file=config)
    try:
        a = h.alice
        f = await h.upload(a, jsonl([request_line(f"p{i}", model="paced", content=f"paced {i}") for i in range(15)]))
        batch = await create(a, f.id)
        started = asyncio.get_running_loop().time()
        final = (await watch_all(a, batch.id))[-1]
        elapsed = asyncio.get_running_loop().time() - started
        assert final.request_counts.completed == 15
        # 300 rpm = 5/s with a one-second burst of 5: the other 10 need at least 2 seconds.
        assert elapsed >= 1.9
    finally:
        await h.channel.close()
        await h.server.stop(grace=0)


async def test_per_request_timeout_becomes_an_error_line(tmp_path, upstream):
    config = write_config(tmp_path / "models.yaml", [upstream_entry("impatient", upstream.base_url, timeout=0.3,
                                                                    max_retries=1)])
    h = await start_harness(tmp_path / "data", config_file=config)
    try:
        a = h.alice
        f = await h.upload(a, jsonl([request_line("t", model="impatient", content="FAIL:hang now"),
                                     request_line("u", model="impatient", content="fine")]))
        final = (await watch_all(a, (await create(a, f.id)).id))[-1]
        out, err = await results(a, final)
        assert [line["custom_id"] for line in out] == ["u"]
        assert err[0]["custom_id"] == "t" and err[0]["response"] is None
        assert err[0]["error"]["code"] == "request_timeout"
        assert upstream.count("FAIL:hang now") == 2, "one retry after the timeout"
    finally:
        await h.channel.close()
        await h.server.stop(grace=0)


async def test_cancel_right_after_create_ends_cancelled_and_consistent(fake_harness, upstream):
    a = fake_harness.alice
    f = await fake_harness.upload(a, jsonl([request_line(f"v{i}", model="fake-llm", content=f"v {i}") for i in range(50)]))
    batch = await create(a, f.id)
    # Cancel in the same breath as the create: whether or not the executor had started,
    # the batch ends cancelled and what the upstream answered is exactly what we report.
    cancelled = (await a.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch.id), metadata=a.metadata)).batch
    assert cancelled.status in (batch_pb2.BATCH_STATUS_CANCELLING, batch_pb2.BATCH_STATUS_CANCELLED)
    final = (await watch_all(a, batch.id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_CANCELLED
    out, err = await results(a, final)
    assert len(out) + len(err) in (0, 50)  # either never started, or every request answered once
    # Nothing ran: nothing to charge. Something ran on this unpriced model: unknown, never zero.
    expected = batch_pb2.COST_STATUS_UNKNOWN if out else batch_pb2.COST_STATUS_KNOWN
    assert final.cost.status == expected
    # Requests in flight at the cancel (at most max_concurrency=8) were stopped, not answered.
    assert len(out) <= upstream.requests_total <= len(out) + 8



async def test_cancel_answers_a_state_that_is_stored(fake_harness, upstream):
    """CancelBatch right after CreateBatch races the executor's first write: what it answers must be
    a state already stored (the next read shows it or a newer one), never one still being written."""
    a = fake_harness.alice
    f = await fake_harness.upload(a, jsonl([request_line(f"r-{i}", model="fake-llm", content=f"SLOW:60000 q {i}")
                                            for i in range(4)]))
    for _ in range(12):
        batch = await create(a, f.id)
        cancelled = (await a.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch.id),
                                                 metadata=a.metadata)).batch
        assert (await get_batch(a, batch.id)).revision >= cancelled.revision

async def test_simulated_failure_rate_is_deterministic(tmp_path):
    config = write_config(tmp_path / "models.yaml", [{"model_name": "flaky-sim", "litellm_params": {
        "model": "simulated/echo", "failure_rate": 0.3}}])
    h = await start_harness(tmp_path / "data", config_file=config)
    try:
        a = h.alice
        f = await h.upload(a, batch_file(400, model="flaky-sim"))
        runs = []
        for _ in range(2):
            final = (await watch_all(a, (await create(a, f.id)).id))[-1]
            out, err = await results(a, final)
            runs.append(sorted(line["custom_id"] for line in err))
            assert final.request_counts.failed == len(err) and final.request_counts.completed == len(out)
            assert {line["response"]["status_code"] for line in err} == {400}
        assert runs[0] == runs[1], "the same requests fail every time"
        assert 0.2 < len(runs[0]) / 400 < 0.4
    finally:
        await h.channel.close()
        await h.server.stop(grace=0)


async def test_odd_request_values_never_cost_an_answer(fake_harness, upstream):
    """A max_tokens the executor cannot read used to kill its worker: that custom_id went
    unanswered, and max_concurrency such lines stalled the batch."""
    a = fake_harness.alice
    lines = []
    for i in range(12):  # more odd lines than the deployment's 8 workers
        line = request_line(f"odd-{i}", model="fake-llm", content=f"odd {i}")
        line["body"]["max_tokens"] = ["lots", None, {"n": 1}, -5][i % 4]
        lines.append(line)
    lines += [request_line(f"ok-{i}", model="fake-llm", content=f"fine {i}") for i in range(5)]
    f = await fake_harness.upload(a, jsonl(lines))
    final = (await watch_all(a, (await create(a, f.id)).id))[-1]
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
    out, err = await results(a, final)
    answered = sorted(line["custom_id"] for line in out + err)
    assert answered == sorted([f"odd-{i}" for i in range(12)] + [f"ok-{i}" for i in range(5)])
    assert final.request_counts.completed + final.request_counts.failed == 17


async def test_stopping_finishes_the_batch_writes_in_flight(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    h = await start_harness(tmp_path / "data")
    a = h.alice
    f = await h.upload(a, batch_file(1))
    await asyncio.gather(*(create(a, f.id, model="simulated") for _ in range(100)))
    await h.channel.close()
    await h.server.stop(grace=0)  # with runners mid-write
    gc.collect()  # report any write that failed unseen
    failed = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert failed == [], "no write may meet a closed store"


@pytest.mark.parametrize("api_base, api_key, says", [
    ("ftp://models.internal/v1", None, "is not an http:// or https:// URL"),
    ("http://models.internal:99999/v1", None, "port"),
    ("http://models.internal/v1", "key\r\nx-injected: 1", "line break"),
])
async def test_an_executor_deployment_it_cannot_call_is_refused_at_create(tmp_path, api_base, api_key, says):
    """An api_base that is not an HTTP origin, or a key that would break the request's headers:
    CreateBatch says so (the deployment is misconfigured), nothing is accepted to fail later."""
    entry = upstream_entry("broken", api_base)
    if api_key:
        entry["litellm_params"]["api_key"] = api_key
    h = await start_harness(tmp_path / "data", config_file=write_config(tmp_path / "models.yaml", [entry]))
    try:
        a = h.alice
        f = await h.upload(a, jsonl([request_line("x", model="broken")]))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await create(a, f.id)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_details(err.value)[0].reason == "DEPLOYMENT_MISCONFIGURED"
        assert says in err.value.details() and "x-injected" not in err.value.details()
    finally:
        await h.channel.close()
        await h.server.stop(grace=0)
