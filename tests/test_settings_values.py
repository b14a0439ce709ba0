"""Settings refused at start in one line naming the variable: durations that are not finite,
and service URLs their clients would misread, said without quoting the password."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest
from pydantic import ValidationError

from queuegate.settings import DAY, Settings, settings_problem
from queuegate.urls import UNPARSABLE, redact_url

FLOATS = sorted(name for name, field in Settings.model_fields.items() if field.annotation is float)
PASSWORD = "Sekr1tA"
URLS = {
    "amqp_url": ("amqp", "127.0.0.1:5672"),
    "redis_url": ("redis", "127.0.0.1:6379"),
    "database_url": ("postgresql", "127.0.0.1:5432"),
    "management_url": ("http", "127.0.0.1:15672"),
}


def _bad_urls(scheme: str, host: str) -> list[str]:
    """A password holding what ends a URL's credentials, and URLs written wrong around it."""
    held = [f"{scheme}://u:Sek{mark}r1tA@{host}/x" for mark in "/#?@"]
    return [
        *held,
        f"{scheme}://u:Sek/r1tA@{host},{host}/x",
        f"u:{PASSWORD}@{host}",
        f"{scheme}:/u:{PASSWORD}@{host}/",
        f"{scheme}//u:{PASSWORD}@{host}/",
        PASSWORD,
        f"{scheme}://u:{PASSWORD}@{host.partition(':')[0]}:99999/",
        f"{scheme}://u:{PASSWORD}@[{host}/",
    ]


REDIS_MISREAD = [
    *(
        f"redis://u:{PASSWORD}@127.0.0.1:6379/0?{query}"
        for query in (
            *("options=-c x", "foo=bar", "socket_timeout=abc", "socket_timeout=nan"),
            *("socket_timeout=3", "timeout=2", "max_connections=5", "decode_responses=1"),
        )
    ),
    f"redis://u:{PASSWORD}@127.0.0.1:6379/0?db=-1",
    f"redis://u:{PASSWORD}@127.0.0.1:6379/abc",
    f"redis://u:{PASSWORD}@127.0.0.1:6379/0?protocol=9",
    f"rediss://u:{PASSWORD}@127.0.0.1:6379/0?ssl_cert_reqs=bogus",
]
"""Redis URLs whose password ends where it should, with options redis-py's client cannot take
(it raised them with a traceback of 200-400 lines at the first command), or a database it
would ignore (``/abc``: database 0) or Redis refuse (then said as Redis being unreachable)."""
CASES = [
    *((name, url) for name, (s, h) in URLS.items() for url in _bad_urls(s, h)),
    *(("redis_url", url) for url in REDIS_MISREAD),
]


def _refused(**values: object) -> str:
    with pytest.raises(ValidationError) as refused:
        Settings(**values)  # type: ignore[arg-type]
    return settings_problem(refused.value)


def test_the_float_settings_are_the_durations_the_attack_named() -> None:
    assert {"claim_lease", "accounting_linger", "job_time_limit", "stats_interval"} <= set(FLOATS)


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e300"])
def test_every_duration_is_finite_and_bounded_and_named_as_its_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    # Given a duration set to what no clock can wait (as the environment gives it)
    monkeypatch.setenv(f"QUEUEGATE_{name.upper()}", value)
    # Expect it refused in one line naming the variable, not the field
    said = _refused()
    assert said.startswith(f"invalid QUEUEGATE_{name.upper()}: ")
    assert "\n" not in said


@pytest.mark.parametrize("name", FLOATS)
def test_every_duration_takes_a_day(name: str) -> None:
    limit = Settings.model_fields[name]
    bounded = [m.le for m in limit.metadata if getattr(m, "le", None) is not None]
    assert Settings(**{name: min([DAY, *bounded])})  # type: ignore[arg-type]


def test_keyless_bodies_that_could_hold_every_connection_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a front door of 32 connections: unsaid, its sign-in forms take a quarter of them
    monkeypatch.setenv("QUEUEGATE_HTTP_MAX_CONNECTIONS", "32")
    assert Settings().keyless_bodies == 8
    # Expect as many said as it holds refused in one line that says which to lower
    monkeypatch.setenv("QUEUEGATE_HTTP_KEYLESS_BODIES", "32")
    said = _refused()
    assert "QUEUEGATE_HTTP_KEYLESS_BODIES is not below QUEUEGATE_HTTP_MAX_CONNECTIONS" in said
    assert "\n" not in said
    monkeypatch.setenv("QUEUEGATE_HTTP_KEYLESS_BODIES", "31")
    assert Settings().keyless_bodies == 31


def test_a_teams_requests_in_progress_are_read_under_their_former_per_key_name_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a deployment that set the bound under its name from when it counted per key
    monkeypatch.setenv("QUEUEGATE_HTTP_REQUESTS_PER_KEY", "100")
    # Expect it kept, now per team; and the new name first when both are set
    assert Settings().requests_per_team == 100
    monkeypatch.setenv("QUEUEGATE_HTTP_REQUESTS_PER_TEAM", "200")
    assert Settings().requests_per_team == 200
    # ... and a wrong value refused in a line naming both, under either of which it is read
    monkeypatch.delenv("QUEUEGATE_HTTP_REQUESTS_PER_TEAM")
    monkeypatch.setenv("QUEUEGATE_HTTP_REQUESTS_PER_KEY", "0")
    assert _refused().startswith(
        "invalid QUEUEGATE_HTTP_REQUESTS_PER_TEAM or QUEUEGATE_HTTP_REQUESTS_PER_KEY: "
    )


def test_a_teams_share_of_the_body_bytes_holds_its_largest_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given the body bytes a process reads at once: unsaid, a quarter of them is a team's
    assert Settings().body_bytes_per_team == 16 * 1024 * 1024
    # ... or the largest job's body (twice the job, read before it is measured), where a
    # quarter would not hold it
    monkeypatch.setenv("QUEUEGATE_HTTP_BODY_BYTES_IN_FLIGHT", str(4 * 1_048_576))
    assert Settings().body_bytes_per_team == 2 * 1_048_576
    # Expect a share said below the largest job refused in one line that says what to do
    monkeypatch.setenv("QUEUEGATE_HTTP_BODY_BYTES_PER_TEAM", "4096")
    said = _refused()
    assert "QUEUEGATE_HTTP_BODY_BYTES_PER_TEAM is below twice QUEUEGATE_MAX_JOB_BYTES" in said
    assert "raise it" in said and "\n" not in said


@pytest.mark.parametrize(("name", "url"), CASES)
def test_a_url_setting_its_client_would_misread_is_refused_without_its_password(
    name: str, url: str
) -> None:
    said = _refused(**{name: url})
    assert said.startswith(f"invalid QUEUEGATE_{name.upper()}: ")
    assert "Sek" not in said and "r1tA" not in said, said


@pytest.mark.parametrize(
    ("query", "says"),
    [
        (
            "0?socket_timeout=5",
            "its query sets socket_timeout, which the gateway sets (from "
            "QUEUEGATE_REDIS_TIMEOUT): correct it",
        ),
        ("0?max_connections=5&timeout=2", "sets max_connections, timeout, which the gateway"),
        ("0?decode_responses=1", "sets decode_responses, which the gateway sets: correct it"),
        ("abc", "its path is not a database number"),
        ("0?db=-1", "a number in the query is negative or not finite"),
    ],
)
def test_a_redis_url_the_gateway_refuses_says_why(query: str, says: str) -> None:
    # Before, each said only "its client cannot read it": an option a user may well set
    # (?socket_timeout=5) was refused without a word of which, or what to set instead.
    said = _refused(redis_url=f"redis://u:{PASSWORD}@127.0.0.1:6379/{query}")
    assert said.startswith("invalid QUEUEGATE_REDIS_URL: "), said
    assert says in said, said
    assert "Sek" not in said and "r1tA" not in said, said


@pytest.mark.parametrize(
    "values",
    [
        {"amqp_url": "amqps://u:p%2Fq@node-1,node-2:5671/vh?heartbeat=5"},
        {"redis_url": "rediss://:p%23q@127.0.0.1:6380/2"},
        {"redis_url": "unix:///run/redis.sock?db=1"},
        {"database_url": "postgresql:///test?host=/run/postgresql"},
        {"database_url": "postgres://u:p%3Fq@db-1:5432,db-2:5433/test"},
        {"management_url": "https://admin:p%40q@[::1]:15671/"},
    ],
)
def test_urls_their_clients_read_are_accepted(values: dict[str, str]) -> None:
    assert Settings(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("url", [url for _, url in CASES])
def test_redact_url_shows_no_part_of_a_password_it_cannot_tell_apart(url: str) -> None:
    shown = redact_url(url)
    assert "Sek" not in shown and "r1tA" not in shown
    assert shown == UNPARSABLE or ":***@" in shown


def test_redact_url_keeps_a_clean_url_but_its_password() -> None:
    assert redact_url("redis://:pw@127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("amqp://gw:pw@n1:5672,n2/") == "amqp://gw:***@n1:5672,n2/"
    assert redact_url("postgresql://127.0.0.1/test") == "postgresql://127.0.0.1/test"


@pytest.mark.parametrize(
    "url",
    [
        "redis://Zq9SekrU@127.0.0.1:6379/0",
        "rediss://Zq9SekrU@[::1]:6380/2",
        "amqp://Zq9SekrU@n1:5672,n2/",
        "amqps://Zq9SekrU@n1/vh",
        "postgresql://Zq9SekrU@127.0.0.1:5432/test",
        "postgres://Zq9SekrU@db-1,db-2/test",
        "https://Zq9SekrU@[::1]:15671/",
    ],
)
def test_redact_url_hides_a_lone_userinfo_as_a_password(url: str) -> None:
    # redis-cli reads redis://SECRET@host as a password; for every scheme the gateway cannot
    # tell which one was meant
    shown = redact_url(url)

    assert "Zq9SekrU" not in shown and shown == url.replace("Zq9SekrU@", "***@")


async def _failed_cli(env: dict[str, str], *args: str) -> tuple[int | None, str, bytes]:
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(cli.communicate(), timeout=60)
    return cli.returncode, stderr.decode(), stdout


ROLES = (
    ["teams", "list"],
    ["worker"],
    ["accounting"],
    ["api", "--port", "0"],
    ["status"],
    ["deployments"],
    ["submit", "--team", "alpha", "--model", "gpt-4o-mini", "hello"],
)
"""A command of each role: they all load settings alike."""
EACH_IN_TURN = """
import contextlib, io, json, os, sys
from cli.main import main

said = []
for variable, url, command in json.load(sys.stdin):
    os.environ[variable] = url
    sys.argv = ["queuegate", *command]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main()
            code = 0
        except SystemExit as stop:
            code = stop.code
    del os.environ[variable]
    said.append((code, stderr.getvalue(), stdout.getvalue()))
json.dump(said, sys.__stdout__)
"""
"""Runs ``queuegate``'s main (JSON on stdin: variable, URL, command) once per run, in turn, in
one process; writes what each exited with and printed."""


async def _each_in_turn(runs: list[tuple[str, str, list[str]]]) -> list[tuple[int, str, str]]:
    env = {**os.environ, "QUEUEGATE_METRICS_PORT": "0"}
    loop = await asyncio.create_subprocess_exec(
        sys.executable, "-c", EACH_IN_TURN,
        env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(loop.communicate(json.dumps(runs).encode()), 60)
    assert loop.returncode == 0, stderr.decode()
    return [(code, err, out) for code, err, out in json.loads(stdout)]


async def test_every_bad_url_stops_every_role_in_one_line_without_its_password() -> None:
    # Given each URL setting set to each misreadable URL, each in one of the roles
    runs = [
        (f"QUEUEGATE_{name.upper()}", url, ROLES[number % len(ROLES)])
        for number, (name, url) in enumerate(CASES)
    ]
    # ... and each role also as a process of its own, one URL setting in each (what a process
    # adds to what its main prints, its exit status and anything said as it exits, is the
    # role's, not the URL's: 56 interpreters started for it took 26 s)
    alone = runs[:: len(runs) // len(ROLES)][: len(ROLES)]
    assert {" ".join(role) for _, _, role in alone} == {" ".join(role) for role in ROLES}

    async def one(variable: str, url: str, command: list[str]) -> tuple[int | None, str, str]:
        env = {**os.environ, variable: url, "QUEUEGATE_METRICS_PORT": "0"}
        code, stderr, stdout = await _failed_cli(env, *command)
        return code, stderr, stdout.decode()

    # When each starts
    results = await asyncio.gather(_each_in_turn(runs), *(one(*run) for run in alone))
    in_turn, processes = results[0], results[1:]

    # Expect each stopped at once with one line naming the variable, and no piece of password
    for (variable, url, command), (code, stderr, stdout) in [
        *zip(runs, in_turn, strict=True),
        *zip(alone, processes, strict=True),
    ]:
        where = f"{' '.join(command)} with {variable}={url}: {stderr}"
        assert code == 1 and stdout == "", where
        assert stderr.startswith(f"error: invalid {variable}: ") and stderr.count("\n") == 1, where
        assert "Sek" not in stderr and "r1tA" not in stderr, where


async def test_an_infinite_lease_stops_the_worker_in_one_line() -> None:
    env = {**os.environ, "QUEUEGATE_CLAIM_LEASE": "inf", "QUEUEGATE_METRICS_PORT": "0"}
    code, stderr, stdout = await _failed_cli(env, "worker")
    assert code == 1 and stdout == b""
    assert stderr.splitlines() == [
        "error: invalid QUEUEGATE_CLAIM_LEASE: Input should be a finite number: correct it and "
        "run again"
    ]


async def test_a_password_in_a_urls_query_is_hidden_too() -> None:
    # Given a database URL whose password is also given as libpq reads it, in the query, on a
    # port nothing listens on
    url = "postgresql://u:Zq9SekrD@127.0.0.1:1/test?password=Zq9SekrE&application_name=qg"
    assert redact_url(url) == (
        "postgresql://u:***@127.0.0.1:1/test?password=***&application_name=qg"
    )
    # When a command cannot reach it
    code, line, _ = await _failed_cli(
        {**os.environ, "QUEUEGATE_DATABASE_URL": url}, "teams", "list"
    )
    # Expect one line naming it without either password
    assert code == 1 and "Zq9Sekr" not in line and "PostgreSQL" in line, line


async def test_a_lone_userinfo_is_hidden_from_the_unreachable_message() -> None:
    # Given a database URL whose only userinfo is a password written without its user, on a
    # port nothing listens on
    url = "postgresql://Zq9SekrL@127.0.0.1:1/test"
    # When a command cannot reach it
    code, line, _ = await _failed_cli(
        {**os.environ, "QUEUEGATE_DATABASE_URL": url}, "teams", "list"
    )
    # Expect one line naming where, without it
    assert code == 1 and "postgresql://***@127.0.0.1:1/test" in line, line
    assert "Zq9SekrL" not in line, line
