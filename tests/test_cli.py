"""The ``queuegate`` command as an operator uses it, against the real services."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aio_pika
import httpx
import pytest
from typer.testing import CliRunner

from admin.teams import add
from cli.main import app
from queuegate.management import BrokerAdmin
from queuegate.namespace import drop_namespace
from queuegate.settings import Settings
from queuegate.tenancy import broker_user as broker_team_user
from queuegate.topology import Topology
from queuegate.visible import visible
from tests.dashboard_browser import signed_in
from tests.support import running_gateway

runner = CliRunner()


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
        **extra,
    }


def _buffered_env(settings: Settings) -> dict[str, str]:
    """An operator's environment: stdout buffered, as Python buffers it into a pipe unless
    PYTHONUNBUFFERED is set (as it may be where the tests run)."""
    env = {**os.environ, **_env(settings)}
    env.pop("PYTHONUNBUFFERED", None)
    return env


def test_migrate_applies_once_then_reports_up_to_date(settings: Settings) -> None:
    first = runner.invoke(app, ["migrate"], env=_env(settings))
    again = runner.invoke(app, ["migrate"], env=_env(settings))

    assert first.exit_code == 0 and "applied 0001" in first.output
    assert again.exit_code == 0 and "up to date" in again.output


def test_teams_are_added_listed_and_disabled(settings: Settings) -> None:
    env = _env(settings)
    assert runner.invoke(app, ["teams", "add", "alpha"], env=env).exit_code == 0
    assert runner.invoke(app, ["teams", "add", "beta"], env=env).exit_code == 0
    assert runner.invoke(app, ["teams", "disable", "beta"], env=env).exit_code == 0

    listing = runner.invoke(app, ["teams", "list"], env=env)
    assert listing.output.split() == ["alpha", "enabled", "beta", "disabled"]
    as_json = json.loads(runner.invoke(app, ["teams", "list", "--json"], env=env).stdout)
    assert [(t["name"], t["enabled"], t["identity"]) for t in as_json["teams"]] == [
        ("alpha", True, "broker"),
        ("beta", False, "broker"),
    ]
    missing = runner.invoke(app, ["teams", "disable", "gamma"], env=env)
    assert missing.exit_code == 1 and "no team named gamma" in str(missing.exception)


async def test_submit_prints_the_reply_and_usage_reports_it(settings: Settings) -> None:
    # Given a running gateway
    async with running_gateway(settings) as gw:
        env = _env(settings, QUEUEGATE_MOCK_KEY="k")
        # When an operator submits one job from the command line
        submitted = await asyncio.to_thread(
            runner.invoke, app, ["submit", "--team", "alpha", "Hello CLI"], env=env
        )
        # Expect the reply printed, and the job in this month's usage
        assert submitted.exit_code == 0, submitted.output
        assert "mock reply to: Hello CLI" in submitted.output
        await gw.usage_rows(1)
        report = await asyncio.to_thread(runner.invoke, app, ["usage", "--json"], env=env)
        [row] = json.loads(report.stdout)
        assert row["team"] == "alpha" and row["requests"] == 1 and row["errors"] == 0


def test_an_unreachable_broker_is_one_line_that_says_what_to_do(settings: Settings) -> None:
    env = {**os.environ, **_env(settings), "QUEUEGATE_AMQP_URL": "amqp://guest:secret@127.0.0.1:1/"}
    done = subprocess.run(
        [sys.executable, "-m", "cli", "submit", "--team", "alpha", "hi"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "RabbitMQ is not reachable at amqp://guest:***@127.0.0.1:1/" in lines[0]
    assert "secret" not in done.stderr


async def _submit(settings: Settings, *args: str, **env: str) -> tuple[int, str, str]:
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "submit", *args,
        env={**os.environ, **_env(settings), **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(cli.communicate(), timeout=60)
    assert cli.returncode is not None
    return cli.returncode, stdout.decode(), stderr.decode()


async def test_submit_works_as_a_broker_team_and_as_an_api_key_team(settings: Settings) -> None:
    # Given team alpha added the default way (its own broker user) and beta with an API key
    alpha = await add(settings, "alpha")
    beta = await add(settings, "beta", identity="api_key")
    assert alpha.password is not None and beta.api_key is not None
    # (and workers that trust no operator user, so that the admin user is no team's)
    strict = settings.model_copy(update={"operator_users": f"{settings.namespace}.nobody"})
    try:
        async with running_gateway(strict, teams=("alpha", "beta")):
            # When an operator submits as each team, as the README says
            as_broker_user = await _submit(
                settings, "--team", "alpha", "Hi alpha", QUEUEGATE_TEAM_PASSWORD=alpha.password
            )
            as_api_key = await _submit(
                settings, "--team", "beta", "Hi beta", QUEUEGATE_TEAM_API_KEY=beta.api_key
            )
            # (the key under the name the batch and replies commands read, too)
            as_api_key_too = await _submit(
                settings, "--team", "beta", "Hi beta too", QUEUEGATE_API_KEY=beta.api_key
            )
            # and as the admin user, without the team's password, and with a wrong one
            as_admin = await _submit(settings, "--team", "alpha", "Hi again")
            wrong = await _submit(
                settings, "--team", "alpha", "Hi", QUEUEGATE_TEAM_PASSWORD="not-the-password"
            )
    finally:
        async with BrokerAdmin.of(settings) as admin:
            await admin.delete_user(broker_team_user(settings.namespace, "alpha"))

    # Expect both served, neither secret echoed, and the admin's job refused
    for (code, stdout, stderr), text in (
        (as_broker_user, "Hi alpha"),
        (as_api_key, "Hi beta"),
        (as_api_key_too, "Hi beta too"),
    ):
        assert code == 0, stderr
        assert f"mock reply to: {text}" in stdout
        assert alpha.password not in stdout + stderr and beta.api_key not in stdout + stderr
    code, _, stderr = as_admin
    assert code == 1 and "unauthorized" in stderr and "set QUEUEGATE_TEAM_PASSWORD" in stderr
    # (and how an api_key team gives its key, each variable --api-key reads named)
    assert "--api-key or set QUEUEGATE_API_KEY (or QUEUEGATE_TEAM_API_KEY)" in stderr
    code, _, stderr = wrong
    assert code == 1 and "refused the user's password" in stderr
    assert "not-the-password" not in stderr


async def test_an_invalid_submit_option_is_one_line_not_a_validation_traceback(
    settings: Settings,
) -> None:
    # Given team alpha added the default way
    alpha = await add(settings, "alpha")
    assert alpha.password is not None

    # When its operator submits a job naming a model longer than a job may name
    code, _, stderr = await _submit(
        settings, "--team", "alpha", "--model", "m" * 129, "hi",
        QUEUEGATE_TEAM_PASSWORD=alpha.password,
    )  # fmt: skip

    # Expect one line naming the field and what to do
    assert code == 1
    assert stderr.strip().count("\n") == 0, stderr
    assert "invalid model: String should have at most 128 characters" in stderr
    assert "correct it" in stderr


LONG = "x" * 10_000
"""A name no one would choose, but anyone may type (or a script pass from a file)."""


@pytest.mark.parametrize(
    ("args", "what_to_do"),
    [
        (["batch", "submit", "requests.jsonl", "--team", "alpha", "--name", LONG],
         "use 1-48 lowercase letters, digits, - and _, starting with a letter or digit"),
        (["batch", "submit", "requests.jsonl", "--team", "alpha", "--deadline", LONG],
         "use e.g. 30m, 24h or 2d: see queuegate batch submit --help"),
        (["replies", "delete", LONG, "--team", "alpha"],
         "use 1-64 letters, digits, - and _ (the name the client was given"),
        (["replies", "delete", f"{LONG}:collect", "--team", "alpha"],
         "run queuegate batch delete x"),
        (["teams", "show", LONG], "use 1-64 lowercase letters, digits, '-' or '_'"),
        (["teams", "set", "alpha", "--unsupported-params", LONG],
         "is not one of 'refuse', 'drop': see queuegate teams set --help"),
        *[([role, "--log-level", LONG],
           "is not one of 'debug', 'info', 'warning', 'error': see queuegate")
          for role in ("worker", "api", "accounting")],
        *[([role, "--host", LONG], "does not resolve to an address: give one of this machine's")
          for role in ("api", "mock-provider")],
        *[([command, "--catalog", LONG], "cannot read the catalog (File name too long): give")
          for command in ("worker", "deployments")],
        *[(["teams", command, LONG], "use 1-64 lowercase letters, digits, '-' or '_'")
          for command in ("rotate-credentials", "security", "disable", "keys", "add-key")],
        (["usage", LONG], "Got unexpected extra argument(s) (x"),
        *[([*command, "--team", LONG],
           f"or '_', starting with a letter or digit: see queuegate {' '.join(command)} --help")
          for command in (["usage"], ["audit", "log"])],
        (["batch", "status", "x", "--team", "alpha", f"--{LONG}"], "No such option: --x"),
        (["batch", "submit", "requests.jsonl", "--team", "alpha", "--skipped", LONG],
         "cannot be written (the path is too long): pick another path"),
        (["batch", "collect", "b", "--team", "alpha", "--out", "o.jsonl", "--file", LONG],
         "does not exist: see queuegate batch collect --help"),
    ],
)  # fmt: skip
def test_a_long_name_is_clipped_in_the_one_line_error_that_says_what_to_do(
    settings: Settings, tmp_path: Path, args: list[str], what_to_do: str
) -> None:
    # Given a 10,000-character name where a command takes a name (refused before anything
    # is opened: nothing of the namespace is touched)
    (tmp_path / "requests.jsonl").write_text("")
    # When the command is run
    line = _one_line_refusal(settings, tmp_path, args)
    # Expect the name clipped as log lines clip it (a path at 255 characters), and what to do
    assert re.search(r"(?<!x)(x{64}|x{255})…", line), line
    assert what_to_do in line


@pytest.mark.parametrize(("user", "password"), [(LONG, "someone"), ("someone", LONG)])
def test_a_broker_login_too_long_is_told_so_not_a_broker_down(
    settings: Settings, tmp_path: Path, user: str, password: str
) -> None:
    # When a submit is given a user or password of 10,000 characters (RabbitMQ resets the
    # connection of a login that long, unanswered)
    line = _one_line_refusal(
        settings,
        tmp_path,
        ["submit", "--team", "alpha", "--user", user, "Hi"],
        QUEUEGATE_TEAM_PASSWORD=password,
    )
    # Expect the login said to be too long, neither repeated nor RabbitMQ said to be down
    assert "are 10,007 bytes together, more than RabbitMQ's login takes (3,500)" in line
    assert "give the user and password the broker has" in line
    assert "not reachable" not in line and LONG[:65] not in line


WRAPPED = ("a\x1b[2J\r\n\u2028" * 2_000)[:10_000]
"""A value whose control characters, printed raw, would clear the screen and break the line."""


@pytest.mark.parametrize(
    ("args", "what_to_do"),
    [
        (["teams", "disable", WRAPPED], "use 1-64 lowercase letters, digits, '-' or '_'"),
        (["teams", "revoke-key", WRAPPED, WRAPPED], "use 1-64 lowercase letters, digits"),
        (["teams", "revoke-key", "alpha", WRAPPED],
         "nothing revoked; its keys are listed by queuegate teams keys alpha"),
        (["admin-key", "revoke", WRAPPED],
         "nothing revoked; the keys are listed by queuegate admin-key list"),
        (["dlq", "replay", WRAPPED], "list them with queuegate dlq list"),
    ],
)  # fmt: skip
async def test_a_value_with_control_characters_is_shown_escaped_in_one_line(
    settings: Settings, pool: object, tmp_path: Path, args: list[str], what_to_do: str
) -> None:
    # Given a migrated schema (pool), the namespace's dead letters and the exchanges a replay
    # publishes to, as workers declare them (dlq declares none), and a value full of newlines
    # and escape sequences
    async with await aio_pika.connect(settings.amqp_url) as connection:
        channel = await connection.channel()
        await Topology.of(settings).declare_usage(channel)  # and the dead letters'
        await Topology.of(settings).declare_jobs_exchange(channel)
    # When a command is given it where it takes a name or an id
    line = await asyncio.to_thread(_one_line_refusal, settings, tmp_path, args)
    # Expect it clipped with its control characters written out (as repr or visible writes
    # them), and what to do
    assert "a\\x1b[2J" in line and "…" in line and len(line) < 500, line
    assert what_to_do in line


def _one_line_refusal(settings: Settings, cwd: Path, args: list[str], **env: str) -> str:
    """The one line of stderr ``queuegate ARGS`` is refused with (status 1 or 2): short,
    without a control character (one would be a line of its own, or drive the terminal)."""
    done = subprocess.run(
        [Path(sys.executable).with_name("queuegate"), *args],  # the installed command
        env={**os.environ, **_env(settings, **env)},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode in (1, 2), (done.returncode, done.stdout[:500], done.stderr[:500])
    line = done.stderr.removesuffix("\n")
    assert len(line) < 500 and visible(line) == line, line[:500]
    return line


@pytest.mark.parametrize("command", [["usage"], ["audit", "log"]], ids=" ".join)
def test_a_report_given_two_teams_is_refused_not_of_the_last_alone(
    settings: Settings, tmp_path: Path, command: list[str]
) -> None:
    # When a report is asked for --team alpha --team beta (it kept beta's alone)
    line = _one_line_refusal(settings, tmp_path, [*command, "--team", "alpha", "--team", "beta"])
    # Expect a usage error saying a report is of one team or of all
    assert "--team" in line and "given 2 times: a report is of one team" in line, line


@pytest.mark.usefixtures("pool")
@pytest.mark.parametrize(
    "command",
    [
        ["status", "--watch", "--json"],
        ["status", "--watch"],
        ["usage", "--json"],
        ["usage"],
        ["audit", "log"],
    ],
)
async def test_a_closed_stdout_ends_a_command_quietly(
    settings: Settings, command: list[str]
) -> None:
    # When a command prints to a pipe whose reader is gone, as once head has read its lines
    ended = await _into_a_gone_reader(settings, command)
    # Expect it to end there, status 0, saying nothing (before: status 1; usage --json,
    # its stdout buffered, 120 and "Exception ignored" as Python exited; status --watch,
    # whose tables rich's Live printed off a terminal only as it ended, never ended)
    assert ended == (0, "")


@pytest.mark.usefixtures("pool")
async def test_a_stale_status_into_a_closed_stdout_ends_quietly(settings: Settings) -> None:
    # Given no worker reporting: a status is stale
    # When `status --json` prints to a pipe whose reader is gone
    ended = await _into_a_gone_reader(settings, ["status", "--json"])
    # Expect status 0, its note alone on stderr (before: status 3 asked for, and Python's
    # exit, flushing stdout, failed it: status 120, "Exception ignored" on stderr)
    assert ended == (0, "stale: no worker has reported in the last few seconds\n")


async def _into_a_gone_reader(settings: Settings, command: list[str]) -> tuple[int, str]:
    """``command`` run into a pipe whose reader is gone: its status and what it said on
    stderr."""
    reader, writer = os.pipe()
    os.close(reader)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", *command,
        env=_buffered_env(settings), stdout=writer, stderr=subprocess.PIPE,
    )  # fmt: skip
    os.close(writer)
    return await _ending(process)


async def _ending(process: asyncio.subprocess.Process) -> tuple[int, str]:
    """The status of ``process`` and what it said on stderr, once it ends; killed if it
    has not within 60 s."""
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, stderr.decode()


@pytest.mark.usefixtures("pool")
async def test_a_piped_status_watch_writes_each_refresh_as_it_is_read(settings: Settings) -> None:
    # Given `status --watch` into a pipe, not a terminal
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "status", "--watch", "--interval", "0.2",
        env=_buffered_env(settings), stdout=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None

    async def refreshes(wanted: int) -> None:
        seen = 0
        while seen < wanted:
            line = await process.stdout.readline()
            assert line, "status --watch ended"
            seen += line.startswith(b"teams at ")

    # When its reader reads it
    try:
        # Expect each refresh's tables as it is made (before: none until it ended)
        await asyncio.wait_for(refreshes(2), timeout=30)
    finally:
        process.kill()
        await process.wait()


@pytest.mark.usefixtures("pool")
@pytest.mark.parametrize(
    "command", [["usage", "--json"], ["audit", "log"], ["status", "--watch"], ["usage"]]
)
async def test_a_command_started_without_stdout_ends_quietly(
    settings: Settings, command: list[str]
) -> None:
    # When a command is started with its stdout closed (a shell's >&-)
    process = await asyncio.create_subprocess_exec(
        "sh", "-c", 'exec "$0" -m cli "$@" >&-', sys.executable, *command,
        env=_buffered_env(settings), stderr=subprocess.PIPE,
    )  # fmt: skip
    # Expect it to end at its first output, status 0, saying nothing, as when its reader
    # closed it (before: uvloop, finding a socket at 1, aborted it: status 134, an assertion
    # on stderr; then, with /dev/null there, status --watch never ended)
    assert await _ending(process) == (0, "")


async def test_a_mock_provider_started_without_stdout_serves_on() -> None:
    # Given a free port
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # When the mock provider, which serves until stopped, is started with stdout closed
    mock = await asyncio.create_subprocess_exec(
        "sh", "-c", 'exec "$0" -m cli mock-provider --port "$1" >&-', sys.executable, str(port),
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
            for _ in range(500):  # the line is printed just before it listens
                try:
                    answered = await http.post("/v1/chat/completions", json=body)
                    break
                except httpx.ConnectError:
                    await asyncio.sleep(0.02)
            else:
                raise AssertionError("the mock provider never listened")
        # Expect it serving, its first line gone nowhere (before: that line ended it, status
        # 0, as a reader gone ends a one-shot command, before it listened)
        assert answered.status_code == 200 and mock.returncode is None
    finally:
        if mock.returncode is None:
            mock.terminate()
        await mock.wait()


def test_help_paragraphs_are_wrapped_by_the_terminal_not_the_source() -> None:
    # When an operator reads the help of commands with long descriptions at 80 columns
    for command in (["submit"], ["worker"], ["teams", "add"], ["teams", "set"], ["status"]):
        shown = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
        assert shown.exit_code == 0, shown.output
        description = shown.output.split("Usage:", 1)[1].split("╭", 1)[0]
        text = "\n".join(line.strip() for line in description.splitlines())
        paragraphs = [p.splitlines() for p in text.split("\n\n") if p.strip()][1:]
        assert paragraphs, shown.output

        # Expect every line of a paragraph filled, but its last: no sentence cut into stubs
        for lines in paragraphs:
            stubs = [line for line in lines[:-1] if len(line.strip()) < 60]
            assert not stubs, (command, shown.output)


def test_teams_show_and_usage_say_what_is_unset_or_empty(settings: Settings) -> None:
    # Given a migrated database with a team and no usage
    env = _env(settings)
    assert runner.invoke(app, ["migrate"], env=env).exit_code == 0
    added = runner.invoke(app, ["teams", "add", "alpha", "--identity", "queue"], env=env)
    assert added.exit_code == 0, added.output

    # When an operator shows the team, and reads a month without usage
    shown = runner.invoke(app, ["teams", "show", "alpha"], env=env)
    empty = runner.invoke(app, ["usage", "--month", "2026-10", "--by", "model"], env=env)

    # Expect the unset expected output named as the default, and one line for no usage
    assert "expected output: the gateway's default" in shown.stdout
    assert "max queue bytes: the gateway's default" in shown.stdout
    assert "- tokens" not in shown.stdout
    assert empty.exit_code == 0 and empty.stdout == "no usage in 2026-10\n"


def test_a_team_name_refused_is_told_the_rule_it_breaks(settings: Settings) -> None:
    refused = runner.invoke(app, ["teams", "add", "_alpha"], env=_env(settings))
    # (a usage error, as any team command's: refused before anything is opened)
    assert refused.exit_code == 2
    assert "starting with a letter or digit" in refused.output


async def test_mock_provider_fails_the_models_it_is_told_to_and_serves_the_rest() -> None:
    # Given a free port
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    # When the mock is run as the bundled catalog's comment says, for flaky-gpt
    mock = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "mock-provider", "--port", str(port),
        "--fail-model", "flaky-gpt", "--error-status", "503", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert mock.stdout is not None
        await asyncio.wait_for(mock.stdout.readline(), timeout=30)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

            async def call(model: str) -> int:
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                for _ in range(500):  # the line is printed just before it listens
                    try:
                        response = await http.post("/v1/chat/completions", json=body)
                    except httpx.ConnectError:
                        await asyncio.sleep(0.02)
                        continue
                    return response.status_code
                raise AssertionError("the mock provider never listened")

            # Expect flaky-gpt answered with the error status, every time; others served
            assert [await call("flaky-gpt") for _ in range(3)] == [503, 503, 503]
            assert await call("gpt-4o-mini") == 200
    finally:
        mock.terminate()
        await mock.wait()


def test_mock_provider_on_a_busy_port_is_told_to_pick_a_free_one() -> None:
    # Given a port something listens on
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        # When the mock provider is started there
        done = subprocess.run(
            [sys.executable, "-m", "cli", "mock-provider", "--port", str(port)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    # Expect one line naming the busy port as the problem, not a file or a permission
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "set --port to a free port" in lines[0] and "permission" not in lines[0]


async def test_the_demo_prints_the_dashboard_and_a_key_that_signs_in(settings: Settings) -> None:
    # Given the demo run as `make demo` runs it, in a namespace of the test's own
    env = {**os.environ, **_env(settings), "COLUMNS": "200"}
    demo = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "demo", env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    demo_settings = settings.model_copy(
        update={
            "namespace": f"{settings.namespace}-demo",
            "database_schema": f"{settings.database_schema}_demo",
        }
    )
    try:
        assert demo.stdout is not None
        # When it has run its jobs, printed its tables and the dashboard's address and key
        printed: list[str] = []
        while not printed or "until Ctrl-C" not in printed[-1]:
            line = await asyncio.wait_for(demo.stdout.readline(), timeout=60)
            assert line, "the demo ended early:\n" + "".join(printed)
            printed.append(line.decode())
        output = "".join(printed)
        # (the replies' costs in one format, their points in line)
        cells = [[c.strip() for c in row.split("│")[1:-1]] for row in printed if "│" in row]
        costs = [row[-1] for row in cells if len(row) == 6 and "-" in row[1]]
        assert len(costs) == 4 and len({len(cost.split(".")[1]) for cost in costs}) == 1, costs
        url = re.search(r"the dashboard: (http://127\.0\.0\.1:\d+)/dashboard", output)
        key = re.search(r"^\s+(qga_\S+)$", output, re.MULTILINE)
        assert url is not None and key is not None, output
        # Expect the key to sign in to the dashboard, which shows both teams' spend
        async with httpx.AsyncClient(base_url=url[1]) as browser:
            await signed_in(browser, key[1])
            overview = await browser.get("/dashboard")
            assert overview.status_code == 200
            assert 'data-team="research"' in overview.text
            assert 'data-team="support"' in overview.text
        # and Ctrl-C to stop it cleanly
        demo.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(demo.wait(), timeout=30) == 0
    finally:
        if demo.returncode is None:
            demo.kill()
            await demo.wait()
        await drop_namespace(demo_settings, ["research", "support"])


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("256.1.1.1", "the host does not resolve"),
        ("192.0.2.7", "no interface of this machine has that address"),  # TEST-NET-1
    ],
)
def test_a_worker_whose_metrics_host_it_cannot_listen_on_is_told_to_set_the_host(
    settings: Settings, host: str, why: str
) -> None:
    # Given a metrics host that is no address, or none of this machine's
    env = {
        **os.environ,
        **_env(
            settings,
            QUEUEGATE_METRICS_HOST=host,
            QUEUEGATE_METRICS_PORT="9464",
            QUEUEGATE_MOCK_KEY="sk-test",
        ),
    }
    # When a worker is started
    done = subprocess.run(
        [sys.executable, "-m", "cli", "worker"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    # Expect one line naming the host as the problem and what to set, not the port
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"{host}:9464: {why}; set QUEUEGATE_METRICS_HOST to" in lines[0], lines[0]
    assert "QUEUEGATE_METRICS_PORT" not in lines[0], lines[0]
