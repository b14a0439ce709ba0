"""Chaos: a RabbitMQ memory alarm blocks every publishing connection for half a minute.

While a resource alarm lasts the broker stops reading from publishing connections
(connection.blocked): no publish is confirmed, no result or usage event leaves a worker. When it
clears, each publish held meanwhile must be enqueued once and each job answered once: a publish
taken for stuck and sent again would pile copies into the queues of a broker short of memory.
The alarm is raised on a private node: the shared broker is never reconfigured.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import openai
import pytest

from mockprovider import Behavior, MockConfig
from queuegate.broker import CONFIRM_STALL, connect
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.chaos.harness import (
    Figures,
    collect,
    declare_teams,
    start_worker,
    stop_workers,
    submit_all,
    usage_rows,
    worker_env,
)
from tests.chaos.private_broker import PrivateBroker, on_node
from tests.frontdoor_support import HELLO, open_door
from tests.support import running_gateway

IN_FLIGHT = 30
"""Jobs the provider is answering when the alarm is raised (within the default prefetch,
32): their results wait for it."""
DOOR_TIMEOUT = 5.0
"""A front-door caller's timeout (x-queuegate-timeout), seconds."""
DOOR_MARGIN = 3.0
"""Seconds past it an answer may take on a loaded machine."""
HELD = 100
"""Jobs submitted during the alarm: their publishes wait for it."""
ALARM_SECONDS = 2.5 * CONFIRM_STALL
"""Long enough for a publish to outlast its confirm stall twice over."""
PROVIDER_MS = ALARM_SECONDS * 1000 * 0.6
"""The provider's time for each of alpha's jobs: the alarm is raised well within it, even
when ``rabbitmqctl`` takes seconds to start on a loaded machine (6 s was once too short),
and the answers come well before it clears."""


async def queued(settings: Settings, team: str) -> int:
    """Messages waiting in ``team``'s queue (the underlying channel: a robust one would answer
    a passive declare from its own memory)."""
    connection = await connect(settings.amqp_url, name="chaos-count")
    async with connection:
        channel = await (await connection.channel()).get_underlay_channel()
        declared = await channel.queue_declare(Topology.of(settings).team_queue(team), passive=True)
        return int(declared.message_count or 0)


async def test_jobs_held_by_a_memory_alarm_are_enqueued_once_and_answered_once(
    settings: Settings, broker: PrivateBroker
) -> None:
    figures = Figures("rabbitmq memory alarm")
    components = on_node(settings, broker)
    # Given a worker serving alpha, its provider answering IN_FLIGHT jobs, and beta's queue
    # declared with no worker yet (so what the alarm leaves in it can be counted)
    mock = MockConfig(default=Behavior(latency_ms=PROVIDER_MS))
    async with (
        running_gateway(settings, teams=("alpha",), mock_config=mock, components=components) as gw,
        gw.client("alpha") as alpha,
        contextlib.AsyncExitStack() as stack,
    ):
        # (beta's client opens its reply queue through a worker of beta's, stopped after)
        await declare_teams(components, ("beta",))
        env = worker_env(components, gw.mock, QUEUEGATE_AMQP_URL=components.amqp_url)
        workers = [await start_worker(env, ["beta"])]
        try:
            beta = await stack.enter_async_context(gw.client("beta"))
        finally:
            await stop_workers(workers)
        answering = await submit_all([alpha], IN_FLIGHT)

        # When a memory alarm blocks every publisher for ALARM_SECONDS while beta submits jobs
        await asyncio.to_thread(broker.ctl, "set_vm_memory_high_watermark", "0.000001")
        try:
            assert gw.mock.stats.calls == 0, "the provider answered before the alarm was set"
            submitting = asyncio.create_task(submit_all([beta], HELD))
            done, _ = await asyncio.wait({submitting}, timeout=ALARM_SECONDS)
            # (the provider has answered alpha's jobs meanwhile, their results still held)
            answered_meanwhile = gw.mock.stats.calls
            accounted_meanwhile = await gw.pool.fetchval("SELECT count(*) FROM usage_log")
        finally:
            await asyncio.to_thread(broker.ctl, "set_vm_memory_high_watermark", "0.4")
        assert not done, "the alarm did not hold the publishes"
        assert answered_meanwhile == IN_FLIGHT
        assert accounted_meanwhile == 0, "the alarm did not hold the worker's results"
        # (beta's held jobs are answered at once: what they prove is one copy each, and at
        # PROVIDER_MS each, 32 at a time, they took 20 s of the test's minute)
        gw.mock.configure(MockConfig())
        held = await asyncio.wait_for(submitting, timeout=60)
        enqueued = await queued(components, "beta")

        # Expect one copy of each held job in beta's queue ...
        workers = [await start_worker(env, ["beta"])]
        try:
            handles = answering + held
            results = await collect(handles, timeout=60)
        finally:
            await stop_workers(workers)
        figures.sent = len(handles)
        figures.answered = len({r.job_id for r in results})
        figures.lost = figures.sent - figures.answered
        figures.duplicates = alpha.duplicates + beta.duplicates
        rows, distinct = await usage_rows(gw.pool, len(handles), timeout=30)
        figures.usage_rows = rows
        figures.double_counted = rows - distinct
        figures.provider_calls = gw.mock.stats.calls
        figures.done()
        print(f"[chaos] beta queue after the alarm: {enqueued} messages for {HELD} jobs")
        assert enqueued == HELD
        # ... and every job answered once (no result sent twice), called once, accounted once
        assert all(r.status == "ok" for r in results)
        assert figures.answered == len(handles)
        assert figures.duplicates == 0
        assert figures.provider_calls == len(handles)
        assert rows == distinct == len(handles)


async def test_a_front_door_request_held_by_a_memory_alarm_is_answered_within_its_timeout(
    settings: Settings, broker: PrivateBroker
) -> None:
    # Given a front door, a worker and accounting on the node
    async with (
        open_door(on_node(settings, broker)) as door,
        door.client(timeout=DOOR_TIMEOUT + 30) as client,
    ):
        # When a request with a 5 s timeout arrives during a memory alarm
        await asyncio.to_thread(broker.ctl, "set_vm_memory_high_watermark", "0.000001")
        try:
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as late:
                await client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=HELLO,
                    extra_headers={"x-queuegate-timeout": f"{DOOR_TIMEOUT:g}"},
                )
            took = time.monotonic() - started
        finally:
            await asyncio.to_thread(broker.ctl, "set_vm_memory_high_watermark", "0.4")

        # Expect deadline_exceeded naming the job within the timeout, not a wait for the alarm
        assert late.value.status_code == 504
        assert took < DOOR_TIMEOUT + DOOR_MARGIN
        # ... and that job, published once, refused by the worker once the alarm cleared (its
        # caller gone), never called, accounted once at no cost
        rows = await door.gateway.usage_rows(1, timeout=30)
        assert [(r["error_code"], r["cost_usd"]) for r in rows] == [("deadline_exceeded", 0)]
        assert f"GET /v1/jobs/{rows[0]['job_id']}" in late.value.message
        assert door.gateway.mock.stats.calls == 0
