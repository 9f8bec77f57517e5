"""CreateBatch's routing plan: which deployment runs which lines of the input file.

A file's lines come in groups of one (endpoint, body.model), counted at upload (FileGroup). The
planner routes every group and returns the parts (PlannedPart: a run of a group's lines on one
deployment). One part that fits one job of its provider is today's single-job batch; anything
else is a sharded batch whose runner splits the parts into jobs (domain/shards.py).

Per group:
- Endpoint: CreateBatch.endpoint, when set, must be every group's; "" takes the file's own.
- Target: model_map[group.model], else CreateBatch.model, else group.model (a model_map key that
  is no group's model is refused: INVALID_MODEL_MAP). It resolves as
  Router.candidates does (a model_name, a deployment id, or "provider/model"), restricted to
  CreateBatch.provider when set. Every group without a route is named in one MODEL_NOT_FOUND,
  with its line numbers.
- Deployments: the least loaded warm candidate (Router.least_loaded), or, when spreading, a share
  for every warm candidate by water-filling: the group's lines go where queued requests per unit
  of weight are lowest until queued + share is proportional to weight everywhere they go. A share
  below its deployment's minimum (JobLimits.min_requests) is given to the others.
- Minimums: a part below its deployment's minimum moves to the least loaded other candidate of
  the same target that takes it; with none, FAILED_PRECONDITION BATCH_TOO_SMALL with the numbers.
- Each part is then offered to its provider's `check` (endpoint support, configuration), as one
  of the jobs it will be split into.

Spreading is on for a group when CreateBatch.spread is set, or the model list says so
(router_settings.spread_batches, or model_info.spread_batches on one of the target's
deployments), and its target has more than one deployment.

Pure: reads the router's queued load and cooldowns, changes nothing (the caller adds the load of
the parts it keeps). Deterministic for a given load: ties go to the deployment listed first.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction

from batchgate_server.core.errors import FailedPrecondition, FieldViolation, InvalidArgument, echo
from batchgate_server.core.routing import Router
from batchgate_server.domain.deployment import Deployment
from batchgate_server.domain.models import FileRecord
from batchgate_server.domain.shards import MAX_GROUP_LINES, FileGroup, JobLimits, PlannedPart
from batchgate_server.providers.base import BatchProvider, UnsupportedRequest
from batchgate_server.providers.registry import ProviderRegistry

# Field violations one planning error lists (a file has at most MAX_FILE_GROUPS groups).
MAX_VIOLATIONS = 16


@dataclass
class BatchPlan:
    parts: list[PlannedPart]
    # Run as a parent with shards (several parts, spread, or a part that may not fit one job);
    # False: today's single job, parts[0] on its deployment.
    sharded: bool
    # The parts' deployments, by id.
    deployments: dict[str, Deployment] = field(default_factory=dict)


def file_groups(source: FileRecord) -> list[FileGroup]:
    """The file's line groups; a file stored before groups were counted is one group."""
    if source.groups:
        return source.groups
    return [FileGroup(endpoint=source.endpoint, model=source.model, count=source.line_count,
                      first_lines=list(range(1, min(source.line_count, MAX_GROUP_LINES) + 1)))]


def lines_text(group: FileGroup) -> str:
    """ "line 3", "lines 3, 5, 8" or "lines 1, 2, … and 990 more" (the group's first lines)."""
    shown = ", ".join(str(n) for n in group.first_lines)
    more = group.count - len(group.first_lines)
    if more > 0:
        return f"lines {shown} and {more} more"
    return f"line {shown}" if group.count == 1 else f"lines {shown}"


@contextmanager
def provider_refusals(provider_name: str) -> Iterator[None]:
    """A provider's UnsupportedRequest (BatchProvider.check, or a provider not in this build) as
    the API error CreateBatch answers: FAILED_PRECONDITION when the provider says so, else
    INVALID_ARGUMENT on the endpoint or model field."""
    try:
        yield
    except UnsupportedRequest as err:
        details = {"provider": provider_name, **err.details}
        if err.precondition:
            raise FailedPrecondition(err.message, err.reason, details) from None
        raise InvalidArgument(err.message, err.reason, details,
                              [FieldViolation("endpoint" if "ENDPOINT" in err.reason else "model",
                                              err.message)]) from None


def water_fill(count: int, pool: list[Deployment], queued: Mapping[str, int],
               minimum: Mapping[str, int]) -> list[tuple[Deployment, int]]:
    """`count` requests cut over `pool` so that queued + share is proportional to weight on every
    deployment that gets a share (none of those already fuller than that level get any). Whole
    shares: floors, and the requests left over one each by largest remainder, ties in pool order.
    A share below the deployment's minimum is dropped and the cut redone without it (the smallest
    share first, the later deployment on a tie). Empty when no deployment can take a share."""
    active = list(pool)
    while active:
        shares = _level_shares(count, active, queued)
        short = [(share, -i) for i, (d, share) in enumerate(shares) if 0 < share < minimum.get(d.id, 1)]
        if not short:
            return [(d, share) for d, share in shares if share > 0]
        _, neg_index = min(short)
        del active[-neg_index]
    return []


def _level_shares(count: int, pool: list[Deployment], queued: Mapping[str, int]) -> list[tuple[Deployment, int]]:
    weight = {d.id: Fraction(d.weight) for d in pool}
    fill = sorted(range(len(pool)), key=lambda i: (Fraction(queued.get(pool[i].id, 0)) / weight[pool[i].id], i))
    # Raise the level L (queued per weight) over the emptiest deployments until count is spent.
    total_queued, total_weight, level = Fraction(0), Fraction(0), Fraction(0)
    for k, i in enumerate(fill):
        d = pool[i]
        total_queued += queued.get(d.id, 0)
        total_weight += weight[d.id]
        level = (count + total_queued) / total_weight
        nxt = fill[k + 1] if k + 1 < len(fill) else None
        if nxt is None or level <= Fraction(queued.get(pool[nxt].id, 0)) / weight[pool[nxt].id]:
            break
    exact = [max(Fraction(0), level * weight[d.id] - queued.get(d.id, 0)) for d in pool]
    whole = [int(x) for x in exact]  # floors: all are >= 0
    left = count - sum(whole)
    for i in sorted(range(len(pool)), key=lambda i: (-(exact[i] - whole[i]), i))[:left]:
        whole[i] += 1
    return list(zip(pool, whole))


class _Planner:
    def __init__(self, source: FileRecord, endpoint: str, model: str, model_map: Mapping[str, str], provider: str,
                 spread: bool, router: Router, providers: ProviderRegistry) -> None:
        self.source, self.endpoint, self.model, self.model_map = source, endpoint, model, model_map
        self.provider, self.spread, self.router, self.providers = provider, spread, router, providers
        # Load planned by earlier groups of this file, so two groups of one target share it out too.
        self.planned: dict[str, int] = {}

    def queued(self, deployment: Deployment) -> int:
        return self.router.queued(deployment.id) + self.planned.get(deployment.id, 0)

    def provider_of(self, deployment: Deployment) -> BatchProvider:
        with provider_refusals(deployment.provider):
            return self.providers.get(deployment.provider)

    def limits(self, endpoint: str, deployment: Deployment) -> JobLimits:
        return self.provider_of(deployment).limits(endpoint, deployment)

    def plan(self) -> BatchPlan:
        groups = file_groups(self.source)
        self.check_endpoints(groups)
        self.check_model_map(groups)
        routes = self.route(groups)
        parts: list[PlannedPart] = []
        sharded = False
        for group, (target, candidates) in zip(groups, routes):
            spreading = self.spreads(candidates)
            sharded |= spreading
            for deployment, start, end in self.place(group, target, candidates, spreading):
                parts.append(PlannedPart(endpoint=group.endpoint, model=group.model, deployment_id=deployment.id,
                                         start=start, end=end))
                self.planned[deployment.id] = self.planned.get(deployment.id, 0) + (end - start)
        used = {part.deployment_id for part in parts}
        deployments = {d.id: d for _, candidates in routes for d in candidates if d.id in used}
        for part in parts:
            deployment = deployments[part.deployment_id]
            limits = self.limits(part.endpoint, deployment)
            over = limits.max_requests is not None and part.count > limits.max_requests
            sharded |= over or (limits.max_bytes is not None and self.source.bytes > limits.max_bytes)
            # Checked as one of the jobs the split will make (at most max_requests each).
            with provider_refusals(deployment.provider):
                self.provider_of(deployment).check(part.endpoint, deployment,
                                                   limits.max_requests if over else part.count)
        return BatchPlan(parts=parts, sharded=sharded or len(parts) > 1, deployments=deployments)

    def check_endpoints(self, groups: list[FileGroup]) -> None:
        if not self.endpoint:
            return
        differ = [g for g in groups if g.endpoint != self.endpoint]
        if not differ:
            return
        others = sorted({g.endpoint for g in differ})
        raise InvalidArgument(
            f"the batch endpoint {echo(self.endpoint)} does not match the url of the file's "
            + "; ".join(f"{lines_text(g)} ({g.endpoint})" for g in differ[:MAX_VIOLATIONS])
            + "; send the file's endpoint, or none to run the lines of each endpoint as their own jobs",
            "ENDPOINT_MISMATCH", {"file_endpoint": ",".join(others)},
            [FieldViolation("endpoint", f"{lines_text(g)}: url {g.endpoint}") for g in differ[:MAX_VIOLATIONS]])

    def target(self, group: FileGroup) -> tuple[str, str]:
        """The name a group is routed by, and the request field it comes from."""
        if group.model in self.model_map:
            return self.model_map[group.model], f"model_map[{group.model}]"
        if self.model:
            return self.model, "model"
        return group.model, "input_file.model"

    def check_model_map(self, groups: list[FileGroup]) -> None:
        """A key no line has is a mistake (a typo would silently leave those lines on their own
        model), refused rather than ignored."""
        models = list(dict.fromkeys(g.model for g in groups))
        for key in self.model_map:
            if key not in models:
                raise InvalidArgument(
                    f"model_map key {echo(key)} is the body.model of no line of the file; its models are "
                    f"{', '.join(echo(m) for m in models[:MAX_VIOLATIONS])}", "INVALID_MODEL_MAP",
                    {"model": key}, [FieldViolation(f"model_map[{key[:80]}]", "not a model of the file")])

    def route(self, groups: list[FileGroup]) -> list[tuple[str, list[Deployment]]]:
        routes, unrouted = [], []
        for group in groups:
            target, field = self.target(group)
            candidates = self.router.candidates(target, self.provider)
            if not candidates:
                unrouted.append((group, target, field))
            routes.append((target, candidates))
        if unrouted:
            names = list(dict.fromkeys(target for _, target, _ in unrouted))
            hint = f" with provider {echo(self.provider)}" if self.provider else ""
            where = "; ".join(f"{echo(target)} ({lines_text(g)})" for g, target, _ in unrouted[:MAX_VIOLATIONS])
            raise InvalidArgument(
                f"no deployment serves model {where}{hint}; configured model names: "
                f"{', '.join(self.router.configured_names())} (or use 'provider/model' or a deployment id)",
                "MODEL_NOT_FOUND", {"model": ",".join(names), "provider": self.provider},
                [FieldViolation(field, f"{lines_text(g)}: no deployment serves model {echo(target)}")
                 for g, target, field in unrouted[:MAX_VIOLATIONS]])
        return routes

    def spreads(self, candidates: list[Deployment]) -> bool:
        if len(candidates) < 2:
            return False
        return self.spread or self.router.model_list.router.spread_batches or \
            any(d.model_info.get("spread_batches") is True for d in candidates)

    def place(self, group: FileGroup, target: str, candidates: list[Deployment],
              spreading: bool) -> list[tuple[Deployment, int, int]]:
        """The group's lines as (deployment, start, end) runs, in deployment order."""
        pool = self.router.warm(candidates)
        minimum = {d.id: self.limits(group.endpoint, d).min_requests for d in candidates}
        shares: list[tuple[Deployment, int]] = []
        if spreading:
            shares = water_fill(group.count, pool, {d.id: self.queued(d) for d in pool}, minimum)
        if not shares:
            shares = [(self.fitting(group, target, pool, candidates, minimum), group.count)]
        runs, start = [], 0
        for deployment, share in shares:
            runs.append((deployment, start, start + share))
            start += share
        return runs

    def fitting(self, group: FileGroup, target: str, pool: list[Deployment], candidates: list[Deployment],
                minimum: Mapping[str, int]) -> Deployment:
        """The least loaded warm candidate, or, when the group is below its minimum, the least loaded
        candidate (warm ones first) that takes so few."""
        first = self.router.least_loaded(pool, self.planned)
        if group.count >= minimum[first.id]:
            return first
        takers = [d for d in pool if group.count >= minimum[d.id]] or \
            [d for d in candidates if group.count >= minimum[d.id]]
        if takers:
            return self.router.least_loaded(takers, self.planned)
        raise FailedPrecondition(
            f"{first.provider} needs at least {minimum[first.id]} requests per job on deployment {first.id} "
            f"({first.model_name}); the file's {lines_text(group)} for {echo(target)} are {group.count}, and no "
            "other deployment of the model takes so few. Add requests, or route them to another model with model_map",
            "BATCH_TOO_SMALL", {"minimum": str(minimum[first.id]), "line_count": str(group.count),
                                "deployment": first.id, "model": target, "lines": lines_text(group)})


def plan_batch(source: FileRecord, *, endpoint: str, model: str, model_map: Mapping[str, str], provider: str,
               spread: bool, router: Router, providers: ProviderRegistry) -> BatchPlan:
    """The routing of `source` for CreateBatch (see the module docstring); raises the ApiError
    CreateBatch answers with (ENDPOINT_MISMATCH, MODEL_NOT_FOUND, BATCH_TOO_SMALL, or the
    provider's check)."""
    return _Planner(source, endpoint, model, model_map, provider, spread, router, providers).plan()
