"""Every Redis key queuegate writes, in one place, under the namespace prefix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str

    def result(self, job_id: str) -> str:
        """A finished job's result and usage event, so a redelivery is answered, not re-run."""
        return f"{self.prefix}:result:{job_id}"

    def breaker(self, deployment: str) -> str:
        """A deployment's circuit breaker: state, window counts (hash; router/lua/health.lua)."""
        return f"{self.prefix}:breaker:{deployment}"

    def paused(self, deployment: str) -> str:
        """Present while a deployment is paused after a provider 429; its TTL is the pause."""
        return f"{self.prefix}:paused:{deployment}"

    def cache(self, digest: str) -> str:
        """A cached response, by the hash of model, messages and parameters."""
        return f"{self.prefix}:cache:{digest}"
