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
