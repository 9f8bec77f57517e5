"""At most one provider job per batch on the remote paths (OpenAI, Azure OpenAI, Anthropic), with
providers that are eventually consistent: kill -9 the real server while the provider's create calls
are held (create_crash.py, the harness the Vertex AI and Bedrock crash tests use too), restart it,
and count the provider's jobs; and a 404 right after a create is not taken for a lost job."""

from __future__ import annotations

from collections import Counter

import pytest

from batchgate.v1 import batch_pb2
from tests.conftest import jsonl, request_line, start_harness
from tests.fakes.anthropic_batches import FakeAnthropicBatches
from tests.fakes.openai_batch_api import FakeBatchAPI
from tests.integration.batch_helpers import create, eventually_empty, watch_all, write_config
from tests.integration.create_crash import assert_each_answered_once, kill_during_create

pytestmark = pytest.mark.slow

KEY = "sk-recovery-test"
BATCHES = 6
LINES = 3
# The listing shows a new job this late (longer than a restart takes), and a GET answers 404 for a
# while after the create.
LISTING_LAG, GET_LAG = 3.0, 0.5
PATIENCE = {"create_lookup_patience": 3.0, "not_found_grace": 30, "timeout": 2, "max_retries": 2,
            "backoff_base": 0.05, "poll_interval": 0.1}


def openai_fake(azure: bool = False) -> FakeBatchAPI:
    return FakeBatchAPI(azure=azure, api_key=KEY, clock="time", step_ms=50)


def lagging(fake):
    fake.lag.listing, fake.lag.get = LISTING_LAG, GET_LAG
    return fake


def remote_entry(provider: str, fake, **params) -> dict:
    model = {"openai": "openai/gpt-4o-mini", "azure": "azure/my-deployment",
             "anthropic": "anthropic/claude-3-5-haiku-20241022"}[provider]
    return {"model_name": "remote", "model_info": {"id": f"{provider}-dep"},
            "litellm_params": {"model": model, "api_key": KEY, "api_base": fake.base_url, **PATIENCE,
                               **params}}


def batch_lines(k: int) -> list[dict]:
    return [request_line(f"b{k}-r{i}", model="remote", content=f"batch {k} question {i}")
            for i in range(LINES)]


INPUTS = [batch_lines(k) for k in range(BATCHES)]


@pytest.mark.parametrize("azure", [False, True], ids=["openai", "azure"])
async def test_openai_kill_during_create_leaves_one_provider_batch_per_batch(tmp_path, azure):
    fake = lagging(openai_fake(azure))
    await fake.start()
    left: list[str] = []

    async def check_inputs() -> None:
        left.extend(await eventually_empty(lambda: [f.filename for f in fake.files.values()
                                                    if f.purpose == "batch"]))

    try:
        config = write_config(tmp_path / "models.yaml", [remote_entry("azure" if azure else "openai", fake)])
        outcomes = await kill_during_create(tmp_path, config, fake.gate, INPUTS, before_stop=check_inputs)
        assert_each_answered_once(outcomes, INPUTS)
        assert all(not o.err for o in outcomes)
        ids = [o.batch.id for o in outcomes]
        per_batch = Counter((b.metadata or {}).get("batchgate_batch_id") for b in fake.batches.values())
        assert per_batch == Counter(ids), f"provider batches per batchgate batch: {per_batch}"
        assert left == [], f"input files left at the provider: {left}"
    finally:
        await fake.stop()


async def test_anthropic_kill_during_create_leaves_one_message_batch_per_batch(tmp_path):
    fake = lagging(FakeAnthropicBatches(api_key=KEY, tick_ms=30))
    await fake.start()
    try:
        config = write_config(tmp_path / "models.yaml", [remote_entry("anthropic", fake)])
        # Anthropic creates go one at a time per account: the kill lands in the first one.
        outcomes = await kill_during_create(tmp_path, config, fake.gate, INPUTS, in_flight=1)
        assert_each_answered_once(outcomes, INPUTS)
        assert all(not o.err for o in outcomes)
        assert len(fake.batches) == BATCHES, f"{len(fake.batches)} message batches for {BATCHES} batches"
        sent = sorted(sorted(cid for cid, _ in b.requests) for b in fake.batches.values())
        assert sent == sorted(sorted(f"b{k}-r{i}" for i in range(LINES)) for k in range(BATCHES)), \
            "each message batch holds exactly one batch's requests"
    finally:
        await fake.stop()


# -- a 404 right after the create --------------------------------------------------------------

@pytest.mark.parametrize("provider", ["openai", "azure", "anthropic"])
async def test_a_404_right_after_the_create_is_not_a_lost_job(tmp_path, provider):
    fake = FakeAnthropicBatches(api_key=KEY, tick_ms=30) if provider == "anthropic" else \
        openai_fake(provider == "azure")
    fake.lag.get = 1.5
    await fake.start()
    config = write_config(tmp_path / "models.yaml", [remote_entry(provider, fake)])
    h = await start_harness(tmp_path / "data", config_file=config)
    try:
        f = await h.upload(h.alice, jsonl(batch_lines(0)))
        final = (await watch_all(h.alice, (await create(h.alice, f.id)).id))[-1]
        assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final.errors
        assert final.request_counts.completed == LINES
        assert len(fake.batches) == 1
    finally:
        await h.channel.close()
        await h.server.stop(grace=0)
        await fake.stop()


async def test_a_404_long_after_the_create_still_fails_the_batch(tmp_path):
    fake = openai_fake()
    fake.lag.get = 3600
    await fake.start()
    config = write_config(tmp_path / "models.yaml", [remote_entry("openai", fake, not_found_grace=1)])
    h = await start_harness(tmp_path / "data", config_file=config)
    try:
        f = await h.upload(h.alice, jsonl(batch_lines(0)))
        final = (await watch_all(h.alice, (await create(h.alice, f.id)).id))[-1]
        assert final.status == batch_pb2.BATCH_STATUS_FAILED
        assert [e.code for e in final.errors] == ["provider_job_not_found"]
    finally:
        await h.channel.close()
        await h.server.stop(grace=0)
        await fake.stop()
