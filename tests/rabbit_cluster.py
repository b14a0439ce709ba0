"""A three-node RabbitMQ cluster of the test suite's own, on loopback.

Three private nodes (tests/chaos/private_broker.py) with one Erlang cookie, each on its own
AMQP and distribution port and data directory, joined into one cluster; stopped and removed
afterwards. ``pause_minority``: a node cut off from the other two stops serving (closing its
clients' connections) until it sees them again, so a partition never splits the queues.
``net_ticktime`` 4 s: a node that stops answering is taken for down within about 4 s.

    with RabbitCluster(tmp_path, ports=(18300, 18301, 18302), dist_ports=(...)) as cluster:
        settings = settings.model_copy(update={"amqp_url": cluster.amqp_url})
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from tests.chaos.private_broker import PrivateBroker

CONFIG = "cluster_partition_handling = pause_minority\n"
ADVANCED = "[{kernel, [{net_ticktime, 4}]}]."


class RabbitCluster:
    """Three private nodes joined into one cluster: ``start()``, ``stop()``."""

    def __init__(self, root: Path, *, ports: Sequence[int], dist_ports: Sequence[int]) -> None:
        self.root = root
        cookie = uuid.uuid4().hex.upper()
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

    def node_named(self, name: str) -> PrivateBroker:
        return next(node for node in self.nodes if node.node == name)

    def queue_members(self, queue: str) -> tuple[str, list[str]]:
        """A quorum queue's leader and its members, as the cluster reports them."""
        for via in self.nodes:
            if via.is_running:
                listed = json.loads(
                    via.ctl("list_queues", "name", "leader", "members", "--formatter", "json")
                )
                for row in listed:
                    if row["name"] == queue:
                        return row["leader"], list(row["members"])
        raise LookupError(f"no queue {queue} on the cluster")

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
