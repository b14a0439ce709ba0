"""What a test session runs on: the local services, containers standing in for silent ones, or
one line saying why the tests cannot run (tests/session_services.py).

The shared services are never stopped here: "not answering" is a setting pointing at a port
nothing listens on. A Docker engine is not needed: where one would be, the plan says so.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest
from typer.testing import CliRunner

from cli.main import app
from queuegate.db import quote_ident
from queuegate.errors import ServiceUnavailable
from queuegate.management import BrokerAdmin
from queuegate.services import check_management, unanswered
from queuegate.settings import Settings
from tests.session_services import Plan, docker_engine, plan, replaceable
from tests.support import drop_test_namespace

ROOT = Path(__file__).resolve().parent.parent
SILENT = {
    "QUEUEGATE_AMQP_URL": "amqp://guest:guest@127.0.0.1:18491/",
    "QUEUEGATE_REDIS_URL": "redis://127.0.0.1:18492/0",
    "QUEUEGATE_DATABASE_URL": "postgresql://postgres@127.0.0.1:18493/test",
}
"""Every service on a loopback port nothing listens on."""
ALL = ("amqp", "redis", "database")
NO_ENGINE = "none answers at unix:///nowhere.sock"
PYTEST = (sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider")


def test_services_that_answer_are_used_as_they_are() -> None:
    assert plan({}, management=None, replaceable=ALL, docker_engine=None) == Plan()


def test_a_management_api_that_does_not_serve_the_tests_ends_the_run_in_its_line() -> None:
    line = "RabbitMQ management API is not reachable at ...: enable it (rabbitmq-plugins ...)"
    chosen = plan({}, management=line, replaceable=ALL, docker_engine=NO_ENGINE)
    assert chosen == Plan(failure=line)


def test_silent_local_services_run_in_containers_when_a_docker_engine_answers() -> None:
    silent = {"amqp": "RabbitMQ is not reachable", "database": "PostgreSQL is not reachable"}
    chosen = plan(silent, management=None, replaceable=ALL, docker_engine=None)
    assert chosen == Plan(containers=("amqp", "database"))


def test_without_a_docker_engine_one_line_names_what_is_silent_and_how_to_start_it() -> None:
    silent = {
        "amqp": "RabbitMQ is not reachable at amqp://x: start it (rabbitmq-server -detached) or "
        "set QUEUEGATE_AMQP_URL",
        "redis": "Redis is not reachable at redis://x: start it or set QUEUEGATE_REDIS_URL",
    }
    chosen = plan(silent, management=None, replaceable=ALL, docker_engine=NO_ENGINE)
    assert chosen.containers == ()
    assert chosen.failure == (
        "RabbitMQ and Redis are not answering, and no Docker engine to run them in a container "
        f"({NO_ENGINE}): start it (rabbitmq-server -detached) or set QUEUEGATE_AMQP_URL"
    )


def test_a_silent_service_set_to_another_host_is_never_replaced_by_a_container() -> None:
    silent = {"database": "PostgreSQL is not reachable at postgresql://db.internal/test: ..."}
    chosen = plan(silent, management=None, replaceable={"amqp", "redis"}, docker_engine=None)
    assert chosen == Plan(failure=silent["database"])


def test_only_loopback_services_may_be_replaced() -> None:
    remote = Settings(
        amqp_url="amqp://u:p@rabbit.internal:5672/",
        redis_url="redis://[::1]:6380/0",
        database_url="postgresql://postgres@localhost/test",
    )
    assert replaceable(remote) == {"redis", "database"}
    sentinels = Settings(redis_sentinels="127.0.0.1:26379")
    assert replaceable(sentinels) == {"amqp", "database"}


async def test_each_silent_service_is_found_with_the_line_that_says_how_to_start_it() -> None:
    nowhere = {name.removeprefix("QUEUEGATE_").lower(): url for name, url in SILENT.items()}
    silent = await unanswered(Settings(**nowhere))
    assert set(silent) == set(ALL)
    assert "start it (rabbitmq-server -detached)" in silent["amqp"]
    assert "start it (redis-server --daemonize yes)" in silent["redis"]
    assert "QUEUEGATE_DATABASE_URL" in silent["database"]


async def test_the_shared_services_all_answer(base_settings: Settings) -> None:
    assert await unanswered(base_settings) == {}


async def test_a_management_api_that_does_not_answer_is_named_with_the_command_to_enable_it(
    base_settings: Settings,
) -> None:
    off = base_settings.model_copy(update={"management_url": "http://guest:guest@127.0.0.1:18494/"})
    with pytest.raises(ServiceUnavailable, match=r"rabbitmq-plugins enable rabbitmq_management"):
        await check_management(off)


async def test_a_management_user_who_is_no_administrator_is_named_with_the_fix(
    base_settings: Settings,
) -> None:
    user = f"qgt-monitor-{os.getpid()}"
    async with BrokerAdmin.of(base_settings) as admin:
        await admin.put_user(user, "secret", tags="monitoring")
        try:
            # The session's management API (a container's, perhaps), as that user
            parts = urlsplit(base_settings.management_url)
            where = parts.netloc.rsplit("@", 1)[-1]
            as_user = urlunsplit(parts._replace(netloc=f"{user}:secret@{where}"))
            monitor = base_settings.model_copy(update={"management_url": as_user})
            with pytest.raises(ServiceUnavailable, match=f"set_user_tags {user} administrator"):
                await check_management(monitor)
        finally:
            await admin.delete_user(user)


def test_a_docker_engine_that_does_not_answer_says_where_it_was_looked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nowhere.sock")
    assert docker_engine() == NO_ENGINE


def _session(**env: str) -> subprocess.CompletedProcess[str]:
    """A test session of its own with ``env``, running one test that needs no service."""
    return subprocess.run(
        [*PYTEST, "tests/test_layout.py::test_the_check_sees_a_lazy_import"],
        check=False,
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_session_whose_management_api_is_off_ends_before_any_test_in_one_line() -> None:
    run = _session(QUEUEGATE_MANAGEMENT_URL="http://guest:guest@127.0.0.1:18494/")
    assert run.returncode == pytest.ExitCode.USAGE_ERROR
    assert run.stdout == ""
    assert _lines(run.stderr) == [
        "ERROR: RabbitMQ management API is not reachable at http://guest:***@127.0.0.1:18494/: "
        "enable it (rabbitmq-plugins enable rabbitmq_management) or set "
        "QUEUEGATE_MANAGEMENT_URL"
    ]


def test_a_session_without_services_nor_docker_engine_ends_before_any_test_in_one_line() -> None:
    run = _session(**SILENT, DOCKER_HOST="unix:///nowhere.sock")
    assert run.returncode == pytest.ExitCode.USAGE_ERROR
    assert run.stdout == ""
    [line] = _lines(run.stderr)
    assert line.startswith(
        "ERROR: RabbitMQ, Redis and PostgreSQL are not answering, and no Docker engine to run "
        f"them in a container ({NO_ENGINE}): start it (rabbitmq-server -detached)"
    )


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


async def test_a_test_leaves_nothing_of_its_namespace_on_the_shared_services(
    settings: Settings,
) -> None:
    # Given what tests made and left to the end of the test: a team added by the CLI (its
    # broker user and quota policy), a queue of the test's own, a schema derived from its own
    env = {
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
    }
    added = await asyncio.to_thread(CliRunner().invoke, app, ["teams", "add", "alpha"], env=env)
    assert added.exit_code == 0, added.output
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(f"{settings.namespace}.incoming", auto_delete=False)
    derived = f"{settings.database_schema}_x"
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(f"CREATE SCHEMA {quote_ident(derived)}")
        # When the test's namespace is dropped, as after every test
        await drop_test_namespace(settings, ("alpha",))
        # Expect no user, queue, policy or schema of it left
        schemas = await conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname IN ($1, $2)",
            settings.database_schema,
            derived,
        )
    finally:
        await conn.close()
    assert schemas == []
    async with BrokerAdmin.of(settings) as admin:
        left = [*await admin.users(), *await admin.queues()]
        left += [policy["name"] for policy in await admin.policies()]
    assert [name for name in left if name.startswith(settings.namespace)] == []
