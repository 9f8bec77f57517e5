"""The executor's view of an upstream (outages, failure streaks) and the failure summary it reports."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sqlite3

import pytest

from batchgate.v1 import batch_pb2
from batchgate_server.api.convert import batch_to_proto
from batchgate_server.domain.deployment import Deployment
from batchgate_server.domain.models import BatchRecord, BatchStatus, FailureCount
from batchgate_server.providers.base import JobStatus
from batchgate_server.providers.executor.failures import MAX_CODES, MAX_SAMPLE_CHARS, FailureTally, failure_of
from batchgate_server.providers.executor.health import UpstreamHealth
from batchgate_server.providers.executor.provider import ExecutorProvider
from batchgate_server.providers.executor.run import ExecutorOptions, ExecutorRun
from batchgate_server.providers.executor.transport import TransportResponse
from batchgate_server.store.codec import batch_from_doc, batch_to_doc
from tests.conftest import request_line
from tests.integration.batch_helpers import provider_job


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def health(**kw) -> UpstreamHealth:
    return UpstreamHealth("dep", backoff_base=0.1, backoff_cap=1.0, clock=kw.pop("clock", Clock()), **kw)


def test_one_request_failing_alone_is_no_outage():
    h = health()
    for _ in range(10):  # its body makes the server answer 500: it spends its own retries
        assert not h.failed("a", "http_500", "boom", upstream_fault=True, probe=False)
    assert h.outage_since is None


def test_an_outage_is_several_requests_failing_in_a_row_or_no_connection():
    h = health()
    assert not h.failed("a", "http_503", "down", upstream_fault=True, probe=False)
    assert not h.failed("b", "http_503", "down", upstream_fault=True, probe=False)
    assert h.failed("c", "http_503", "down", upstream_fault=True, probe=False)
    h.succeeded()
    assert h.outage_since is None
    assert h.failed("a", "connection_error", "refused", upstream_fault=True, probe=False)


def test_an_answer_that_blames_the_request_ends_an_outage():
    h = health()
    h.failed("a", "connection_error", "refused", upstream_fault=True, probe=False)
    assert not h.failed("b", "http_400", "bad body", upstream_fault=False, probe=True)
    assert h.outage_since is None


async def test_during_an_outage_one_request_goes_as_the_probe_with_backoff():
    clock = Clock()
    h = health(clock=clock)
    h.failed("a", "connection_error", "refused", upstream_fault=True, probe=False)
    clock.now += 1.0  # past the first probe time
    assert await h.admit(give_up_after=3600) is True
    h.end_probe()
    h.failed("a", "connection_error", "refused", upstream_fault=True, probe=True)
    clock.now += 3600  # the outage has lasted give_up_after: everyone goes, to fail once
    assert await h.admit(give_up_after=3600) is False


def test_failure_summary_is_bounded_masked_and_encodable():
    tally = FailureTally(secrets=["sk-very-secret"])
    for i in range(20):
        tally.answered(f"code_{i:02d}", f"bad key sk-very-secret \ud800 {'x' * 500}")
    tally.retried("code_00", "again")
    summary = tally.summary()
    assert len(summary) == MAX_CODES
    assert {s.code for s in summary} == {f"code_{i:02d}" for i in range(MAX_CODES - 1)} | {"other"}
    assert sum(s.count for s in summary) == 20
    assert next(s for s in summary if s.code == "other").count == 20 - (MAX_CODES - 1)
    assert summary[0].code == "other"  # most frequent first
    assert next(s for s in summary if s.code == "code_00").retried == 1
    for s in summary:
        assert len(s.sample_message) <= MAX_SAMPLE_CHARS
        assert "sk-very-secret" not in s.sample_message
        s.sample_message.encode("utf-8")  # a lone surrogate would not survive a proto string


def test_failure_of_reads_both_kinds_of_error_line():
    assert failure_of({"error": {"code": "request_timeout", "message": "slow"}, "response": None}) == (
        "request_timeout", "slow")
    assert failure_of({"error": None, "response": {"status_code": 400, "body": {
        "error": {"message": "no such model"}}}}) == ("http_400", "no such model")
    assert failure_of({"error": None, "response": {"status_code": 502, "body": "gateway"}}) == ("http_502", "")


def test_failures_survive_the_document_and_reach_the_proto():
    rec = BatchRecord(id="batch_1", project="p", endpoint="/v1/chat/completions", input_file_id="file_1",
                      completion_window="24h", status=BatchStatus.IN_PROGRESS, created_at=1.0, expires_at=2.0,
                      failures=[FailureCount("http_400", 3, 1, "bad")])
    assert batch_from_doc(batch_to_doc(rec)) == rec
    older = json.loads(batch_to_doc(rec))
    del older["failures"]  # a document written before the field existed
    assert batch_from_doc(json.dumps(older)).failures == []
    assert list(batch_to_proto(rec).failures) == [
        batch_pb2.FailureCount(code="http_400", count=3, retried=1, sample_message="bad")]


def test_logging_a_lone_surrogate_cannot_raise(monkeypatch):
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    handler = logging.StreamHandler(stream)

    def fail(record):
        raise AssertionError(f"could not log {record.msg!r}")

    monkeypatch.setattr(handler, "handleError", fail)
    logger = logging.getLogger("batchgate_server.providers.executor.health")
    logger.addHandler(handler)
    try:
        h = health(report_every=0.0)
        for cid in ("\ud800", "b\udfff", "c"):
            h.failed(cid, "http_500", "upstream said \ud800", upstream_fault=True, probe=False)
        for _ in range(5):
            h.failed("\ud800", "http_500\ud800", "again \udfff", upstream_fault=True, probe=False)
        h.succeeded()
        handler.flush()
        text = stream.buffer.getvalue().decode("utf-8")
        assert "upstream out" in text and "recovered" in text
    finally:
        logger.removeHandler(handler)


class BrokenTransport:
    """Answers every request, except that sending one whose id starts with "boom" raises something
    the executor does not expect."""

    async def send(self, path, body, custom_id):
        if custom_id.startswith("boom"):
            raise RuntimeError("unexpected")
        return TransportResponse(200, {}, json.dumps({"ok": True, "usage": {"total_tokens": 3}}).encode())


async def test_whatever_breaks_one_request_becomes_its_error_line(tmp_path):
    dep = Deployment(id="d", model_name="m", provider="openai_compatible", model="m", params={})
    lines = [request_line(f"boom-{i}", model="m") for i in range(12)] + [request_line("fine", model="m")]
    job = provider_job(tmp_path / "in.jsonl", dep, lines, "batch_x")
    run = ExecutorRun(job, BrokenTransport(), ExecutorOptions(max_concurrency=4))
    run.start()
    await asyncio.wait_for(run._task, 10)  # more broken requests than workers: none is lost
    assert run.outcome == "completed" and (run.completed, run.failed) == (1, 12)
    errors = [json.loads(raw) for raw in (job.workdir / "errors.jsonl").read_bytes().splitlines()]
    assert {e["custom_id"] for e in errors} == {f"boom-{i}" for i in range(12)}
    assert {e["error"]["code"] for e in errors} == {"invalid_request"}
    assert [(f.code, f.count) for f in run.failures.summary()] == [("invalid_request", 12)]
    run.log.close()


async def test_a_storage_error_saving_the_outcome_reaches_the_tracker_as_it_is(tmp_path):
    """The tracker retries its own storage errors (a full database) but fails the batch on anything
    else: a run that could not save its outcome must not turn into a RuntimeError."""
    dep = Deployment(id="d", model_name="m", provider="openai_compatible", model="m",
                     params={"transport": "simulated"})
    job = provider_job(tmp_path / "in.jsonl", dep, [request_line(f"r{i}", model="m") for i in range(5)], "batch_s")
    refusals = [sqlite3.OperationalError("database or disk is full")]

    async def save_state():
        if refusals:
            raise refusals.pop()

    job.save_state = save_state
    provider = ExecutorProvider()
    try:
        await provider.submit(job)
        with pytest.raises(sqlite3.OperationalError):
            while (await provider.poll(job)).status is JobStatus.IN_PROGRESS:
                await provider.wait_for_change(job, 1.0)
        while (poll := await provider.poll(job)).status is JobStatus.IN_PROGRESS:  # resumed from its log
            await provider.wait_for_change(job, 1.0)
        assert poll.status is JobStatus.COMPLETED and poll.request_counts.completed == 5
        assert len([line async for line in provider.results(job)]) == 5
    finally:
        await provider.close()
