"""A webhook receiver on loopback (aiohttp) that answers as told: for the next requests a plan of
"ok" (204), "500" or "hang" (no answer until it stops), then "ok". It can stop and start again on
the same port, as a restarting receiver does.

    receiver = WebhookReceiver(plan=["500", "hang"])
    url = await receiver.start()      # http://127.0.0.1:PORT/hook
    await receiver.wait_for(2)        # until two requests arrived
    receiver.received[0].headers["webhook-id"]
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    answer: str


class WebhookReceiver:
    def __init__(self, plan: Sequence[str] = (), port: int = 0) -> None:
        self.plan = list(plan)
        self.port = port
        self.received: list[Received] = []
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._stopping = asyncio.Event()
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self.url

    async def stop(self) -> None:
        self._stopping.set()  # hanging answers end (the connection drops)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait_for(self, count: int, timeout: float = 30.0) -> list[Received]:
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: len(self.received) >= count), timeout)
        return self.received

    async def _hook(self, request: web.Request) -> web.StreamResponse:
        answer = self.plan.pop(0) if self.plan else "ok"
        body = await request.read()
        async with self._arrived:
            self.received.append(Received({k.lower(): v for k, v in request.headers.items()}, body, answer))
            self._arrived.notify_all()
        if answer == "hang":
            await self._stopping.wait()
            raise ConnectionResetError("receiver stopped")
        if answer == "500":
            return web.Response(status=500, text="receiver broke")
        return web.Response(status=204)
