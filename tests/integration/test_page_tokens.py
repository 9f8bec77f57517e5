"""Page tokens of ListFiles, ListBatches and QueryUsage: signed by the server, so anything it did
not issue — garbled, overlong, tampered, re-signed with another key — is INVALID_ARGUMENT
INVALID_PAGE_TOKEN; a genuine token of another listing, filter or caller is
PAGE_TOKEN_FILTER_MISMATCH; and a genuine token still works after a restart."""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable

import grpc
import pytest
from grpc_status import rpc_status

from batchgate.v1 import batch_pb2, file_pb2, usage_pb2
from batchgate_server.core.pagination import MAX_TOKEN_LENGTH, PageTokens
from tests.conftest import Harness, batch_file, error_details, start_harness
from tests.integration.batch_helpers import create, watch_all
from tests.integration.usage_helpers import query, stop

ListCall = Callable[[Harness, str], Awaitable[str]]  # (harness, page_token) -> next_page_token


async def list_files(h: Harness, token: str, **fields) -> str:
    a = h.alice
    return (await a.files.ListFiles(file_pb2.ListFilesRequest(page_size=1, page_token=token, **fields),
                                    metadata=a.metadata)).next_page_token


async def list_batches(h: Harness, token: str, **fields) -> str:
    a = h.alice
    return (await a.batches.ListBatches(batch_pb2.ListBatchesRequest(page_size=1, page_token=token, **fields),
                                        metadata=a.metadata)).next_page_token


async def query_usage(h: Harness, token: str, **fields) -> str:
    fields.setdefault("group_by", [usage_pb2.USAGE_GROUP_BY_PROJECT])
    return (await query(h, h.admin, page_size=1, page_token=token, **fields)).next_page_token


def answer(err: grpc.aio.AioRpcError) -> tuple:
    """(code, ErrorInfo reason, BadRequest fields), or (code, message) without rich details."""
    if rpc_status.from_call(err) is None:
        return err.code(), err.details()
    info, bad_request = error_details(err)
    return err.code(), info.reason, [v.field for v in bad_request.field_violations] if bad_request else []


RPCS = {"ListFiles": list_files, "ListBatches": list_batches, "QueryUsage": query_usage}


@pytest.fixture(scope="module")
async def h(tmp_path_factory):
    """Alice has three files and three finished batches, bob one: every listing has a second page."""
    harness = await start_harness(tmp_path_factory.mktemp("tokens") / "data")
    for caller, count in ((harness.alice, 3), (harness.bob, 1)):
        for _ in range(count):
            f = await harness.upload(caller, batch_file(1))
            batch = await create(caller, f.id, model="simulated")
            await watch_all(caller, batch.id)
    try:
        yield harness
    finally:
        await stop(harness)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _huge_numbers(doc):
    """`doc` with every number replaced by one no float can hold (what once raised OverflowError)."""
    if isinstance(doc, dict):
        return {k: _huge_numbers(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_huge_numbers(v) for v in doc]
    if isinstance(doc, (int, float)) and not isinstance(doc, bool):
        return 10 ** 400
    return doc


def forgeries(genuine: str) -> dict[str, str]:
    """Tokens this server never issued, derived from a genuine one."""
    payload, _, mac = genuine.partition(".")
    doc = json.loads(_unb64(payload))
    huge = _b64(json.dumps(_huge_numbers(doc)).encode())
    wrong_key = PageTokens(b"not the server's secret".ljust(32, b"!"))
    flipped = payload[:-1] + ("A" if payload[-1] != "A" else "B")
    return {
        "garbage": "garbage!",
        "dot only": ".",
        "overlong": "x" * (MAX_TOKEN_LENGTH + 1),
        "overlong genuine prefix": genuine + "A" * MAX_TOKEN_LENGTH,
        "long": "x" * 5000,
        "deep json": _b64(b"[" * 1500),
        "not base64": "%%%%.%%%%",
        "unsigned payload": payload,
        "unsigned huge numbers": huge,
        "huge numbers, old signature": f"{huge}.{mac}",
        "payload bit flipped": f"{flipped}.{mac}",
        "signature cut": f"{payload}.{mac[:-4]}",
        "signature of another token": f"{payload}.{_b64(b'0' * 32)}",
        "re-signed with a wrong key": wrong_key.seal(doc.get("k"), "any filter"),
        "re-signed huge numbers with a wrong key": wrong_key.seal(_huge_numbers(doc.get("k")), "any filter"),
        "two dots": f"{payload}.{mac}.{mac}",
        "unicode": "päge·tøken",
    }


@pytest.mark.parametrize("rpc", RPCS)
async def test_tokens_the_server_did_not_issue_are_invalid_page_token(h, rpc):
    call = RPCS[rpc]
    genuine = await call(h, "")
    assert genuine
    await call(h, genuine)  # the genuine token works
    answers = {}
    for name, token in forgeries(genuine).items():
        try:
            await call(h, token)
            answers[name] = "accepted"
        except grpc.aio.AioRpcError as err:
            answers[name] = answer(err)
    assert answers == {name: (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN", ["page_token"])
                       for name in answers}

async def _mismatch(call: Awaitable) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(err.value)[0].reason == "PAGE_TOKEN_FILTER_MISMATCH"


async def test_a_genuine_token_of_another_filter_is_a_filter_mismatch(h):
    files_token, batches_token, usage_token = [await call(h, "") for call in RPCS.values()]
    # Another listing's token, with the same (empty) filter.
    await _mismatch(list_batches(h, files_token))
    await _mismatch(list_files(h, batches_token))
    await _mismatch(list_files(h, usage_token))
    await _mismatch(query_usage(h, batches_token))
    # The same listing, another filter.
    await _mismatch(list_files(h, files_token, purpose=file_pb2.FILE_PURPOSE_BATCH))
    await _mismatch(list_batches(h, batches_token, statuses=[batch_pb2.BATCH_STATUS_COMPLETED]))
    await _mismatch(query_usage(h, usage_token, group_by=[usage_pb2.USAGE_GROUP_BY_MODEL]))
    # Another caller.
    b = h.bob
    await _mismatch(b.files.ListFiles(file_pb2.ListFilesRequest(page_token=files_token), metadata=b.metadata))
    await _mismatch(b.batches.ListBatches(batch_pb2.ListBatchesRequest(page_token=batches_token),
                                          metadata=b.metadata))
    await _mismatch(query(h, b, page_token=usage_token, group_by=[usage_pb2.USAGE_GROUP_BY_PROJECT]))


async def test_a_token_survives_a_restart(tmp_path):
    h = await start_harness(tmp_path / "data")
    try:
        for _ in range(2):
            f = await h.upload(h.alice, batch_file(1))
            await watch_all(h.alice, (await create(h.alice, f.id, model="simulated")).id)
        f = await h.upload(h.bob, batch_file(1))
        await watch_all(h.bob, (await create(h.bob, f.id, model="simulated")).id)
        tokens = {name: await call(h, "") for name, call in RPCS.items()}
        assert all(tokens.values())
        second_pages = {name: await call(h, tokens[name]) for name, call in RPCS.items()}
    finally:
        await stop(h)
    h = await start_harness(tmp_path / "data")
    try:
        # The same secret: the token opens, and the page after it is signed exactly as before.
        assert {name: await call(h, tokens[name]) for name, call in RPCS.items()} == second_pages
    finally:
        await stop(h)
