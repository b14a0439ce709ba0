"""A three-node RabbitMQ cluster of the test suite's own, on loopback.

Three private nodes (tests/chaos/private_broker.py) with one Erlang cookie, each on its own
AMQP and distribution port and data directory, joined into one cluster; stopped and removed
afterwards. ``pause_minority``: a node cut off from the other two stops serving (closing its
clients' connections) until it sees them again, so a partition never splits the queues.
``net_ticktime`` 4 s: a node that stops answering is taken for down within about 4 s.

    with RabbitCluster(tmp_path) as cluster:
        settings = settings.model_copy(update={"amqp_url": cluster.amqp_url})

The nodes take free ports, or, with QUEUEGATE_TEST_CLUSTER_PORT set, that port and the next
two for AMQP and the three 100 above for distribution.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

from queuegate.settings import Settings
from tests.chaos.private_broker import PrivateBroker
from tests.faults import RECONNECT_INTERVAL

CONFIG = "cluster_partition_handling = pause_minority\n"
ADVANCED = "[{kernel, [{net_ticktime, 4}]}]."
NODES = 3


class RabbitCluster:
    """Three private nodes joined into one cluster: ``start()``, ``stop()``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        cookie = uuid.uuid4().hex.upper()
        base = os.environ.get("QUEUEGATE_TEST_CLUSTER_PORT")
        ports: Sequence[int | None] = [None] * NODES
        dist_ports: Sequence[int | None] = [None] * NODES
        if base:
            ports = [int(base) + i for i in range(NODES)]
            dist_ports = [int(base) + 100 + i for i in range(NODES)]
        self.nodes = [
            PrivateBroker(
                root / f"node{i}",
                port=port,
                dist_port=dist_port,
                config=CONFIG,
                advanced=ADVANCED,
                cookie=cookie,
            )
            for i, (port, dist_port) in enumerate(zip(ports, dist_ports, strict=True))
        ]

    @property
    def amqp_url(self) -> str:
        """Every node's address in one URL, as QUEUEGATE_AMQP_URL takes a cluster's."""
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return f"amqp://guest:guest@{hosts}/"

    def settings_for(self, settings: Settings) -> Settings:
        """``settings`` whose components use this cluster, retrying a lost node quickly."""
        url = f"{self.amqp_url}?reconnect_interval={RECONNECT_INTERVAL}&heartbeat=5"
        return settings.model_copy(update={"amqp_url": url})

    def start(self) -> None:
        """Boot the nodes side by side, then join the second and third to the first."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(PrivateBroker.start, self.nodes))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.node)
            node.ctl("start_app")
        running = self.running_nodes()
        if len(running) != len(self.nodes):
            raise RuntimeError(f"cluster formed of {running} only; see {self.root}/node*/log")

    def running_nodes(self, via: PrivateBroker | None = None) -> list[str]:
        """The nodes ``via`` (default the first) sees running in the cluster."""
        status = json.loads((via or self.nodes[0]).ctl("cluster_status", "--formatter", "json"))
        return list(status["running_nodes"])

    def wait_whole(self, timeout: float = 90.0) -> None:
        """Return once every node runs and sees the others running (after a fault).

        The nodes are asked side by side: each ``rabbitmqctl`` call boots an Erlang VM (about
        a second), and asked one after another they took six of those or more per heal."""
        deadline = time.monotonic() + timeout
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: self._wait_sees_whole(node, deadline), self.nodes))

    def _wait_sees_whole(self, node: PrivateBroker, deadline: float) -> None:
        node.ctl("await_startup", "--timeout", str(max(1, int(deadline - time.monotonic()))))
        while len(self.running_nodes(node)) != len(self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster is not whole again; see {self.root}/node*/log")
            time.sleep(0.5)  # nothing announces a node's return to the others: poll

    def heal(self) -> None:
        """Start the nodes that are down, and return once the cluster is whole again."""
        for node in self.nodes:
            if not node.is_running:
                node.start()
        self.wait_whole()

    def partition(self, node: PrivateBroker, timeout: float = 30.0) -> None:
        """Cut ``node`` off from the other nodes until they take it for down and it stops
        serving, then let them meet again.

        The node is given a cookie of its own for each of the others, so their distribution
        handshakes fail both ways for as long as it lasts (loopback has no cable to pull);
        once the net tick time passes, the others see it gone and ``pause_minority`` stops it
        serving, as a node on the wrong side of a real partition (RuntimeError if that has
        not happened within ``timeout`` seconds). The rabbitmqctl connection uses the node's
        own cookie, left as it was.
        """
        others = "[" + ", ".join(f"'{n.node}'" for n in self.nodes if n is not node) + "]"
        node.ctl(
            "eval",
            f"[erlang:set_cookie(N, qgt_partitioned) || N <- {others}],"
            f" [erlang:disconnect_node(N) || N <- {others}], ok.",
        )
        deadline = time.monotonic() + timeout
        other = next(n for n in self.nodes if n is not node)
        while not self._cut_off(node, other):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node.node} was not cut off: see {self.root}/node*/log")
            time.sleep(0.5)  # nothing announces the pause to us: poll
        node.ctl(
            "eval",
            f"[erlang:set_cookie(N, erlang:get_cookie()) || N <- {others}],"
            f" [net_adm:ping(N) || N <- {others}], ok.",
        )

    def _cut_off(self, node: PrivateBroker, other: PrivateBroker) -> bool:
        """Whether ``node`` has paused and ``other`` no longer sees it running."""
        paused = node.ctl("eval", "rabbit:is_running().").strip() == "false"
        return paused and node.node not in self.running_nodes(other)

    def node_named(self, name: str) -> PrivateBroker:
        return next(node for node in self.nodes if node.node == name)

    def queues(self) -> dict[str, dict[str, Any]]:
        """Every queue's type, leader and members (the last two for quorum queues) by name."""
        via = next(node for node in self.nodes if node.is_running)
        listed = via.ctl("list_queues", "name", "type", "leader", "members", "--formatter", "json")
        return {row["name"]: row for row in json.loads(listed)}

    def queue_members(self, queue: str) -> tuple[str, list[str]]:
        """A quorum queue's leader and its members, as the cluster reports them."""
        row = self.queues()[queue]
        return row["leader"], list(row["members"])

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RabbitCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
