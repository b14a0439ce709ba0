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

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryPolicy(_Strict):
    """Calls to one deployment for one job, spaced by exponential backoff with full jitter."""

    attempts: int = Field(default=2, ge=1, le=10)
    """Calls to the deployment per job, the first one included."""
    base_delay: float = Field(default=0.25, ge=0)
    """Seconds; the n-th retry waits a uniform draw from [0, base_delay * 2**n], capped."""
    max_delay: float = Field(default=8.0, ge=0)

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
    wait: float = Field(default=10.0, ge=0)
    """Seconds per job spent waiting for backoffs and Retry-After; never past the deadline."""


class BreakerPolicy(_Strict):
    """When a deployment's circuit opens (state shared by every worker through Redis)."""

    failures: int = Field(default=5, ge=1)
    """Failures within ``window`` that open the circuit, provided they are also ``ratio``
    of its calls: a dead deployment opens after this many calls, while a busy one with a
    few percent of errors never does (a count alone would open it at any error rate)."""
    ratio: float = Field(default=0.5, gt=0, le=1)
    """The share of the window's calls that must have failed (checked when a call fails)."""
    window: float = Field(default=60.0, gt=0)
    """Seconds over which calls and failures are counted (a fixed window)."""
    cooldown: float = Field(default=30.0, gt=0)
    """Seconds an open circuit refuses calls before one probe is let through."""


class Resilience(_Strict):
    retry: RetryPolicy = RetryPolicy()
    budget: BudgetPolicy = BudgetPolicy()
    breaker: BreakerPolicy = BreakerPolicy()
    rate_limit_pause: float = Field(default=1.0, ge=0)
    """Seconds a deployment is paused after a 429 that did not say how long to wait."""
