"""A stop while a worker starts ends the start: it never serves, says so, nor keeps a consumer.

A stop signal while starting cancels the start (``queuegate.runtime.stop_on_signals``), but
an await of the broker client's can swallow that cancel: then only the stop, already set,
tells the start to end. So the stop is set here without a cancel, at each point of the
start where the worker's task says something (every log record it writes, at DEBUG).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Iterator

import asyncpg

from mockprovider import MockConfig, MockProvider
from queuegate.broker import connect
from queuegate.settings import Settings
from queuegate.topology import Topology
from router import load_catalog, open_router
from workers import Worker

TEAMS = ("alpha", "beta")


class _StopAt(logging.Handler):
    """Sets ``stop`` at the ``at``-th record the worker's task writes while it starts (until
    ``started``), keeping what it writes after."""

    def __init__(self, at: int, stop: asyncio.Event, started: asyncio.Event) -> None:
        super().__init__(logging.DEBUG)
        self.at, self.stop, self.started = at, stop, started
        self.task: asyncio.Task[None] | None = None
        self.seen = 0
        self.loggers: set[str] = set()
        self.after: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.task is None or asyncio.current_task() is not self.task:
            return
        self.loggers.add(record.name)
        if self.stop.is_set():
            self.after.append(record.getMessage())
        elif self.seen == self.at and not self.started.is_set():
            self.stop.set()
        self.seen += 1


async def test_a_stop_at_any_point_of_the_start_never_serves(
    settings: Settings,
    pool: asyncpg.Pool,  # the schema migrated: the worker reads its team registry
) -> None:
    root = logging.getLogger()
    with _everything_logged():
        async with MockProvider(MockConfig()) as mock:
            env = {"QUEUEGATE_MOCK_URL": mock.url, "QUEUEGATE_MOCK_KEY": "sk-test-mock"}
            async with open_router(load_catalog(None, env), env, settings) as router:
                for at in itertools.count():
                    # Given a worker of two teams, and a stop set at the at-th thing it says
                    stop = asyncio.Event()
                    worker = Worker(settings, router, teams=list(TEAMS), name=f"w{at}")
                    hook = _StopAt(at, stop, worker.ready)
                    root.addHandler(hook)
                    try:
                        hook.task = asyncio.create_task(worker.run(stop))
                        # When the start goes on past the stop (no cancel here: a swallowed one)
                        ready = asyncio.create_task(worker.ready.wait())
                        await asyncio.wait(
                            [hook.task, ready], timeout=20, return_when=asyncio.FIRST_COMPLETED
                        )
                        ready.cancel()
                        if not stop.is_set():
                            # It started saying fewer things than `at`: every point was tried,
                            # the broker client's among them.
                            assert worker.ready.is_set(), at
                            assert "aio_pika.channel" in hook.loggers, hook.loggers
                            stop.set()
                            await hook.task
                            return
                    finally:
                        root.removeHandler(hook)
                    # Expect it to end, never announcing a team or itself as serving
                    await hook.task
                    assert not worker.ready.is_set(), at
                    serving = [line for line in hook.after if "serving" in line]
                    assert not serving, (at, serving)
                    # ... and no consumer left on the team queues
                    assert await _consumers(settings) == 0, at


@contextlib.contextmanager
def _everything_logged() -> Iterator[None]:
    """Every logger at DEBUG for the block: the libraries' too, which a configured process
    (or an earlier test, by configure_logging) holds at WARNING."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    levels = {lg: lg.level for lg in loggers if isinstance(lg, logging.Logger)}
    for lg in levels:
        lg.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        for lg, level in levels.items():
            lg.setLevel(level)


async def _consumers(settings: Settings) -> int:
    connection = await connect(settings.amqp_url, name="test")
    async with connection:
        channel = await connection.channel()
        topology = Topology(settings.namespace)
        total = 0
        for team in TEAMS:
            queue = await topology.declare_team_queue(channel, team)
            total += queue.declaration_result.consumer_count or 0
        return total
