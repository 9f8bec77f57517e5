"""The model list: a LiteLLM proxy config accepted unchanged, clear errors naming the entry,
secrets resolved from the environment and never shown."""

from __future__ import annotations

import logging
import textwrap

import pytest
import yaml

from batchgate_server.config import (
    ConfigError,
    load_model_list,
    parse_config,
    redact,
)

SECRET = "sk-proj-VERY-SECRET-0123456789"
AZURE_SECRET = "az-SECRET-abcdef"

# A config as a LiteLLM proxy user has it, with every section LiteLLM knows.
LITELLM_CONFIG = textwrap.dedent("""\
    model_list:
      - model_name: gpt-4o-mini
        litellm_params:
          model: openai/gpt-4o-mini
          api_key: os.environ/TEST_OPENAI_KEY
          rpm: 500
          tpm: 200000
          weight: 2
        model_info:
          id: oai-main
          mode: batch
          input_cost_per_token_batches: 7.5e-8
          output_cost_per_token_batches: 3.0e-7
      - model_name: gpt-4o-mini
        litellm_params:
          model: azure/my-gpt4o-mini-batch
          api_base: os.environ/TEST_AZURE_BASE
          api_key: os.environ/TEST_AZURE_KEY
          api_version: "2024-10-21"
        model_info:
          mode: batch
          base_model: azure/gpt-4o-mini
          input_cost_per_token_batches: "1e-7"
      - model_name: claude
        litellm_params:
          model: anthropic/claude-3-5-haiku-20241022
          api_key: os.environ/TEST_ANTHROPIC_KEY
      - model_name: local
        litellm_params:
          model: hosted_vllm/meta-llama/Llama-3.1-8B-Instruct
          api_base: http://vllm:8000/v1
    litellm_settings:
      drop_params: true
      num_retries: 3
      request_timeout: 600
      success_callback: ["langfuse"]
      cache: true
    router_settings:
      routing_strategy: simple-shuffle
      cooldown_time: 30
      allowed_fails: 2
      num_retries: 2
      redis_host: os.environ/REDIS_HOST
    general_settings:
      master_key: sk-1234
      database_url: postgresql://user:pass@db:5432/litellm
    environment_variables:
      TEST_ANTHROPIC_KEY: sk-ant-from-config
""")


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("TEST_OPENAI_KEY", SECRET)
    monkeypatch.setenv("TEST_AZURE_KEY", AZURE_SECRET)
    monkeypatch.setenv("TEST_AZURE_BASE", "https://res.openai.azure.com")
    monkeypatch.delenv("TEST_ANTHROPIC_KEY", raising=False)
    return monkeypatch


def entry(**litellm_params) -> dict:
    params = {"model": "openai/gpt-4o-mini", "api_key": "sk-x"}
    params.update(litellm_params)
    return {"model_name": "m", "litellm_params": params}


def config_error(doc) -> str:
    with pytest.raises(ConfigError) as ei:
        parse_config(doc, "test.yaml")
    return str(ei.value)


# -- accepted unchanged ---------------------------------------------------------------------------


def test_litellm_config_is_accepted_unchanged(env, tmp_path, caplog):
    path = tmp_path / "litellm.yaml"
    path.write_text(LITELLM_CONFIG)
    with caplog.at_level(logging.DEBUG):
        ml = load_model_list(path)
    assert ml.source == str(path)
    by_name = {}
    for d in ml.deployments:
        by_name.setdefault(d.model_name, []).append(d)
    assert set(by_name) == {"gpt-4o-mini", "claude", "local", "simulated"}  # the built-in model is added

    oai, azure = by_name["gpt-4o-mini"]
    assert (oai.id, oai.provider, oai.model, oai.weight) == ("oai-main", "openai", "gpt-4o-mini", 2.0)
    assert oai.params["api_key"] == SECRET and oai.params["rpm"] == 500
    assert oai.model_info["mode"] == "batch"
    assert oai.model_info["input_cost_per_token_batches"] == pytest.approx(7.5e-8)
    assert (azure.provider, azure.model) == ("azure", "my-gpt4o-mini-batch")
    assert azure.params["api_base"] == "https://res.openai.azure.com"
    assert azure.params["api_key"] == AZURE_SECRET and azure.params["api_version"] == "2024-10-21"
    assert azure.id.startswith("dep_") and azure.weight == 1.0
    # environment_variables from the config feed os.environ/NAME (LiteLLM sets them in the env)
    assert by_name["claude"][0].params["api_key"] == "sk-ant-from-config"
    assert by_name["claude"][0].provider == "anthropic"
    local = by_name["local"][0]
    assert (local.provider, local.model) == ("openai_compatible", "meta-llama/Llama-3.1-8B-Instruct")
    assert (ml.router.cooldown_time, ml.router.allowed_fails) == (30.0, 2)

    text = caplog.text
    assert SECRET not in text and AZURE_SECRET not in text and "sk-ant-from-config" not in text
    # known LiteLLM sections are not "unknown"
    assert "unknown" not in text


def test_the_same_config_gives_the_same_deployment_ids(env, tmp_path):
    path = tmp_path / "litellm.yaml"
    path.write_text(LITELLM_CONFIG)
    first = [d.id for d in load_model_list(path).deployments]
    # A reordered model list keeps every deployment's id (batches are pinned to them).
    doc = yaml.safe_load(LITELLM_CONFIG)
    doc["model_list"].reverse()
    second = [d.id for d in parse_config(doc, "reordered").deployments]
    assert sorted(first[:4]) == sorted(second)


def test_rotating_a_key_behind_os_environ_keeps_the_id(monkeypatch):
    doc = {"model_list": [entry(api_key="os.environ/ROTATED_KEY")]}
    monkeypatch.setenv("ROTATED_KEY", "sk-old")
    before = parse_config(doc, "a").deployments[0].id
    monkeypatch.setenv("ROTATED_KEY", "sk-new")
    assert parse_config(doc, "a").deployments[0].id == before


def test_two_accounts_for_one_model_are_two_deployments(monkeypatch):
    monkeypatch.setenv("KEY_A", "sk-a")
    monkeypatch.setenv("KEY_B", "sk-b")
    ml = parse_config({"model_list": [entry(api_key="os.environ/KEY_A"), entry(api_key="os.environ/KEY_B"),
                                      entry(api_key="sk-literal-1"), entry(api_key="sk-literal-2")]}, "x")
    ids = [d.id for d in ml.deployments]
    assert len(set(ids)) == 4
    assert not any("sk-literal" in i for i in ids)


def test_identical_entries_are_a_clear_error():
    message = config_error({"model_list": [entry(), entry()]})
    assert "share the id" in message and "model_info.id" in message


def test_bare_model_names_as_litellm_infers_them():
    ml = parse_config({"model_list": [
        {"model_name": "a", "litellm_params": {"model": "gpt-4o-mini", "api_key": "k"}},
        {"model_name": "b", "litellm_params": {"model": "claude-3-5-haiku-20241022", "api_key": "k"}},
        {"model_name": "c", "litellm_params": {"model": "my-model", "custom_llm_provider": "azure",
                                               "api_key": "k", "api_base": "https://r"}},
    ]}, "x")
    assert [(d.provider, d.model) for d in ml.deployments] == [
        ("openai", "gpt-4o-mini"), ("anthropic", "claude-3-5-haiku-20241022"), ("azure", "my-model")]


def test_without_a_config_file_the_simulated_model_serves():
    ml = load_model_list(None)
    assert [d.model_name for d in ml.deployments] == ["simulated"]
    assert ml.deployments[0].provider == "openai_compatible"


def test_a_config_that_names_simulated_is_not_extended(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model_list": [
        {"model_name": "simulated", "litellm_params": {"model": "simulated/echo"}}]}))
    assert len(load_model_list(path).deployments) == 1


@pytest.mark.parametrize("doc", [None, {}, {"model_list": None}, {"model_list": []}])
def test_an_empty_config_is_fine(doc):
    assert parse_config(doc, "x").deployments == []


# -- unknown keys: warned and ignored -----------------------------------------------------------------


def test_unknown_keys_are_ignored_with_a_warning(caplog):
    doc = {"model_list": [dict(entry(), tpm_limit=5, deployment_notes="x")], "fancy_feature": {"on": True}}
    with caplog.at_level(logging.WARNING, logger="batchgate_server.config"):
        ml = parse_config(doc, "test.yaml")
    assert len(ml.deployments) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("fancy_feature" in w and "test.yaml" in w for w in warnings)
    assert any("model_list[0] (m)" in w and "'tpm_limit'" in w for w in warnings)
    assert any("model_list[0] (m)" in w and "'deployment_notes'" in w for w in warnings)


def test_an_unsupported_routing_strategy_is_warned(caplog):
    with caplog.at_level(logging.WARNING, logger="batchgate_server.config"):
        parse_config({"model_list": [], "router_settings": {"routing_strategy": "latency-based-routing"}}, "x")
    assert "latency-based-routing" in caplog.text


# -- wrong types: start-up errors naming the entry ----------------------------------------------------


@pytest.mark.parametrize("doc, expected", [
    ([], "must be a mapping with a model_list"),
    ({"model_list": {"a": 1}}, "model_list must be a list"),
    ({"model_list": ["gpt-4o"]}, "model_list[0]: must be a mapping, got str"),
    ({"model_list": [{"litellm_params": {"model": "openai/x"}}]}, "model_list[0]: model_name must be"),
    ({"model_list": [{"model_name": 5, "litellm_params": {"model": "openai/x"}}]}, "model_list[0]: model_name"),
    ({"model_list": [{"model_name": "m"}]}, "model_list[0] (m): litellm_params must be a mapping"),
    ({"model_list": [{"model_name": "m", "litellm_params": ["openai/x"]}]},
     "model_list[0] (m): litellm_params must be a mapping, got list"),
    ({"model_list": [{"model_name": "m", "litellm_params": {"model": "openai/x"}, "model_info": "batch"}]},
     "model_list[0] (m): model_info must be a mapping"),
    ({"model_list": [{"model_name": "m", "litellm_params": {"api_key": "k"}}]},
     "model_list[0] (m): litellm_params.model must be a string"),
    ({"model_list": [{"model_name": "m", "litellm_params": {"model": 4}}]},
     "model_list[0] (m): litellm_params.model must be a string"),
    ({"model_list": [{"model_name": "m", "litellm_params": {"model": "nowhere/x"}}]},
     "model_list[0] (m): litellm_params.model 'nowhere/x' needs a provider prefix"),
    ({"model_list": [entry(), {"model_name": "n", "litellm_params": {"model": "openai/x", "weight": "heavy"}}]},
     "model_list[1] (n): litellm_params.weight must be a positive number, got str"),
    ({"model_list": [entry(weight=0)]}, "model_list[0] (m): litellm_params.weight must be a positive number"),
    ({"model_list": [entry(weight=True)]}, "litellm_params.weight must be a positive number, got bool"),
    ({"model_list": [entry(rpm="many")]}, "model_list[0] (m): litellm_params.rpm must be a number"),
    ({"model_list": [entry(poll_interval=[1])]}, "model_list[0] (m): litellm_params.poll_interval must be"),
    ({"model_list": [entry(api_base=["http://a", "http://b"])]},
     "model_list[0] (m): litellm_params.api_base must be a string, got list"),
    ({"model_list": [entry(api_version=2024)]}, "model_list[0] (m): litellm_params.api_version must be a string"),
    ({"model_list": [dict(entry(), model_info={"input_cost_per_token_batches": "cheap"})]},
     "model_list[0] (m): model_info.input_cost_per_token_batches must be a number"),
    ({"model_list": [dict(entry(), model_info={"output_cost_per_token": -1})]},
     "model_list[0] (m): model_info.output_cost_per_token must be a finite number >= 0"),
    ({"model_list": [dict(entry(), model_info={"mode": ["batch"]})]},
     "model_list[0] (m): model_info.mode must be a string"),
    ({"model_list": [], "router_settings": ["cooldown_time"]}, "router_settings must be a mapping"),
    ({"model_list": [], "router_settings": {"cooldown_time": "a minute"}},
     "router_settings.cooldown_time must be a number >= 0"),
    ({"model_list": [], "router_settings": {"allowed_fails": -1}}, "router_settings.allowed_fails must be"),
    ({"model_list": [], "environment_variables": ["A=1"]}, "environment_variables must be a mapping"),
    ({"model_list": [], "router_settings": {"spread_batches": "yes"}},
     "router_settings.spread_batches must be true or false, got 'yes'"),
    ({"model_list": [dict(entry(), model_info={"spread_batches": 1})]},
     "model_list[0] (m): model_info.spread_batches must be true or false, got int"),
])
def test_wrong_types_are_errors_naming_the_entry(doc, expected):
    message = config_error(doc)
    assert expected in message
    assert message.startswith("test.yaml")


def test_spread_batches_in_router_settings_and_model_info():
    assert parse_config({"model_list": []}, "x").router.spread_batches is False
    spread = parse_config({"model_list": [dict(entry(), model_info={"spread_batches": True})],
                           "router_settings": {"spread_batches": True}}, "x")
    assert spread.router.spread_batches is True and spread.deployments[0].model_info["spread_batches"] is True


def test_a_wrong_typed_key_is_named_by_type_not_value():
    message = config_error({"model_list": [entry(api_key=12345678987654321)]})
    assert "litellm_params.api_key must be a string, got int" in message
    assert "12345678987654321" not in message


def test_unreadable_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model_list: [\n  - model_name: x\n   bad: indentation")
    with pytest.raises(ConfigError) as ei:
        load_model_list(path)
    assert str(path) in str(ei.value)
    with pytest.raises(ConfigError):
        load_model_list(tmp_path / "missing.yaml")


# -- environment and secrets ----------------------------------------------------------------------------


def test_a_missing_environment_variable_names_the_variable_and_the_entry(monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    monkeypatch.setenv("OTHER_SECRET", SECRET)
    message = config_error({"model_list": [
        {"model_name": "good", "litellm_params": {"model": "openai/x", "api_key": "os.environ/OTHER_SECRET"}},
        {"model_name": "bad", "litellm_params": {"model": "openai/x", "api_key": "os.environ/NOT_SET_ANYWHERE"}},
    ]})
    assert "model_list[1] (bad)" in message and "litellm_params.api_key" in message
    assert "NOT_SET_ANYWHERE is not set" in message
    assert SECRET not in message


def test_every_litellm_param_resolves_os_environ(monkeypatch):
    monkeypatch.setenv("AZ_BASE", "https://r.openai.azure.com")
    monkeypatch.setenv("AZ_VERSION", "2024-10-21")
    monkeypatch.setenv("AZ_KEY", AZURE_SECRET)
    monkeypatch.setenv("AZ_DEPLOYMENT", "azure/prod-gpt4o")
    d = parse_config({"model_list": [{"model_name": "gpt-4o", "litellm_params": {
        "model": "os.environ/AZ_DEPLOYMENT", "api_base": "os.environ/AZ_BASE",
        "api_version": "os.environ/AZ_VERSION", "api_key": "os.environ/AZ_KEY"}}]}, "x").deployments[0]
    assert (d.provider, d.model) == ("azure", "prod-gpt4o")
    assert dict(d.params) == {"model": "azure/prod-gpt4o", "api_base": "https://r.openai.azure.com",
                              "api_version": "2024-10-21", "api_key": AZURE_SECRET}


def test_environment_variables_section_wins_over_the_process_environment(monkeypatch):
    monkeypatch.setenv("SHARED_KEY", "from-process")
    d = parse_config({"model_list": [entry(api_key="os.environ/SHARED_KEY")],
                      "environment_variables": {"SHARED_KEY": "from-config"}}, "x").deployments[0]
    assert d.params["api_key"] == "from-config"


def test_redact_hides_secrets():
    params = {"model": "azure/x", "api_key": SECRET, "api_base": "https://r", "api_version": "v",
              "azure_ad_token": "eyJ-token", "aws_secret_access_key": "aws-s3cr3t", "aws_access_key_id": "AKIA9",
              "aws_session_token": "FwoGZXIvYXdzE", "vertex_credentials": "{json}", "client_secret": "c5c5c5",
              "max_tokens": 100, "weight": 2, "organization": "org-1", "unset_key": None}
    shown = redact(params)
    text = repr(shown)
    for secret in (SECRET, "eyJ-token", "aws-s3cr3t", "AKIA9", "FwoGZXIvYXdzE", "{json}", "c5c5c5"):
        assert secret not in text
    assert shown["api_key"] == "***"
    # what is not secret stays readable (for debugging a deployment)
    assert shown["api_base"] == "https://r" and shown["max_tokens"] == 100 and shown["weight"] == 2
    assert shown["model"] == "azure/x" and shown["organization"] == "org-1" and shown["unset_key"] is None
    assert params["api_key"] == SECRET  # the input is not modified


def test_a_deployment_repr_shows_no_secret(env, tmp_path):
    path = tmp_path / "litellm.yaml"
    path.write_text(LITELLM_CONFIG)
    ml = load_model_list(path)
    text = repr(ml.deployments)
    assert SECRET not in text and AZURE_SECRET not in text


@pytest.mark.parametrize(("quotas", "message"), [
    ({"p": {"max_running_batches": -1}}, "max_running_batches must be an integer >= 0"),
    ({"p": {"max_stored_bytes": "10GB"}}, "max_stored_bytes must be an integer >= 0"),
    ({"p": {"max_uploads": True}}, "max_uploads must be an integer >= 0"),
    ({"p": {"monthly_budget": "lots"}}, "monthly_budget must be a USD amount"),
    ({"p": {"monthly_budget": -5}}, "monthly_budget must be a USD amount"),
    ({"p": {"max_batches": 3}}, "unknown key 'max_batches'"),
    ({"p": 3}, "project_quotas.p must be a mapping"),
    ([1], "project_quotas must be a mapping"),
])
def test_bad_project_quotas_are_clear_errors(quotas, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"project_quotas": quotas}, "cfg.yaml")


def test_project_quotas_are_read_with_unset_limits_as_none():
    quotas = parse_config({"project_quotas": {"p": {"max_uploads": 0, "monthly_budget": 12.5}}}, "cfg.yaml").quotas
    assert quotas["p"].max_uploads == 0 and quotas["p"].monthly_budget_nanos == 12_500_000_000
    assert quotas["p"].max_running_batches is None and quotas["p"].max_stored_bytes is None


# -- webhooks --------------------------------------------------------------------------------

WEBHOOK_SECRET = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"  # base64 of 27 bytes


def test_the_webhooks_section_reads_endpoints_with_secrets_from_the_environment(monkeypatch):
    monkeypatch.setenv("TEST_HOOK_SECRET", WEBHOOK_SECRET)
    parsed = parse_config({"webhooks": [
        {"project": "search", "url": "https://hooks.example/a", "secret": "os.environ/TEST_HOOK_SECRET"},
        {"project": "ads", "url": "http://10.0.0.7:8080/b", "secret": WEBHOOK_SECRET, "events": ["batch.failed"],
         "id": "ads-main"}]}, "c.yaml")
    first, second = parsed.webhooks
    assert (first.project, first.secret, first.from_config) == ("search", WEBHOOK_SECRET, True)
    assert first.events == ("batch.completed", "batch.failed", "batch.expired", "batch.cancelled")
    assert first.id.startswith("wh_cfg_") and first.id == parse_config(
        {"webhooks": [{"project": "search", "url": "https://hooks.example/a", "secret": WEBHOOK_SECRET}]},
        "c.yaml").webhooks[0].id  # stable across restarts: outbox rows keep naming it
    assert (second.id, second.events) == ("ads-main", ("batch.failed",))
    assert WEBHOOK_SECRET not in repr(parsed)


@pytest.mark.parametrize("entry, message", [
    ({"url": "https://h.example/a", "secret": WEBHOOK_SECRET}, "project must be a non-empty string"),
    ({"project": "p", "url": "ftp://h.example/a", "secret": WEBHOOK_SECRET}, "url must be an http"),
    ({"project": "p", "url": 7, "secret": WEBHOOK_SECRET}, "url must be a string"),
    ({"project": "p", "url": "https://h.example/a", "secret": "whsec_not*base64*" + "x" * 30}, "secret: a webhook"),
    ({"project": "p", "url": "https://h.example/a", "secret": "sk-plain-token-value-0123456789"}, "secret: a webhook"),
    ({"project": "p", "url": "https://h.example/a", "secret": "os.environ/NOT_SET_ANYWHERE"}, "NOT_SET_ANYWHERE"),
    ({"project": "p", "url": "https://h.example/a", "secret": WEBHOOK_SECRET, "events": ["batch.done"]},
     "unknown event types"),
    ({"project": "p", "url": "https://h.example/a", "secret": WEBHOOK_SECRET, "events": []}, "non-empty list"),
])
def test_a_bad_webhook_entry_is_a_clear_error_that_never_shows_the_secret(entry, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_config({"webhooks": [entry]}, "c.yaml")
    assert "webhooks[0]" in str(err.value)
    secret = entry.get("secret", "")
    assert not secret.startswith(("whsec_", "sk-")) or secret.removeprefix("whsec_") not in str(err.value)


def test_two_webhooks_with_one_id_are_an_error():
    entry = {"project": "p", "url": "https://h.example/a", "secret": WEBHOOK_SECRET}
    with pytest.raises(ConfigError, match="share the id"):
        parse_config({"webhooks": [entry, dict(entry)]}, "c.yaml")
