"""``queuegate status`` when PostgreSQL or Redis cannot be read: it says so, never shows a
missing figure as a real one, and ``--watch`` outlives the outage."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import pty
import signal
import sys

from admin.teams import add
from queuegate.settings import Settings
from queuegate.urls import redact_url
from tests.proxy import TcpProxy

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


async def _status(env: dict[str, str], *args: str) -> tuple[int | None, str, str]:
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "status", "--teams", "alpha", *args,
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
    assert (code, table_code) == (3, 3)
    for err in (stderr, table_stderr):
        [line] = err.strip().splitlines()
        assert reason in line and "start it or set QUEUEGATE_DATABASE_URL" in line
    [alpha] = [line for line in table.splitlines() if line.lstrip().startswith("alpha")]
    assert alpha.rstrip().endswith("unknown")


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
    # showing figures
    await add(settings, "alpha", identity="queue")
    async with TcpProxy(settings.redis_url) as proxy:
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
