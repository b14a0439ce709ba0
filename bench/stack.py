"""The gateway as separate processes (mock provider, workers, accounting), for benchmarks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx

from mockprovider import MockConfig
from queuegate.broker import node_urls
from queuegate.keys import Keys
from queuegate.livestats import read_view
from queuegate.namespace import drop_namespace
from queuegate.redis_client import redis_for
from queuegate.registry import TeamConfig, add_team, set_team_config
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.chaos.private_broker import PrivateBroker
from tests.chaos.private_postgres import PrivatePostgres
from tests.rabbit_cluster import RabbitCluster

TEAM = "bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
HELD_SAMPLE = 0.25
"""Seconds between samples of the jobs workers hold (their live stats change each second)."""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux); 0 once it has exited."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


MOCK_START_TIMEOUT = 10.0
"""Seconds a mock provider process has to answer."""
SERVICES = {"beam.smp": "rabbitmq", "redis-server": "redis", "postgres": "postgresql"}
"""Process names of the local services, and the name each is reported under."""

_OWN: dict[str, list[int]] = {}
"""The root processes of each service the bench runs of its own for the whole run, by the name
it is reported under (``own_broker``, ``own_cluster``, ``own_services``)."""


@contextlib.contextmanager
def _serving(service: str, variable: str, url: str, pids: list[int]) -> Iterator[str]:
    """Point every scenario and process at the bench's own ``service``: ``variable`` (which
    Settings and the stack's processes read) is ``url``, and its CPU is counted from ``pids``
    and their children alone, where a shared service's counts every other client's too. Nests:
    the service served before is served again after."""
    previous, before = os.environ.get(variable), _OWN.get(service)
    os.environ[variable] = url
    _OWN[service] = pids
    try:
        yield url
    finally:
        if before is None:
            del _OWN[service]
        else:
            _OWN[service] = before
        if previous is None:
            del os.environ[variable]
        else:
            os.environ[variable] = previous


def _pids(nodes: list[PrivateBroker]) -> list[int]:
    return [int(node.pid_file.read_text().strip()) for node in nodes]


@contextlib.contextmanager
def own_broker(root: Path) -> Iterator[str]:
    """A RabbitMQ node of the bench's own for the whole run, its AMQP URL in
    ``QUEUEGATE_AMQP_URL`` (which every scenario and process reads)."""
    with (
        PrivateBroker(root) as node,
        _serving("rabbitmq", "QUEUEGATE_AMQP_URL", node.amqp_url, _pids([node])) as url,
    ):
        yield url


@contextlib.contextmanager
def own_cluster(root: Path) -> Iterator[str]:
    """As ``own_broker``, a three-node cluster of the bench's own (tests/rabbit_cluster.py):
    its URL lists every node, and its CPU is the three nodes' together."""
    with RabbitCluster(root) as cluster:
        pids = _pids(cluster.nodes)
        with _serving("rabbitmq", "QUEUEGATE_AMQP_URL", cluster.amqp_url, pids) as url:
            yield url


@asynccontextmanager
async def own_services() -> AsyncIterator[None]:
    """A Redis (no persistence) and a PostgreSQL cluster (no fsync) of the bench's own for the
    whole run, in ``QUEUEGATE_REDIS_URL`` and ``QUEUEGATE_DATABASE_URL``: with ``own_broker``,
    each service's column counts the bench's work alone on a machine others share."""
    from bench.chaos import PrivateRedis  # bench.chaos builds on this module

    # PostgreSQL's own user must own the directory (PrivatePostgres runs it as postgres).
    with PrivatePostgres(Path(tempfile.mkdtemp(prefix="qg-bench-pg-"))) as postgres:
        postmaster = int((postgres.data / "postmaster.pid").read_text().split()[0])
        async with PrivateRedis() as redis:
            with (
                _serving("redis", "QUEUEGATE_REDIS_URL", redis.url, [redis.pid]),
                _serving("postgresql", "QUEUEGATE_DATABASE_URL", postgres.url, [postmaster]),
            ):
                yield


def services_cpu() -> dict[str, float]:
    """CPU seconds of every process of each local service: of the bench's own instance where it
    runs one (``own_broker``, ``own_cluster``, ``own_services``), else of every process of that
    name (all of its work, not only ours: run on an otherwise idle machine)."""
    totals = {
        name: sum(cpu_seconds(pid) for root in roots for pid in process_tree(root))
        for name, roots in _OWN.items()
    }
    for name in SERVICES.values():
        totals.setdefault(name, 0.0)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/comm") as f:
                service = SERVICES.get(f.read().strip())
        except OSError:
            continue
        if service is not None and service not in _OWN:
            totals[service] += cpu_seconds(int(entry.name))
    return totals


def peak_rss_mb(pid: int) -> float:
    """The most memory the process has held resident; 0 once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def process_tree(pid: int) -> list[int]:
    """The process and its descendants (a supervisor's workers, uvicorn's workers)."""
    pids, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        pids += [int(c) for c in children]
        frontier += [int(c) for c in children]
    return pids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    settings: Settings
    mock_url: str
    env: dict[str, str]
    processes: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)

    async def spawn(self, name: str, *args: str) -> None:
        """Start ``queuegate ARGS`` as process ``name``, stopped when the stack is; its
        metrics on a port of its own (``metrics``)."""
        port = self.metrics_ports[name] = free_port()
        self.processes[name] = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "cli", *args),
            env={**self.env, "QUEUEGATE_METRICS_PORT": str(port)},
            stdout=asyncio.subprocess.DEVNULL,
        )

    async def metrics(self, prefix: str, name: str) -> float:
        """A metric's value summed over the processes whose name starts with ``prefix``."""
        total = 0.0
        async with httpx.AsyncClient() as client:
            for process, port in self.metrics_ports.items():
                if not process.startswith(prefix):
                    continue
                text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
                for line in text.splitlines():
                    if line.startswith(f"{name} "):
                        total += float(line.split()[1])
        return total

    async def start_accounting(self, count: int = 1) -> None:
        """Start ``count`` accountants side by side (``accounting``, ``accounting2``, …) and
        wait until every one consumes."""
        for i in range(count):
            name = "accounting" if i == 0 else f"accounting{i + 1}"
            await self.spawn(name, "accounting", "--log-level", "warning")
        await _wait_consumers(self.settings, 0, accounting=True, accountants=count)

    def cpu(self) -> dict[str, float]:
        """CPU seconds of each process of the stack, and of each local service."""
        return {
            **{name: cpu_seconds(p.pid) for name, p in self.processes.items()},
            **services_cpu(),
        }

    async def mock_stats(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            stats: dict[str, Any] = (await client.get(f"{self.mock_url}/_mock/stats")).json()
            return stats

    async def configure_mock(self, config: MockConfig) -> None:
        """Replace the mock's behaviour; its counters and rate buckets start afresh."""
        async with httpx.AsyncClient() as client:
            body = config.model_dump_json()
            response = await client.post(f"{self.mock_url}/_mock/config", content=body)
            response.raise_for_status()
            (await client.post(f"{self.mock_url}/_mock/reset")).raise_for_status()

    async def max_concurrent_calls(self, latency_ms: float) -> int:
        """The most calls the mock held at once, from its log (each call lasts latency_ms)."""
        async with httpx.AsyncClient() as client:
            log = (await client.get(f"{self.mock_url}/_mock/stats?log=1")).json()["log"]
        edges = sorted(
            [(entry["t"] - latency_ms / 1000, 1) for entry in log]
            + [(entry["t"], -1) for entry in log]
        )
        peak = current = 0
        for _, step in edges:
            current += step
            peak = max(peak, current)
        return peak

    async def max_held(self, stop: asyncio.Event) -> int:
        """The most jobs the workers held at once (delivered, not yet acked) until ``stop``,
        from the in-flight counts in their live stats (written every ``stats_interval``)."""
        client = redis_for(self.settings)
        keys, peak = Keys(self.settings.redis_prefix), 0
        try:
            while not stop.is_set():
                view = await read_view(client, keys)
                peak = max(peak, sum(view.in_flight.values()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), HELD_SAMPLE)
        finally:
            await client.aclose()
        return peak

    async def usage_rows(self) -> int:
        conn = await asyncpg.connect(
            self.settings.database_url,
            server_settings={"search_path": self.settings.database_schema},
        )
        try:
            return int(await conn.fetchval("SELECT count(*) FROM usage_log"))
        finally:
            await conn.close()

    async def wait_rows(self, count: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while await self.usage_rows() < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"usage rows did not reach {count}")
            await asyncio.sleep(0.05)


def bench_settings() -> Settings:
    tag = uuid.uuid4().hex[:8]
    return Settings(namespace=f"qgbench-{tag}", database_schema=f"qgbench_{tag}")


@asynccontextmanager
async def running_stack(
    *,
    workers: int = 1,
    prefetch: int = 256,
    latency_ms: float = 0,
    accounting: bool = True,
    catalog: Path | None = None,
    team: TeamConfig | None = None,
    redis_url: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> AsyncIterator[Stack]:
    """Start the processes, wait until each is serving, and tear everything down after.

    ``catalog`` replaces the bundled mock catalog (``QUEUEGATE_CATALOG``); ``team`` gives the
    bench team these limits and budget (else it is registered without any: a worker's
    ``--teams`` names registered teams only);
    ``redis_url`` points the stack at another Redis; ``extra_env`` sets more ``QUEUEGATE_*``.
    """
    settings = bench_settings()
    if redis_url is not None:
        settings = settings.model_copy(update={"redis_url": redis_url})
    port = free_port()
    mock_url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
        "QUEUEGATE_MOCK_URL": mock_url,
        "QUEUEGATE_MOCK_KEY": "bench-key",
        "QUEUEGATE_PREFETCH": str(prefetch),
        **({"QUEUEGATE_CATALOG": str(catalog)} if catalog is not None else {}),
        "QUEUEGATE_REDIS_URL": settings.redis_url,
        **(extra_env or {}),
    }
    stack = Stack(settings, mock_url, env)
    try:
        mock = ("mock-provider", "--port", str(port), "--latency-ms", str(latency_ms))
        await stack.spawn("mock", *mock)
        await wait_http(stack.mock_url)
        await prepare(settings, team)
        if accounting:
            await stack.spawn("accounting", "accounting", "--log-level", "warning")
        for i in range(workers):
            args = ("worker", "--teams", TEAM, "--log-level", "warning")
            await stack.spawn(f"worker{i + 1}", *args)
        await _wait_consumers(settings, workers, accounting)
        yield stack
    finally:
        for process in stack.processes.values():
            if process.returncode is None:
                process.terminate()
        for process in stack.processes.values():
            await process.wait()
        await drop_namespace(settings, [TEAM])


async def wait_http(url: str) -> None:
    """Wait until the mock provider at ``url`` answers."""
    await wait_ready(f"{url}/_mock/stats", MOCK_START_TIMEOUT)


async def wait_ready(
    url: str, timeout: float, process: asyncio.subprocess.Process | None = None
) -> None:
    """Wait until ``url`` answers 200 (a front door's ``/readyz``); RuntimeError as soon as
    ``process``, the server waited for, has exited."""
    async with httpx.AsyncClient() as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process is not None and process.returncode is not None:
                raise RuntimeError(f"the process to serve {url} exited ({process.returncode})")
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise TimeoutError(f"nothing answered at {url} within {timeout:.0f} s")


async def prepare(settings: Settings, team: TeamConfig | None) -> None:
    from accounting import migrate
    from queuegate.db import create_pool

    pool = await create_pool(settings)
    try:
        await migrate(pool, settings.database_schema)
        await add_team(pool, TEAM)
        if team is not None:
            await set_team_config(pool, TEAM, team)
    finally:
        await pool.close()
    # A new namespace has answered nothing, so its Redis has nothing to forget: measure the
    # steady state, not the first minute after a worker finds Redis empty, when every job is
    # looked up in usage_log (workers.claims).
    redis = redis_for(settings)
    try:
        await redis.set(Keys(settings.redis_prefix).memory_epoch, 0)
    finally:
        await redis.aclose()
    # One node of a cluster: its queues' leaders all there, as in every run.
    connection = await aio_pika.connect(node_urls(settings.amqp_url)[0])
    async with connection:
        channel = await connection.channel()
        topo = Topology.of(settings)
        await topo.declare_team_queue(channel, TEAM)
        await topo.declare_usage(channel)


async def _wait_consumers(
    settings: Settings, workers: int, accounting: bool, accountants: int = 1
) -> None:
    topo = Topology.of(settings)
    # Not robust: a robust channel answers a passive declare from what it declared before.
    connection = await aio_pika.connect(node_urls(settings.amqp_url)[0])
    async with connection:
        channel = await connection.channel()
        for _ in range(600):
            jobs = await channel.declare_queue(topo.team_queue(TEAM), passive=True)
            usage = await channel.declare_queue(topo.accounting_queue, passive=True)
            ready = (jobs.declaration_result.consumer_count or 0) >= workers
            consuming = usage.declaration_result.consumer_count or 0
            if ready and (not accounting or consuming >= accountants):
                return
            await asyncio.sleep(0.05)
    raise TimeoutError("workers or accounting did not start consuming")
