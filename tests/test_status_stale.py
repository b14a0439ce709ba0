"""``queuegate status`` when PostgreSQL or Redis cannot be read, or no worker reports: it says
so, as the Live page's ``live.json`` does, never shows a missing figure as a real one, and
``--watch`` outlives the outage."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import pty
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import httpx
import redis.asyncio as aioredis

from admin.keys import issue_admin_key
from admin.teams import add
from frontdoor.serve import serving
from mockprovider import MockProvider
from queuegate.db import create_pool
from queuegate.keys import Keys
from queuegate.registry import TeamConfig
from queuegate.settings import Settings
from queuegate.status import NO_WORKER, Status
from queuegate.topology import Topology
from queuegate.urls import redact_url
from router import load_catalog
from tests.chaos.harness import declare_teams, start_worker, worker_env, workers_running
from tests.dashboard_browser import signed_in
from tests.proxy import TcpProxy
from tests.teams import register

CLI_WAIT = 30.0
"""Seconds a CLI run may take (its start on a loaded machine takes seconds of its own)."""


def _env(settings: Settings, **urls: str) -> dict[str, str]:
    env = {
        **os.environ,
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
        "COLUMNS": "200",  # the reasons' lines whole
    }
    return env | {f"QUEUEGATE_{name.upper()}": url for name, url in urls.items()}


async def _status(
    env: dict[str, str], *args: str, teams: tuple[str, ...] = ("--teams", "alpha")
) -> tuple[int | None, str, str]:
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "status", *teams, *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(cli.communicate(), timeout=CLI_WAIT)
    return cli.returncode, stdout.decode(), stderr.decode()


async def test_status_with_postgres_unreachable_says_so_and_shows_budgets_unknown(
    settings: Settings,
) -> None:
    # Given PostgreSQL unreachable (its proxy down), the broker and Redis up
    async with TcpProxy(settings.database_url) as proxy:
        await proxy.down()
        env = _env(settings, database_url=proxy.url)

        # When an operator asks for the status, as JSON and as a table
        code, stdout, stderr = await _status(env, "--json")
        table_code, table, table_stderr = await _status(env)

    # Expect the figures it could read, marked stale with the one-line reason as the Live
    # page's live.json marks them, budgets unknown rather than "no budget", and a failing exit
    reason = f"PostgreSQL is not reachable at {redact_url(proxy.url)}"
    status = json.loads(stdout)
    assert status["stale"] is True
    assert status["reason"].startswith(reason)
    assert [team["budget_usd"] for team in status["teams"]] == [None]
    assert status["budgets_read"] is False  # before: a null budget read as "no budget"
    assert (code, table_code) == (3, 3)
    for err in (stderr, table_stderr):
        [line] = err.strip().splitlines()
        assert reason in line and "start it or set QUEUEGATE_DATABASE_URL" in line
    [alpha] = [line for line in table.splitlines() if line.lstrip().startswith("alpha")]
    assert alpha.rstrip().endswith("unknown")
    # and its spend not said to be at least accounting's, which was not read either
    assert "spend: this month, as workers count it" in " ".join(table.split())
    assert "accounting" not in table


class _Screen:
    """What a process writes to its terminal (a pty), read as it comes."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.text = ""
        self._grown = asyncio.Event()
        asyncio.get_running_loop().add_reader(fd, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except OSError:  # the process closed its end
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self._fd)
        self.text += data.decode(errors="replace")
        self._grown.set()

    async def until(self, shown: str, start: int = 0, timeout: float = CLI_WAIT) -> int:
        """Wait until ``shown`` is written after ``start``; where it ends."""
        async with asyncio.timeout(timeout):
            while (at := self.text.find(shown, start)) < 0:
                self._grown.clear()
                await self._grown.wait()
        return at + len(shown)

    async def until_fresh_frame(self, start: int, timeout: float = CLI_WAIT) -> None:
        """Wait until, after ``start``, a frame of the teams table comes without a stale line
        before it: the text between two tables' titles then names no staleness."""
        async with asyncio.timeout(timeout):
            while True:
                titles = _find_all(self.text, "teams at ", start)
                if any("stale" not in self.text[a:b] for a, b in itertools.pairwise(titles)):
                    return
                self._grown.clear()
                await self._grown.wait()

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self._fd)
        os.close(self._fd)


def _find_all(text: str, part: str, start: int) -> list[int]:
    found = []
    while (at := text.find(part, start)) >= 0:
        found.append(at)
        start = at + 1
    return found


async def test_watch_marks_itself_stale_while_redis_is_away_and_recovers(
    settings: Settings,
) -> None:
    # Given `status --watch` of team alpha on a terminal, reaching Redis through a proxy,
    # showing figures, and a worker process serving alpha (reporting to Redis directly)
    await add(settings, "alpha", identity="queue")
    async with (
        MockProvider() as mock,
        workers_running(worker_env(settings, mock, QUEUEGATE_STATS_INTERVAL="0.2"), ("alpha",)),
        TcpProxy(settings.redis_url) as proxy,
    ):
        screen_fd, tty = pty.openpty()
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "status", "--watch", "--interval", "0.2",
            "--teams", "alpha",
            env=_env(settings, redis_url=proxy.url), stdin=tty, stdout=tty, stderr=tty,
        )  # fmt: skip
        os.close(tty)
        screen = _Screen(screen_fd)
        try:
            await screen.until("teams at ")

            # When Redis goes away
            await proxy.down()

            # Expect the watch still running, marked stale with the one-line reason
            shown = await screen.until(f"Redis is not reachable at {redact_url(proxy.url)}")
            assert "stale since" in screen.text
            assert cli.returncode is None

            # And, once Redis is back, fresh figures without the mark
            await proxy.up()
            await screen.until_fresh_frame(shown)
            assert cli.returncode is None
            cli.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(cli.wait(), timeout=CLI_WAIT) == 0
        finally:
            if cli.returncode is None:
                cli.kill()
                await cli.wait()
            screen.close()


STATUS_FIELDS = {f.name for f in dataclasses.fields(Status)} | {"stale", "budgets_read"}
"""The fields of the document ``status --json`` prints."""


async def test_watch_as_json_prints_a_status_document_a_line_stale_ones_marked(
    settings: Settings,
) -> None:
    # Given `status --watch --json` of team alpha piped to a program, reaching Redis through
    # a proxy, and a worker process serving alpha (reporting to Redis directly)
    await add(settings, "alpha", identity="queue")
    async with (
        MockProvider() as mock,
        workers_running(worker_env(settings, mock, QUEUEGATE_STATS_INTERVAL="0.2"), ("alpha",)),
        TcpProxy(settings.redis_url) as proxy,
    ):
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "status", "--watch", "--json", "--interval", "0.2",
            "--teams", "alpha",
            env=_env(settings, redis_url=proxy.url),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = cli.stdout, cli.stderr
        assert stdout is not None and stderr is not None

        async def document() -> dict[str, Any]:
            line = await asyncio.wait_for(stdout.readline(), timeout=CLI_WAIT)
            parsed: dict[str, Any] = json.loads(line)
            return parsed

        async def until(check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
            while not check(found := await document()):
                pass
            return found

        try:
            # When two refreshes have passed
            first, second = await document(), await document()
            # Expect each a line of its own, the status document with when it went stale
            for refresh in (first, second):
                assert set(refresh) == STATUS_FIELDS | {"stale_since"}
                assert [team["team"] for team in refresh["teams"]] == ["alpha"]
            assert first["at"] < second["at"]

            # And, once the worker reports, fresh figures, not stale
            fresh = await until(lambda refresh: not refresh["stale"])
            assert (fresh["reason"], fresh["stale_since"], fresh["workers"]) == (None, None, 1)

            # When Redis goes away
            await proxy.down()
            # Expect the watch still printing: the last figures read, marked stale with the
            # one-line reason and since when, as the table watch marks its frame
            stale = await until(lambda refresh: refresh["stale"])
            assert stale["reason"].startswith(f"Redis is not reachable at {redact_url(proxy.url)}")
            assert stale["stale_since"] is not None and stale["stale_since"] > fresh["at"]
            assert stale["at"] >= fresh["at"] and stale["teams"][0]["team"] == "alpha"
            assert cli.returncode is None

            # When it is interrupted, expect a clean end
            cli.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(cli.wait(), timeout=CLI_WAIT) == 0
            assert "Traceback" not in (await stderr.read()).decode()
        finally:
            if cli.returncode is None:
                cli.kill()
                await cli.wait()


async def test_watch_goes_on_refreshing_while_postgres_hangs(settings: Settings) -> None:
    # Given `status --watch --json` reaching PostgreSQL through a proxy, its figures fresh
    await add(settings, "alpha", identity="queue")
    async with TcpProxy(settings.database_url) as proxy:
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "status", "--watch", "--json", "--interval", "0.2",
            "--teams", "alpha",
            env=_env(settings, database_url=proxy.url),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert cli.stdout is not None
        try:
            await asyncio.wait_for(cli.stdout.readline(), timeout=CLI_WAIT)
            # When PostgreSQL hangs (neither answers nor refuses) mid-watch
            proxy.hang()
            # Expect lines still coming while it hangs, marked stale with the reason (before,
            # none came until it answered again, the refresh held by the hung connection)
            async with asyncio.timeout(15):
                while True:
                    line = json.loads(await cli.stdout.readline())
                    if line["reason"] is not None and "did not answer" in line["reason"]:
                        break
            assert line["stale"] is True and line["stale_since"] is not None
            assert line["teams"][0]["budget_usd"] is None
            await proxy.up()
        finally:
            cli.kill()
            await cli.wait()


async def test_status_names_a_missing_database_not_an_unreachable_server(
    settings: Settings,
) -> None:
    # Given PostgreSQL up, but the URL naming a database it does not have
    url = settings.database_url.rsplit("/", 1)[0] + f"/{settings.namespace}_missing"
    env = _env(settings, database_url=url)

    # When an operator asks for the status
    code, _, stderr = await _status(env, "--json")

    # Expect the real cause and its fix, not "start it" (it runs)
    [line] = stderr.strip().splitlines()
    assert "does not exist: create it" in line, line
    assert "not reachable" not in line
    assert code == 3


QUEUED = 200


async def _until(check: Callable[[], Awaitable[object]], timeout: float = 30) -> None:
    """Poll ``check`` until it holds: what workers report arrives unannounced."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_status_with_every_worker_dead_lists_queued_jobs_stale_as_live_json(
    settings: Settings, redis_client: aioredis.Redis
) -> None:
    # Given team alpha registered, served by one worker process that reports every 0.2 s
    await register(settings, "alpha", TeamConfig())
    await declare_teams(settings, ("alpha",))
    pool = await create_pool(settings)
    admin = await issue_admin_key(pool, "status test")
    await pool.close()
    live = Keys(settings.redis_prefix).live_workers
    async with MockProvider() as mock:
        env = worker_env(settings, mock, QUEUEGATE_STATS_INTERVAL="0.2")
        worker = await start_worker(env, ("alpha",))
        try:
            await _until(lambda: redis_client.zcard(live))
        finally:
            # When it is SIGKILLed, and jobs are queued for the team with no worker left
            worker.kill()
            await worker.wait()
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            jobs = await channel.get_exchange(Topology.of(settings).jobs_exchange)
            for _ in range(QUEUED):
                await jobs.publish(aio_pika.Message(b"{}"), routing_key="alpha")
        catalog = load_catalog(None, {"QUEUEGATE_MOCK_URL": mock.url})
        async with serving(settings, catalog) as url, httpx.AsyncClient(base_url=url) as http:
            await signed_in(http, admin.key)

            async def stale() -> bool:
                return bool((await http.get("/dashboard/live.json")).json()["stale"])

            # (once its last snapshot has expired: live.json says so)
            await _until(stale)
            page = (await http.get("/dashboard/live.json")).json()
            # and an operator asks for the status of every team, as JSON and as a table
            code, stdout, stderr = await _status(_env(settings), "--json", teams=())
            table_code, table, table_stderr = await _status(_env(settings), teams=())

    # Expect the team listed with its queued jobs, stale with live.json's reason, exit 3
    status = json.loads(stdout)
    assert (status["workers"], status["stale"], status["reason"]) == (0, True, NO_WORKER)
    assert [(t["team"], t["queue_depth"], t["consumers"]) for t in status["teams"]] == [
        ("alpha", QUEUED, 0)
    ]
    assert (page["stale"], page["reason"]) == (True, status["reason"])
    assert [(t["team"], t["queue_depth"]) for t in page["teams"]] == [("alpha", QUEUED)]
    assert (code, table_code) == (3, 3)
    for err in (stderr, table_stderr):
        assert err.strip().splitlines() == [f"stale: {NO_WORKER}"]
    [alpha] = [line.split() for line in table.splitlines() if line.lstrip().startswith("alpha")]
    assert alpha[1:3] == [str(QUEUED), "0"]
    # and its budget read, none (not "unknown": PostgreSQL answered), and its spend at least
    # what accounting wrote
    assert alpha[-1] == "-"
    assert "at least what accounting wrote" in " ".join(table.split())
