"""Every Redis key queuegate writes, in one place, under the namespace prefix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str

    def result(self, job_id: str) -> str:
        """A finished job's result and usage event, so a redelivery is answered, not re-run."""
        return f"{self.prefix}:result:{job_id}"

    def batch(self, name: str) -> str:
        """A batch's description and running counts (hash)."""
        return f"{self.prefix}:batch:{name}"

    def batch_lines(self, name: str) -> str:
        """custom_id → line number of every valid request of a batch (hash)."""
        return f"{self.prefix}:batch:{name}:lines"

    def batch_index(self, name: str) -> str:
        """The lines hash being built while a batch file is validated, renamed when valid."""
        return f"{self.prefix}:batch:{name}:index"

    def batch_published(self, name: str) -> str:
        """custom_ids whose job the broker confirmed (set)."""
        return f"{self.prefix}:batch:{name}:published"

    def batch_written(self, name: str) -> str:
        """custom_ids whose result line is on disk (set)."""
        return f"{self.prefix}:batch:{name}:written"

    def batch_canceled(self, name: str) -> str:
        """Set when a batch is canceled; workers answer its remaining jobs ``canceled``."""
        return f"{self.prefix}:batch:{name}:canceled"
