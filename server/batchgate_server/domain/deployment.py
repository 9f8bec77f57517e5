"""A deployment: one entry of the model list (config.py builds them, routing picks one per batch,
providers run batches on it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Deployment:
    """One entry of the model list: where and how a model_name is served."""

    id: str  # stable across restarts: batches are pinned to it
    model_name: str  # what callers ask for
    provider: str  # openai | azure | anthropic | vertex_ai | bedrock | openai_compatible
    model: str  # the provider's own model name (Azure: deployment name)
    # litellm_params, secrets resolved: kept out of repr() so a logged deployment or job shows no key
    params: Mapping[str, Any] = field(default_factory=dict, repr=False)
    model_info: Mapping[str, Any] = field(default_factory=dict)
    weight: float = 1.0
    # Named by a caller ("provider/model"), not in the model list: a provider keeps nothing for
    # it past its batches, or every name a caller tries would stay in memory.
    ad_hoc: bool = False
