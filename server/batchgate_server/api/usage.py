"""UsageService: thin gRPC adapter over core.usage.UsageReporter."""

from __future__ import annotations

from batchgate.v1 import usage_pb2, usage_pb2_grpc
from batchgate_server.api.convert import seconds_of
from batchgate_server.api.handlers import unary
from batchgate_server.core.auth import Authenticator, Principal
from batchgate_server.core.errors import FieldViolation, InvalidArgument
from batchgate_server.core.usage import GroupBy, UsageQuery, UsageReporter, UsageSums

GROUP_BY_FROM_PROTO = {
    usage_pb2.USAGE_GROUP_BY_PROJECT: GroupBy.PROJECT,
    usage_pb2.USAGE_GROUP_BY_API_KEY: GroupBy.API_KEY,
    usage_pb2.USAGE_GROUP_BY_MODEL: GroupBy.MODEL,
    usage_pb2.USAGE_GROUP_BY_PROVIDER: GroupBy.PROVIDER,
    usage_pb2.USAGE_GROUP_BY_METADATA_KEY: GroupBy.METADATA_KEY,
}


def sums_to_proto(s: UsageSums) -> usage_pb2.UsageRow:
    return usage_pb2.UsageRow(
        group=s.group, batch_count=s.batch_count, input_tokens=s.input_tokens,
        cached_input_tokens=s.cached_tokens, output_tokens=s.output_tokens, reasoning_tokens=s.reasoning_tokens,
        cost_amount=s.cost_amount, unknown_cost_batches=s.unknown_cost_batches, currency=s.currency,
        cache_creation_input_tokens=s.cache_creation_tokens,
        cache_creation_1h_input_tokens=s.cache_creation_1h_tokens)


class UsageServicer(usage_pb2_grpc.UsageServiceServicer):
    def __init__(self, auth: Authenticator, usage: UsageReporter) -> None:
        self.auth = auth
        self.usage = usage

    @unary
    async def QueryUsage(self, request: usage_pb2.QueryUsageRequest, context, principal: Principal):
        group_by = []
        for value in request.group_by:
            if value not in GROUP_BY_FROM_PROTO:
                raise InvalidArgument(f"unknown group_by value {value}", "INVALID_GROUP_BY",
                                      violations=[FieldViolation("group_by", "USAGE_GROUP_BY_* values only")])
            group_by.append(GROUP_BY_FROM_PROTO[value])
        report = await self.usage.query(principal, UsageQuery(
            start=seconds_of(request, "start_time"), end=seconds_of(request, "end_time"), group_by=group_by,
            metadata_key=request.metadata_key, project=request.project, model=request.model,
            provider=request.provider, page_size=request.page_size, page_token=request.page_token),
            weigh=lambda row: sums_to_proto(row).ByteSize())
        return usage_pb2.QueryUsageResponse(rows=[sums_to_proto(r) for r in report.rows],
                                            next_page_token=report.next_page_token,
                                            totals=sums_to_proto(report.totals))
