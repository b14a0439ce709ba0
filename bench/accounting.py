"""Usage events per second from the usage exchange into PostgreSQL rows."""

from __future__ import annotations

import asyncio
import time
import uuid

import aio_pika

from bench.measure import Figure, cpu_per_thousand
from bench.stack import running_stack
from queuegate.broker import json_message, publish
from queuegate.messages import Attempt, UsageEvent, usage_batch_body
from queuegate.topology import MESSAGE_TYPE_USAGE, MESSAGE_TYPE_USAGE_BATCH, Topology

ONE_CALL = Attempt(
    model="gpt-4o-mini", deployment="openai-main", provider="openai", status=200, latency_ms=412.5
)
"""What a served job's event carries: its one call, stored as jsonb."""


BATCH = 20
"""Events per message, as workers batch them under load (``usage_events_per_msg`` of
``throughput``: 18-23 on the development machine)."""


async def accounting(
    *, events: int, accountants: int = 1, batch: int = BATCH, window: int = 500
) -> Figure:
    """The queue is filled first, then ``accountants`` processes start: their own rate, not
    the publisher's. Counted from when all of them consume, over the rows still to write.
    ``batch`` events go in each message (1: a single ``usage`` event, as before batches)."""
    async with running_stack(workers=0, accounting=False) as stack:
        topo = Topology.of(stack.settings)
        bodies = [
            UsageEvent(
                job_id=uuid.uuid4().hex,
                team="bench",
                model_requested="gpt-4o-mini",
                model_used="gpt-4o-mini",
                input_tokens=12,
                output_tokens=30,
                status="ok",
                attempts=1,
                attempt_log=[ONE_CALL],
            )
            .model_dump_json()
            .encode()
            for _ in range(events)
        ]
        connection = await aio_pika.connect(stack.settings.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(topo.usage_exchange)
            gate = asyncio.Semaphore(window)

            async def one(events: list[bytes]) -> None:
                if batch == 1:
                    message = json_message(events[0], message_type=MESSAGE_TYPE_USAGE)
                else:
                    body = usage_batch_body(events)
                    message = json_message(body, message_type=MESSAGE_TYPE_USAGE_BATCH)
                async with gate:
                    await publish(channel, message, exchange=exchange.name, routing_key="")

            started = time.perf_counter()
            chunks = [bodies[i : i + batch] for i in range(0, len(bodies), batch)]
            await asyncio.gather(*(one(chunk) for chunk in chunks))
            published = time.perf_counter() - started
        await stack.start_accounting(accountants)
        # The first to start writes while the others start: those rows are not counted.
        before, started = stack.cpu(), time.perf_counter()
        counted = events - await stack.usage_rows()
        if counted <= 0:
            raise RuntimeError(
                f"the first accountant wrote all {events} events before the others consumed: "
                "nothing left to time; run with more --jobs"
            )
        await stack.wait_rows(events)
        elapsed = time.perf_counter() - started
        after = stack.cpu()
    cpu = cpu_per_thousand(before, after, counted)
    if accountants > 1:
        names = ["accounting", *(f"accounting{i + 1}" for i in range(1, accountants))]
        cpu["cpu_s/1k accountants"] = round(sum(cpu[f"cpu_s/1k {n}"] for n in names), 3)
    return Figure(
        "accounting",
        f"{events} events in {'single events' if batch == 1 else f'batches of {batch}'}, "
        f"{accountants} accountant{'s' if accountants > 1 else ''}",
        {
            "per_s": round(counted / elapsed),
            "publish_per_s": round(events / published),
            **cpu,
        },
    )
