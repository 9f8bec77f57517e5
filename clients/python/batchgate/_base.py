"""What both clients set up the same way: the channel (plaintext or TLS), the stubs, the API key
and the options every operation reads."""

from __future__ import annotations

import os
from typing import Any

from batchgate._common import DEFAULT_ADDRESS, TLS, auth_metadata, make_channel
from batchgate._steps import Call, Open, Options, RetryPolicy
from batchgate.v1 import batch_pb2_grpc, file_pb2_grpc, usage_pb2_grpc


class ClientBase:
    """`target` defaults to BATCHGATE_ADDRESS (else 127.0.0.1:50051) and `api_key` to
    BATCHGATE_API_KEY. `tls=True` uses TLS with the system's CAs; a `TLS(...)` names the CA, a client
    certificate for mutual TLS, or the server name to check. `retry` sets how calls that fail
    UNAVAILABLE are retried (`NO_RETRIES` to turn that off)."""

    def __init__(self, channels: Any, target: str | None, api_key: str | None, *, channel: Any,
                 timeout: float | None, retry: RetryPolicy | None, tls: TLS | bool | None) -> None:
        self.target = target or os.environ.get("BATCHGATE_ADDRESS") or DEFAULT_ADDRESS
        if api_key is None:
            api_key = os.environ.get("BATCHGATE_API_KEY") or None
        if tls is True:
            tls = TLS()
        self._own_channel = channel is None
        self.channel = channel or make_channel(channels, self.target, tls or None)
        self.files = file_pb2_grpc.FileServiceStub(self.channel)
        self.batches = batch_pb2_grpc.BatchServiceStub(self.channel)
        self.usage = usage_pb2_grpc.UsageServiceStub(self.channel)
        self._md = auth_metadata(api_key)
        self.options = Options(timeout=timeout, retry=retry or RetryPolicy())

    @property
    def timeout(self) -> float | None:
        return self.options.timeout

    def _start(self, op: Call | Open) -> Any:
        """Start the call a step names on this client's stubs, with its key."""
        method = getattr(getattr(self, op.service), op.method)
        if isinstance(op, Call):
            return method(op.request, metadata=self._md, timeout=op.timeout)
        return method(op.request, metadata=self._md)
