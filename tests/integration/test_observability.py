"""Operating batchgate: metrics scraped while a batch runs, JSON logs that name the batch and hide
keys, health that tells the truth during start-up (calls wait meanwhile). The real server, the real fake upstream."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from batchgate.v1 import batch_pb2, file_pb2, file_pb2_grpc
from batchgate_server.app import BatchgateServer
from batchgate_server.observability.logs import JsonFormatter
from tests.conftest import MASTER_KEY, error_details, free_port, jsonl, make_settings, request_line, serving
from tests.integration.batch_helpers import create, run_batch, upstream_entry, write_config
from tests.integration.metrics_helpers import scrape, value

# Looks like a live OpenAI key: the log test proves it never reaches a line.
REAL_LOOKING_KEY = "sk-proj-Zq8vN3kLm2Pw7Xy4Rt6Uv9Bc1De5Fg0Hj"


async def test_metrics_move_as_a_batch_runs(tmp_path, upstream):
    config = write_config(tmp_path / "models.yaml", [upstream_entry("fake-llm", upstream.base_url)])
    async with serving(tmp_path / "data", config_file=config, metrics_address="127.0.0.1:0") as h:
        port = h.server.metrics_port
        before = await scrape(port)
        assert value(before, "batchgate_batch_transitions_total") == 0
        assert value(before, "batchgate_deployment_cooldown", deployment=h.server.model_list.deployments[0].id) == 0

        upstream.fail_next("500")  # one attempt fails and is retried
        final, states, out, _ = await run_batch(h, [request_line(f"r{i}", model="fake-llm") for i in range(3)])
        assert len(out) == 3
        after = await scrape(port)
        deployment = next(d.id for d in h.server.model_list.deployments if d.model_name == "fake-llm")
        assert value(after, "batchgate_upstream_requests_sent_total", deployment=deployment) == 4
        assert value(after, "batchgate_upstream_responses_total", deployment=deployment, outcome="ok") == 3
        assert value(after, "batchgate_upstream_responses_total", deployment=deployment, outcome="http_500") == 1
        assert value(after, "batchgate_upstream_retries_total", deployment=deployment, code="http_500") == 1
        assert value(after, "batchgate_upstream_requests_in_flight", deployment=deployment) == 0
        assert value(after, "batchgate_batch_transitions_total", from_status="validating",
                     to_status="in_progress", provider="openai_compatible") == 1
        assert value(after, "batchgate_batch_transitions_total", to_status="completed") == 1
        assert value(after, "batchgate_batches_ended_total", status="completed", project="alice") == 1
        assert value(after, "batchgate_batches", status="in_progress") == 0, "the batch left the gauge"
        assert value(after, "batchgate_batch_state_duration_seconds_count", status="validating") == 1
        usage = final.usage
        assert value(after, "batchgate_tokens_total", project="alice", kind="input") == usage.input_tokens > 0
        assert value(after, "batchgate_tokens_total", project="alice", kind="output") == usage.output_tokens > 0
        create_calls = value(after, "batchgate_grpc_call_duration_seconds_count",
                             method="/batchgate.v1.BatchService/CreateBatch", code="OK")
        assert create_calls == 1
        assert value(after, "batchgate_grpc_call_duration_seconds_count",
                     method="/batchgate.v1.FileService/UploadFile", code="OK") == 1

        # A refused call is counted under its code; a watcher is an open stream while it watches.
        with pytest.raises(grpc.aio.AioRpcError):
            await h.alice.files.GetFile(file_pb2.GetFileRequest(file_id="file-missing"), metadata=h.alice.metadata)
        upstream.latency_ms = 60_000  # a batch that stays in progress while it is watched
        f = await h.upload(h.alice, jsonl([request_line("slow", model="fake-llm")]))
        slow = await create(h.alice, f.id)
        stream = h.alice.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=slow.id),
                                            metadata=h.alice.metadata)
        await stream.read()  # the first event: the stream is open
        during = await scrape(port)
        assert value(during, "batchgate_grpc_streams_open", method="/batchgate.v1.BatchService/WatchBatch") == 1
        assert value(during, "batchgate_batches", provider="openai_compatible") == 1
        lag = during[("batchgate_tracker_lag_seconds", (("provider", "openai_compatible"),))]
        assert 0 <= lag < 30, "the running batch is polled (or was adopted) moments ago"
        assert value(after, "batchgate_tracker_lag_seconds") == 0, "no batch was running: no lag"
        stream.cancel()
        upstream.latency_ms = 0
        final_scrape = await scrape(port)
        assert value(final_scrape, "batchgate_grpc_streams_open", method="/batchgate.v1.BatchService/WatchBatch") \
            in (0, 1)  # the cancel reaches the server asynchronously
        assert value(final_scrape, "batchgate_grpc_call_duration_seconds_count",
                     method="/batchgate.v1.FileService/GetFile", code="NOT_FOUND") == 1
        assert value(final_scrape, "batchgate_grpc_errors_total", method="/batchgate.v1.FileService/GetFile",
                     code="NOT_FOUND", reason="FILE_NOT_FOUND") == 1
        assert value(final_scrape, "batchgate_upload_bytes_total") == value(after, "batchgate_upload_bytes_total") \
            + f.bytes > f.bytes
        # Counted once: the ledger row was committed once, however often the endpoint is scraped.
        assert value(final_scrape, "batchgate_tokens_total", project="alice", kind="input") == usage.input_tokens


async def test_rpm_waits_and_429_retries_are_counted(tmp_path, upstream):
    """rpm 300 lets 5 requests through at once (a bucket holds one second's budget): of 8, the
    last ones wait for the limit. A 429 is retried."""
    upstream.retry_after_s = 0.05
    upstream.fail_next("429")
    config = write_config(tmp_path / "models.yaml", [upstream_entry("fake-llm", upstream.base_url, rpm=300)])
    async with serving(tmp_path / "data", config_file=config, metrics_address="127.0.0.1:0") as h:
        final, *_ = await run_batch(h, [request_line(f"r{i}", model="fake-llm") for i in range(8)])
        assert final.request_counts.completed == 8
        samples = await scrape(h.server.metrics_port)
    deployment = next(d.id for d in h.server.model_list.deployments if d.model_name == "fake-llm")
    assert value(samples, "batchgate_upstream_retries_total", deployment=deployment, code="http_429") == 1
    assert value(samples, "batchgate_rate_limit_wait_seconds_count", deployment=deployment) >= 3
    assert value(samples, "batchgate_rate_limit_wait_seconds_sum", deployment=deployment) >= 0.3


async def test_upload_rejects_are_counted_by_reason(tmp_path):
    async with serving(tmp_path / "data", metrics_address="127.0.0.1:0") as h:
        with pytest.raises(grpc.aio.AioRpcError):
            await h.upload(h.alice, b"not json\n")
        samples = await scrape(h.server.metrics_port)
        assert value(samples, "batchgate_grpc_errors_total", method="/batchgate.v1.FileService/UploadFile",
                     code="INVALID_ARGUMENT", reason="INVALID_BATCH_FILE") == 1
        assert value(samples, "batchgate_upload_bytes_total") == 0


async def test_the_http_api_is_counted_by_route_template(tmp_path):
    async with serving(tmp_path / "data", metrics_address="127.0.0.1:0", http_address="127.0.0.1:0") as h:
        base = f"http://127.0.0.1:{h.server.http_port}/v1"
        auth = {"Authorization": f"Bearer {h.alice.api_key}"}
        async with aiohttp.ClientSession() as session:
            for batch_id in ("batch_a", "batch_b"):
                async with session.get(f"{base}/batches/{batch_id}", headers=auth) as resp:
                    assert resp.status == 404
            async with session.get(f"{base}/batches", headers=auth) as resp:
                assert resp.status == 200
        samples = await scrape(h.server.metrics_port)
        route = "/v1/batches/{batch_id}"
        assert value(samples, "batchgate_http_request_duration_seconds_count", method="GET", route=route,
                     status="404") == 2, "both ids under one route template"
        assert value(samples, "batchgate_http_request_duration_seconds_count", method="GET", route="/v1/batches",
                     status="200") == 1


async def test_metrics_are_off_by_default(harness):
    assert harness.server.metrics is None and harness.server.metrics_port == 0


async def test_json_logs_name_the_batch_and_never_a_key(tmp_path, upstream):
    config = write_config(tmp_path / "models.yaml", [upstream_entry("fake-llm", upstream.base_url,
                                                                    api_key=REAL_LOOKING_KEY)])
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        async with serving(tmp_path / "data", config_file=config) as h:
            final, *_ = await run_batch(h, [request_line(f"r{i}", model="fake-llm") for i in range(2)])
            # An error that quotes the key, as an upstream's 401 body may: masked in the line.
            logging.getLogger("batchgate_server.test").warning("upstream said: bad key %s (Bearer %s)",
                                                               REAL_LOOKING_KEY, "tok-abcdef")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    entries = [json.loads(line) for line in lines]  # one object a line
    changes = [e for e in entries if e.get("batch_id") == final.id and "->" in e["message"]]
    assert [e["message"].split(": ", 1)[1] for e in changes] == ["validating -> in_progress",
                                                                 "in_progress -> finalizing",
                                                                 "finalizing -> completed"]
    assert all(e["project"] == "alice" and e["deployment"] and e["file_id"] for e in changes)
    assert not [line for line in lines if REAL_LOOKING_KEY in line or "tok-abcdef" in line]
    assert any("***" in e["message"] for e in entries)


class SlowStart(BatchgateServer):
    """Adoption held until the test lets it go: the window a big restart has."""

    release: asyncio.Event

    async def _start_background(self) -> None:
        await self.release.wait()
        await super()._start_background()


async def test_health_is_not_serving_until_unfinished_batches_are_adopted(tmp_path):
    port = free_port()
    server = SlowStart(make_settings(tmp_path / "data", address=f"127.0.0.1:{port}"))
    server.release = asyncio.Event()
    starting = asyncio.create_task(server.start())
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:  # until the port is open
                try:
                    status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=5,
                                                 wait_for_ready=True)).status
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.01)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            # A call made now waits for the adoption instead of acting on a half-started server.
            files = file_pb2_grpc.FileServiceStub(channel)
            call = asyncio.ensure_future(files.GetFile(file_pb2.GetFileRequest(file_id="file-x"),
                                                       metadata=(("authorization", f"Bearer {MASTER_KEY}"),)))
            await asyncio.sleep(0.2)  # ample time for the call to be answered were it not held
            assert not call.done()
            server.release.set()
            await starting
            with pytest.raises(grpc.aio.AioRpcError) as answered:
                await call
            assert answered.value.code() == grpc.StatusCode.NOT_FOUND, "answered once the server is ready"
            assert (await health.Check(health_pb2.HealthCheckRequest())).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert (await health.Check(health_pb2.HealthCheckRequest(service="batchgate.v1.BatchService"))).status \
                == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.release.set()
        await starting
        await server.stop(grace=0)


async def test_max_connection_age_ends_a_long_watch_so_the_client_reconnects(tmp_path, upstream):
    """--max-connection-age reaches gRPC: a watch on a batch that does not end is cut UNAVAILABLE
    (which clients reconnect on) once the connection is older than the age plus its grace."""
    upstream.latency_ms = 60_000
    config = write_config(tmp_path / "models.yaml", [upstream_entry("fake-llm", upstream.base_url)])
    async with serving(tmp_path / "data", config_file=config, max_connection_age=0.5,
                       max_connection_age_grace=0.5) as h:
        f = await h.upload(h.alice, jsonl([request_line("slow", model="fake-llm")]))
        batch = await create(h.alice, f.id)
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            async for _ in h.alice.batches.WatchBatch(batch_pb2.WatchBatchRequest(batch_id=batch.id),
                                                      metadata=h.alice.metadata, timeout=20):
                pass
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        upstream.latency_ms = 0


def test_keepalive_and_connection_age_flags_become_grpc_options():
    from batchgate_server.app import grpc_options
    from batchgate_server.settings import build_parser, settings_from_args

    s = settings_from_args(build_parser().parse_args(["--keepalive-time", "20", "--keepalive-timeout", "5",
                                                      "--max-connection-age", "1800"]))
    options = dict(grpc_options(s))
    assert options["grpc.keepalive_time_ms"] == 20_000 and options["grpc.keepalive_timeout_ms"] == 5_000
    assert options["grpc.max_connection_age_ms"] == 1_800_000
    assert options["grpc.max_connection_age_grace_ms"] == 30_000
    defaults = dict(grpc_options(settings_from_args(build_parser().parse_args([]))))
    assert defaults["grpc.keepalive_time_ms"] == 30_000 and "grpc.max_connection_age_ms" not in defaults
    off = dict(grpc_options(settings_from_args(build_parser().parse_args(["--keepalive-time", "0"]))))
    assert "grpc.keepalive_time_ms" not in off


async def next_status(watch) -> int:
    return (await asyncio.wait_for(watch.read(), 20)).status


async def test_each_deployment_has_a_health_name_fed_by_probes(tmp_path, upstream):
    """batchgate.deployment/<id> follows its upstream's models list: SERVING while it answers,
    NOT_SERVING once it is gone, SERVING again when it is back (and the same in the metrics);
    the simulated deployment is never probed."""
    config = write_config(tmp_path / "models.yaml", [upstream_entry("fake-llm", upstream.base_url)])
    async with serving(tmp_path / "data", config_file=config, metrics_address="127.0.0.1:0",
                       deployment_health_interval=0.1) as h:
        deployment = next(d for d in h.server.model_list.deployments if d.model_name == "fake-llm")
        name = f"batchgate.deployment/{deployment.id}"
        health = health_pb2_grpc.HealthStub(h.channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=name))
        status = await next_status(watch)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:  # before the first probe
            status = await next_status(watch)
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert value(await scrape(h.server.metrics_port), "batchgate_deployment_up", deployment=deployment.id) == 1

        await upstream.stop()
        assert await next_status(watch) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert value(await scrape(h.server.metrics_port), "batchgate_deployment_up", deployment=deployment.id) == 0
        await upstream.start()  # the same port again
        assert await next_status(watch) == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()

        simulated = next(d for d in h.server.model_list.deployments if d.model_name == "simulated")
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await health.Check(health_pb2.HealthCheckRequest(service=f"batchgate.deployment/{simulated.id}"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_server_process_logs_json_and_exports_traces_from_otel_environment(tmp_path):
    """As an operator runs it: --log-format json on stderr (every line an object, the master key in
    none), and OTEL_TRACES_EXPORTER=console printing the spans of the calls made."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    server = str(Path(sys.executable).with_name("batchgate-server"))
    port = free_port()
    env = {**os.environ, "BATCHGATE_MASTER_KEY": REAL_LOOKING_KEY, "OTEL_TRACES_EXPORTER": "console"}
    proc = subprocess.Popen([server, "--address", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "data"),
                             "--log-format", "json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            files = file_pb2_grpc.FileServiceStub(channel)
            with pytest.raises(grpc.RpcError):
                files.GetFile(file_pb2.GetFileRequest(file_id="file-missing"),
                              metadata=(("authorization", f"Bearer {REAL_LOOKING_KEY}"),))
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    entries = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert any(e["message"].startswith("batchgate listening on") for e in entries)
    assert REAL_LOOKING_KEY not in err
    assert '"name": "batchgate.v1.FileService/GetFile"' in out
    assert '"rpc.grpc.status_code": "NOT_FOUND"' in out and '"file_id": "file-missing"' in out
