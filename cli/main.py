"""The ``queuegate`` command: every role of the gateway, and the tools operators use."""

from __future__ import annotations

import errno
import inspect
import logging
import os
import re
import select
import socket
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from cli.audit import audit_app
from cli.batch import batch_app
from cli.console import err, to_devnull
from cli.dlq import dlq_app
from cli.entry import UNTIL_STOPPED
from cli.keys import admin_key_app
from cli.replies import replies_app
from cli.reports import deployments, status, usage
from cli.roles import accounting, api, demo, migrate, mock_provider, worker
from cli.submit import submit
from cli.teams import teams_app
from queuegate.errors import GatewayError, StartRefused
from queuegate.runtime import configure_logging
from queuegate.settings import Settings, settings_problem
from queuegate.visible import clipped, clipped_path, visible


class _Commands(TyperGroup):
    """Every command, ended quietly with status 0 when its reader closes stdout, as unix tools
    end (``status --watch --json | head -1``, ``usage --csv | head``): click's own handling
    of a broken pipe exits 1."""

    def invoke(self, ctx: Any) -> Any:  # typer's vendored click.Context, which is private
        try:
            try:
                return super().invoke(ctx)
            finally:
                # What it left in a buffered stdout (a pipe's, unless PYTHONUNBUFFERED), sent
                # here: at Python's exit a reader gone failed it, status 120, said on stderr.
                sys.stdout.flush()
        except BrokenPipeError:
            if not _stdout_closed():
                raise  # a service's connection, not the reader: said as any failure is
            to_devnull(sys.stdout)
            sys.exit(0)


def _stdout_closed() -> bool:
    """Whether stdout's reader is gone (the write end of a pipe no one reads polls as an
    error)."""
    poll = select.poll()
    poll.register(sys.stdout.fileno(), select.POLLOUT)
    return any(events & select.POLLERR for _, events in poll.poll(0))


app = typer.Typer(
    cls=_Commands,
    help="queuegate: a queue-based LLM gateway.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(teams_app, name="teams")
app.add_typer(audit_app, name="audit")
app.add_typer(dlq_app, name="dlq")
app.add_typer(batch_app, name="batch")
app.add_typer(admin_key_app, name="admin-key")
app.add_typer(replies_app, name="replies")
for command in (
    worker,
    api,
    accounting,
    migrate,
    mock_provider,
    submit,
    usage,
    status,
    deployments,
):
    app.command()(command)
app.command()(demo)


def main() -> None:
    _stand_in_for_closed_output(serves=sys.argv[1:2] != [] and sys.argv[1] in UNTIL_STOPPED)
    # One-shot commands say what went wrong in one line of their own; long-running ones
    # (worker, accounting) configure logging again at the level they are given.
    configure_logging("warning", libraries=logging.CRITICAL)
    try:
        # Not standalone: typer's click then raises its usage errors (bad options and
        # arguments) rather than drawing them in a boxed panel over several lines.
        code = app(standalone_mode=False)
    except typer.TyperException as exc:
        # click's errors (typer vendors click; TyperException is their public base): a usage
        # error, exit 2, or one a command raised. Typer matches this one by name too.
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.exit(exc.exit_code)  # its help was printed as it was made
        _fail(_usage_line(exc), exit_code=exc.exit_code)
    except typer.Abort:  # a confirmation answered no
        _fail("aborted: nothing was changed")
    except StartRefused as exc:
        _fail(str(exc), exit_code=exc.status)
    except GatewayError as exc:
        _fail(str(exc))
    except Exception as exc:
        message = _one_line(exc)
        if message is None:
            raise
        _fail(message)
    else:
        # What a typer.Exit raised by a command (or Ctrl-C, 130) asks for; a command's own
        # return value is None.
        if isinstance(code, int) and code:
            sys.exit(code)


def _fail(message: str, *, exit_code: int = 1) -> None:
    from rich.markup import escape

    line = " ".join(visible(message).split())  # a message of several lines made one
    err.print(f"[red]error:[/] {escape(line)}", highlight=False)
    sys.exit(exit_code)


_QUOTED = re.compile(
    r"'(?P<quoted>[^']*)'|\((?P<listed>[^()']*)\)|(?<=: )(?P<dashes>--?)(?P<option>\S+)"
)
"""A value click's (and typer's) own usage errors repeat: quoted (``'<value>' is not one of
...``), listed (``Got unexpected extra argument (<value>)``), or an option not taken (``No
such option: --<value>``)."""


def _clipped(value: re.Match[str]) -> str:
    quoted, listed, dashes, option = value.group("quoted", "listed", "dashes", "option")
    if quoted is not None:
        return f"'{clipped(quoted)}'"
    return f"({clipped(listed)})" if listed is not None else f"{dashes}{clipped(option)}"


def _usage_line(exc: typer.TyperException) -> str:
    """A usage error with the help that shows the command's options and arguments; a value
    it quotes clipped, as ours are (the help it points to comes last)."""
    context: typer.Context | None = getattr(exc, "ctx", None)  # a usage error's
    command = "queuegate" if context is None else context.command_path
    message = _QUOTED.sub(_clipped, exc.format_message())
    return f"{message.rstrip('.')}: see {command} --help"


def _one_line(exc: Exception) -> str | None:
    """What an error of a library says, with what to do, or None for a bug (its traceback
    is then the useful output). The messages name no URL: those may carry passwords."""
    import aio_pika.exceptions
    import aiormq.exceptions
    import asyncpg
    import httpx
    import pydantic
    import redis.exceptions

    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, pydantic.ValidationError) and exc.title == Settings.__name__:
        return settings_problem(exc)
    if isinstance(exc, pydantic.ValidationError):
        problem = exc.errors()[0]
        # A job's parameters are options of their own here (--max-tokens), not a "params".
        loc = problem["loc"][1:] if problem["loc"][:1] == ("params",) else problem["loc"]
        field = ".".join(str(part) for part in loc) or "input"
        return f"invalid {field}: {problem['msg']}: correct it and run the command again"
    if isinstance(exc, aiormq.exceptions.AMQPError | aio_pika.exceptions.AMQPException):
        return (
            f"RabbitMQ refused the request ({type(exc).__name__}: {first}): fix what it names "
            "(queuegate status and the management UI show the broker's state)"
        )
    if isinstance(exc, httpx.HTTPError):
        return (
            f"the RabbitMQ management API failed ({type(exc).__name__}: {first}): check that "
            "it answers at QUEUEGATE_MANAGEMENT_URL"
        )
    if isinstance(exc, asyncpg.DataError):  # a value given, not the schema or the service
        return (
            f"PostgreSQL refused a value ({type(exc).__name__}: {first}): give the option "
            "that holds it a value in range"
        )
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
        return (
            f"PostgreSQL refused the request ({type(exc).__name__}: {first}): run queuegate "
            "migrate if the schema is missing, or check QUEUEGATE_DATABASE_URL"
        )
    if isinstance(exc, redis.exceptions.RedisError):
        return f"Redis failed ({type(exc).__name__}: {first}): check QUEUEGATE_REDIS_URL"
    if isinstance(exc, ConnectionError | TimeoutError | socket.gaierror):
        return f"a service is not reachable ({first}): start it (make services)"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return f"{first}: another process listens on that port; set --port to a free port"
    if isinstance(exc, OSError) and exc.filename is not None:  # a path given, at any length
        return f"{exc.strerror}: {clipped_path(exc.filename)}: check the file or permission"
    if isinstance(exc, OSError):
        return f"{first}: check the file or permission it names"
    return None


def _paragraphs_on_one_line(commands: typer.Typer) -> None:
    """Help text is wrapped at the source's width, and rich keeps those line breaks when it
    wraps again at the terminal's, cutting sentences into stubs: each paragraph of every
    command's help becomes one line, which rich alone wraps."""
    for command in commands.registered_commands:
        callback = command.callback
        if callback is not None and callback.__doc__:
            paragraphs = inspect.cleandoc(callback.__doc__).split("\n\n")
            callback.__doc__ = "\n\n".join(" ".join(p.split()) for p in paragraphs)
    for group in commands.registered_groups:
        if group.typer_instance is not None:
            _paragraphs_on_one_line(group.typer_instance)


_paragraphs_on_one_line(app)


def _stand_in_for_closed_output(*, serves: bool) -> None:
    """A stand-in on a standard descriptor the command was started without (``>&-``): else
    the next file opened takes the free number, and uvloop, finding a socket at 1, aborted the
    process (SIGABRT, exit 134). Stdout's is a pipe whose reader is gone: the command ends at
    its first output, quietly with status 0, as when its reader closed it (``status --watch``
    into /dev/null would never end); but for a command that ``serves`` until stopped, whose
    first line (its address) would end it before it served: /dev/null, as stdin's and
    stderr's. Python found no stream there and set it None: it gets one again."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            if fd == 1 and not serves:
                reader, writer = os.pipe()
                ends = {reader, writer}
            else:
                writer = os.open(os.devnull, os.O_RDWR)
                ends = {writer}
            os.dup2(writer, fd)  # over the end that took the free number, if one did
            for end in ends - {fd}:
                os.close(end)
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115 (the process's own)
