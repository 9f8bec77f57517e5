"""The Bedrock adapter through the real batchgate server: S3 is moto's server reached with boto3,
the Bedrock control plane is tests/fakes/bedrock_control_plane.py reached by boto3's `bedrock`
client (endpoint_url), so botocore validates and signs every call as it would against AWS."""

from __future__ import annotations

import asyncio
import json

import anthropic.types
import grpc
import pytest
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

from batchgate.v1 import batch_pb2
from batchgate_server.domain.deployment import Deployment
from batchgate_server.providers.base import JobStatus, ProviderJob
from batchgate_server.providers.bedrock.provider import BedrockBatchProvider, client_request_token
from tests.conftest import error_details, jsonl, request_line, start_harness
from tests.fakes.bedrock_control_plane import FakeBedrockControlPlane, MotoS3
from tests.integration.batch_helpers import (
    assert_lifecycle,
    assert_sizes_are_the_staged_records,
    create,
    eventually_empty,
    provider_job,
    results,
    status_names,
    write_config,
)
from tests.integration.create_crash import assert_each_answered_once, kill_during_create
from tests.integration.batch_helpers import run_batch as run

BUCKET = "bedrock-batches"
REGION = "us-east-1"
ROLE = "arn:aws:iam::123456789012:role/BedrockBatchInference"
DENIED_ROLE = "arn:aws:iam::123456789012:role/NoPassRole"
CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"
HOSTILE_IDS = ["Req 1/ü", "x" * 100, "bgl_0", "BGL_7", "a.b:c", "😀", "ok_id-1", " "]
ENV_VARS = ("AWS_REGION_NAME", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_S3_BUCKET_NAME", "AWS_S3_BUCKET",
            "AWS_BATCH_ROLE_ARN")


@pytest.fixture(scope="module")
def s3():
    server = MotoS3()
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        for name in ENV_VARS:
            mp.delenv(name, raising=False)
        server.client().create_bucket(Bucket=BUCKET)
        yield server
    server.stop()


@pytest.fixture(scope="module")
async def cp(s3):
    fake = FakeBedrockControlPlane(s3_endpoint=s3.url, region=REGION, denied_roles={DENIED_ROLE})
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
def bedrock(cp):
    """The shared fake with its per-test switches reset afterwards."""
    yield cp
    cp.hold_after = None
    cp.records_per_tick = None
    cp.lag.reset()


def staged_objects(s3: MotoS3, bucket: str = BUCKET):
    client = s3.client()
    return lambda: [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents") or []]


@pytest.fixture(autouse=True)
async def bucket_left_clean(s3):
    """After every test: nothing staged is left in the bucket (every batch has ended by then)."""
    yield
    assert await eventually_empty(staged_objects(s3)) == [], "staged objects outlived their batch"


def entry(name: str, cp: FakeBedrockControlPlane, s3: MotoS3, model: str = CLAUDE, **params) -> dict:
    p = {"model": f"bedrock/{model}", "aws_region_name": REGION, "s3_bucket_name": BUCKET,
         "aws_batch_role_arn": ROLE, "aws_access_key_id": "testing", "aws_secret_access_key": "testing",
         "aws_bedrock_endpoint": cp.base_url, "s3_endpoint_url": s3.url, "poll_interval": 0.05,
         "max_retries": 0, "timeout": 10}
    p.update(params)
    return {"model_name": name, "litellm_params": {k: v for k, v in p.items() if v is not None}}


@pytest.fixture(scope="module")
async def h(cp, s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("bedrock-server")
    config = write_config(root / "models.yaml", [
        entry("claude", cp, s3),
        entry("nova", cp, s3, model="amazon.nova-lite-v1:0"),
        entry("titan-embed", cp, s3, model="amazon.titan-embed-text-v2:0"),
        entry("claude-min-5", cp, s3, bedrock_min_records=5),
        entry("claude-max-150", cp, s3, bedrock_max_records=150),
        entry("claude-bad-key", cp, s3, aws_access_key_id="AKIAUNKNOWNKEY"),
        entry("claude-denied-role", cp, s3, aws_batch_role_arn=DENIED_ROLE),
        entry("claude-no-bucket", cp, s3, s3_bucket_name="no-such-bucket"),
        entry("claude-unconfigured", cp, s3, aws_batch_role_arn=None),
        entry("claude-short-grace", cp, s3, not_found_grace=0.5),
    ])
    harness = await start_harness(root / "data", config_file=config)
    yield harness
    await harness.channel.close()
    await harness.server.stop(grace=0)


def chat(custom_id: str, text: str, model: str = "claude", **body) -> dict:
    line = request_line(custom_id, model=model, content=text)
    line["body"].update(body)
    return line


def many(n: int, model: str = "claude", prefix: str = "r") -> list[dict]:
    return [chat(f"{prefix}{i}", f"question {i}", model=model) for i in range(n)]


# -- the happy paths -------------------------------------------------------------------------------


async def test_claude_batch_end_to_end_with_hostile_custom_ids(h, bedrock):
    lines = [chat(cid, f"hostile {i}", max_tokens=64) for i, cid in enumerate(HOSTILE_IDS)] + many(95)
    final, states, out, err = await run(h, lines)

    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final.errors
    assert_lifecycle(states)
    assert final.provider == "bedrock" and err == []
    assert sorted(line["custom_id"] for line in out) == sorted(line["custom_id"] for line in lines)
    for line in out:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        completion = ChatCompletion.model_validate(line["response"]["body"])
        assert completion.choices[0].message.content.startswith("[claude]")
        assert completion.usage.prompt_tokens > 0
    by_id = {line["custom_id"]: line for line in out}
    assert by_id["Req 1/ü"]["response"]["body"]["choices"][0]["message"]["content"].endswith("hostile 0")
    assert len({line["id"] for line in out}) == len(out)
    assert final.request_counts.completed == final.request_counts.total == len(lines)
    assert final.usage.input_tokens > 0 and final.cost.status == batch_pb2.COST_STATUS_KNOWN

    # What reached Bedrock: one job, created idempotently, reading the staged records from S3.
    job = bedrock.job_for_token(client_request_token(final.id))
    assert job is not None and job.status == "Completed"
    req = job.request
    assert req["modelId"] == CLAUDE and req["modelInvocationType"] == "InvokeModel"
    assert req["roleArn"] == ROLE and req["timeoutDurationInHours"] == 24
    in_uri = req["inputDataConfig"]["s3InputDataConfig"]["s3Uri"]
    assert in_uri == f"s3://{BUCKET}/batchgate/{final.id}/input/{final.id}.jsonl"
    records = job.records  # what the fake read from S3 (the object itself is deleted once the batch ended)
    assert [r["recordId"] for r in records[:len(HOSTILE_IDS)]] == [
        "bgl_0", "bgl_1", "bgl_2", "bgl_3", "bgl_4", "bgl_5", "ok_id-1", "bgl_7"]
    assert records[0]["modelInput"]["anthropic_version"] == "bedrock-2023-05-31"
    assert records[0]["modelInput"]["max_tokens"] == 64 and "model" not in records[0]["modelInput"]
    # The fake's output (read back from <output>/<jobId>/*.jsonl.out above) passes Anthropic's own types.
    anthropic.types.Message.model_validate(job.outputs[0]["modelOutput"])
    assert job.success == len(lines)


async def test_converse_model_with_failed_and_untranslatable_records(h, bedrock):
    lines = many(100, model="nova")
    lines.append(chat("refused-1", "BEDROCK:fail please", model="nova"))
    lines.append(chat("refused-2", "BEDROCK:fail again", model="nova"))
    lines.append(chat("logit-bias", "hello", model="nova", logit_bias={"1": 2}))
    final, _, out, err = await run(h, lines)

    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
    assert len(out) == 100
    for line in out:
        assert ChatCompletion.model_validate(line["response"]["body"]).choices[0].message.content.startswith(
            "[converse]")
    errors = {line["custom_id"]: line for line in err}
    assert set(errors) == {"refused-1", "refused-2", "logit-bias"}
    assert errors["refused-1"]["response"]["status_code"] == 400
    assert errors["logit-bias"]["response"]["body"]["error"]["param"] == "logit_bias"
    assert final.request_counts.completed == 100 and final.request_counts.failed == 3
    job = bedrock.job_for_token(client_request_token(final.id))
    assert job.status == "PartiallyCompleted" and job.request["modelInvocationType"] == "Converse"
    assert len(job.records) == 102  # the untranslatable line was never sent


async def test_titan_embeddings(h, bedrock):
    lines = [request_line(f"e{i}", model="titan-embed", url="/v1/embeddings", content=f"text {i}")
             for i in range(100)]
    for line in lines:
        line["body"]["dimensions"] = 256
    final, _, out, err = await run(h, lines, endpoint="/v1/embeddings")
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED and err == []
    assert len(out) == 100
    for line in out:
        emb = CreateEmbeddingResponse.model_validate(line["response"]["body"])
        assert len(emb.data[0].embedding) == 256
    assert final.usage.input_tokens > 0


# -- failures --------------------------------------------------------------------------------------


async def test_job_failed_at_bedrock(h, bedrock):
    lines = many(99) + [chat("boom", "BEDROCK:fail_job now")]
    final, _, out, err = await run(h, lines)
    assert final.status == batch_pb2.BATCH_STATUS_FAILED
    assert final.errors[0].code == "provider_job_failed"
    assert "Internal server error" in final.errors[0].message
    assert out == [] and err == []


async def test_stop_mid_run_returns_partial_results(h, bedrock):
    bedrock.hold_after = 40
    a = h.alice
    f = await h.upload(a, jsonl(many(100)))
    batch = await create(a, f.id)
    cancelled, final = False, None
    async for event in a.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=batch.id), metadata=a.metadata,
                                            timeout=30):
        if event.WhichOneof("event") != "batch":
            continue
        final = event.batch
        if not cancelled and final.request_counts.completed >= 40:
            await a.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch.id), metadata=a.metadata)
            cancelled = True
    assert cancelled and final.status == batch_pb2.BATCH_STATUS_CANCELLED
    out, err = await results(a, final)
    assert len(out) == 40 and len(err) == 60
    assert {line["error"]["code"] for line in err} == {"batch_cancelled"}
    assert sorted(line["custom_id"] for line in out + err) == sorted(f"r{i}" for i in range(100))
    assert bedrock.job_for_token(client_request_token(final.id)).status == "Stopped"


async def test_too_few_translatable_records_fail_at_submit(h, bedrock):
    lines = many(88) + [chat(f"bias-{i}", "hello", logit_bias={"1": 2}) for i in range(12)]
    final, _, out, err = await run(h, lines)
    assert final.status == batch_pb2.BATCH_STATUS_FAILED
    assert final.errors[0].code == "batch_too_small"
    msg = final.errors[0].message
    assert "only 88 of 100" in msg and "at least 100" in msg and "line 89 (custom_id 'bias-0')" in msg
    # Each line that cannot be sent is named after it (the first 10), by its line in the file.
    assert [(e.code, e.line, e.param) for e in final.errors[1:]] == [
        ("untranslatable_request", 89 + i, "logit_bias") for i in range(10)]
    assert "custom_id 'bias-3'" in final.errors[4].message
    assert bedrock.job_for_token(client_request_token(final.id)) is None


async def test_a_shard_too_small_to_send_names_its_lines_in_the_file(h, bedrock):
    """160 lines where a job takes 100 to 150 records (so the batch is split), 70 of them
    untranslatable: 90 to send, too few for one job. The part runs as one shard, refused at submit
    (no Bedrock job), each line that cannot be sent named by its line in the file."""
    lines = many(160, model="claude-max-150")
    for i in range(50, 120):
        lines[i] = chat(f"bias{i}", "hello", model="claude-max-150", logit_bias={"1": 2})
    final, _, out, err = await run(h, lines)
    assert final.status == batch_pb2.BATCH_STATUS_FAILED
    [shard] = final.shards
    assert shard.status == batch_pb2.BATCH_STATUS_FAILED and shard.request_counts.total == 160
    assert shard.errors[0].code == "batch_too_small" and "only 90 of 160" in shard.errors[0].message
    assert [(e.line, e.param) for e in shard.errors[1:]] == [(51 + i, "logit_bias") for i in range(10)]
    assert shard.errors[1].message.startswith("line 51 (custom_id 'bias50'): logit_bias")
    assert bedrock.job_for_token(client_request_token(shard.id)) is None
    assert out == [] and sorted(line["custom_id"] for line in err) == sorted(line["custom_id"] for line in lines)


@pytest.mark.parametrize("model, code, words", [
    ("claude-bad-key", "provider_auth", ["UnrecognizedClientException", "security token"]),
    ("claude-denied-role", "provider_auth", ["AccessDeniedException", "iam:PassRole"]),
    ("claude-no-bucket", "provider_bucket_not_found", ["no-such-bucket", "s3_bucket_name"]),
])
async def test_setup_failures_fail_the_batch_with_a_clear_error(h, bedrock, model, code, words):
    final, _, out, err = await run(h, many(100, model=model))
    assert final.status == batch_pb2.BATCH_STATUS_FAILED
    assert final.errors[0].code == code, final.errors[0].message
    for word in words:
        assert word in final.errors[0].message
    assert out == [] and err == []


# -- an eventually consistent Bedrock, and a crash during the create ---------------------------------

CRASH_BATCHES = 6


async def test_a_404_right_after_the_create_is_waited_out(h, bedrock):
    bedrock.lag.get = 1.5
    final, _, out, err = await run(h, many(100))
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final.errors
    assert len(out) == 100 and err == []
    assert bedrock.lag.not_found > 0  # the job was invisible for a while
    assert bedrock.job_for_token(client_request_token(final.id)).status == "Completed"


async def test_a_job_still_missing_after_the_grace_fails_the_batch(h, bedrock):
    bedrock.lag.get = 120  # as good as deleted
    final, _, out, err = await run(h, many(100, model="claude-short-grace"))
    assert final.status == batch_pb2.BATCH_STATUS_FAILED
    assert final.errors[0].code == "provider_job_not_found", final.errors[0].message
    assert final.failed_at.ToNanoseconds() - final.in_progress_at.ToNanoseconds() >= 0.4e9  # the 0.5 s grace
    assert out == [] and err == []


@pytest.mark.slow
async def test_kill_9_during_create_leaves_one_job_per_batch(s3, tmp_path):
    bucket = "bedrock-crash"
    await asyncio.to_thread(s3.client().create_bucket, Bucket=bucket)
    fake = FakeBedrockControlPlane(s3_endpoint=s3.url, region=REGION, min_records=5)
    await fake.start()
    fake.lag.listing, fake.lag.get = 3.0, 1.5
    left: list[str] = []

    async def check_bucket() -> None:
        left.extend(await eventually_empty(staged_objects(s3, bucket)))

    try:
        config = write_config(tmp_path / "models.yaml", [entry(
            "claude", fake, s3, s3_bucket_name=bucket, bedrock_min_records=5, create_lookup_patience=8, not_found_grace=30)])
        inputs = [many(5, prefix=f"b{b}-") for b in range(CRASH_BATCHES)]
        outcomes = await kill_during_create(tmp_path, config, fake.gate, inputs, before_stop=check_bucket)
        assert_each_answered_once(outcomes, inputs)
        tokens = [j.request["clientRequestToken"] for j in fake.jobs.values()]
        assert sorted(tokens) == sorted(client_request_token(o.batch.id) for o in outcomes), "one job per batch"
        assert len(fake.create_requests) >= 2 * CRASH_BATCHES  # created again after the restart: the token held
        assert left == [], "staged objects outlived their batch"
    finally:
        await fake.stop()


# -- rejected at CreateBatch ---------------------------------------------------------------------------


def test_the_minimum_and_maximum_are_limits_not_check_refusals(cp, s3):
    """Bedrock's record quotas reach CreateBatch through limits() (its planner routes or refuses a
    group under the minimum, its split cuts one over the maximum); check() refuses no size."""
    provider = BedrockBatchProvider()
    for name, low in (("claude", 100), ("claude-min-5", 5)):
        params = entry(name, cp, s3, **({"bedrock_min_records": low} if low != 100 else {}))["litellm_params"]
        dep = Deployment(id=name, model_name=name, provider="bedrock", model=CLAUDE, params=params)
        provider.check("/v1/chat/completions", dep, low - 1)
        provider.check("/v1/chat/completions", dep, 50_001)
        assert provider.limits("/v1/chat/completions", dep).min_requests == low
        assert provider.limits("/v1/chat/completions", dep).max_requests == 50_000


async def test_a_batch_over_the_record_quota_runs_as_jobs_within_both_quotas(h, bedrock):
    """350 records where a job takes 100 to 150 (bedrock_min_records / bedrock_max_records): three jobs
    of 116-117 records, none under the minimum, every request answered once in one Batch."""
    lines = many(350, model="claude-max-150")
    final, _, out, err = await run(h, lines)
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final.errors
    assert err == [] and sorted(line["custom_id"] for line in out) == sorted(line["custom_id"] for line in lines)
    assert [s.request_counts.total for s in final.shards] == [116, 117, 117]
    for shard in final.shards:
        job = bedrock.job_for_token(client_request_token(shard.id))
        assert len(job.records) == shard.request_counts.total and job.status == "Completed"
        assert shard.provider_job_id == job.arn


async def test_missing_setting_is_failed_precondition_naming_it(h):
    a = h.alice
    f = await h.upload(a, jsonl(many(100, model="claude-unconfigured")))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await create(a, f.id)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "aws_batch_role_arn" in exc.value.details() and "AWS_BATCH_ROLE_ARN" in exc.value.details()
    info, _ = error_details(exc.value)
    assert info.reason == "PROVIDER_NOT_CONFIGURED" and info.metadata["setting"] == "aws_batch_role_arn"


@pytest.mark.parametrize("model, url, body, reason", [
    ("claude", "/v1/completions", {"prompt": "hi"}, "UNSUPPORTED_ENDPOINT"),
    ("claude", "/v1/embeddings", {"input": "hi"}, "UNSUPPORTED_ENDPOINT_FOR_MODEL"),
    ("titan-embed", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
     "UNSUPPORTED_ENDPOINT_FOR_MODEL"),
])
async def test_unsupported_endpoint_is_invalid_argument(h, model, url, body, reason):
    a = h.alice
    line = {"custom_id": "x", "method": "POST", "url": url, "body": {"model": model, **body}}
    f = await h.upload(a, jsonl([line]))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await create(a, f.id, endpoint=url)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "/v1/chat/completions" in exc.value.details() and "Titan" in exc.value.details()
    info, _ = error_details(exc.value)
    assert info.reason == reason


# -- the adapter on its own ---------------------------------------------------------------------------


def _job(bedrock, s3, tmp_path, batch_id: str, n: int = 100, expires_in: float = 86400, **params) -> ProviderJob:
    dep = Deployment(id="d", model_name="claude", provider="bedrock", model=CLAUDE,
                     params=entry("x", bedrock, s3, **params)["litellm_params"])
    return provider_job(tmp_path / f"{batch_id}.jsonl", dep, many(n), batch_id, expires_in)


async def _poll_until(provider, job, status: JobStatus, limit: int = 10):
    for _ in range(limit):
        result = await provider.poll(job)
        if result.status is status:
            return result
    raise AssertionError(f"never reached {status}")


async def test_request_size_is_each_record_as_staged_in_s3(bedrock, s3, tmp_path):
    """request_size is each record as staged for the provider (translated, custom_id remapped when the
    provider cannot take it), with its newline; 0 for a line that cannot be translated (never sent)."""
    unsendable = chat("img", "look", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
    lines = [chat(cid, f"hostile {i}") for i, cid in enumerate(HOSTILE_IDS)] + [unsendable] + many(100)
    dep = Deployment(id="d", model_name="claude", provider="bedrock", model=CLAUDE,
                     params=entry("x", bedrock, s3)["litellm_params"])
    job = provider_job(tmp_path / "sizes.jsonl", dep, lines, "batch_sizes")
    provider = BedrockBatchProvider()
    try:
        sizes = [provider.request_size(job.endpoint, job.deployment, json.dumps(ln).encode()) for ln in lines]
        await provider.submit(job)
        bucket, _, key = job.state["input_uri"].removeprefix("s3://").partition("/")
        staged = s3.client().get_object(Bucket=bucket, Key=key)["Body"].read().splitlines()
        await provider.release(job)
    finally:
        await provider.close()
    assert sizes[len(HOSTILE_IDS)] == 0
    assert_sizes_are_the_staged_records(lines, sizes, staged, lambda record: record["recordId"])


async def test_cancel_after_a_crash_finds_the_job_by_name(bedrock, s3, tmp_path):
    provider = BedrockBatchProvider()
    try:
        job = _job(bedrock, s3, tmp_path, "batch_lost")
        await provider.submit(job)
        arn = job.state.pop("job_arn")  # the ARN was never saved
        bedrock.lag.listing = 0.5  # and the listing shows the job late
        job.cancel_requested.set()
        await provider.cancel(job)
        assert job.state["job_arn"] == arn
        assert any(m == "GET" and p.startswith("/model-invocation-jobs?") for m, p in bedrock.calls)
        await _poll_until(provider, job, JobStatus.CANCELLED)
        lines = [json.loads(r.data) async for r in provider.results(job)]
        assert len(lines) == 100 and {x["error"]["code"] for x in lines} == {"batch_cancelled"}
        await provider.release(job)
    finally:
        await provider.close()


async def test_completion_window_end_stops_the_job_and_reports_expired(bedrock, s3, tmp_path):
    provider = BedrockBatchProvider()
    try:
        job = _job(bedrock, s3, tmp_path, "batch_late", expires_in=-1)
        await provider.submit(job)
        await _poll_until(provider, job, JobStatus.EXPIRED)
        assert job.state["expire_sent"]
        assert bedrock.job_for_token(client_request_token("batch_late")).status == "Stopped"
        lines = [json.loads(r.data) async for r in provider.results(job)]
        assert len(lines) == 100 and {x["error"]["code"] for x in lines} == {"batch_expired"}
        await provider.release(job)
    finally:
        await provider.close()


async def test_resubmit_is_idempotent_through_the_client_request_token(bedrock, s3, tmp_path):
    job = _job(bedrock, s3, tmp_path, "batch_idem")
    provider = BedrockBatchProvider()
    try:
        await provider.submit(job)
        arn = job.state.pop("job_arn")  # created, but the process died before saving the ARN
        await provider.submit(job)
        assert job.state["job_arn"] == arn
        assert sum(1 for r in bedrock.create_requests if r["clientRequestToken"] == "batchgate-batch-idem") == 2
        assert sum(1 for j in bedrock.jobs.values() if j.request["clientRequestToken"] == "batchgate-batch-idem") == 1
        await provider.release(job)
    finally:
        await provider.close()


async def test_release_sweeps_stale_objects_of_earlier_runs_but_not_of_running_batches(bedrock, s3, tmp_path):
    client = s3.client()
    leftovers = ["swept/batch_gone/input/batch_gone.jsonl", "swept/batch_gone/output/0a1b2c/manifest.json.out"]
    foreign = "swept/notes.txt"  # not batchgate's: never touched
    for key in leftovers + [foreign]:
        await asyncio.to_thread(client.put_object, Bucket=BUCKET, Key=key, Body=b"{}\n")
    provider = BedrockBatchProvider()
    try:
        running, ended = (_job(bedrock, s3, tmp_path, batch_id, s3_path_prefix="swept", staged_retention=0)
                          for batch_id in ("batch_running", "batch_ended"))
        for job in (running, ended):
            await provider.submit(job)
        await _poll_until(provider, ended, JobStatus.COMPLETED)
        assert len([r async for r in provider.results(ended)]) == 100
        await provider.release(ended)
        assert sorted(staged_objects(s3)()) == sorted([foreign, "swept/batch_running/input/batch_running.jsonl"])
        await _poll_until(provider, running, JobStatus.COMPLETED)
        await provider.release(running)
        assert staged_objects(s3)() == [foreign]
    finally:
        await asyncio.to_thread(client.delete_object, Bucket=BUCKET, Key=foreign)
        await provider.close()


def test_settings_fall_back_to_the_environment(monkeypatch):
    provider = BedrockBatchProvider()
    dep = Deployment(id="d", model_name="c", provider="bedrock", model=CLAUDE, params={})
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(Exception) as exc:
        provider.check("/v1/chat/completions", dep, 100)
    assert "aws_region_name" in str(exc.value)
    monkeypatch.setenv("AWS_REGION_NAME", "us-west-2")
    monkeypatch.setenv("AWS_S3_BUCKET_NAME", "b")
    monkeypatch.setenv("AWS_BATCH_ROLE_ARN", ROLE)
    provider.check("/v1/chat/completions", dep, 100)


def test_client_request_token_is_valid_for_bedrock():
    import re

    for batch_id in ("batch_0123abcd", "batch__x--y", "weird id/ü"):
        assert re.fullmatch(r"[a-zA-Z0-9]{1,256}(-*[a-zA-Z0-9]){0,256}", client_request_token(batch_id))



async def test_untranslatable_lines_leave_no_shard_under_the_minimum_and_are_answered_one_by_one(h, bedrock):
    """350 lines where a job takes 100 to 150 records, 20 of them (in the third job's lines, by line
    count) untranslatable. The split cut by lines: the third shard had 97 records to send, failed
    at submit with batch_too_small, and its 97 good requests were answered with that error too. The
    split counts the records sent: every shard sends 100 to 150, every untranslatable line is answered
    with its own error."""
    lines = many(350, model="claude-max-150")
    for i in range(240, 260):
        lines[i] = chat(f"bias{i}", "hello", model="claude-max-150", logit_bias={"1": 2})
    final, _, out, err = await run(h, lines)
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final.errors
    assert [s.status for s in final.shards] == [batch_pb2.BATCH_STATUS_COMPLETED] * 3, final.shards
    assert sorted(line["custom_id"] for line in out) == sorted(f"r{i}" for i in range(350) if not 240 <= i < 260)
    assert sorted(line["custom_id"] for line in err) == sorted(f"bias{i}" for i in range(240, 260))
    for line in err:
        assert line["response"]["status_code"] == 400
        assert line["response"]["body"]["error"]["param"] == "logit_bias"
    assert (final.request_counts.completed, final.request_counts.failed) == (330, 20)
    for shard in final.shards:
        job = bedrock.job_for_token(client_request_token(shard.id))
        assert 100 <= len(job.records) <= 150 and job.status == "Completed"
