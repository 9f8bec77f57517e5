"""`batch_completion` and `embed` (sync and asyncio) on the simulated model: the examples in their
docstrings run as written, and per-item errors keep their place among the answers."""

from __future__ import annotations

import asyncio
import doctest

import pytest

import batchgate
from batchgate import AsyncBatchgateClient, BatchFailedError
from tests.conftest import free_port, serving, start_harness, stop_harness
from tests.integration.batch_helpers import write_config


def api_key(caller) -> str:
    return dict(caller.metadata)["authorization"].removeprefix("Bearer ")


async def test_the_docstring_examples_run_as_written(harness, monkeypatch):
    monkeypatch.setenv("BATCHGATE_ADDRESS", f"127.0.0.1:{harness.port}")
    monkeypatch.setenv("BATCHGATE_API_KEY", api_key(harness.alice))
    monkeypatch.delenv("BATCHGATE_TLS", raising=False)
    monkeypatch.delenv("BATCHGATE_TLS_CA", raising=False)

    def run_examples():
        finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        tests = [t for name in ("batch_completion", "embed")
                 for t in finder.find(getattr(batchgate, name), name, globs=vars(batchgate).copy())]
        assert sum(len(t.examples) for t in tests) == 5
        for test in tests:
            runner.run(test)
        return runner.summarize(verbose=False)

    result = await asyncio.to_thread(run_examples)
    assert result.failed == 0 and result.attempted == 5


@pytest.fixture
async def flaky(tmp_path):
    config = write_config(tmp_path / "models.yaml", [{"model_name": "flaky", "litellm_params": {
        "model": "simulated/echo", "failure_rate": 0.3}}])
    async with serving(tmp_path / "data", config_file=config) as h:
        yield h


async def test_async_batch_completion_keeps_input_order_with_per_item_errors(flaky):
    prompts = [f"question {i}" for i in range(60)]
    async with AsyncBatchgateClient(f"127.0.0.1:{flaky.port}", api_key(flaky.alice)) as bg:
        answers = await batchgate.abatch_completion("flaky", [[{"role": "user", "content": p}] for p in prompts],
                                                    client=bg, temperature=0, metadata={"job": "t"})
    assert [a.index for a in answers] == list(range(60))
    failed = [a for a in answers if not a.ok]
    assert failed == answers.errors and 0 < len(failed) < 60
    assert len(failed) == answers.batch.request_counts.failed
    assert {a.error["code"] for a in failed} == {"simulated_failure"} and {a.status_code for a in failed} == {400}
    for answer in answers:
        if answer.ok:
            assert answer.content == f"[simulated] You said: question {answer.index}"
        else:
            assert answer.content is None and answer.body is None
    assert answers.batch.metadata["job"] == "t"


async def test_async_embed_and_a_batch_that_cannot_run(harness):
    async with AsyncBatchgateClient(f"127.0.0.1:{harness.port}", api_key(harness.alice)) as bg:
        vectors = await batchgate.aembed("simulated", ["a", "b", "a"], client=bg)
        assert [len(v.embedding) for v in vectors] == [16, 16, 16]
        assert vectors[0].embedding == vectors[2].embedding != vectors[1].embedding
        with pytest.raises(ValueError, match="empty"):
            await bg.embed("simulated", [])
        with pytest.raises(batchgate.InvalidArgumentError) as err:
            await bg.batch_completion("no-such-model", [[{"role": "user", "content": "hi"}]])
    assert err.value.reason  # refused at CreateBatch, naming why
    assert issubclass(BatchFailedError, Exception)


async def test_a_batch_that_ends_without_a_single_answer_raises_batch_failed(tmp_path):
    slow = write_config(tmp_path / "slow.yaml", [{"model_name": "slow", "litellm_params": {
        "model": "simulated/slow", "latency_ms": 60_000, "max_concurrency": 1}}])
    other = write_config(tmp_path / "other.yaml", [{"model_name": "x", "litellm_params": {"model": "simulated/x"}}])
    port = free_port()
    h = await start_harness(tmp_path / "data", config_file=slow, address=f"127.0.0.1:{port}")
    key = api_key(h.alice)
    async with AsyncBatchgateClient(f"127.0.0.1:{port}", key) as bg:
        helper = asyncio.create_task(bg.batch_completion("slow", [[{"role": "user", "content": "hi"}]] * 3))
        batch_id = None
        while batch_id is None or not h.server.hub.watcher_count(batch_id):  # created, and watched
            await asyncio.sleep(0.01)
            batch_id = next(iter([b.id async for b in bg.list_batches()]), None)
        await stop_harness(h)  # the helper's watch drops and reconnects…
        async with serving(tmp_path / "data", config_file=other, address=f"127.0.0.1:{port}"):
            with pytest.raises(BatchFailedError) as err:  # …to a server without the batch's deployment
                await asyncio.wait_for(helper, 60)
    assert str(err.value.batch.status) == "failed" and "deployment_not_found" in str(err.value)
