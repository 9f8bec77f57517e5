"""Keys and quotas as operators use them: AdminService through the real server's stubs, the
`batchgate-server keys` commands as subprocesses, quotas refusing over gRPC and HTTP alike."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import openai
import pytest
import yaml
from google.protobuf import timestamp_pb2

from batchgate.v1 import admin_pb2, admin_pb2_grpc, file_pb2, file_pb2_grpc
from batchgate_server.core.auth import hash_key
from batchgate_server.domain.models import ApiKeyRecord
from tests.conftest import MASTER_KEY, UPLOAD_FINISH, batch_file, error_details, serving, upload_requests
from tests.integration.batch_helpers import create, watch_all
from tests.readme import section, sh_blocks

SERVER = str(Path(sys.executable).with_name("batchgate-server"))
MASTER = (("authorization", f"Bearer {MASTER_KEY}"),)


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


def admin_stub(h) -> admin_pb2_grpc.AdminServiceStub:
    return admin_pb2_grpc.AdminServiceStub(h.channel)


async def refused(call, code: grpc.StatusCode, reason: str):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    info, bad_request = error_details(caught.value)
    assert info.reason == reason and info.domain == "batchgate.dev"
    return info, bad_request


async def list_files(secret: str, h):
    return await file_pb2_grpc.FileServiceStub(h.channel).ListFiles(file_pb2.ListFilesRequest(),
                                                                     metadata=bearer(secret))


# -- keys through AdminService -------------------------------------------------------------


async def test_the_master_key_creates_lists_and_revokes_and_a_revoked_key_is_refused_at_once(harness):
    admin = admin_stub(harness)
    created = await admin.CreateApiKey(admin_pb2.CreateApiKeyRequest(project="team-a", name="ci"), metadata=MASTER)
    assert created.secret.startswith("bg-") and created.api_key.key_id.startswith("key_")
    assert created.api_key.project == "team-a" and created.api_key.name == "ci"
    assert not created.api_key.HasField("expire_time") and not created.api_key.HasField("revoke_time")
    await list_files(created.secret, harness)

    listed = await admin.ListApiKeys(admin_pb2.ListApiKeysRequest(project="team-a"), metadata=MASTER)
    [key] = listed.api_keys
    assert key.key_id == created.api_key.key_id and key.HasField("last_use_time")
    assert created.secret not in str(listed), "a listing never holds a secret"

    revoked = await admin.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(key_id=key.key_id), metadata=MASTER)
    assert revoked.api_key.HasField("revoke_time")
    info, _ = await refused(list_files(created.secret, harness), grpc.StatusCode.UNAUTHENTICATED, "API_KEY_REVOKED")
    assert info.metadata["key_id"] == key.key_id
    # Revoking again is a no-op that keeps the first time.
    again = await admin.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(key_id=key.key_id), metadata=MASTER)
    assert again.api_key.revoke_time == revoked.api_key.revoke_time


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_key_revoked_through_one_replica_is_refused_by_another(tmp_path, request, backend):
    shared = (f"sqlite:///{tmp_path / 'shared.sqlite3'}" if backend == "sqlite"
              else request.getfixturevalue("postgres_url"))
    async with serving(tmp_path / "a", database_url=shared) as a, \
            serving(tmp_path / "b", database_url=shared) as b:
        created = await admin_stub(a).CreateApiKey(admin_pb2.CreateApiKeyRequest(project="team-a"), metadata=MASTER)
        await list_files(created.secret, b)  # b authenticates it (and has read its row)
        await admin_stub(a).RevokeApiKey(admin_pb2.RevokeApiKeyRequest(key_id=created.api_key.key_id),
                                         metadata=MASTER)
        await refused(list_files(created.secret, b), grpc.StatusCode.UNAUTHENTICATED, "API_KEY_REVOKED")


async def test_an_expired_key_is_refused_with_its_own_reason(harness):
    secret = "bg-expired-key-for-the-test"
    await harness.server.store.add_api_key(hash_key(secret), ApiKeyRecord(
        id="key_expired", project="alice", created_at=time.time() - 10, expires_at=time.time() - 1))
    info, _ = await refused(list_files(secret, harness), grpc.StatusCode.UNAUTHENTICATED, "API_KEY_EXPIRED")
    assert info.metadata["key_id"] == "key_expired"
    await refused(list_files("bg-unknown", harness), grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY")


async def test_a_key_with_a_future_expiry_works_until_then(harness):
    expire = timestamp_pb2.Timestamp(seconds=int(time.time()) + 3600)
    created = await admin_stub(harness).CreateApiKey(
        admin_pb2.CreateApiKeyRequest(project="team-a", expire_time=expire), metadata=MASTER)
    assert created.api_key.expire_time == expire
    await list_files(created.secret, harness)


async def test_last_use_is_written_once_a_minute_not_per_call(harness):
    admin = admin_stub(harness)
    created = await admin.CreateApiKey(admin_pb2.CreateApiKeyRequest(project="team-a"), metadata=MASTER)
    await list_files(created.secret, harness)
    first = (await harness.server.store.get_api_key(created.api_key.key_id)).last_used_at
    assert first is not None
    for _ in range(3):
        await list_files(created.secret, harness)
    assert (await harness.server.store.get_api_key(created.api_key.key_id)).last_used_at == first
    # A use recorded over a minute ago (by this replica or another) is moved on by the next call.
    await harness.server.store.touch_api_key(created.api_key.key_id, first - 61)
    await list_files(created.secret, harness)
    assert (await harness.server.store.get_api_key(created.api_key.key_id)).last_used_at >= first


async def test_project_keys_may_not_call_the_admin_service(harness):
    admin = admin_stub(harness)
    for call in (admin.CreateApiKey(admin_pb2.CreateApiKeyRequest(project="alice"), metadata=harness.alice.metadata),
                 admin.ListApiKeys(admin_pb2.ListApiKeysRequest(), metadata=harness.alice.metadata),
                 admin.RevokeApiKey(admin_pb2.RevokeApiKeyRequest(key_id="key_x"), metadata=harness.alice.metadata),
                 admin.SetProjectQuota(admin_pb2.SetProjectQuotaRequest(quota=admin_pb2.ProjectQuota(project="alice",
                                       max_uploads=100)), metadata=harness.alice.metadata),
                 admin.GetProjectQuota(admin_pb2.GetProjectQuotaRequest(project="bob"),
                                       metadata=harness.alice.metadata)):
        await refused(call, grpc.StatusCode.PERMISSION_DENIED, "ADMIN_KEY_REQUIRED")
    await refused(admin.ListApiKeys(admin_pb2.ListApiKeysRequest()), grpc.StatusCode.UNAUTHENTICATED,
                  "MISSING_API_KEY")


async def test_key_listings_page_with_signed_tokens(harness):
    admin = admin_stub(harness)
    made = [(await admin.CreateApiKey(admin_pb2.CreateApiKeyRequest(project="paged"), metadata=MASTER)).api_key.key_id
            for _ in range(5)]
    seen, token = [], ""
    while True:
        page = await admin.ListApiKeys(admin_pb2.ListApiKeysRequest(project="paged", page_size=2, page_token=token),
                                       metadata=MASTER)
        assert len(page.api_keys) <= 2
        seen += [k.key_id for k in page.api_keys]
        token = page.next_page_token
        if not token:
            break
        last_token = token
    assert seen == made[::-1], "newest first, each once"
    everyone = await admin.ListApiKeys(admin_pb2.ListApiKeysRequest(), metadata=MASTER)
    assert {"alice", "bob", "paged"} <= {k.project for k in everyone.api_keys}
    await refused(admin.ListApiKeys(admin_pb2.ListApiKeysRequest(project="paged", page_token=last_token[:-2] + "xx"),
                                    metadata=MASTER), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")
    await refused(admin.ListApiKeys(admin_pb2.ListApiKeysRequest(project="alice", page_token=last_token),
                                    metadata=MASTER), grpc.StatusCode.INVALID_ARGUMENT, "PAGE_TOKEN_FILTER_MISMATCH")


HOSTILE_ADMIN_CALLS = [
    ("CreateApiKey", admin_pb2.CreateApiKeyRequest(project=""), "INVALID_PROJECT", "project"),
    ("CreateApiKey", admin_pb2.CreateApiKeyRequest(project="a/b"), "INVALID_PROJECT", "project"),
    ("CreateApiKey", admin_pb2.CreateApiKeyRequest(project="p" * 65), "INVALID_PROJECT", "project"),
    ("CreateApiKey", admin_pb2.CreateApiKeyRequest(project="p", name="a\nb"), "INVALID_KEY_NAME", "name"),
    ("CreateApiKey", admin_pb2.CreateApiKeyRequest(project="p", name="n" * 129), "INVALID_KEY_NAME", "name"),
    ("CreateApiKey", admin_pb2.CreateApiKeyRequest(project="p", expire_time=timestamp_pb2.Timestamp(seconds=1)),
     "INVALID_EXPIRE_TIME", "expire_time"),
    ("CreateApiKey", admin_pb2.CreateApiKeyRequest(project="p", expire_time=timestamp_pb2.Timestamp(
        seconds=10**12)), "INVALID_TIME_RANGE", "expire_time"),
    ("ListApiKeys", admin_pb2.ListApiKeysRequest(page_size=-1), "INVALID_PAGE_SIZE", "page_size"),
    ("ListApiKeys", admin_pb2.ListApiKeysRequest(project="\x00"), "INVALID_PROJECT", "project"),
    ("SetProjectQuota", admin_pb2.SetProjectQuotaRequest(quota=admin_pb2.ProjectQuota(project="p",
                                                                                      max_running_batches=-1)),
     "INVALID_QUOTA", "quota.max_running_batches"),
    ("SetProjectQuota", admin_pb2.SetProjectQuotaRequest(quota=admin_pb2.ProjectQuota(project="p",
                                                                                      monthly_budget="ten")),
     "INVALID_QUOTA", "quota.monthly_budget"),
    ("SetProjectQuota", admin_pb2.SetProjectQuotaRequest(quota=admin_pb2.ProjectQuota(project="p",
                                                                                      monthly_budget="-1")),
     "INVALID_QUOTA", "quota.monthly_budget"),
    ("SetProjectQuota", admin_pb2.SetProjectQuotaRequest(), "INVALID_PROJECT", "quota.project"),
    ("GetProjectQuota", admin_pb2.GetProjectQuotaRequest(project=""), "INVALID_PROJECT", "project"),
]


@pytest.mark.parametrize(("method", "request_message", "reason", "field"), HOSTILE_ADMIN_CALLS,
                         ids=[f"{m}-{r}-{i}" for i, (m, _, r, _) in enumerate(HOSTILE_ADMIN_CALLS)])
async def test_bad_admin_requests_are_invalid_argument_naming_the_field(harness, method, request_message, reason,
                                                                         field):
    _, bad_request = await refused(getattr(admin_stub(harness), method)(request_message, metadata=MASTER),
                                   grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert [v.field for v in bad_request.field_violations] == [field]


async def test_revoking_an_unknown_key_is_not_found(harness):
    info, _ = await refused(admin_stub(harness).RevokeApiKey(admin_pb2.RevokeApiKeyRequest(key_id="key_nope"),
                                                             metadata=MASTER),
                            grpc.StatusCode.NOT_FOUND, "API_KEY_NOT_FOUND")
    assert info.metadata["api_key_id"] == "key_nope"


# -- keys from the command line ------------------------------------------------------------


def keys_cli(data: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SERVER, "keys", *args, "--data-dir", str(data)], capture_output=True, text=True,
                          timeout=60)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_keys_create_list_and_revoke_on_the_command_line_while_the_server_runs(tmp_path):
    data = tmp_path / "data"
    made = keys_cli(data, "create", "--project", "team-a", "--name", "laptop", "--expires-in", "30")
    assert made.returncode == 0, made.stderr
    fields = dict(line.split(": ", 1) for line in made.stdout.splitlines() if ": " in line)
    key_id, secret = fields["key_id"].strip(), fields["api_key"].strip()
    assert fields["name"].strip() == "laptop" and fields["expires"].strip() != "never"

    port = _free_port()
    server = subprocess.Popen([SERVER, "--address", f"127.0.0.1:{port}", "--data-dir", str(data)],
                              env={**os.environ, "BATCHGATE_MASTER_KEY": "k"}, stderr=subprocess.PIPE, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            files = file_pb2_grpc.FileServiceStub(channel)
            files.ListFiles(file_pb2.ListFilesRequest(), metadata=bearer(secret))

            table = keys_cli(data, "list")
            assert table.returncode == 0, table.stderr
            header, row = table.stdout.splitlines()
            assert header.split() == ["KEY_ID", "PROJECT", "NAME", "STATUS", "CREATED", "LAST_USED", "EXPIRES"]
            assert row.split()[:4] == [key_id, "team-a", "laptop", "active"] and "never" not in row
            as_json = json.loads(keys_cli(data, "list", "--json", "--project", "team-a").stdout)
            assert [k["key_id"] for k in as_json] == [key_id] and as_json[0]["last_used_at"]
            assert secret not in table.stdout + json.dumps(as_json), "never print a key except at creation"

            revoked = keys_cli(data, "revoke", key_id)
            assert revoked.returncode == 0 and f"revoked {key_id}" in revoked.stdout, revoked.stderr
            with pytest.raises(grpc.RpcError) as caught:
                files.ListFiles(file_pb2.ListFilesRequest(), metadata=bearer(secret))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "API_KEY_REVOKED" in caught.value.debug_error_string() or "revoked" in caught.value.details()
            assert keys_cli(data, "list").stdout.splitlines()[1].split()[3] == "revoked"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_keys_command_line_mistakes_are_clear(tmp_path):
    data = tmp_path / "data"
    unknown = keys_cli(data, "revoke", "key_nope")
    assert unknown.returncode == 2 and "API_KEY_NOT_FOUND" in unknown.stderr and "Traceback" not in unknown.stderr
    bad = keys_cli(data, "create", "--project", "a b")
    assert bad.returncode == 2 and "INVALID_PROJECT" in bad.stderr
    past = keys_cli(data, "create", "--project", "p", "--expires-at", "2001-01-01T00:00:00Z")
    assert past.returncode == 2 and "INVALID_EXPIRE_TIME" in past.stderr
    garbled = keys_cli(data, "create", "--project", "p", "--expires-at", "soon")
    assert garbled.returncode == 2 and "--expires-at" in garbled.stderr and "Traceback" not in garbled.stderr
    assert keys_cli(data, "list", "--json").stdout.strip() == "[]"


# -- quotas --------------------------------------------------------------------------------


async def set_quota(h, **limits) -> None:
    await admin_stub(h).SetProjectQuota(admin_pb2.SetProjectQuotaRequest(
        quota=admin_pb2.ProjectQuota(project="alice", **limits)), metadata=MASTER)


def slow_config(path: Path, **extra) -> Path:
    path.write_text(yaml.safe_dump({"model_list": [
        {"model_name": "slow", "litellm_params": {"model": "simulated/slow", "latency_ms": 60_000}},
        {"model_name": "priced", "litellm_params": {"model": "simulated/echo", "latency_ms": 1},
         "model_info": {"input_cost_per_token": 0.001, "output_cost_per_token": 0.002}},
    ], **extra}))
    return path


async def test_running_batches_quota_refuses_create_batch_with_the_numbers(tmp_path):
    async with serving(tmp_path / "data", config_file=slow_config(tmp_path / "models.yaml")) as h:
        await set_quota(h, max_running_batches=1)
        f = await h.upload(h.alice, batch_file(1, model="slow"))
        await create(h.alice, f.id)
        info, _ = await refused(create(h.alice, f.id), grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_RUNNING_BATCHES")
        assert dict(info.metadata) == {"project": "alice", "limit": "1", "current": "1"}
        other = await h.upload(h.bob, batch_file(1, model="slow"))
        await create(h.bob, other.id)  # another project is not limited


async def test_monthly_budget_is_checked_from_the_ledger(tmp_path):
    async with serving(tmp_path / "data", config_file=slow_config(tmp_path / "models.yaml")) as h:
        f = await h.upload(h.alice, batch_file(2, model="priced"))
        states = await watch_all(h.alice, (await create(h.alice, f.id)).id)
        spent = states[-1].cost.amount
        assert float(spent) > 0
        await set_quota(h, monthly_budget="1000")
        await create(h.alice, f.id)  # under budget
        await set_quota(h, monthly_budget=spent)
        info, _ = await refused(create(h.alice, f.id), grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_MONTHLY_BUDGET")
        assert info.metadata["limit"] == spent and float(info.metadata["current"]) >= float(spent)
        report = await admin_stub(h).GetProjectQuota(admin_pb2.GetProjectQuotaRequest(project="alice"),
                                                     metadata=MASTER)
        assert report.source == "api" and report.quota.monthly_budget == spent
        assert float(report.monthly_spend) >= float(spent) and report.stored_bytes > 0


async def test_stored_bytes_quota_refuses_the_upload_that_would_pass_it(http_harness):
    await stored_bytes_quota_refuses(http_harness)


async def test_quotas_hold_on_postgresql_too(tmp_path, postgres_url):
    async with serving(tmp_path / "data", http_address="127.0.0.1:0", database_url=postgres_url) as h:
        await stored_bytes_quota_refuses(h)
        await set_quota(h, max_running_batches=0)
        f = (await h.alice.files.ListFiles(file_pb2.ListFilesRequest(), metadata=h.alice.metadata)).files[0]
        await refused(create(h.alice, f.id), grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_RUNNING_BATCHES")


async def stored_bytes_quota_refuses(h) -> None:
    content = batch_file(3)
    await set_quota(h, max_stored_bytes=len(content) + 10)
    await h.upload(h.alice, content)
    info, _ = await refused(h.upload(h.alice, content), grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_STORED_BYTES")
    assert info.metadata["limit"] == str(len(content) + 10) and info.metadata["current"] == str(len(content))
    assert info.metadata["upload_bytes"] == str(len(content))
    # The HTTP API calls the same core: a 429 with the same reason.
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{h.server.http_port}/v1", api_key=h.alice.api_key,
                                max_retries=0)
    async with client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.files.create(file=("in.jsonl", content), purpose="batch")
    assert caught.value.code == "quota_stored_bytes"
    assert len((await h.alice.files.ListFiles(file_pb2.ListFilesRequest(), metadata=h.alice.metadata)).files) == 1


async def test_a_project_upload_quota_overrides_the_server_wide_cap(tmp_path):
    async with serving(tmp_path / "data", max_uploads_per_project=0) as h:
        await refused(h.upload(h.bob, batch_file(1)), grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_UPLOADS")
        await set_quota(h, max_uploads=2)
        await h.upload(h.alice, batch_file(1))  # alice's quota lifts the cap for alice only
        await set_quota(h, max_uploads=0)
        info, _ = await refused(h.upload(h.alice, batch_file(1)), grpc.StatusCode.RESOURCE_EXHAUSTED,
                                "TOO_MANY_UPLOADS")
        assert info.metadata["limit"] == "0" and info.metadata["current"] == "0"


# Quotas are reserved, not only checked: calls at the same moment cannot pass a limit together.
# These run on SQLite and, in CI's second pass, on PostgreSQL + S3 (BATCHGATE_TEST_BACKEND).
AT_ONCE = 20


def outcomes(results: list, reason: str, limit: int) -> tuple[list, list]:
    """(successes, refusals) of calls made at once; every refusal is RESOURCE_EXHAUSTED `reason`
    with the limit and the project's use at the limit."""
    ok = [r for r in results if not isinstance(r, BaseException)]
    failed = [r for r in results if isinstance(r, BaseException)]
    for err in failed:
        assert isinstance(err, grpc.aio.AioRpcError) and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        info, _ = error_details(err)
        assert info.reason == reason
        assert info.metadata["limit"] == str(limit) and info.metadata["project"] == "alice"
    return ok, failed


async def test_concurrent_creates_cannot_pass_the_running_batches_quota(tmp_path):
    async with serving(tmp_path / "data", config_file=slow_config(tmp_path / "models.yaml")) as h:
        await set_quota(h, max_running_batches=3)
        f = await h.upload(h.alice, batch_file(1, model="slow"))
        results = await asyncio.gather(*(create(h.alice, f.id) for _ in range(AT_ONCE)), return_exceptions=True)
        ok, failed = outcomes(results, "QUOTA_RUNNING_BATCHES", 3)
        assert len(ok) == 3 and len(failed) == AT_ONCE - 3
        assert {error_details(err)[0].metadata["current"] for err in failed} == {"3"}
        assert await h.server.store.count_unfinished_batches("alice") == 3


async def test_concurrent_uploads_cannot_pass_the_stored_bytes_quota(tmp_path):
    content = batch_file(3)
    async with serving(tmp_path / "data") as h:
        await set_quota(h, max_stored_bytes=3 * len(content), max_uploads=AT_ONCE)
        results = await asyncio.gather(*(h.upload(h.alice, content) for _ in range(AT_ONCE)), return_exceptions=True)
        ok, failed = outcomes(results, "QUOTA_STORED_BYTES", 3 * len(content))
        assert len(ok) == 3 and len(failed) == AT_ONCE - 3
        for err in failed:
            metadata = error_details(err)[0].metadata
            # Refused at its start (the project was full already) or at its end (this file would pass it).
            assert metadata["current"] == str(3 * len(content)) and metadata["upload_bytes"] in ("0", str(len(content)))
        assert await h.server.store.stored_bytes("alice") == 3 * len(content)
        listed = await h.alice.files.ListFiles(file_pb2.ListFilesRequest(), metadata=h.alice.metadata)
        assert len(listed.files) == 3  # the refused uploads left nothing behind


async def test_concurrent_uploads_cannot_pass_the_uploads_in_flight_quota(tmp_path):
    content = batch_file(2)
    release = asyncio.Event()

    async def held_open():
        """An upload that sends its header and content, then waits before it finishes."""
        for message in upload_requests(content):
            if message is UPLOAD_FINISH:
                await release.wait()
            yield message

    async with serving(tmp_path / "data") as h:
        await set_quota(h, max_uploads=3)
        calls = [asyncio.ensure_future(h.alice.files.UploadFile(held_open(), metadata=h.alice.metadata))
                 for _ in range(AT_ONCE)]
        deadline = time.monotonic() + 30
        while sum(c.done() for c in calls) < AT_ONCE - 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        # Every call but three was refused while those three are still in flight.
        ok, failed = outcomes([c.exception() for c in calls if c.done()], "TOO_MANY_UPLOADS", 3)
        assert not ok and len(failed) == AT_ONCE - 3
        assert {error_details(err)[0].metadata["current"] for err in failed} == {"3"}
        release.set()
        finished = await asyncio.gather(*(c for c in calls if not c.done()))
        assert len(finished) == 3 and all(r.file.bytes == len(content) for r in finished)


async def test_quotas_from_the_config_file_until_the_admin_rpc_replaces_them(tmp_path):
    config = slow_config(tmp_path / "models.yaml", project_quotas={
        "alice": {"max_running_batches": 0, "max_stored_bytes": 10**9, "monthly_budget": "25.50"}})
    async with serving(tmp_path / "data", config_file=config) as h:
        admin = admin_stub(h)
        report = await admin.GetProjectQuota(admin_pb2.GetProjectQuotaRequest(project="alice"), metadata=MASTER)
        assert report.source == "config" and report.quota.max_running_batches == 0
        assert report.quota.monthly_budget == "25.5" and not report.quota.HasField("max_uploads")
        f = await h.upload(h.alice, batch_file(1, model="slow"))
        await refused(create(h.alice, f.id), grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_RUNNING_BATCHES")
        await set_quota(h, max_running_batches=5)
        report = await admin.GetProjectQuota(admin_pb2.GetProjectQuotaRequest(project="alice"), metadata=MASTER)
        assert report.source == "api" and not report.quota.HasField("monthly_budget")
        batch = await create(h.alice, f.id)
        report = await admin.GetProjectQuota(admin_pb2.GetProjectQuotaRequest(project="alice"), metadata=MASTER)
        assert report.running_batches == 1 and batch.id
        none = await admin.GetProjectQuota(admin_pb2.GetProjectQuotaRequest(project="nobody"), metadata=MASTER)
        assert none.source == "none" and none.stored_bytes == 0 and none.monthly_spend == "0"


def test_the_readme_keys_commands_run_as_written(tmp_path):
    [block, _grpcurl] = sh_blocks("### Keys")
    commands = [line for line in block.splitlines() if line.startswith(".venv/bin/batchgate-server keys ")]
    assert len(commands) == 3
    outputs = []
    for command in commands:
        argv = command.replace(".venv/bin/batchgate-server", SERVER).replace("./data", str(tmp_path / "data")).split()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (command, done.stderr)
        outputs.append(done.stdout)
    [listed] = json.loads(outputs[2])
    assert listed["project"] == "team-search" and listed["name"] == "ci" and listed["expires_at"]
    assert listed["key_id"] in outputs[1]


def test_the_readme_quota_example_is_a_valid_config(tmp_path):
    from batchgate_server.config import parse_config
    example = yaml.safe_load(section("### Quotas").split("```yaml\n", 1)[1].split("```", 1)[0])
    quota = parse_config(example, "README").quotas["team-search"]
    assert (quota.max_running_batches, quota.max_uploads, quota.monthly_budget_nanos) == (10, 4, 250 * 10**9)


async def test_the_admin_service_is_in_health_and_reflection(harness):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    name = "batchgate.v1.AdminService"
    health = await health_pb2_grpc.HealthStub(harness.channel).Check(health_pb2.HealthCheckRequest(service=name))
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    async def ask():
        yield reflection_pb2.ServerReflectionRequest(list_services="")
    async for answer in reflection_pb2_grpc.ServerReflectionStub(harness.channel).ServerReflectionInfo(ask()):
        assert name in {s.name for s in answer.list_services_response.service}


async def test_the_python_client_carries_the_admin_stub(harness):
    from batchgate import AsyncBatchgateClient

    async with AsyncBatchgateClient(f"127.0.0.1:{harness.port}", api_key=MASTER_KEY) as client:
        created = await client.admin.CreateApiKey(admin_pb2.CreateApiKeyRequest(project="from-client"),
                                                  metadata=MASTER)
    assert created.api_key.project == "from-client"
