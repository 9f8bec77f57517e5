"""Token buckets for requests-per-minute and tokens-per-minute limits.

A bucket holds one second's worth of its per-minute budget, so a batch cannot
spend a whole minute's quota in its first instant. A request larger than the
bucket waits for a full bucket and then leaves a debt, which later requests pay
off by waiting: the long-run rate stays at the limit.
"""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    def __init__(self, per_minute: float, clock=time.monotonic, burst_seconds: float = 1.0) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_seconds)
        self.tokens = self.capacity
        self._clock = clock
        self._stamp = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.capacity, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def take(self, amount: float = 1.0) -> None:
        needed = min(amount, self.capacity)
        async with self._lock:
            while True:
                self._refill()
                if self.tokens >= needed:
                    self.tokens -= amount  # may go below zero: a debt
                    return
                await asyncio.sleep((needed - self.tokens) / self.rate)

    def refund(self, amount: float) -> None:
        """Settle an estimate once the real count is known (negative: charge more)."""
        self._refill()
        self.tokens = min(self.capacity, self.tokens + amount)


class RateLimiter:
    def __init__(self, rpm: float | None, tpm: float | None, clock=time.monotonic) -> None:
        self.requests = TokenBucket(rpm) if rpm else None
        self.tokens = TokenBucket(tpm) if tpm else None
        self._clock = clock
        self._paused_until = 0.0

    def pause(self, seconds: float) -> None:
        """The upstream said Retry-After: hold every request to it, not just the one refused."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    async def acquire(self, estimated_tokens: int) -> None:
        while (wait := self._paused_until - self._clock()) > 0:
            await asyncio.sleep(wait)
        if self.requests is not None:
            await self.requests.take(1)
        if self.tokens is not None:
            await self.tokens.take(estimated_tokens)

    def settle(self, estimated_tokens: int, actual_tokens: int | None) -> None:
        if self.tokens is not None and actual_tokens is not None:
            self.tokens.refund(estimated_tokens - actual_tokens)
