"""Resilience settings of the catalog: retries, the per-job budget, circuit breakers.

Each has sensible defaults, set once for the whole catalog under ``resilience:``; a deployment
may override ``retry`` and ``breaker`` for itself::

    resilience:
      retry: {attempts: 3, base_delay: 0.25, max_delay: 8}
      budget: {attempts: 6, wait: 10}
      breaker: {failures: 5, ratio: 0.5, window: 60, cooldown: 30}
      rate_limit_pause: 1
"""

from __future__ import annotations

import random
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

MAX_SECONDS = 86_400.0
"""The longest duration the catalog takes: a day."""

MAX_COUNT = 10**12
"""The largest count the catalog takes (requests or tokens per minute, weights, failures)."""

Count = Annotated[int, Field(ge=1, le=MAX_COUNT)]
"""A count in the catalog: at least 1, and small enough to divide as a float and to keep
in Redis."""

Seconds = Annotated[float, Field(ge=0, le=MAX_SECONDS, allow_inf_nan=False)]
"""A duration in the catalog, in seconds: finite and at most a day, because workers turn
each one into milliseconds and deadlines (``.inf`` would fail every job that meets it)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryPolicy(_Strict):
    """Calls to one deployment for one job, spaced by exponential backoff with full jitter."""

    attempts: int = Field(default=2, ge=1, le=10)
    """Calls to the deployment per job, the first one included."""
    base_delay: Seconds = 0.25
    """Seconds; the n-th retry waits a uniform draw from [0, base_delay * 2**n], capped."""
    max_delay: Seconds = 8.0

    def backoff(self, retry: int, floor: float | None = None) -> float:
        """Seconds before retry number ``retry`` (0 for the first retry); ``floor`` is what the
        provider asked for (Retry-After), never waited less."""
        # Full jitter: retries of many jobs failing together spread out instead of re-colliding.
        delay = random.uniform(0, min(self.max_delay, self.base_delay * 2**retry))
        return max(delay, floor or 0.0)


class BudgetPolicy(_Strict):
    """What one job may spend on failures across its whole fallback chain."""

    attempts: int = Field(default=6, ge=1, le=50)
    """Provider calls per job, successful one included."""
    wait: Seconds = 10.0
    """Seconds per job spent waiting for backoffs and Retry-After; never past the deadline."""


class BreakerPolicy(_Strict):
    """When a deployment's circuit opens (state shared by every worker through Redis)."""

    failures: Count = 5
    """Failures within ``window`` that open the circuit, provided they are also ``ratio``
    of its calls: a dead deployment opens after this many calls, while a busy one with a
    few percent of errors never does (a count alone would open it at any error rate)."""
    ratio: float = Field(default=0.5, gt=0, le=1, allow_inf_nan=False)
    """The share of the window's calls that must have failed (checked when a call fails)."""
    window: Seconds = Field(default=60.0, gt=0)
    """Seconds over which calls and failures are counted (a fixed window)."""
    cooldown: Seconds = Field(default=30.0, gt=0)
    """Seconds an open circuit refuses calls before one probe is let through."""


class Resilience(_Strict):
    retry: RetryPolicy = RetryPolicy()
    budget: BudgetPolicy = BudgetPolicy()
    breaker: BreakerPolicy = BreakerPolicy()
    rate_limit_pause: Seconds = 1.0
    """Seconds a deployment is paused after a 429 that did not say how long to wait."""
