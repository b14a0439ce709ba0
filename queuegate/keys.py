"""Every Redis key queuegate writes, in one place, under the namespace prefix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str

    def result(self, team: str, job_id: str) -> str:
        """A finished job's result and usage event, so a redelivery is answered, not re-run.

        Per team: job ids are chosen by producers, so one team's id must never find another's.
        """
        return f"{self.prefix}:result:{team}:{job_id}"

    # Live stats: written by workers every few seconds, read by `queuegate status`.

    @property
    def live_workers(self) -> str:
        """Sorted set: worker name → time of its last snapshot (seconds since the epoch)."""
        return f"{self.prefix}:live:workers"

    def live_worker(self, worker: str) -> str:
        """A worker's snapshot (JSON): in-flight per team, breaker states, bucket fills."""
        return f"{self.prefix}:live:worker:{worker}"

    def live_team(self, team: str, window: int) -> str:
        """Hash of one time window's counts for a team: taken, finished, errors."""
        return f"{self.prefix}:live:team:{team}:{window}"

    def live_waits(self, team: str) -> str:
        """List of the team's most recent queue waits (ms), newest first."""
        return f"{self.prefix}:live:waits:{team}"

    def live_deployment(self, deployment: str, window: int) -> str:
        """Hash of one time window's provider calls for a deployment: calls, errors."""
        return f"{self.prefix}:live:deployment:{deployment}:{window}"

    def live_spend(self, team: str, month: str) -> str:
        """The team's spend (USD) in a month (``YYYY-MM``) as the workers saw it."""
        return f"{self.prefix}:live:spend:{team}:{month}"
