"""Token buckets under a controlled clock."""

import asyncio

from batchgate_server.providers.executor.rate_limit import RateLimiter, TokenBucket


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


async def _take_all(bucket: TokenBucket, clock: Clock, n: int, amount: float = 1.0) -> float:
    """Takes n times, advancing the fake clock whenever the bucket makes us wait."""
    real_sleep = asyncio.sleep

    async def fake_sleep(seconds):
        clock.now += seconds
        await real_sleep(0)

    asyncio.sleep = fake_sleep
    try:
        for _ in range(n):
            await bucket.take(amount)
    finally:
        asyncio.sleep = real_sleep
    return clock.now


async def test_rpm_allows_one_second_of_burst_then_the_rate():
    clock = Clock()
    bucket = TokenBucket(120, clock=clock)  # 2 per second, burst 2
    elapsed = await _take_all(bucket, clock, 10)
    # 2 immediately, then 8 more at 2/s.
    assert 3.9 <= elapsed <= 4.1


async def test_oversized_request_leaves_a_debt():
    clock = Clock()
    bucket = TokenBucket(600, clock=clock)  # 10 tokens/s, capacity 10
    await _take_all(bucket, clock, 1, amount=50)  # waits for nothing (bucket full), leaves -40
    assert bucket.tokens == -40
    elapsed = await _take_all(bucket, clock, 1, amount=10)
    assert 4.9 <= elapsed <= 5.1  # pays 40 of debt + 10 at 10/s


async def test_settle_refunds_over_estimates():
    limiter = RateLimiter(rpm=None, tpm=6000)  # 100 tokens/s, capacity 100
    await limiter.acquire(80)
    assert limiter.tokens.tokens < 21
    limiter.settle(80, 10)
    assert limiter.tokens.tokens >= 89


async def test_retry_after_pauses_every_request_to_the_deployment():
    clock = Clock()
    limiter = RateLimiter(rpm=None, tpm=None, clock=clock)
    limiter.pause(3.0)
    limiter.pause(1.0)  # a shorter pause never shortens a longer one
    real_sleep = asyncio.sleep
    slept = []

    async def fake_sleep(seconds):
        slept.append(seconds)
        clock.now += seconds
        await real_sleep(0)

    asyncio.sleep = fake_sleep
    try:
        await asyncio.gather(limiter.acquire(10), limiter.acquire(10))
    finally:
        asyncio.sleep = real_sleep
    assert clock.now >= 3.0 and slept, "both callers waited out the pause"
