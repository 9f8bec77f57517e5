"""Provider adapters by name, built on first use and shared by every batch."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

from batchgate_server.providers.base import BatchProvider, UnsupportedRequest

log = logging.getLogger(__name__)

# provider name -> "module:factory"; a factory takes the ProviderContext.
BUILTIN_PROVIDERS = {
    "openai_compatible": "batchgate_server.providers.executor.provider:ExecutorProvider",
    "openai": "batchgate_server.providers.openai_batch:OpenAIBatchProvider",
    "azure": "batchgate_server.providers.openai_batch:AzureBatchProvider",
    "anthropic": "batchgate_server.providers.anthropic.provider:AnthropicBatchProvider",
    "vertex_ai": "batchgate_server.providers.vertex.provider:VertexBatchProvider",
    "bedrock": "batchgate_server.providers.bedrock.provider:BedrockBatchProvider",
}


class ProviderRegistry:
    def __init__(self, factories: dict[str, Callable[[], BatchProvider]] | None = None) -> None:
        self._factories = dict(factories or {})
        self._instances: dict[str, BatchProvider] = {}

    def register(self, name: str, factory: Callable[[], BatchProvider]) -> None:
        self._factories[name] = factory

    def get(self, name: str) -> BatchProvider:
        if name in self._instances:
            return self._instances[name]
        factory = self._factories.get(name)
        if factory is None and name in BUILTIN_PROVIDERS:
            module_name, _, attr = BUILTIN_PROVIDERS[name].partition(":")
            try:
                factory = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as err:
                log.warning("provider %s is not available: %s", name, err)
        if factory is None:
            raise UnsupportedRequest(f"provider {name!r} is not available in this build", reason="PROVIDER_UNAVAILABLE",
                                     details={"provider": name})
        instance = factory()
        self._instances[name] = instance
        return instance

    async def close(self) -> None:
        for provider in self._instances.values():
            try:
                await provider.close()
            except Exception:  # closing is best effort at shutdown
                log.exception("closing provider %s failed", provider.name)
        self._instances.clear()
