"""Router: which deployment runs a batch (aliases, provider/model from the environment,
least-queued per weight, cooldown, stickiness by deployment id), as CreateBatch's plan uses it."""

from __future__ import annotations

from collections import Counter

import pytest

from batchgate_server.config import parse_config
from batchgate_server.core.errors import InvalidArgument
from batchgate_server.core.routing import ADHOC_PREFIX, Router
from batchgate_server.core.shard_plan import plan_batch
from batchgate_server.domain.deployment import Deployment
from batchgate_server.domain.models import FilePurpose, FileRecord
from batchgate_server.domain.shards import FileGroup, JobLimits


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def dep(name: str, model: str, dep_id: str, **params) -> dict:
    return {"model_name": name, "litellm_params": {"model": model, "api_key": f"key-{dep_id}", **params},
            "model_info": {"id": dep_id, "mode": "batch"}}


CONFIG = {
    "model_list": [
        dep("gpt-4o-mini", "openai/gpt-4o-mini", "oai-a"),
        dep("gpt-4o-mini", "openai/gpt-4o-mini", "oai-b"),
        dep("gpt-4o-mini", "azure/mini-batch", "az", api_base="https://r.openai.azure.com"),
        dep("gpt-4o", "openai/gpt-4o-2024-08-06", "oai-4o"),
        dep("heavy", "openai/gpt-4o-mini", "heavy-3", weight=3),
        dep("heavy", "openai/gpt-4o-mini", "heavy-1", weight=1),
    ],
    "router_settings": {"cooldown_time": 30, "allowed_fails": 2},
}


class AnyProvider:
    """Takes every job: these tests are about the router's choice, not a provider's checks."""

    def limits(self, endpoint: str, deployment: Deployment) -> JobLimits:
        return JobLimits()

    def check(self, endpoint: str, deployment: Deployment, line_count: int) -> None:
        pass


class AnyProviders:
    def get(self, name: str) -> AnyProvider:
        return AnyProvider()


def pick(router: Router, *, requested_model: str, file_model: str, provider: str = "") -> Deployment:
    """The deployment CreateBatch gives a file of one group (core/shard_plan.py), as the router ranks them."""
    source = FileRecord(id="file-1", project="p", filename="in.jsonl", purpose=FilePurpose.BATCH, bytes=100,
                        sha256="", created_at=0.0, line_count=1,
                        groups=[FileGroup("/v1/chat/completions", file_model, 1, [1])])
    plan = plan_batch(source, endpoint="", model=requested_model, model_map={}, provider=provider, spread=False,
                      router=router, providers=AnyProviders())
    (part,) = plan.parts
    return plan.deployments[part.deployment_id]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def router(clock) -> Router:
    return Router(parse_config(CONFIG, "test"), clock=clock)


def place(router: Router, n: int, load: int, **choice) -> Counter:
    """Pick n times, adding each pick's load as the tracker does."""
    placed: Counter = Counter()
    for _ in range(n):
        d = pick(router, **choice)
        router.add_load(d.id, load)
        placed[d.id] += 1
    return placed


# -- resolution ----------------------------------------------------------------------------------


def test_requested_model_is_a_model_name(router):
    d = pick(router, requested_model="gpt-4o", file_model="something-else")
    assert (d.id, d.provider, d.model, d.model_name) == ("oai-4o", "openai", "gpt-4o-2024-08-06", "gpt-4o")


def test_the_files_model_is_used_when_none_is_requested(router):
    d = pick(router, requested_model="", file_model="gpt-4o")
    assert d.id == "oai-4o"


def test_a_requested_model_wins_over_the_files(router):
    assert pick(router, requested_model="gpt-4o", file_model="gpt-4o-mini").id == "oai-4o"


def test_unknown_model_is_invalid_argument_naming_it(router):
    with pytest.raises(InvalidArgument) as ei:
        pick(router, requested_model="", file_model="gpt-9")
    err = ei.value
    assert err.reason == "MODEL_NOT_FOUND" and err.metadata["model"] == "gpt-9"
    assert "'gpt-9'" in err.message and "gpt-4o-mini" in err.message  # lists what exists
    assert err.violations[0].field == "input_file.model"
    with pytest.raises(InvalidArgument) as ei:
        pick(router, requested_model="nope", file_model="gpt-4o")
    assert ei.value.violations[0].field == "model" and ei.value.metadata["model"] == "nope"


def test_a_requested_model_that_does_not_exist_does_not_fall_back_to_the_files(router):
    with pytest.raises(InvalidArgument):
        pick(router, requested_model="nope", file_model="gpt-4o")


def test_candidates_resolve_a_model_name_then_a_deployment_id_then_provider_model(router, monkeypatch):
    assert [d.id for d in router.candidates("gpt-4o-mini")] == ["oai-a", "oai-b", "az"]
    assert [d.id for d in router.candidates("gpt-4o-mini", "azure")] == ["az"]
    assert [d.id for d in router.candidates("heavy-1")] == ["heavy-1"]  # a deployment id: that one only
    assert pick(router, requested_model="oai-b", file_model="").id == "oai-b"
    assert router.candidates("heavy-1", "azure") == []
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    assert [d.id for d in router.candidates("openai/gpt-4.1")] == [ADHOC_PREFIX + "openai/gpt-4.1"]
    assert router.candidates("nothing-like-it") == []


def test_least_loaded_counts_planned_requests_too(router):
    pool = router.candidates("heavy")  # heavy-3 (weight 3), heavy-1
    router.add_load("heavy-3", 30)
    assert router.least_loaded(pool).id == "heavy-1"  # 10 per weight against 0
    assert router.least_loaded(pool, {"heavy-1": 11}).id == "heavy-3"


def test_provider_filter(router):
    assert pick(router, requested_model="gpt-4o-mini", file_model="", provider="azure").id == "az"
    placed = place(router, 4, 10, requested_model="gpt-4o-mini", file_model="", provider="openai")
    assert set(placed) == {"oai-a", "oai-b"}
    with pytest.raises(InvalidArgument) as ei:
        pick(router, requested_model="gpt-4o", file_model="", provider="azure")
    assert "provider 'azure'" in ei.value.message and ei.value.metadata["provider"] == "azure"


# -- provider/model with credentials from the environment -------------------------------------------------


def test_provider_model_with_env_credentials(router, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    monkeypatch.setenv("OPENAI_API_BASE", "http://fake/v1")
    d = pick(router, requested_model="openai/gpt-4.1-mini", file_model="gpt-4.1-mini")
    assert (d.provider, d.model, d.model_name) == ("openai", "gpt-4.1-mini", "openai/gpt-4.1-mini")
    assert d.id == ADHOC_PREFIX + "openai/gpt-4.1-mini"
    assert d.params["api_key"] == "sk-env" and d.params["api_base"] == "http://fake/v1"
    assert "sk-env" not in repr(d)
    # from the file's model too
    assert pick(router, requested_model="", file_model="openai/gpt-4.1-nano").model == "gpt-4.1-nano"


def test_azure_provider_model_with_env_credentials(router, monkeypatch):
    monkeypatch.setenv("AZURE_API_KEY", "az-env")
    monkeypatch.setenv("AZURE_API_BASE", "https://env.openai.azure.com")
    monkeypatch.setenv("AZURE_API_VERSION", "2024-10-21")
    d = pick(router, requested_model="azure/my-deployment", file_model="")
    assert (d.provider, d.model) == ("azure", "my-deployment")
    assert {k: d.params[k] for k in ("api_key", "api_base", "api_version")} == {
        "api_key": "az-env", "api_base": "https://env.openai.azure.com", "api_version": "2024-10-21"}


def test_provider_model_without_env_has_no_credentials(router, monkeypatch):
    for name in ("OPENAI_API_KEY", "OPENAI_API_BASE"):
        monkeypatch.delenv(name, raising=False)
    d = pick(router, requested_model="openai/gpt-4.1", file_model="")
    assert "api_key" not in d.params  # the provider's check() reports it as not configured


def test_a_model_name_wins_over_provider_model(clock):
    config = {"model_list": [dep("openai/gpt-4o-mini", "azure/mini", "az-alias", api_base="https://r")]}
    router = Router(parse_config(config, "t"), clock=clock)
    assert pick(router, requested_model="openai/gpt-4o-mini", file_model="").id == "az-alias"


@pytest.mark.parametrize("name", ["unknown/gpt-4o", "gpt-4o-mini-typo", "openai/", "/x"])
def test_not_a_provider_model(router, name):
    with pytest.raises(InvalidArgument):
        pick(router, requested_model=name, file_model="")


# -- load balancing ----------------------------------------------------------------------------------------


def test_least_queued_first(router):
    placed = place(router, 10, 100, requested_model="gpt-4o-mini", file_model="")
    assert placed == Counter({"oai-a": 4, "oai-b": 3, "az": 3})  # round robin; ties go in list order


def test_queued_requests_not_batches_decide(router):
    router.add_load("oai-a", 5000)  # one huge batch
    placed = place(router, 8, 100, requested_model="gpt-4o-mini", file_model="")
    assert placed["oai-a"] == 0 and placed["oai-b"] + placed["az"] == 8


def test_load_is_released_when_batches_end(router):
    router.add_load("oai-a", 50)
    router.add_load("oai-b", 10)
    router.add_load("az", 10)
    assert pick(router, requested_model="gpt-4o-mini", file_model="").id != "oai-a"
    router.remove_load("oai-a", 50)
    assert router.queued("oai-a") == 0
    assert pick(router, requested_model="gpt-4o-mini", file_model="").id == "oai-a"
    router.remove_load("oai-a", 999)  # never negative
    assert router.queued("oai-a") == 0


def test_weights_are_honoured(router):
    placed = place(router, 40, 100, requested_model="heavy", file_model="")
    assert placed == Counter({"heavy-3": 30, "heavy-1": 10})


def test_weights_with_uneven_batches(router):
    for load in [50, 200, 10, 400, 30, 120, 80, 60, 5, 300] * 3:
        d = pick(router, requested_model="heavy", file_model="")
        router.add_load(d.id, load)
    ratio = router.queued("heavy-3") / router.queued("heavy-1")
    assert 2.0 <= ratio <= 4.5


# -- cooldown ----------------------------------------------------------------------------------------------


def test_cooldown_after_more_than_allowed_fails_within_a_minute(router, clock):
    # allowed_fails=2: two failures are tolerated, the third cools oai-a down
    router.record_failure("oai-a")
    clock.advance(5)
    router.record_failure("oai-a")
    assert not router.cooling_down("oai-a")
    assert pick(router, requested_model="gpt-4o-mini", file_model="").id == "oai-a"
    clock.advance(5)
    router.record_failure("oai-a")
    assert router.cooling_down("oai-a")
    placed = place(router, 6, 10, requested_model="gpt-4o-mini", file_model="")
    assert placed["oai-a"] == 0 and placed["oai-b"] == placed["az"] == 3
    # cooldown_time=30 s later it serves again (and, least loaded, first)
    clock.advance(29.9)
    assert router.cooling_down("oai-a")
    clock.advance(0.2)
    assert not router.cooling_down("oai-a")
    assert pick(router, requested_model="gpt-4o-mini", file_model="").id == "oai-a"


def test_failures_spread_over_more_than_a_minute_do_not_cool_down(router, clock):
    for _ in range(10):
        router.record_failure("oai-a")
        clock.advance(31)  # at most two failures in any minute
    assert not router.cooling_down("oai-a")


def test_success_forgets_earlier_failures(router, clock):
    router.record_failure("oai-a")
    router.record_failure("oai-a")
    router.record_success("oai-a")
    router.record_failure("oai-a")
    assert not router.cooling_down("oai-a")


def test_failures_count_again_after_a_cooldown(router, clock):
    for _ in range(3):
        router.record_failure("oai-a")
    clock.advance(31)
    assert not router.cooling_down("oai-a")
    router.record_failure("oai-a")  # one new failure is not a new cooldown
    assert not router.cooling_down("oai-a")


def test_when_every_deployment_cools_down_the_least_loaded_still_serves(router, clock):
    for dep_id in ("heavy-3", "heavy-1"):
        for _ in range(3):
            router.record_failure(dep_id)
    assert router.cooling_down("heavy-3") and router.cooling_down("heavy-1")
    router.add_load("heavy-3", 100)
    assert pick(router, requested_model="heavy", file_model="").id == "heavy-1"


def test_allowed_fails_zero_cools_down_on_the_first_failure(clock):
    ml = parse_config({"model_list": CONFIG["model_list"], "router_settings": {"allowed_fails": 0,
                                                                               "cooldown_time": 5}}, "t")
    router = Router(ml, clock=clock)
    router.record_failure("oai-b")
    assert router.cooling_down("oai-b")
    clock.advance(5.01)
    assert not router.cooling_down("oai-b")


def test_litellm_defaults(clock):
    router = Router(parse_config({"model_list": CONFIG["model_list"]}, "t"), clock=clock)
    for _ in range(3):
        router.record_failure("oai-a")
    assert not router.cooling_down("oai-a")  # allowed_fails defaults to 3
    router.record_failure("oai-a")
    assert router.cooling_down("oai-a")
    clock.advance(59)
    assert router.cooling_down("oai-a")  # cooldown_time defaults to 60 s
    clock.advance(2)
    assert not router.cooling_down("oai-a")


# -- stickiness --------------------------------------------------------------------------------------------


def test_deployment_by_id_survives_a_new_router_and_reordered_config(clock):
    first = Router(parse_config(CONFIG, "t"), clock=clock)
    reordered = dict(CONFIG, model_list=list(reversed(CONFIG["model_list"])))
    second = Router(parse_config(reordered, "t"), clock=clock)
    for d in first.model_list.deployments:
        again = second.deployment(d.id)
        assert again is not None
        assert (again.provider, again.model, again.params["api_key"]) == (d.provider, d.model, d.params["api_key"])


def test_derived_ids_are_stable_without_model_info_id(clock, monkeypatch):
    monkeypatch.setenv("KEY_ONE", "sk-1")
    monkeypatch.setenv("KEY_TWO", "sk-2")
    config = {"model_list": [
        {"model_name": "m", "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "os.environ/KEY_ONE"}},
        {"model_name": "m", "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "os.environ/KEY_TWO"}},
    ]}
    router = Router(parse_config(config, "t"), clock=clock)
    ids = {d.params["api_key"]: d.id for d in router.model_list.deployments}
    restarted = Router(parse_config(config, "t"), clock=clock)
    assert restarted.deployment(ids["sk-1"]).params["api_key"] == "sk-1"
    assert restarted.deployment(ids["sk-2"]).params["api_key"] == "sk-2"


def test_adhoc_ids_resolve_again_from_the_environment(router, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    d = pick(router, requested_model="openai/gpt-4.1-mini", file_model="")
    restarted = Router(parse_config(CONFIG, "t"))
    again = restarted.deployment(d.id)
    assert again == d


def test_an_id_no_longer_configured_is_none(router):
    assert router.deployment("removed-deployment") is None
    assert router.deployment(ADHOC_PREFIX + "nowhere/x") is None


def test_an_ad_hoc_deployment_leaves_nothing_once_its_batches_end(router):
    # Failures and cooldowns of a deployment named by a caller steer nothing (it is the only
    # candidate for its name), and one entry per name tried would stay forever.
    deployment = ADHOC_PREFIX + "simulated/echo-1"
    router.add_load(deployment, 3)
    for _ in range(4):
        router.record_failure(deployment)
    router.remove_load(deployment, 3)
    assert deployment not in {*router._queued, *router._failures, *router._cooldown_until}
