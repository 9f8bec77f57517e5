"""Prometheus metrics on their own HTTP listener (--metrics-address, off by default).

Every metric is defined in METRICS below with its help text; the README's table is generated
from it (`python -m batchgate_server.observability.metrics`), so the two cannot drift. Each
server owns a registry of its own (tests run several servers in one process).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from batchgate_server.core.events import BatchEvents
from batchgate_server.domain.models import STATUS_TIMESTAMP, BatchRecord, BatchStatus
from batchgate_server.providers.base import RequestEvents

# RPC latencies span a GetBatch (~100 µs) to a long upload; WatchBatch streams are not timed.
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Batches sit in a state for seconds (simulated) to a day (a provider's 24 h window).
STATE_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600, 48 * 3600)
TOKEN_KINDS = ("input", "cached", "output", "reasoning", "cache_creation", "cache_creation_1h")


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: type  # Counter, Gauge, Histogram or GaugeMetricFamily (computed at scrape time)
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def exposed(self) -> str:
        return self.name + ("_total" if self.kind is Counter else "")


METRICS = (
    MetricDef("batchgate_grpc_call_duration_seconds", Histogram,
              "gRPC calls by method and status code, and how long they took (its _count counts calls;"
              " server streams are counted once they end)", ("method", "code"), RPC_BUCKETS),
    MetricDef("batchgate_grpc_streams_open", Gauge,
              "Streams open now, by method (WatchBatch watchers, UploadFile uploads)", ("method",)),
    MetricDef("batchgate_http_request_duration_seconds", Histogram,
              "Requests to the OpenAI-compatible HTTP API (--http-address) by method, route template and"
              " status, and how long they took (SSE watches are counted once they end)",
              ("method", "route", "status"), RPC_BUCKETS),
    MetricDef("batchgate_grpc_errors", Counter,
              "Failed gRPC calls by method, code and ErrorInfo reason (INVALID_BATCH_FILE, FILE_NOT_FOUND,"
              " TOO_MANY_UPLOADS, …): UploadFile's are the validation rejects", ("method", "code", "reason")),
    MetricDef("batchgate_upload_bytes", Counter,
              "Bytes of files accepted by UploadFile", ()),
    MetricDef("batchgate_batches", Gauge,
              "Unfinished batches this server drives, by status and provider", ("status", "provider")),
    MetricDef("batchgate_batch_transitions", Counter,
              "Batch status changes, by the status left, the status entered and the provider",
              ("from_status", "to_status", "provider")),
    MetricDef("batchgate_batch_state_duration_seconds", Histogram,
              "Time a batch spent in a status, observed when it leaves it", ("status", "provider"),
              STATE_BUCKETS),
    MetricDef("batchgate_tracker_lag_seconds", GaugeMetricFamily,
              "Longest time since an owned batch was last polled at its provider, by provider"
              " (batches not polled yet count from their adoption)", ("provider",)),
    MetricDef("batchgate_deployment_cooldown", GaugeMetricFamily,
              "1 while a deployment is cooling down after repeated failures (routing skips it), else 0",
              ("deployment",)),
    MetricDef("batchgate_deployment_queued_requests", GaugeMetricFamily,
              "Requests of unfinished batches routed to a deployment", ("deployment",)),
    MetricDef("batchgate_deployment_up", Gauge,
              "1 while a deployment's last health probe (a models list) succeeded, 0 after a failed one;"
              " deployments that are not probed (simulated, or --deployment-health-interval 0) are absent",
              ("deployment", "provider")),
    MetricDef("batchgate_upstream_requests_sent", Counter,
              "Requests sent for a deployment's batches, each attempt (a retry is sent again): the executor's"
              " upstream requests, and every HTTP call to a remote provider (OpenAI, Azure, Anthropic, Vertex AI"
              " and Bedrock creates, polls, uploads, downloads, cancels; Bedrock's S3 calls too, Vertex AI's GCS"
              " calls not), health probes aside",
              ("deployment",)),
    MetricDef("batchgate_upstream_responses", Counter,
              "Sent requests that ended, by outcome: ok, or the error code (http_429, http_500,"
              " connection_error, request_timeout, …)", ("deployment", "outcome")),
    MetricDef("batchgate_upstream_requests_in_flight", Gauge,
              "Requests sent for a deployment's batches and not answered yet", ("deployment",)),
    MetricDef("batchgate_upstream_retries", Counter,
              "Failed attempts that will be sent again, by error code", ("deployment", "code")),
    MetricDef("batchgate_rate_limit_wait_seconds", Histogram,
              "Time a request waited for its deployment's rpm/tpm limits or a 429's pause (waits over 1 ms):"
              " the executor's, and a remote provider's call waiting to be sent again after a 429",
              ("deployment",), (0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300)),
    MetricDef("batchgate_tokens", Counter,
              "Tokens billed, from the usage ledger (counted once, when the row is committed), by model,"
              " provider, project and kind (input, cached, output, reasoning, cache_creation, cache_creation_1h)",
              ("model", "provider", "project", "kind")),
    MetricDef("batchgate_cost_usd", Counter,
              "Known cost in USD, from the usage ledger (counted once, when the row is committed)",
              ("model", "provider", "project")),
    MetricDef("batchgate_batches_ended", Counter,
              "Batches that reached an end (completed, failed, expired, cancelled), counted at that transition",
              ("status", "provider", "project")),
)


def metric_table() -> str:
    """The README's table of metrics, in Markdown."""
    rows = ["| Metric | Type | Labels | Meaning |", "| --- | --- | --- | --- |"]
    kinds = {Counter: "counter", Gauge: "gauge", Histogram: "histogram", GaugeMetricFamily: "gauge"}
    for m in METRICS:
        rows.append(f"| `{m.exposed}` | {kinds[m.kind]} | {', '.join(f'`{x}`' for x in m.labels)} | {m.help} |")
    return "\n".join(rows)


def _entered_at(rec: BatchRecord) -> float:
    stamp = STATUS_TIMESTAMP.get(rec.status)
    return (getattr(rec, stamp) if stamp else None) or rec.created_at


class Metrics(BatchEvents):
    """The registry, the batch hooks (core/events.py), and what the gRPC wrapper and the HTTP
    middleware record into."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        made = {}
        for m in METRICS:
            if m.kind is GaugeMetricFamily:
                continue
            extra = {"buckets": m.buckets} if m.buckets else {}
            made[m.name] = m.kind(m.name, m.help, m.labels, registry=self.registry, **extra)
        self.rpc_seconds: Histogram = made["batchgate_grpc_call_duration_seconds"]
        self.streams_open: Gauge = made["batchgate_grpc_streams_open"]
        self.batches: Gauge = made["batchgate_batches"]
        self.transitions: Counter = made["batchgate_batch_transitions"]
        self.state_seconds: Histogram = made["batchgate_batch_state_duration_seconds"]
        self.tokens: Counter = made["batchgate_tokens"]
        self.cost: Counter = made["batchgate_cost_usd"]
        self.ended: Counter = made["batchgate_batches_ended"]
        self.deployment_up: Gauge = made["batchgate_deployment_up"]
        self.grpc_errors: Counter = made["batchgate_grpc_errors"]
        self.http_seconds: Histogram = made["batchgate_http_request_duration_seconds"]
        self.upload_bytes: Counter = made["batchgate_upload_bytes"]
        self.requests = UpstreamRequestMetrics(made)
        self._sources: list[Callable[[], Iterable[GaugeMetricFamily]]] = []
        self._adopted_at: dict[str, float] = {}  # batch id -> time.monotonic() of its adoption
        self.registry.register(self)

    # -- scrape-time gauges -----------------------------------------------------------------

    def watch(self, tracker: Any, router: Any, deployment_ids: Iterable[str]) -> None:
        """Read the tracker's last polls and the router's cooldowns and queues at every scrape."""
        ids = sorted(deployment_ids)
        adopted = self._adopted_at

        def gauges() -> Iterable[GaugeMetricFamily]:
            now = time.monotonic()
            lag = GaugeMetricFamily(*self._def("batchgate_tracker_lag_seconds"))
            worst: dict[str, float] = {}
            for rec, polled in tracker.last_polls():
                since = now - (polled if polled is not None else adopted.get(rec.id, now))
                worst[rec.provider] = max(worst.get(rec.provider, 0.0), since)
            for provider, seconds in sorted(worst.items()):
                lag.add_metric([provider], seconds)
            cooldown = GaugeMetricFamily(*self._def("batchgate_deployment_cooldown"))
            queued = GaugeMetricFamily(*self._def("batchgate_deployment_queued_requests"))
            for deployment_id in ids:
                cooldown.add_metric([deployment_id], 1.0 if router.cooling_down(deployment_id) else 0.0)
                queued.add_metric([deployment_id], router.queued(deployment_id))
            return (lag, cooldown, queued)

        self._sources.append(gauges)

    @staticmethod
    def _def(name: str) -> tuple[str, str, None, tuple[str, ...]]:
        m = next(m for m in METRICS if m.name == name)
        return m.name, m.help, None, m.labels

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for source in self._sources:
            yield from source()

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return ()

    def grpc_wrapper(self):
        """The handler wrapper (api/undecodable.py SoftDecoding) that times calls into these metrics."""
        return GrpcMetrics(self).wrap

    def http_middleware(self):
        """An aiohttp middleware timing the HTTP API's requests; put first, it sees the status the
        error middleware has made of an error. Routes are their templates (/v1/batches/{batch_id}),
        so the label set stays bounded whatever ids are asked for."""
        from aiohttp import web

        seconds = self.http_seconds

        @web.middleware
        async def timed(request, handler):
            started, status = time.perf_counter(), 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as err:
                status = err.status
                raise
            finally:
                resource = request.match_info.route.resource
                route = resource.canonical if resource is not None else "unmatched"
                seconds.labels(request.method, route, str(status)).observe(time.perf_counter() - started)

        return timed

    def scrape(self) -> bytes:
        return generate_latest(self.registry)

    # -- batch hooks (core/events.py) ------------------------------------------------------------

    def adopted(self, rec: BatchRecord) -> None:
        self.batches.labels(rec.status.value, rec.provider).inc()
        self._adopted_at[rec.id] = time.monotonic()

    def changed(self, before: BatchRecord, after: BatchRecord, ledger: dict[str, Any] | None) -> None:
        if before.status is not after.status:
            provider = after.provider
            self.transitions.labels(before.status.value, after.status.value, provider).inc()
            self.state_seconds.labels(before.status.value, provider).observe(
                max(0.0, _entered_at(after) - _entered_at(before)))
            self.batches.labels(before.status.value, provider).dec()
            if not after.status.is_terminal:
                self.batches.labels(after.status.value, provider).inc()
        if ledger is not None:
            self._count_ledger_row(ledger)
        if after.status.is_terminal and not before.status.is_terminal:
            # Once per batch: a sharded batch's shards are not batches (core/events.py ParentsOnly).
            self.ended.labels(after.status.value, after.provider, after.project).inc()

    def released(self, rec: BatchRecord) -> None:
        if not rec.status.is_terminal:  # stopping: the batch leaves this server unfinished
            self.batches.labels(rec.status.value, rec.provider).dec()
        self._adopted_at.pop(rec.id, None)

    def _count_ledger_row(self, row: dict[str, Any]) -> None:
        # The row's own transaction has committed (core/events.py): each row is counted once.
        model, provider, project = row["model"], row["provider"], row["project"]
        for kind in TOKEN_KINDS:
            if tokens := row.get(f"{kind}_tokens") or 0:
                self.tokens.labels(model, provider, project, kind).inc(tokens)
        if row.get("cost_nanos"):
            self.cost.labels(model, provider, project).inc(row["cost_nanos"] / 1e9)


class UpstreamRequestMetrics(RequestEvents):
    """The providers' request hooks (providers/base.py RequestEvents). The executor calls these for
    every request, thousands a second: label children are cached per deployment. Remote providers'
    clients call them too, Bedrock's from boto3's worker threads (prometheus_client is thread-safe)."""

    def __init__(self, made: dict[str, Any]) -> None:
        self._sent_metric = made["batchgate_upstream_requests_sent"]
        self._responses = made["batchgate_upstream_responses"]
        self._in_flight_metric = made["batchgate_upstream_requests_in_flight"]
        self._retries = made["batchgate_upstream_retries"]
        self._waits = made["batchgate_rate_limit_wait_seconds"]
        self._sent: dict[str, Any] = {}
        self._in_flight: dict[str, Any] = {}
        self._outcomes: dict[tuple[str, str], Any] = {}

    def sent(self, deployment_id: str) -> None:
        sent = self._sent.get(deployment_id)
        if sent is None:  # in-flight first: another thread may find `sent` and then look it up
            self._in_flight[deployment_id] = self._in_flight_metric.labels(deployment_id)
            sent = self._sent[deployment_id] = self._sent_metric.labels(deployment_id)
        sent.inc()
        self._in_flight[deployment_id].inc()

    def answered(self, deployment_id: str, outcome: str) -> None:
        child = self._outcomes.get((deployment_id, outcome))
        if child is None:
            child = self._outcomes[(deployment_id, outcome)] = self._responses.labels(deployment_id, outcome)
        child.inc()
        self._in_flight[deployment_id].dec()

    def retried(self, deployment_id: str, code: str) -> None:
        self._retries.labels(deployment_id, code).inc()

    def rate_limited(self, deployment_id: str, seconds: float) -> None:
        self._waits.labels(deployment_id).observe(seconds)


class GrpcMetrics:
    """Times every call by method and status code, and counts open streams.

    A handler wrapper applied once at registration (api/undecodable.py SoftDecoding), not a
    grpc.aio interceptor, which would add a coroutine and a handler lookup to every call
    (bench/grpc_metrics.py compares them). Label children are cached per (method, code): a call pays two clock
    reads, a dict lookup and a histogram observe."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics
        self._children: dict[tuple[str, str], Any] = {}

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return self._wrap(method, handler)

    def _observe(self, method: str, context, started: float, failed: bool) -> None:
        code = context.code()
        name = code.name if isinstance(code, grpc.StatusCode) else ("UNKNOWN" if failed else "OK")
        if name != "OK":
            self._m.grpc_errors.labels(method, name, _error_reason(context)).inc()
        child = self._children.get((method, name))
        if child is None:
            child = self._children[(method, name)] = self._m.rpc_seconds.labels(method, name)
        child.observe(time.perf_counter() - started)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        observe = self._observe
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                started, failed = time.perf_counter(), True
                try:
                    response = await inner(request, context)
                    failed = False
                    return response
                finally:
                    observe(method, context, started, failed)

            return handler._replace(unary_unary=unary_unary)
        streams = self._m.streams_open.labels(method)
        kind = ("unary_stream" if handler.unary_stream is not None else
                "stream_unary" if handler.stream_unary is not None else "stream_stream")
        inner = getattr(handler, kind)
        count_upload, upload_bytes = method == UPLOAD_METHOD, self._m.upload_bytes
        if inspect.isasyncgenfunction(inner):
            async def behaviour(request, context):
                started, failed = time.perf_counter(), True
                streams.inc()
                try:
                    async for item in inner(request, context):
                        yield item
                    failed = False
                finally:
                    streams.dec()
                    observe(method, context, started, failed)
        else:
            async def behaviour(request, context):
                started, failed = time.perf_counter(), True
                streams.inc()
                try:
                    response = await inner(request, context)
                    failed = False
                    if count_upload:
                        upload_bytes.inc(response.file.bytes)
                    return response
                finally:
                    streams.dec()
                    observe(method, context, started, failed)
        return handler._replace(**{kind: behaviour})


UPLOAD_METHOD = "/batchgate.v1.FileService/UploadFile"


def _error_reason(context) -> str:
    """The ErrorInfo reason of a failed call (api/errors.py puts one in every error), "" if none."""
    from google.rpc import error_details_pb2, status_pb2

    for key, value in context.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info.reason
    return ""


class MetricsServer:
    """/metrics on its own aiohttp listener, apart from the API ports."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._runner = None
        self.port = 0

    async def start(self, address: str) -> int:
        from aiohttp import web

        async def scrape(request: web.Request) -> web.Response:
            return web.Response(body=self._metrics.scrape(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", scrape)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        host, _, port = address.rpartition(":")
        site = web.TCPSite(self._runner, host.strip("[]") or None, int(port))
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


if __name__ == "__main__":
    print(metric_table())
