"""A worker whose broker connections keep dropping writes one line of each kind aio-pika
and aiormq log, not one with a traceback per drop (``queuegate.logs.BrokerRepeats``)."""

from __future__ import annotations

from pathlib import Path

from mockprovider import MockConfig, MockProvider
from queuegate.settings import Settings
from tests.chaos.harness import declare_teams, start_worker, stop_workers, worker_env
from tests.faults import behind_proxies
from tests.support import consumers

DROPS = 4


async def test_a_worker_whose_connections_keep_dropping_logs_each_kind_of_library_line_once(
    settings: Settings, tmp_path: Path
) -> None:
    # Given a worker of team alpha reaching the broker through a proxy, logging at info
    await declare_teams(settings, ("alpha",))
    log = tmp_path / "worker.log"
    async with (
        MockProvider(MockConfig()) as mock,
        behind_proxies(settings, "amqp") as (through, proxies),
    ):
        env = worker_env(settings, mock, QUEUEGATE_AMQP_URL=through.amqp_url)
        worker = await start_worker(env, ("alpha",), log=log)
        try:
            await consumers(settings, ["alpha"], 1)
            # When its connections are cut four times, each time once it consumes again
            for _ in range(DROPS):
                await proxies["amqp"].down()
                await proxies["amqp"].up()
                await consumers(settings, ["alpha"], 1)
        finally:
            await stop_workers([worker])

    # Expect the libraries' lines each said once, on one line with its cause; the worker's
    # own lines all there
    lines = log.read_text().splitlines()
    said = [line for line in lines if " aiormq." in line or " aio_pika." in line]
    assert said, lines
    kinds = {line.split(": ", 1)[0].split(" ", 3)[-1] for line in said}  # their loggers
    assert len(said) < DROPS * len(kinds), said
    assert not any(line.startswith(("Traceback", "  File ")) for line in lines), lines
