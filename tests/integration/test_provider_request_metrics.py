"""Requests of remote batch jobs in the metrics: every HTTP call a remote provider makes for a
batch (create, upload, polls, downloads, clean-up) is counted by deployment, as sent, answered by
outcome, retried and waited for after a 429, and the counts equal what the fake provider received.
The real server with metrics on, the real fake providers (OpenAI's and Anthropic's batch APIs over
the shared httpx client; Bedrock's control plane and moto's S3 through boto3, whose own retries
are counted through botocore's events)."""

from __future__ import annotations


from aiohttp import ClientSession, web

from tests.conftest import request_line, serving
from tests.fakes.anthropic_batches import FakeAnthropicBatches
from tests.fakes.bedrock_control_plane import FakeBedrockControlPlane, MotoS3
from tests.fakes.openai_batch_api import FakeBatchAPI
from tests.integration.batch_helpers import run_batch, write_config
from tests.integration.metrics_helpers import scrape, settled, value

FAST = {"poll_interval": 0.05, "max_retries": 2, "backoff_base": 0.01, "timeout": 5}
RETRY_AFTER = 0.2  # the injected 429's Retry-After: the wait the metrics must show


class CountingProxy:
    """Forwards every request to `target` and records it (`calls`), as the fakes do: S3 is moto's
    server, which keeps no log of its own. `fail_next(status)` answers the next call itself."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.calls: list[tuple[str, str]] = []
        self.failures: list[int] = []
        self.base_url = ""

    async def start(self) -> None:
        self._session = ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1024 ** 3)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        await self._runner.cleanup()
        await self._session.close()

    async def _forward(self, request: web.Request) -> web.Response:
        self.calls.append((request.method, request.path_qs))
        body = await request.read()
        if self.failures:
            return web.Response(status=self.failures.pop(0), text="<Error><Code>SlowDown</Code></Error>")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(request.method, self.target + request.path_qs, headers=headers,
                                         data=body, allow_redirects=False) as answer:
            content = await answer.read()
            kept = {k: v for k, v in answer.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")}
            return web.Response(status=answer.status, headers=kept, body=content)


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
            samples = await settled(port, "oai-metered", lambda: len(fake.calls))
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
            samples = await settled(port, "claude-metered", lambda: len(fake.calls))
            assert_counts_match(samples, "claude-metered", fake)
    finally:
        await fake.stop()


async def test_bedrock_calls_are_counted_by_deployment_with_botocore_retries(tmp_path):
    moto = MotoS3()
    moto.start()
    proxy = CountingProxy(moto.url)
    await proxy.start()
    control = FakeBedrockControlPlane(s3_endpoint=moto.url, min_records=1)
    await control.start()
    try:
        moto.client().create_bucket(Bucket="metered")
        config = write_config(tmp_path / "models.yaml", [{"model_name": "claude", "litellm_params": {
            "model": "bedrock/anthropic.claude-3-haiku-20240307-v1:0", "aws_region_name": "us-east-1",
            "s3_bucket_name": "metered", "aws_batch_role_arn": "arn:aws:iam::123456789012:role/Batch",
            "aws_access_key_id": "testing", "aws_secret_access_key": "testing", "bedrock_min_records": 1,
            "aws_bedrock_endpoint": control.base_url, "s3_endpoint_url": proxy.base_url, "poll_interval": 0.05,
            "max_retries": 1, "timeout": 10}, "model_info": {"id": "bedrock-metered"}}])
        async with serving(tmp_path / "data", config_file=config, metrics_address="127.0.0.1:0") as h:
            port = h.server.metrics_port
            proxy.failures.append(503)  # the first S3 call fails once: botocore sends it again
            final, _, out, _ = await run_batch(h, [request_line(f"r{i}", model="claude") for i in range(3)])
            assert len(out) == 3
            samples = await settled(port, "bedrock-metered", lambda: len(control.calls) + len(proxy.calls))
            calls = len(control.calls) + len(proxy.calls)
            assert len(control.calls) >= 2 and len(proxy.calls) >= 3  # create, polls; upload, list, read
            assert value(samples, "batchgate_upstream_requests_sent_total", deployment="bedrock-metered") == calls
            assert value(samples, "batchgate_upstream_responses_total", deployment="bedrock-metered",
                         outcome="http_503") == 1
            assert value(samples, "batchgate_upstream_responses_total", deployment="bedrock-metered",
                         outcome="ok") == calls - 1
            assert value(samples, "batchgate_upstream_retries_total", deployment="bedrock-metered",
                         code="http_503") == 1
            assert value(samples, "batchgate_upstream_requests_in_flight", deployment="bedrock-metered") == 0
    finally:
        await control.stop()
        await proxy.stop()
        moto.stop()
