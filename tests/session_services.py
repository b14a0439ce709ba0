"""The services a test session runs on, decided before any test reads its settings.

- Every service answers: the session uses them. RabbitMQ's management API must answer too,
  as an administrator (the tests add broker users through it); if it does not, the session
  ends before any test runs, in one line with the command that fixes it.
- A service on loopback does not answer while a Docker engine does: it is started in a
  container for the session (testcontainers), and the session's ``QUEUEGATE_*_URL`` point at
  it. A service set to another host is never replaced: its line says it does not answer.
- Neither: one line saying what does not answer and that no Docker engine does either.

``tests/conftest.py`` runs ``prepare`` at the session's start and ``release`` at its end.
The images can be changed (a mirror, another version) with ``QUEUEGATE_TEST_<SERVICE>_IMAGE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import os
import time
import warnings
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest
from docker.errors import DockerException
from testcontainers.core.container import DockerContainer
from testcontainers.core.docker_client import DockerClient

from queuegate.errors import ServiceUnavailable
from queuegate.services import CHECKS, Service, check_management, unanswered
from queuegate.settings import Settings

NAMES: dict[Service, str] = {"amqp": "RabbitMQ", "redis": "Redis", "database": "PostgreSQL"}
IMAGES: dict[Service, str] = {
    "amqp": "rabbitmq:3.13-management",
    "redis": "redis:7",
    "database": "postgres:16",
}
"""Each service's image, unless ``QUEUEGATE_TEST_<AMQP|REDIS|DATABASE>_IMAGE`` names another."""
READY_TIMEOUT = 180.0
"""Seconds a container has to answer its check (RabbitMQ takes the longest to boot)."""
_STACK = pytest.StashKey[contextlib.ExitStack]()


@dataclass(frozen=True)
class Plan:
    """What a session does before its tests: start ``containers`` for these services, or end
    at once with ``failure`` (one line)."""

    containers: tuple[Service, ...] = ()
    failure: str | None = None


def plan(
    silent: Mapping[Service, str],
    *,
    management: str | None,
    replaceable: Collection[Service],
    docker_engine: str | None,
) -> Plan:
    """The session's plan given what answers.

    ``silent``: each service that does not answer, with its line; ``management``: the line
    of a management API that does not serve the tests, None when it does (asked only of a
    broker that answers); ``replaceable``: the services a container may stand in for (on
    loopback); ``docker_engine``: why no Docker engine answers, None when one does.
    """
    if not silent:
        return Plan(failure=management)
    fixed = [service for service in silent if service not in replaceable]
    if fixed:
        return Plan(failure=silent[fixed[0]])
    if docker_engine is not None:
        names = _listed([NAMES[service] for service in silent])
        first = next(iter(silent.values()))
        return Plan(
            failure=f"{names} not answering, and no Docker engine to run "
            f"{'it' if len(silent) == 1 else 'them'} in a container ({docker_engine}): "
            f"{first.split(': ', 1)[-1]}"
        )
    return Plan(containers=tuple(silent))


def replaceable(settings: Settings) -> set[Service]:
    """The services set to loopback addresses: a container may stand in for those."""
    urls: dict[Service, str] = {
        "amqp": settings.amqp_url,
        "database": settings.database_url,
    }
    if not settings.redis_sentinels:
        urls["redis"] = settings.redis_url
    return {service for service, url in urls.items() if _loopback(urlsplit(url).hostname)}


def docker_engine() -> str | None:
    """None when a Docker engine answers (found as testcontainers finds it); else where it
    looked."""
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    with warnings.catch_warnings():
        # docker-py leaves the socket of a failed connection to the garbage collector.
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            DockerClient(timeout=5).client.close()  # it asks the engine's version first
        except DockerException:
            answered = False
        else:
            answered = True
        gc.collect()
    return None if answered else f"none answers at {where}"


def prepare(config: pytest.Config) -> None:
    """Check the services, start containers for the silent ones where it can, and point the
    session's settings at them; end the session in one line where the tests cannot run."""
    settings = Settings()
    silent = asyncio.run(unanswered(settings))
    management = None if "amqp" in silent else _management(settings)
    engine = docker_engine() if silent else None
    chosen = plan(
        silent,
        management=management,
        replaceable=replaceable(settings),
        docker_engine=engine,
    )
    if chosen.failure is not None:
        # A usage error, not pytest.exit: pytest prints it once, as one line.
        raise pytest.UsageError(chosen.failure)
    stack = config.stash[_STACK] = contextlib.ExitStack()
    for service in chosen.containers:
        image = os.environ.get(f"QUEUEGATE_TEST_{service.upper()}_IMAGE", IMAGES[service])
        try:
            os.environ.update(stack.enter_context(_container(service, image)))
        except DockerException as exc:
            why = str(exc).splitlines()[0]
            raise pytest.UsageError(
                f"{NAMES[service]} is not answering and could not be started in a container "
                f"of {image} ({why}): start it, or set QUEUEGATE_TEST_{service.upper()}_IMAGE "
                "to an image the Docker engine can run"
            ) from exc
    if chosen.containers:
        asyncio.run(_until_ready(Settings(), chosen.containers))


def release(config: pytest.Config) -> None:
    """Stop the session's containers."""
    stack = config.stash.get(_STACK, None)
    if stack is not None:
        stack.close()


def _management(settings: Settings) -> str | None:
    try:
        asyncio.run(check_management(settings))
    except ServiceUnavailable as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def _container(service: Service, image: str) -> Iterator[dict[str, str]]:
    """The service started in a container of ``image`` (stopped and removed on exit): the
    settings that reach it."""
    container = DockerContainer(image)
    if service == "amqp":
        container.with_exposed_ports(5672, 15672)  # the image lets guest in from outside
    elif service == "redis":
        container.with_exposed_ports(6379)
    else:
        container.with_env("POSTGRES_HOST_AUTH_METHOD", "trust").with_env("POSTGRES_DB", "test")
        container.with_exposed_ports(5432)
    with container:
        host = container.get_container_host_ip()
        port = container.get_exposed_port
        if service == "amqp":
            yield {
                "QUEUEGATE_AMQP_URL": f"amqp://guest:guest@{host}:{port(5672)}/",
                "QUEUEGATE_MANAGEMENT_URL": f"http://guest:guest@{host}:{port(15672)}/",
            }
        elif service == "redis":
            yield {"QUEUEGATE_REDIS_URL": f"redis://{host}:{port(6379)}/0"}
        else:
            yield {"QUEUEGATE_DATABASE_URL": f"postgresql://postgres@{host}:{port(5432)}/test"}


def _listed(names: list[str]) -> str:
    if len(names) == 1:
        return f"{names[0]} is"
    return f"{', '.join(names[:-1])} and {names[-1]} are"


def _loopback(host: str | None) -> bool:
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _until_ready(settings: Settings, services: Collection[Service]) -> None:
    """Wait for each container to answer its check (the management API too, for RabbitMQ)."""
    checks: list[Callable[[Settings], Awaitable[None]]] = [CHECKS[s] for s in services]
    if "amqp" in services:
        checks.append(check_management)
    deadline = time.monotonic() + READY_TIMEOUT
    for check in checks:
        while True:
            try:
                await check(settings)
                break
            except ServiceUnavailable as exc:
                if time.monotonic() > deadline:
                    raise pytest.UsageError(f"a container did not answer in time: {exc}") from exc
                await asyncio.sleep(0.5)


__all__ = ["IMAGES", "Plan", "docker_engine", "plan", "prepare", "release", "replaceable"]
