"""Calls wait for start-up to finish: the port opens first, so the health service can say
NOT_SERVING while unfinished batches are adopted, and every other call is answered UNAVAILABLE
(retryable) until then: before adoption CancelBatch would call a running batch ended, and
DeleteFile could remove a running batch's input."""

from __future__ import annotations

import grpc

from batchgate_server.api.errors import abort_with
from batchgate_server.core.errors import Unavailable

# Health and reflection answer during start-up: they tell the truth about it.
ALWAYS_SERVED = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def starting() -> Unavailable:
    return Unavailable("batchgate is starting: adopting unfinished batches; retry shortly", "SERVER_STARTING")


class ReadinessGate(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self.ready = False

    async def intercept_service(self, continuation, details):
        if self.ready or details.method.startswith(ALWAYS_SERVED):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        return _refusing(handler)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def refuse(request, context):
        await abort_with(context, starting())

    async def refuse_stream(request, context):
        await abort_with(context, starting())
        yield  # an async generator, as streaming handlers are

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, handler.request_deserializer,
                                                   handler.response_serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, handler.request_deserializer,
                                                    handler.response_serializer)
    make = grpc.unary_stream_rpc_method_handler if handler.unary_stream is not None else \
        grpc.stream_stream_rpc_method_handler
    return make(refuse_stream, handler.request_deserializer, handler.response_serializer)
