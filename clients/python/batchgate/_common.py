"""Pieces shared by the sync and asyncio clients."""

from __future__ import annotations

import datetime
import hashlib
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from batchgate.v1 import file_pb2, usage_pb2

DEFAULT_CHUNK = 256 * 1024
# Large uploads/downloads stream 2 MiB messages at most.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 4 * 1024 * 1024),
                   ("grpc.max_send_message_length", 4 * 1024 * 1024)]


DEFAULT_ADDRESS = "127.0.0.1:50051"


@dataclass(frozen=True)
class TLS:
    """How a client reaches a server over TLS. `root_certificates` (PEM bytes or a path) are the CAs
    to trust (None: the system's); `client_certificate` and `client_key` present a certificate for
    mutual TLS; `server_name` checks the server's certificate against this name instead of the
    target's host (an address by IP, a name behind a proxy)."""

    root_certificates: bytes | str | os.PathLike | None = None
    client_certificate: bytes | str | os.PathLike | None = None
    client_key: bytes | str | os.PathLike | None = None
    server_name: str | None = None

    @staticmethod
    def from_env(environ: Mapping[str, str] = os.environ) -> "TLS | None":
        """From BATCHGATE_TLS_CA, BATCHGATE_TLS_CLIENT_CERT, BATCHGATE_TLS_CLIENT_KEY and
        BATCHGATE_TLS_SERVER_NAME; BATCHGATE_TLS=1 alone means TLS with the system's CAs."""
        values = {name: environ.get(f"BATCHGATE_TLS_{var}") or None for name, var in (
            ("root_certificates", "CA"), ("client_certificate", "CLIENT_CERT"), ("client_key", "CLIENT_KEY"),
            ("server_name", "SERVER_NAME"))}
        if any(values.values()) or environ.get("BATCHGATE_TLS", "").lower() in ("1", "true", "yes"):
            return TLS(**values)
        return None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError("mutual TLS needs both a client certificate and its key")
        return grpc.ssl_channel_credentials(root_certificates=_pem(self.root_certificates),
                                            private_key=_pem(self.client_key),
                                            certificate_chain=_pem(self.client_certificate))

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _pem(value: bytes | str | os.PathLike | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def make_channel(channels, target: str, tls: TLS | None):
    """A channel from `channels` (the grpc or the grpc.aio module: the same two constructors)."""
    if tls is None:
        return channels.insecure_channel(target, options=CHANNEL_OPTIONS)
    return channels.secure_channel(target, tls.credentials(), options=CHANNEL_OPTIONS + tls.channel_options())


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def file_sha256(path: str | os.PathLike) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while data := fh.read(1024 * 1024):
            h.update(data)
            size += len(data)
    return size, h.hexdigest()


def upload_header(filename: str, *, purpose: int, size: int | None, sha256: str, request_id: str,
                  expires_after_seconds: int | None) -> file_pb2.UploadFileRequest:
    header = file_pb2.UploadFileHeader(filename=filename, purpose=purpose, expected_sha256=sha256,
                                       request_id=request_id)
    if size is not None:
        header.expected_bytes = size
    if expires_after_seconds:
        header.expires_after.CopyFrom(duration_pb2.Duration(seconds=expires_after_seconds))
    return file_pb2.UploadFileRequest(header=header)


def read_chunks(stream: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    while data := stream.read(chunk_size):
        yield data


def upload_messages(header: file_pb2.UploadFileRequest, chunks: Iterable[bytes]) -> Iterator[file_pb2.UploadFileRequest]:
    """The header, the chunks, then the finish message: the server commits the file only after it,
    so an upload cut short (an exception while reading `chunks`, a cancelled call) stores nothing."""
    yield header
    for chunk in chunks:
        yield file_pb2.UploadFileRequest(chunk=chunk)
    yield file_pb2.UploadFileRequest(finish=file_pb2.UploadFileFinish())


class DownloadVerificationError(Exception):
    """The bytes downloaded are not the file the server's record describes (size or sha256)."""


class DownloadTarget:
    """Where `download_file` writes: a temporary file beside `path`, hashed as it is written, that
    replaces `path` only once its size and sha256 match the file record. Until then `path` is
    untouched, and a failed or mismatched download leaves no temporary file behind.

    With `resume` the temporary file is `<path>.part`: it is continued from its end, and kept when a
    download is interrupted so that the next resume picks it up. A part longer than the file is
    dropped (it cannot be the start of it); one whose content proves wrong is deleted with the
    DownloadVerificationError."""

    def __init__(self, path: str | os.PathLike, record: file_pb2.File, *, resume: bool) -> None:
        self.path = Path(path)
        self.record = record
        self.resume = resume
        self.written = 0  # bytes received by this download
        self._hasher = hashlib.sha256()
        if resume:
            self.temp = self.path.with_name(self.path.name + ".part")
            self.offset = self._continue_part()
            self._fh = open(self.temp, "ab")
        else:
            self.temp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.part")
            self.offset = 0
            self._fh = open(self.temp, "xb")

    def _continue_part(self) -> int:
        try:
            size = self.temp.stat().st_size
        except FileNotFoundError:
            return 0
        if size > self.record.bytes:
            self.temp.unlink()
            return 0
        with open(self.temp, "rb") as fh:
            while data := fh.read(1024 * 1024):
                self._hasher.update(data)
        return size

    def write(self, data: bytes) -> None:
        self._fh.write(data)
        self._hasher.update(data)
        self.written += len(data)

    def _verify(self) -> None:
        size, digest = self.offset + self.written, self._hasher.hexdigest()
        if size != self.record.bytes or digest != self.record.sha256:
            raise DownloadVerificationError(
                f"download of {self.record.id} does not match its record: got {size} bytes with sha256 {digest},"
                f" expected {self.record.bytes} bytes with sha256 {self.record.sha256}; {self.path} was left as it was")

    def __enter__(self) -> "DownloadTarget":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._verify()
                self._fh.flush()
                os.fsync(self._fh.fileno())
            self._fh.close()
            if exc_type is None:
                os.replace(self.temp, self.path)
            elif not self.resume:
                self.temp.unlink(missing_ok=True)
        except BaseException:
            self._fh.close()
            self.temp.unlink(missing_ok=True)
            raise


TimeLike = datetime.datetime | float | int | timestamp_pb2.Timestamp | None


def to_timestamp(value: TimeLike) -> timestamp_pb2.Timestamp | None:
    """A Timestamp from a datetime (naive means UTC), unix seconds, or a Timestamp; None stays None."""
    if value is None or isinstance(value, timestamp_pb2.Timestamp):
        return value
    ts = timestamp_pb2.Timestamp()
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        ts.FromDatetime(value)
    else:
        ts.FromNanoseconds(int(round(value * 1e9)))
    return ts


def usage_request(*, start_time: TimeLike, end_time: TimeLike, group_by: Iterable[int], metadata_key: str,
                  project: str, model: str, provider: str, page_size: int) -> usage_pb2.QueryUsageRequest:
    return usage_pb2.QueryUsageRequest(start_time=to_timestamp(start_time), end_time=to_timestamp(end_time),
                                       group_by=list(group_by), metadata_key=metadata_key, project=project,
                                       model=model, provider=provider, page_size=page_size)
