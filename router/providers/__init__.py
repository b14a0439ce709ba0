"""Provider adapters, one per wire format, looked up by the catalog's provider kind."""

from router.catalog import ProviderKind
from router.providers.anthropic import AnthropicAdapter
from router.providers.base import (
    Adapter,
    Completion,
    Delta,
    Piece,
    ProviderError,
    ServerEvent,
    StreamParser,
    UpstreamRequest,
    Usage,
)
from router.providers.openai import OpenAIAdapter

ADAPTERS: dict[ProviderKind, Adapter] = {
    "openai": OpenAIAdapter(strict=True),
    # Same wire; each server has parameters of its own, so they are all passed on.
    "openai_compatible": OpenAIAdapter(strict=False),
    "anthropic": AnthropicAdapter(),
}

__all__ = [
    "ADAPTERS",
    "Adapter",
    "AnthropicAdapter",
    "Completion",
    "Delta",
    "OpenAIAdapter",
    "Piece",
    "ProviderError",
    "ServerEvent",
    "StreamParser",
    "UpstreamRequest",
    "Usage",
]
