"""core/shard_plan.py: CreateBatch's routing plan (mixed files, model_map, deployment ids, spread by
weight and load, minimums, endpoint mismatch, unroutable lines with their numbers)."""

from __future__ import annotations

import pytest

from batchgate_server.config import parse_config
from batchgate_server.core.errors import FailedPrecondition, InvalidArgument
from batchgate_server.core.routing import Router
from batchgate_server.core.shard_plan import file_groups, plan_batch, water_fill
from batchgate_server.domain.deployment import Deployment
from batchgate_server.domain.models import FilePurpose, FileRecord
from batchgate_server.domain.shards import FileGroup, JobLimits, PlannedPart
from batchgate_server.providers.base import UnsupportedRequest, limits_with_overrides

CHAT, EMBED = "/v1/chat/completions", "/v1/embeddings"


class Provider:
    """What the planner asks of a provider: its job limits and its check."""

    def __init__(self, limits: JobLimits, refuse_endpoint: str = "") -> None:
        self.job_limits = limits
        self.refuse_endpoint = refuse_endpoint
        self.checked: list[tuple[str, str, int]] = []

    def limits(self, endpoint: str, deployment: Deployment) -> JobLimits:
        return limits_with_overrides(self.job_limits, deployment.params)

    def check(self, endpoint: str, deployment: Deployment, line_count: int) -> None:
        self.checked.append((endpoint, deployment.id, line_count))
        if endpoint == self.refuse_endpoint:
            raise UnsupportedRequest(f"{endpoint} is not supported", reason="UNSUPPORTED_ENDPOINT",
                                     details={"endpoint": endpoint})


class Registry:
    def __init__(self, **providers: Provider) -> None:
        self.providers = providers

    def get(self, name: str) -> Provider:
        if name not in self.providers:
            raise UnsupportedRequest(f"provider {name!r} is not available", reason="PROVIDER_UNAVAILABLE")
        return self.providers[name]


def dep(name: str, model: str, dep_id: str, info: dict | None = None, **params) -> dict:
    return {"model_name": name, "litellm_params": {"model": model, "api_key": "k", **params},
            "model_info": {"id": dep_id, **(info or {})}}


MODEL_LIST = [
    dep("chat", "openai/gpt-4o-mini", "oai-chat"),
    dep("embed", "openai/text-embedding-3-small", "oai-embed"),
    dep("pool", "openai/gpt-4o-mini", "pool-a", weight=1),
    dep("pool", "openai/gpt-4o-mini", "pool-b", weight=2),
    dep("pool", "openai/gpt-4o-mini", "pool-c", weight=1),
    dep("claude", "bedrock/anthropic.claude-3-haiku", "br-claude"),
    dep("claude", "anthropic/claude-3-haiku", "an-claude"),
    dep("titan", "bedrock/amazon.titan-embed-text-v2:0", "br-titan"),
    dep("spready", "openai/gpt-4o-mini", "sp-1", {"spread_batches": True}),
    dep("spready", "openai/gpt-4o-mini", "sp-2"),
]


def registry(**overrides: Provider) -> Registry:
    return Registry(**{"openai": Provider(JobLimits(max_requests=50_000, max_bytes=200 * 2**20)),
                       "anthropic": Provider(JobLimits(max_requests=100_000)),
                       "bedrock": Provider(JobLimits(max_requests=50_000, min_requests=100)), **overrides})


def router_for(model_list=MODEL_LIST, **router_settings) -> Router:
    return Router(parse_config({"model_list": model_list, "router_settings": router_settings}, "test"))


def source(*groups: tuple[str, str, int], size: int = 1000) -> FileRecord:
    """A file of `groups` (endpoint, model, count), lines numbered in group order."""
    file_groups, line = [], 1
    for endpoint, model, count in groups:
        file_groups.append(FileGroup(endpoint, model, count, list(range(line, line + min(count, 10)))))
        line += count
    return FileRecord(id="file-1", project="p", filename="in.jsonl", purpose=FilePurpose.BATCH, bytes=size,
                      sha256="", created_at=0.0, line_count=line - 1, groups=file_groups)


def plan(src, router=None, providers=None, *, endpoint="", model="", model_map=None, provider="", spread=False):
    return plan_batch(src, endpoint=endpoint, model=model, model_map=model_map or {}, provider=provider,
                      spread=spread, router=router or router_for(), providers=providers or registry())


def shares(result) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in result.parts:
        out[part.deployment_id] = out.get(part.deployment_id, 0) + part.count
    return out


# -- one group: today's single job ----------------------------------------------------------------


def test_a_homogeneous_file_is_one_part_not_sharded():
    result = plan(source((CHAT, "chat", 40)), endpoint=CHAT)
    assert not result.sharded
    assert result.parts == [PlannedPart(CHAT, "chat", "oai-chat", 0, 40)]
    assert result.deployments["oai-chat"].model_name == "chat"


def test_a_file_stored_before_groups_is_one_group_from_its_own_fields():
    old = FileRecord(id="f", project="p", filename="x", purpose=FilePurpose.BATCH, bytes=10, sha256="",
                     created_at=0.0, line_count=25, endpoint=CHAT, model="chat")
    assert file_groups(old) == [FileGroup(CHAT, "chat", 25, list(range(1, 11)))]
    assert plan(old).parts == [PlannedPart(CHAT, "chat", "oai-chat", 0, 25)]


def test_over_the_providers_request_or_byte_limit_is_sharded_even_on_one_part():
    small = registry(openai=Provider(JobLimits(max_requests=30, max_bytes=5000)))
    assert plan(source((CHAT, "chat", 31)), providers=small).sharded
    assert plan(source((CHAT, "chat", 30), size=5001), providers=small).sharded
    assert not plan(source((CHAT, "chat", 30), size=5000), providers=small).sharded


def test_the_requested_model_routes_every_line_and_the_provider_filter_applies():
    result = plan(source((CHAT, "gpt-4o-mini", 5)), model="claude", provider="anthropic")
    assert result.parts == [PlannedPart(CHAT, "gpt-4o-mini", "an-claude", 0, 5)]


# -- mixed files, model_map, deployment ids ---------------------------------------------------------


def test_a_mixed_file_is_one_part_per_group_in_file_order():
    result = plan(source((CHAT, "chat", 3), (EMBED, "embed", 4)))
    assert result.sharded
    assert result.parts == [PlannedPart(CHAT, "chat", "oai-chat", 0, 3),
                            PlannedPart(EMBED, "embed", "oai-embed", 0, 4)]


def test_model_map_wins_over_model_which_wins_over_the_files():
    src = source((CHAT, "gpt-4o", 3), (CHAT, "gpt-4o-mini", 2), (EMBED, "embed", 4))
    result = plan(src, model="chat", model_map={"gpt-4o": "an-claude"})
    assert [(p.model, p.deployment_id) for p in result.parts] == [
        ("gpt-4o", "an-claude"), ("gpt-4o-mini", "oai-chat"), ("embed", "oai-chat")]


def test_a_deployment_id_target_pins_that_deployment_of_a_pool():
    result = plan(source((CHAT, "gpt-4o-mini", 10)), model_map={"gpt-4o-mini": "pool-c"})
    assert result.parts == [PlannedPart(CHAT, "gpt-4o-mini", "pool-c", 0, 10)] and not result.sharded


def test_two_groups_of_one_target_share_its_deployments_out():
    router = router_for()
    result = plan(source((CHAT, "a", 30), (CHAT, "b", 30)), router, model="pool")
    # pool-b (weight 2) first, then pool-a (it now has 0 vs pool-b's 30/2)
    assert [p.deployment_id for p in result.parts] == ["pool-b", "pool-a"]


# -- errors ---------------------------------------------------------------------------------------------


def test_an_endpoint_other_than_a_groups_names_the_groups_lines():
    src = source((CHAT, "chat", 2), (EMBED, "embed", 12), (EMBED, "chat", 1))
    with pytest.raises(InvalidArgument) as ei:
        plan(src, endpoint=CHAT)
    err = ei.value
    assert err.reason == "ENDPOINT_MISMATCH" and err.metadata["file_endpoint"] == EMBED
    assert [(v.field, v.description) for v in err.violations] == [
        ("endpoint", "lines 3, 4, 5, 6, 7, 8, 9, 10, 11, 12 and 2 more: url /v1/embeddings"),
        ("endpoint", "line 15: url /v1/embeddings")]
    assert "line 15" in err.message


def test_every_unroutable_model_is_named_once_with_its_lines():
    src = source((CHAT, "chat", 2), (CHAT, "mystery", 3), (EMBED, "ghost", 1), (CHAT, "mapped", 1))
    with pytest.raises(InvalidArgument) as ei:
        plan(src, model_map={"mapped": "nowhere"})
    err = ei.value
    assert err.reason == "MODEL_NOT_FOUND" and err.metadata["model"] == "mystery,ghost,nowhere"
    assert [(v.field, v.description) for v in err.violations] == [
        ("input_file.model", "lines 3, 4, 5: no deployment serves model 'mystery'"),
        ("input_file.model", "line 6: no deployment serves model 'ghost'"),
        ("model_map[mapped]", "line 7: no deployment serves model 'nowhere'")]
    assert "'mystery' (lines 3, 4, 5)" in err.message and "configured model names: chat" in err.message


def test_a_model_map_key_no_line_has_is_refused_not_ignored():
    with pytest.raises(InvalidArgument) as ei:
        plan(source((CHAT, "gpt-4o", 3)), model_map={"gpt4o": "chat"})  # a typo would run them on gpt-4o
    err = ei.value
    assert (err.reason, err.metadata["model"]) == ("INVALID_MODEL_MAP", "gpt4o")
    assert err.violations[0].field == "model_map[gpt4o]" and "'gpt-4o'" in err.message


def test_an_unknown_requested_model_names_the_model_field():
    with pytest.raises(InvalidArgument) as ei:
        plan(source((CHAT, "chat", 2)), model="gpt-17")
    assert ei.value.violations[0].field == "model" and ei.value.metadata["model"] == "gpt-17"


def test_a_providers_refusal_is_mapped_once_for_every_part():
    providers = registry(openai=Provider(JobLimits(), refuse_endpoint=EMBED))
    with pytest.raises(InvalidArgument) as ei:
        plan(source((CHAT, "chat", 2), (EMBED, "embed", 2)), providers=providers)
    assert ei.value.reason == "UNSUPPORTED_ENDPOINT" and ei.value.metadata["provider"] == "openai"
    assert ei.value.violations[0].field == "endpoint"
    assert providers.get("openai").checked == [(CHAT, "oai-chat", 2), (EMBED, "oai-embed", 2)]


def test_a_part_over_the_request_limit_is_checked_as_one_of_its_jobs():
    providers = registry(openai=Provider(JobLimits(max_requests=30)))
    assert plan(source((CHAT, "chat", 95)), providers=providers).sharded
    assert providers.get("openai").checked == [(CHAT, "oai-chat", 30)]


def test_a_provider_missing_from_the_build_is_invalid_argument():
    with pytest.raises(InvalidArgument) as ei:
        plan(source((CHAT, "chat", 2)), providers=Registry())
    assert ei.value.reason == "PROVIDER_UNAVAILABLE"


# -- minimums ---------------------------------------------------------------------------------------------


def test_a_part_below_bedrocks_minimum_goes_to_a_deployment_that_takes_it():
    router = router_for()
    router.add_load("an-claude", 10_000)  # the Bedrock one is less loaded, but needs 100
    result = plan(source((CHAT, "claude", 40)), router)
    assert result.parts == [PlannedPart(CHAT, "claude", "an-claude", 0, 40)]
    # 100 or more stay on the least loaded
    assert shares(plan(source((CHAT, "claude", 100)), router)) == {"br-claude": 100}


def test_below_the_minimum_with_nowhere_else_is_refused_with_the_numbers():
    with pytest.raises(FailedPrecondition) as ei:
        plan(source((EMBED, "embed", 5), (EMBED, "titan", 42)))
    err = ei.value
    assert err.reason == "BATCH_TOO_SMALL"
    assert err.metadata == {"minimum": "100", "line_count": "42", "deployment": "br-titan", "model": "titan",
                            "lines": "lines 6, 7, 8, 9, 10, 11, 12, 13, 14, 15 and 32 more"}
    assert "at least 100" in err.message and "42" in err.message


def test_a_deployments_own_minimum_overrides_its_providers():
    model_list = [dep("m", "openai/gpt-4o-mini", "m-1", min_batch_requests=50),
                  dep("m", "openai/gpt-4o-mini", "m-2")]
    router = router_for(model_list)
    router.add_load("m-2", 1000)
    assert shares(plan(source((CHAT, "m", 49)), router)) == {"m-2": 49}
    assert shares(plan(source((CHAT, "m", 50)), router)) == {"m-1": 50}


# -- spread -------------------------------------------------------------------------------------------------


def test_spread_cuts_by_weight():
    result = plan(source((CHAT, "pool", 400)), spread=True)
    assert result.sharded
    assert [(p.deployment_id, p.start, p.end) for p in result.parts] == [
        ("pool-a", 0, 100), ("pool-b", 100, 300), ("pool-c", 300, 400)]


def test_spread_fills_up_to_the_same_level_counting_queued_load():
    router = router_for()
    router.add_load("pool-a", 150)  # queued per weight: a 150, b 0, c 0
    # level L with 400 new: (400 + 150) / 4 = 137.5 < 150, so a gets none; (400) / 3 = 133.3
    assert shares(plan(source((CHAT, "pool", 400)), router, spread=True)) == {"pool-b": 267, "pool-c": 133}
    router.add_load("pool-c", 20)
    # a: 150/1, b: 0/2, c: 20/1 -> L = (400 + 20) / 3 = 140 -> b 280, c 120
    assert shares(plan(source((CHAT, "pool", 400)), router, spread=True)) == {"pool-b": 280, "pool-c": 120}


def test_spread_is_deterministic_and_gives_leftovers_by_remainder_then_order():
    one = plan(source((CHAT, "pool", 7)), spread=True)
    assert shares(one) == {"pool-a": 2, "pool-b": 3, "pool-c": 2}
    assert plan(source((CHAT, "pool", 7)), spread=True).parts == one.parts
    assert shares(plan(source((CHAT, "pool", 1)), spread=True)) == {"pool-b": 1}


def test_a_spread_share_below_a_minimum_is_given_to_the_others():
    model_list = [dep("m", "openai/gpt-4o-mini", "m-big", weight=9),
                  dep("m", "openai/gpt-4o-mini", "m-small", min_batch_requests=30)]
    # m-small's share of 200 would be 20 < 30: all of it goes to m-big
    assert shares(plan(source((CHAT, "m", 200)), router_for(model_list), spread=True)) == {"m-big": 200}
    assert shares(plan(source((CHAT, "m", 300)), router_for(model_list), spread=True)) == {"m-big": 270,
                                                                                          "m-small": 30}


def test_the_model_list_turns_spread_on():
    assert shares(plan(source((CHAT, "spready", 10)))) == {"sp-1": 5, "sp-2": 5}
    everywhere = router_for(spread_batches=True)
    assert shares(plan(source((CHAT, "pool", 4)), everywhere)) == {"pool-a": 1, "pool-b": 2, "pool-c": 1}
    # a model with one deployment has nothing to spread over: still today's single job
    assert not plan(source((CHAT, "chat", 4)), everywhere).sharded


def test_spread_skips_deployments_cooling_down():
    router = router_for(allowed_fails=0)
    router.record_failure("pool-b")
    assert shares(plan(source((CHAT, "pool", 10)), router, spread=True)) == {"pool-a": 5, "pool-c": 5}


def test_water_fill_with_no_deployment_able_to_take_a_share_is_empty():
    pool = [Deployment("x", "m", "openai", "m"), Deployment("y", "m", "openai", "m")]
    assert water_fill(10, pool, {}, {"x": 20, "y": 20}) == []
    assert water_fill(10, pool, {}, {"x": 20}) == [(pool[1], 10)]
