"""Decorators every servicer method goes through: authenticate the caller, run the
handler, and turn domain errors into rich gRPC statuses."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from batchgate_server.api.errors import abort_with
from batchgate_server.core.auth import Authenticator, Principal
from batchgate_server.core.errors import ApiError, StorageError, from_storage

log = logging.getLogger(__name__)

S = TypeVar("S")


class Servicer:
    auth: Authenticator


def unary(handler: Callable[[Any, Any, grpc.aio.ServicerContext, Principal], Awaitable[Any]]):
    @functools.wraps(handler)
    async def wrapper(self: Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            principal = await self.auth.authenticate(context.invocation_metadata())
            return await handler(self, request, context, principal)
        except ApiError as err:
            await abort_with(context, err)
        except StorageError as err:
            await abort_with_storage_error(context, err)

    return wrapper


def server_stream(handler: Callable[[Any, Any, grpc.aio.ServicerContext, Principal], AsyncIterator[Any]]):
    @functools.wraps(handler)
    async def wrapper(self: Servicer, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            principal = await self.auth.authenticate(context.invocation_metadata())
            async for item in handler(self, request, context, principal):
                yield item
        except ApiError as err:
            await abort_with(context, err)
        except StorageError as err:
            await abort_with_storage_error(context, err)

    return wrapper


async def abort_with_storage_error(context: grpc.aio.ServicerContext, err: StorageError) -> None:
    """A full or unavailable store as the status a caller can act on; anything else stays a bug."""
    mapped = from_storage(err)
    if mapped is None:
        raise err
    await abort_with(context, mapped)
