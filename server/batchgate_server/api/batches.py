"""BatchService: thin gRPC adapter over core.batches.BatchManager."""

from __future__ import annotations

import grpc
from google.protobuf import timestamp_pb2

from batchgate.v1 import batch_pb2, batch_pb2_grpc
from batchgate_server.api.convert import STATUS_FROM_PROTO, batch_to_proto
from batchgate_server.api.handlers import server_stream, unary
from batchgate_server.api.revision_cache import LatestStates, RevisionCache
from batchgate_server.core.auth import Authenticator, Principal
from batchgate_server.core.batches import BatchManager, CreateBatch
from batchgate_server.core.errors import FieldViolation, InvalidArgument


class BatchServicer(batch_pb2_grpc.BatchServiceServicer):
    def __init__(self, auth: Authenticator, batches: BatchManager, heartbeat_interval: float) -> None:
        self.auth = auth
        self.batches = batches
        self.heartbeat_interval = heartbeat_interval
        self._to_proto = RevisionCache(batch_to_proto)
        # The serialised WatchBatchResponse of a state: encoded once, sent to every watcher.
        self._watch_event = RevisionCache(
            lambda record: batch_pb2.WatchBatchResponse(batch=self._to_proto(record)).SerializeToString())
        # The serialised GetBatchResponse of a state: pollers of a batch mostly read the same one.
        self._get_response = RevisionCache(
            lambda record: batch_pb2.GetBatchResponse(batch=self._to_proto(record)).SerializeToString())
        self._read_states = LatestStates()

    @unary
    async def CreateBatch(self, request: batch_pb2.CreateBatchRequest, context, principal: Principal):
        record = await self.batches.create(principal, CreateBatch(
            input_file_id=request.input_file_id, endpoint=request.endpoint,
            completion_window=request.completion_window, metadata=dict(request.metadata), model=request.model,
            provider=request.provider, request_id=request.request_id, model_map=dict(request.model_map),
            spread=request.spread))
        return batch_pb2.CreateBatchResponse(batch=self._to_proto(record))

    @unary
    async def GetBatch(self, request: batch_pb2.GetBatchRequest, context, principal: Principal):
        known = self._read_states.get(request.batch_id)
        record = await self.batches.get(principal, request.batch_id, known)
        if record is not known:
            self._read_states.put(record)
        return self._get_response(record)

    @unary
    async def ListBatches(self, request: batch_pb2.ListBatchesRequest, context, principal: Principal):
        statuses = []
        for value in request.statuses:
            if value not in STATUS_FROM_PROTO:
                raise InvalidArgument(f"unknown status {value} in the filter", "INVALID_STATUS_FILTER",
                                      violations=[FieldViolation("statuses", "BATCH_STATUS_* values only")])
            if STATUS_FROM_PROTO[value] not in statuses:  # a repeated value filters nothing more
                statuses.append(STATUS_FROM_PROTO[value])
        rows, token = await self.batches.list(principal, request.page_size, request.page_token, statuses,
                                              weigh=lambda b: self._to_proto(b).ByteSize())
        return batch_pb2.ListBatchesResponse(batches=[self._to_proto(b) for b in rows], next_page_token=token)

    @unary
    async def CancelBatch(self, request: batch_pb2.CancelBatchRequest, context, principal: Principal):
        return batch_pb2.CancelBatchResponse(batch=self._to_proto(await self.batches.cancel(principal,
                                                                                             request.batch_id)))

    @server_stream
    async def WatchBatch(self, request: batch_pb2.WatchBatchRequest, context, principal: Principal):
        async for event in self.batches.watch(principal, request.batch_id, request.start_revision,
                                              self.heartbeat_interval):
            if isinstance(event, int):
                now = timestamp_pb2.Timestamp()
                now.GetCurrentTime()
                yield batch_pb2.WatchBatchResponse(heartbeat=batch_pb2.Heartbeat(sent_at=now, revision=event))
            else:
                yield self._watch_event(event)


def _serialize_unless_bytes(message) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


class _CapturedHandlers:
    """Stands in for a server to catch the generated method handlers."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, dict(handlers)


def add_batch_service(servicer: BatchServicer, server) -> None:
    """The generated registration, except that WatchBatch and GetBatch may answer with
    pre-serialised messages (one encoding per state, however many watchers and pollers)."""
    captured = _CapturedHandlers()
    batch_pb2_grpc.add_BatchServiceServicer_to_server(servicer, captured)
    handlers = captured.handlers
    for name in ("WatchBatch", "GetBatch"):
        handlers[name] = handlers[name]._replace(response_serializer=_serialize_unless_bytes)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(captured.service, handlers),))
    server.add_registered_method_handlers(captured.service, handlers)
