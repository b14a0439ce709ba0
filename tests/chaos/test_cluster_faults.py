"""A three-node RabbitMQ cluster loses a node mid-run: nothing is lost, nothing counted twice.

Producers, two worker processes and accounting all use the cluster's URL (every node in it).
2,000 jobs go through while the node that leads the team queues is SIGKILLed, or stopped and
started again, or cut off from the others for longer than the net tick time. The team queues
are quorum queues on all three nodes: a new leader takes over, every process reconnects to a
live node, publishes not confirmed are sent again, and a job delivered twice is answered from
its stored outcome.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from mockprovider import Behavior, MockConfig, MockProvider
from producer import GatewayClient
from queuegate.db import create_pool
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.chaos.harness import (
    TEAMS,
    Figures,
    declare_teams,
    expect_each_job_once,
    jobs_flowing,
    start_worker,
    stop_workers,
    team_clients,
    worker_env,
)
from tests.chaos.private_broker import PrivateBroker
from tests.rabbit_cluster import RabbitCluster
from tests.support import running_accountant

pytestmark = pytest.mark.timeout(300)  # a fault, a heal and the cluster's boot in the first

JOBS = 2000
FAULT_AFTER_CALLS = 400
PREFETCH = 50


async def run_through_fault(
    settings: Settings,
    cluster: RabbitCluster,
    figures: Figures,
    fault: Callable[[PrivateBroker], None],
    logs: Path,
) -> None:
    """2,000 jobs through two workers; ``fault`` strikes the team queues' leader mid-run.
    The workers log into ``logs``, a directory."""
    components = cluster.settings_for(settings)
    # Given two worker processes and accounting on the cluster, the provider taking 20 ms
    async with MockProvider(MockConfig(default=Behavior(latency_ms=20))) as mock:
        await declare_teams(components)
        leader, members = cluster.queue_members(Topology.of(components).team_queue("alpha"))
        assert len(members) == len(cluster.nodes)
        env = worker_env(
            components,
            mock,
            QUEUEGATE_AMQP_URL=components.amqp_url,
            QUEUEGATE_PREFETCH=str(PREFETCH),
        )
        worker_logs = [logs / "worker-1.log", logs / "worker-2.log"]
        workers = [await start_worker(env, TEAMS, log=log) for log in worker_logs]
        pool = await create_pool(settings)
        try:
            async with (
                running_accountant(components),
                team_clients(lambda team: GatewayClient(components, team=team)) as clients,
            ):
                # When jobs are flowing and the fault strikes the queues' leader
                submitting = await jobs_flowing(clients, mock, JOBS, FAULT_AFTER_CALLS, within=90)
                await asyncio.to_thread(fault, cluster.node_named(leader))

                # Expect every confirmed job answered once, called once, accounted once
                await expect_each_job_once(
                    submitting,
                    clients=clients,
                    pool=pool,
                    mock=mock,
                    dead=components,
                    figures=figures,
                    timeout=120,
                    worker_logs=worker_logs,
                )
                assert figures.lost == figures.double_counted == 0
        finally:
            await stop_workers(workers)
            await pool.close()
            await asyncio.to_thread(cluster.heal)


async def test_the_team_queues_leader_killed_loses_nothing_and_counts_nothing_twice(
    settings: Settings, rabbit_cluster: RabbitCluster, tmp_path: Path
) -> None:
    await run_through_fault(
        settings, rabbit_cluster, Figures("cluster: leader SIGKILLed"), PrivateBroker.kill, tmp_path
    )


async def test_a_node_stopped_and_started_again_loses_nothing_and_counts_nothing_twice(
    settings: Settings, rabbit_cluster: RabbitCluster, tmp_path: Path
) -> None:
    await run_through_fault(
        settings,
        rabbit_cluster,
        Figures("cluster: node restarted"),
        PrivateBroker.restart,
        tmp_path,
    )


async def test_a_node_partitioned_off_loses_nothing_and_counts_nothing_twice(
    settings: Settings, rabbit_cluster: RabbitCluster, tmp_path: Path
) -> None:
    await run_through_fault(
        settings,
        rabbit_cluster,
        Figures("cluster: node partitioned"),
        rabbit_cluster.partition,
        tmp_path,
    )
