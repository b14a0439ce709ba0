"""What a worker reports about its jobs: Prometheus metrics and live stats, from one call each.

telemetry.taken(team)                  # a delivery arrived
telemetry.finished(outcome)            # once per job actually served (not redeliveries)
telemetry.released(team)               # the delivery is settled
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection

from queuegate import metrics
from queuegate.livestats import LiveStatsWriter
from queuegate.messages import UsageEvent
from workers.outcome import Outcome

UNLISTED_MODEL = "-"
"""The model label of jobs whose alias is not in the catalog (label values stay bounded)."""


class Telemetry:
    def __init__(self, models: Collection[str], live: LiveStatsWriter | None = None) -> None:
        self._models = models
        self.live = live
        """Where live stats go; the worker attaches it once it has a Redis client."""
        self.in_flight: Counter[str] = Counter()
        """Deliveries held right now, by team."""

    # Two calls rather than a context manager: its generator and frame would be held by every
    # job in flight, thousands of them at once.
    def taken(self, team: str) -> None:
        self.in_flight[team] += 1
        metrics.IN_FLIGHT.labels(team).inc()
        if self.live is not None:
            self.live.taken(team)

    def released(self, team: str) -> None:
        self.in_flight[team] -= 1
        metrics.IN_FLIGHT.labels(team).dec()

    def finished(self, outcome: Outcome) -> None:
        usage = outcome.usage
        attempts = outcome.result.gateway.attempts
        team = usage.team
        model = self._model_label(usage)
        metrics.JOBS.labels(team, model, usage.error_code or usage.status).inc()
        metrics.QUEUE_WAIT.labels(team).observe(usage.queued_ms / 1000)
        metrics.TOKENS.labels(team, model, "input").inc(usage.input_tokens)
        metrics.TOKENS.labels(team, model, "output").inc(usage.output_tokens)
        metrics.COST.labels(team, model).inc(float(usage.cost_usd))
        if len(attempts) > 1:
            metrics.RETRIES.labels(team, model).inc(len(attempts) - 1)
        if usage.fallback_used:
            metrics.FALLBACKS.labels(team, model).inc()
        for attempt in attempts:
            metrics.PROVIDER_LATENCY.labels(attempt.deployment, attempt.error or "ok").observe(
                attempt.latency_ms / 1000
            )
        if self.live is not None:
            self.live.finished(usage, attempts)

    def _model_label(self, usage: UsageEvent) -> str:
        # The requested alias: a bad job may name anything, so only catalog aliases pass.
        return usage.model_requested if usage.model_requested in self._models else UNLISTED_MODEL
