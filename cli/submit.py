"""``queuegate submit``: one job through the queue, its reply printed."""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from cli.console import err, out
from cli.options import ApiKey, make_settings, read_password, seconds
from queuegate.messages import MAX_OUTPUT_TOKENS
from queuegate.numbers import usd_text
from queuegate.runtime import run
from queuegate.visible import visible

if TYPE_CHECKING:
    from queuegate.settings import Settings

REDIS_ASKED_WITHIN = 2.0
"""Seconds a submit that got no answer asks Redis whether it is the cause: a caller's
--timeout has passed already."""


def submit(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    team: Annotated[str, typer.Option(help="The team the job is for.")],
    model: Annotated[str, typer.Option(help="A model alias from the catalog.")] = "gpt-4o-mini",
    max_tokens: Annotated[
        int | None, typer.Option(help=f"Output tokens at most, 1 to {MAX_OUTPUT_TOKENS:,}.")
    ] = None,
    timeout: Annotated[
        float, typer.Option(callback=seconds, help="Seconds to wait for the result.")
    ] = 60.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole result.")] = False,
    user: Annotated[
        str | None,
        typer.Option(help="Broker user to publish as (default: the team's, <namespace>.<team>)."),
    ] = None,
    password_stdin: Annotated[
        bool,
        typer.Option(
            "--password-stdin",
            help="Read that user's password from stdin (or set QUEUEGATE_TEAM_PASSWORD).",
        ),
    ] = False,
    api_key: ApiKey = None,
) -> None:
    """Publish one job and print its reply (a worker must be running).

    A team added with teams add (broker identity) publishes as its own broker user: give its
    password in QUEUEGATE_TEAM_PASSWORD or with --password-stdin. An api_key team passes its
    key. Otherwise the job goes out as the user of QUEUEGATE_AMQP_URL.
    """
    from rich.markup import escape

    from admin.teams import with_user
    from producer import GatewayClient
    from queuegate.errors import ControlRefused, ResultTimeout, ServiceUnavailable, TeamDisabled
    from queuegate.signing import PASS_API_KEY
    from queuegate.tenancy import broker_user

    settings = make_settings()
    password = read_password() if password_stdin else os.environ.get("QUEUEGATE_TEAM_PASSWORD")
    if password:
        publisher = user or broker_user(settings.namespace, team)
        settings = settings.model_copy(
            update={"amqp_url": with_user(settings.amqp_url, publisher, password)}
        )
    elif user is not None:
        raise typer.BadParameter("--user needs a password: QUEUEGATE_TEAM_PASSWORD or stdin")

    client = GatewayClient(settings, team=team, api_key=api_key)
    params: dict[str, Any] = {} if max_tokens is None else {"max_tokens": max_tokens}
    # Built first: a job the gateway would refuse is told before anything connects.
    job = client.job(model, [{"role": "user", "content": prompt}], **params)

    published = False

    async def go() -> Any:
        nonlocal published
        # The whole command within --timeout: opening the client waits on the gateway's Redis
        # (about 4 x QUEUEGATE_REDIS_TIMEOUT when it hangs), which the caller did not ask for.
        async with asyncio.timeout(timeout), client:
            handle = await client.submit(job)
            published = True
            return await handle.result(timeout)

    as_team = (
        ": to publish as the team, set QUEUEGATE_TEAM_PASSWORD (or pipe the password "
        f"to --password-stdin), or for an api_key team {PASS_API_KEY}"
    )
    try:
        result = run(go)
    except ControlRefused as exc:  # the gateway would not open a reply queue for this user
        hint = "" if password or api_key or isinstance(exc, TeamDisabled) else as_team
        err.print(f"[red]unauthorized:[/] {escape(visible(str(exc)))}{hint}", highlight=False)
        raise typer.Exit(1) from exc
    except (ServiceUnavailable, ResultTimeout, TimeoutError) as exc:
        _say_why(settings, exc, published=published, timeout=timeout)
    if as_json:
        out.print_json(result.model_dump_json())
    elif result.status == "ok":
        out.print(result.content or "", highlight=False)
        g = result.gateway
        err.print(
            f"[dim]{g.model_used} via {g.provider}/{g.deployment}"
            f"{' (fallback)' if g.fallback_used else ''}, {g.latency_ms:.0f} ms, "
            f"${usd_text(g.cost_usd)}[/]"
        )
    else:
        assert result.error is not None
        unauthorized = result.error.code == "unauthorized"
        hint = as_team if unauthorized and not (password or api_key) else ""
        message = escape(visible(result.error.message))
        err.print(f"[red]{result.error.code}:[/] {message}{hint}", highlight=False)
        raise typer.Exit(1)


def _say_why(settings: Settings, exc: Exception, *, published: bool, timeout: float) -> NoReturn:
    """End a submit that got no answer: in one line naming Redis when it is the cause (workers
    hold a job while Redis does not answer: its limits and claims live there), not the workers."""
    from rich.markup import escape

    from queuegate.errors import ResultTimeout, ServiceUnavailable
    from queuegate.services import check_redis

    try:
        run(lambda: check_redis(settings, within=REDIS_ASKED_WITHIN))
    except ServiceUnavailable as down:
        then = "the job waits in its queue until it answers" if published else "nothing was sent"
        err.print(f"[red]error:[/] {escape(visible(f'{down}: {then}'))}", highlight=False)
        raise typer.Exit(1) from exc
    if isinstance(exc, TimeoutError):
        what = "no result" if published else "the job was not sent"
        raise ResultTimeout(
            f"{what} within {timeout:g} s: check the workers (queuegate status)"
        ) from exc
    raise exc
