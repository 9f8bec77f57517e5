"""The Vertex AI adapter through the real batchgate server: GCS is gcp-storage-emulator reached with
google-cloud-storage, the batchPredictionJobs API is tests/fakes/vertex_batch_api.py, and
credentials are real service-account keys whose tokens google-auth fetches from the fake."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path

import grpc
import pytest
from google.auth.credentials import CredentialsWithRegionalAccessBoundary
from openai.types.chat import ChatCompletion

from batchgate.v1 import batch_pb2
from batchgate_server.domain.deployment import Deployment
from batchgate_server.providers.base import JobStatus, ProviderJob
from batchgate_server.providers.vertex.provider import JOB_LABEL, VertexBatchProvider, job_label
from batchgate_server.providers.vertex.translate import CUSTOM_ID_LABEL_KEY
from tests.conftest import error_details, jsonl, request_line, start_harness
from tests.fakes.vertex_batch_api import FakeVertexAPI, GcsEmulator
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

BUCKET = "vertex-batches"
PROJECT = "test-project"
HOSTILE_IDS = ["Req 1/ü", "UPPER-case", "x" * 100, "bgl_0", "BGL_1", "ok-id", "😀 emoji", "a.b:c", " "]
ENV_VARS = ("VERTEXAI_PROJECT", "VERTEXAI_LOCATION", "GCS_BUCKET_NAME", "GOOGLE_APPLICATION_CREDENTIALS")


@pytest.fixture(scope="module")
def gcs():
    emulator = GcsEmulator()
    url = emulator.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", url)  # google-cloud-storage's emulator switch
        # google-auth looks up a service account's "regional access boundary" at
        # iamcredentials.googleapis.com in a background thread: tests stay off the internet.
        mp.setattr(CredentialsWithRegionalAccessBoundary, "_is_regional_access_boundary_lookup_required",
                   lambda self: False)
        for name in ENV_VARS:
            mp.delenv(name, raising=False)
        emulator.client().create_bucket(BUCKET)
        yield emulator
    emulator.stop()


@pytest.fixture(scope="module")
async def api(gcs):
    fake = FakeVertexAPI(storage_client=gcs.client())
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
def vertex(api):
    """The shared fake with its per-test switches reset afterwards."""
    yield api
    api.hold_after = None
    api.fail_after = None
    api.lines_per_tick = None
    api.lag.reset()
    api.create_errors.clear()


def staged_objects(gcs: GcsEmulator, bucket: str = BUCKET):
    client = gcs.client()
    return lambda: [b.name for b in client.list_blobs(bucket)]


@pytest.fixture(autouse=True)
async def bucket_left_clean(gcs):
    """After every test: nothing staged is left in the bucket (every batch has ended by then)."""
    yield
    assert await eventually_empty(staged_objects(gcs)) == [], "staged objects outlived their batch"


@pytest.fixture(scope="module")
def keys(api, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vertex-keys")
    out = {}
    for name, register in (("good", True), ("bad", False)):
        path = root / f"{name}.json"
        path.write_text(json.dumps(api.service_account(f"batchgate-{name}@{PROJECT}.iam.gserviceaccount.com",
                                                       register=register)))
        out[name] = path
    return out


def entry(name: str, api: FakeVertexAPI, **params) -> dict:
    p = {"model": "vertex_ai/gemini-2.5-flash", "vertex_project": PROJECT, "vertex_location": "us-central1",
         "gcs_bucket_name": BUCKET, "vertex_api_base": api.base_url, "poll_interval": 0.05,
         "max_retries": 0, "timeout": 10}
    p.update(params)
    return {"model_name": name, "litellm_params": {k: v for k, v in p.items() if v is not None}}


@pytest.fixture(scope="module")
async def h(api, keys, tmp_path_factory):
    root = tmp_path_factory.mktemp("vertex-server")
    good = str(keys["good"])
    config = write_config(root / "models.yaml", [
        entry("gemini", api, vertex_credentials=good),
        entry("gemini-bad-key", api, vertex_credentials=str(keys["bad"])),
        entry("gemini-anonymous", api, vertex_credentials="anonymous"),
        entry("gemini-denied", api, vertex_credentials=good, vertex_project="locked-project"),
        entry("gemini-no-bucket", api, vertex_credentials=good, gcs_bucket_name="no-such-bucket"),
        entry("gemini-unconfigured", api, vertex_credentials=good, gcs_bucket_name=None),
        entry("gemini-short-grace", api, vertex_credentials=good, not_found_grace=0.5),
        entry("gemini-retrying", api, vertex_credentials=good, max_retries=2, backoff_base=0.01),
    ])
    api.denied_projects.add("locked-project")
    harness = await start_harness(root / "data", config_file=config)
    yield harness
    await harness.channel.close()
    await harness.server.stop(grace=0)


def chat(custom_id: str, text: str, model: str = "gemini", **body) -> dict:
    line = request_line(custom_id, model=model, content=text)
    line["body"].update(body)
    return line


# -- the happy path --------------------------------------------------------------------------------


async def test_chat_batch_end_to_end_with_hostile_custom_ids(h, vertex, gcs):
    lines = [chat(cid, f"question {i}", max_tokens=50, temperature=0.2) for i, cid in enumerate(HOSTILE_IDS)]
    lines.append(chat("with-system", "hello", messages=[{"role": "system", "content": "be brief"},
                                                        {"role": "user", "content": "hello there"}]))
    final, states, out, err = await run(h, lines)

    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final.errors
    assert_lifecycle(states)
    assert final.provider == "vertex_ai" and final.model == "gemini"
    assert err == []
    assert sorted(line["custom_id"] for line in out) == sorted(HOSTILE_IDS + ["with-system"])
    for line in out:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        completion = ChatCompletion.model_validate(line["response"]["body"])
        assert completion.choices[0].message.role == "assistant"
        assert completion.choices[0].finish_reason == "stop"
        assert completion.model == "gemini-2.5-flash"
        assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0
    by_id = {line["custom_id"]: line for line in out}
    assert by_id["Req 1/ü"]["response"]["body"]["choices"][0]["message"]["content"].endswith("question 0")
    assert len({line["id"] for line in out}) == len(out)
    assert final.request_counts.total == len(lines) == final.request_counts.completed
    prompt = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in out)
    assert final.usage.input_tokens == prompt > 0
    assert final.cost.status == batch_pb2.COST_STATUS_KNOWN and float(final.cost.amount) > 0

    # What reached Vertex: one job, labelled with the batch, reading the staged input from GCS.
    job = vertex.job_by_label(JOB_LABEL, job_label(final.id))
    assert job is not None and job.state == "JOB_STATE_SUCCEEDED"
    assert job.body["model"] == "publishers/google/models/gemini-2.5-flash"
    [uri] = job.body["inputConfig"]["gcsSource"]["uris"]
    assert uri == f"gs://{BUCKET}/batchgate/{final.id}/input.jsonl"
    staged = job.lines  # what the fake read from GCS (the object itself is deleted once the batch ended)
    assert len(staged) == len(lines)
    labels = [s["request"]["labels"]["batchgate_custom_id"] for s in staged]
    # Valid label values are kept; the rest (and ids in the reserved bgl_ space) get bgl_<line>.
    assert labels == ["bgl_0", "bgl_1", "bgl_2", "bgl_3", "bgl_4", "ok-id", "bgl_6", "bgl_7", "bgl_8",
                      "with-system"]
    assert staged[-1]["request"]["systemInstruction"] == {"parts": [{"text": "be brief"}]}
    assert staged[0]["request"]["generationConfig"] == {"maxOutputTokens": 50, "temperature": 0.2}
    assert vertex.token_requests >= 1  # google-auth fetched a token with the service-account key


async def test_partially_succeeded_job_and_untranslatable_lines(h, vertex):
    lines = [chat(f"ok-{i}", f"fine {i}") for i in range(3)]
    lines.append(chat("vertex-refuses", "please VERTEX:fail this one"))
    lines.append(chat("logit-bias", "hello", logit_bias={"1": 5}))
    final, _, out, err = await run(h, lines)

    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
    assert sorted(line["custom_id"] for line in out) == ["ok-0", "ok-1", "ok-2"]
    errors = {line["custom_id"]: line for line in err}
    assert set(errors) == {"vertex-refuses", "logit-bias"}
    refused = errors["vertex-refuses"]["response"]
    assert refused["status_code"] == 400 and refused["body"]["error"]["code"] == "invalid_argument"
    untranslated = errors["logit-bias"]["response"]
    assert untranslated["status_code"] == 400
    assert untranslated["body"]["error"]["param"] == "logit_bias"
    assert final.request_counts.completed == 3 and final.request_counts.failed == 2
    job = vertex.job_by_label(JOB_LABEL, job_label(final.id))
    assert job.state == "JOB_STATE_PARTIALLY_SUCCEEDED" and len(job.lines) == 4  # logit_bias never sent


async def test_nothing_translatable_completes_with_error_lines_only(h, vertex):
    lines = [chat(f"bad-{i}", "hi", logit_bias={"1": 1}) for i in range(2)]
    final, _, out, err = await run(h, lines)
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED
    assert out == [] and not final.output_file_id
    assert sorted(line["custom_id"] for line in err) == ["bad-0", "bad-1"]
    assert vertex.job_by_label(JOB_LABEL, job_label(final.id)) is None


# -- failures ---------------------------------------------------------------------------------------


async def test_job_failed_at_vertex(h, vertex):
    final, _, out, err = await run(h, [chat("a", "hello"), chat("b", "VERTEX:fail_job now")])
    assert final.status == batch_pb2.BATCH_STATUS_FAILED
    assert final.errors[0].code == "provider_job_failed"
    assert "Internal error" in final.errors[0].message
    assert out == [] and err == []


async def test_job_failed_mid_way_keeps_and_charges_what_vertex_answered(h, vertex):
    # Vertex fails the job after 2 of 4 lines, leaving their predictions in its output directory:
    # Google bills those two, so the batch keeps them and is charged for them, and still fails.
    vertex.fail_after = 2
    final, _, out, err = await run(h, [chat(f"r{i}", f"question {i}") for i in range(4)])
    assert final.status == batch_pb2.BATCH_STATUS_FAILED
    assert final.errors[0].code == "provider_job_failed" and "Internal error" in final.errors[0].message
    assert len(out) == 2 and sorted(line["custom_id"] for line in out + err) == ["r0", "r1", "r2", "r3"]
    assert {line["error"]["code"] for line in err} == {"batch_failed"}
    assert (final.request_counts.total, final.request_counts.completed, final.request_counts.failed) == (4, 2, 2)
    prompt = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in out)
    completion = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in out)
    assert (final.usage.input_tokens, final.usage.output_tokens) == (prompt, completion)
    # gemini-2.5-flash batch prices (builtin table): input $0.15/M, output $1.25/M
    # cost = prompt * 0.00000015 + completion * 0.00000125
    expected = Decimal(prompt) * Decimal("0.00000015") + Decimal(completion) * Decimal("0.00000125")
    assert final.cost.status == batch_pb2.COST_STATUS_KNOWN and expected > 0
    assert Decimal(final.cost.amount) == expected


async def test_cancel_mid_run_returns_partial_results(h, vertex):
    vertex.hold_after = 2
    a = h.alice
    lines = [chat(f"r{i}", f"question {i}") for i in range(5)]
    f = await h.upload(a, jsonl(lines))
    batch = await create(a, f.id)
    cancelled = False
    final = None
    async for event in a.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=batch.id), metadata=a.metadata,
                                            timeout=30):
        if event.WhichOneof("event") != "batch":
            continue
        final = event.batch
        if not cancelled and final.request_counts.completed >= 2:
            await a.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch.id), metadata=a.metadata)
            cancelled = True
    assert cancelled and final.status == batch_pb2.BATCH_STATUS_CANCELLED
    out, err = await results(a, final)
    assert len(out) == 2 and len(err) == 3
    assert {line["error"]["code"] for line in err} == {"batch_cancelled"}
    assert sorted(line["custom_id"] for line in out + err) == sorted(f"r{i}" for i in range(5))
    assert final.request_counts.completed == 2 and final.request_counts.failed == 3
    assert vertex.job_by_label(JOB_LABEL, job_label(final.id)).state == "JOB_STATE_CANCELLED"


@pytest.mark.parametrize("model, code, words", [
    ("gemini-no-bucket", "provider_bucket_not_found", ["no-such-bucket", "gcs_bucket_name"]),
    ("gemini-bad-key", "provider_auth", ["Invalid JWT Signature", "vertex_credentials"]),
    ("gemini-anonymous", "provider_auth", ["UNAUTHENTICATED"]),
    ("gemini-denied", "provider_auth", ["PERMISSION_DENIED", "locked-project"]),
])
async def test_setup_failures_fail_the_batch_with_a_clear_error(h, vertex, model, code, words):
    final, _, out, err = await run(h, [chat("a", "hello", model=model)])
    assert final.status == batch_pb2.BATCH_STATUS_FAILED
    assert final.errors[0].code == code, final.errors[0].message
    for word in words:
        assert word in final.errors[0].message
    assert out == [] and err == []


# -- an eventually consistent Vertex AI, and a crash during the create -------------------------------

CRASH_BATCHES = 6


async def test_a_404_right_after_the_create_is_waited_out(h, vertex):
    vertex.lag.get = 1.5
    final, _, out, err = await run(h, [chat("a", "hello"), chat("b", "again")])
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final.errors
    assert sorted(line["custom_id"] for line in out) == ["a", "b"] and err == []
    assert vertex.lag.not_found > 0  # the job was invisible for a while
    assert len(vertex.jobs_by_label(JOB_LABEL, job_label(final.id))) == 1


async def test_a_job_still_missing_after_the_grace_fails_the_batch(h, vertex):
    vertex.lag.get = 120  # as good as deleted
    final, _, out, err = await run(h, [chat("a", "hello", model="gemini-short-grace")])
    assert final.status == batch_pb2.BATCH_STATUS_FAILED
    assert final.errors[0].code == "provider_job_not_found", final.errors[0].message
    assert final.failed_at.ToNanoseconds() - final.in_progress_at.ToNanoseconds() >= 0.4e9  # the 0.5 s grace
    assert out == [] and err == []


@pytest.mark.parametrize("status", [502, 504])
async def test_a_create_answered_with_a_gateway_error_is_not_sent_again_blindly(h, vertex, status):
    vertex.create_errors = [status]  # the job was made; the answer says otherwise
    final, _, out, err = await run(h, [chat("a", "hello", model="gemini-retrying")])
    assert final.status == batch_pb2.BATCH_STATUS_COMPLETED, final.errors
    assert [line["custom_id"] for line in out] == ["a"]
    assert len(vertex.jobs_by_label(JOB_LABEL, job_label(final.id))) == 1


@pytest.mark.slow
async def test_kill_9_during_create_leaves_one_job_per_batch(gcs, tmp_path):
    bucket = "vertex-crash"
    await asyncio.to_thread(gcs.client().create_bucket, bucket)
    fake = FakeVertexAPI(storage_client=gcs.client(), allow_anonymous=True)
    await fake.start()
    fake.lag.listing, fake.lag.get = 3.0, 1.5  # longer than a restart takes
    left: list[str] = []

    async def check_bucket() -> None:
        left.extend(await eventually_empty(staged_objects(gcs, bucket)))

    try:
        config = write_config(tmp_path / "models.yaml", [entry(
            "gemini", fake, vertex_credentials="anonymous", gcs_bucket_name=bucket, create_lookup_patience=8,
            not_found_grace=30)])
        inputs = [[chat(f"b{b}-{i}", f"question {b}.{i}") for i in range(3)] for b in range(CRASH_BATCHES)]
        outcomes = await kill_during_create(tmp_path, config, fake.gate, inputs, before_stop=check_bucket)
        assert_each_answered_once(outcomes, inputs)
        jobs = {o.batch.id: len(fake.jobs_by_label(JOB_LABEL, job_label(o.batch.id))) for o in outcomes}
        assert jobs == dict.fromkeys(jobs, 1), "one Vertex AI job per batch"
        assert fake.gate.creates == CRASH_BATCHES  # found again after the restart, not created again
        assert left == [], "staged objects outlived their batch"
    finally:
        await fake.stop()


# -- rejected at CreateBatch ---------------------------------------------------------------------------


async def test_missing_setting_is_failed_precondition_naming_it(h):
    a = h.alice
    f = await h.upload(a, jsonl([chat("a", "hi", model="gemini-unconfigured")]))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await create(a, f.id)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "gcs_bucket_name" in exc.value.details() and "GCS_BUCKET_NAME" in exc.value.details()
    info, _ = error_details(exc.value)
    assert info.reason == "PROVIDER_NOT_CONFIGURED"
    assert info.metadata["setting"] == "gcs_bucket_name" and info.metadata["provider"] == "vertex_ai"


async def test_unsupported_endpoint_is_invalid_argument(h):
    a = h.alice
    f = await h.upload(a, jsonl([request_line("e", model="gemini", url="/v1/embeddings", content="x")]))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await create(a, f.id, endpoint="/v1/embeddings")
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "/v1/chat/completions" in exc.value.details() and "/v1/embeddings" in exc.value.details()
    info, bad = error_details(exc.value)
    assert info.reason == "UNSUPPORTED_ENDPOINT"
    assert bad.field_violations[0].field == "endpoint"


# -- the adapter on its own: crash recovery, env fallbacks ---------------------------------------------


def _job(tmp_path: Path, deployment: Deployment, lines: list[dict], batch_id: str,
         expires_in: float = 86400) -> ProviderJob:
    tmp_path.mkdir(exist_ok=True)
    return provider_job(tmp_path / "input.jsonl", deployment, lines, batch_id, expires_in)


async def test_request_size_is_each_line_as_staged_in_gcs(vertex, gcs, keys, tmp_path):
    """request_size is each record as staged for the provider (translated, custom_id remapped when the
    provider cannot take it), with its newline; 0 for a line that cannot be translated (never sent)."""
    dep = Deployment(id="d", model_name="gemini", provider="vertex_ai", model="gemini-2.5-flash",
                     params=entry("x", vertex, vertex_credentials=str(keys["good"]))["litellm_params"])
    unsendable = chat("img", "look", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:nonsense"}}]}])
    lines = [chat(cid, f"hostile {i}") for i, cid in enumerate(HOSTILE_IDS)] + [unsendable, chat("ok", "caf\u00e9")]
    job = _job(tmp_path, dep, lines, "batch_sizes")
    provider = VertexBatchProvider()
    try:
        sizes = [provider.request_size(job.endpoint, dep, json.dumps(ln).encode()) for ln in lines]
        await provider.submit(job)
        bucket, _, name = job.state["input_uri"].removeprefix("gs://").partition("/")
        staged = gcs.client().bucket(bucket).blob(name).download_as_bytes().splitlines()
        await provider.release(job)
    finally:
        await provider.close()
    assert sizes[len(HOSTILE_IDS)] == 0
    assert_sizes_are_the_staged_records(lines, sizes, staged,
                                        lambda record: record["request"]["labels"][CUSTOM_ID_LABEL_KEY])


async def test_resubmit_after_a_crash_adopts_the_job_instead_of_creating_another(vertex, keys, tmp_path):
    dep = Deployment(id="d", model_name="gemini", provider="vertex_ai", model="gemini-2.5-flash",
                     params=entry("x", vertex, vertex_credentials=str(keys["good"]))["litellm_params"])
    provider = VertexBatchProvider()
    try:
        job = _job(tmp_path, dep, [chat("a", "hello")], "batch_crashy")
        await provider.submit(job)
        name = job.state["job_name"]
        job.state.pop("job_name")  # the create answered, but the process died before saving its name
        await provider.submit(job)
        assert job.state["job_name"] == name
        assert sum(1 for j in vertex.jobs.values() if j.body["labels"][JOB_LABEL] == "batch_crashy") == 1
        for _ in range(10):
            if (await provider.poll(job)).status is JobStatus.COMPLETED:
                break
        lines = [json.loads(r.data) async for r in provider.results(job)]
        again = [json.loads(r.data) async for r in provider.results(job)]
        assert lines == again and [x["custom_id"] for x in lines] == ["a"]  # results() is repeatable
        await provider.release(job)
    finally:
        await provider.close()


def _dep(vertex: FakeVertexAPI, keys: dict, **params) -> Deployment:
    return Deployment(id="d", model_name="gemini", provider="vertex_ai", model="gemini-2.5-flash",
                      params=entry("x", vertex, vertex_credentials=str(keys["good"]), **params)["litellm_params"])


async def _poll_until(provider, job, *statuses: JobStatus, limit: int = 10):
    for _ in range(limit):
        result = await provider.poll(job)
        if result.status in statuses:
            return result
    raise AssertionError(f"never reached {statuses}")


async def test_completion_window_end_cancels_the_job_and_reports_expired(vertex, keys, tmp_path):
    vertex.hold_after = 1
    provider = VertexBatchProvider()
    try:
        job = _job(tmp_path, _dep(vertex, keys), [chat(f"e{i}", "hi") for i in range(3)], "batch_late",
                   expires_in=-1)
        await provider.submit(job)
        await _poll_until(provider, job, JobStatus.EXPIRED)
        assert job.state["expire_sent"]
        assert vertex.job_by_label(JOB_LABEL, "batch_late").state == "JOB_STATE_CANCELLED"
        lines = [json.loads(r.data) async for r in provider.results(job)]
        assert sorted(x["custom_id"] for x in lines) == ["e0", "e1", "e2"]
        assert sum(1 for x in lines if x["error"] and x["error"]["code"] == "batch_expired") == 3 - sum(
            1 for x in lines if x["error"] is None)
        await provider.release(job)
    finally:
        await provider.close()


async def test_a_cancel_that_arrived_during_submit_is_carried_out_by_poll(vertex, keys, tmp_path):
    vertex.hold_after = 0
    provider = VertexBatchProvider()
    try:
        job = _job(tmp_path, _dep(vertex, keys), [chat("c0", "hi"), chat("c1", "hi")], "batch_racy")
        await provider.submit(job)
        job.cancel_requested.set()  # CancelBatch while submit ran; the tracker then polls
        assert (await provider.poll(job)).status is JobStatus.CANCELLING
        await _poll_until(provider, job, JobStatus.CANCELLED)
        lines = [json.loads(r.data) async for r in provider.results(job)]
        assert [x["error"]["code"] for x in lines] == ["batch_cancelled", "batch_cancelled"]
        await provider.release(job)
    finally:
        await provider.close()


def test_settings_fall_back_to_the_environment(monkeypatch):
    provider = VertexBatchProvider()
    dep = Deployment(id="d", model_name="g", provider="vertex_ai", model="gemini-2.5-flash", params={})
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(Exception) as exc:
        provider.check("/v1/chat/completions", dep, 1)
    assert "vertex_project" in str(exc.value) and "VERTEXAI_PROJECT" in str(exc.value)
    monkeypatch.setenv("VERTEXAI_PROJECT", "p")
    monkeypatch.setenv("VERTEXAI_LOCATION", "europe-west4")
    monkeypatch.setenv("GCS_BUCKET_NAME", "b")
    provider.check("/v1/chat/completions", dep, 1)


async def test_a_duplicate_seen_once_the_listing_catches_up_is_cancelled(vertex, keys, tmp_path):
    dep = _dep(vertex, keys, create_lookup_patience=1.0, timeout=2)
    provider = VertexBatchProvider()
    try:
        job = _job(tmp_path, dep, [chat(f"d{i}", f"hi {i}") for i in range(3)], "batch_dup")
        await provider.submit(job)
        lost = vertex.jobs[job.state.pop("job_name").rsplit("/", 1)[1]]  # created, but its name was never saved
        vertex.lag.listing = 30  # and the listing lags longer than batchgate looks again
        await provider.submit(job)
        assert len(vertex.jobs_by_label(JOB_LABEL, "batch_dup")) == 2
        vertex.hold_after = 1
        vertex.advance(lost.id, 2)  # the lost job runs on: one prediction so far
        vertex.hold_after = None
        vertex.lag.listing = 0  # the listing catches up
        await provider.poll(job)
        assert lost.state == "JOB_STATE_CANCELLING"
        vertex.advance(lost.id)  # cancelled: its prediction lands under the batch's output prefix
        await _poll_until(provider, job, JobStatus.COMPLETED)
        lines = [json.loads(r.data) async for r in provider.results(job)]
        assert sorted(x["custom_id"] for x in lines) == ["d0", "d1", "d2"]
        assert all(x["error"] is None for x in lines)
        await provider.release(job)  # the duplicate's prediction goes with the rest
    finally:
        await provider.close()


async def test_release_sweeps_stale_objects_of_earlier_runs_but_not_of_running_batches(vertex, keys, gcs,
                                                                                       tmp_path):
    dep = _dep(vertex, keys, gcs_path_prefix="swept", staged_retention=0)
    bucket = gcs.client().bucket(BUCKET)
    leftovers = ["swept/batch_gone/input.jsonl", "swept/batch_gone/output/prediction-model-x/predictions.jsonl"]
    foreign = "swept/notes.txt"  # not batchgate's: never touched
    for name in leftovers + [foreign]:
        await asyncio.to_thread(bucket.blob(name).upload_from_string, b"{}\n")
    provider = VertexBatchProvider()
    try:
        running = _job(tmp_path / "a", dep, [chat("r", "hi")], "batch_running")
        ended = _job(tmp_path / "b", dep, [chat("e", "hi")], "batch_ended")
        for job in (running, ended):
            await provider.submit(job)
        await _poll_until(provider, ended, JobStatus.COMPLETED)
        assert [json.loads(r.data)["custom_id"] async for r in provider.results(ended)] == ["e"]
        await provider.release(ended)
        assert sorted(staged_objects(gcs)()) == sorted([foreign, "swept/batch_running/input.jsonl"])
        await _poll_until(provider, running, JobStatus.COMPLETED)
        await provider.release(running)
        assert staged_objects(gcs)() == [foreign]
    finally:
        await asyncio.to_thread(bucket.blob(foreign).delete)
        await provider.close()


async def test_a_batch_ended_before_a_lost_create_answer_stops_the_job_that_create_made(vertex, keys, tmp_path):
    provider = VertexBatchProvider()
    try:
        job = _job(tmp_path, _dep(vertex, keys, create_lookup_patience=5), [chat("o", "hi")], "batch_orphan")
        await provider.submit(job)
        made = vertex.jobs[job.state.pop("job_name").rsplit("/", 1)[1]]  # the answer was lost in a crash
        vertex.lag.listing = 0.5  # and the listing shows the job late
        await provider.release(job)  # cancelled before a re-submit: the tracker ends the batch and releases it
        assert made.state == "JOB_STATE_CANCELLING"
    finally:
        await provider.close()
