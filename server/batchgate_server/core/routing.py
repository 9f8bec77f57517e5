"""Which deployments may run a batch's lines, and which of them is least loaded.

A target name (CreateBatch.model_map[body.model], CreateBatch.model, or the file's body.model)
resolves to the deployments of that model_name, else to the deployment whose id (model_info.id)
it is, else to "provider/model" with credentials from the provider's usual environment
variables (`candidates`). core/shard_plan.py plans every line group of a file with these: the
deployment with the fewest queued requests per unit of weight wins (`least_loaded`), a
deployment that keeps failing cools down (`warm`). A batch stays on its deployment for life (the
id is stored with it).
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Mapping

from batchgate_server.config import ModelList, split_model
from batchgate_server.domain.deployment import Deployment

ADHOC_PREFIX = "adhoc:"

# provider -> litellm_params key -> environment variable
ENV_CREDENTIALS: dict[str, dict[str, str]] = {
    "openai": {"api_key": "OPENAI_API_KEY", "api_base": "OPENAI_API_BASE"},
    "azure": {"api_key": "AZURE_API_KEY", "api_base": "AZURE_API_BASE", "api_version": "AZURE_API_VERSION"},
    "anthropic": {"api_key": "ANTHROPIC_API_KEY", "api_base": "ANTHROPIC_API_BASE"},
    "vertex_ai": {"vertex_project": "VERTEXAI_PROJECT", "vertex_location": "VERTEXAI_LOCATION",
                  "gcs_bucket_name": "GCS_BUCKET_NAME", "vertex_credentials": "GOOGLE_APPLICATION_CREDENTIALS"},
    "bedrock": {"aws_region_name": "AWS_REGION_NAME", "s3_bucket_name": "AWS_S3_BUCKET_NAME",
                "aws_batch_role_arn": "AWS_BATCH_ROLE_ARN"},
    "openai_compatible": {"api_base": "OPENAI_COMPATIBLE_API_BASE", "api_key": "OPENAI_COMPATIBLE_API_KEY"},
}


def adhoc_deployment(model: str) -> Deployment | None:
    """A deployment for "provider/model" with credentials from the environment."""
    provider, name = split_model(model)
    if not provider or not name:
        return None
    params = {"model": model}
    for key, env in ENV_CREDENTIALS.get(provider, {}).items():
        if os.environ.get(env):
            params[key] = os.environ[env]
    if model.startswith("simulated/"):
        params["transport"] = "simulated"
    return Deployment(id=ADHOC_PREFIX + model, model_name=model, provider=provider, model=name, params=params,
                      ad_hoc=True)


class Router:
    def __init__(self, model_list: ModelList, clock: Callable[[], float] = time.monotonic) -> None:
        self.model_list = model_list
        self._clock = clock
        # Only deployments with queued requests: an ad-hoc deployment leaves no entry once its
        # batches end, however many model names clients try.
        self._queued: dict[str, int] = {}
        self._failures: dict[str, list[float]] = defaultdict(list)
        self._cooldown_until: dict[str, float] = {}

    # -- choosing -------------------------------------------------------------------

    def candidates(self, name: str, provider: str = "") -> list[Deployment]:
        """Every deployment `name` resolves to, in model-list order: the deployments of that
        model_name, else the one whose id (model_info.id) it is, else "provider/model" with
        credentials from the environment; only those of `provider` when set. Empty: no route."""
        found = self.model_list.named(name)
        if not found and (by_id := self.model_list.by_id(name)) is not None:
            found = [by_id]
        if not found and (d := adhoc_deployment(name)) is not None:
            found = [d]
        return [d for d in found if d.provider == provider] if provider else found

    def warm(self, candidates: list[Deployment]) -> list[Deployment]:
        """The candidates not cooling down; all of them when every one is (still served)."""
        now = self._clock()
        return [d for d in candidates if self._cooldown_until.get(d.id, 0) <= now] or candidates

    def least_loaded(self, candidates: list[Deployment], planned: Mapping[str, int] | None = None) -> Deployment:
        """The candidate with the fewest queued requests per unit of weight (the heavier on a tie,
        then the first), counting `planned` requests (by deployment id) as queued too."""
        planned = planned or {}
        return min(candidates, key=lambda d: ((self.queued(d.id) + planned.get(d.id, 0)) / d.weight, -d.weight))

    def configured_names(self) -> list[str]:
        return sorted({d.model_name for d in self.model_list.deployments})

    def deployment(self, deployment_id: str) -> Deployment | None:
        """The deployment a stored batch is pinned to (also after a restart)."""
        if deployment_id.startswith(ADHOC_PREFIX):
            return adhoc_deployment(deployment_id.removeprefix(ADHOC_PREFIX))
        return self.model_list.by_id(deployment_id)

    # -- feedback from the tracker ---------------------------------------------------

    def add_load(self, deployment_id: str, requests: int) -> None:
        self._queued[deployment_id] = self.queued(deployment_id) + requests

    def remove_load(self, deployment_id: str, requests: int) -> None:
        left = self.queued(deployment_id) - requests
        if left > 0:
            self._queued[deployment_id] = left
            return
        self._queued.pop(deployment_id, None)
        if deployment_id.startswith(ADHOC_PREFIX):
            # The only candidate for its name: its failures and cooldown steer nothing.
            self._failures.pop(deployment_id, None)
            self._cooldown_until.pop(deployment_id, None)

    def queued(self, deployment_id: str) -> int:
        return self._queued.get(deployment_id, 0)

    def record_failure(self, deployment_id: str) -> None:
        """Like LiteLLM: more than allowed_fails failures within a minute cool the deployment
        down for cooldown_time seconds."""
        settings = self.model_list.router
        now = self._clock()
        recent = [t for t in self._failures[deployment_id] if now - t < settings.failure_window] + [now]
        self._failures[deployment_id] = recent
        if len(recent) > settings.allowed_fails:
            self._cooldown_until[deployment_id] = now + settings.cooldown_time
            self._failures[deployment_id] = []

    def record_success(self, deployment_id: str) -> None:
        self._failures.pop(deployment_id, None)

    def cooling_down(self, deployment_id: str) -> bool:
        return self._cooldown_until.get(deployment_id, 0) > self._clock()
