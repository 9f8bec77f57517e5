"""PageTokens.keyset_page over an in-memory listing: pages bounded by count and by bytes, read in
chunks, continue exactly where the previous one stopped."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from batchgate_server.core.pagination import ITEM_FRAMING_BYTES, PageTokens


@dataclass
class Row:
    created_at: float
    id: str
    weight: int


def listing(rows: list[Row]):
    ordered = sorted(rows, key=lambda r: (r.created_at, r.id), reverse=True)
    calls = []

    async def fetch(limit, after):
        calls.append(limit)
        start = 0 if after is None else next(
            (i for i, r in enumerate(ordered) if (r.created_at, r.id) < after), len(ordered))
        return ordered[start:start + limit]

    return ordered, fetch, calls


async def pages(tokens: PageTokens, fetch, size: int, max_bytes: int) -> list[list[Row]]:
    result, token = [], ""
    while True:
        page, token = await tokens.keyset_page(size, token, "f", fetch, lambda r: r.weight, max_bytes)
        result.append(page)
        if not token:
            return result


@pytest.mark.parametrize("size", [1, 7, 99, 100, 101, 250, 1000])
@pytest.mark.parametrize("max_bytes", [50, 5_000, 10**9])
async def test_pages_cover_the_listing_once_in_order_within_their_bounds(size, max_bytes):
    rng = random.Random(size * 31 + max_bytes)
    rows = [Row(float(rng.randrange(200)), f"id{i:04d}", rng.randrange(1, 400)) for i in range(1234)]
    ordered, fetch, _ = listing(rows)
    got = await pages(PageTokens(b"k" * 32), fetch, size, max_bytes)
    assert [r for page in got for r in page] == ordered
    for page in got:
        assert 1 <= len(page) <= size
        weight = sum(r.weight + ITEM_FRAMING_BYTES for r in page)
        assert weight <= max_bytes or len(page) == 1, "only a single row may be larger than the budget"
    for page, following in zip(got, got[1:]):
        if len(page) < size:  # stopped by bytes: the next row would not have fitted
            assert weight_of(page) + following[0].weight + ITEM_FRAMING_BYTES > max_bytes


def weight_of(page: list[Row]) -> int:
    return sum(r.weight + ITEM_FRAMING_BYTES for r in page)


async def test_a_page_reads_its_rows_in_chunks():
    ordered, fetch, calls = listing([Row(float(i), f"id{i}", 1) for i in range(1000)])
    page, token = await PageTokens(b"k" * 32).keyset_page(1000, "", "f", fetch, lambda r: r.weight)
    assert page == ordered and token == ""
    assert max(calls) <= 101
