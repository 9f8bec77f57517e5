"""Request messages that do not decode: INVALID_ARGUMENT with an ErrorInfo, like any bad input.

gRPC decodes every request message before a servicer sees it, and a message that is not valid
protobuf (a corrupt wire format, or bad UTF-8 in a string field, which any client without a
strict protobuf library can send) would surface as UNKNOWN "Unexpected DecodeError". Our
services register through `SoftDecoding`, which lets decoding fail softly into an
`Undecodable`: a unary request is answered MALFORMED_REQUEST before the servicer runs; in a
client stream (UploadFile) the bad message raises where it arrives, so the servicer aborts the
upload as it does for any bad input. Handlers are replaced once, at registration, so calls pay
nothing for it (an interceptor would run on every call).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from batchgate_server.api.errors import abort_with
from batchgate_server.core.errors import FieldViolation, InvalidArgument

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


class SoftDecoding:
    """Stands in for the server while a service registers (a generated add_*_to_server function,
    which hands the same handlers to add_generic_rpc_handlers and add_registered_method_handlers):
    registers their soft-decoding versions both ways on the real server."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, generic_handlers) -> None:
        pass  # the same handlers come next, as a dict, through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        soft = {name: _soft_handler(f"/{service}/{name}", handler) for name, handler in handlers.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, soft),))
        self._server.add_registered_method_handlers(service, soft)
