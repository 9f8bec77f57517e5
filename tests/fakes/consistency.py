"""Eventual consistency and in-flight creates, shared by the provider fakes.

Real control planes are eventually consistent: a job just created may be missing from the listing
for a while, and a GET by its id may answer 404 for a moment. `Lag` holds those two delays (set
them on a running fake; they apply to every job by its creation time).

`CreateGate` lets a crash test kill the server *during* a create call: while held, a create is
carried out at once (the job exists, as at a real provider that received the request) but its
answer waits until `release()`; `arrived(n)` returns once n creates have come in.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

HOLD_LIMIT = 60.0  # a held create answers after this long even if nobody releases it


@dataclasses.dataclass
class Lag:
    listing: float = 0.0  # seconds after its create before a job shows in the listing
    get: float = 0.0  # seconds after its create during which GET (and cancel/stop) of the job answer 404
    not_found: int = 0  # 404s answered for jobs that exist

    def listed(self, created: float) -> bool:
        return time.time() - created >= self.listing

    def found(self, created: float) -> bool:
        if time.time() - created >= self.get:
            return True
        self.not_found += 1
        return False

    def reset(self) -> None:
        self.listing = self.get = 0.0
        self.not_found = 0


class CreateGate:
    def __init__(self) -> None:
        self.creates = 0  # create requests received
        self._open = asyncio.Event()
        self._open.set()
        self._arrival = asyncio.Event()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    async def passed(self) -> None:
        """Called by a create handler after it created the job, before it answers."""
        self.creates += 1
        self._arrival.set()
        try:
            await asyncio.wait_for(self._open.wait(), HOLD_LIMIT)
        except asyncio.TimeoutError:
            pass

    async def arrived(self, n: int, timeout: float = 60.0) -> None:
        """Return once `n` creates have come in (in total since this gate was made)."""
        async def wait() -> None:
            while self.creates < n:
                self._arrival.clear()
                await self._arrival.wait()
        await asyncio.wait_for(wait(), timeout)
