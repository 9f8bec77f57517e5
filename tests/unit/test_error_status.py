"""api/errors.to_status keeps every status within gRPC's default 8 KiB metadata limit, however much
of the caller's input an error echoes."""

from __future__ import annotations

import base64

import pytest
from google.rpc import error_details_pb2, status_pb2

from batchgate_server.api.errors import to_status
from batchgate_server.core import errors
from batchgate_server.core.errors import FieldViolation

GRPC_DEFAULT_MAX_METADATA = 8 * 1024
HEADROOM = 1024


def trailer_bytes(status) -> int:
    """What the status costs in the trailers, at worst: grpc-message percent-encoded (3 characters
    a byte) plus grpc-status-details-bin base64-encoded."""
    message = status.details.encode()
    details = dict(status.trailing_metadata)["grpc-status-details-bin"]
    return 3 * len(message) + len(base64.b64encode(details))


def unpacked(status) -> tuple[error_details_pb2.ErrorInfo, error_details_pb2.BadRequest | None]:
    proto = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    info, bad = error_details_pb2.ErrorInfo(), None
    proto.details[0].Unpack(info)
    if len(proto.details) > 1 and proto.details[1].Is(error_details_pb2.BadRequest.DESCRIPTOR):
        bad = error_details_pb2.BadRequest()
        proto.details[1].Unpack(bad)
    return info, bad


HOSTILE = {
    "huge message": errors.InvalidArgument("m" * 100_000, "R"),
    "non-ASCII message": errors.InvalidArgument("𝄞" * 50_000, "R"),
    "lone surrogate": errors.InvalidArgument("bad \ud800", "R", {"model": "\udfff" * 10}),
    "huge metadata": errors.NotFound("x", "FILE_NOT_FOUND", {"file_id": "f" * 100_000}),
    "many metadata": errors.FailedPrecondition("x", "R", {f"key{i}": "v" * 1000 for i in range(50)}),
    "many violations": errors.InvalidArgument("x", "INVALID_BATCH_FILE", {}, [
        FieldViolation(f"line {i}", "é" * 2000) for i in range(1, 1000)]),
    "everything": errors.ResourceExhausted("€" * 9000, "STORAGE_FULL", retry_after=2.5,
                                           metadata={"k" * 500: "v" * 9000},
                                           violations=[FieldViolation("f" * 9000, "d" * 9000)] * 50),
}


@pytest.mark.parametrize("err", HOSTILE.values(), ids=HOSTILE.keys())
def test_every_status_fits_the_default_metadata_limit_with_headroom(err):
    status = to_status(err)
    assert trailer_bytes(status) <= GRPC_DEFAULT_MAX_METADATA - HEADROOM
    info, bad = unpacked(status)
    assert info.domain == "batchgate.dev" and info.reason == err.reason
    if err.violations:
        kept = len(bad.field_violations) if bad else 0
        assert kept + int(info.metadata.get("omitted_violations", "0")) == len(err.violations)


def test_cut_values_say_so_and_short_ones_are_untouched():
    info, bad = unpacked(to_status(errors.InvalidArgument("short", "R", {"file_id": "file-" + "x" * 5000, "n": "1"},
                                                          [FieldViolation("model", "unknown model 'a'")])))
    assert info.metadata["file_id"].startswith("file-xxx") and "truncated, 5005 bytes" in info.metadata["file_id"]
    assert info.metadata["n"] == "1" and "omitted_violations" not in info.metadata
    assert [(v.field, v.description) for v in bad.field_violations] == [("model", "unknown model 'a'")]


def test_the_first_violations_are_kept_in_order():
    err = errors.InvalidArgument("x", "INVALID_BATCH_FILE", {},
                                 [FieldViolation(f"line {i}", "p" * 300) for i in range(1, 101)])
    info, bad = unpacked(to_status(err))
    kept = [v.field for v in bad.field_violations]
    assert kept == [f"line {i}" for i in range(1, len(kept) + 1)] and 5 <= len(kept) < 100
    assert info.metadata["omitted_violations"] == str(100 - len(kept))
