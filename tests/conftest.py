"""Fixtures: the real RabbitMQ, Redis and PostgreSQL, one namespace, prefix and schema per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import aio_pika
import asyncpg
import pytest
import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel

from accounting import migrate
from admin.teams import Credentials, add
from queuegate.db import create_pool
from queuegate.management import BrokerAdmin
from queuegate.redis_client import redis_for
from queuegate.settings import Settings
from tests import dashboard_browser, session_services
from tests.chaos.harness import FIGURES_PROPERTY
from tests.rabbit_cluster import RabbitCluster
from tests.support import drop_test_namespace

TEST_TEAMS = ("alpha", "beta", "gamma")
"""Teams tests may use; their queues are deleted after every test."""


def pytest_sessionstart(session: pytest.Session) -> None:
    """Before any test reads its settings: the services answer, or containers stand in for
    the silent ones, or the run ends at once in one line (tests/session_services.py)."""
    session_services.prepare(session.config)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Browser tests collected without a Chromium to drive: end before any test, in one line."""
    needs_browser = any(
        getattr(getattr(item, "module", None), "chromium", None) is dashboard_browser.chromium
        for item in session.items
    )
    missing = dashboard_browser.missing_browser() if needs_browser else None
    if missing is not None:
        raise pytest.UsageError(missing)


def pytest_unconfigure(config: pytest.Config) -> None:
    session_services.release(config)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The chaos scenarios' figures, together at the end (recorded by tests/chaos/conftest.py
    on each test's report, so xdist's workers hand them back too)."""
    lines = [
        value
        for reports in terminalreporter.stats.values()
        for report in reports
        for name, value in getattr(report, "user_properties", ())
        if name == FIGURES_PROPERTY
    ]
    if lines:
        terminalreporter.section("chaos figures")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    return Settings()


@pytest.fixture(scope="session")
def rabbit_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    """Three RabbitMQ nodes of the run's own in one cluster (booting them takes about 25 s),
    for the tests that need one; removed at the end of the run."""
    with RabbitCluster(tmp_path_factory.mktemp("rabbit-cluster")) as cluster:
        yield cluster


@pytest.fixture
async def settings(base_settings: Settings) -> AsyncIterator[Settings]:
    """Settings of this test alone: its own namespace, Redis prefix and database schema."""
    tag = uuid.uuid4().hex[:10]
    s = base_settings.model_copy(
        update={"namespace": f"qgt-{tag}", "database_schema": f"qgt_{tag}", "shutdown_grace": 5.0}
    )
    yield s
    await drop_test_namespace(s, TEST_TEAMS)


@pytest.fixture
async def direct(settings: Settings) -> AsyncIterator[AbstractChannel]:
    """A channel of a connection of this test's own to the broker (as the admin user)."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        yield await connection.channel()


@pytest.fixture
async def redis_client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = redis_for(settings)
    yield client
    await client.aclose()


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A pool on this test's schema, migrated."""
    pool = await create_pool(settings)
    await migrate(pool, settings.database_schema)
    yield pool
    await pool.close()


@pytest.fixture
async def teams(settings: Settings) -> AsyncIterator[dict[str, Credentials]]:
    """Teams alpha and beta added the default way, each its own broker user (deleted after)."""
    created: dict[str, Credentials] = {}
    try:
        for team in ("alpha", "beta"):
            created[team] = await add(settings, team)
        yield created
    finally:
        async with BrokerAdmin.of(settings) as admin:
            for credentials in created.values():
                if credentials.user:
                    await admin.delete_user(credentials.user)
