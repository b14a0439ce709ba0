"""Every Redis key queuegate writes, in one place, under the namespace prefix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str

    def result(self, job_id: str) -> str:
        """A finished job's result and usage event, so a redelivery is answered, not re-run."""
        return f"{self.prefix}:result:{job_id}"
