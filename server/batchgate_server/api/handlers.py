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
from batchgate_server.core.errors import ApiError, StorageUnavailable, storage_unavailable

log = logging.getLogger(__name__)

S = TypeVar("S")


class Servicer:
    auth: Authenticator


async def _unavailable(context: grpc.aio.ServicerContext, err: StorageUnavailable) -> None:
    """The database went away under the call (a restart, a failover, no connection left): UNAVAILABLE
    with RetryInfo, which clients retry, rather than UNKNOWN."""
    log.warning("storage unavailable: %s", err)
    await abort_with(context, storage_unavailable())


def unary(handler: Callable[[Any, Any, grpc.aio.ServicerContext, Principal], Awaitable[Any]]):
    @functools.wraps(handler)
    async def wrapper(self: Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            principal = await self.auth.authenticate(context.invocation_metadata())
            return await handler(self, request, context, principal)
        except ApiError as err:
            await abort_with(context, err)
        except StorageUnavailable as err:
            await _unavailable(context, err)

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
        except StorageUnavailable as err:
            await _unavailable(context, err)

    return wrapper
