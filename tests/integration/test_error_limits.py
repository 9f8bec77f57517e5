"""Errors that echo what the caller sent stay small enough for gRPC's metadata limits (8 KiB by
default on the client): the real status with its ErrorInfo and BadRequest always arrives, never
RESOURCE_EXHAUSTED "Stream removed"."""

from __future__ import annotations

import grpc
import pytest

from batchgate.v1 import batch_pb2, file_pb2
from tests.conftest import error_details, jsonl, request_line
from tests.integration.batch_helpers import create

HUGE = {"10KB": 10_000, "100KB": 100_000}


def huge_id(prefix: str, size: int) -> str:
    return prefix + "x" * size


async def _rejected(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


@pytest.mark.parametrize("size", HUGE.values(), ids=HUGE.keys())
async def test_huge_ids_are_not_found_with_error_info(harness, size):
    a = harness.alice
    file_id, batch_id = huge_id("file-", size), huge_id("batch_", size)
    calls = {
        "GetFile": (a.files.GetFile(file_pb2.GetFileRequest(file_id=file_id), metadata=a.metadata),
                    "FILE_NOT_FOUND", "file_id"),
        "DeleteFile": (a.files.DeleteFile(file_pb2.DeleteFileRequest(file_id=file_id), metadata=a.metadata),
                       "FILE_NOT_FOUND", "file_id"),
        "GetBatch": (a.batches.GetBatch(batch_pb2.GetBatchRequest(batch_id=batch_id), metadata=a.metadata),
                     "BATCH_NOT_FOUND", "batch_id"),
        "CancelBatch": (a.batches.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=batch_id),
                                              metadata=a.metadata), "BATCH_NOT_FOUND", "batch_id"),
    }
    for name, (call, reason, key) in calls.items():
        err = await _rejected(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND, (name, err.details())
        info, _ = error_details(err)
        assert info.reason == reason, name
        echoed = info.metadata[key]
        assert echoed.startswith((file_id if key == "file_id" else batch_id)[:40]), name
        assert len(echoed) < 1024 and "truncated" in echoed, name
        assert len(err.details()) < 1024 and "not found" in err.details(), name


async def test_create_batch_with_a_huge_model_is_invalid_argument_with_details(harness):
    a = harness.alice
    f = await harness.upload(a, jsonl([request_line("r1")]))
    for size in HUGE.values():
        for fields in (dict(model="m" * size), dict(model="simulated", provider="p" * size)):
            err = await _rejected(create(a, f.id, **fields))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
            info, bad_request = error_details(err)
            field = next(iter(fields)) if len(fields) == 1 else "provider"
            assert info.reason == f"INVALID_{field.upper()}"
            assert [v.field for v in bad_request.field_violations] == [field]


async def test_an_upload_with_many_long_problems_gets_its_bad_request_details(harness):
    a = harness.alice
    # Every line after the first names another long non-ASCII url that is no endpoint: each problem echoes
    # its url. (A file may mix models and endpoints, so differing models are no longer a problem.)
    lines = [request_line("r0")]
    lines += [request_line(f"r{i}", url=f"/v1/{i}" + "𝄞" * 250) for i in range(1, 40)]
    err = await _rejected(harness.upload(a, jsonl(lines)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    info, bad_request = error_details(err)
    assert info.reason == "INVALID_BATCH_FILE"
    assert bad_request is not None, "the BadRequest details arrive"
    fields = [v.field for v in bad_request.field_violations]
    assert fields == [f"line {n}" for n in range(2, 2 + len(fields))], "the first violations are kept"
    omitted = int(info.metadata.get("omitted_violations", "0"))
    assert len(fields) + omitted == int(info.metadata["reported_problems"])


async def test_create_batch_with_huge_strings_names_them_briefly(harness):
    a = harness.alice
    f = await harness.upload(a, jsonl([request_line("r1")]))
    for fields, reason, hint in ((dict(endpoint="/v1/" + "e" * 100_000), "UNSUPPORTED_ENDPOINT", "use one of"),
                                 (dict(completion_window="9" * 100_000), "INVALID_COMPLETION_WINDOW", 'use "24h"')):
        err = await _rejected(create(a, f.id, model="simulated", **fields))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        info, bad_request = error_details(err)
        assert info.reason == reason and [v.field for v in bad_request.field_violations] == list(fields)
        assert hint in err.details() and "truncated" in err.details()
