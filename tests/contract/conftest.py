"""Fixtures of the contract suites: one parameter per implementation in backends.py."""

from __future__ import annotations

import pytest

from tests.contract.backends import BLOB_BACKENDS, METADATA_BACKENDS


def each_backend(name: str, backends: dict):
    """A fixture `name` run once per implementation in `backends`, each started for the test
    (its database or bucket made) and stopped after it."""
    @pytest.fixture(name=name, params=sorted(backends))
    async def backend(request, tmp_path):
        async with backends[request.param](request, tmp_path) as started:
            yield started

    return backend


database_backend = each_backend("database_backend", METADATA_BACKENDS)
blob_backend = each_backend("blob_backend", BLOB_BACKENDS)


@pytest.fixture
async def database(database_backend):
    """A Database (metadata store + usage ledger) on a fresh, empty database."""
    return await database_backend.open()


@pytest.fixture
async def blobs(blob_backend):
    """A BlobStore on a fresh, empty store."""
    return await blob_backend.open()
