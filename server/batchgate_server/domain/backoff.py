"""Exponential backoff with equal jitter (a delay drawn from the upper half of the current
step), honouring a server's Retry-After."""

from __future__ import annotations

import random


def jittered_delay(attempt: int, base: float, cap: float, retry_after: float | None = None,
                   rng: random.Random | random.SystemRandom | None = None) -> float:
    """Delay before retry number `attempt + 1` (attempt counts from 0): uniform in
    [step/2, step] with step = min(cap, base * 2**attempt); never shorter than retry_after."""
    step = min(cap, base * (2 ** attempt))
    delay = (rng or random).uniform(step / 2, step)
    return delay if retry_after is None else max(delay, retry_after)


class Backoff:
    """jittered_delay with the attempt counted for you: next() after each failure, reset() after
    a success."""

    def __init__(self, base: float = 1.0, cap: float = 300.0, rng: random.Random | None = None) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self, retry_after: float | None = None) -> float:
        delay = jittered_delay(self.attempt, self.base, self.cap, retry_after, self._rng)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
