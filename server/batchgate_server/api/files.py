"""FileService: a thin gRPC adapter over core.files.FileManager, plus the upload message protocol
(header, chunks, finish)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from batchgate.v1 import file_pb2, file_pb2_grpc
from batchgate_server.api.convert import PURPOSE_FROM_PROTO, file_to_proto
from batchgate_server.api.errors import abort_with
from batchgate_server.api.handlers import abort_with_storage_error, server_stream, unary
from batchgate_server.core.auth import Authenticator, Principal
from batchgate_server.core.errors import ApiError, FieldViolation, InvalidArgument, StorageError
from batchgate_server.core.files import FileManager, UploadHeader, idle_bounded


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


_PROTOCOL = "an upload is a header, then the content in chunks, then a finish message, then the end of the stream"


async def _read_header(messages: AsyncIterator[file_pb2.UploadFileRequest]) -> UploadHeader:
    try:
        first = await anext(messages)
    except StopAsyncIteration:
        raise _protocol_error(f"the upload stream was empty: {_PROTOCOL}", "MISSING_UPLOAD_HEADER",
                              "header") from None
    if first.WhichOneof("payload") != "header":
        raise _protocol_error(f"the first message of an upload must be the header: {_PROTOCOL}",
                              "MISSING_UPLOAD_HEADER", "header")
    return _header_from_proto(first.header)


async def _content(messages: AsyncIterator[file_pb2.UploadFileRequest]) -> AsyncIterator[bytes]:
    """The chunks after the header. Ends normally only once the finish message has come and the
    stream ended right after it; a stream that ends any other way raises, so the upload is aborted.
    (A cancelled call or an expired deadline also ends the request stream quietly: the explicit
    finish message is what tells a complete upload from a cut one.)"""
    number = 1  # the header
    async for message in messages:
        number += 1
        kind = message.WhichOneof("payload")
        if kind == "chunk":
            yield message.chunk
        elif kind == "finish":
            async for _ in messages:
                raise _protocol_error(f"message {number + 1} came after the finish message (message {number}); "
                                      f"{_PROTOCOL}", "MESSAGE_AFTER_FINISH", "finish")
            return
        elif kind == "header":
            raise _protocol_error(f"message {number} is a second header; {_PROTOCOL}", "UNEXPECTED_UPLOAD_HEADER",
                                  "header")
        else:
            raise _protocol_error(f"message {number} of the upload is empty: it sets none of header, chunk or "
                                  f"finish; {_PROTOCOL}", "EMPTY_UPLOAD_MESSAGE", "payload")
    raise _protocol_error(f"the upload stream ended without a finish message, so nothing was stored: {_PROTOCOL}."
                          " Send UploadFileRequest.finish after the last chunk to commit the file",
                          "UPLOAD_NOT_FINISHED", "finish")


class FileServicer(file_pb2_grpc.FileServiceServicer):
    def __init__(self, auth: Authenticator, files: FileManager) -> None:
        self.auth = auth
        self.files = files

    async def UploadFile(self, request_iterator: AsyncIterator[file_pb2.UploadFileRequest],
                         context: grpc.aio.ServicerContext) -> file_pb2.UploadFileResponse:
        try:
            principal = await self.auth.authenticate(context.invocation_metadata())
            messages = idle_bounded(aiter(request_iterator), self.files.limits.upload_idle_timeout)
            header = await _read_header(messages)
            record = await self.files.upload(principal, header, _content(messages))
            return file_pb2.UploadFileResponse(file=file_to_proto(record))
        except ApiError as err:
            await abort_with(context, err)
        except StorageError as err:
            await abort_with_storage_error(context, err)

    @unary
    async def GetFile(self, request: file_pb2.GetFileRequest, context, principal: Principal):
        return file_pb2.GetFileResponse(file=file_to_proto(await self.files.get(principal, request.file_id)))

    @unary
    async def ListFiles(self, request: file_pb2.ListFilesRequest, context, principal: Principal):
        if request.purpose and request.purpose not in PURPOSE_FROM_PROTO:
            raise InvalidArgument(f"unknown purpose {request.purpose} in the filter", "INVALID_PURPOSE_FILTER",
                                  violations=[FieldViolation("purpose", "FILE_PURPOSE_* values only")])
        purpose = PURPOSE_FROM_PROTO.get(request.purpose)
        rows, token = await self.files.list(principal, request.page_size, request.page_token, purpose,
                                            weigh=lambda f: file_to_proto(f).ByteSize())
        return file_pb2.ListFilesResponse(files=[file_to_proto(f) for f in rows], next_page_token=token)

    @server_stream
    async def DownloadFile(self, request: file_pb2.DownloadFileRequest, context, principal: Principal):
        record = await self.files.get(principal, request.file_id)
        offset = request.read_offset
        first = True
        async for data in self.files.read(record, request.read_offset, request.read_limit):
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
