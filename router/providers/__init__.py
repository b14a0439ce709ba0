"""Provider adapters, one per wire format, looked up by the catalog's provider kind."""

from router.catalog import ProviderKind
from router.providers.anthropic import AnthropicAdapter
from router.providers.base import (
    Adapter,
    Completion,
    Delta,
    ProviderError,
    ServerEvent,
    StreamParser,
    UpstreamRequest,
    Usage,
)
from router.providers.openai import OpenAIAdapter

ADAPTERS: dict[ProviderKind, Adapter] = {
    "openai": OpenAIAdapter(),
    "openai_compatible": OpenAIAdapter(),  # same wire; only the catalog's key rule differs
    "anthropic": AnthropicAdapter(),
}

__all__ = [
    "ADAPTERS",
    "Adapter",
    "AnthropicAdapter",
    "Completion",
    "Delta",
    "OpenAIAdapter",
    "ProviderError",
    "ServerEvent",
    "StreamParser",
    "UpstreamRequest",
    "Usage",
]
