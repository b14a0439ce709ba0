"""A whole gateway in the test's event loop: mock provider, router, worker, accounting."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import orjson
import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aio_pika.exceptions import ChannelNotFoundEntity
from aiohttp import web
from prometheus_client import REGISTRY

from accounting import Accountant
from mockprovider import MockConfig, MockProvider
from producer import GatewayClient, JobHandle
from queuegate import dlq
from queuegate.db import create_pool, quote_ident
from queuegate.management import BrokerAdmin
from queuegate.namespace import drop_namespace
from queuegate.settings import Settings
from queuegate.topology import (
    HEADER_DEAD_DETAIL,
    HEADER_DEAD_QUEUE,
    HEADER_DEAD_REASON,
    Topology,
)
from router import load_catalog, open_router
from workers import Worker


def sized(target: int, model: str, **params: Any) -> str:
    """A user message's content that makes its request exactly ``target`` bytes: what the
    caller sends of it as compact JSON, as its job carries it (model, messages, parameters)."""
    empty = {"model": model, "messages": [{"role": "user", "content": ""}]}
    return "x" * (target - len(orjson.dumps(empty | ({"params": params} if params else {}))))


PRICED = [{"role": "user", "content": "ab " * 13 + "a"}]
"""40 characters: the mock counts 10 prompt tokens. Answered in ``PRICED_OUTPUT`` tokens, a job
of ``priced_catalog``'s model ``priced`` costs 13 x $0.001 = $0.013."""
PRICED_OUTPUT = 3


def priced_catalog(tmp_path: Path) -> Path:
    """A catalog of one model, ``priced``, at $1,000 per million tokens in and out, without
    fallbacks: round costs, and a job's estimate priced at that model alone."""
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        """
models:
  priced:
    deployments:
      - {name: priced-1, provider: openai, model: priced, api_base: "${QUEUEGATE_MOCK_URL}",
         api_key_env: QUEUEGATE_MOCK_KEY, input_per_mtok: 1000, output_per_mtok: 1000}
"""
    )
    return catalog


async def consumed(connection: AbstractConnection, queue: str, timeout: float = 10.0) -> None:
    """Wait until ``queue`` exists and has one consumer."""
    async with asyncio.timeout(timeout):
        # Polled: the broker announces no event when a queue is declared or consumed.
        while True:
            try:
                async with connection.channel() as channel:
                    declared = await channel.declare_queue(queue, passive=True)
            except ChannelNotFoundEntity:
                declared = None
            if declared is not None and declared.declaration_result.consumer_count == 1:
                return
            await asyncio.sleep(0.01)


async def consumers(settings: Settings, teams: list[str], count: int) -> None:
    """Return once ``count`` consumers read each team's queue: the workers split its jobs."""
    topology = Topology(settings.namespace)
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        while True:
            queues = [
                await channel.declare_queue(topology.team_queue(team), passive=True)
                for team in teams
            ]
            if min(queue.declaration_result.consumer_count or 0 for queue in queues) >= count:
                return
            await asyncio.sleep(0.05)  # polled: the broker announces no consumer


async def depth(settings: Settings, queue: str) -> int:
    """Messages ready in ``queue``, by a passive declare (exact, unlike the management API's
    statistics)."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        declared = await (await connection.channel()).declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


async def exists(settings: Settings, queue: str) -> bool:
    """Whether ``queue`` exists, by a passive declare."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        try:
            await (await connection.channel()).declare_queue(queue, passive=True)
        except ChannelNotFoundEntity:
            return False
    return True


async def lose_redis_data(redis_client: aioredis.Redis, settings: Settings) -> None:
    """Every key of the test's gateway gone from Redis, as when Redis restarts without
    persistence (only its prefix: Redis is shared)."""
    async for key in redis_client.scan_iter(match=f"{settings.redis_prefix}:*"):
        await redis_client.delete(key)


async def wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Wait for a condition that no event announces, checking every few milliseconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


def reconnects(connection: str, team: str = "") -> float:
    """Times a worker's broker connections of this kind (and team) were made again, in this
    process."""
    labels = {"connection": connection, "team": team}
    return REGISTRY.get_sample_value("queuegate_broker_reconnects_total", labels) or 0.0


@contextlib.contextmanager
def logged(logger: str, start: str) -> Iterator[asyncio.Event]:
    """An event set once ``logger`` (or one below it) logs a line beginning with ``start``:
    for what only a log line tells, such as a job meeting an outage. Enter it before the
    cause, in the event loop of the process that logs."""
    loop, event = asyncio.get_running_loop(), asyncio.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith(start):
                loop.call_soon_threadsafe(event.set)

    handler, target = Seen(), logging.getLogger(logger)
    target.addHandler(handler)
    try:
        yield event
    finally:
        target.removeHandler(handler)


async def dead_letters(settings: Settings, expected: int) -> list[dlq.DeadLetter]:
    """The dead letters, once ``expected`` are there (the broker announces no dead-lettering)."""
    async with asyncio.timeout(10):
        while True:
            letters, total = await dlq.peek(settings)
            if total >= expected:
                return letters
            await asyncio.sleep(0.02)


async def publish_dead_letters(
    settings: Settings, channel: AbstractChannel, team: str, count: int
) -> list[str]:
    """``count`` dead letters of ``team`` in its ``<ns>.dead.<team>``, published as a worker
    dead-letters a job it refused (its headers, the job queue's name as key, the operators'
    user_id the workers run under), in one go; their ids, in their order, once the queue holds
    them (a quorum queue confirms a publish once it holds it)."""
    topology = Topology.of(settings)
    await topology.declare_dead(channel)
    await topology.declare_team_dead(channel, team)
    by_team = await channel.get_exchange(topology.dead_teams_exchange)
    ids = [f"{team}-{i:05d}" for i in range(count)]
    headers = {
        HEADER_DEAD_REASON: "unknown_model",
        HEADER_DEAD_DETAIL: "no such model",
        HEADER_DEAD_QUEUE: topology.team_queue(team),
    }
    # At once: the channel sends them in the order asked, whatever order the broker confirms.
    await asyncio.gather(
        *(
            by_team.publish(
                aio_pika.Message(
                    b"{}", message_id=job_id, headers=headers, user_id=settings.amqp_user
                ),
                routing_key=topology.team_queue(team),
            )
            for job_id in ids
        )
    )
    return ids


async def queuegate_cli(settings: Settings, *args: str, **env: str) -> tuple[int, str, str]:
    """``queuegate ARGS`` run as an operator runs it, in the test's namespace and schema, at 80
    columns (``env`` adds to its environment): its exit status, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", *args,
        env={
            **os.environ,
            "QUEUEGATE_NAMESPACE": settings.namespace,
            "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
            "COLUMNS": "80",
            **env,
        },
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        if process.returncode is None:  # timed out or cancelled: not left running
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def dlq_cli(settings: Settings, *args: str, exit_code: int = 0) -> tuple[str, str]:
    """``queuegate dlq ARGS`` as an operator runs it: its stdout and stderr, once it exited
    with ``exit_code``."""
    # Any free metrics port: several workers share the host.
    code, stdout, stderr = await queuegate_cli(settings, "dlq", *args, QUEUEGATE_METRICS_PORT="0")
    assert code == exit_code, stdout + stderr
    return stdout, stderr


async def take_dead_letters(
    settings: Settings, expected: int, timeout: float = 10.0
) -> list[AbstractIncomingMessage]:
    """Take ``expected`` messages from the dead-letter queues (the shared one and each team's
    declared so far), acknowledged, in the order they came."""
    topology = Topology.of(settings)
    async with BrokerAdmin.of(settings) as admin:
        names = await admin.bound_queues(topology.dead_teams_exchange)
    arrived: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        for name in names:
            await (await channel.get_queue(name)).consume(arrived.put)
        taken: list[AbstractIncomingMessage] = []
        async with asyncio.timeout(timeout):
            while len(taken) < expected:
                message = await arrived.get()
                await message.ack()
                taken.append(message)
        return taken


class LogLines:
    """Collects a process's stderr lines and wakes whoever waits for a pattern."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.lines: list[str] = []
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            async with self._changed:
                self.lines.append(raw.decode(errors="replace"))
                self._changed.notify_all()

    async def matches(self, pattern: re.Pattern[str], count: int) -> list[re.Match[str]]:
        """The first ``count`` lines matching ``pattern``, once that many have been logged."""

        def found() -> list[re.Match[str]]:
            return [m for line in self.lines if (m := pattern.search(line))]

        try:
            # A guard, not a target: two processes starting on the loaded machine of a full
            # run once took more than 30 s to say so.
            async with asyncio.timeout(60), self._changed:
                await self._changed.wait_for(lambda: len(found()) >= count)
        except TimeoutError:
            said = "".join(self.lines)
            raise AssertionError(
                f"{count} lines like {pattern.pattern!r} not seen: {said}"
            ) from None
        return found()[:count]

    async def closed(self) -> str:
        await self._task
        return "".join(self.lines)


async def log_once_ended(process: asyncio.subprocess.Process, log: LogLines) -> str:
    """``process``'s whole log once it has exited: killed first if it still runs (a test that
    failed before it stopped), never left running."""
    if process.returncode is None:
        process.kill()
        await process.wait()
    return await log.closed()


class Gateway:
    """The running pieces of one test's gateway."""

    def __init__(
        self,
        settings: Settings,
        mock: MockProvider,
        worker: Worker,
        pool: asyncpg.Pool,
        *,
        stop: asyncio.Event,
        working: asyncio.Task[None],
    ) -> None:
        self.settings = settings
        self.mock = mock
        self.worker = worker
        self.pool = pool
        self.topology = Topology(settings.namespace)
        self._stop = stop
        self._working = working

    async def stop_worker(self) -> None:
        """Stop the worker, as a SIGTERM would; accounting and the rest keep running."""
        self._stop.set()
        await self._working

    def client(self, team: str, **kwargs: object) -> GatewayClient:
        return GatewayClient(self.settings, team=team, **kwargs)  # type: ignore[arg-type]

    async def publish(self, body: bytes, *, team: str = "alpha", **properties: Any) -> None:
        """Publish a job's body as a team's own AMQP client would (confirmed), with the
        message ``properties`` it gives (``message_id``, ``reply_to``...)."""
        connection = await aio_pika.connect(self.settings.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(self.topology.jobs_exchange)
            await exchange.publish(aio_pika.Message(body, **properties), routing_key=team)

    async def usage_rows(self, expected: int, timeout: float = 10.0) -> list[asyncpg.Record]:
        """The usage_log rows, once accounting has written ``expected`` of them."""

        async def count() -> int:
            return int(await self.pool.fetchval("SELECT count(*) FROM usage_log"))

        deadline = time.monotonic() + timeout
        while (n := await count()) < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} usage rows, expected {expected}")
            await asyncio.sleep(0.02)
        return list(await self.pool.fetch("SELECT * FROM usage_log ORDER BY job_id"))

    async def expect_each_answered_once(self, handles: Sequence[JobHandle]) -> None:
        """Expect every job of ``handles`` answered ok, each once, and accounted once."""
        results = [await handle.result(timeout=30) for handle in handles]
        assert all(r.status == "ok" for r in results), [r.error for r in results]
        assert len({r.job_id for r in results}) == len(handles)
        rows = await self.usage_rows(len(handles))
        assert len(rows) == len(handles)

    async def dead_letters(
        self, expected: int, timeout: float = 10.0
    ) -> list[AbstractIncomingMessage]:
        """Take ``expected`` messages from the dead-letter queues."""
        return await take_dead_letters(self.settings, expected, timeout)


@contextlib.asynccontextmanager
async def running_gateway(
    settings: Settings,
    *,
    teams: Sequence[str] = ("alpha",),
    mock_config: MockConfig | None = None,
    catalog: Path | None = None,
    components: Settings | None = None,
    accounting: bool = True,
) -> AsyncIterator[Gateway]:
    """A gateway of ``settings``; ``components`` (its clients, worker and accounting) may reach
    the services another way, e.g. through a TcpProxy, while the test reads rows directly.
    Without ``accounting`` usage events wait in the broker until a test runs ``accountant``."""
    components = components or settings
    stop = asyncio.Event()
    async with MockProvider(mock_config or MockConfig()) as mock:
        env = {"QUEUEGATE_MOCK_URL": mock.url, "QUEUEGATE_MOCK_KEY": "sk-test-mock"}
        async with (
            open_router(load_catalog(catalog, env), env, components) as router,
            contextlib.AsyncExitStack() as stack,
        ):
            worker = Worker(components, router, teams=list(teams), name="test-worker")
            if accounting:
                await stack.enter_async_context(running_accountant(components))
            task = asyncio.create_task(worker.run(stop))
            await asyncio.wait_for(worker.ready.wait(), 10)
            pool = await create_pool(settings)
            try:
                yield Gateway(components, mock, worker, pool, stop=stop, working=task)
            finally:
                stop.set()
                await task
                await pool.close()


@contextlib.asynccontextmanager
async def running_accountant(settings: Settings) -> AsyncIterator[Accountant]:
    """Accounting of ``settings``, running until the block ends."""
    stop = asyncio.Event()
    async with Accountant(settings) as accountant:
        task = asyncio.create_task(accountant.run(stop))
        try:
            yield accountant
        finally:
            stop.set()
            await task


async def drop_test_namespace(settings: Settings, teams: Sequence[str]) -> None:
    """Everything a test made under its namespace, as every test ends (``settings``): what
    ``drop_namespace`` knows of, then, whoever made it (the test, a CLI run, a subprocess)
    and however the test ended, what it does not: broker users (``teams add`` makes one per
    team), queues of the test's own (``<ns>.incoming``) or of a namespace derived from it
    (``<ns>-demo``), quota policies (one per team added, whatever its name), and schemas
    derived from the test's (``<schema>_x``)."""
    namespace, schema = settings.namespace, settings.database_schema

    def ours(name: str) -> bool:
        return name.startswith((f"{namespace}.", f"{namespace}-"))

    try:
        await drop_namespace(settings, teams)
    finally:
        async with BrokerAdmin.of(settings) as admin:
            for user in filter(ours, await admin.users()):
                await admin.delete_user(user)
            for queue in filter(ours, await admin.queues()):
                await admin.delete_queue(queue)
            for policy in await admin.policies():
                if ours(policy["name"]):
                    await admin.delete_policy(policy["name"])
        conn = await asyncpg.connect(settings.database_url)
        try:
            schemas = await conn.fetch(
                "SELECT nspname FROM pg_namespace WHERE nspname = $1 OR starts_with(nspname, $2)",
                schema,
                f"{schema}_",
            )
            for row in schemas:
                await conn.execute(f"DROP SCHEMA {quote_ident(row['nspname'])} CASCADE")
        finally:
            await conn.close()


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """The base URL of ``app`` served on a free loopback port: a provider of a test's own, for
    answers the mock provider does not make."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        [(host, port)] = runner.addresses
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
