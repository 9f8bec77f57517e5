"""Fixtures of the contract suites: one parameter per implementation in backends.py."""

from __future__ import annotations

import pytest

from tests.contract.backends import BLOB_BACKENDS, METADATA_BACKENDS


@pytest.fixture(params=sorted(METADATA_BACKENDS))
async def database_backend(request, tmp_path):
    async with METADATA_BACKENDS[request.param](request, tmp_path) as backend:
        yield backend


@pytest.fixture
async def database(database_backend):
    """A Database (metadata store + usage ledger) on a fresh, empty database."""
    return await database_backend.open()


@pytest.fixture(params=sorted(BLOB_BACKENDS))
async def blob_backend(request, tmp_path):
    async with BLOB_BACKENDS[request.param](request, tmp_path) as backend:
        yield backend


@pytest.fixture
async def blobs(blob_backend):
    """A BlobStore on a fresh, empty store."""
    return await blob_backend.open()
