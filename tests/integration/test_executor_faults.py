"""The built-in executor under faults: odd stored input, an upstream outage, a full disk, a failing
deployment watched live. The real server, the real fake upstream."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest

from batchgate.v1 import batch_pb2
from batchgate_server.domain.ids import new_file_id
from batchgate_server.domain.models import FilePurpose, FileRecord
from tests.conftest import jsonl, request_line, start_harness
from tests.integration.batch_helpers import TERMINAL, create, results, upstream_entry, write_config


async def executor_harness(tmp_path, upstream, **params):
    config = write_config(tmp_path / "models.yaml", [upstream_entry("fake-llm", upstream.base_url, **params)])
    return await start_harness(tmp_path / "data", config_file=config)


async def stop_harness(h) -> None:
    await h.channel.close()
    await h.server.stop(grace=0)


async def store_unchecked_file(h, project: str, content: bytes) -> str:
    """A batch input file written straight through the blob and metadata stores, skipping upload
    validation: the executor must cope with whatever a stored file holds."""
    writer = h.server.tracker.blobs.open_writer()
    await writer.write(content)
    file_id = new_file_id()
    await writer.commit(file_id)
    await h.server.store.insert_file(FileRecord(
        id=file_id, project=project, filename="stored.jsonl", purpose=FilePurpose.BATCH, bytes=len(content),
        sha256=hashlib.sha256(content).hexdigest(), created_at=time.time(), line_count=content.count(b"\n"),
        endpoint="/v1/chat/completions", model="fake-llm"))
    return file_id


async def watch_until(caller, batch_id: str, done, timeout: float = 20.0) -> list[batch_pb2.Batch]:
    """Every Batch a watcher sees until `done(batch)` holds; fails after `timeout` seconds."""
    states = []

    async def watch():
        async for event in caller.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=batch_id),
                                                     metadata=caller.metadata):
            if event.WhichOneof("event") == "batch":
                states.append(event.batch)
                if done(event.batch):
                    return

    try:
        await asyncio.wait_for(watch(), timeout)
    except asyncio.TimeoutError:
        last = states[-1] if states else None
        pytest.fail(f"batch {batch_id} did not get there within {timeout}s; last seen: {last}")
    return states


def ended(batch: batch_pb2.Batch) -> bool:
    return batch.status in TERMINAL


# -- item 3: one request can never cost a worker or an answer --------------------------------------


async def test_lone_surrogate_custom_ids_are_answered_and_cost_no_worker(tmp_path, upstream):
    """A JSON-escaped lone surrogate is valid JSON but not UTF-8: it used to kill the worker that
    wrote its result (20 such lines against 8 workers stalled the batch at IN_PROGRESS; fewer
    dropped their answers from a COMPLETED batch)."""
    h = await executor_harness(tmp_path, upstream)
    try:
        odd = [f"\ud800-{i}" for i in range(20)] + ["tail \udfff"]
        lines = [request_line(cid, model="fake-llm", content=f"odd {i}") for i, cid in enumerate(odd)]
        lines += [request_line(f"plain-{i}", model="fake-llm", content=f"plain {i}") for i in range(3)]
        file_id = await store_unchecked_file(h, h.alice.project, jsonl(lines))
        batch = await create(h.alice, file_id)
        final = (await watch_until(h.alice, batch.id, ended))[-1]
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
        out, err = await results(h.alice, final)
        assert sorted(line["custom_id"] for line in out + err) == sorted(line["custom_id"] for line in lines)
        assert final.request_counts.completed == len(out) and final.request_counts.failed == len(err)
        # Sent and answered like any other request: the id is ours to echo, not the upstream's concern.
        assert {line["custom_id"] for line in out} >= set(odd)
        assert len({line["id"] for line in out + err}) == len(lines)
    finally:
        await stop_harness(h)


# -- item 8: an upstream outage pauses the deployment instead of failing its requests -------------


def slow_lines(prefix: str, n: int, ms: int = 40) -> list[dict]:
    return [request_line(f"{prefix}-{i}", model="fake-llm", content=f"SLOW:{ms} {prefix} {i}") for i in range(n)]


def progressed(n: int):
    return lambda batch: ended(batch) or batch.request_counts.completed >= n


async def test_upstream_restart_mid_batch_loses_no_request(tmp_path, upstream):
    """A restart of the model server longer than max_retries x backoff used to turn every request
    in flight or sent during it into a connection_error line of a COMPLETED batch."""
    h = await executor_harness(tmp_path, upstream, backoff_base=0.05, backoff_cap=0.4, max_retries=2)
    try:
        lines = slow_lines("r", 200)
        batch = await create(h.alice, await store_unchecked_file(h, h.alice.project, jsonl(lines)))
        seen = await watch_until(h.alice, batch.id, progressed(40))
        assert not ended(seen[-1])
        await upstream.stop()
        await asyncio.sleep(2.5)  # the outage: far longer than 2 retries at 0.05 s backoff
        await upstream.start()
        final = (await watch_until(h.alice, batch.id, ended))[-1]
        out, err = await results(h.alice, final)
        assert err == []
        assert sorted(line["custom_id"] for line in out) == sorted(line["custom_id"] for line in lines)
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED and final.request_counts.completed == 200
    finally:
        await stop_harness(h)


async def test_outage_holds_every_batch_of_the_deployment_and_probes_with_one_request(tmp_path, upstream):
    """While every request gets a 500, requests wait instead of spending their retries, and only a
    probe at a time (with backoff) reaches the upstream, for all batches of the deployment together."""
    h = await executor_harness(tmp_path, upstream, backoff_base=0.05, backoff_cap=0.4, max_retries=2)
    try:
        first, second = slow_lines("a", 150), slow_lines("b", 150)
        batches = [await create(h.alice, await store_unchecked_file(h, h.alice.project, jsonl(lines)))
                   for lines in (first, second)]
        await watch_until(h.alice, batches[0].id, progressed(20))
        upstream.fail_mode = "500"
        sent_before = upstream.requests_total
        outage = 2.0
        await asyncio.sleep(outage)
        during = upstream.requests_total - sent_before
        upstream.fail_mode = None
        # In flight when it began (2 x 8 workers) plus probes at least 0.2 s apart once backed off;
        # spending their retries instead, the 16 workers would send hundreds.
        assert during <= 16 + outage / 0.2 + 5, during
        for batch, lines in zip(batches, (first, second)):
            final = (await watch_until(h.alice, batch.id, ended))[-1]
            out, err = await results(h.alice, final)
            assert err == [] and len(out) == 150, (len(out), err[:1])
    finally:
        await stop_harness(h)


async def test_requests_of_a_dead_upstream_fail_after_give_up_after(tmp_path, upstream):
    h = await executor_harness(tmp_path, upstream, backoff_base=0.05, give_up_after=1.0)
    try:
        await upstream.stop()
        lines = slow_lines("d", 30, ms=0)
        batch = await create(h.alice, await store_unchecked_file(h, h.alice.project, jsonl(lines)))
        started = time.monotonic()
        final = (await watch_until(h.alice, batch.id, ended))[-1]
        assert time.monotonic() - started >= 1.0
        out, err = await results(h.alice, final)
        assert out == [] and len(err) == 30
        assert {line["error"]["code"] for line in err} == {"connection_error"}
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED and final.request_counts.failed == 30
    finally:
        await stop_harness(h)


# -- item 5: a full disk pauses a running batch, which resumes by itself ---------------------------


@pytest.fixture
def small_work_dir(tmp_path):
    """The server's work directory (executor results logs) on a real 1 MiB tmpfs."""
    work = tmp_path / "data" / "work"
    work.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(work)], check=True)
    try:
        yield work
    finally:
        subprocess.run(["umount", str(work)], check=True)


def fill(directory: Path) -> Path:
    """A file taking every byte left on `directory`'s filesystem."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for chunk in (64 * 1024, 4096, 1):
            try:
                while True:
                    fh.write(b"\0" * chunk)
            except OSError as err:
                assert err.errno == errno.ENOSPC
    return filler


def whole_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), f"torn line at the end of {path.name}: {data[-80:]!r}"
    return [json.loads(line) for line in data.splitlines()]


async def test_full_disk_pauses_the_batch_until_space_returns(tmp_path, upstream, small_work_dir):
    """A full disk used to cost every worker (the batch stalled at IN_PROGRESS until a restart)
    and leave a half-written results line."""
    h = await executor_harness(tmp_path, upstream)
    try:
        lines = [request_line(f"f-{i}", model="fake-llm", content=f"SLOW:20 full disk {i} " + "x" * 200)
                 for i in range(300)]
        batch = await create(h.alice, await store_unchecked_file(h, h.alice.project, jsonl(lines)))
        await watch_until(h.alice, batch.id, progressed(40))
        filler = fill(small_work_dir)
        sent = upstream.requests_total
        await asyncio.sleep(1.0)  # the disk stays full
        paused_at = upstream.requests_total
        await asyncio.sleep(0.5)
        # Paused: nothing more is sent. Since the fill: the 8 in flight, and at most a few more after
        # the lines that still fitted in the results file's last page.
        assert upstream.requests_total == paused_at <= sent + 16
        state = (await h.alice.batches.GetBatch(batch_pb2.GetBatchRequest(batch_id=batch.id),
                                               metadata=h.alice.metadata)).batch
        assert state.status == batch_pb2.BATCH_STATUS_IN_PROGRESS
        assert state.request_counts.failed == 0
        for name in ("output.jsonl", "errors.jsonl"):
            whole_lines(small_work_dir / batch.id / name)
        filler.unlink()
        final = (await watch_until(h.alice, batch.id, ended))[-1]
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
        out, err = await results(h.alice, final)
        assert err == []
        assert sorted(line["custom_id"] for line in out) == sorted(line["custom_id"] for line in lines)
        # Nothing was lost and nothing sent twice: the answers held during the pause were kept.
        assert all(upstream.count(f"SLOW:20 full disk {i} " + "x" * 200) == 1 for i in range(300))
    finally:
        await stop_harness(h)


# -- item 15: a failing batch is visible while it runs -----------------------------------------------


def failing(batch: batch_pb2.Batch) -> bool:
    return batch.status == batch_pb2.BATCH_STATUS_IN_PROGRESS and len(batch.failures) > 0


async def test_watch_shows_failures_by_code_while_the_batch_runs(tmp_path, upstream):
    h = await executor_harness(tmp_path, upstream)
    try:
        lines = [request_line(f"bad-{i}", model="fake-llm", content=f"FAIL:400 bad {i}") for i in range(10)]
        lines += [request_line(f"slow-{i}", model="fake-llm", content=f"SLOW:800 slow {i}") for i in range(16)]
        batch = await create(h.alice, await store_unchecked_file(h, h.alice.project, jsonl(lines)))
        live = (await watch_until(h.alice, batch.id, failing))[-1]
        assert [f.code for f in live.failures] == ["http_400"]
        assert 1 <= live.failures[0].count == live.request_counts.failed
        assert live.failures[0].sample_message == "Invalid request (injected by FAIL:400)."
        final = (await watch_until(h.alice, batch.id, ended))[-1]
        assert [(f.code, f.count, f.retried) for f in final.failures] == [("http_400", 10, 0)]
        got = (await h.alice.batches.GetBatch(batch_pb2.GetBatchRequest(batch_id=batch.id),
                                             metadata=h.alice.metadata)).batch
        assert got.failures == final.failures
    finally:
        await stop_harness(h)


async def test_a_dead_upstream_shows_in_the_batch_and_in_a_few_log_lines(tmp_path, upstream, caplog):
    h = await executor_harness(tmp_path, upstream, backoff_base=0.05, backoff_cap=0.2, api_key="sk-secret-key-123")
    try:
        caplog.set_level("INFO", logger="batchgate_server.providers.executor")
        await upstream.stop()
        lines = slow_lines("dead", 40, ms=0)
        batch = await create(h.alice, await store_unchecked_file(h, h.alice.project, jsonl(lines)))
        live = (await watch_until(h.alice, batch.id, failing))[-1]
        assert live.failures[0].code == "connection_error"
        assert live.failures[0].count == 0 and live.failures[0].retried >= 1
        assert "Cannot connect" in live.failures[0].sample_message
        # Probes go on with backoff, but the log says it once, not per request or per probe.
        await watch_until(h.alice, batch.id, lambda b: sum(f.retried for f in b.failures) >= 20)
        await upstream.start()
        final = (await watch_until(h.alice, batch.id, ended))[-1]
        out, err = await results(h.alice, final)
        assert err == [] and len(out) == 40
        messages = [r.getMessage() for r in caplog.records if r.name.endswith("executor.health")]
        assert len(messages) == 2, messages  # the start, the recovery
        assert "upstream out" in messages[0] and "connection_error" in messages[0]
        assert "recovered" in messages[1]
        assert "sk-secret-key-123" not in caplog.text
    finally:
        await stop_harness(h)


async def test_an_answer_over_the_clients_limits_is_the_requests_failure_not_an_outage(tmp_path, upstream):
    """The upstream answered (80 KB of headers, over the client's 64 KiB): the request spends its
    retries and ends as an error line; the deployment is not taken for out, so the other requests
    run once each, and the big one is not sent again and again while "waiting for it to return"."""
    h = await executor_harness(tmp_path, upstream, max_retries=2)
    try:
        lines = [request_line("big", model="fake-llm", content="FAIL:bigheaders please")]
        lines += [request_line(f"ok-{i}", model="fake-llm", content=f"fine {i}") for i in range(10)]
        batch = await create(h.alice, await store_unchecked_file(h, h.alice.project, jsonl(lines)))
        final = (await watch_until(h.alice, batch.id, ended))[-1]
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
        assert (final.request_counts.completed, final.request_counts.failed) == (10, 1)
        out, err = await results(h.alice, final)
        assert [(e["custom_id"], e["error"]["code"]) for e in err] == [("big", "invalid_response")]
        assert "bytes of headers" in err[0]["error"]["message"]
        assert upstream.count("FAIL:bigheaders please") == 3  # once and max_retries more
        assert all(upstream.count(f"fine {i}") == 1 for i in range(10))
        assert [(f.code, f.count, f.retried) for f in final.failures] == [("invalid_response", 1, 2)]
    finally:
        await stop_harness(h)
