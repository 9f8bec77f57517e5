"""providers/eventual.py: bounded re-lookups, the 404 grace after a create, and what a failed
create call records."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from batchgate_server.domain.deployment import Deployment
from batchgate_server.providers.base import ProviderError, ProviderJob
from batchgate_server.providers.eventual import Consistency, create_call, look_until, wall_time


def job(tmp_path: Path, saves: list) -> ProviderJob:
    async def open_input():
        yield b"{}"

    async def save_state() -> None:
        saves.append(dict(j.state))

    j = ProviderJob(batch_id="batch_x", endpoint="/v1/chat/completions",
                    deployment=Deployment(id="d", model_name="m", provider="openai", model="m"),
                    line_count=1, created_at=time.time(), expires_at=time.time() + 60,
                    state={"create_started_at": time.time()}, open_input=open_input,
                    save_state=save_state, workdir=tmp_path)
    return j


def test_params_and_defaults():
    assert Consistency.from_params({}) == Consistency(30.0, 300.0)
    c = Consistency.from_params({"create_lookup_patience": "2.5", "not_found_grace": -1})
    assert c == Consistency(2.5, 0.0)
    assert c.lookup_deadline(100.0, 60.0) == 162.5, "unanswered: from the end of the call's timeout"
    assert c.lookup_deadline(100.0, 60.0, create_ended_at=101.0) == 103.5, "answered: from the answer"
    assert Consistency(0.0).lookup_interval() == 0.1 and Consistency(600.0).lookup_interval() == 5.0


async def test_look_until_looks_again_until_found():
    calls = []

    async def find():
        calls.append(time.time())
        return "found" if len(calls) == 3 else None

    assert await look_until(find, deadline=time.time() + 5, interval=0.01) == "found"
    assert len(calls) == 3


async def test_look_until_looks_at_least_once_and_stops_at_the_deadline():
    calls = []

    async def never():
        calls.append(time.time())
        return None

    assert await look_until(never, deadline=time.time() - 1, interval=0.01) is None
    assert len(calls) == 1
    calls.clear()
    start = time.time()
    assert await look_until(never, deadline=start + 0.2, interval=0.05) is None
    assert 0.2 <= time.time() - start < 1 and len(calls) >= 3


def test_a_404_is_transient_only_within_the_grace():
    err = ProviderError("HTTP 404", code="provider_not_found")
    c = Consistency(not_found_grace=10)
    transient = c.not_found_is_transient(err, time.time() - 2, "the batch")
    assert transient.retryable and transient.code == "provider_job_not_visible"
    assert 0 < transient.retry_after <= 1
    assert c.not_found_is_transient(err, time.time() - 11, "the batch") is None
    assert c.not_found_is_transient(err, None, "the batch") is None, "a job we never created here"


def test_the_grace_and_stored_times_every_adapter_reads():
    c = Consistency(not_found_grace=10)
    assert c.within_grace(time.time() - 2) and not c.within_grace(time.time() - 11)
    assert not c.within_grace(None) and not c.within_grace(wall_time(None)), "a job we never learned of"
    assert wall_time(12.5) == 12.5 and wall_time(True) == 0.0 and wall_time("x") == 0.0
    assert Consistency(2.0).duplicate_watch_until(100.0) == 120.0


async def test_look_for_create_stops_at_its_deadline():
    start = time.time()

    async def never():
        return None

    assert await Consistency(lookup_patience=1.0).look_for_create(never, start + 0.25) is None
    assert 0.25 <= time.time() - start < 1.5


@pytest.mark.parametrize("code, records", [("provider_unavailable", True), ("provider_unreachable", False)])
async def test_a_failed_create_call_records_when_the_provider_answered(tmp_path, code, records):
    saves: list = []
    j = job(tmp_path, saves)
    with pytest.raises(ProviderError):
        async with create_call(j):
            raise ProviderError("boom", code=code, retryable=True)
    assert ("create_ended_at" in j.state) is records
    assert len(saves) == int(records), "saved before the error goes on"
