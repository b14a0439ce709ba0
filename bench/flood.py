"""One team's control requests as a flood, and what another team's jobs feel of it.

The bench team's jobs, one at a time, quiet and then while team ``flood`` sends batch index
steps of 1,000 64-character custom ids back to back from ``LANES`` lanes of another process
(as its app would, under its own team), each with a run of its own: the costliest step a team
may send, at once and without end. The figure is the bench team's latency under the flood as
a multiple of the quiet one; the flood's own rate beside it (steps a second carried out, and
refused: past its hourly count, ``workers/control.py``).

``python -m bench.flood NAMESPACE SCHEMA`` is that other process.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
import uuid

from bench.gateway import timed_chat
from bench.measure import Figure, latency_figures, run_lanes
from bench.stack import TEAM, running_stack
from producer import GatewayClient
from queuegate.db import create_pool
from queuegate.errors import GatewayError
from queuegate.namespace import drop_namespace
from queuegate.registry import add_team
from queuegate.settings import Settings

FLOODER = "flood"
LANES = 8
STEP_IDS = 1000


async def flood(*, jobs: int) -> list[Figure]:
    async with (
        running_stack(workers=1) as stack,
        GatewayClient(stack.settings, team=TEAM) as client,
    ):
        pool = await create_pool(stack.settings)
        try:
            await add_team(pool, FLOODER)
        finally:
            await pool.close()

        one = timed_chat(client)
        await run_lanes(one, 200, 4)  # connections, pools and caches warm
        quiet = latency_figures(await run_lanes(one, jobs, 1))
        flooder = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.flood",
            stack.settings.namespace,
            stack.settings.database_schema,
            stdout=asyncio.subprocess.PIPE,
        )
        assert flooder.stdout is not None
        await flooder.stdout.readline()  # its client connected, its lanes sending
        started = time.perf_counter()
        flooded = latency_figures(await run_lanes(one, jobs, 1))
        elapsed = time.perf_counter() - started
        flooder.terminate()
        done, refused = (int(n) for n in (await flooder.stdout.read()).split()[-2:])
        await flooder.wait()
    # The stack drops its own team's queues; the worker declared the flood team's too.
    await drop_namespace(stack.settings, [FLOODER])
    return [
        Figure("control flood", "quiet, c=1", quiet),
        Figure(
            "control flood",
            f"under {FLOODER}'s index steps, c=1",
            {
                **flooded,
                "p50_vs_quiet": round(flooded["p50_ms"] / quiet["p50_ms"], 2),
                "p99_vs_quiet": round(flooded["p99_ms"] / quiet["p99_ms"], 2),
                "flood_steps_per_s": round(done / elapsed),
                "flood_refused_per_s": round(refused / elapsed),
            },
        ),
    ]


async def _send(settings: Settings) -> None:
    """Flood the control queue as team FLOODER until terminated; on SIGTERM, print the steps
    carried out and refused."""
    entries = [[uuid.uuid4().hex * 2, line] for line in range(1, STEP_IDS + 1)]
    counts = [0, 0]
    async with GatewayClient(settings, team=FLOODER) as client:

        async def lane() -> None:
            while True:
                try:
                    run = uuid.uuid4().hex[:16]
                    await client.control.batch("index", "flood", entries=entries, run=run)
                    counts[0] += 1
                except GatewayError:
                    counts[1] += 1

        lanes = [asyncio.create_task(lane()) for _ in range(LANES)]
        print("sending", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        for task in lanes:
            task.cancel()
        print(*counts, flush=True)


if __name__ == "__main__":
    namespace, schema = sys.argv[1:3]
    asyncio.run(_send(Settings(namespace=namespace, database_schema=schema)))
