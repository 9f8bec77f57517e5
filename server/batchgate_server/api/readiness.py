"""Calls wait for start-up to finish: the port opens first, so the health service can say
NOT_SERVING while unfinished batches are adopted, and every call of our services waits (within
its deadline) until they are: before adoption CancelBatch would call a running batch ended, and
DeleteFile could remove a running batch's input. Waiting rather than refusing keeps clients that
only wait for the channel to connect working as before. Health and reflection are not gated: they
tell the truth about start-up.

The gate wraps each handler once, at registration (api/undecodable.py SoftDecoding): a grpc.aio
interceptor would run an extra coroutine and handler lookup on every call, the gate costs one
attribute read (bench/grpc_metrics.py compares the two).
"""

from __future__ import annotations

import asyncio
import inspect

import grpc


class ReadinessGate:
    def __init__(self) -> None:
        self.ready = False
        self._opened = asyncio.Event()

    def open(self) -> None:
        self.ready = True
        self._opened.set()

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        gate = self
        kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
                    if getattr(handler, k) is not None)
        inner = getattr(handler, kind)
        if inspect.isasyncgenfunction(inner):
            async def gated(request, context):
                if not gate.ready:
                    await gate._opened.wait()
                async for response in inner(request, context):
                    yield response
        else:
            async def gated(request, context):
                if not gate.ready:
                    await gate._opened.wait()
                return await inner(request, context)
        return handler._replace(**{kind: gated})
