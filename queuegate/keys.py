"""Every Redis key queuegate writes, in one place, under the namespace prefix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str

    def result(self, job_id: str) -> str:
        """A finished job's result and usage event, so a redelivery is answered, not re-run."""
        return f"{self.prefix}:result:{job_id}"

    def team_bucket(self, team: str, model: str | None = None) -> str:
        """A team's token bucket (hash: requests, tokens, last refill), or one of its models'."""
        base = f"{self.prefix}:bucket:team:{team}"
        return base if model is None else f"{base}:model:{model}"

    def deployment_bucket(self, deployment: str) -> str:
        """A provider account's bucket, shared by every team and every worker."""
        return f"{self.prefix}:bucket:deployment:{deployment}"

    def spend(self, team: str, month: str, model: str | None = None) -> str:
        """Nano-USD spent and reserved by a team in a UTC month (``YYYY-MM``), or on one model."""
        base = f"{self.prefix}:spend:{team}:{month}"
        return base if model is None else f"{base}:model:{model}"

    def budget_alerted(self, team: str, month: str) -> str:
        """Set once the team's alert for the month has been emitted, so it fires only once."""
        return f"{self.prefix}:budget-alerted:{team}:{month}"

    @property
    def alerts(self) -> str:
        """A stream of budget alerts (XREAD it); entries: team, month, spent_usd, budget_usd."""
        return f"{self.prefix}:alerts"
