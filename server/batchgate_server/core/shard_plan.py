"""CreateBatch's routing plan: which deployment runs which lines of the input file.

PLACEHOLDER (issue 14, "core"): one part per file group, on the deployment Router.pick gives
for the group's model (or CreateBatch.model), sharded when the file mixes groups or a group is over
one job of its provider. The full planner
(mixed files, model_map, spread, minimums) replaces this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from batchgate_server.core.routing import Router
from batchgate_server.domain.deployment import Deployment
from batchgate_server.domain.models import FileRecord
from batchgate_server.domain.shards import FileGroup, PlannedPart
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
    groups = source.groups or [FileGroup(endpoint=source.endpoint, model=source.model, count=source.line_count)]
    parts, deployments, over = [], {}, False
    for group in groups:
        deployment = router.pick(requested_model=model, file_model=group.model, provider=provider)
        limits = providers.get(deployment.provider).limits(group.endpoint, deployment)
        parts.append(PlannedPart(endpoint=group.endpoint, model=group.model, deployment_id=deployment.id, start=0,
                                 end=group.count))
        deployments[deployment.id] = deployment
        over = over or (limits.max_requests is not None and group.count > limits.max_requests) or (
            limits.max_bytes is not None and source.bytes > limits.max_bytes)
    return BatchPlan(parts, over or len(parts) > 1, deployments)
