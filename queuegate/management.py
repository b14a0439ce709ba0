"""RabbitMQ's management HTTP API: users, permissions and policies, which AMQP cannot set.

Used by operators' commands (teams, quotas), never on a job's path::

    async with BrokerAdmin.of(settings) as admin:
        await admin.put_policy("quota-alpha", pattern="^ns\\.jobs\\.alpha$", definition={...})

Its URL is read in one place, ``ManagementApi``, for the workers' look at what the teams' reply
queues hold too (workers/held_results.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from queuegate.errors import ConfigError, GatewayError, ServiceUnavailable
from queuegate.urls import redact_url, url_problem

if TYPE_CHECKING:
    import ssl

    from queuegate.settings import Settings

TIMEOUT = 10.0
_SET_URL = "set QUEUEGATE_MANAGEMENT_URL to http://USER:PASSWORD@HOST:15672/ of an administrator"


@dataclass(frozen=True)
class ManagementApi:
    """A management URL as every client of the API reads it: where the API is and as whom."""

    root: str
    """``scheme://host:port/api/``: the URL's path, query and credentials left out."""
    user: str | None
    """The user the URL names, percent-decoded; None when it names none."""
    password: str | None
    """Its password, percent-decoded; None when the URL gives none."""
    display: str
    """The URL without its password, for messages."""

    @classmethod
    def of(cls, url: str) -> ManagementApi:
        parts = urlsplit(url)
        # The host as written, an IPv6 address in its brackets, with its port if it has one.
        host = parts.netloc.rpartition("@")[2] or "127.0.0.1"
        return cls(
            root=urlunsplit((parts.scheme or "http", host, "/api/", "", "")),
            user=unquote(parts.username) if parts.username else None,
            password=None if parts.password is None else unquote(parts.password),
            display=redact_url(url),
        )


@functools.cache
def _tls() -> ssl.SSLContext:
    """httpx's default TLS context (certifi's CAs, or ``SSL_CERT_FILE``/``SSL_CERT_DIR``), made
    once per process: httpx makes one for each client it opens, reading the CA bundle again,
    20-90 ms of every ``BrokerAdmin`` (a ``teams add`` opens several)."""
    import httpx

    return httpx.create_ssl_context()


def vhost_path(vhost: str) -> str:
    """``vhost`` as one segment of an API path (``/`` is ``%2F``)."""
    return quote(vhost, safe="")


class ManagementError(GatewayError):
    """The management API refused a request; the message says which and why."""


class BrokerAdmin:
    """The management API as the user named in ``url``; a URL without one is refused.

    No user means no fallback: guessing ``guest`` would act as whoever that is on the broker
    (or fail with a 401 that names nobody). ``Settings.management_url`` derives the URL from
    the AMQP one when it is not set.

    ``vhost`` is where its permissions, policies and queues are: the gateway's is the one of
    its AMQP URL (``of``). No default: one of ``/`` put a team's permissions and quota
    beside a gateway on another vhost, where its user could not connect and its queue had
    no bound.
    """

    @classmethod
    def of(cls, settings: Settings) -> BrokerAdmin:
        """The gateway's: its management URL, on the vhost of its AMQP URL."""
        return cls(settings.management_url, vhost=settings.vhost)

    def __init__(self, url: str, *, vhost: str) -> None:
        # Imported here, not with the module: a worker reads its URL with ManagementApi but
        # calls the API over aiohttp (workers/held_results.py), and httpx brings its command
        # line along (click, rich, pygments), megabytes of a process's memory.
        import httpx

        api = ManagementApi.of(url)
        self._display = api.display
        if api.user is None or api.password is None:
            raise ConfigError(f"the management URL {self._display} names no user: {_SET_URL}")
        self._user = api.user
        # Only the host and port reach httpx (the settings check the rest): one it cannot
        # read is said as the settings say a URL's problem, the URL shown without password.
        problem = url_problem(api.root, client=httpx.URL)
        if problem is not None:
            raise ConfigError(f"the management URL {self._display}: {problem}: {_SET_URL}")
        self._client = httpx.AsyncClient(
            base_url=api.root, auth=(api.user, api.password), timeout=TIMEOUT, verify=_tls()
        )
        self._vhost = vhost_path(vhost)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.aclose()

    async def _request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Any:
        import httpx

        try:
            response = await self._client.request(method, path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(
                f"RabbitMQ management API is not reachable at {self._display}: enable it "
                "(rabbitmq-plugins enable rabbitmq_management) or set QUEUEGATE_MANAGEMENT_URL"
            ) from exc
        if response.status_code == 404 and method in ("GET", "DELETE"):
            return None
        if response.status_code == 401:
            raise ManagementError(
                f"the management API at {self._display} refused user {self._user}: {_SET_URL}"
            )
        if response.status_code >= 400:
            reason = response.json().get("reason", response.text) if response.content else ""
            raise ManagementError(f"{method} {path}: {response.status_code} {reason}")
        return response.json() if response.content else None

    async def check_administrator(self) -> None:
        """Raise ServiceUnavailable unless the API answers and its user is an administrator
        (operator commands add broker users, which only an administrator may)."""
        try:
            me = await self._request("GET", "whoami")
        except ManagementError as exc:
            raise ServiceUnavailable(str(exc)) from exc
        tags = me.get("tags", []) if isinstance(me, dict) else []
        if "administrator" not in (tags.split(",") if isinstance(tags, str) else tags):
            raise ServiceUnavailable(
                f"the management API at {self._display} answers user {self._user}, who is no "
                f"administrator: rabbitmqctl set_user_tags {self._user} administrator, or "
                f"{_SET_URL}"
            )

    async def put_user(self, name: str, password: str, *, tags: str = "") -> None:
        await self._request(
            "PUT", f"users/{quote(name, safe='')}", {"password": password, "tags": tags}
        )

    async def delete_user(self, name: str) -> None:
        await self._request("DELETE", f"users/{quote(name, safe='')}")

    async def users(self) -> list[str]:
        """Every broker user, by name."""
        listed: list[dict[str, Any]] = await self._request("GET", "users?columns=name") or []
        return [user["name"] for user in listed]

    async def user_exists(self, name: str) -> bool:
        return await self._request("GET", f"users/{quote(name, safe='')}") is not None

    async def put_user_limit(self, user: str, limit: str, value: int) -> None:
        """Set one of the user's limits (``max-connections``, ``max-channels``), broker-wide."""
        await self._request(
            "PUT", f"user-limits/{quote(user, safe='')}/{quote(limit, safe='')}", {"value": value}
        )

    async def user_limits(self, user: str) -> dict[str, int]:
        """The user's limits the broker holds; empty when it holds none."""
        listed = await self._request("GET", f"user-limits/{quote(user, safe='')}") or []
        return {name: int(value) for entry in listed for name, value in entry["value"].items()}

    async def connections(self, user: str) -> list[str]:
        """The names of ``user``'s connections, as the broker last reported them.

        The list comes from the management statistics: a connection opened in the last few
        seconds (``collect_statistics_interval``, 5 s by default) may not be in it yet.
        """
        listed: list[dict[str, Any]] = await self._request("GET", "connections") or []
        return [c["name"] for c in listed if c.get("user") == user]

    async def close_connections(self, user: str, *, reason: str) -> int:
        """Close every listed connection of ``user`` (a new password does not end open ones)."""
        names = await self.connections(user)
        for name in names:
            await self.close_connection(name, reason=reason)
        return len(names)

    async def close_connection(self, name: str, *, reason: str) -> None:
        """Close one connection, by the name the broker lists it under."""
        # A 404 (it closed meanwhile) is not an error: _request answers None.
        await self._request(
            "DELETE", f"connections/{quote(name, safe='')}", headers={"X-Reason": reason}
        )

    async def put_permissions(self, user: str, *, configure: str, write: str, read: str) -> None:
        await self._request(
            "PUT",
            f"permissions/{self._vhost}/{quote(user, safe='')}",
            {"configure": configure, "write": write, "read": read},
        )

    async def permissions(self, user: str) -> dict[str, str] | None:
        """The user's ``configure``, ``write`` and ``read`` regexes in the vhost, or None."""
        found = await self._request("GET", f"permissions/{self._vhost}/{quote(user, safe='')}")
        return None if found is None else {k: found[k] for k in ("configure", "write", "read")}

    async def put_topic_permissions(
        self, user: str, *, exchange: str, write: str, read: str
    ) -> None:
        """Which routing keys the user may publish (write) to ``exchange``, as a regex."""
        await self._request(
            "PUT",
            f"topic-permissions/{self._vhost}/{quote(user, safe='')}",
            {"exchange": exchange, "write": write, "read": read},
        )

    async def delete_topic_permissions(self, user: str) -> None:
        """Remove every topic permission of the user in the vhost, of every exchange."""
        await self._request("DELETE", f"topic-permissions/{self._vhost}/{quote(user, safe='')}")

    async def put_policy(
        self,
        name: str,
        *,
        pattern: str,
        definition: dict[str, Any],
        priority: int = 0,
        apply_to: str = "queues",
    ) -> None:
        await self._request(
            "PUT",
            f"policies/{self._vhost}/{quote(name, safe='')}",
            {
                "pattern": pattern,
                "definition": definition,
                "priority": priority,
                "apply-to": apply_to,
            },
        )

    async def policy(self, name: str) -> dict[str, Any] | None:
        """The policy as the broker holds it (pattern, definition, priority), or None."""
        result: dict[str, Any] | None = await self._request(
            "GET", f"policies/{self._vhost}/{quote(name, safe='')}"
        )
        return result

    async def policies(self) -> list[dict[str, Any]]:
        """Every policy of the vhost as the broker holds it (name, pattern, definition)."""
        result: list[dict[str, Any]] = await self._request("GET", f"policies/{self._vhost}") or []
        return result

    async def delete_policy(self, name: str) -> None:
        await self._request("DELETE", f"policies/{self._vhost}/{quote(name, safe='')}")

    async def bound_queues(self, exchange: str) -> list[str]:
        """The queues bound to ``exchange``, each once, by name; none when it does not exist."""
        bindings: list[dict[str, Any]] = (
            await self._request(
                "GET", f"exchanges/{self._vhost}/{quote(exchange, safe='')}/bindings/source"
            )
            or []
        )
        return sorted({b["destination"] for b in bindings if b["destination_type"] == "queue"})

    async def queues(self) -> list[str]:
        """Every queue of the vhost, by name."""
        listed: list[dict[str, Any]] = (
            await self._request("GET", f"queues/{self._vhost}?columns=name") or []
        )
        return [queue["name"] for queue in listed]

    async def delete_queue(self, name: str) -> None:
        await self._request("DELETE", f"queues/{self._vhost}/{quote(name, safe='')}")

    async def queue(self, name: str) -> dict[str, Any] | None:
        """The queue's state as the broker reports it, or None when it does not exist."""
        result: dict[str, Any] | None = await self._request(
            "GET", f"queues/{self._vhost}/{quote(name, safe='')}"
        )
        return result
