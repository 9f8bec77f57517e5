"""Hostile inputs to the split of a part into jobs (core/sharded.py cut): sizes that are far
from uniform. The cut must stay the fewest jobs (near-equal by lines only when that costs few
extra jobs), find a cut under a minimum whenever one exists, and stay linear in the lines."""

from __future__ import annotations

import time

import pytest
from batchgate_server.core.sharded import SplitRefused, cut
from batchgate_server.domain.shards import JobLimits


def check(sizes: list[int], jobs: list[tuple[int, int]], limits: JobLimits) -> None:
    assert jobs[0][0] == 0 and jobs[-1][1] == len(sizes)
    assert all(x[1] == y[0] for x, y in zip(jobs, jobs[1:]))
    for a, b in jobs:
        assert limits.min_requests <= b - a <= (limits.max_requests or len(sizes))
        assert limits.max_bytes is None or sum(sizes[a:b]) <= limits.max_bytes


def greedy_jobs(sizes: list[int], max_bytes: int) -> int:
    """Jobs of a greedy fill by bytes (no minimum): the fewest consecutive jobs there are."""
    jobs, used = 1, 0
    for size in sizes:
        if used + size > max_bytes:
            jobs, used = jobs + 1, 0
        used += size
    return jobs


def test_one_request_near_the_byte_limit_does_not_turn_every_request_into_a_job():
    # 8,000 small requests and one that fills a job alone: 81 jobs do; near-equal by lines
    # would need jobs of one line (8,001 jobs).
    limits = JobLimits(max_requests=50_000, max_bytes=10_000)
    sizes = [9_990] + [100] * 8_000
    jobs = cut(sizes, limits, "p")
    check(sizes, jobs, limits)
    assert len(jobs) <= 2 * greedy_jobs(sizes, 10_000), len(jobs)


def test_a_cut_under_a_minimum_is_found_when_one_exists():
    # Bedrock-like: at least 100 a job. The large request's job can hold 99 more requests,
    # the other 4,901 fit 5 jobs: a cut exists, near-equal by lines has none.
    limits = JobLimits(max_requests=50_000, max_bytes=100_000, min_requests=100)
    sizes = [90_100] + [100] * 5_000
    jobs = cut(sizes, limits, "p")
    check(sizes, jobs, limits)
    assert len(jobs) == 6


def test_the_cut_of_skewed_sizes_is_not_quadratic():
    # 100,000 requests, alternately large and small: about 50,000 jobs. The cut is one pass, not a
    # search over every job count (that took minutes, blocking the server's event loop).
    limits = JobLimits(max_bytes=1_000)
    sizes = [600, 10] * 50_000
    started = time.process_time()
    jobs = cut(sizes, limits, "p")
    check(sizes, jobs, limits)
    assert time.process_time() - started < 5.0
    assert len(jobs) <= 2 * greedy_jobs(sizes, 1_000)


def test_no_cut_under_the_minimum_is_still_refused_with_the_numbers():
    limits = JobLimits(max_bytes=100_000, min_requests=100)
    with pytest.raises(SplitRefused, match=r"5001 requests.*at least 100 requests each"):
        cut([99_990] + [100] * 5_000, limits, "p")  # the large one fills a job alone: 1 < 100
