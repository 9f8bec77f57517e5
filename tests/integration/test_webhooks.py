"""Webhooks end to end: a batch's end reaches a receiver on loopback as an OpenAI-shaped event,
signed per Standard Webhooks (checked with the independent `standardwebhooks` package), retried
through 500s, hangs and a receiver restart with the same webhook-id, and delivered after a kill -9
of the server that ended the batch before it could deliver."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from standardwebhooks.webhooks import Webhook

from batchgate.v1 import batch_pb2
from tests.conftest import MASTER_KEY, batch_file, free_port, jsonl, request_line, serving, upload_requests
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.integration.batch_helpers import create, watch_all

SECRET = "whsec_" + base64.b64encode(b"receiver-shared-secret-32-bytes!").decode()
FAST_RETRIES = (0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2)
SERVER = str(Path(sys.executable).with_name("batchgate-server"))


def webhook_config(path: Path, url: str, *, project: str = "alice", events: list[str] | None = None) -> Path:
    entry = {"project": project, "url": url, "secret": "os.environ/TEST_WEBHOOK_SECRET"}
    if events is not None:
        entry["events"] = events
    path.write_text(yaml.safe_dump({"model_list": [], "webhooks": [entry]}))
    return path


@pytest.fixture(autouse=True)
def webhook_secret_env(monkeypatch):
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", SECRET)


def verified(received) -> dict:
    """The event, after the signature checked out with the standardwebhooks package."""
    return Webhook(SECRET).verify(received.body, received.headers)


async def delivered(h, batch_id: str, timeout: float = 30.0):
    """The batch's outbox events once every one is delivered."""
    async def poll():
        while True:
            events = await h.server.store.outbox_events(batch_id)
            if events and all(e.delivered_at for e in events):
                return events
            await asyncio.sleep(0.05)
    return await asyncio.wait_for(poll(), timeout)


async def test_a_completed_batch_is_signed_and_delivered_once_to_its_project_only(tmp_path):
    receiver = WebhookReceiver()
    await receiver.start()
    try:
        config = webhook_config(tmp_path / "config.yaml", receiver.url)
        async with serving(tmp_path / "data", config_file=config, webhook_retry_schedule=FAST_RETRIES) as h:
            f = await h.upload(h.bob, batch_file(2, model="simulated"))
            bobs = await create(h.bob, f.id, model="simulated")
            assert (await watch_all(h.bob, bobs.id))[-1].status == batch_pb2.BATCH_STATUS_COMPLETED
            f = await h.upload(h.alice, batch_file(3, model="simulated"))
            batch = await create(h.alice, f.id, model="simulated")
            final = (await watch_all(h.alice, batch.id))[-1]
            [stored] = await delivered(h, batch.id)
            assert await h.server.store.outbox_events(bobs.id) == []  # bob's project has no endpoint
        [got] = receiver.received
        event = verified(got)
        assert event == {"id": stored.event_id, "object": "event", "created_at": event["created_at"],
                         "type": "batch.completed", "data": {"id": batch.id}}
        assert got.headers["webhook-id"] == stored.event_id and stored.event_id.startswith("evt_")
        assert final.completed_at.seconds - 1 <= event["created_at"] <= final.completed_at.seconds + 1
        assert got.headers["content-type"] == "application/json"
        # A forged or altered body fails the same independent check.
        with pytest.raises(Exception):
            Webhook(SECRET).verify(got.body.replace(b"completed", b"failed"), got.headers)
    finally:
        await receiver.stop()


async def test_a_cancelled_batch_sends_batch_cancelled_and_unsubscribed_types_are_not_sent(tmp_path, upstream):
    receiver = WebhookReceiver()
    await receiver.start()
    try:
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump({
            "model_list": [{"model_name": "fake-llm", "litellm_params": {
                "model": "hosted_vllm/fake-model", "api_base": upstream.base_url, "max_concurrency": 4}}],
            "webhooks": [{"project": "alice", "url": receiver.url, "secret": "os.environ/TEST_WEBHOOK_SECRET",
                          "events": ["batch.cancelled"]}]}))
        async with serving(tmp_path / "data", config_file=config, webhook_retry_schedule=FAST_RETRIES) as h:
            f = await h.upload(h.alice, batch_file(1, model="simulated"))
            done = await create(h.alice, f.id, model="simulated")
            assert (await watch_all(h.alice, done.id))[-1].status == batch_pb2.BATCH_STATUS_COMPLETED
            lines = [request_line(f"slow-{i}", model="fake-llm", content=f"SLOW:60000 wait {i}") for i in range(4)]
            f = await h.upload(h.alice, jsonl(lines))
            batch = await create(h.alice, f.id, model="fake-llm")
            await h.alice.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch.id),
                                              metadata=h.alice.metadata)
            assert (await watch_all(h.alice, batch.id))[-1].status == batch_pb2.BATCH_STATUS_CANCELLED
            await delivered(h, batch.id)
            assert await h.server.store.outbox_events(done.id) == []  # not subscribed to batch.completed
        [got] = receiver.received
        assert verified(got)["type"] == "batch.cancelled" and verified(got)["data"] == {"id": batch.id}
    finally:
        await receiver.stop()


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


async def test_retried_through_500_hang_and_restart_with_the_same_id_and_no_secret_logged(tmp_path):
    logs = Lines()
    root = logging.getLogger()
    root.addHandler(logs)
    level, root.level = root.level, logging.DEBUG
    receiver = WebhookReceiver(plan=["500", "hang"])
    await receiver.start()
    config = webhook_config(tmp_path / "config.yaml", receiver.url)
    async with serving(tmp_path / "data", config_file=config, webhook_retry_schedule=FAST_RETRIES,
                       webhook_timeout=0.5) as h:
        try:
            f = await h.upload(h.alice, batch_file(2, model="simulated"))
            batch = await create(h.alice, f.id, model="simulated")

            async def attempts_reach(n: int) -> None:
                while (await h.server.store.outbox_events(batch.id))[0].attempts < n:
                    await asyncio.sleep(0.05)

            await receiver.wait_for(2)  # a 500, then an attempt left hanging…
            await attempts_reach(2)  # …until it timed out
            await receiver.stop()
            await attempts_reach(3)  # a refused connection at least once while it was down
            await receiver.start()  # the same port
            [stored] = await delivered(h, batch.id)
        finally:
            await receiver.stop()
            root.removeHandler(logs)
            root.setLevel(level)
    answers = [r.answer for r in receiver.received]
    assert answers == ["500", "hang", "ok"]
    assert stored.attempts >= 4 and stored.last_error == ""
    assert {r.headers["webhook-id"] for r in receiver.received} == {stored.event_id}
    assert {r.body for r in receiver.received} == {stored.body.encode()}
    for r in receiver.received:  # each attempt is signed afresh (its own timestamp), all verify
        assert verified(r)["data"] == {"id": batch.id}
    logged = "\n".join(logs.lines)
    assert "HTTP 500" in logged and "no answer within" in logged
    assert SECRET not in logged and SECRET.removeprefix("whsec_") not in logged


async def test_an_event_is_given_up_after_the_last_retry(tmp_path):
    receiver = WebhookReceiver(plan=["500"] * 10)
    await receiver.start()
    try:
        config = webhook_config(tmp_path / "config.yaml", receiver.url)
        async with serving(tmp_path / "data", config_file=config, webhook_retry_schedule=(0.1, 0.1)) as h:
            f = await h.upload(h.alice, batch_file(1, model="simulated"))
            batch = await create(h.alice, f.id, model="simulated")
            await receiver.wait_for(3)
            while not (await h.server.store.outbox_events(batch.id))[0].given_up_at:
                await asyncio.sleep(0.05)
            [stored] = await h.server.store.outbox_events(batch.id)
        assert (stored.attempts, stored.last_error, stored.delivered_at) == (3, "HTTP 500", None)
        assert len(receiver.received) == 3  # the schedule bounds the attempts
    finally:
        await receiver.stop()


@pytest.mark.slow
async def test_kill_9_after_the_batch_ended_before_delivery_delivers_after_restart(tmp_path):
    receiver = WebhookReceiver(port=free_port())  # down while the batch ends
    # A token in the URL, as many receivers take one: it must not reach the logs either.
    config = webhook_config(tmp_path / "config.yaml", receiver.url + "?token=url-token-0123", project="default")
    data_dir, port = tmp_path / "data", free_port()
    env = dict(os.environ, BATCHGATE_MASTER_KEY=MASTER_KEY)
    command = [SERVER, "--address", f"127.0.0.1:{port}", "--data-dir", str(data_dir), "--config", str(config),
               "--webhook-retry-schedule", "0.2,0.2,0.2,0.2,0.2,0.2,0.2,0.2,0.2,0.2", "--webhook-timeout", "1",
               "--log-level", "DEBUG"]
    metadata = (("authorization", f"Bearer {MASTER_KEY}"),)
    import grpc

    from batchgate.v1 import batch_pb2_grpc, file_pb2_grpc

    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    proc = subprocess.Popen(command, env=env, stderr=logs[0].open("wb"))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            files, batches = file_pb2_grpc.FileServiceStub(channel), batch_pb2_grpc.BatchServiceStub(channel)
            f = (await files.UploadFile(upload_requests(batch_file(2, model="simulated")), metadata=metadata)).file
            batch = (await batches.CreateBatch(batch_pb2.CreateBatchRequest(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h", model="simulated"),
                metadata=metadata)).batch
            async for event in batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=batch.id), metadata=metadata,
                                                  timeout=60):
                if event.WhichOneof("event") == "batch" and event.batch.status == batch_pb2.BATCH_STATUS_COMPLETED:
                    break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with sqlite3.connect(data_dir / "batchgate.sqlite3") as db:
            [(event_id, delivered_at)] = db.execute(
                "SELECT event_id, delivered_at FROM webhook_outbox WHERE batch_id=?", (batch.id,)).fetchall()
        assert delivered_at is None
        await receiver.start()
        proc = subprocess.Popen(command, env=env, stderr=logs[1].open("wb"))
        [got] = await receiver.wait_for(1)
        assert got.headers["webhook-id"] == event_id
        assert verified(got) == {"id": event_id, "object": "event", "created_at": verified(got)["created_at"],
                                 "type": "batch.completed", "data": {"id": batch.id}}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        await receiver.stop()
    for log_file in logs:
        text = log_file.read_text()
        assert event_id in text  # the deliverer logged its attempts…
        assert SECRET.removeprefix("whsec_") not in text  # …and never the secret or the URL's token
        assert "url-token-0123" not in text
    assert json.loads(got.body)["id"] == event_id


# -- WebhookService: endpoints through the API (master key only) ----------------------------------


def webhook_stub(h):
    import grpc  # noqa: F401

    from batchgate.v1 import webhook_pb2_grpc

    return webhook_pb2_grpc.WebhookServiceStub(h.channel)


async def test_an_endpoint_created_through_the_api_receives_events_signed_with_its_secret(tmp_path):
    from batchgate.v1 import webhook_pb2

    receiver = WebhookReceiver()
    await receiver.start()
    config = webhook_config(tmp_path / "config.yaml", "http://127.0.0.1:9/never", project="carol")
    try:
        async with serving(tmp_path / "data", config_file=config, webhook_retry_schedule=FAST_RETRIES) as h:
            stub = webhook_stub(h)
            created = await stub.CreateWebhookEndpoint(webhook_pb2.CreateWebhookEndpointRequest(
                project="alice", url=receiver.url, events=["batch.completed", "batch.completed"]),
                metadata=h.admin.metadata)
            assert created.secret.startswith("whsec_") and created.endpoint.id.startswith("wh_")
            assert list(created.endpoint.events) == ["batch.completed"] and not created.endpoint.configured
            listed = await stub.ListWebhookEndpoints(webhook_pb2.ListWebhookEndpointsRequest(),
                                                     metadata=h.admin.metadata)
            assert [(e.project, e.configured) for e in listed.endpoints] == [("carol", True), ("alice", False)]
            assert created.secret not in str(listed)
            only_alice = await stub.ListWebhookEndpoints(webhook_pb2.ListWebhookEndpointsRequest(project="alice"),
                                                         metadata=h.admin.metadata)
            assert [e.id for e in only_alice.endpoints] == [created.endpoint.id]

            f = await h.upload(h.alice, batch_file(1, model="simulated"))
            batch = await create(h.alice, f.id, model="simulated")
            [stored] = await delivered(h, batch.id)
            [got] = receiver.received
            assert Webhook(created.secret).verify(got.body, got.headers)["data"] == {"id": batch.id}
            assert got.headers["webhook-id"] == stored.event_id

            deleted = await stub.DeleteWebhookEndpoint(webhook_pb2.DeleteWebhookEndpointRequest(
                id=created.endpoint.id), metadata=h.admin.metadata)
            assert deleted.deleted
            f = await h.upload(h.alice, batch_file(1, model="simulated"))
            later = await create(h.alice, f.id, model="simulated")
            await watch_all(h.alice, later.id)
            assert await h.server.store.outbox_events(later.id) == []  # no endpoint left for alice
    finally:
        await receiver.stop()


@pytest.mark.parametrize("request_fields, code, reason", [
    ({"project": "", "url": "https://a.example/h"}, "INVALID_ARGUMENT", "INVALID_WEBHOOK_PROJECT"),
    ({"project": "p" * 129, "url": "https://a.example/h"}, "INVALID_ARGUMENT", "INVALID_WEBHOOK_PROJECT"),
    ({"project": "p\x00q", "url": "https://a.example/h"}, "INVALID_ARGUMENT", "INVALID_WEBHOOK_PROJECT"),
    ({"project": "p", "url": ""}, "INVALID_ARGUMENT", "INVALID_WEBHOOK_URL"),
    ({"project": "p", "url": "ftp://a.example/h"}, "INVALID_ARGUMENT", "INVALID_WEBHOOK_URL"),
    ({"project": "p", "url": "https:///nohost"}, "INVALID_ARGUMENT", "INVALID_WEBHOOK_URL"),
    ({"project": "p", "url": "https://a.example:99999999/h"}, "INVALID_ARGUMENT", "INVALID_WEBHOOK_URL"),
    ({"project": "p", "url": "https://a.example/h\r\nX-Evil: 1"}, "INVALID_ARGUMENT", "INVALID_WEBHOOK_URL"),
    ({"project": "p", "url": "https://a.example/" + "a" * 3000}, "INVALID_ARGUMENT", "INVALID_WEBHOOK_URL"),
    ({"project": "p", "url": "https://a.example/h", "events": ["batch.started"]}, "INVALID_ARGUMENT",
     "INVALID_WEBHOOK_EVENTS"),
    ({"project": "p", "url": "https://a.example/h", "events": ["x" * 100_000]}, "INVALID_ARGUMENT",
     "INVALID_WEBHOOK_EVENTS"),
    ({"project": "p", "url": "https://a.example/h", "secret": "not-a-secret"}, "INVALID_ARGUMENT",
     "INVALID_WEBHOOK_SECRET"),
    ({"project": "p", "url": "https://a.example/h", "secret": "whsec_!!!"}, "INVALID_ARGUMENT",
     "INVALID_WEBHOOK_SECRET"),
    ({"project": "p", "url": "https://a.example/h", "secret": "whsec_c2hvcnQ="}, "INVALID_ARGUMENT",
     "INVALID_WEBHOOK_SECRET"),
])
async def test_hostile_create_requests_are_invalid_argument_naming_the_field(harness, request_fields, code,
                                                                             reason):
    import grpc

    from batchgate.v1 import webhook_pb2
    from tests.conftest import error_details

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await webhook_stub(harness).CreateWebhookEndpoint(webhook_pb2.CreateWebhookEndpointRequest(**request_fields),
                                                          metadata=harness.admin.metadata)
    assert err.value.code().name == code
    info, bad_request = error_details(err.value)
    assert info.reason == reason and info.domain == "batchgate.dev"
    assert bad_request is not None and len(err.value.details()) < 1000
    if "secret" in request_fields:
        assert request_fields["secret"] not in err.value.details()  # never echo a secret


async def test_project_keys_are_denied_and_unknown_or_configured_ids_are_refused(tmp_path):
    import grpc

    from batchgate.v1 import webhook_pb2
    from tests.conftest import error_details

    config = webhook_config(tmp_path / "config.yaml", "https://hooks.example/batchgate")
    async with serving(tmp_path / "data", config_file=config) as h:
        stub = webhook_stub(h)
        calls = [stub.CreateWebhookEndpoint(webhook_pb2.CreateWebhookEndpointRequest(
                     project="alice", url="https://x.example/h"), metadata=h.alice.metadata),
                 stub.ListWebhookEndpoints(webhook_pb2.ListWebhookEndpointsRequest(), metadata=h.alice.metadata),
                 stub.DeleteWebhookEndpoint(webhook_pb2.DeleteWebhookEndpointRequest(id="wh_x"),
                                            metadata=h.bob.metadata)]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert error_details(err.value)[0].reason == "WEBHOOK_MASTER_KEY_REQUIRED"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListWebhookEndpoints(webhook_pb2.ListWebhookEndpointsRequest(), metadata=h.anonymous.metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.DeleteWebhookEndpoint(webhook_pb2.DeleteWebhookEndpointRequest(id="wh_" + "z" * 5000),
                                             metadata=h.admin.metadata)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and len(err.value.details()) < 200
        assert error_details(err.value)[0].reason == "WEBHOOK_ENDPOINT_NOT_FOUND"
        [configured] = (await stub.ListWebhookEndpoints(webhook_pb2.ListWebhookEndpointsRequest(),
                                                        metadata=h.admin.metadata)).endpoints
        assert configured.configured and configured.url == "https://hooks.example/batchgate"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.DeleteWebhookEndpoint(webhook_pb2.DeleteWebhookEndpointRequest(id=configured.id),
                                             metadata=h.admin.metadata)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_details(err.value)[0].reason == "WEBHOOK_ENDPOINT_CONFIGURED"
