"""Queues declared on a three-node cluster: replicated as QUEUEGATE_QUORUM_REPLICAS says."""

from __future__ import annotations

from producer import GatewayClient
from queuegate.broker import connect
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.rabbit_cluster import RabbitCluster
from tests.support import running_gateway


async def declare_team(settings: Settings) -> Topology:
    topology = Topology.of(settings)
    async with await connect(settings.amqp_url, name="test-cluster-queues") as connection:
        channel = await connection.channel()
        await topology.declare_team_queue(channel, "alpha")
        await topology.declare_usage(channel)
    return topology


async def test_quorum_queues_have_a_member_on_every_node_by_default(
    settings: Settings, rabbit_cluster: RabbitCluster
) -> None:
    # Given QUEUEGATE_QUORUM_REPLICAS unset, when a team's queues are declared on the cluster
    topology = await declare_team(rabbit_cluster.settings_for(settings))

    # Expect the broker's default: each quorum queue on all three nodes
    queues = rabbit_cluster.queues()
    nodes = sorted(node.node for node in rabbit_cluster.nodes)
    for name in (
        topology.team_queue("alpha"),
        topology.accounting_queue,
        topology.dead_queue,
        topology.team_dead_queue("alpha"),
    ):
        assert queues[name]["type"] == "quorum"
        assert sorted(queues[name]["members"]) == nodes


async def test_quorum_replicas_sets_each_quorum_queues_member_count(
    settings: Settings, rabbit_cluster: RabbitCluster
) -> None:
    # Given QUEUEGATE_QUORUM_REPLICAS=2, when a team's queues are declared on the cluster
    two = rabbit_cluster.settings_for(settings).model_copy(update={"quorum_replicas": 2})
    topology = await declare_team(two)

    # Expect two members each, the queue's leader one of them
    queues = rabbit_cluster.queues()
    for name in (
        topology.team_queue("alpha"),
        topology.control_queue("alpha"),
        topology.accounting_queue,
        topology.dead_queue,
        topology.team_dead_queue("alpha"),
    ):
        assert len(queues[name]["members"]) == 2
        assert queues[name]["leader"] in queues[name]["members"]


async def test_reply_queues_on_a_cluster_are_quorum_queues(
    settings: Settings, rabbit_cluster: RabbitCluster
) -> None:
    # Given a gateway on the cluster, when a client opens its own reply queue and a named one
    on_cluster = rabbit_cluster.settings_for(settings)
    async with (
        running_gateway(settings, components=on_cluster),
        GatewayClient(on_cluster, team="alpha") as client,
        GatewayClient(on_cluster, team="alpha", reply_queue="nightly") as pipeline,
    ):
        # Expect both replicated, so a reply in flight outlives the node that held it
        queues = rabbit_cluster.queues()
        assert queues[client.reply_to]["type"] == "quorum"
        assert queues[pipeline.reply_to]["type"] == "quorum"
        assert len(queues[client.reply_to]["members"]) == len(rabbit_cluster.nodes)
