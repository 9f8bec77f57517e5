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

Keys LiteLLM knows but batchgate does not use are ignored with a warning; a wrong
type is a start-up error naming the entry. Secrets never reach logs or errors.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from batchgate_server.providers.base import Deployment

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
                   "batchgate"}
KNOWN_ENTRY_KEYS = {"model_name", "litellm_params", "model_info"}
SECRET_PARAMS = {"api_key", "aws_secret_access_key", "aws_session_token", "vertex_credentials", "aws_access_key_id"}

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
    allowed_fails: int = 3  # failures within cooldown_time before it cools down


@dataclass
class ModelList:
    deployments: list[Deployment]
    router: RouterSettings = field(default_factory=RouterSettings)
    source: str = "embedded"

    def by_id(self, deployment_id: str) -> Deployment | None:
        return next((d for d in self.deployments if d.id == deployment_id), None)

    def named(self, model_name: str) -> list[Deployment]:
        return [d for d in self.deployments if d.model_name == model_name]


def resolve_env(value: Any, where: str) -> Any:
    if isinstance(value, str) and value.startswith("os.environ/"):
        name = value.removeprefix("os.environ/")
        if name not in os.environ:
            raise ConfigError(f"{where}: environment variable {name} is not set")
        return os.environ[name]
    return value


def split_model(model: str) -> tuple[str, str]:
    prefix, sep, rest = model.partition("/")
    if sep and prefix in PROVIDER_ALIASES:
        return PROVIDER_ALIASES[prefix], rest
    return "", model


def _deployment_id(entry_name: str, params: Mapping[str, Any], info: Mapping[str, Any]) -> str:
    if info.get("id"):
        return str(info["id"])
    basis = "|".join(str(params.get(k, "")) for k in ("model", "api_base", "api_version", "vertex_project",
                                                      "vertex_location", "aws_region_name"))
    return "dep_" + hashlib.sha256(f"{entry_name}|{basis}".encode()).hexdigest()[:16]


def parse_entry(entry: Any, index: int) -> Deployment:
    where = f"model_list[{index}]"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: must be a mapping, got {type(entry).__name__}")
    name = entry.get("model_name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: model_name must be a non-empty string")
    where = f"{where} ({name})"
    for key in set(entry) - KNOWN_ENTRY_KEYS:
        log.warning("%s: ignoring unknown key %r", where, key)
    params = entry.get("litellm_params")
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}: litellm_params must be a mapping")
    info = entry.get("model_info") or {}
    if not isinstance(info, Mapping):
        raise ConfigError(f"{where}: model_info must be a mapping")
    model = params.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{where}: litellm_params.model must be a string like 'openai/gpt-4o-mini'")
    resolved = {k: resolve_env(v, f"{where}: litellm_params.{k}") for k, v in params.items()}
    provider, provider_model = split_model(model)
    if not provider:
        raise ConfigError(f"{where}: litellm_params.model {model!r} needs a provider prefix, one of "
                          f"{', '.join(sorted(PROVIDER_ALIASES))}")
    if model.startswith("simulated/"):
        resolved.setdefault("transport", "simulated")
    # An OpenAI-compatible server reached through `openai/` can opt into the executor.
    if info.get("batch_executor") == "builtin":
        provider = "openai_compatible"
    weight = resolved.get("weight", 1)
    if not isinstance(weight, (int, float)) or weight <= 0:
        raise ConfigError(f"{where}: litellm_params.weight must be a positive number")
    for key in ("rpm", "tpm", "max_concurrency", "timeout", "max_retries"):
        if key in resolved and not isinstance(resolved[key], (int, float)):
            raise ConfigError(f"{where}: litellm_params.{key} must be a number")
    return Deployment(id=_deployment_id(name, resolved, info), model_name=name, provider=provider,
                      model=provider_model, params=resolved, model_info=dict(info), weight=float(weight))


def parse_config(doc: Any, source: str) -> ModelList:
    if doc is None:
        doc = {}
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{source}: the config must be a mapping with a model_list")
    for key in set(doc) - KNOWN_TOP_LEVEL:
        log.warning("%s: ignoring unknown top-level key %r", source, key)
    entries = doc.get("model_list") or []
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: model_list must be a list")
    deployments = [parse_entry(e, i) for i, e in enumerate(entries)]
    seen: dict[str, str] = {}
    for d in deployments:
        if d.id in seen:
            raise ConfigError(f"{source}: two deployments share the id {d.id!r} ({seen[d.id]} and {d.model_name});"
                              " give them distinct model_info.id")
        seen[d.id] = d.model_name
    rs = doc.get("router_settings") or {}
    router = RouterSettings(cooldown_time=float(rs.get("cooldown_time", 60.0)),
                            allowed_fails=int(rs.get("allowed_fails", 3)))
    return ModelList(deployments, router, source)


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
    """litellm_params safe to log."""
    return {k: ("***" if k in SECRET_PARAMS else v) for k, v in params.items()}
