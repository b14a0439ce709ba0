"""A team's reply-queue slots follow its queues: given back when a queue is gone, and when the
team deletes one of its own, never for another team's.

Each is done as the team itself: with its own broker user (``teams add``) or, identified by
API key, with a user shared by apps and its key.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aio_pika
import pytest
import redis.asyncio as aioredis
from typer.testing import CliRunner

from admin.teams import Credentials
from cli.main import app as cli
from producer import GatewayClient, delete_reply_queue
from queuegate.errors import ControlRefused
from queuegate.keys import Keys
from queuegate.redis_client import lua_source
from queuegate.settings import Settings
from queuegate.topology import Topology
from tests.support import exists, running_gateway
from tests.test_control import App, alpha_app, as_team

HELLO = [{"role": "user", "content": "Hello there"}]
IDENTITIES = ["broker", "api_key"]


@asynccontextmanager
async def alpha_with_limit(
    settings: Settings, teams: dict[str, Credentials], identity: str, limit: int
) -> AsyncIterator[App]:
    """Alpha's app as ``identity`` proves it, against a gateway allowing ``limit`` reply
    queues per team."""
    settings = settings.model_copy(update={"reply_queues_per_team": limit})
    async with (
        alpha_app(settings, teams, identity) as alpha,
        running_gateway(settings, teams=("alpha", "beta")),
    ):
        yield alpha


async def open_named(alpha: App, *names: str) -> None:
    """Open and leave alpha's named results queues (they stay, each holding a slot)."""
    for name in names:
        async with GatewayClient(
            alpha.settings, team="alpha", reply_queue=name, api_key=alpha.api_key
        ):
            pass


async def counted(redis_client: aioredis.Redis, settings: Settings, team: str) -> set[str]:
    members = await redis_client.zrange(Keys(settings.redis_prefix).reply_queues(team), 0, -1)
    return {m.decode() if isinstance(m, bytes) else m for m in members}


async def as_operator(
    settings: Settings, queue: str, *, delete: bool = False, put: int = 0
) -> None:
    """What an operator (the gateway's user) does to a queue: publishes ``put`` results into
    it (confirmed), or deletes it out of band."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for _ in range(put):
            await channel.default_exchange.publish(aio_pika.Message(b"{}"), routing_key=queue)
        if delete:
            await channel.queue_delete(queue)


@pytest.mark.parametrize("identity", IDENTITIES)
async def test_a_slot_whose_queue_was_deleted_out_of_band_is_reclaimed_when_one_is_asked_for(
    settings: Settings, teams: dict[str, Credentials], redis_client: aioredis.Redis, identity: str
) -> None:
    topology = Topology.of(settings)
    async with alpha_with_limit(settings, teams, identity, limit=2) as alpha:
        # Given alpha at its limit of two queues, one of which an operator then deletes
        await open_named(alpha, "nightly", "weekly")
        await as_operator(settings, topology.results_queue("alpha", "nightly"), delete=True)

        # When alpha's app asks for another queue
        async with GatewayClient(
            alpha.settings, team="alpha", reply_queue="monthly", api_key=alpha.api_key
        ) as client:
            # Expect it opened, and served
            result = await client.chat("gpt-4o-mini", HELLO, timeout=10)
            assert result.status == "ok", result.error

        # ... the gone queue's slot given back, the one still there counted as before
        assert await counted(redis_client, settings, "alpha") == {
            topology.results_queue("alpha", "weekly"),
            topology.results_queue("alpha", "monthly"),
        }
        # ... and, with every queue there, the limit held
        with pytest.raises(ControlRefused, match="2 reply queues, its limit"):
            await open_named(alpha, "yearly")


@pytest.mark.parametrize("identity", IDENTITIES)
async def test_a_team_deletes_its_own_results_queue_and_frees_its_slot(
    settings: Settings, teams: dict[str, Credentials], redis_client: aioredis.Redis, identity: str
) -> None:
    queue = Topology.of(settings).results_queue("alpha", "nightly")
    async with alpha_with_limit(settings, teams, identity, limit=1) as alpha:
        # Given alpha's one slot taken by a named results queue holding three unread results
        await open_named(alpha, "nightly")
        await as_operator(settings, queue, put=3)

        # When alpha deletes it with its own credentials
        dropped = await delete_reply_queue(
            alpha.settings, "nightly", team="alpha", api_key=alpha.api_key
        )

        # Expect the queue gone with its results, its slot free for another
        assert dropped == 3
        assert not await exists(settings, queue)
        assert await counted(redis_client, settings, "alpha") == set()
        await open_named(alpha, "weekly")


@pytest.mark.parametrize("identity", IDENTITIES)
async def test_a_team_cannot_delete_or_reclaim_another_teams_queue(
    settings: Settings, teams: dict[str, Credentials], redis_client: aioredis.Redis, identity: str
) -> None:
    topology = Topology.of(settings)
    beta_queue = topology.results_queue("beta", "nightly")
    async with alpha_with_limit(settings, teams, identity, limit=1) as alpha:
        # Given beta's named results queue "nightly", and alpha at its limit
        async with GatewayClient(
            as_team(settings, teams["beta"]), team="beta", reply_queue="nightly"
        ):
            pass
        await open_named(alpha, "weekly")

        # When alpha deletes "nightly", and asks for one more queue (looking for slots to
        # give back), with its own credentials: told it has no such queue
        assert (
            await delete_reply_queue(alpha.settings, "nightly", team="alpha", api_key=alpha.api_key)
            is None
        )
        with pytest.raises(ControlRefused, match="1 reply queues, its limit"):
            await open_named(alpha, "monthly")

        # Expect beta's queue, its slot and alpha's own untouched
        assert await exists(settings, beta_queue)
        assert await counted(redis_client, settings, "beta") == {beta_queue}
        assert await counted(redis_client, settings, "alpha") == {
            topology.results_queue("alpha", "weekly")
        }


async def test_the_command_line_deletes_a_teams_queue_with_its_own_credentials(
    settings: Settings, teams: dict[str, Credentials], redis_client: aioredis.Redis
) -> None:
    queue = Topology.of(settings).results_queue("alpha", "nightly")
    async with alpha_with_limit(settings, teams, "broker", limit=16) as alpha:
        # Given alpha's named results queue
        await open_named(alpha, "nightly")

        # When alpha's data engineer deletes it from the command line, as alpha
        env = {
            "QUEUEGATE_NAMESPACE": settings.namespace,
            "QUEUEGATE_AMQP_URL": alpha.settings.amqp_url,
        }
        done = await asyncio.to_thread(
            CliRunner().invoke, cli, ["replies", "delete", "nightly", "--team", "alpha"], env=env
        )

        # Expect it said so, and the queue and its slot gone
        assert done.exit_code == 0, done.output
        assert "reply queue nightly of team alpha deleted (0 unread results" in done.output
        assert not await exists(settings, queue)
        assert await counted(redis_client, settings, "alpha") == set()


async def test_the_command_line_says_when_the_team_has_no_such_queue(
    settings: Settings, teams: dict[str, Credentials], redis_client: aioredis.Redis
) -> None:
    async with alpha_with_limit(settings, teams, "broker", limit=16) as alpha:
        # Given alpha's named results queue "nightly", and none named "never"
        await open_named(alpha, "nightly")
        env = {
            "QUEUEGATE_NAMESPACE": settings.namespace,
            "QUEUEGATE_AMQP_URL": alpha.settings.amqp_url,
        }

        async def delete(*args: str) -> tuple[int, str]:
            """``queuegate replies delete ARGS --team alpha`` as alpha's engineer runs it:
            its status, and what it printed (stdout, then stderr)."""
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cli", "replies", "delete", *args, "--team", "alpha",
                env={**os.environ, **env, "COLUMNS": "200"},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
            assert process.returncode is not None
            return process.returncode, (stdout + stderr).decode()

        # When alpha deletes a queue it never had, as a results queue and as a client's own
        for args, kind in [(("never",), "results queue"), (("never", "--transient"), "reply")]:
            code, said = await delete(*args)
            # Expect it told in one line that there was none, and a failure's status
            assert code == 1, said
            assert said.count("\n") == 1, said
            assert f"team alpha has no {kind}" in said and "nothing was deleted" in said
        # ... and so for "nightly" once deleted, though the first delete said it was
        assert (await delete("nightly"))[0] == 0
        code, said = await delete("nightly")
        assert code == 1 and "has no results queue named 'nightly'" in said, said
        assert await counted(redis_client, settings, "alpha") == set()

        # When it names a batch's lock (no reply queue: the batch's collector's, submitter's)
        for role in ("collect", "submit"):
            code, said = await delete(f"nightly:{role}", "--transient")
            # Expect told what removes it, and which command drops the batch
            assert code == 1, said
            assert f"is the {role} lock of batch 'nightly', not a reply queue" in said, said
            assert "queuegate batch delete nightly" in said and said.count("\n") == 1, said


async def test_a_slot_opened_again_or_being_declared_while_it_is_looked_up_is_kept(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given alpha's queue admitted to its count, its declare under way (lua/reply_slot.lua)
    keys = Keys(settings.redis_prefix)
    slots = [keys.reply_queues("alpha"), keys.reply_queues_opening("alpha")]
    take = redis_client.register_script(lua_source("workers", "reply_slot"))
    reclaim = redis_client.register_script(lua_source("workers", "reply_reclaim"))
    queue, now = "ns.results.alpha.nightly", time.time()
    await take(keys=slots, args=[queue, now, now + 100, 16, 1000, now + 60])

    async def give_back(read: float) -> int:
        """What a worker that found the queue missing, its slot read as ``read``, frees."""
        return int(await reclaim(keys=slots, args=[time.time(), queue, read]))

    # When a worker that looked it up before the declare gives its slot back, expect it kept
    assert await give_back(now + 100) == 0
    # ... and once declared, a look that read it before it was opened again keeps it too
    await redis_client.zrem(slots[1], queue)
    assert await give_back(now + 99) == 0
    # ... while a look at the slot as it is frees it
    assert await give_back(now + 100) == 1
    assert await counted(redis_client, settings, "alpha") == set()
