"""The aiohttp application serving /v1/files and /v1/batches, started and stopped with the gRPC
server. aiohttp (already a dependency) rather than Starlette on uvicorn, by bench/http_api.py: bare,
aiohttp answered 50 concurrent GETs faster in 4 runs of 5, and its MultipartReader streams the file
part as it arrives at 200–670 MB/s (python-multipart's parser did 260–690), several times what a
validated upload consumes (100–160 MB/s); Starlette's request.form() spools the file to disk first."""

from __future__ import annotations

from aiohttp import web

from batchgate_server.api.http.batches import BatchRoutes
from batchgate_server.api.http.errors import openai_errors
from batchgate_server.api.http.files import FileRoutes
from batchgate_server.core.auth import Authenticator
from batchgate_server.core.batches import BatchManager
from batchgate_server.core.files import FileManager


def build_app(auth: Authenticator, files: FileManager, batches: BatchManager,
              heartbeat_interval: float) -> web.Application:
    app = web.Application(middlewares=[openai_errors])
    FileRoutes(auth, files).add_to(app.router)
    batch_routes = BatchRoutes(auth, batches, heartbeat_interval)
    batch_routes.add_to(app.router)
    app.on_shutdown.append(batch_routes.close_watches)  # before in-flight requests get their grace period
    return app


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


class HttpServer:
    def __init__(self, app: web.Application, grace_period: float) -> None:
        # shutdown_timeout: how long in-flight requests (an upload, an SSE watch) may finish on stop.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=grace_period)
        self.port = 0

    async def start(self, address: str) -> int:
        host, port = split_address(address)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError as err:  # as the gRPC side says it: the address, not a traceback into asyncio
            await self._runner.cleanup()
            raise RuntimeError(f"could not listen on {address} (HTTP): {err.strerror}") from None
        self.port = self.addresses[0][1]
        return self.port

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every socket listening."""
        return [address[:2] for address in self._runner.addresses]

    async def stop(self) -> None:
        await self._runner.cleanup()
