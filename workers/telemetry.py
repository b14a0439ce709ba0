"""What a worker reports about its jobs: Prometheus metrics and live stats, from one call each.

telemetry.taken(team)                  # a delivery arrived
telemetry.finished(outcome)            # once per job actually served (not redeliveries)
telemetry.released(team)               # the delivery is settled
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from typing import NamedTuple

from prometheus_client import Counter as Total
from prometheus_client import Gauge, Histogram

from queuegate import metrics
from queuegate.livestats import LiveStatsWriter
from queuegate.messages import UsageEvent
from workers.outcome import Outcome

UNLISTED_MODEL = "-"
"""The model label of jobs whose alias is not in the catalog (label values stay bounded)."""


class _JobSeries(NamedTuple):
    """The series a finished job of one team, model label and status counts in."""

    jobs: Total
    wait: Histogram
    input: Total
    output: Total
    cost: Total

    @classmethod
    def of(cls, team: str, model: str, status: str) -> _JobSeries:
        return cls(
            metrics.JOBS.labels(team, model, status),
            metrics.QUEUE_WAIT.labels(team),
            metrics.TOKENS.labels(team, model, "input"),
            metrics.TOKENS.labels(team, model, "output"),
            metrics.COST.labels(team, model),
        )


class Telemetry:
    def __init__(self, models: Collection[str], live: LiveStatsWriter | None = None) -> None:
        self._models = models
        self.live = live
        """Where live stats go; the worker attaches it once it has a Redis client."""
        self.in_flight: Counter[str] = Counter()
        """Deliveries held right now, by team."""
        # Each job's series, looked up once: ``labels`` costs 1-2 µs a call, nine a job. The
        # label values are as bounded as the series themselves (teams served, catalog aliases,
        # error codes, deployments), and no series is ever removed.
        self._in_flight: dict[str, Gauge] = {}
        self._series: dict[tuple[str, str, str], _JobSeries] = {}
        self._latency: dict[tuple[str, str], Histogram] = {}

    # Two calls rather than a context manager: its generator and frame would be held by every
    # job in flight, thousands of them at once.
    def taken(self, team: str) -> None:
        self.in_flight[team] += 1
        self._gauge(team).inc()
        if self.live is not None:
            self.live.taken(team)

    def released(self, team: str) -> None:
        self.in_flight[team] -= 1
        self._gauge(team).dec()

    def finished(self, outcome: Outcome) -> None:
        usage = outcome.usage
        attempts = outcome.result.gateway.attempts
        team = usage.team
        model = self._model_label(usage)
        key = (team, model, usage.error_code or usage.status)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _JobSeries.of(*key)
        series.jobs.inc()
        series.wait.observe(usage.queued_ms / 1000)
        # A counter only rises: a stalled owner's row billing less than the estimate its call
        # was billed at as lost (``outcome_of_late``), or fewer tokens than its estimated
        # ones, leaves it; usage_log holds the refund.
        series.input.inc(max(usage.input_tokens, 0))
        series.output.inc(max(usage.output_tokens, 0))
        series.cost.inc(max(float(usage.cost_usd), 0.0))
        if len(attempts) > 1:
            metrics.RETRIES.labels(team, model).inc(len(attempts) - 1)
        if usage.fallback_used:
            metrics.FALLBACKS.labels(team, model).inc()
        for attempt in attempts:
            where = (attempt.deployment, attempt.error or "ok")
            latency = self._latency.get(where)
            if latency is None:
                latency = self._latency[where] = metrics.PROVIDER_LATENCY.labels(*where)
            latency.observe(attempt.latency_ms / 1000)
        if self.live is not None:
            self.live.finished(usage, attempts)

    def _gauge(self, team: str) -> Gauge:
        gauge = self._in_flight.get(team)
        if gauge is None:
            gauge = self._in_flight[team] = metrics.IN_FLIGHT.labels(team)
        return gauge

    def _model_label(self, usage: UsageEvent) -> str:
        # The requested alias: a bad job may name anything, so only catalog aliases pass.
        return usage.model_requested if usage.model_requested in self._models else UNLISTED_MODEL
