"""Service URLs: checked as their clients will read them, and shown without their passwords.

A URL setting carries a password, so what is said of one quotes none of it unless it parsed
cleanly and its password is replaced: a password holding an unencoded ``/``, ``?``, ``#`` or
``@`` ends the URL's credentials early, and its pieces then land in the host, port or path,
where a client's own error (``Port could not be cast to integer value as '<password>'``)
would print them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import unquote, urlsplit, urlunsplit

from queuegate.visible import clipped

UNPARSABLE = "<unparsable URL>"
"""What a message shows of a URL it cannot be sure to show without its password."""


class UrlRefused(ValueError):
    """A client check's refusal in words that quote none of the URL: shown as it is, where any
    other error of a client is replaced by a general line (its message may quote a password)."""


ENCODE = "percent-encode a '/', '?', '#' or '@' in the user or password (%2F, %3F, %23, %40)"


def url_problem(
    url: str,
    schemes: tuple[str, ...] | None = None,
    *,
    several_hosts: bool = False,
    hostless: bool = False,
    client: Callable[[str], object] | None = None,
) -> str | None:
    """What is wrong with ``url``, in words quoting none of it (it may hold a password); None
    when nothing is. ``schemes``: those allowed (None: any). ``several_hosts``: its host part
    may list ``host:port`` comma-separated. ``hostless``: it may name no host (a local
    socket, given in its path or query). ``client``: the client's own parser, which raises
    on what it cannot read (its message is shown only when it is a ``UrlRefused``: any other
    may quote the password)."""
    scheme, sep, rest = url.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        example = f"{schemes[0] if schemes else 'SCHEME'}://USER:PASSWORD@HOST:PORT/"
        return f"it is not a URL: write it as {example}"
    if schemes is not None and scheme.lower() not in schemes:
        return f"its scheme is not {' or '.join(schemes)}"
    ends = [at for at in (rest.find(mark) for mark in "/?#") if at >= 0]
    netloc, after = rest[: min(ends, default=len(rest))], rest[min(ends, default=len(rest)) :]
    if "@" in after or netloc.count("@") > 1:
        return f"its password does not end where its host begins: {ENCODE}"
    hosts = netloc.rpartition("@")[2]
    entries = hosts.split(",") if several_hosts else [hosts]
    if hostless and entries == [""]:
        entries = []
    for number, entry in enumerate(entries, 1):
        try:
            node = urlsplit(f"//{entry.strip()}")
            valid = bool(node.hostname) and node.port != 0
        except ValueError:
            valid = False
        if not valid:
            which = f"host {number} of {len(entries)}" if len(entries) > 1 else "host"
            return (
                f"its {which} is not host or host:port with a port from 1 to 65535, or else "
                f"{ENCODE}"
            )
    if client is not None:
        try:
            client(url)
        except UrlRefused as refused:
            return str(refused)
        except Exception:  # its message may quote the password: say what to check instead
            return "its client cannot read it: check its port, path and query options"
    return None


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs (several hosts or one): a user is
    shown only beside a password (``user:***@``), a lone userinfo not at all (``***@``);
    ``<unparsable URL>`` for a string whose password could not be told from the rest."""
    if url_problem(url, several_hosts=True, hostless=True) is not None:
        return UNPARSABLE
    parts = urlsplit(url)
    # libpq takes a password in the query too (?password=, ?sslpassword=): hide any option
    # whose name says it holds a secret.
    query = _SECRET_OPTION.sub(r"\1=***", parts.query)
    credentials, _, hosts = parts.netloc.rpartition("@")
    if parts.password is not None:
        user = clipped(credentials.partition(":")[0])  # its message a line, whatever its length
        netloc = f"{user}:***@{hosts}" if user else hosts
    else:
        # A userinfo without a colon is a user name to libpq and RabbitMQ but the password to
        # redis-cli (redis://SECRET@host), and whoever wrote it may have meant either: hidden
        # whatever the scheme, as the password of a user:password pair is.
        netloc = f"***@{hosts}" if credentials else hosts
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def redact_quoted(text: str, url: str) -> str:
    """``text``, a server's message about ``url``, with what ``redact_url`` hides of the URL's
    userinfo (its password, or a lone userinfo) replaced by ``***``: PostgreSQL's refusal
    quotes the user it was given (``role "SECRET" does not exist``)."""
    if url_problem(url, several_hosts=True, hostless=True) is not None:
        return text  # redact_url shows none of it: no userinfo to tell from the rest
    credentials = urlsplit(url).netloc.rpartition("@")[0]
    user, colon, password = credentials.partition(":")
    for secret in (password,) if colon else (user,):
        for form in (secret, unquote(secret)):  # the server quotes it decoded (%40 as @)
            if form:
                text = text.replace(form, "***")
    return text


_SECRET_OPTION = re.compile(r"(?i)(?<![^&;])([^&;=]*(?:pass|secret|token|key)[^&;=]*)=[^&;]*")
"""A query option whose name holds "pass", "secret", "token" or "key", and its value."""
