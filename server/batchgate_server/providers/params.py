"""Reading Deployment.params (litellm_params): numbers with a default, settings with an
environment fallback."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any


def float_param(params: Mapping[str, Any], key: str, default: float) -> float:
    """`params[key]` as a float; `default` when unset, empty or not a number."""
    value = params.get(key)
    try:
        return float(value) if value is not None and value != "" else default
    except (TypeError, ValueError):
        return default


def int_param(params: Mapping[str, Any], key: str, default: int) -> int:
    """`params[key]` as an int; `default` when unset, empty or not an integer."""
    value = params.get(key)
    try:
        return int(value) if value is not None and value != "" else default
    except (TypeError, ValueError):
        return default


def param_or_env(params: Mapping[str, Any], keys: tuple[str, ...], envs: tuple[str, ...]) -> Any:
    """The first non-empty of `params[key]` for `keys`, else of the environment variables `envs`;
    None when all are unset or empty."""
    for key in keys:
        value = params.get(key)
        if value not in (None, ""):
            return value
    return next((os.environ[e] for e in envs if os.environ.get(e)), None)
