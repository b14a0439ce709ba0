"""``queuegate teams``: register, list, show, configure and disable teams; their credentials."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from cli.console import err, out
from cli.keys import keys_table, show_key
from cli.options import TeamName, make_settings, read_password
from queuegate.db import CONNECT_TIMEOUT
from queuegate.errors import ConfigError
from queuegate.messages import UnsupportedParams
from queuegate.runtime import exit_at_once, run
from queuegate.settings import Settings
from queuegate.signing import PASS_API_KEY
from queuegate.urls import redact_url
from queuegate.visible import clipped

if TYPE_CHECKING:
    from admin.teams import Storing

T = TypeVar("T")

teams_app = typer.Typer(
    help="Register, list, show, configure and disable teams.", no_args_is_help=True
)

NOT_CONFIRMED = 3
"""The exit status of a change stored but not confirmed in force by every live worker: a
script tells it from a change refused (1), and may go on, or wait and check again."""
Wait = Annotated[
    float,
    typer.Option(
        min=0,
        max=600,
        help="Seconds to wait until every live worker serves under the change (0: do not "
        f"wait); past them, exit {NOT_CONFIRMED} naming the workers that did not confirm.",
    ),
]
STORE_WAIT = CONNECT_TIMEOUT
"""Seconds a change may take to be stored (PostgreSQL, and the management API for what the
broker enforces), as long as a connection to PostgreSQL may take: asyncpg bounds its
connects alone, and a server that takes a connection and never answers would hold the
command forever."""
LATE_EXIT = 0.5
"""Seconds past a bound the command still waits for its steps to end by themselves (they
are bounded too) before it ends at once, leaving them: a connection's graceful close waits
for a service that may never answer."""


async def _ended(work: Awaitable[T], within: float, late: str, status: int) -> T:
    """``work``'s result if it ends within ``within`` seconds; else ``late`` said in one line,
    and the process ended at once with ``status`` (see ``LATE_EXIT``)."""
    task = asyncio.ensure_future(work)
    if not (await asyncio.wait({task}, timeout=within))[0]:
        err.print(late, markup=False, highlight=False)
        exit_at_once(status)
    return task.result()


def _store(name: str, wait: float, store: Callable[[Storing], Awaitable[T]]) -> T:
    """``store``'s result, run within ``STORE_WAIT`` until the change is stored, then within
    the ``wait`` (``Storing.within``: Redis's part after the store, before the confirmation's
    own wait). Ended at once past them: with status 1, saying whether the change may have
    landed; with ``NOT_CONFIRMED`` once it is stored, which a step after it failing exits
    with too (``StoredUnconfirmed``)."""
    from admin.teams import StoredUnconfirmed, Storing
    from queuegate.services import REDIS_CHECK_WAIT

    storing = Storing(within=min(wait, REDIS_CHECK_WAIT) or REDIS_CHECK_WAIT)

    async def bounded() -> T:
        task = asyncio.ensure_future(store(storing))
        stored = asyncio.ensure_future(storing.stored.wait())
        await asyncio.wait({task, stored}, timeout=STORE_WAIT, return_when=asyncio.FIRST_COMPLETED)
        stored.cancel()
        if not storing.stored.is_set() and not task.done():
            said = (
                "may or may not be stored: PostgreSQL did not confirm its commit within "
                f"{STORE_WAIT:g} s; once it answers, see which with queuegate teams show {name}"
                if storing.sent
                else "is NOT stored: PostgreSQL (or the broker) did not answer within "
                f"{STORE_WAIT:g} s; run the same command again once it answers"
            )
            err.print(f"team {name}: the change {said}", markup=False, highlight=False)
            exit_at_once(1)
        late = (
            f"team {name}: the change is stored, but PostgreSQL or Redis did not answer "
            f"within {storing.within:g} s after it; each worker applies it when it next reads "
            "the registry"
        )
        return await _ended(task, storing.within + LATE_EXIT, late, NOT_CONFIRMED)

    try:
        return run(bounded)
    except StoredUnconfirmed as exc:
        err.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(NOT_CONFIRMED) from None


def _confirm(settings: Settings, name: str, change: int | None, wait: float) -> None:
    """Say when ``change`` is in force on every live worker, or exit ``NOT_CONFIRMED`` naming
    those that did not confirm it within ``wait`` seconds (``admin.teams.in_force``), ending
    then whatever Redis or PostgreSQL does."""
    from admin.teams import in_force, reports_within
    from queuegate.errors import ServiceUnavailable

    if change is None or wait == 0:
        return
    looking = reports_within(settings, wait)

    def waiting(pending: int, workers: int) -> None:
        said = (
            f"waiting up to {wait:g} s for {pending} of {workers} workers to apply the change"
            if workers
            else f"no live worker found yet; waiting up to {looking:g} s for workers to "
            "report (Redis may have lost their live entries)"
        )
        err.print(f"team {name}: {said}", markup=False, highlight=False)

    late = (
        f"team {name}: the change is stored, but no worker's confirmation was read within "
        f"{wait:g} s: Redis or PostgreSQL did not answer in time"
    )
    try:
        confirmed = run(
            lambda: _ended(
                in_force(settings, change, wait, waiting), wait + LATE_EXIT, late, NOT_CONFIRMED
            )
        )
    except ServiceUnavailable as exc:
        err.print(f"team {name}: {exc}", markup=False, highlight=False)
        raise typer.Exit(NOT_CONFIRMED) from None
    workers, pending = len(confirmed.workers), confirmed.pending
    if pending:
        err.print(
            f"team {name}: the change is stored, but {len(pending)} of {workers} live workers "
            f"did not confirm serving under it within {wait:g} s: {', '.join(pending)} "
            "(stalled, dead, cut off from PostgreSQL or Redis, or of an earlier version); "
            "each applies it when it next reads the registry",
            markup=False,
            highlight=False,
        )
        raise typer.Exit(NOT_CONFIRMED)
    if workers:
        out.print(f"team {name}: in force on every live worker ({workers})", highlight=False)
    elif confirmed.connected == 0:
        out.print(f"team {name}: no worker is running; each reads it as it starts", highlight=False)
    else:
        connected = (
            f"PostgreSQL at {redact_url(settings.database_url)} did not answer in time whether "
            "any runs"
            if confirmed.unanswered
            else "PostgreSQL could not tell whether any runs"
            if confirmed.connected is None
            else f"PostgreSQL holds {confirmed.connected} of the namespace's worker "
            "connections (stalled, draining, or cut off from Redis)"
        )
        err.print(
            f"team {name}: the change is stored, but no worker reported serving under it "
            f"within {confirmed.looked:g} s, and {connected}; each applies it when it next "
            "reads the registry",
            markup=False,
            highlight=False,
        )
        raise typer.Exit(NOT_CONFIRMED)


@teams_app.command("add")
def teams_add(
    name: TeamName,
    identity: Annotated[
        str | None,
        typer.Option(
            help="How workers know a job is the team's: broker (its own RabbitMQ user, the "
            "default), api_key (a key in a header) or queue (whoever can publish to its queue)."
        ),
    ] = None,
    password_stdin: Annotated[
        bool,
        typer.Option(
            "--password-stdin", help="Give a broker team's user the password read from stdin."
        ),
    ] = False,
    wait: Wait = 5.0,
) -> None:
    """Register a team, create its queue and its credentials; for a team that exists, enable
    it and repair what is missing, but never change its credentials. Then wait until every
    live worker serves it."""
    from admin.teams import register

    password = read_password() if password_stdin else None
    settings = make_settings()
    added = _store(
        name,
        wait,
        lambda storing: register(
            settings,
            name,
            identity=_identity(identity) if identity else None,
            password=password,
            storing=storing,
        ),
    )
    if added.created:
        out.print(f"team {name} is registered; workers serve it within seconds")
    else:
        again = " and is enabled again" if added.enabled_again else ""
        if added.credentials.password is not None:
            state = f"its broker user {added.credentials.user} was missing and is made again"
        else:
            state = (
                "its credentials are unchanged "
                f"(new ones: queuegate teams rotate-credentials {name})"
            )
        out.print(f"team {name} exists{again}: {state}", highlight=False)
    if password is None:
        _show_credentials(added.credentials)
    elif added.credentials.password is not None:
        out.print(f"broker user: {added.credentials.user} (the password given)", highlight=False)
    _confirm(settings, name, added.change, wait)


@teams_app.command("list")
def teams_list(
    as_json: Annotated[
        bool, typer.Option("--json", help="Each team's limits, budget and security as JSON.")
    ] = False,
) -> None:
    """The registered teams."""
    from admin.teams import listing
    from queuegate.reporting import to_json

    teams = run(lambda: listing(make_settings()))
    if as_json:
        sys.stdout.write(to_json({"teams": [dataclasses.asdict(team) for team in teams]}))
        return
    for team in teams:
        out.print(f"{team.name}\t{'enabled' if team.enabled else 'disabled'}")


@teams_app.command("show")
def teams_show(
    name: TeamName,
    as_json: Annotated[bool, typer.Option("--json", help="The config as JSON.")] = False,
) -> None:
    """A team's limits, budget, quota and broker user limits."""
    from admin.teams import details, user_limits
    from queuegate.tables import team_table

    settings = make_settings()
    team, security = run(lambda: details(settings, name))
    if as_json:
        out.print_json(team.config.model_dump_json())
        return
    broker = None
    if security.broker_user is not None:
        limits = user_limits(settings, team.config)
        broker = (security.broker_user, limits.max_connections, limits.max_channels)
    out.print(team_table(team, broker))


_MODEL_HELP = (
    "Per-model limits, repeatable: ALIAS:rpm=N,tpm=N,burst=N,budget=USD, each set over the "
    "alias's others (budget= empty clears that one; ALIAS: clears them all)."
)


@teams_app.command("set")
def teams_set(
    name: TeamName,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens per minute.")] = None,
    burst: Annotated[
        int | None,
        typer.Option(help="Requests that may start at once (default: 5 s of rpm)."),
    ] = None,
    budget: Annotated[str | None, typer.Option(help="Monthly budget, USD.")] = None,
    alert_threshold: Annotated[
        float | None, typer.Option(help="Budget fraction that alerts, e.g. 0.8.")
    ] = None,
    max_queue: Annotated[int | None, typer.Option(help="Jobs the queue holds at most.")] = None,
    max_queue_bytes: Annotated[
        str | None,
        typer.Option(help="Bytes of jobs the queue holds at most: 268435456, 256MiB, 1GiB."),
    ] = None,
    max_connections: Annotated[
        int | None, typer.Option(help="Connections its broker user may hold at once.")
    ] = None,
    max_channels: Annotated[
        int | None, typer.Option(help="Channels its broker user may hold at once.")
    ] = None,
    file_storage: Annotated[
        int | None,
        typer.Option(
            help="Bytes of batch files it may keep stored over HTTP (uploads refused past it)."
        ),
    ] = None,
    expected_output: Annotated[
        int | None, typer.Option(help="Output tokens reserved when a job sets no max_tokens.")
    ] = None,
    model: Annotated[list[str] | None, typer.Option(help=_MODEL_HELP)] = None,
    cache: Annotated[
        bool | None,
        typer.Option(
            "--cache/--no-cache",
            help="Use the response cache for jobs that do not say (a job's cache flag wins).",
        ),
    ] = None,
    unsupported_params: Annotated[
        UnsupportedParams | None,
        typer.Option(help="Parameters a provider cannot take: refuse (the default) or drop."),
    ] = None,
    unset: Annotated[
        list[str] | None,
        typer.Option(help="Fields to clear, repeatable or comma-separated (e.g. rpm,budget_usd)."),
    ] = None,
    wait: Wait = 5.0,
) -> None:
    """Change a team's limits, budget, queue quota, broker user limits, cache default or
    parameter policy; the broker applies it as it is stored, workers and front doors when
    told of it, and the command waits until every live worker serves under it."""
    from admin.teams import Configured, configure, stored_models

    settings = make_settings()
    changes: dict[str, Any] = {
        k: v
        for k, v in {
            "rpm": rpm,
            "tpm": tpm,
            "burst": burst,
            "budget_usd": budget,
            "alert_threshold": alert_threshold,
            "max_queue_length": max_queue,
            "max_queue_bytes": None if max_queue_bytes is None else _size(max_queue_bytes),
            "max_connections": max_connections,
            "max_channels": max_channels,
            "file_storage_bytes": file_storage,
            "expected_output_tokens": expected_output,
            "cache": cache,
            "unsupported_params": unsupported_params,
        }.items()
        if v is not None
    }
    cleared = _cleared(unset or [])
    if both := sorted(cleared.keys() & changes.keys()):
        raise typer.BadParameter(f"{', '.join(both)}: both set and --unset; give one or the other")
    changes |= cleared
    limits = _model_limits(model) if model else None
    if limits:
        _check_aliases(settings, [alias for alias, fields in limits.items() if fields])

    async def store(storing: Storing) -> Configured:
        if limits:
            changes["models"] = _merged(await stored_models(settings, name), limits)
        return await configure(settings, name, changes, storing)

    configured = _store(name, wait, store)
    if configured.replaced is not None:
        err.print(
            f"team {name}: its stored config was {configured.replaced}, not an object, "
            "and is replaced by what is set",
            highlight=False,
        )
    config = configured.config.model_dump_json(exclude_defaults=True)
    out.print(f"team {name}: {config}", highlight=False)
    _confirm(settings, name, configured.change, wait)


def _cleared(fields: list[str]) -> dict[str, Any]:
    """``--unset`` values as changes: each field back to its default (None: no limit)."""
    from queuegate.registry import TeamConfig

    names = [name.strip() for value in fields for name in value.split(",") if name.strip()]
    known = TeamConfig.model_fields
    unknown = [name for name in names if name not in known]
    if unknown:
        raise typer.BadParameter(
            f"--unset {', '.join(map(clipped, unknown))}: no such field; "
            f"use one of {', '.join(known)}"
        )
    return {name: known[name].get_default(call_default_factory=True) for name in names}


_SIZE = re.compile(r"(\d+)\s*(|B|KiB|MiB|GiB)", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def _size(value: str) -> int:
    """Bytes from ``268435456``, ``256MiB`` or ``1GiB`` (binary units, any case)."""
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise typer.BadParameter(
            f"{clipped(value)!r}: give bytes, or a size such as 256MiB or 1GiB"
        )
    return int(match[1]) * _UNITS[match[2].lower()]


def _merged(stored: dict[str, Any], limits: dict[str, dict[str, str]]) -> dict[str, Any]:
    """The per-model limits ``limits`` makes of those ``stored``: each alias's fields set over
    its others (``rpm=`` empty clears that one alone: setting an alias's rpm dropped its budget
    cap silently), ``ALIAS:`` clearing them all."""
    models = dict(stored)
    for alias, fields in limits.items():
        kept = models.get(alias)
        merged = {**(kept if isinstance(kept, dict) and fields else {}), **fields}
        merged = {field: value for field, value in merged.items() if value != ""}
        if merged:
            models[alias] = merged
        else:
            models.pop(alias, None)
    return models


def _model_limits(specs: list[str]) -> dict[str, dict[str, str]]:
    limits: dict[str, dict[str, str]] = {}
    names = {"rpm": "rpm", "tpm": "tpm", "burst": "burst", "budget": "budget_usd"}
    for spec in specs:
        alias, colon, rest = spec.partition(":")
        if not alias.strip():
            # ":" alone cleared nothing and said nothing; ":rpm=5" blamed the catalog.
            raise typer.BadParameter(
                f"{clipped(spec)!r} names no model alias before the colon: use "
                "ALIAS:rpm=N,tpm=N,burst=N,budget=USD, or ALIAS: to clear the alias's limits"
            )
        if not colon:
            raise typer.BadParameter(
                f"{clipped(spec)!r} sets no limit: use "
                f"{clipped(alias)}:rpm=N,tpm=N,burst=N,budget=USD (any of them), "
                f"or {clipped(alias)}: to clear the alias's limits"
            )
        fields: dict[str, str] = {}
        for pair in filter(None, rest.split(",")):
            key, equals, value = pair.partition("=")
            if key not in names or not equals:
                raise typer.BadParameter(
                    f"{clipped(spec)!r}: use ALIAS:rpm=N,tpm=N,burst=N,budget=USD (any of "
                    "them; budget= empty clears that one)"
                )
            fields[names[key]] = value  # "" clears it (``_merged``)
        if alias in limits:
            # The last given alone was kept, the limits before it dropped with exit 0.
            raise typer.BadParameter(
                f"{clipped(alias)!r} is given twice: give each alias once, with all its "
                f"limits ({clipped(alias)}:rpm=N,budget=USD)"
            )
        limits[alias] = fields
    return limits


def _check_aliases(settings: Settings, aliases: list[str]) -> None:
    """ConfigError unless each alias is one of the catalog's: a limit set on another would
    never apply. Clearing one (``ALIAS:``) is let through: the catalog may have dropped it."""
    from router import load_catalog

    catalog = load_catalog(settings.catalog, os.environ)
    unknown = [alias for alias in aliases if alias not in catalog.models]
    if unknown:
        source = settings.catalog or "the bundled mock catalog (QUEUEGATE_CATALOG unset)"
        raise ConfigError(
            f"no model alias {', '.join(repr(clipped(a)) for a in unknown)} in {source}: "
            "aliases come from the catalog QUEUEGATE_CATALOG names; "
            f"pick one of {', '.join(sorted(catalog.models))}"
        )


@teams_app.command("disable")
def teams_disable(name: TeamName, wait: Wait = 5.0) -> None:
    """Stop serving a team; its queued jobs stay in its queue. Then wait until no live worker
    serves it."""
    from admin.teams import disable

    settings = make_settings()
    change = _store(name, wait, lambda storing: disable(settings, name, storing))
    if change is None:
        raise ConfigError(f"no team named {name}: list them with queuegate teams list")
    out.print(f"team {name} is disabled")
    _confirm(settings, name, change, wait)


_IDENTITIES = ("queue", "broker", "api_key")
_PII = ("off", "warn", "redact", "block")
_CAPTURE = ("none", "redacted", "full")


def _choice(value: str, choices: tuple[str, ...], option: str) -> Any:
    value = value.replace("-", "_")
    if value not in choices:
        raise typer.BadParameter(f"{option} must be one of {', '.join(choices)}")
    return value


def _identity(value: str) -> Any:
    return _choice(value, _IDENTITIES, "--identity")


def _show_credentials(credentials: Any) -> None:
    if credentials is not None and credentials.deleted_user is not None:
        # Its apps' connections close with it: say so, and where they publish now.
        out.print(
            f"broker user {credentials.deleted_user} is deleted: the team's apps publish under "
            "a broker user they share, which you give write on the team's entry exchange "
            "(README: Tenancy and security)",
            highlight=False,
            soft_wrap=True,
        )
    if credentials is None or (credentials.password or credentials.api_key) is None:
        return
    if credentials.identity == "broker":
        out.print(f"broker user: {credentials.user}", highlight=False, soft_wrap=True)
        out.print(f"password:    {credentials.password}", highlight=False, soft_wrap=True)
        out.print(
            f"for its apps: QUEUEGATE_AMQP_URL={credentials.amqp_url}",
            highlight=False,
            soft_wrap=True,
        )
    else:
        out.print(
            f"API key ({credentials.api_key_id}): {credentials.api_key}",
            highlight=False,
            soft_wrap=True,
        )
        out.print(
            "apps pass it as GatewayClient(..., api_key=...); "
            f"for the team commands (submit, batch, replies), {PASS_API_KEY}",
            soft_wrap=True,
        )
    err.print("[yellow]shown once: queuegate keeps no copy; rotate-credentials makes new ones[/]")


@teams_app.command("rotate-credentials")
def teams_rotate(name: TeamName) -> None:
    """New broker password or API key for the team; the old one stops working."""
    from admin.teams import rotate

    _show_credentials(run(lambda: rotate(make_settings(), name)))


@teams_app.command("security")
def teams_security(
    name: TeamName,
    identity: Annotated[str | None, typer.Option(help="queue, broker or api_key.")] = None,
    pii: Annotated[str | None, typer.Option(help="off, warn, redact or block.")] = None,
    capture: Annotated[
        str | None, typer.Option(help="Content kept in the audit log: none, redacted, full.")
    ] = None,
) -> None:
    """Show or change a team's identity mode, PII policy and content capture."""
    from admin.teams import set_security

    security, credentials = run(
        lambda: set_security(
            make_settings(),
            name,
            identity=_identity(identity) if identity else None,
            pii=_choice(pii, _PII, "--pii") if pii else None,
            capture=_choice(capture, _CAPTURE, "--capture") if capture else None,
        )
    )
    out.print(
        f"team {name}: identity {security.identity}, pii {security.pii}, "
        f"capture {security.capture}",
        highlight=False,
    )
    _show_credentials(credentials)


@teams_app.command("revoke-key")
def teams_revoke_key(name: TeamName, key_id: str) -> None:
    """Revoke one of the team's API keys; workers refuse it within their cache lifetime."""
    from admin.teams import revoke_key

    if not run(lambda: revoke_key(make_settings(), name, key_id)):
        raise ConfigError(
            f"team {name} has no live key {clipped(key_id)}: nothing revoked; its keys are "
            f"listed by queuegate teams keys {name}"
        )
    out.print(f"key {key_id} of team {name} is revoked")


@teams_app.command("add-key")
def teams_add_key(name: TeamName) -> None:
    """A new API key for the team, whatever its identity mode; its other keys stay live.
    Shown once, stored hashed."""
    from admin.keys import IssuedKey, add_team_key
    from queuegate.db import create_pool

    settings = make_settings()

    async def go() -> IssuedKey:
        async with await create_pool(settings) as pool:
            return await add_team_key(pool, name)

    issued = run(go)
    revoke = f"queuegate teams revoke-key {name} {issued.key_id}"
    show_key(f"API key of team {name}", issued, revoke)


@teams_app.command("keys")
def teams_keys(name: TeamName) -> None:
    """The team's API keys, live and revoked (never the keys themselves)."""
    from admin.keys import KeyInfo, team_keys
    from queuegate.db import create_pool

    settings = make_settings()

    async def go() -> list[KeyInfo]:
        async with await create_pool(settings) as pool:
            return await team_keys(pool, name)

    out.print(keys_table(run(go), title=f"API keys of team {name}"))
