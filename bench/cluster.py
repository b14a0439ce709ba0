"""What a three-node cluster costs the broker: ``python -m bench cluster``.

The ``throughput`` case (one worker, the mock answering at once) twice in one run: on a
RabbitMQ node of the bench's own, then on a three-node cluster of its own (every quorum queue
on all three nodes, the broker's default; the clients' reply queues quorum queues too, as on
any cluster). RabbitMQ's CPU is that of the bench's nodes alone, all three together on the
cluster: ``rabbitmq_vs_one_node`` is its CPU per job on the cluster over that on one node.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from bench.gateway import throughput
from bench.measure import RABBITMQ_CPU, Figure
from bench.stack import own_broker, own_cluster


async def cluster(*, jobs: int) -> list[Figure]:
    figures = []
    with tempfile.TemporaryDirectory() as directory:
        for case, broker in (("1 node", own_broker), ("3 nodes x 3 replicas", own_cluster)):
            with contextlib.ExitStack() as stack:
                stack.enter_context(broker(Path(directory) / case.replace(" ", "-")))
                figure = await throughput(jobs=jobs, workers=1)
            figures.append(Figure("cluster", case, figure.values))
    one, three = (figure.values[RABBITMQ_CPU] for figure in figures)
    figures[1].values["rabbitmq_vs_one_node"] = round(three / one, 2) if one else 0
    return figures
