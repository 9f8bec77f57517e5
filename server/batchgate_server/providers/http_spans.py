"""A span per outgoing provider HTTP call, made at the two shared client seams (httpx in
openai_batch/client.py for the remote batch APIs, pyreqwest in executor/transport.py). A no-op
until a tracer provider is installed (observability/tracing.py); inside a batch's runner the span
joins that batch's trace."""

from __future__ import annotations

from opentelemetry import trace

tracer = trace.get_tracer("batchgate.providers")


def client_span(method: str, path: str, peer: str):
    """`with client_span(...) as span:` around one HTTP exchange; set the status on `span`."""
    return tracer.start_as_current_span(f"{method} {path}", kind=trace.SpanKind.CLIENT, attributes={
        "http.request.method": method, "url.path": path, "server.address": peer})


def tracing_on() -> bool:
    """Whether a tracer provider is installed: a hot path skips building no-op spans without one."""
    return not isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider))
