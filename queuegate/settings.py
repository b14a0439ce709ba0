"""Typed settings from the environment (``QUEUEGATE_*``) or passed in; never read at import."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where the services are and how a gateway process behaves.

    Build it once at start (``Settings()`` reads ``QUEUEGATE_*`` variables) and pass it down;
    tests build their own with a namespace, Redis prefix and database schema of their own.
    """

    model_config = SettingsConfigDict(env_prefix="QUEUEGATE_", extra="ignore", frozen=True)

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    redis_url: str = "redis://127.0.0.1:6379/0"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/test"
    management_url: str = "http://guest:guest@127.0.0.1:15672/"
    """RabbitMQ's management API, for operator commands (users, quotas); never on a job's path."""

    namespace: str = Field(default="queuegate", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """Prefix of every broker name and Redis key, so environments and test runs never collide."""
    database_schema: str = Field(default="queuegate", pattern=r"^[a-z_][a-z0-9_]{0,62}$")

    catalog: Path | None = None
    """The model catalog (YAML); the bundled mock catalog when unset."""

    prefetch: int = Field(default=32, ge=1, le=10_000)
    """Unacknowledged jobs a worker holds per team queue: one team can fill only these slots."""
    delivery_limit: int = Field(default=5, ge=1)
    """Deliveries of one job before the broker dead-letters it (each crash or requeue counts)."""
    shutdown_grace: float = Field(default=30.0, ge=0)
    """Seconds in-flight jobs get to finish on SIGTERM before the rest go back to the queue."""
    result_ttl: int = Field(default=7 * 24 * 3600, ge=60)
    """Seconds a finished job's result is kept, so a redelivery is answered without a new call."""
    max_job_bytes: int = Field(default=1_048_576, ge=1024)
    """Largest job body a worker accepts; larger ones are answered ``invalid_request``."""
    teams_refresh: float = Field(default=5.0, gt=0)
    """Seconds between reads of the team registry, so new teams are served without restart."""

    admission_max_wait: float = Field(default=600.0, gt=0, le=1200)
    """Seconds a job may wait for its buckets before it is answered ``rate_limited``.

    Capped well below RabbitMQ's consumer timeout (30 min on 3.10, counted from delivery, and
    closing the whole channel): wait + provider timeout + publishing must stay far inside it.
    """
    expected_output_tokens: int = Field(default=256, ge=1)
    """Output tokens reserved for a job that sets no ``max_tokens`` (a team may override it)."""
    redis_outage: Literal["fail_closed", "fail_open"] = "fail_closed"
    """While Redis is unreachable: jobs wait for it (up to their deadline), or each worker
    admits from a local bucket holding its fair share of every limit."""
    admission_workers: int = Field(default=1, ge=1)
    """Worker processes that share each limit: a fail-open bucket holds 1/N of it, and
    per-team prefetch is sized from the share of the rate each worker gets."""

    accounting_batch: int = Field(default=500, ge=1, le=10_000)
    accounting_linger: float = Field(default=0.05, ge=0)
    """Seconds accounting waits to fill a batch before writing what it has."""

    @property
    def redis_prefix(self) -> str:
        return self.namespace
