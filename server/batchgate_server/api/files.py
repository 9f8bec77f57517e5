"""FileService: thin gRPC adapter over core.files.FileManager."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from batchgate.v1 import file_pb2, file_pb2_grpc
from batchgate_server.api.convert import PURPOSE_FROM_PROTO, file_to_proto
from batchgate_server.api.errors import abort_with
from batchgate_server.api.handlers import server_stream, unary
from batchgate_server.core.auth import Authenticator, Principal
from batchgate_server.core.errors import ApiError, FieldViolation, InvalidArgument
from batchgate_server.core.files import FileManager, UploadHeader


def _header_from_proto(h: file_pb2.UploadFileHeader) -> UploadHeader:
    return UploadHeader(
        filename=h.filename,
        purpose=PURPOSE_FROM_PROTO.get(h.purpose),
        expected_bytes=h.expected_bytes if h.HasField("expected_bytes") else None,
        expected_sha256=h.expected_sha256,
        request_id=h.request_id,
        # seconds + nanos directly: ToTimedelta() overflows on absurd values instead of failing validation
        expires_after=(h.expires_after.seconds + h.expires_after.nanos / 1e9) if h.HasField("expires_after") else None,
    )


def _protocol_error(message: str, reason: str, field: str) -> InvalidArgument:
    return InvalidArgument(message, reason, violations=[FieldViolation(field, message)])


class FileServicer(file_pb2_grpc.FileServiceServicer):
    def __init__(self, auth: Authenticator, files: FileManager) -> None:
        self.auth = auth
        self.files = files

    async def UploadFile(self, request_iterator: AsyncIterator[file_pb2.UploadFileRequest],
                         context: grpc.aio.ServicerContext) -> file_pb2.UploadFileResponse:
        try:
            principal = await self.auth.authenticate(context.invocation_metadata())
            stream = aiter(request_iterator)
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                raise _protocol_error("the upload stream was empty: send a header first",
                                      "MISSING_UPLOAD_HEADER", "header") from None
            if first.WhichOneof("payload") != "header":
                raise _protocol_error("the first message of an upload must be the header",
                                      "MISSING_UPLOAD_HEADER", "header")
            header = _header_from_proto(first.header)

            async def chunks() -> AsyncIterator[bytes]:
                async for message in stream:
                    if message.WhichOneof("payload") != "chunk":
                        raise _protocol_error("only the first message of an upload may be a header",
                                              "UNEXPECTED_UPLOAD_HEADER", "header")
                    yield message.chunk

            record = await self.files.upload(principal, header, chunks(), client_gone=context.cancelled)
            return file_pb2.UploadFileResponse(file=file_to_proto(record))
        except ApiError as err:
            await abort_with(context, err)

    @unary
    async def GetFile(self, request: file_pb2.GetFileRequest, context, principal: Principal):
        return file_pb2.GetFileResponse(file=file_to_proto(await self.files.get(principal, request.file_id)))

    @unary
    async def ListFiles(self, request: file_pb2.ListFilesRequest, context, principal: Principal):
        purpose = PURPOSE_FROM_PROTO.get(request.purpose)
        rows, token = await self.files.list(principal, request.page_size, request.page_token, purpose,
                                            weigh=lambda f: file_to_proto(f).ByteSize())
        return file_pb2.ListFilesResponse(files=[file_to_proto(f) for f in rows], next_page_token=token)

    @server_stream
    async def DownloadFile(self, request: file_pb2.DownloadFileRequest, context, principal: Principal):
        record = await self.files.get(principal, request.file_id)
        offset = request.read_offset
        first = True
        for data in self.files.read(record, request.read_offset, request.read_limit):
            yield file_pb2.DownloadFileResponse(file=file_to_proto(record) if first else None,
                                                offset=offset, data=data)
            first = False
            offset += len(data)
        if first:  # empty range: still tell the caller what the file is
            yield file_pb2.DownloadFileResponse(file=file_to_proto(record), offset=offset)

    @unary
    async def DeleteFile(self, request: file_pb2.DeleteFileRequest, context, principal: Principal):
        await self.files.delete(principal, request.file_id)
        return file_pb2.DeleteFileResponse(file_id=request.file_id, deleted=True)
