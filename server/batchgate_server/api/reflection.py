"""Server reflection that also resolves method symbols.

`grpcurl describe batchgate.v1.BatchService.WatchBatch` asks for the file
containing a *method*; protobuf's upb descriptor pool only indexes services and
messages, so the stock servicer answers NOT_FOUND. Resolving "Service.Method"
through its service fixes that.
"""

from __future__ import annotations

from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._base import _file_descriptor_response, _not_found_error


class MethodAwareReflectionServicer(reflection.aio.ReflectionServicer):
    def _file_containing_symbol(self, request, fully_qualified_name):
        response = super()._file_containing_symbol(request, fully_qualified_name)
        if not response.HasField("error_response"):
            return response
        service_name, _, method = fully_qualified_name.rpartition(".")
        pool = self._pool
        try:
            service = pool.FindServiceByName(service_name)
        except KeyError:
            return _not_found_error(request)
        if method not in service.methods_by_name:
            return _not_found_error(request)
        return _file_descriptor_response(service.file, request)


def enable_reflection(service_names, server) -> None:
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        MethodAwareReflectionServicer((*service_names, reflection.SERVICE_NAME)), server)
