"""What one job of each provider takes (BatchProvider.limits: JobLimits from the provider's documented
quotas, a deployment's params over them), that check() refuses no size (a batch over a limit runs as
several jobs), and where each adapter keeps its provider's job id (BatchProvider.job_id)."""

from __future__ import annotations

import pytest

from batchgate_server.domain.deployment import Deployment
from batchgate_server.domain.shards import JobLimits
from batchgate_server.providers.anthropic.provider import AnthropicBatchProvider
from batchgate_server.providers.bedrock.provider import BedrockBatchProvider
from batchgate_server.providers.executor.provider import ExecutorProvider
from batchgate_server.providers.openai_batch import AzureBatchProvider, OpenAIBatchProvider
from batchgate_server.providers.vertex.provider import VertexBatchProvider

CHAT = "/v1/chat/completions"
# Enough configuration for each provider's check() to pass.
PARAMS = {
    "openai": {"api_key": "k"},
    "azure": {"api_key": "k", "api_base": "https://res.openai.azure.com"},
    "anthropic": {"api_key": "k"},
    "bedrock": {"aws_region_name": "us-east-1", "s3_bucket_name": "b",
                "aws_batch_role_arn": "arn:aws:iam::123456789012:role/R"},
    "vertex_ai": {"vertex_project": "p", "vertex_location": "us-central1", "gcs_bucket_name": "b"},
    "openai_compatible": {"api_base": "http://127.0.0.1:1"},
}
MODELS = {"bedrock": "anthropic.claude-3-haiku-20240307-v1:0", "vertex_ai": "gemini-2.5-flash"}
# (provider class, its own JobLimits, the job.state key of its job id)
PROVIDERS = {
    "openai": (OpenAIBatchProvider, JobLimits(50_000, 200_000_000, 1), "provider_batch_id"),
    "azure": (AzureBatchProvider, JobLimits(100_000, 200_000_000, 1), "provider_batch_id"),
    "anthropic": (AnthropicBatchProvider, JobLimits(100_000, 256_000_000 - len(b'{"requests":[]}'), 1),
                  "msgbatch_id"),
    "bedrock": (BedrockBatchProvider, JobLimits(50_000, 1_000_000_000, 100), "job_arn"),
    "vertex_ai": (VertexBatchProvider, JobLimits(200_000, 1_000_000_000, 1), "job_name"),
    "openai_compatible": (ExecutorProvider, JobLimits(None, None, 1), None),
}


def deployment(provider: str, **params) -> Deployment:
    return Deployment(id=f"dep-{provider}", model_name="m", provider=provider,
                      model=MODELS.get(provider, "some-model"), params={**PARAMS[provider], **params})


@pytest.fixture(params=sorted(PROVIDERS))
def case(request):
    cls, own, key = PROVIDERS[request.param]
    return request.param, cls(), own, key


def test_each_provider_has_its_documented_limits(case):
    name, provider, own, _ = case
    assert provider.limits(CHAT, deployment(name)) == own


def test_a_deployment_lowers_or_raises_them_with_its_params(case):
    name, provider, own, _ = case
    dep = deployment(name, max_batch_requests=1000, max_batch_bytes=5_000_000, min_batch_requests=3)
    assert provider.limits(CHAT, dep) == JobLimits(1000, 5_000_000, 3)
    one = deployment(name, max_batch_bytes="123")  # YAML may give a string
    assert provider.limits(CHAT, one) == JobLimits(own.max_requests, 123, own.min_requests)


@pytest.mark.parametrize("bad", [0, -5, "many", None, ""])
def test_an_override_that_is_no_positive_integer_is_ignored(case, bad):
    name, provider, own, _ = case
    dep = deployment(name, max_batch_requests=bad, max_batch_bytes=bad, min_batch_requests=bad)
    assert provider.limits(CHAT, dep) == own


def test_check_refuses_no_size(case):
    name, provider, own, _ = case
    for count in (1, 99, 50_001, 100_001, 200_001, 10_000_000):
        provider.check(CHAT, deployment(name), count)


def test_job_id_reads_the_key_the_adapter_keeps_it_under(case):
    _, provider, _, key = case
    assert provider.job_id({}) == ""
    if key is None:  # the executor runs the batch itself: no provider job
        assert provider.job_id({"provider_batch_id": "x"}) == ""
    else:
        assert provider.job_id({key: "the-job-1", "other": "x"}) == "the-job-1"


def test_bedrock_record_quotas_come_from_its_own_params_and_the_generic_ones_win():
    provider = BedrockBatchProvider()
    own = deployment("bedrock", bedrock_min_records=5, bedrock_max_records=20)
    assert provider.limits(CHAT, own) == JobLimits(20, 1_000_000_000, 5)
    both = deployment("bedrock", bedrock_min_records=5, bedrock_max_records=20, max_batch_requests=10,
                      min_batch_requests=2)
    assert provider.limits(CHAT, both) == JobLimits(10, 1_000_000_000, 2)
    assert provider.limits("/v1/embeddings", deployment("bedrock")).min_requests == 100
