"""One outgoing provider HTTP call: its client span, and its counts by deployment.

The span is made at the shared client seams (httpx in openai_batch/client.py for OpenAI, Azure and
Anthropic, vertex/client.py for Vertex AI, the executor's in executor/transport.py); Bedrock's boto3
clients count through botocore's events (bedrock/client.py) with the same outcome codes. A span is
a no-op until a tracer provider is installed (observability/tracing.py); inside a batch's runner it
joins that batch's trace. The counts go to the deployment's RequestEvents (providers/base.py),
which the metrics implement; the executor counts its own requests where it sends them
(executor/run.py), next to its rate limiter.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from opentelemetry import trace

from batchgate_server.providers.base import DeploymentRequests

tracer = trace.get_tracer("batchgate.providers")


def client_span(method: str, path: str, peer: str):
    """`with client_span(...) as span:` around one HTTP exchange; set the status on `span`."""
    return tracer.start_as_current_span(f"{method} {path}", kind=trace.SpanKind.CLIENT, attributes={
        "http.request.method": method, "url.path": path, "server.address": peer})


def status_outcome(status: int) -> str:
    """A call's outcome for an HTTP answer: "ok", else the executor's code (http_429, http_500, …)."""
    return "ok" if status < 400 else f"http_{status}"


def failure_outcome(err: BaseException) -> str:
    """A call's outcome when no HTTP answer came (the executor's codes; any client library)."""
    if isinstance(err, asyncio.CancelledError):
        return "cancelled"
    if isinstance(err, TimeoutError) or "Timeout" in type(err).__name__:
        return "request_timeout"
    return "connection_error"


class Call:
    """What `provider_call` yields: the caller reports the HTTP status with `answered`."""

    __slots__ = ("span", "outcome")

    def __init__(self, span) -> None:
        self.span = span
        self.outcome = ""

    def answered(self, status: int) -> None:
        self.span.set_attribute("http.response.status_code", status)
        self.outcome = status_outcome(status)


@contextlib.contextmanager
def provider_call(method: str, path: str, peer: str, requests: DeploymentRequests | None) -> Iterator[Call]:
    """`with provider_call(...) as call:` around one HTTP exchange (an attempt: a retry is another
    call), `call.answered(status)` once the status is known. Counted as sent on entry and as
    answered by outcome on exit, when `requests` says whose call it is."""
    with client_span(method, path, peer) as span:
        call = Call(span)
        if requests is not None:
            requests.sent()
        try:
            yield call
        except BaseException as err:
            call.outcome = call.outcome or failure_outcome(err)
            raise
        finally:
            if requests is not None:
                requests.answered(call.outcome or "connection_error")


def retrying(requests: DeploymentRequests | None, outcome: str, delay: float) -> None:
    """A call that ended with `outcome` will be sent again after `delay` seconds: a retry, and,
    after a 429, a rate-limit wait."""
    if requests is None:
        return
    requests.retried(outcome)
    if outcome == "http_429":
        requests.rate_limited(delay)


def tracing_on() -> bool:
    """Whether a tracer provider is installed: a hot path skips building no-op spans without one."""
    return not isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider))
