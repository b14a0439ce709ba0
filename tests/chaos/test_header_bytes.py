"""A queue's ``max-length-bytes`` counts bodies only: the broker's ``frame_max`` bounds headers.

A team padded each job with a 120 KB header (RabbitMQ's default frame_max, 128 KiB, was its only
bound) and parked 122 MB in a queue bounded to 1 MiB. The broker we ship
(deploy/rabbitmq/rabbitmq.conf) sets a lower frame_max; this runs a private node with that file,
so the shared broker is never reconfigured.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import aiormq
import pytest

from queuegate.signing import KEY_ID_HEADER, PROOF_HEADER
from queuegate.topology import (
    HEADER_DEAD_DETAIL,
    HEADER_DEAD_QUEUE,
    HEADER_DEAD_REASON,
    HEADER_DEAD_USER,
    HEADER_FIRST_DETAIL,
    HEADER_FIRST_REASON,
    HEADER_SENT_MS,
)
from tests.chaos.private_broker import PrivateBroker
from workers.publisher import DETAIL_LIMIT

SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "rabbitmq" / "rabbitmq.conf"
LOCAL_ONLY = ("management.tcp.port", "load_definitions")
"""Lines of the shipped file for a deployed broker: its plugin (this node has none) and the
definitions file under /etc."""


@pytest.fixture(scope="module")
def shipped_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBroker]:
    lines = SHIPPED.read_text().splitlines()
    config = "\n".join(line for line in lines if not line.startswith(LOCAL_ONLY)) + "\n"
    with PrivateBroker(tmp_path_factory.mktemp("rabbitmq"), config=config) as node:
        yield node


def _gateway_headers() -> dict[str, str | int]:
    """The largest headers the gateway itself sets: a replayed job's dead letter, every text
    at its limit in 3-byte characters, with a job's proof and trace context."""
    detail = "€" * DETAIL_LIMIT
    return {
        HEADER_DEAD_REASON: "provider_error",
        HEADER_DEAD_DETAIL: detail,
        HEADER_FIRST_REASON: "provider_error",
        HEADER_FIRST_DETAIL: detail,
        HEADER_DEAD_QUEUE: "q" * 255,
        HEADER_DEAD_USER: "u" * 128,
        KEY_ID_HEADER: "k" * 64,
        PROOF_HEADER: "p" * 64,
        HEADER_SENT_MS: 1_780_000_000_000,
        "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
        "tracestate": "t" * 512,
    }


async def test_a_header_padded_job_is_refused_and_the_gateways_own_fit(
    shipped_node: PrivateBroker,
) -> None:
    queue_name = f"t9.jobs.{uuid.uuid4().hex[:8]}"
    async with await aio_pika.connect(shipped_node.amqp_url) as owner:
        channel = await owner.channel()
        # Given a team's job queue bounded to 1 MiB of bodies, on the broker we ship
        queue = await channel.declare_queue(
            queue_name,
            arguments={"x-max-length-bytes": 1 << 20, "x-overflow": "reject-publish"},
        )
        # whose gateway publishes its largest headers, every property at its longest
        await channel.default_exchange.publish(
            aio_pika.Message(
                b"{}",
                headers=_gateway_headers(),
                message_id="m" * 128,
                correlation_id="c" * 128,
                reply_to="r" * 255,
            ),
            routing_key=queue_name,
        )

        # When a team pads a job of 116 bytes with a 20 KB header
        padder = await aio_pika.connect(shipped_node.amqp_url)
        padded = aio_pika.Message(b"x" * 116, headers={"pad": "a" * 20_000})
        with pytest.raises(aiormq.exceptions.ConnectionFrameError, match="frame_too_large"):
            await (await padder.channel()).default_exchange.publish(padded, routing_key=queue_name)
        await padder.close()

        # Expect the broker to close its connection with nothing queued, the gateway's own
        # message kept, and other connections served
        declared = await channel.declare_queue(queue_name, passive=True)
        assert declared.declaration_result.message_count == 1
        got = await queue.get(no_ack=True)
        assert got.headers[HEADER_DEAD_DETAIL] == "€" * DETAIL_LIMIT
