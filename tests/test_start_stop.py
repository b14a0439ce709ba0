"""A stop while a worker starts ends the start: it never serves, says so, nor keeps a consumer.

A stop signal while starting cancels the start (``queuegate.runtime.stop_on_signals``), but
an await of the broker client's can swallow that cancel: then only the stop, already set,
tells the start to end. So the stop is set here without a cancel, at each point of the
start where the worker says something (every log record its task, or a task serving one
of its teams, writes, at DEBUG).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
from collections.abc import Iterator

import asyncpg

from mockprovider import Behavior, MockConfig, MockProvider
from queuegate.broker import connect
from queuegate.runtime import stop_on_signals
from queuegate.settings import Settings
from queuegate.topology import Topology
from router import load_catalog, open_router
from tests.proxy import TcpProxy
from tests.support import running_gateway
from workers import Worker

TEAMS = ("alpha", "beta")


SERVING = "Worker._serve_each.<locals>.serve"
"""The coroutine of a task serving one team (teams are served at once: ``SERVE_AT_ONCE``)."""


class _StopAt(logging.Handler):
    """Sets ``stop`` at the ``at``-th record the worker's start writes (until ``started``),
    in its task or a task serving one of its teams, keeping what they write after. (Not
    every task it makes: its background tasks' records, its broker client's among them,
    made the points five times as many.)"""

    def __init__(self, at: int, stop: asyncio.Event, started: asyncio.Event) -> None:
        super().__init__(logging.DEBUG)
        self.at, self.stop, self.started = at, stop, started
        self.task: asyncio.Task[None] | None = None
        self.seen = 0
        self.loggers: set[str] = set()
        self.after: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        task = asyncio.current_task()
        if task is None or not (task is self.task or task.get_coro().__qualname__ == SERVING):
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
                        task = hook.task = asyncio.create_task(worker.run(stop))
                        # When the start goes on past the stop (no cancel here: a swallowed one)
                        ready = asyncio.create_task(worker.ready.wait())
                        await asyncio.wait(
                            [task, ready], timeout=20, return_when=asyncio.FIRST_COMPLETED
                        )
                        ready.cancel()
                        if not stop.is_set():
                            # It started saying fewer things than `at`: every point was tried,
                            # the broker client's among them.
                            assert worker.ready.is_set(), at
                            assert "aio_pika.channel" in hook.loggers, hook.loggers
                            stop.set()
                            await task
                            return
                    finally:
                        root.removeHandler(hook)
                    # Expect it to end, never announcing a team or itself as serving
                    await task
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


class _SignalAt(logging.Handler):
    """Sends this process ``signal`` as the worker says a line beginning with ``start``: its
    loop's handler runs before the worker's next await, as for a signal from outside."""

    def __init__(self, start: str, sig: signal.Signals) -> None:
        super().__init__(logging.INFO)
        self.start, self.sig, self.sent = start, sig, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.sent and record.getMessage().startswith(self.start):
            self.sent = True
            os.kill(os.getpid(), self.sig)


async def test_a_stop_signal_once_a_team_is_consumed_drains_instead_of_cutting_its_jobs_off(
    settings: Settings,
) -> None:
    # Given jobs waiting for alpha, whose provider answers in 300 ms (a gateway's worker gave
    # the client its reply queue, then stopped)
    jobs = 4
    loop = asyncio.get_running_loop()
    slow = MockConfig(default=Behavior(latency_ms=300))
    async with (
        running_gateway(settings, teams=TEAMS, mock_config=slow) as gw,
        gw.client("alpha") as client,
    ):
        await gw.stop_worker()
        handles = [
            await client.submit(client.job("gpt-4o-mini", [{"role": "user", "content": f"{i}"}]))
            for i in range(jobs)
        ]
        env = {"QUEUEGATE_MOCK_URL": gw.mock.url, "QUEUEGATE_MOCK_KEY": "sk-test-mock"}
        async with (
            open_router(load_catalog(None, env), env, settings) as router,
            TcpProxy(settings.amqp_url) as broker,
        ):
            # ... and beta's queue declare held (its own connection stalls there, the others
            # flow): teams are served at once, and beta's serve is still under way
            broker.hang_at(Topology.of(settings).team_queue("beta").encode(), alone=True)
            through = settings.model_copy(update={"amqp_url": broker.url})
            worker = Worker(through, router, teams=list(TEAMS), name="signalled")

            async def serve() -> None:  # as `queuegate worker` runs it
                await worker.run(stop_on_signals())

            # When SIGTERM comes as alpha's consumer has started, before beta's and the end of
            # the start
            hook = _SignalAt("now serving team alpha", signal.SIGTERM)
            target = logging.getLogger("workers.worker")
            target.addHandler(hook)
            level = target.level
            target.setLevel(logging.INFO)
            try:
                await asyncio.wait_for(serve(), 30)  # cancelled, it raises here
            finally:
                target.removeHandler(hook)
                target.setLevel(level)
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
                await broker.up()

        # Expect the start to have drained, not been cut off: it never announced itself, and
        # each job it took was answered, each call once (a later worker answers the rest)
        assert hook.sent
        assert not worker.ready.is_set()
        called_by_first = gw.mock.stats.calls
        async with running_gateway(settings, teams=TEAMS, accounting=False) as rest:
            results = [await handle.result(timeout=30) for handle in handles]
        assert [r.status for r in results] == ["ok"] * jobs
        assert len(await gw.usage_rows(jobs)) == jobs
        assert called_by_first + rest.mock.stats.calls == jobs
