"""What the executor knows about one deployment's upstream, shared by every batch running on it.

An outage: the upstream cannot be reached (connection refused or reset), or it answers 5xx/429 or
times out for several different requests in a row with no success in between. During an outage
requests wait instead of spending their retries; one request at a time goes out as a probe, with
backoff, and the first real answer (a success, or an error about the request such as a 400) ends
the outage for all. A single request failing on its own (its body makes the server answer 500
while other requests succeed) is no outage: it spends its own retries. The limit of telling the two
apart: when the only requests left are three or more that each get a 5xx of their own, they look
like an outage and wait (up to give_up_after) like one.

Failure streaks (failed attempts in a row, of any kind) are logged once when they start, every
`report_every` seconds while they last and once at recovery, never per request.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Iterable

from batchgate_server.domain.backoff import jittered_delay
from batchgate_server.providers.executor.failures import printable

log = logging.getLogger(__name__)

OUTAGE_AFTER_REQUESTS = 3  # different requests failing in a row
UNREACHABLE = {"connection_error"}  # one such failure is enough: nothing answered at all
STREAK_LOGGED_AFTER = 5  # failed attempts in a row before a streak is worth a log line


class UpstreamHealth:
    def __init__(self, name: str, *, backoff_base: float, backoff_cap: float, secrets: Iterable[str] = (),
                 report_every: float = 60.0, clock=time.monotonic) -> None:
        self.name = name
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.report_every = report_every
        self.secrets = tuple(secrets)  # masked in what is logged or reported
        self._clock = clock
        self.outage_since: float | None = None
        self._failing: set[str] = set()  # requests failing in the current streak (up to the threshold)
        self._streak = 0  # failed attempts since the last success
        self._streak_since = 0.0
        self._streak_codes: collections.Counter[str] = collections.Counter()
        self._last_error = ""
        self._next_report: float | None = None  # set once the streak has been logged
        self._probing = False
        self._failed_probes = 0
        self._next_probe = 0.0
        self._changed = asyncio.Event()

    # -- gate -----------------------------------------------------------------------------

    def outage_for(self) -> float:
        return 0.0 if self.outage_since is None else self._clock() - self.outage_since

    async def admit(self, give_up_after: float) -> bool:
        """Wait while the deployment is out. True: the caller goes as the probe and must call
        end_probe() once it has its answer. After `give_up_after` seconds of outage everyone goes
        (and gives up on its first failure)."""
        while self.outage_since is not None:
            now = self._clock()
            give_up_at = self.outage_since + give_up_after
            if now >= give_up_at:
                return False
            if not self._probing and now >= self._next_probe:
                self._probing = True
                return True
            wake_at = give_up_at if self._probing else min(self._next_probe, give_up_at)
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), wake_at - now)
            except asyncio.TimeoutError:
                pass
        return False

    def end_probe(self) -> None:
        self._probing = False
        self._changed.set()

    # -- reports --------------------------------------------------------------------------

    def succeeded(self) -> None:
        if self._streak:  # the hot path: one attribute test
            self._recover()

    def failed(self, custom_id: str, code: str, message: str, *, upstream_fault: bool, probe: bool) -> bool:
        """Count one failed attempt. upstream_fault: a failure that says nothing about the request
        (no answer, 5xx, 429, timeout); otherwise the upstream answered, so it is up. Returns whether
        the deployment is out: the attempt then costs the request none of its retries."""
        now = self._clock()
        code = printable(code, 64)
        if not self._streak:
            self._streak_since = now
        self._streak += 1
        self._streak_codes[code] += 1
        self._last_error = f"{code}: {printable(message, secrets=self.secrets)}"
        if not upstream_fault:
            self._failing.clear()
            if self.outage_since is not None:  # it answered, if only to refuse this request
                log.warning("deployment %s: upstream answering again after %.0fs out; releasing its requests",
                            self.name, self._end_outage(now))
        else:
            if len(self._failing) < OUTAGE_AFTER_REQUESTS:
                self._failing.add(custom_id)
            if self.outage_since is None and (code in UNREACHABLE or len(self._failing) >= OUTAGE_AFTER_REQUESTS):
                self.outage_since = now
                self._failed_probes = 0
                self._next_probe = now + jittered_delay(0, self.backoff_base, self.backoff_cap)
                log.warning("deployment %s: upstream out after %d failed attempts in a row (%s); holding its "
                            "requests, probing with one; last %s", self.name, self._streak, self._codes(),
                            self._last_error)
                self._next_report = now + self.report_every  # this was the streak's first report
            elif probe and self.outage_since is not None:
                self._failed_probes += 1
                self._next_probe = now + jittered_delay(self._failed_probes, self.backoff_base, self.backoff_cap)
        self._report_streak(now)
        return upstream_fault and self.outage_since is not None

    def _report_streak(self, now: float) -> None:
        if self._next_report is None:
            if self._streak < STREAK_LOGGED_AFTER:
                return
            log.warning("deployment %s: %d failed attempts in a row (%s); last %s", self.name, self._streak,
                        self._codes(), self._last_error)
        elif now >= self._next_report:
            log.warning("deployment %s: still failing after %.0fs: %d failed attempts (%s)%s; last %s", self.name,
                        now - self._streak_since, self._streak, self._codes(),
                        f", out for {now - self.outage_since:.0f}s" if self.outage_since is not None else "",
                        self._last_error)
        else:
            return
        self._next_report = now + self.report_every

    def _codes(self) -> str:
        return ", ".join(f"{code} x{n}" for code, n in self._streak_codes.most_common(4))

    def _end_outage(self, now: float) -> float:
        """Releases the waiting requests; returns how long the outage lasted."""
        lasted = now - self.outage_since
        self.outage_since = None
        self._probing = False
        self._changed.set()
        return lasted

    def _recover(self) -> None:
        now = self._clock()
        out = f", {self._end_outage(now):.0f}s of it out" if self.outage_since is not None else ""
        if self._next_report is not None:
            log.warning("deployment %s: recovered after %.0fs%s and %d failed attempts in a row (%s)", self.name,
                        now - self._streak_since, out, self._streak, self._codes())
        self._streak = 0
        self._streak_codes.clear()
        self._failing.clear()
        self._next_report = None
