"""Requests of remote batch jobs in the metrics: every HTTP call a remote provider makes for a
batch (create, upload, polls, downloads, clean-up) is counted by deployment, as sent, answered by
outcome, retried and waited for after a 429, and the counts equal what the fake provider received.
The real server with metrics on, the real fake providers (OpenAI's and Anthropic's batch APIs)."""

from __future__ import annotations

import asyncio
import time

from tests.conftest import request_line, serving
from tests.fakes.anthropic_batches import FakeAnthropicBatches
from tests.fakes.openai_batch_api import FakeBatchAPI
from tests.integration.batch_helpers import run_batch, write_config
from tests.integration.metrics_helpers import scrape, value

FAST = {"poll_interval": 0.05, "max_retries": 2, "backoff_base": 0.01, "timeout": 5}
RETRY_AFTER = 0.2  # the injected 429's Retry-After: the wait the metrics must show


async def settled(port: int, deployment: str, fake) -> dict:
    """The metrics once every call the fake received is counted as answered (the clean-up after a
    batch's end may still run when its watch ends)."""
    deadline = time.monotonic() + 10
    while True:
        samples = await scrape(port)
        sent = value(samples, "batchgate_upstream_requests_sent_total", deployment=deployment)
        answered = value(samples, "batchgate_upstream_responses_total", deployment=deployment)
        if (sent == answered == len(fake.calls)) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.05)


def assert_counts_match(samples: dict, deployment: str, fake) -> None:
    calls = len(fake.calls)
    assert calls >= 4  # at least an upload or create, a poll, a download
    assert value(samples, "batchgate_upstream_requests_sent_total", deployment=deployment) == calls
    assert value(samples, "batchgate_upstream_responses_total", deployment=deployment, outcome="http_429") == 1
    assert value(samples, "batchgate_upstream_responses_total", deployment=deployment, outcome="ok") == calls - 1
    assert value(samples, "batchgate_upstream_retries_total", deployment=deployment, code="http_429") == 1
    assert value(samples, "batchgate_upstream_retries_total", deployment=deployment) == 1
    assert value(samples, "batchgate_upstream_requests_in_flight", deployment=deployment) == 0
    assert value(samples, "batchgate_rate_limit_wait_seconds_count", deployment=deployment) == 1
    assert value(samples, "batchgate_rate_limit_wait_seconds_sum", deployment=deployment) >= RETRY_AFTER


async def test_openai_batch_calls_are_counted_by_deployment(tmp_path):
    fake = FakeBatchAPI(api_key="sk-test")
    await fake.start()
    try:
        config = write_config(tmp_path / "models.yaml", [
            {"model_name": "gpt", "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "sk-test",
                                                     "api_base": fake.base_url, **FAST},
             "model_info": {"id": "oai-metered"}},
            {"model_name": "other", "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "sk-test",
                                                       "api_base": fake.base_url, **FAST},
             "model_info": {"id": "oai-idle"}}])
        async with serving(tmp_path / "data", config_file=config, metrics_address="127.0.0.1:0") as h:
            port = h.server.metrics_port
            assert value(await scrape(port), "batchgate_upstream_requests_sent_total") == 0
            # The first poll is rate limited: the client waits its Retry-After and polls again.
            fake.inject(429, retry_after=RETRY_AFTER, path_contains="/batches/", method="GET")
            final, _, out, _ = await run_batch(h, [request_line(f"r{i}", model="gpt") for i in range(3)])
            assert len(out) == 3
            samples = await settled(port, "oai-metered", fake)
            assert fake.calls_to("POST", "/files") == 1 and fake.calls_to("POST", "/batches") == 1
            assert_counts_match(samples, "oai-metered", fake)
            # Counted against the deployment the job ran on, not another on the same provider.
            assert value(samples, "batchgate_upstream_requests_sent_total", deployment="oai-idle") == 0
    finally:
        await fake.stop()


async def test_anthropic_batch_calls_are_counted_by_deployment(tmp_path):
    fake = FakeAnthropicBatches(api_key="test-key", tick_ms=30)
    await fake.start()
    try:
        config = write_config(tmp_path / "models.yaml", [
            {"model_name": "claude", "litellm_params": {"model": "anthropic/claude-3-5-haiku-20241022",
                                                        "api_key": "test-key", "api_base": fake.base_url, **FAST},
             "model_info": {"id": "claude-metered"}}])
        async with serving(tmp_path / "data", config_file=config, metrics_address="127.0.0.1:0") as h:
            port = h.server.metrics_port
            fake.inject(429, retry_after=RETRY_AFTER, path_contains="/v1/messages/batches/", method="GET")
            final, _, out, _ = await run_batch(h, [request_line(f"r{i}", model="claude") for i in range(3)])
            assert len(out) == 3
            assert_counts_match(await settled(port, "claude-metered", fake), "claude-metered", fake)
    finally:
        await fake.stop()
