"""WebhookService: thin gRPC adapter over core.webhooks.Webhooks."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from batchgate.v1 import webhook_pb2, webhook_pb2_grpc
from batchgate_server.api.handlers import unary
from batchgate_server.core.auth import Authenticator, Principal
from batchgate_server.core.webhooks import Webhooks
from batchgate_server.domain.webhooks import WebhookEndpoint


def endpoint_to_proto(e: WebhookEndpoint) -> webhook_pb2.WebhookEndpoint:
    message = webhook_pb2.WebhookEndpoint(id=e.id, project=e.project, url=e.url, events=list(e.events),
                                          configured=e.from_config)
    if e.created_at:
        message.created_at.CopyFrom(timestamp_pb2.Timestamp(seconds=int(e.created_at),
                                                            nanos=int(e.created_at % 1 * 1e9)))
    return message


class WebhookServicer(webhook_pb2_grpc.WebhookServiceServicer):
    def __init__(self, auth: Authenticator, webhooks: Webhooks) -> None:
        self.auth = auth
        self.webhooks = webhooks

    @unary
    async def CreateWebhookEndpoint(self, request: webhook_pb2.CreateWebhookEndpointRequest, context,
                                    principal: Principal):
        endpoint, secret = await self.webhooks.create_endpoint(principal, request.project, request.url,
                                                               list(request.events), request.secret)
        return webhook_pb2.CreateWebhookEndpointResponse(endpoint=endpoint_to_proto(endpoint), secret=secret)

    @unary
    async def ListWebhookEndpoints(self, request: webhook_pb2.ListWebhookEndpointsRequest, context,
                                   principal: Principal):
        endpoints = await self.webhooks.list_endpoints(principal, request.project)
        return webhook_pb2.ListWebhookEndpointsResponse(endpoints=[endpoint_to_proto(e) for e in endpoints])

    @unary
    async def DeleteWebhookEndpoint(self, request: webhook_pb2.DeleteWebhookEndpointRequest, context,
                                    principal: Principal):
        await self.webhooks.delete_endpoint(principal, request.id)
        return webhook_pb2.DeleteWebhookEndpointResponse(id=request.id, deleted=True)
