"""Request messages that do not decode: INVALID_ARGUMENT with an ErrorInfo, like any bad input.

gRPC decodes every request message before a servicer sees it, and a message that is not valid
protobuf (a corrupt wire format, or bad UTF-8 in a string field, which any client without a
strict protobuf library can send) would surface as UNKNOWN "Unexpected DecodeError". This
interceptor lets decoding fail softly into an `Undecodable`: a unary request is answered
MALFORMED_REQUEST before the servicer runs; in a client stream (UploadFile) the bad message
raises where it arrives, so the servicer aborts the upload as it does for any bad input.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from batchgate_server.api.errors import abort_with
from batchgate_server.core.errors import FieldViolation, InvalidArgument

# Health and reflection keep gRPC's own handling: only our services answer with ErrorInfo.
OUR_SERVICES = "/batchgate.v1."


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request message that failed to decode."""

    method: str
    error: str  # the decoder's message: names the message type, never echoes the bytes

    def problem(self) -> InvalidArgument:
        return InvalidArgument(f"the request to {self.method} is not a valid protobuf message: {self.error}",
                               "MALFORMED_REQUEST", {"method": self.method},
                               [FieldViolation("request", self.error)])


def _soft_decoder(method: str, decode: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def soft_decode(data: bytes) -> Any:
        try:
            return decode(data)
        except DecodeError as err:
            return Undecodable(method, str(err))

    return soft_decode


def _unary_unary(behavior: Callable[[Any, Any], Awaitable[Any]]):
    async def checked(request, context):
        if isinstance(request, Undecodable):
            await abort_with(context, request.problem())
        return await behavior(request, context)

    return checked


def _unary_stream(behavior: Callable[[Any, Any], AsyncIterator[Any]]):
    async def checked(request, context):
        if isinstance(request, Undecodable):
            await abort_with(context, request.problem())
        async for response in behavior(request, context):
            yield response

    return checked


async def _decoded(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            raise request.problem()
        yield request


def _stream_unary(behavior: Callable[[AsyncIterator[Any], Any], Awaitable[Any]]):
    async def checked(request_iterator, context):
        return await behavior(_decoded(request_iterator), context)

    return checked


def _soft_handler(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    decoder = _soft_decoder(method, handler.request_deserializer)
    if handler.unary_unary is not None:
        return handler._replace(request_deserializer=decoder, unary_unary=_unary_unary(handler.unary_unary))
    if handler.unary_stream is not None:
        return handler._replace(request_deserializer=decoder, unary_stream=_unary_stream(handler.unary_stream))
    if handler.stream_unary is not None:
        return handler._replace(request_deserializer=decoder, stream_unary=_stream_unary(handler.stream_unary))
    return handler  # no bidirectional method in our services


class UndecodableRequests(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        # method -> (the servicer's handler, its soft-decoding version): built once per method.
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.request_deserializer is None or not method.startswith(OUR_SERVICES):
            return handler
        known = self._handlers.get(method)
        if known is None or known[0] is not handler:
            known = self._handlers[method] = (handler, _soft_handler(method, handler))
        return known[1]
