"""OpenAI and Azure OpenAI Batch API adapters.

mapping.py is pure translation (provider JSON -> PollResult, line rewriting); client.py is the
HTTP half (retries, streamed upload/download); provider.py wires them into BatchProvider.
"""

from .provider import AzureBatchProvider, OpenAIBatchProvider

__all__ = ["OpenAIBatchProvider", "AzureBatchProvider"]
