"""The model list: LiteLLM's config format, accepted as-is.

    model_list:
      - model_name: gpt-4o-mini                 # what callers ask for
        litellm_params:
          model: openai/gpt-4o-mini            # provider/model
          api_key: os.environ/OPENAI_API_KEY   # resolved from the environment at load
          weight: 2                            # load-balancing weight (optional)
        model_info:
          id: oai-main                         # stable deployment id (optional)
          input_cost_per_token_batches: 7.5e-8 # price overrides (optional)

Unknown top-level and entry keys are ignored with a warning (litellm_settings,
general_settings … are accepted and ignored); a wrong type is a start-up error naming the
entry. `os.environ/NAME` also reads the config's environment_variables section. Secrets
never reach logs or errors (messages name the variable or the type, never a value).

router_settings as LiteLLM reads them: a deployment that fails more than allowed_fails
times within a minute is skipped for cooldown_time seconds (while another is warm).
batchgate's own: router_settings.spread_batches (every batch), or model_info.spread_batches on a
model's deployments (that model's batches), cut a batch across all deployments of its model
(core/shard_plan.py), as CreateBatch.spread does.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from batchgate_server.domain.deployment import Deployment
from batchgate_server.domain.models import ProjectQuota
from batchgate_server.pricing.cost import amount_to_nanos
from batchgate_server.domain.webhooks import (
    ALL_EVENTS,
    WebhookEndpoint,
    secret_key,
    webhook_events_problem,
    webhook_url_problem,
)
from batchgate_server.pricing.table import PRICE_KEYS

log = logging.getLogger(__name__)

# provider prefix in litellm_params.model -> batchgate provider
PROVIDER_ALIASES = {
    "openai": "openai",
    "azure": "azure",
    "anthropic": "anthropic",
    "vertex_ai": "vertex_ai",
    "vertex_ai_beta": "vertex_ai",
    "gemini": "vertex_ai",
    "bedrock": "bedrock",
    "openai_compatible": "openai_compatible",
    "hosted_vllm": "openai_compatible",
    "vllm": "openai_compatible",
    "ollama": "openai_compatible",
    "ollama_chat": "openai_compatible",
    "llamacpp": "openai_compatible",
    "lm_studio": "openai_compatible",
    "simulated": "openai_compatible",
}
KNOWN_TOP_LEVEL = {"model_list", "litellm_settings", "router_settings", "general_settings", "environment_variables",
                   "batchgate", "project_quotas", "webhooks"}
# project_quotas.<project>.<key>: integer limits, and monthly_budget as a USD amount.
QUOTA_LIMIT_KEYS = ("max_running_batches", "max_stored_bytes", "max_uploads")
KNOWN_WEBHOOK_KEYS = {"id", "project", "url", "secret", "events"}
KNOWN_ENTRY_KEYS = {"model_name", "litellm_params", "model_info"}
SECRET_PARAMS = {"api_key", "aws_secret_access_key", "aws_session_token", "vertex_credentials", "aws_access_key_id",
                 "azure_ad_token", "client_secret", "aws_bedrock_runtime_endpoint_token"}
_SECRET_SUFFIXES = ("key", "secret", "token", "password", "credentials")
# litellm_params that must be strings when present (None means "not set")
STRING_PARAMS = ("api_key", "api_base", "api_version", "organization", "azure_ad_token", "vertex_project",
                 "vertex_location", "aws_region_name", "aws_access_key_id", "aws_secret_access_key",
                 "aws_session_token", "custom_llm_provider")
# LiteLLM infers the provider of a bare model name; batchgate does so for these families
_BARE_MODEL_PROVIDERS = (("gpt-", "openai"), ("chatgpt-", "openai"), ("o1", "openai"), ("o3", "openai"),
                         ("o4", "openai"), ("text-embedding-", "openai"), ("omni-moderation", "openai"),
                         ("text-moderation", "openai"), ("claude-", "anthropic"))
# LiteLLM counts a deployment's failures per minute (allowed_fails "per minute")
FAILURE_WINDOW_SECONDS = 60.0

# Without a config file batchgate still runs batches: on the in-process simulated model.
EMBEDDED_MODEL_LIST: list[dict[str, Any]] = [
    {"model_name": "simulated",
     "litellm_params": {"model": "simulated/echo", "latency_ms": 20, "max_concurrency": 64},
     # Simulated answers cost nothing: priced at zero rather than "unknown".
     "model_info": {"id": "builtin-simulated", "mode": "batch", "input_cost_per_token": 0,
                    "output_cost_per_token": 0, "input_cost_per_token_batches": 0,
                    "output_cost_per_token_batches": 0}},
]


class ConfigError(Exception):
    pass


@dataclass
class RouterSettings:
    cooldown_time: float = 60.0  # seconds a failing deployment is skipped
    allowed_fails: int = 3  # failures tolerated within a minute; one more and it cools down
    failure_window: float = FAILURE_WINDOW_SECONDS
    # Every batch is cut across all deployments of its model (CreateBatch.spread for all).
    spread_batches: bool = False


@dataclass
class ModelList:
    deployments: list[Deployment]
    router: RouterSettings = field(default_factory=RouterSettings)
    source: str = "embedded"
    quotas: dict[str, ProjectQuota] = field(default_factory=dict)  # project_quotas, by project
    webhooks: list[WebhookEndpoint] = field(default_factory=list)  # the config file's webhooks section

    def by_id(self, deployment_id: str) -> Deployment | None:
        return next((d for d in self.deployments if d.id == deployment_id), None)

    def named(self, model_name: str) -> list[Deployment]:
        return [d for d in self.deployments if d.model_name == model_name]


def resolve_env(value: Any, where: str, extra_env: Mapping[str, str] | None = None) -> Any:
    """`os.environ/NAME` -> the variable's value (the config's environment_variables section first,
    as LiteLLM sets those into the environment). Errors name the variable, never a value."""
    if isinstance(value, str) and value.startswith("os.environ/"):
        name = value.removeprefix("os.environ/").strip()
        if extra_env and name in extra_env:
            return extra_env[name]
        if not name or name not in os.environ:
            raise ConfigError(f"{where}: environment variable {name or '(empty name)'} is not set")
        return os.environ[name]
    return value


def is_secret_param(key: str) -> bool:
    return key in SECRET_PARAMS or key.lower().endswith(_SECRET_SUFFIXES)


def split_model(model: str) -> tuple[str, str]:
    prefix, sep, rest = model.partition("/")
    if sep and prefix in PROVIDER_ALIASES:
        return PROVIDER_ALIASES[prefix], rest
    return "", model


def _deployment_id(entry_name: str, params: Mapping[str, Any], info: Mapping[str, Any],
                   raw_params: Mapping[str, Any] | None = None) -> str:
    if info.get("id"):
        return str(info["id"])
    basis = "|".join(str(params.get(k, "")) for k in ("model", "api_base", "api_version", "vertex_project",
                                                      "vertex_location", "aws_region_name"))
    # Two accounts serving the same model differ only by their key. Use the key's reference
    # (os.environ/NAME: stable when the key is rotated) or, for a literal key, its hash.
    raw_key = (raw_params or {}).get("api_key")
    if isinstance(raw_key, str) and raw_key.startswith("os.environ/"):
        basis += "|" + raw_key
    elif raw_key:
        basis += "|" + hashlib.sha256(str(raw_key).encode()).hexdigest()
    return "dep_" + hashlib.sha256(f"{entry_name}|{basis}".encode()).hexdigest()[:16]


def _provider_of(model: str, params: Mapping[str, Any]) -> tuple[str, str]:
    """(batchgate provider, provider model) of litellm_params.model, as LiteLLM reads it."""
    provider, provider_model = split_model(model)
    if provider:
        return provider, provider_model
    explicit = params.get("custom_llm_provider")
    if isinstance(explicit, str) and explicit in PROVIDER_ALIASES:
        return PROVIDER_ALIASES[explicit], model
    for prefix, inferred in _BARE_MODEL_PROVIDERS:
        if model.startswith(prefix):
            return inferred, model
    return "", model


def _check_number(value: Any, where: str, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and value <= 0):
        raise ConfigError(f"{where} must be a {'positive ' if positive else ''}number, got {type(value).__name__}")


def parse_entry(entry: Any, index: int, extra_env: Mapping[str, str] | None = None) -> Deployment:
    where = f"model_list[{index}]"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: must be a mapping, got {type(entry).__name__}")
    name = entry.get("model_name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: model_name must be a non-empty string")
    where = f"{where} ({name})"
    for key in sorted(set(entry) - KNOWN_ENTRY_KEYS, key=str):
        log.warning("%s: ignoring unknown key %r", where, key)
    params = entry.get("litellm_params")
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}: litellm_params must be a mapping, got {type(params).__name__}")
    info = entry.get("model_info")
    if info is None:
        info = {}
    if not isinstance(info, Mapping):
        raise ConfigError(f"{where}: model_info must be a mapping, got {type(info).__name__}")
    resolved = {k: resolve_env(v, f"{where}: litellm_params.{k}", extra_env) for k, v in params.items()}
    model = resolved.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{where}: litellm_params.model must be a string like 'openai/gpt-4o-mini'")
    for key in STRING_PARAMS:
        value = resolved.get(key)
        if value is not None and not isinstance(value, str):
            # the type only: the value may be a secret
            raise ConfigError(f"{where}: litellm_params.{key} must be a string, got {type(value).__name__}")
    provider, provider_model = _provider_of(model, resolved)
    if not provider:
        raise ConfigError(f"{where}: litellm_params.model {model!r} needs a provider prefix, one of "
                          f"{', '.join(sorted(PROVIDER_ALIASES))}")
    if model.startswith("simulated/"):
        resolved.setdefault("transport", "simulated")
    # An OpenAI-compatible server reached through `openai/` can opt into the executor.
    if info.get("batch_executor") == "builtin":
        provider = "openai_compatible"
    weight = resolved.get("weight", 1)
    _check_number(weight, f"{where}: litellm_params.weight", positive=True)
    for key in ("rpm", "tpm", "max_concurrency", "timeout", "max_retries", "poll_interval", "backoff_base",
                "give_up_after"):
        if key in resolved and resolved[key] is not None:
            _check_number(resolved[key], f"{where}: litellm_params.{key}")
    _check_model_info(info, where)
    return Deployment(id=_deployment_id(name, resolved, info, params), model_name=name, provider=provider,
                      model=provider_model, params=resolved, model_info=dict(info), weight=float(weight))


def _check_model_info(info: Mapping[str, Any], where: str) -> None:
    for key in ("id", "mode", "base_model"):
        value = info.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
            raise ConfigError(f"{where}: model_info.{key} must be a string, got {type(value).__name__}")
    spread = info.get("spread_batches")
    if spread is not None and not isinstance(spread, bool):
        raise ConfigError(f"{where}: model_info.spread_batches must be true or false, got {type(spread).__name__}")
    for key in PRICE_KEYS:
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, str):  # "1e-6": PyYAML reads exponents without a dot as strings
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: model_info.{key} must be a number, got {info[key]!r}") from None
        _check_number(value, f"{where}: model_info.{key}")
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{where}: model_info.{key} must be a finite number >= 0, got {info[key]!r}")


def _mapping(doc: Mapping[str, Any], key: str, source: str) -> Mapping[str, Any]:
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {key} must be a mapping, got {type(value).__name__}")
    return value


def _router_settings(doc: Mapping[str, Any], source: str) -> RouterSettings:
    rs = _mapping(doc, "router_settings", source)
    # LiteLLM reads these from router_settings; litellm_settings is an older home for them.
    ls = _mapping(doc, "litellm_settings", source)
    settings = RouterSettings()
    for key, cast in (("cooldown_time", float), ("allowed_fails", int)):
        section, value = ("router_settings", rs[key]) if rs.get(key) is not None else \
            ("litellm_settings", ls.get(key))
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{source}: {section}.{key} must be a number >= 0, got {value!r}")
        setattr(settings, key, cast(value))
    spread = rs.get("spread_batches")
    if spread is not None:
        if not isinstance(spread, bool):
            raise ConfigError(f"{source}: router_settings.spread_batches must be true or false, got {spread!r}")
        settings.spread_batches = spread
    strategy = rs.get("routing_strategy")
    if strategy not in (None, "simple-shuffle", "least-busy"):
        log.warning("%s: router_settings.routing_strategy %r is not supported; batchgate routes to the "
                    "deployment with the fewest queued requests per unit of weight", source, strategy)
    return settings


def parse_config(doc: Any, source: str) -> ModelList:
    if doc is None:
        doc = {}
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{source}: the config must be a mapping with a model_list")
    for key in sorted(set(doc) - KNOWN_TOP_LEVEL, key=str):
        log.warning("%s: ignoring unknown top-level key %r", source, key)
    env_section = _mapping(doc, "environment_variables", source)
    extra_env = {str(k): str(v) for k, v in env_section.items() if v is not None}
    entries = doc.get("model_list") or []
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: model_list must be a list, got {type(entries).__name__}")
    try:
        deployments = [parse_entry(e, i, extra_env) for i, e in enumerate(entries)]
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    seen: dict[str, str] = {}
    for d in deployments:
        if d.id in seen:
            raise ConfigError(f"{source}: two deployments share the id {d.id!r} ({seen[d.id]} and {d.model_name});"
                              " give them distinct model_info.id")
        seen[d.id] = d.model_name
    return ModelList(deployments, _router_settings(doc, source), source, _project_quotas(doc, source),
                     _webhooks(doc, source, extra_env))


def _project_quotas(doc: Mapping[str, Any], source: str) -> dict[str, ProjectQuota]:
    quotas = {}
    for project, entry in _mapping(doc, "project_quotas", source).items():
        where = f"{source}: project_quotas.{project}"
        if not isinstance(project, str) or not project:
            raise ConfigError(f"{source}: project_quotas keys must be project names")
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where} must be a mapping")
        for key in sorted(set(entry) - {*QUOTA_LIMIT_KEYS, "monthly_budget"}, key=str):
            raise ConfigError(f"{where}: unknown key {key!r}; use {', '.join(QUOTA_LIMIT_KEYS)} or monthly_budget")
        quota = ProjectQuota(project)
        for key in QUOTA_LIMIT_KEYS:
            value = entry.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{where}.{key} must be an integer >= 0, got {value!r}")
            setattr(quota, key, value)
        if entry.get("monthly_budget") is not None:
            quota.monthly_budget_nanos = amount_to_nanos(str(entry["monthly_budget"]))
            if quota.monthly_budget_nanos is None:
                raise ConfigError(f"{where}.monthly_budget must be a USD amount >= 0 such as \"250.00\","
                                  f" got {entry['monthly_budget']!r}")
        quotas[project] = quota
    return quotas


def _webhooks(doc: Mapping[str, Any], source: str, extra_env: Mapping[str, str]) -> list[WebhookEndpoint]:
    """The `webhooks` section: [{project, url, secret: os.environ/NAME, events: [...], id}]."""
    entries = doc.get("webhooks") or []
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: webhooks must be a list, got {type(entries).__name__}")
    endpoints: dict[str, WebhookEndpoint] = {}
    for i, entry in enumerate(entries):
        where = f"{source}: webhooks[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: must be a mapping, got {type(entry).__name__}")
        for key in sorted(set(entry) - KNOWN_WEBHOOK_KEYS, key=str):
            log.warning("%s: ignoring unknown key %r", where, key)
        project, url = entry.get("project"), entry.get("url")
        if not isinstance(project, str) or not project:
            raise ConfigError(f"{where}: project must be a non-empty string")
        if problem := webhook_url_problem(url):
            raise ConfigError(f"{where}: url {problem}")
        secret = resolve_env(entry.get("secret"), f"{where}: secret", extra_env)
        if not isinstance(secret, str):
            raise ConfigError(f"{where}: secret must be a string, got {type(secret).__name__}")
        try:
            secret_key(secret)
        except ValueError as err:  # names the rule, never the value
            raise ConfigError(f"{where}: secret: {err}") from None
        events = entry.get("events", None)
        if events is not None and (problem := webhook_events_problem(events)):
            raise ConfigError(f"{where}: events {problem}")
        endpoint_id = entry.get("id") or "wh_cfg_" + hashlib.sha256(f"{project}|{url}".encode()).hexdigest()[:16]
        if not isinstance(endpoint_id, str):
            raise ConfigError(f"{where}: id must be a string")
        if endpoint_id in endpoints:
            raise ConfigError(f"{where}: two webhooks share the id {endpoint_id!r}; give them distinct ids")
        endpoints[endpoint_id] = WebhookEndpoint(id=endpoint_id, project=project, url=url, secret=secret,
                                                 events=tuple(events or ALL_EVENTS), from_config=True)
    return list(endpoints.values())


def load_model_list(path: Path | None) -> ModelList:
    if path is None:
        return parse_config({"model_list": EMBEDDED_MODEL_LIST}, "embedded defaults")
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: {err}") from None
    model_list = parse_config(doc, str(path))
    if not any(d.model_name == "simulated" for d in model_list.deployments):
        model_list.deployments.extend(parse_config({"model_list": EMBEDDED_MODEL_LIST}, "embedded").deployments)
    return model_list


def redact(params: Mapping[str, Any]) -> dict[str, Any]:
    """litellm_params safe to log: secret-looking keys masked (set values only)."""
    return {k: ("***" if is_secret_param(str(k)) and v not in (None, "") else v) for k, v in params.items()}
