"""What a call cost, in exact Decimal USD, from the deployment's per-million-token prices."""

from __future__ import annotations

from decimal import Decimal

from router.catalog import Deployment
from router.providers.base import Usage

_PER = Decimal(1_000_000)


def cost(deployment: Deployment, usage: Usage) -> Decimal:
    """Input tokens (cached ones included, at the input price for now) plus output tokens."""
    return (
        usage.input_tokens * deployment.input_per_mtok
        + usage.output_tokens * deployment.output_per_mtok
    ) / _PER
