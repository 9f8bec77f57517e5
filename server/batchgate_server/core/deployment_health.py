"""Per-deployment health: one cheap provider call (a models list) per deployment on a schedule.

Each probe is bounded by a timeout; a failing deployment is probed less and less often (doubling
up to PROBE_BACKOFF_CAP intervals) so an outage costs the provider almost nothing. Deployments
their provider cannot probe (`simulated`) are left out. Every change of a deployment's health is
logged and reported to `on_change` (app.py feeds the health service and the metrics).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from batchgate_server.domain import log_context
from batchgate_server.domain.backoff import Backoff
from batchgate_server.domain.deployment import Deployment
from batchgate_server.providers.base import ProviderError, UnsupportedRequest
from batchgate_server.providers.registry import ProviderRegistry

log = logging.getLogger(__name__)

PROBE_BACKOFF_CAP = 8  # a failing deployment is probed at least every 8 intervals


class DeploymentHealth:
    def __init__(self, deployments: Iterable[Deployment], providers: ProviderRegistry, *, interval: float,
                 timeout: float = 10.0, on_change: Callable[[Deployment, bool], Awaitable[None]] | None = None) -> None:
        self._deployments = list(deployments)
        self._providers = providers
        self.interval = interval
        self.timeout = timeout
        self._on_change = on_change
        self.healthy: dict[str, bool] = {}  # deployment id -> its last probe's verdict
        self._tasks: list[asyncio.Task] = []

    def probed(self) -> list[Deployment]:
        """The deployments whose provider can probe them."""
        found = []
        for d in self._deployments:
            try:
                if self._providers.get(d.provider).probes(d):
                    found.append(d)
            except UnsupportedRequest:
                pass
        return found

    def start(self) -> None:
        if self.interval <= 0:
            return
        self._tasks = [asyncio.create_task(self._watch(d), name=f"probe-{d.id}") for d in self.probed()]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def probe_once(self, deployment: Deployment) -> bool:
        provider = self._providers.get(deployment.provider)
        try:
            await asyncio.wait_for(provider.probe(deployment), self.timeout)
        except ProviderError as err:
            await self._record(deployment, False, err.message)
            return False
        except asyncio.TimeoutError:
            await self._record(deployment, False, f"no answer within {self.timeout:g}s")
            return False
        await self._record(deployment, True, "")
        return True

    async def _record(self, deployment: Deployment, ok: bool, why: str) -> None:
        if self.healthy.get(deployment.id) is ok:
            return
        self.healthy[deployment.id] = ok
        if ok:
            log.info("deployment %s: healthy", deployment.id)
        else:
            log.warning("deployment %s: unhealthy: %s", deployment.id, why)
        if self._on_change is not None:
            await self._on_change(deployment, ok)

    async def _watch(self, deployment: Deployment) -> None:
        log_context.bind(deployment=deployment.id)
        backoff = Backoff(base=self.interval, cap=self.interval * PROBE_BACKOFF_CAP)
        while True:
            try:
                ok = await self.probe_once(deployment)
            except Exception:  # a bug in one probe must not end the others, nor the server
                log.exception("deployment %s: probe failed", deployment.id)
                ok = False
            if ok:
                backoff.reset()
                await asyncio.sleep(self.interval)
            else:
                await asyncio.sleep(max(self.interval, backoff.next()))
