"""batchgate: generated gRPC stubs (batchgate.v1) and a small typed client."""

from batchgate._common import TERMINAL_STATUSES, DownloadVerificationError
from batchgate.client import BatchgateClient
from batchgate.aio import AsyncBatchgateClient

__all__ = ["BatchgateClient", "AsyncBatchgateClient", "DownloadVerificationError", "TERMINAL_STATUSES"]
