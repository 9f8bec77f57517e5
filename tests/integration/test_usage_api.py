"""UsageService.QueryUsage through the real server: grouping, filters, time ranges, pagination,
project isolation, validation, and the Python clients.

One module-wide world of finished batches (every request text is 400 characters: 100 prompt and
52 completion tokens per answered chat request, see usage_helpers). Costs per request, by hand:

    llm-a     batch input $1/M, output $2/M:  100 * 0.000001    + 52 * 0.000002  = 0.000204
    llm-b     batch input $3/M, output $4/M:  100 * 0.000003    + 52 * 0.000004  = 0.000508
    oai-mini  gpt-4o-mini builtin (OpenAI):   100 * 0.000000075 + 52 * 0.0000003 = 0.0000231
    unpriced  no price: unknown

    batch  project  key     model     requests  metadata       cost
    A1     alice    alice   llm-a     2         team=search    0.000408
    A2     alice    alice   llm-b     1         team=ads       0.000508
           -- t_mid --
    A3     alice    alice   oai-mini  1         -              0.0000231
    A4     alice    alice2  llm-a     1         team=search    0.000204
    B1     bob      bob     llm-a     3         -              0.000612
    B2     bob      bob     unpriced  1         team=search    unknown
    D1     default  master  llm-b     1         team=ops       0.000508
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import time

import grpc
import pytest
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from batchgate import AsyncBatchgateClient, BatchgateClient
from batchgate.v1 import usage_pb2
from batchgate_server.app import PAGE_TOKEN_SECRET
from batchgate_server.core.auth import create_api_key
from tests.conftest import MASTER_KEY, Caller, Harness, error_details, start_harness
from tests.fakes.openai_batch_api import FakeBatchAPI
from tests.integration.batch_helpers import write_config
from tests.integration.usage_helpers import UsageUpstream, priced_entry, query, run_batch, stop, text

G = usage_pb2
A_INFO = {"input_cost_per_token_batches": "0.000001", "output_cost_per_token_batches": "0.000002"}
B_INFO = {"input_cost_per_token_batches": "0.000003", "output_cost_per_token_batches": "0.000004"}


def key_id(caller: Caller) -> str:
    secret = dict(caller.metadata)["authorization"].removeprefix("Bearer ")
    return "key_" + hashlib.sha256(secret.encode()).hexdigest()[:12]


def ts(seconds: float) -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


class World:
    """The harness, alice's second key, and a time between A2 and A3 ending."""

    h: Harness
    alice2: Caller
    t_mid: float


@pytest.fixture(scope="module")
async def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("usage")
    upstream = UsageUpstream()
    await upstream.start()
    api = FakeBatchAPI(api_key="sk-test")
    await api.start()
    config = write_config(tmp / "models.yaml", [
        priced_entry("llm-a", upstream.base_url, "hosted_vllm/house-a", A_INFO),
        priced_entry("llm-b", upstream.base_url, "hosted_vllm/house-b", B_INFO),
        priced_entry("unpriced", upstream.base_url, "hosted_vllm/some-unpriced-model"),
        {"model_name": "oai-mini", "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "sk-test",
                                                       "api_base": api.base_url, "poll_interval": 0.05}},
    ])
    h = await start_harness(tmp / "data", config_file=config)
    w = World()
    w.h = h
    _, secret = await create_api_key(h.server.store, "alice")
    w.alice2 = Caller(h.alice.files, h.alice.batches, (("authorization", f"Bearer {secret}"),), "alice")
    try:
        await run_batch(h, h.alice, "llm-a", [text(), text()], metadata={"team": "search"})
        await run_batch(h, h.alice, "llm-b", [text()], metadata={"team": "ads"})
        w.t_mid = time.time()
        await run_batch(h, h.alice, "oai-mini", [text()])
        await run_batch(h, w.alice2, "llm-a", [text()], metadata={"team": "search"})
        await run_batch(h, h.bob, "llm-a", [text(), text(), text()])
        await run_batch(h, h.bob, "unpriced", [text()], metadata={"team": "search"})
        await run_batch(h, h.admin, "llm-b", [text()], metadata={"team": "ops"})
        yield w
    finally:
        await stop(h)
        await api.stop()
        await upstream.stop()


def rows(report) -> list[tuple]:
    return [(dict(r.group), r.batch_count, r.cost_amount, r.unknown_cost_batches) for r in report.rows]


def sums(r: usage_pb2.UsageRow) -> tuple:
    return (r.batch_count, r.input_tokens, r.output_tokens, r.cost_amount, r.unknown_cost_batches, r.currency)


# -- totals and isolation ----------------------------------------------------------------------------


async def test_admin_sees_every_project(world):
    report = await query(world.h, world.h.admin)
    # 0.000408 + 0.000508 + 0.0000231 + 0.000204 + 0.000612 + 0.000508 = 0.0022631 (B2 unknown, apart)
    # input 10 answered requests * 100 = 1000; output 10 * 52 = 520
    assert sums(report.totals) == (7, 1000, 520, "0.0022631", 1, "USD")
    assert report.totals.group == {} and not report.next_page_token
    assert rows(report) == [({}, 7, "0.0022631", 1)]  # no group_by: one row, the totals


async def test_each_project_sees_only_its_own_spend(world):
    h = world.h
    alice = await query(h, h.alice, group_by=[G.USAGE_GROUP_BY_PROJECT])
    # 0.000408 + 0.000508 + 0.0000231 + 0.000204 = 0.0011431
    assert rows(alice) == [({"project": "alice"}, 4, "0.0011431", 0)]
    assert sums(alice.totals) == (4, 500, 260, "0.0011431", 0, "USD")
    bob = await query(h, h.bob, group_by=[G.USAGE_GROUP_BY_PROJECT])
    assert rows(bob) == [({"project": "bob"}, 2, "0.000612", 1)]
    # Another project's name as a filter matches nothing, without saying whether it exists.
    for other in ("bob", "default", "no-such-project"):
        peek = await query(h, h.alice, project=other, group_by=[G.USAGE_GROUP_BY_PROJECT])
        assert list(peek.rows) == [] and sums(peek.totals) == (0, 0, 0, "0", 0, "USD")
    assert rows(await query(h, h.alice, project="alice")) == [({}, 4, "0.0011431", 0)]
    # The master key may filter by any project.
    assert rows(await query(h, h.admin, project="bob")) == [({}, 2, "0.000612", 1)]


# -- grouping ----------------------------------------------------------------------------------------


async def test_group_by_project_and_api_key(world):
    h = world.h
    report = await query(h, h.admin, group_by=[G.USAGE_GROUP_BY_PROJECT, G.USAGE_GROUP_BY_API_KEY])
    # alice's first key ran A1..A3 (0.000408 + 0.000508 + 0.0000231), her second key A4
    alice_keys = sorted([(key_id(h.alice), 3, "0.0009391"), (key_id(world.alice2), 1, "0.000204")])
    assert rows(report) == [
        *[({"project": "alice", "api_key_id": k}, n, c, 0) for k, n, c in alice_keys],
        ({"project": "bob", "api_key_id": key_id(h.bob)}, 2, "0.000612", 1),
        ({"project": "default", "api_key_id": "master"}, 1, "0.000508", 0),
    ]
    own = await query(h, world.alice2, group_by=[G.USAGE_GROUP_BY_API_KEY])
    # A key sees its whole project's spend, per key.
    assert [dict(r.group)["api_key_id"] for r in own.rows] == [k for k, _, _ in alice_keys]


async def test_group_by_model_and_provider(world):
    h = world.h
    by_model = await query(h, h.admin, group_by=[G.USAGE_GROUP_BY_MODEL])
    assert rows(by_model) == [
        ({"model": "llm-a"}, 3, "0.001224", 0),  # 0.000408 + 0.000204 + 0.000612
        ({"model": "llm-b"}, 2, "0.001016", 0),  # 0.000508 * 2
        ({"model": "oai-mini"}, 1, "0.0000231", 0),
        ({"model": "unpriced"}, 1, "0", 1),  # unknown: counted apart, its tokens still summed
    ]
    assert [r.input_tokens for r in by_model.rows] == [600, 200, 100, 100]
    by_provider = await query(h, h.admin, group_by=[G.USAGE_GROUP_BY_PROVIDER])
    assert rows(by_provider) == [
        ({"provider": "openai"}, 1, "0.0000231", 0),
        ({"provider": "openai_compatible"}, 6, "0.00224", 1),  # 0.0022631 - 0.0000231
    ]


async def test_group_by_metadata_key(world):
    h = world.h
    report = await query(h, h.admin, group_by=[G.USAGE_GROUP_BY_METADATA_KEY], metadata_key="team")
    assert rows(report) == [
        ({}, 2, "0.0006351", 0),  # no "team" key (A3, B1): 0.0000231 + 0.000612
        ({"metadata.team": "ads"}, 1, "0.000508", 0),
        ({"metadata.team": "ops"}, 1, "0.000508", 0),
        ({"metadata.team": "search"}, 3, "0.000612", 1),  # A1 + A4 = 0.000408 + 0.000204; B2 unknown
    ]
    mine = await query(h, h.alice, group_by=[G.USAGE_GROUP_BY_METADATA_KEY, G.USAGE_GROUP_BY_MODEL],
                       metadata_key="team")
    assert rows(mine) == [
        ({"model": "oai-mini"}, 1, "0.0000231", 0),
        ({"metadata.team": "ads", "model": "llm-b"}, 1, "0.000508", 0),
        ({"metadata.team": "search", "model": "llm-a"}, 2, "0.000612", 0),
    ]
    none = await query(h, h.admin, group_by=[G.USAGE_GROUP_BY_METADATA_KEY], metadata_key="nobody-uses-this")
    assert rows(none) == [({}, 7, "0.0022631", 1)]


# -- filters and time ranges -------------------------------------------------------------------------


async def test_model_and_provider_filters(world):
    h = world.h
    assert rows(await query(h, h.admin, model="llm-a")) == [({}, 3, "0.001224", 0)]
    assert rows(await query(h, h.admin, provider="openai")) == [({}, 1, "0.0000231", 0)]
    assert rows(await query(h, h.bob, model="llm-a", provider="openai_compatible")) == [({}, 1, "0.000612", 0)]
    assert rows(await query(h, h.admin, model="no-such-model")) == []


async def test_time_range_is_half_open_on_ended_at(world):
    h, mid = world.h, world.t_mid
    before = await query(h, h.admin, end_time=ts(mid))
    assert rows(before) == [({}, 2, "0.000916", 0)]  # A1 + A2: 0.000408 + 0.000508
    after = await query(h, h.admin, start_time=ts(mid))
    assert rows(after) == [({}, 5, "0.0013471", 1)]  # 0.0022631 - 0.000916
    both = await query(h, h.admin, start_time=ts(mid - 3600), end_time=ts(time.time() + 1))
    assert rows(both) == [({}, 7, "0.0022631", 1)]
    assert rows(await query(h, h.admin, start_time=ts(time.time() + 60))) == []


# -- pagination --------------------------------------------------------------------------------------


async def all_pages(h, caller, page_size: int, **fields) -> tuple[list, list]:
    got, totals, token = [], [], ""
    while True:
        page = await query(h, caller, page_size=page_size, page_token=token, **fields)
        assert len(page.rows) <= page_size
        got += list(page.rows)
        totals.append(page.totals)
        token = page.next_page_token
        if not token:
            return got, totals


async def test_pages_cover_every_group_once(world):
    h = world.h
    fields = dict(group_by=[G.USAGE_GROUP_BY_PROJECT, G.USAGE_GROUP_BY_METADATA_KEY], metadata_key="team")
    whole = await query(h, h.admin, **fields)
    assert len(whole.rows) == 6
    for size in (1, 2, 5):
        got, totals = await all_pages(h, h.admin, size, **fields)
        assert got == list(whole.rows)
        assert all(t == whole.totals for t in totals)  # every page carries the same totals


async def test_page_token_is_bound_to_the_query_and_the_caller(world):
    h = world.h
    first = await query(h, h.admin, group_by=[G.USAGE_GROUP_BY_MODEL], page_size=1)
    assert first.next_page_token
    for caller, fields in ((h.admin, dict(group_by=[G.USAGE_GROUP_BY_PROVIDER])),
                           (h.admin, dict(group_by=[G.USAGE_GROUP_BY_MODEL], model="llm-a")),
                           (h.bob, dict(group_by=[G.USAGE_GROUP_BY_MODEL]))):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await query(h, caller, page_size=1, page_token=first.next_page_token, **fields)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(err.value)[0].reason == "PAGE_TOKEN_FILTER_MISMATCH"


async def test_pages_read_one_snapshot_of_the_ledger(tmp_path):
    upstream = UsageUpstream()
    await upstream.start()
    h = await start_harness(tmp_path / "data", config_file=write_config(
        tmp_path / "models.yaml", [priced_entry("llm-a", upstream.base_url, "hosted_vllm/house-a", A_INFO)]))
    try:
        await run_batch(h, h.alice, "llm-a", [text()])
        await run_batch(h, h.bob, "llm-a", [text()])
        first = await query(h, h.admin, group_by=[G.USAGE_GROUP_BY_PROJECT], page_size=1)
        assert rows(first) == [({"project": "alice"}, 1, "0.000204", 0)]
        # A batch of a new project ends between the pages; it sorts after alice but is not seen.
        _, secret = await create_api_key(h.server.store, "carol")
        carol = Caller(h.alice.files, h.alice.batches, (("authorization", f"Bearer {secret}"),), "carol")
        await run_batch(h, carol, "llm-a", [text()])
        second = await query(h, h.admin, group_by=[G.USAGE_GROUP_BY_PROJECT], page_size=1,
                             page_token=first.next_page_token)
        assert rows(second) == [({"project": "bob"}, 1, "0.000204", 0)] and not second.next_page_token
        assert second.totals == first.totals and first.totals.batch_count == 2
        fresh = await query(h, h.admin, group_by=[G.USAGE_GROUP_BY_PROJECT])
        assert [dict(r.group)["project"] for r in fresh.rows] == ["alice", "bob", "carol"]
    finally:
        await stop(h)
        await upstream.stop()


# -- validation and auth -----------------------------------------------------------------------------


@pytest.mark.parametrize("fields, reason, field", [
    (dict(start_time=timestamp_pb2.Timestamp(seconds=200), end_time=timestamp_pb2.Timestamp(seconds=100)),
     "INVALID_TIME_RANGE", "end_time"),
    (dict(start_time=timestamp_pb2.Timestamp(seconds=100), end_time=timestamp_pb2.Timestamp(seconds=100)),
     "INVALID_TIME_RANGE", "end_time"),
    (dict(start_time=timestamp_pb2.Timestamp(seconds=100, nanos=-1)), "INVALID_TIME_RANGE", "start_time"),
    (dict(group_by=[G.USAGE_GROUP_BY_METADATA_KEY]), "MISSING_METADATA_KEY", "metadata_key"),
    (dict(group_by=[G.USAGE_GROUP_BY_METADATA_KEY], metadata_key="k" * 65), "INVALID_METADATA_KEY",
     "metadata_key"),
    (dict(metadata_key="team"), "UNUSED_METADATA_KEY", "metadata_key"),
    (dict(group_by=[G.USAGE_GROUP_BY_MODEL, G.USAGE_GROUP_BY_MODEL]), "DUPLICATE_GROUP_BY", "group_by"),
    (dict(group_by=[G.USAGE_GROUP_BY_UNSPECIFIED]), "INVALID_GROUP_BY", "group_by"),
    (dict(group_by=[99]), "INVALID_GROUP_BY", "group_by"),
    (dict(page_size=-1), "INVALID_PAGE_SIZE", "page_size"),
    (dict(page_token="not-a-token!"), "INVALID_PAGE_TOKEN", "page_token"),
])
async def test_bad_requests_are_invalid_argument(world, fields, reason, field):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await query(world.h, world.h.alice, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, bad_request = error_details(err.value)
    assert info.reason == reason and info.domain == "batchgate.dev"
    assert [v.field for v in bad_request.field_violations] == [field]


async def test_signed_page_token_of_the_wrong_shape_is_invalid_not_internal(world):
    # Signed with the server's own key (as by another version of the server) but carrying a cursor
    # of the wrong shape: INVALID_ARGUMENT. (Unsigned forgeries: test_page_tokens.py.)
    h = world.h
    first = await query(h, h.admin, group_by=[G.USAGE_GROUP_BY_MODEL], page_size=1)
    payload = first.next_page_token.partition(".")[0]
    doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    secret = await h.server.store.server_secret(PAGE_TOKEN_SECRET)
    for bad in ({"a": 1, "s": ["x", "y"]}, {"a": "1", "s": ["x"]}, {"s": ["x"]}, [1], {"a": 1, "s": [None]},
                {"a": -1, "s": ["x"]}):
        raw = json.dumps({"f": doc["f"], "k": bad}).encode()
        token = ".".join(base64.urlsafe_b64encode(part).decode().rstrip("=")
                         for part in (raw, hmac.new(secret, raw, hashlib.sha256).digest()))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await query(h, h.admin, group_by=[G.USAGE_GROUP_BY_MODEL], page_size=1, page_token=token)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_details(err.value)[0].reason == "INVALID_PAGE_TOKEN"


async def test_unauthenticated(world):
    h = world.h
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await query(h, h.anonymous)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_details(err.value)[0].reason == "MISSING_API_KEY"
    bad = Caller(h.alice.files, h.alice.batches, (("authorization", "Bearer nope"),), "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await query(h, bad)
    assert error_details(err.value)[0].reason == "INVALID_API_KEY"


async def test_served_and_healthy(world):
    from batchgate_server.app import SERVICE_NAMES

    assert "batchgate.v1.UsageService" in SERVICE_NAMES
    health = health_pb2_grpc.HealthStub(world.h.channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service="batchgate.v1.UsageService"))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


# -- the Python clients ------------------------------------------------------------------------------


def secret_of(caller: Caller) -> str:
    return dict(caller.metadata)["authorization"].removeprefix("Bearer ")


async def test_async_client_follows_pages(world):
    h = world.h
    whole = await query(h, h.admin, group_by=[G.USAGE_GROUP_BY_MODEL])
    async with AsyncBatchgateClient(f"127.0.0.1:{h.port}", secret_of(h.admin)) as client:
        report = await client.query_usage(group_by=[G.USAGE_GROUP_BY_MODEL], page_size=1)
        assert list(report.rows) == list(whole.rows) and report.totals == whole.totals
        assert not report.next_page_token
        mine = await client.query_usage(project="alice", end_time=world.t_mid)
        assert rows(mine) == [({}, 2, "0.000916", 0)]


async def test_sync_client_with_datetimes(world):
    h = world.h
    mid = datetime.datetime.fromtimestamp(world.t_mid, tz=datetime.timezone.utc)

    def call():
        with BatchgateClient(f"127.0.0.1:{h.port}", secret_of(h.alice)) as client:
            later = client.query_usage(start_time=mid, group_by=[G.USAGE_GROUP_BY_API_KEY], page_size=1)
            naive = client.query_usage(end_time=mid.replace(tzinfo=None))  # naive datetimes are UTC
            return later, naive

    later, naive = await asyncio.to_thread(call)
    # alice after t_mid: A3 (0.0000231, her first key) and A4 (0.000204, alice2)
    assert sorted((dict(r.group)["api_key_id"], r.cost_amount) for r in later.rows) == sorted(
        [(key_id(h.alice), "0.0000231"), (key_id(world.alice2), "0.000204")])
    assert later.totals.cost_amount == "0.0002271"
    assert rows(naive) == [({}, 2, "0.000916", 0)]


async def test_grpcurl_queries_usage_by_reflection(world):
    from tests.integration.test_grpcurl import GRPCURL, grpcurl

    assert GRPCURL.exists()
    h = world.h
    code, out, err = await grpcurl("-plaintext", f"127.0.0.1:{h.port}", "list")
    assert code == 0 and "batchgate.v1.UsageService" in out.split(), err
    request = {"group_by": ["USAGE_GROUP_BY_PROJECT"], "start_time": "2000-01-01T00:00:00Z"}
    code, out, err = await grpcurl("-plaintext", "-H", f"authorization: Bearer {MASTER_KEY}", "-d",
                                   json.dumps(request), f"127.0.0.1:{h.port}", "batchgate.v1.UsageService/QueryUsage")
    assert code == 0, err
    got = json.loads(out)

    def field(d: dict, name: str):  # grpcurl prints proto field names (or lowerCamel ones)
        camel = name.split("_")[0] + "".join(p.title() for p in name.split("_")[1:])
        return d.get(name, d.get(camel))

    assert [(r["group"]["project"], field(r, "cost_amount")) for r in got["rows"]] == [
        ("alice", "0.0011431"), ("bob", "0.000612"), ("default", "0.000508")]
    assert field(got["totals"], "batch_count") == "7" and field(got["totals"], "unknown_cost_batches") == "1"
