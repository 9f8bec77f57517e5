"""Traces with the SDK's in-memory exporter: a span per RPC and per provider HTTP call, and one
trace that follows a batch from CreateBatch through submit, polls and its end."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from batchgate_server.observability.tracing import batch_span_context
from tests.conftest import request_line, serving
from tests.integration.batch_helpers import run_batch, upstream_entry, write_config

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def _tracer_provider():
    # The global provider can be set once per process: this module's exporter keeps it.
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
        trace.set_tracer_provider(provider)
    yield
    # The provider stays for the session (it cannot be unset); later tests' spans are not kept.
    EXPORTER.clear()
    EXPORTER.shutdown()


async def test_one_trace_follows_a_batch_from_create_to_its_end(tmp_path, upstream):
    EXPORTER.clear()
    config = write_config(tmp_path / "models.yaml", [upstream_entry("fake-llm", upstream.base_url)])
    async with serving(tmp_path / "data", config_file=config) as h:
        final, *_ = await run_batch(h, [request_line(f"r{i}", model="fake-llm") for i in range(2)])
    spans = EXPORTER.get_finished_spans()
    batch_trace = batch_span_context(final.id).trace_id

    create = next(s for s in spans if s.name == "batchgate.v1.BatchService/CreateBatch")
    assert create.kind == trace.SpanKind.SERVER and create.attributes["rpc.grpc.status_code"] == "OK"
    assert create.attributes["batch_id"] == final.id
    assert [link.context.trace_id for link in create.links] == [batch_trace], "CreateBatch links to the batch"
    upload = next(s for s in spans if s.name == "batchgate.v1.FileService/UploadFile")
    assert upload.kind == trace.SpanKind.SERVER

    in_batch = [s for s in spans if s.context.trace_id == batch_trace]
    states = [s.attributes["batch.status"] for s in in_batch if s.name.startswith("batch ") and
              "batch.status" in s.attributes]
    assert states == ["validating", "in_progress", "finalizing"]
    assert all(s.attributes["batch_id"] == final.id and s.attributes["project"] == "alice"
               for s in in_batch if s.name.startswith("batch "))
    assert any(s.name == "batch poll" for s in in_batch)
    calls = [s for s in in_batch if s.name == "POST /v1/chat/completions"]
    assert len(calls) == 2 and all(s.kind == trace.SpanKind.CLIENT and
                                   s.attributes["http.response.status_code"] == 200 for s in calls)
