"""AdminService: thin gRPC adapter over core.admin.Admin (master key only)."""

from __future__ import annotations

from batchgate.v1 import admin_pb2, admin_pb2_grpc
from batchgate_server.api.convert import seconds_of, timestamp
from batchgate_server.api.handlers import unary
from batchgate_server.core.admin import Admin
from batchgate_server.core.auth import Authenticator, Principal
from batchgate_server.core.errors import FieldViolation, InvalidArgument
from batchgate_server.domain.models import ApiKeyRecord, ProjectQuota
from batchgate_server.pricing.cost import amount_to_nanos, nanos_to_amount

QUOTA_LIMITS = ("max_running_batches", "max_stored_bytes", "max_uploads")


def key_to_proto(key: ApiKeyRecord) -> admin_pb2.ApiKey:
    return admin_pb2.ApiKey(key_id=key.id, project=key.project, name=key.name,
                            create_time=timestamp(key.created_at), expire_time=timestamp(key.expires_at),
                            revoke_time=timestamp(key.revoked_at), last_use_time=timestamp(key.last_used_at))


def quota_to_proto(quota: ProjectQuota) -> admin_pb2.ProjectQuota:
    message = admin_pb2.ProjectQuota(project=quota.project)
    for name in QUOTA_LIMITS:
        if (value := getattr(quota, name)) is not None:
            setattr(message, name, value)
    if quota.monthly_budget_nanos is not None:
        message.monthly_budget = nanos_to_amount(quota.monthly_budget_nanos)
    return message


def quota_from_proto(message: admin_pb2.ProjectQuota) -> ProjectQuota:
    quota = ProjectQuota(message.project)
    for name in QUOTA_LIMITS:
        if message.HasField(name):
            setattr(quota, name, getattr(message, name))
    if message.HasField("monthly_budget"):
        quota.monthly_budget_nanos = amount_to_nanos(message.monthly_budget)
        if quota.monthly_budget_nanos is None:
            raise InvalidArgument("quota.monthly_budget must be a USD amount such as \"250.00\"", "INVALID_QUOTA",
                                  violations=[FieldViolation("quota.monthly_budget", "a decimal amount >= 0")])
    return quota


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, auth: Authenticator, admin: Admin) -> None:
        self.auth = auth
        self.admin = admin

    @unary
    async def CreateApiKey(self, request: admin_pb2.CreateApiKeyRequest, context, principal: Principal):
        key, secret = await self.admin.create_key(principal, request.project, request.name,
                                                  seconds_of(request, "expire_time"))
        return admin_pb2.CreateApiKeyResponse(api_key=key_to_proto(key), secret=secret)

    @unary
    async def ListApiKeys(self, request: admin_pb2.ListApiKeysRequest, context, principal: Principal):
        keys, token = await self.admin.list_keys(principal, request.project, request.page_size, request.page_token,
                                                 weigh=lambda key: key_to_proto(key).ByteSize())
        return admin_pb2.ListApiKeysResponse(api_keys=[key_to_proto(k) for k in keys], next_page_token=token)

    @unary
    async def RevokeApiKey(self, request: admin_pb2.RevokeApiKeyRequest, context, principal: Principal):
        return admin_pb2.RevokeApiKeyResponse(api_key=key_to_proto(await self.admin.revoke_key(principal,
                                                                                               request.key_id)))

    @unary
    async def SetProjectQuota(self, request: admin_pb2.SetProjectQuotaRequest, context, principal: Principal):
        quota = await self.admin.set_quota(principal, quota_from_proto(request.quota))
        return admin_pb2.SetProjectQuotaResponse(quota=quota_to_proto(quota))

    @unary
    async def GetProjectQuota(self, request: admin_pb2.GetProjectQuotaRequest, context, principal: Principal):
        report = await self.admin.get_quota(principal, request.project)
        return admin_pb2.GetProjectQuotaResponse(
            quota=quota_to_proto(report.quota), source=report.source, running_batches=report.running_batches,
            stored_bytes=report.stored_bytes, uploads_in_flight=report.uploads_in_flight,
            monthly_spend=nanos_to_amount(report.monthly_spend_nanos))
