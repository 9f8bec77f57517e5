"""Server reflection, v1 and v1alpha, that also resolves method symbols.

`grpcurl describe batchgate.v1.BatchService.WatchBatch` asks for the file
containing a *method*; protobuf's upb descriptor pool only indexes services and
messages, so the stock servicer answers NOT_FOUND. Resolving "Service.Method"
through its service fixes that.

grpcio-reflection ships only `grpc.reflection.v1alpha`; newer clients (`buf curl`,
grpcurl ≥ 1.9) ask `grpc.reflection.v1` first. The two protocols are the same
messages under another package (same fields, same numbers), so one servicer answers
both: v1 is registered with v1alpha's serializers, and v1's descriptor (v1alpha's,
renamed) is added to the pool so the v1 service itself can be described.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._base import _file_descriptor_response, _not_found_error

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"


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


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{proto.package}.", ".grpc.reflection.v1."
    proto.name, proto.package = _V1_FILE, "grpc.reflection.v1"
    proto.options.Clear()
    for message in proto.message_type:
        for f in message.field:
            if f.HasField("type_name"):  # only message-typed fields name a type
                f.type_name = f.type_name.replace(old, new)
    for service in proto.service:
        for m in service.method:
            m.input_type, m.output_type = m.input_type.replace(old, new), m.output_type.replace(old, new)
    pool.Add(proto)


def enable_reflection(service_names, server) -> None:
    _add_v1_descriptor(descriptor_pool.Default())
    servicer = MethodAwareReflectionServicer((*service_names, reflection.SERVICE_NAME, V1_SERVICE_NAME))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        V1_SERVICE_NAME, {"ServerReflectionInfo": v1}),))
