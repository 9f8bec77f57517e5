"""batchgate: generated gRPC stubs (batchgate.v1), typed sync and asyncio clients, typed errors, the
batch helpers `batch_completion` and `embed`, and the `batchgate` command line."""

from __future__ import annotations

from typing import Any, Sequence

from batchgate._batch_helpers import Answer, Answers, BatchFailedError
from batchgate._common import TLS, DownloadVerificationError
from batchgate._steps import NO_RETRIES, RetryPolicy
from batchgate.aio import AsyncBatchgateClient
from batchgate.client import BatchgateClient
from batchgate.errors import (
    AlreadyExistsError,
    BatchgateError,
    CancelledError,
    DeadlineExceededError,
    ErrorReason,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    Violation,
)
from batchgate.types import TERMINAL_STATUSES, Batch, BatchStatus, CostStatus, File, FilePurpose, UsageGroupBy

__all__ = [
    "BatchgateClient", "AsyncBatchgateClient", "TLS", "RetryPolicy", "NO_RETRIES",
    "Batch", "File", "BatchStatus", "FilePurpose", "CostStatus", "UsageGroupBy", "TERMINAL_STATUSES",
    "batch_completion", "abatch_completion", "embed", "aembed", "Answer", "Answers", "BatchFailedError",
    "DownloadVerificationError", "BatchgateError", "InvalidArgumentError", "NotFoundError", "AlreadyExistsError",
    "FailedPreconditionError", "UnauthenticatedError", "PermissionDeniedError", "ResourceExhaustedError",
    "DeadlineExceededError", "UnavailableError", "CancelledError", "InternalError", "UnimplementedError",
    "Violation", "ErrorReason",
]


def _env_client(cls):
    return cls(tls=TLS.from_env())


def batch_completion(model: str, messages: Sequence[Sequence[dict[str, Any]]], *,
                     client: BatchgateClient | None = None, **params: Any) -> Answers:
    """Each message list as one chat request, all run as one batch; the answers in input order.
    On `client`, or on a client made from BATCHGATE_ADDRESS, BATCHGATE_API_KEY and BATCHGATE_TLS_*.
    `params` (temperature, max_tokens, …) go into every request body.

    >>> answers = batch_completion("simulated", [
    ...     [{"role": "user", "content": "What is 2 + 2?"}],
    ...     [{"role": "user", "content": "Name a colour."}],
    ... ], temperature=0)
    >>> [answer.content for answer in answers]
    ['[simulated] You said: What is 2 + 2?', '[simulated] You said: Name a colour.']
    >>> answers.errors, str(answers.batch.status), answers.batch.request_counts.completed
    ([], 'completed', 2)

    A request that fails is an Answer with `error` set (`ok` false); the others are still there.
    """
    if client is not None:
        return client.batch_completion(model, messages, **params)
    with _env_client(BatchgateClient) as own:
        return own.batch_completion(model, messages, **params)


def embed(model: str, texts: Sequence[str], *, client: BatchgateClient | None = None, **params: Any) -> Answers:
    """Each text embedded as one request of one batch; the answers in input order.

    >>> answers = embed("simulated", ["first text", "second text"])
    >>> [(answer.index, len(answer.embedding)) for answer in answers]
    [(0, 16), (1, 16)]
    """
    if client is not None:
        return client.embed(model, texts, **params)
    with _env_client(BatchgateClient) as own:
        return own.embed(model, texts, **params)


async def abatch_completion(model: str, messages: Sequence[Sequence[dict[str, Any]]], *,
                            client: AsyncBatchgateClient | None = None, **params: Any) -> Answers:
    """The asyncio batch_completion."""
    if client is not None:
        return await client.batch_completion(model, messages, **params)
    async with _env_client(AsyncBatchgateClient) as own:
        return await own.batch_completion(model, messages, **params)


async def aembed(model: str, texts: Sequence[str], *, client: AsyncBatchgateClient | None = None,
                 **params: Any) -> Answers:
    """The asyncio embed."""
    if client is not None:
        return await client.embed(model, texts, **params)
    async with _env_client(AsyncBatchgateClient) as own:
        return await own.embed(model, texts, **params)
