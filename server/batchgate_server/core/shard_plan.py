"""CreateBatch's routing plan: which deployment runs which lines of the input file.

PLACEHOLDER (issue 14, "core"): one group (the file's endpoint and model), on the deployment
Router.pick gives, sharded when the file is over one job of its provider. The full planner
(mixed files, model_map, spread, minimums) replaces this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from batchgate_server.core.routing import Router
from batchgate_server.domain.deployment import Deployment
from batchgate_server.domain.models import FileRecord
from batchgate_server.domain.shards import PlannedPart
from batchgate_server.providers.registry import ProviderRegistry


@dataclass
class BatchPlan:
    parts: list[PlannedPart]
    # Run as a parent with shards; False: today's single job, parts[0] on its deployment.
    sharded: bool
    # The parts' deployments, by id.
    deployments: dict[str, Deployment] = field(default_factory=dict)


def plan_batch(source: FileRecord, *, endpoint: str, model: str, model_map: Mapping[str, str], provider: str,
               spread: bool, router: Router, providers: ProviderRegistry) -> BatchPlan:
    deployment = router.pick(requested_model=model, file_model=source.model, provider=provider)
    endpoint = endpoint or source.endpoint
    limits = providers.get(deployment.provider).limits(endpoint, deployment)
    part = PlannedPart(endpoint=endpoint, model=source.model, deployment_id=deployment.id, start=0,
                       end=source.line_count)
    sharded = ((limits.max_requests is not None and source.line_count > limits.max_requests)
               or (limits.max_bytes is not None and source.bytes > limits.max_bytes))
    return BatchPlan([part], sharded, {deployment.id: deployment})
