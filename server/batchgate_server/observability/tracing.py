"""OpenTelemetry traces, off unless the standard OTEL_* environment asks for them.

`OTEL_TRACES_EXPORTER` (`console`, or `otlp` with an OTLP exporter package installed) or
`OTEL_EXPORTER_OTLP_ENDPOINT` turns them on; `OTEL_SERVICE_NAME` names the service (batchgate).
The SDK is imported only then; the API alone is a no-op that costs microseconds.

One trace per batch: its trace id is derived from the batch id, so every span about the batch —
the CreateBatch call's link, each status it passed through (with its real start and end), each
poll, each provider HTTP call made by its runner — lands in the same trace, also after a restart,
with nothing stored.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract

from batchgate_server.core.events import BatchEvents
from batchgate_server.domain.models import STATUS_TIMESTAMP, BatchRecord

log = logging.getLogger(__name__)
tracer = trace.get_tracer("batchgate")


def configure_from_environment() -> bool:
    """Install the SDK's tracer provider when OTEL_* asks for traces; True if it did."""
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "")
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")
    if exporter_name in ("", "none") and not endpoint:
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        log.warning("traces: OTEL_* asks for traces but opentelemetry-sdk is not installed"
                    " (pip install 'batchgate-server[traces]'); traces off")
        return False

    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("traces: OTLP export needs the opentelemetry-exporter-otlp-proto-http package; traces off")
            return False
        exporter = OTLPSpanExporter()  # reads OTEL_EXPORTER_OTLP_* itself
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME",
                                                                                         "batchgate")}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("traces exported to %s", exporter_name or "otlp")
    return True


def active() -> bool:
    """Whether a real tracer provider is installed (by configure_from_environment, or a test)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def batch_span_context(batch_id: str) -> trace.SpanContext:
    """The (remote) parent of every span of a batch: the same for the batch's whole life."""
    digest = hashlib.sha256(batch_id.encode()).digest()
    return trace.SpanContext(trace_id=int.from_bytes(digest[:16], "big") or 1,
                             span_id=int.from_bytes(digest[16:24], "big") or 1, is_remote=True,
                             trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))


def _batch_context(batch_id: str) -> otel_context.Context:
    return trace.set_span_in_context(trace.NonRecordingSpan(batch_span_context(batch_id)))


def _attributes(rec: BatchRecord) -> dict[str, Any]:
    return {"batch_id": rec.id, "file_id": rec.input_file_id, "project": rec.project,
            "deployment": rec.deployment_id, "provider": rec.provider}


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class BatchTraces(BatchEvents):
    """Tracker hooks as spans: one per status a batch passed through, one per poll."""

    def adopted(self, rec: BatchRecord) -> None:
        # Runs in the runner task's own context (Tracker.adopt): its HTTP calls join the batch trace.
        otel_context.attach(_batch_context(rec.id))

    def changed(self, before: BatchRecord, after: BatchRecord, ledger: dict[str, Any] | None) -> None:
        if before.status is after.status:
            return
        started = _entered(before)
        span = tracer.start_span(f"batch {before.status.value}", context=_batch_context(after.id),
                                 attributes={**_attributes(after), "batch.status": before.status.value,
                                             "batch.next_status": after.status.value},
                                 start_time=_ns(started))
        span.end(end_time=_ns(max(started, _entered(after))))

    def polled(self, rec: BatchRecord) -> None:
        tracer.start_span("batch poll", context=_batch_context(rec.id), attributes=_attributes(rec)).end()


def _entered(rec: BatchRecord) -> float:
    stamp = STATUS_TIMESTAMP.get(rec.status)
    return (getattr(rec, stamp) if stamp else None) or rec.created_at


def rpc_wrapper(method: str, handler):
    """A span per call of our services (api/undecodable.py SoftDecoding wrapper), continuing the
    caller's W3C traceparent; CreateBatch's span links to the batch's own trace."""
    import inspect

    kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
                if getattr(handler, k) is not None)
    inner = getattr(handler, kind)
    name = method.lstrip("/")

    def start(request, context):
        parent = extract(dict(context.invocation_metadata() or ()))
        attributes = {"rpc.system": "grpc", "rpc.method": method}
        for field in ("batch_id", "file_id"):
            if (value := getattr(request, field, "")) and isinstance(value, str):
                attributes[field] = value
        return tracer.start_as_current_span(name, context=parent, kind=trace.SpanKind.SERVER,
                                            attributes=attributes)

    def finish(span, context, response=None) -> None:
        code = context.code()
        span.set_attribute("rpc.grpc.status_code", getattr(code, "name", "OK") if code is not None else "OK")
        batch = getattr(response, "batch", None)
        if batch is not None and getattr(batch, "id", ""):
            span.set_attribute("batch_id", batch.id)
            span.add_link(batch_span_context(batch.id))

    if inspect.isasyncgenfunction(inner):
        async def traced(request, context):
            with start(request if kind == "unary_stream" else None, context) as span:
                try:
                    async for item in inner(request, context):
                        yield item
                finally:
                    finish(span, context)
    else:
        async def traced(request, context):
            with start(request if kind == "unary_unary" else None, context) as span:
                response = None
                try:
                    response = await inner(request, context)
                    return response
                finally:
                    finish(span, context, response)
    return handler._replace(**{kind: traced})
