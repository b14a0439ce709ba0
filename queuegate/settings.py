"""Typed settings from the environment (``QUEUEGATE_*``) or passed in; never read at import."""

from __future__ import annotations

from pathlib import Path

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
    cache_ttl: int = Field(default=3600, ge=1)
    """Seconds a cached response (jobs with ``cache`` set) is served again."""
    max_job_bytes: int = Field(default=1_048_576, ge=1024)
    """Largest job body a worker accepts; larger ones are answered ``invalid_request``."""
    teams_refresh: float = Field(default=5.0, gt=0)
    """Seconds between reads of the team registry, so new teams are served without restart."""

    accounting_batch: int = Field(default=500, ge=1, le=10_000)
    accounting_linger: float = Field(default=0.05, ge=0)
    """Seconds accounting waits to fill a batch before writing what it has."""

    @property
    def redis_prefix(self) -> str:
        return self.namespace
