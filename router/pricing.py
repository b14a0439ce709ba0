"""What a call cost, in exact Decimal USD, from the deployment's per-million-token prices.

Each token class is billed at its own price: prompt tokens read from a prompt cache, prompt
tokens written to one (Anthropic: five-minute and one-hour writes apart), the other prompt
tokens, and output tokens (reasoning tokens among them, at the output price, as providers
bill them). A cache price the catalog leaves unset is the input price.
"""

from __future__ import annotations

from decimal import Decimal

from router.catalog import Deployment
from router.providers.base import Usage

_PER = Decimal(1_000_000)


def cost(deployment: Deployment, usage: Usage) -> Decimal:
    """The USD of ``usage`` at ``deployment``'s prices."""
    base = deployment.input_per_mtok
    read = deployment.cached_input_per_mtok
    write = deployment.cache_write_per_mtok
    write_1h = deployment.cache_write_1h_per_mtok
    read = base if read is None else read
    write = base if write is None else write
    write_1h = write if write_1h is None else write_1h
    written_5m = usage.cache_write_tokens - usage.cache_write_1h_tokens
    uncached = usage.input_tokens - usage.cached_tokens - usage.cache_write_tokens
    return (
        max(0, uncached) * base
        + usage.cached_tokens * read
        + written_5m * write
        + usage.cache_write_1h_tokens * write_1h
        + usage.output_tokens * deployment.output_per_mtok
    ) / _PER
