"""What the per-call wrappers cost: the readiness gate (always on) and the metrics wrapper
(--metrics-address), against the same server without them (the ceiling), all in one run; and, for
the record of why they are handler wrappers, a grpc.aio interceptor that does nothing at all. A
trivial unary handler (Health.Check) makes their own cost visible; client and server share this
process, so the figure is process CPU per call (steadier than wall time on a shared machine).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

import grpc  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402

from batchgate_server.api.readiness import ReadinessGate  # noqa: E402
from batchgate_server.api.undecodable import SoftDecoding  # noqa: E402
from batchgate_server.observability.metrics import GrpcMetrics, Metrics  # noqa: E402

CALLS = 4000
CONCURRENCY = 16
ROUNDS = 5


def ready_gate() -> ReadinessGate:
    gate = ReadinessGate()
    gate.open()
    return gate


class PassThrough(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details):
        return await continuation(details)


async def cpu_per_call(wrappers=(), interceptors=()) -> float:
    server = grpc.aio.server(interceptors=list(interceptors))
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, SoftDecoding(server, tuple(wrappers)))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest()

        async def worker(n: int) -> None:
            for _ in range(n):
                await stub.Check(request)

        await worker(200)  # warm up
        started = time.process_time()
        await asyncio.gather(*(worker(CALLS // CONCURRENCY) for _ in range(CONCURRENCY)))
        spent = time.process_time() - started
    await server.stop(0)
    return spent / CALLS * 1e6


class _Context:
    """What the wrappers read of a servicer context: the code (None: OK)."""

    def code(self):
        return None


async def wrapper_alone(wrap, calls: int = 200_000) -> float:
    """The wrappers without gRPC around them: ns a call spends in them (steady on a busy machine:
    one core, no I/O)."""
    async def handler(request, context):
        return request

    method = grpc.unary_unary_rpc_method_handler(handler)
    behaviour = wrap("/bench.Service/Method", method).unary_unary if wrap else handler
    context = _Context()
    started = time.process_time()
    for _ in range(calls):
        await behaviour(None, context)
    return (time.process_time() - started) / calls * 1e9


async def main() -> None:
    bare = min([await wrapper_alone(None) for _ in range(ROUNDS)])
    for name, wrap in (("readiness gate", ready_gate().wrap), ("metrics", GrpcMetrics(Metrics()).wrap)):
        spent = min([await wrapper_alone(wrap) for _ in range(ROUNDS)])
        print(f"{name} alone: +{spent - bare:.0f} ns per call over a bare handler call ({bare:.0f} ns)")
    configs = {"no wrapper (ceiling)": lambda: {},
               "readiness gate": lambda: {"wrappers": [ready_gate().wrap]},
               "gate + metrics": lambda: {"wrappers": [ready_gate().wrap, GrpcMetrics(Metrics()).wrap]},
               "an empty grpc.aio interceptor": lambda: {"interceptors": [PassThrough()]}}
    # Interleaved rounds, best of each: a shared machine's load drifts during a run.
    runs: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(ROUNDS):
        for name, make in configs.items():
            runs[name].append(await cpu_per_call(**make()))
    best = {name: min(values) for name, values in runs.items()}
    ceiling = best["no wrapper (ceiling)"]
    for name, us in best.items():
        print(f"{name}: {us:.0f} µs CPU per call (client and server), {us / ceiling:.2f}x the ceiling,"
              f" +{us - ceiling:.0f} µs")


if __name__ == "__main__":
    asyncio.run(main())
