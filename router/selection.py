"""Choosing among an alias's deployments: routing order, in-flight counts, concurrency caps.

In-flight counts and caps are this process's own (one Router per worker process): a cap of
8 on a deployment served by 4 workers allows up to 32 calls at once in total.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence

from router.catalog import Deployment, Routing


class Slots:
    """Calls running per deployment, with a wait for a free slot under ``max_in_flight``."""

    def __init__(self) -> None:
        self._running: Counter[str] = Counter()
        self._freed = asyncio.Condition()

    def running(self, deployment: Deployment) -> int:
        return self._running[deployment.name]

    def full(self, deployment: Deployment) -> bool:
        """Whether the deployment runs as many calls as its cap allows."""
        cap = deployment.max_in_flight
        return cap is not None and self._running[deployment.name] >= cap

    def take(self, deployment: Deployment) -> bool:
        """Count one call as running, if under the deployment's cap; ``release`` it after."""
        if self.full(deployment):
            return False
        self._running[deployment.name] += 1
        return True

    async def release(self, deployment: Deployment) -> None:
        self._running[deployment.name] -= 1
        async with self._freed:
            self._freed.notify_all()

    async def wait_freed(self) -> None:
        """Return when any call ends (run it under a timeout)."""
        async with self._freed:
            await self._freed.wait()

    def order(self, routing: Routing, candidates: Sequence[Deployment]) -> list[Deployment]:
        """Candidates in the order to try them under ``routing``."""
        if routing == "ordered" or len(candidates) < 2:
            return list(candidates)
        if routing == "least_in_flight":
            # Fewest running calls per unit of weight first; a random key breaks ties by weight.
            return sorted(
                candidates,
                key=lambda d: (self._running[d.name] / d.weight, _weighted_key(d)),
            )
        return sorted(candidates, key=_weighted_key)


def _weighted_key(deployment: Deployment) -> float:
    # Sorting by -U**(1/w) draws a weighted order without replacement (Efraimidis-Spirakis).
    return -float(random.random() ** (1 / deployment.weight))
