"""Every Prometheus metric queuegate exports, in one place, and the calls that feed them.

Labels are bounded: teams (the registry), model aliases and deployment names (the catalog),
job statuses (``ok`` or a wire error code). Never a job id, a worker name or free text.

Components call the small functions below rather than touching the metric objects, so one
line at a call site is enough::

    observe_bucket_wait("search", seconds)       # admission control, after a bucket wait
    set_breaker_state("openai-main", "open")     # circuit breakers, on every transition seen

The metrics live in prometheus_client's default registry (with its process collector);
``exposition()`` is what ``/metrics`` answers (``queuegate.metrics_server``, the front door).

Processes that share one port (the front door under ``--processes N``) share their metrics
too: their supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` to a private directory before they
start, each writes its values there, and any of them answers the sum (counters, histograms)
or the combination each gauge's ``multiprocess_mode`` names; a process that ends has its live
gauges removed (``queuegate.supervisor``), its counts kept.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from datetime import UTC, datetime
from functools import cache
from typing import Literal

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
"""The environment variable (prometheus_client's) naming the directory processes share
their metrics through; read by prometheus_client when it is imported."""

BreakerState = Literal["closed", "half_open", "open"]
BREAKER_VALUES: dict[BreakerState, int] = {"closed": 0, "half_open": 1, "open": 2}
"""The value of ``queuegate_breaker_state`` for each state."""

# Seconds: from a few milliseconds in the queue to a provider call near its timeout.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000)

JOBS = Counter(
    "queuegate_jobs",
    "Jobs finished by workers, by team, requested model alias and status (ok or error code).",
    ["team", "model", "status"],
)
QUEUE_WAIT = Histogram(
    "queuegate_queue_wait_seconds",
    "Time a job spent in its team queue, from publish to delivery.",
    ["team"],
    buckets=_LATENCY_BUCKETS,
)
BUCKET_WAIT = Histogram(
    "queuegate_bucket_wait_seconds",
    "Time a job waited in the worker for its token buckets to refill.",
    ["team"],
    buckets=_LATENCY_BUCKETS,
)
PROVIDER_LATENCY = Histogram(
    "queuegate_provider_latency_seconds",
    "Time of each provider call, by deployment and outcome (ok or the error class).",
    ["deployment", "outcome"],
    buckets=_LATENCY_BUCKETS,
)
TOKENS = Counter(
    "queuegate_tokens",
    "Tokens of finished jobs, by team, requested model alias and direction (input or output).",
    ["team", "model", "direction"],
)
COST = Counter(
    "queuegate_cost_usd",
    "Cost in USD of finished jobs, by team and requested model alias.",
    ["team", "model"],
)
RETRIES = Counter(
    "queuegate_retries",
    "Provider calls beyond the first one of a job, by team and requested model alias.",
    ["team", "model"],
)
FALLBACKS = Counter(
    "queuegate_fallbacks",
    "Jobs served by a deployment other than the requested alias's first one.",
    ["team", "model"],
)
BREAKER_STATE = Gauge(
    "queuegate_breaker_state",
    "Circuit breaker state per deployment: 0 closed, 1 half-open, 2 open.",
    ["deployment"],
    multiprocess_mode="livemax",
)
BUCKET_FILL = Gauge(
    "queuegate_bucket_fill_ratio",
    "How full a team's bucket is, its requests or its tokens, whichever is emptier: from 0 "
    "(empty: jobs wait) to 1 (full).",
    ["team"],
    multiprocess_mode="livemin",
)
IN_FLIGHT = Gauge(
    "queuegate_in_flight_jobs",
    "Jobs a worker process holds right now, by team.",
    ["team"],
    multiprocess_mode="livesum",
)
BROKER_RECONNECTS = Counter(
    "queuegate_broker_reconnects",
    "Times a worker's broker connection was lost and made again: its own (worker, team empty), "
    "or the one of a team's jobs and control answers (team, with the team's name).",
    ["connection", "team"],
)
ACCOUNTING_EVENTS = Counter(
    "queuegate_accounting_events",
    "Usage events handled by accounting, by outcome (written or rejected).",
    ["outcome"],
)


# Metrics without labels, made by the process whose role feeds them, when it first does: one
# is exported from its making, at 0 until set, so made here with the rest every process
# exported every role's (a worker's /metrics an accounting lag of 0, and accounting's a
# usage batch size), and an alert on the lag's absence never fired while accounting was down.


@cache
def _usage_batch() -> Histogram:
    return Histogram(
        "queuegate_usage_batch_size",
        "Usage events per message a worker sent (the jobs that finished while its previous batch "
        "awaited the broker's confirm).",
        buckets=_BATCH_BUCKETS,
    )


@cache
def _accounting_batch() -> Histogram:
    return Histogram(
        "queuegate_accounting_batch_size",
        "Usage events per batch written to PostgreSQL.",
        buckets=_BATCH_BUCKETS,
    )


@cache
def _accounting_lag() -> Gauge:
    return Gauge(
        "queuegate_accounting_lag_seconds",
        "Age of the oldest usage event accounting holds unwritten (0 when it holds none): grows "
        "while accounting is behind or PostgreSQL is down.",
        multiprocess_mode="livemax",
    )


@cache
def _redis_evicts_keys() -> Gauge:
    return Gauge(
        "queuegate_redis_evicts_keys",
        "1 while the worker's Redis evicts keys once full (a maxmemory and a maxmemory-policy "
        "other than noeviction), asked every minute: a job whose claim or stored outcome it "
        "evicts is called and answered again. 0 otherwise.",
        multiprocess_mode="livemax",
    )


ROLE_METRICS = (_usage_batch, _accounting_batch, _accounting_lag, _redis_evicts_keys)
"""What makes each metric of one role's (above), for a reader of every metric's name."""

SPEND_DRIFT = Gauge(
    "queuegate_spend_drift_usd",
    "What the last reconciliation corrected in a spend ledger, USD: Redis's count minus "
    "PostgreSQL's and the jobs still open (positive: Redis had counted more). Model 'all' "
    "is the team's monthly budget, any other a model's cap.",
    ["team", "model"],
    multiprocess_mode="livemostrecent",
)
SPEND_CORRECTED = Counter(
    "queuegate_spend_corrected_usd",
    "USD corrected in spend ledgers by reconciliations, either way, since the process started.",
    ["team", "model"],
)

HTTP_REQUESTS = Counter(
    "queuegate_http_requests",
    "Requests the HTTP front door answered, by route (its template) and status.",
    ["route", "status"],
)
HTTP_LATENCY = Histogram(
    "queuegate_http_request_seconds",
    "Time from a request's arrival to its answer's start (a stream's headers), by route.",
    ["route"],
    buckets=_LATENCY_BUCKETS,
)
HTTP_CONNECTIONS_CLOSED = Counter(
    "queuegate_http_connections_closed",
    "Connections the HTTP front door closed before a request was whole, by reason: "
    "header_bytes (431), header_timeout (408), full (503: every connection busy), evicted "
    "(the one idle longest, to make room for a new one).",
    ["reason"],
)


def exposition() -> bytes:
    """The text ``/metrics`` answers: this process's metrics, or every process's when they
    share a ``MULTIPROCESS_DIR``."""
    directory = os.environ.get(MULTIPROCESS_DIR)
    if not directory:
        return generate_latest(REGISTRY)
    shared = CollectorRegistry()
    MultiProcessCollector(shared, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(shared)


def observe_http(route: str, status: int, seconds: float) -> None:
    """The front door answered a request of ``route`` (a template, never a raw path)."""
    HTTP_REQUESTS.labels(route, str(status)).inc()
    HTTP_LATENCY.labels(route).observe(seconds)


def observe_connection_closed(reason: str) -> None:
    """The front door closed a connection before a request was whole, for ``reason``."""
    HTTP_CONNECTIONS_CLOSED.labels(reason).inc()


def observe_spend_correction(team: str, model: str | None, drift: float) -> None:
    """A reconciliation corrected ``drift`` USD in the team's (or its model's) ledger."""
    label = model or "all"
    SPEND_DRIFT.labels(team, label).set(drift)
    SPEND_CORRECTED.labels(team, label).inc(abs(drift))


# Each team's series, looked up once: ``labels`` costs a few µs a call, and a governed job
# records both (a bucket's wait and fill) on its way to its call.
_BUCKET_WAITS: dict[str, Histogram] = {}
_BUCKET_FILLS: dict[str, Gauge] = {}


def observe_bucket_wait(team: str, seconds: float) -> None:
    """A job of ``team`` waited ``seconds`` for its token buckets (0 when it did not wait)."""
    series = _BUCKET_WAITS.get(team)
    if series is None:
        series = _BUCKET_WAITS[team] = BUCKET_WAIT.labels(team)
    series.observe(seconds)


def set_bucket_fill(team: str, ratio: float) -> None:
    """The team's bucket after a take, its emptier dimension: 0 empty, 1 full."""
    series = _BUCKET_FILLS.get(team)
    if series is None:
        series = _BUCKET_FILLS[team] = BUCKET_FILL.labels(team)
    series.set(ratio)


def keep_bucket_fills(teams: Collection[str]) -> None:
    """Drop the bucket fill of every team but ``teams``: a team whose limits were removed has
    no bucket, and its last reading, kept, read as a bucket still that full (0 %: "jobs wait")
    in the metric and in ``queuegate status``."""
    for team in gauge_values(BUCKET_FILL).keys() - set(teams):
        BUCKET_FILL.remove(team)
        _BUCKET_FILLS.pop(team, None)  # a later take records it anew


def set_breaker_state(deployment: str, state: BreakerState) -> None:
    """The deployment's breaker changed state, or was read again (``Health.refresh_gauges``)."""
    BREAKER_STATE.labels(deployment).set(BREAKER_VALUES[state])


def observe_usage_batch(events: int) -> None:
    """A worker's batch of usage events was confirmed by the broker."""
    _usage_batch().observe(events)


def observe_accounting_batch(written: int, rejected: int) -> None:
    """A batch committed: its size."""
    _accounting_batch().observe(written + rejected)
    ACCOUNTING_EVENTS.labels("written").inc(written)
    if rejected:
        ACCOUNTING_EVENTS.labels("rejected").inc(rejected)


def set_accounting_lag(oldest: datetime | None) -> None:
    """Accounting holds events unwritten since ``oldest`` (the earliest of their jobs' ends),
    or none (None): the lag is the time since then, or 0."""
    if oldest is None:
        _accounting_lag().set(0.0)
        return
    if oldest.tzinfo is None:  # an event's time without an offset is UTC, as accounting stores it
        oldest = oldest.replace(tzinfo=UTC)
    _accounting_lag().set(max(0.0, (datetime.now(UTC) - oldest).total_seconds()))


def set_redis_evicts_keys(evicts: bool) -> None:
    """The worker's Redis evicts keys once full (``workers.eviction_watch``), or not."""
    _redis_evicts_keys().set(evicts)


def gauge_values(gauge: Gauge) -> dict[str, float]:
    """The current values of a gauge with one label, by that label's value."""
    return {
        sample.labels[next(iter(sample.labels))]: sample.value
        for metric in gauge.collect()
        for sample in metric.samples
        if sample.labels
    }
