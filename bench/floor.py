"""The bare broker floor: publish with confirm, an echo consumer replies with confirm, await."""

from __future__ import annotations

import asyncio
import time
import uuid

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from bench.measure import Figure, cpu_per_thousand, latency_figures, own_cpu, run_lanes
from bench.stack import services_cpu
from queuegate.settings import Settings


async def floor(settings: Settings, *, jobs: int) -> list[Figure]:
    """The same process publishes, echoes and awaits: the cheapest possible round trip."""
    name = f"qgbench-floor-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        publish = await connection.channel(publisher_confirms=True)
        consume = await connection.channel(publisher_confirms=True)
        await consume.set_qos(prefetch_count=100)
        queue = await consume.declare_queue(
            name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        replies = await publish.declare_queue(exclusive=True)
        futures: dict[str, asyncio.Future[None]] = {}

        async def echo(message: AbstractIncomingMessage) -> None:
            await consume.default_exchange.publish(
                aio_pika.Message(message.body, correlation_id=message.correlation_id),
                routing_key=message.reply_to or "",
            )
            await message.ack()

        async def on_reply(message: AbstractIncomingMessage) -> None:
            future = futures.pop(message.correlation_id or "", None)
            if future is not None:
                future.set_result(None)

        tag = await queue.consume(echo)
        await replies.consume(on_reply, no_ack=True)

        async def round_trip() -> float:
            job_id = uuid.uuid4().hex
            # Held here: the reply may come (and take it from ``futures``) before the publish
            # returns.
            replied = futures[job_id] = asyncio.get_running_loop().create_future()
            started = time.perf_counter()
            await publish.default_exchange.publish(
                aio_pika.Message(b'{"x":1}' * 40, correlation_id=job_id, reply_to=replies.name),
                routing_key=name,
            )
            await replied
            return (time.perf_counter() - started) * 1000

        figures = []
        for concurrency in (1, 64):
            cpu, services, started = own_cpu(), services_cpu(), time.perf_counter()
            ms = await run_lanes(round_trip, jobs, concurrency)
            elapsed = time.perf_counter() - started
            figures.append(
                Figure(
                    "floor",
                    f"c={concurrency}",
                    {
                        **latency_figures(ms),
                        "per_s": round(jobs / elapsed),
                        "cpu_s/1k bench": round((own_cpu() - cpu) * 1000 / jobs, 3),
                        **cpu_per_thousand(services, services_cpu(), jobs),
                    },
                )
            )
        await queue.cancel(tag)
        await consume.queue_delete(name)
    return figures
