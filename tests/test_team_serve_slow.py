"""A broker slower than ``TEAM_SERVE_WAIT`` at a team's queue declare, as a worker starts.

A full run's fixture once met it on a loaded machine: the declare took over 2 s, the worker
left the team to its next refresh and said it was ready, and the team's first request was
answered 503 (no queue). Now the team is tried again a second later, whatever
``teams_refresh`` is, and the worker is ready once it is served. Alpha is added the default
way (its own broker user) or identified by API key.

Then a broker that stalls: a team's change confirmed and a stop ended, one team's stall
holding back no other team's serving, and idle connections that stall closed together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest

from admin.teams import Credentials, configure, disable, in_force
from producer import GatewayClient
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.proxy import TcpProxy
from tests.support import logged, running_gateway
from tests.test_control import alpha_app
from workers import team_connections
from workers.team_connections import TeamConnections

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.mark.parametrize("identity", ["broker", "api_key"])
async def test_a_team_whose_queue_declare_is_slow_is_served_before_the_worker_is_ready(
    settings: Settings,
    teams: dict[str, Credentials],
    identity: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "workers.worker")
    async with (
        alpha_app(settings, teams, identity) as app,
        TcpProxy(settings.amqp_url) as broker,
    ):
        # Given a broker that stops answering as the worker declares alpha's jobs queue,
        # until the worker has given up on it (TEAM_SERVE_WAIT), and a refresh far away
        broker.hang_at(Topology.of(settings).team_queue("alpha").encode())
        components = settings.model_copy(update={"amqp_url": broker.url, "teams_refresh": 600.0})
        with logged("workers.worker", "team alpha not served for now") as left_out:
            answered_again = asyncio.create_task(_answer_again(broker, left_out))
            # When the worker starts
            async with (
                running_gateway(settings, teams=("alpha", "beta"), components=components) as gw,
                GatewayClient(app.settings, team="alpha", api_key=app.api_key) as alpha,
            ):
                # Expect it ready only once alpha is served: tried again a second later
                # (TEAM_RETRY), within the fixture's wait, not at the refresh (the line it
                # says it is ready with names the teams it serves then)
                await answered_again
                said = _worker_said(caplog)
                ready = [line for line in said if line.startswith("worker test-worker serving")]
                # (beta too, unless the broker closed the connection it shares with alpha,
                # as it may an API-key team's, as the stall ended: beta is tried again later)
                assert ready in (
                    ["worker test-worker serving alpha, beta"],
                    ["worker test-worker serving alpha"],
                ), said
                assert "alpha" in gw.worker.teams
                assert (await alpha.chat("gpt-4o-mini", HELLO, timeout=30)).status == "ok"


def _worker_said(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The worker's own log lines (aio-pika's may not format: its OneShotCallback's repr
    raised AttributeError once its callback had run)."""
    return [r.getMessage() for r in caplog.records if r.name == "workers.worker"]


async def _answer_again(broker: TcpProxy, left_out: asyncio.Event) -> None:
    """Let the broker answer once the worker left alpha out."""
    await broker.hung.wait()
    await left_out.wait()
    await broker.up()


@pytest.mark.parametrize("identity", ["broker", "api_key"])
async def test_a_teams_change_is_confirmed_and_a_stop_ends_while_the_broker_stalls(
    settings: Settings, teams: dict[str, Credentials], identity: str
) -> None:
    async with (
        alpha_app(settings, teams, identity),
        TcpProxy(settings.amqp_url) as broker,
    ):
        components = settings.model_copy(update={"amqp_url": broker.url, "shutdown_grace": 2.0})
        async with running_gateway(settings, teams=("alpha", "beta"), components=components) as gw:
            # Given a broker that stalls: nothing passes either way, no connection closed
            # (a network fault; a memory alarm holds the connections that publish)
            broker.hang()
            try:
                # When alpha's rate changes (its consumer renewed: the old one cancelled,
                # which the broker never answers), then beta's budget
                changes = [("alpha", {"rpm": 6}), ("beta", {"budget_usd": Decimal(5)})]
                for team, fields in changes:
                    change = await configure(settings, team, fields)
                    # Expect each confirmed by the worker within the command's wait (5 s)
                    assert (await in_force(settings, change.change, 5)).pending == [], team
                # ... and beta's disable too (its consumer's cancel unanswered as well)
                disabled = await disable(settings, "beta")
                assert disabled is not None
                assert (await in_force(settings, disabled, 5)).pending == []
                # ... and the worker's stop to end, the broker still stalled (it waited for
                # the broker before: 20 s and more in an attack, until the stall ended)
                async with asyncio.timeout(20):
                    await gw.stop_worker()
            finally:
                await broker.up()


@pytest.mark.parametrize("identity", ["broker", "api_key"])
async def test_a_team_whose_connection_stalls_holds_back_no_other_team(
    settings: Settings,
    teams: dict[str, Credentials],
    identity: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "workers.worker")
    # Given beta first in the worker's order, its own connection stalled at its declare
    # When the worker starts
    async with _beta_stalled(settings, teams, identity) as alpha:
        # Expect alpha served while beta's serve waits on the stall, not after it gave up on
        # beta (TEAM_SERVE_WAIT; one after another, alpha waited there)
        said = _worker_said(caplog)
        served = _first(said, "now serving team alpha")
        assert served < _first(said, "team beta not served for now"), said
        assert (await alpha.chat("gpt-4o-mini", HELLO, timeout=30)).status == "ok"


@contextlib.asynccontextmanager
async def _beta_stalled(
    settings: Settings, teams: dict[str, Credentials], identity: str
) -> AsyncIterator[GatewayClient]:
    """A gateway serving beta, then alpha, through a broker that stalls beta's own
    connection as the worker declares beta's queue (nothing passes on it either way, none
    closed; the other connections flow), so that the worker tries beta again every second
    or so, each try waiting out TEAM_SERVE_WAIT; alpha's client (``identity``)."""
    async with (
        alpha_app(settings, teams, identity) as app,
        TcpProxy(settings.amqp_url) as broker,
    ):
        broker.hang_at(Topology.of(settings).team_queue("beta").encode(), alone=True)
        components = settings.model_copy(update={"amqp_url": broker.url, "shutdown_grace": 2.0})
        try:
            async with (
                running_gateway(settings, teams=("beta", "alpha"), components=components),
                GatewayClient(app.settings, team="alpha", api_key=app.api_key) as alpha,
            ):
                yield alpha
        finally:
            await broker.up()


def _first(lines: list[str], start: str) -> int:
    return next(i for i, line in enumerate(lines) if line.startswith(start))


async def test_a_sweep_of_idle_connections_that_stall_waits_for_them_together(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given five teams' connections of a worker, idle (IDLE at 0), then stalled by the broker
    # (a close waits for its answer: 2 s)
    monkeypatch.setattr(team_connections, "IDLE", 0.0)

    async def reopened(_team: str, _channel: object) -> None:
        return None

    async with TcpProxy(settings.amqp_url) as broker:
        lines = TeamConnections(broker.url, worker="test", within=5.0, on_reopen=reopened)
        try:
            for team in ("a", "b", "c", "d", "e"):
                await lines.replies(team)
            broker.hang()
            # When the worker's refresh sweeps them, expect their closes waited for together
            # (one after another: 10 s, every team's renewal waiting in the same loop)
            async with asyncio.timeout(6):
                await lines.sweep(keep=())
        finally:
            await broker.up()
            await lines.close()


@pytest.mark.parametrize("identity", ["broker", "api_key"])
async def test_a_teams_change_waits_for_no_retry_of_a_team_left_out(
    settings: Settings, teams: dict[str, Credentials], identity: str
) -> None:
    # Given beta's own connection stalled, the worker trying beta again and again
    async with _beta_stalled(settings, teams, identity) as alpha:
        # When alpha's rate changes again and again (its consumer renewed each time)
        for rpm in range(60, 66):
            change = await configure(settings, "alpha", {"rpm": rpm})
            # Expect each confirmed at once, not after a retry of beta under way: waited
            # for, one landing in a retry took up to 2 s more (an attack's, with 16 teams
            # stalled, exited 3 at the command's 5 s)
            assert (await in_force(settings, change.change, 1.0)).pending == [], rpm
        assert (await alpha.chat("gpt-4o-mini", HELLO, timeout=30)).status == "ok"


@pytest.mark.parametrize("identity", ["broker", "api_key"])
async def test_a_consume_the_broker_never_answers_holds_no_change_nor_the_stop(
    settings: Settings, teams: dict[str, Credentials], identity: str
) -> None:
    async with (
        alpha_app(settings, teams, identity) as app,
        TcpProxy(settings.amqp_url) as broker,
    ):
        components = settings.model_copy(update={"amqp_url": broker.url, "shutdown_grace": 2.0})
        async with running_gateway(settings, teams=("alpha", "beta"), components=components) as gw:
            # Given alpha's own connection stalled as the worker sends the consume of its queue
            # (a Basic.Consume's queue name, then its consumer tag: the queue's declare holds
            # the name alone), the others flowing
            queue = Topology.of(settings).team_queue("alpha").encode()
            broker.hang_at(queue + bytes([len("ctag.") + 32]) + b"ctag.", alone=True)
            try:
                # When alpha's rate changes (its consumer renewed: the new consume never
                # answered), then beta's budget
                renewal = await configure(settings, "alpha", {"rpm": 6})
                await broker.hung.wait()
                change = await configure(settings, "beta", {"budget_usd": Decimal(5)})
                # Expect each confirmed within the command's wait (before, the worker froze
                # there: every change exited 3 until the stall ended), and the stop to end
                assert (await in_force(settings, renewal.change, 5)).pending == []
                assert (await in_force(settings, change.change, 5)).pending == []
            finally:
                await broker.up()
            # ... and alpha served again once its connection flows, its job answered once
            async with GatewayClient(app.settings, team="alpha", api_key=app.api_key) as alpha:
                assert (await alpha.chat("gpt-4o-mini", HELLO, timeout=30)).status == "ok"
            async with asyncio.timeout(20):
                await gw.stop_worker()
        assert gw.mock.stats.calls == 1
