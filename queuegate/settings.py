"""Typed settings from the environment (``QUEUEGATE_*``) or passed in; never read at import."""

from __future__ import annotations

import contextlib
import ipaddress
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from yarl import URL

from queuegate.broker import node_urls, vhost_of
from queuegate.messages import MAX_OUTPUT_TOKENS
from queuegate.redis_client import redis_connection
from queuegate.urls import url_problem

MAX_PORT = 65535
"""The last TCP port."""

METRICS_PORTS = {"worker": 9464, "accounting": 9463}
"""Each role's metrics port when ``metrics_port`` is unset: two, so that a worker and the
accounting started on one host with the defaults do not both take 9464 (the second stopped);
the accounting's below the worker's, whose ``--processes N`` take 9464 + i."""
DAY = 86_400.0
"""The longest a duration setting may be: a lease, wait or interval past a day is a typo, and
a value the clock cannot add to (1e300) would stop a process with an OverflowError."""
YEAR = 365 * DAY
"""The longest an unused queue may be kept (the broker's ``x-expires``)."""


class Settings(BaseSettings):
    """Where the services are and how a gateway process behaves.

    Build it once at start (``Settings()`` reads ``QUEUEGATE_*`` variables) and pass it down;
    tests build their own with a namespace, Redis prefix and database schema of their own.
    """

    model_config = SettingsConfigDict(
        env_prefix="QUEUEGATE_",
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,
        # "inf" and "nan" parse as floats, and no duration or interval means either: an
        # infinite lease or linger overflows the clock, or waits forever
        allow_inf_nan=False,
        # a renamed setting is read under its old name too (``validation_alias``); in code,
        # by its field's name
        populate_by_name=True,
    )

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    """The broker: one node, or a cluster's nodes comma-separated in the host part
    (``amqp://user:password@node-1:5672,node-2:5672,node-3:5672/``). A process connects to a
    random node and moves to another when its node is lost (``queuegate.broker.connect``)."""
    quorum_replicas: int | None = Field(default=None, ge=1)
    """Members of each quorum queue it declares (``x-quorum-initial-group-size``). Unset: the
    broker's default, every node of the cluster (one on a single node)."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_sentinels: str | None = None
    """Comma-separated ``host:port`` of Redis Sentinels. Set: every process reaches the
    primary Sentinel names for ``redis_master_name``, and follows it when Sentinel fails it
    over; ``redis_url`` then gives only the password, database and TLS (``rediss``). Set but
    naming none (an empty value a template left) is refused: it would silently put the
    processes on ``redis_url``, another Redis than the one the deployment meant."""
    redis_master_name: str = "mymaster"
    """The name the Sentinels monitor the primary under (their ``sentinel monitor``)."""
    redis_sentinel_password: str = ""
    """The Sentinels' own password (their ``requirepass``), when they have one."""
    redis_timeout: float = Field(default=5.0, gt=0, le=7.0)
    """Seconds a Redis command waits for its reply before it fails as Redis being unavailable
    (then it is sent again on a fresh connection, ``queuegate.redis_client.RETRIES`` times):
    a Redis that hangs (stopped, partitioned) must not hold a worker's jobs forever. Far above
    a loaded worker's slowest command (``python -m bench.redis_latency``: 0.45-0.81 s at most
    with prefetch 32 or 256, 2.7 s with 1,000).
    At most 7: every resend of a command then reaches Redis within the 30 s its once-only
    scripts remember a round trip (``workers.admission.scripts.ONCE_MS``)."""
    database_url: str = "postgresql://postgres@127.0.0.1:5432/test"
    management_url: str = ""
    """RabbitMQ's management API, for operator commands (users, quotas); never on a job's path.

    Unset: the AMQP URL's host and user on port 15672 (15671 for ``amqps``), so an operator
    who reaches the broker as an administrator needs nothing more.
    """

    operator_users: str = ""
    """Comma-separated broker users trusted as operators: a worker accepts a job one of them
    publishes (broker-validated ``user_id``) for the team whose queue it is on, and ``dlq
    replay`` re-publishes as one. Empty: the user of ``amqp_url`` alone."""

    frontdoor_users: str = ""
    """Comma-separated broker users the HTTP front door publishes under: a worker accepts a
    job one of them publishes (broker-validated ``user_id``) with a proof of one of the
    team's API keys, whatever the team's identity, and lets its result go to a front-door
    reply queue. Empty: the user of ``amqp_url`` alone (as for ``operator_users``)."""

    namespace: str = Field(default="queuegate", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """Prefix of every broker name and Redis key, so environments and test runs never collide."""
    database_schema: str = Field(default="queuegate", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    """The PostgreSQL schema of the gateway's tables (``queuegate migrate`` creates it)."""

    catalog: Path | None = None
    """The model catalog (YAML); the bundled mock catalog when unset."""

    prefetch: int = Field(default=32, ge=1, le=10_000)
    """Unacknowledged jobs a worker holds per team queue: one team can fill only these slots."""
    delivery_limit: int = Field(default=5, ge=1)
    """Failures a job may have before a worker dead-letters it (``delivery_limit``): its
    deliveries that died in a provider call (the claim records each call before it leaves) or
    that a worker returned to the queue on a failure, so at most ``delivery_limit + 1``. A
    worker's death returns the jobs merely waiting in it too: those are not failures."""
    shutdown_grace: float = Field(default=30.0, ge=0, le=DAY)
    """Seconds in-flight jobs get to finish on SIGTERM before the rest go back to the queue."""
    result_ttl: int = Field(default=7 * 24 * 3600, ge=60)
    """Seconds a finished job's result is kept, so a redelivery is answered without a new call."""
    claim_lease: float = Field(default=10.0, gt=0, le=DAY)
    """Seconds a job's claim outlives a worker that stops renewing it (it died or hangs):
    then another delivery of the job takes it over. Renewed every third of it meanwhile."""
    claim_wait: float = Field(default=30.0, gt=0, le=DAY)
    """Seconds a second delivery of a job waits for the first one's outcome before it goes
    back to its queue (never calling the provider while the first holds the job)."""
    cache_ttl: int = Field(default=3600, ge=1)
    """Seconds a cached response (jobs with ``cache`` set) is served again."""
    max_job_bytes: int = Field(default=1_048_576, ge=1024)
    """Largest request a job may carry (its model, messages and parameters, as compact JSON
    in UTF-8), whichever way it comes in: refused ``request_too_large`` (413) by the front
    door and in a batch, ``invalid_request`` by a worker, which takes a job up to
    ``request_limits.JOB_OWN_BYTES`` (4 KiB) larger for its own fields (id, team, metadata,
    deadline)."""
    max_job_messages: int = Field(default=256, ge=1)
    """Most messages one job may carry; more are answered ``invalid_request``."""
    security_cache_ttl: float = Field(default=5.0, gt=0, le=DAY)
    """Seconds a worker trusts its copy of teams' security settings and API keys: a revoked
    key or changed policy takes effect within this time."""
    reconnect_wait: float = Field(default=60.0, ge=0, le=DAY)
    """Seconds a publish waits for a lost broker connection to return before it fails."""
    dlq_lock_wait: float = Field(default=30.0, gt=0, le=DAY)
    """Seconds a ``queuegate dlq`` command waits for another one to end (``queuegate.dlq``:
    one reads the dead letters at a time) before it gives up."""
    reply_queue_expires: float = Field(default=300.0, ge=1, le=YEAR)
    """Seconds a client's reply queue outlives its client (a dropped connection included)."""
    results_queue_expires: float = Field(default=8 * 24 * 3600.0, ge=60, le=YEAR)
    """Seconds a durable results queue (a pipeline's, a batch's) is kept while nobody reads
    it: the broker deletes it, with what it holds, once unused this long."""
    reply_queue_max_length: int = Field(default=100_000, ge=1)
    """Unread results a reply or results queue holds at most: past it a team's refuses the
    next (the worker records it undelivered), a front door's drops its oldest (its caller
    has long given up, and reads the outcome by job id)."""
    reply_queue_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Bytes of unread result bodies each of a team's reply and results queues holds at most
    (the policy ``teams add`` and ``teams set`` put); past it the broker refuses the next
    result, which the worker records undelivered (``reply_delivered = false``), its outcome
    kept for the job sent again. 64 MiB holds some 20,000 results of 3 KB: a large batch
    collected after it ran."""
    reply_queues_per_team: int = Field(default=16, ge=1)
    """Reply and results queues a team may have at once (the gateway declares them). With
    ``reply_queue_max_bytes`` it bounds what a team that reads none of its results parks in
    the broker: 16 x 64 MiB, 1 GiB (100 queues, the earlier default, let one team hold
    6.4 GiB: twice the memory watermark of an 8 GiB node, whose alarm blocks every team's
    publishers).
    Each app process's GatewayClient holds one, each pipeline and uncollected batch one."""
    job_time_limit: float = Field(default=1500.0, gt=0, le=DAY)
    """Seconds a worker spends on one job at most, every provider call included. Keep it below
    RabbitMQ's ``consumer_timeout`` (30 min by default), or the broker takes the job back."""
    max_queue_length: int = Field(default=10_000, ge=1)
    """Jobs a team's job queue holds, unless ``teams set --max-queue`` says otherwise; past
    it the broker refuses the team's next job. The count bounds what ``max_queue_bytes``
    cannot: the broker's own cost per message, however small its body, and its headers
    (``max-length-bytes`` counts bodies only): at most ``frame_max`` each (16 KiB in
    deploy/), 156 MiB for 10,000 jobs. A larger batch is not refused: the front door's batch
    runners and ``queuegate batch submit`` pause on a full queue until workers make room."""
    max_queue_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    """Bytes of job bodies a team's job queue holds, unless ``teams set --max-queue-bytes``
    says otherwise; past it the broker refuses the team's next job (the producer's QueueFull).
    Without it one team parked 149 MiB of 1 MiB jobs in 3.7 s, raised the broker's memory
    alarm, and so blocked every publisher of every team. 256 MiB is a small share of a
    broker at RabbitMQ's default watermark (40 % of RAM: 3.2 GiB on an 8 GiB node; RabbitMQ
    3.10 keeps a quorum queue's messages in memory), about 250 jobs of the largest size a
    worker takes (``max_job_bytes``) and hundreds of thousands of typical ones. Keep the
    teams' bounds together below the watermark."""
    team_max_connections: int = Field(default=64, ge=1)
    """Connections a team's broker user may hold at once, unless ``teams set`` says otherwise:
    a RabbitMQ user limit, so one team cannot exhaust the broker's connections."""
    team_max_channels: int = Field(default=512, ge=1)
    """Channels a team's broker user may hold at once, over all its connections."""
    teams_refresh: float = Field(default=5.0, gt=0, le=DAY)
    """Seconds between reads of the team registry, so new teams are served without restart."""

    http_body_timeout: float = Field(default=30.0, gt=0, le=DAY)
    """Seconds the HTTP front door gives a request to send its whole body; a slower one is
    answered 408 (it holds only its own connection meanwhile, never a worker's slot)."""
    http_header_timeout: float = Field(default=5.0, gt=0, le=DAY)
    """Seconds a front-door connection has to send a request's headers whole, counted from
    when it opens or its request begins; a slower one is answered 408 and closed."""
    http_max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    """Largest request line and headers the front door reads; past it, 431 and closed."""
    http_max_connections: int = Field(default=4096, ge=1)
    """Connections one front-door process holds at once. Past it, a new connection closes
    another (``frontdoor.connections`` says which), or is answered 503 when every one is
    busy or has only just connected."""
    http_bodies_per_key: int = Field(default=16, ge=1)
    """Request bodies one API key may be sending to a front-door process at once, file uploads
    and Message Batches included; more are answered 429 before they are read."""
    http_keyless_bodies: int | None = Field(default=None, ge=1)
    """Request bodies sent before any key is proven (the dashboard's sign-in forms) one
    front-door process reads at once, from every address together; more are answered 429
    before they are read. Below ``http_max_connections``, so that they never hold every
    connection and keep the APIs' callers out; when unsaid, a quarter of it (at most 32)."""
    http_requests_per_team: int | None = Field(
        default=None,
        ge=1,
        validation_alias=AliasChoices(
            "QUEUEGATE_HTTP_REQUESTS_PER_TEAM", "QUEUEGATE_HTTP_REQUESTS_PER_KEY"
        ),
    )
    """Requests of one team, all its API keys together, a front-door process serves at once,
    counted from when the key is proven until the answer has left (a chat waiting for its
    job, a long-poll, a stream); more are answered 429 at once, before anything is published.
    Per team, not per key: a team may hold any number of keys. Below
    ``http_max_connections``, so that one team never holds every connection; when unsaid, a
    quarter of it (1024 of 4096: a pipeline of many concurrent requests fits). Read as
    ``QUEUEGATE_HTTP_REQUESTS_PER_KEY`` too, its name when it was counted per key."""
    http_keyless_requests: int | None = Field(default=None, ge=1)
    """Requests whose key is not (yet) proven that a front-door process serves at once, from
    every address together (health checks, /metrics, /openapi.json, the dashboard's pages);
    more are answered 429 at once and their connection closed. Below
    ``http_max_connections``; when unsaid, a quarter of it (at most 32)."""
    http_body_bytes_in_flight: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Bytes of request bodies one front-door process reads at once, counted by their
    Content-Length (``max_body_bytes`` when unsaid); more are answered 503 before they are
    read. At least ``max_body_bytes``."""
    http_body_bytes_per_team: int | None = Field(default=None, ge=1024)
    """Bytes of ``http_body_bytes_in_flight`` one team's bodies, all its API keys together,
    may take at once; more of that team's are answered 429 before they are read, so that no
    team takes the whole budget and has every other team's bodies answered 503. At least
    ``max_body_bytes``; when unsaid, a quarter of ``http_body_bytes_in_flight`` (16 MiB of
    64 MiB), or ``max_body_bytes`` if that is more."""
    http_trusted_proxies: str = ""
    """Comma-separated addresses or networks (``10.0.0.5,10.1.0.0/16``) of the proxies before
    the front door: a connection from one of them is taken to come from the address its
    ``X-Forwarded-For`` names (the right-most one not itself a trusted proxy), for the
    wrong-key count and the logs. Empty: ``X-Forwarded-For`` is ignored, and every client
    is the address it connects from, loopback included (anyone who can connect there could
    name any address: dodge its own lockout or have another address locked out)."""
    failed_key_limit: int = Field(default=20, ge=1)
    """Wrong API keys one client address may present (to the APIs or the dashboard's sign-in)
    in a ``failed_key_window``; past it, its lookups of keys never found live are answered
    429 until the window ends (``frontdoor.failed_keys``)."""
    failed_key_window: float = Field(default=60.0, gt=0, le=DAY)
    """Seconds over which ``failed_key_limit`` counts, from a client's first wrong key."""
    batch_file_max_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)
    """Largest file ``POST /v1/files`` stores, and largest Message Batch request body."""
    team_file_storage_bytes: int = Field(default=5 * 1024**3, ge=0)
    """Bytes of files (batch inputs, outputs, Message Batches) one team may keep stored in
    PostgreSQL, unless its ``teams set --file-storage`` says; an upload past it is refused."""
    batch_upload_timeout: float = Field(default=600.0, gt=0, le=DAY)
    """Seconds a batch file upload (or Message Batch body) may take to arrive whole."""
    batch_runner_lease: float = Field(default=30.0, gt=0, le=DAY)
    """Seconds a front-door process holds a batch without renewing it (it renews every
    second): after a crash, its batches are taken up by another process this much later."""
    batch_runners: int = Field(default=4, ge=1)
    """Batches one front-door process runs at once; more wait for a free runner, shared
    between the teams that wait (``frontdoor.batches.runner``)."""
    batch_runner_turn: float = Field(default=30.0, gt=0, le=DAY)
    """Seconds a collecting batch keeps its runner (from when it took it) while another team,
    holding one runner fewer, has a batch waiting: then it gives the runner over, and
    resumes later."""

    metrics_host: str = "0.0.0.0"
    """Address ``/metrics``, ``/healthz`` and ``/readyz`` listen on."""
    metrics_port: int | None = Field(default=None, ge=0, le=MAX_PORT)
    """Port of ``/metrics``, ``/healthz`` and ``/readyz`` in worker and accounting processes;
    unset, each role's own (``METRICS_PORTS``, read through ``metrics_port_of``)."""
    log_format: Literal["text", "json"] = "text"
    """Log lines of the long-running roles: human ``text``, or ``json``, one object per line
    with the job, team, trace and span it was logged for (``queuegate.logs``)."""
    trace_content: bool = False
    """Put prompts and answers into trace spans, for teams whose capture policy is ``full``
    (never for others). Traces themselves are switched on by the ``OTEL_*`` variables
    (``queuegate.tracing``)."""
    trace_heed_callers: bool = False
    """Make the context a caller sends (an HTTP request's ``traceparent``, a job's a team
    published) the parent of the gateway's spans: its trace id kept, its sampled flag
    heeded, as parent-based samplers do. Off: each job's trace is the gateway's own, its id
    drawn by the gateway and sampled by the operator's sampler (``OTEL_TRACES_SAMPLER``),
    linked to the caller's context, so no tenant can choose which of its jobs are traced or
    put them in another team's trace. On only where every caller is trusted."""
    stats_interval: float = Field(default=1.0, gt=0, le=DAY)
    """Seconds between a worker's writes of its live stats to Redis (read by ``status``)."""
    admission_max_wait: float = Field(default=600.0, gt=0, le=1200)
    """Seconds a job may wait for its buckets before it is answered ``rate_limited``.

    Capped well below RabbitMQ's consumer timeout (30 min on 3.10, counted from delivery, and
    closing the whole channel): wait + provider timeout + publishing must stay far inside it.
    """
    expected_output_tokens: int = Field(default=256, ge=1)
    """Output tokens reserved for a job that sets no ``max_tokens`` (a team may override it)."""
    unbounded_output_tokens: int = Field(default=4096, ge=1, le=MAX_OUTPUT_TOKENS)
    """Output tokens a job that sets no ``max_tokens`` is assumed able to reach: jobs are
    admitted beside such a job in flight only while its budget has room for it at that, and
    near the edge such a job is admitted only alone (``workers/admission/lua/spend.lua``)."""
    redis_outage: Literal["fail_closed", "fail_open"] = "fail_closed"
    """While Redis is unreachable: jobs wait for it (up to their deadline), or each worker
    admits from a local bucket holding its fair share of every limit."""
    admission_workers: int = Field(default=1, ge=1)
    """Worker processes that share each limit: a fail-open bucket holds 1/N of it, and
    per-team prefetch is sized from the share of the rate each worker gets."""

    accounting_batch: int = Field(default=500, ge=1, le=10_000)
    """Usage events accounting writes to PostgreSQL in one transaction at most (and acks
    together); it holds four batches' worth of deliveries unacknowledged."""
    accounting_linger: float = Field(default=0.05, ge=0, le=60)
    """Seconds accounting waits to fill a batch before writing what it has (at most a
    minute: usage held longer is usage the reports and budgets do not see)."""
    spend_reconcile_interval: float = Field(default=30.0, gt=0, le=DAY)
    """Seconds between accounting's reconciliations of the Redis spend ledgers with
    PostgreSQL (queuegate/spend.py)."""

    @model_validator(mode="before")
    @classmethod
    def _management_from_amqp(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("management_url"):
            amqp = data.get("amqp_url") or cls.model_fields["amqp_url"].default
            with contextlib.suppress(ValueError):  # a bad AMQP URL: its own check says so
                data = {**data, "management_url": management_url_for(amqp)}
        return data

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url_is_read_as_aio_pika_reads_it(cls, value: str) -> str:
        return _checked(
            value,
            url_problem(
                value,
                ("amqp", "amqps"),
                several_hosts=True,
                client=lambda url: [URL(node).port for node in node_urls(url)],
            ),
        )

    @field_validator("redis_url")
    @classmethod
    def _redis_url_is_read_as_redis_py_reads_it(cls, value: str) -> str:
        return _checked(
            value,
            url_problem(
                value,
                ("redis", "rediss", "unix"),
                hostless=value.startswith("unix:"),
                client=redis_connection,
            ),
        )

    @field_validator("database_url")
    @classmethod
    def _database_url_is_read_as_asyncpg_reads_it(cls, value: str) -> str:
        # asyncpg takes several hosts, and none (a local socket named in the query)
        problem = url_problem(value, ("postgresql", "postgres"), several_hosts=True, hostless=True)
        return _checked(value, problem)

    @field_validator("management_url")
    @classmethod
    def _management_url_is_a_url(cls, value: str) -> str:
        if not value:  # derived from the AMQP URL, whose own check said what is wrong
            return value
        # Not read by httpx here: only the host and port go to its client (BrokerAdmin), which
        # checks them. Imported, httpx brings its command line (click, rich, pygments) along,
        # 3.4 MB of every process's memory, a worker's too, which never calls the API.
        return _checked(value, url_problem(value, ("http", "https")))

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels_are_addresses(cls, value: str | None) -> str | None:
        if value is not None and not sentinel_addresses(value):
            raise ValueError(
                "QUEUEGATE_REDIS_SENTINELS is set but names no Sentinel: list them "
                "(sentinel-1:26379,sentinel-2:26379), or unset it to use QUEUEGATE_REDIS_URL"
            )
        return value

    @field_validator("http_trusted_proxies")
    @classmethod
    def _trusted_proxies_are_addresses(cls, value: str) -> str:
        trusted_proxies(value)
        return value

    @model_validator(mode="after")
    def _a_job_body_fits(self) -> Settings:
        for name, value in (
            ("QUEUEGATE_HTTP_BODY_BYTES_IN_FLIGHT", self.http_body_bytes_in_flight),
            ("QUEUEGATE_HTTP_BODY_BYTES_PER_TEAM", self.body_bytes_per_team),
        ):
            if value < self.max_body_bytes:
                raise ValueError(
                    f"{name} is below twice QUEUEGATE_MAX_JOB_BYTES (the largest body the "
                    "front door reads), so it could read no large job: raise it"
                )
        return self

    @model_validator(mode="after")
    def _held_requests_leave_connections(self) -> Settings:
        for name, value in (
            ("QUEUEGATE_HTTP_KEYLESS_BODIES", self.keyless_bodies),
            ("QUEUEGATE_HTTP_REQUESTS_PER_TEAM", self.requests_per_team),
            ("QUEUEGATE_HTTP_KEYLESS_REQUESTS", self.keyless_requests),
        ):
            if value >= self.http_max_connections > 1:
                raise ValueError(
                    f"{name} is not below QUEUEGATE_HTTP_MAX_CONNECTIONS, so such requests "
                    "could hold every connection: lower the first or raise the second"
                )
        return self

    def _quarter(self, said: int | None, most: int | None = None) -> int:
        """``said``, or when unsaid a quarter of the connections (at most ``most``): a
        derived default, so that a small front door set up before the limit existed still
        starts."""
        if said is not None:
            return said
        quarter = self.http_max_connections // 4
        return max(1, quarter if most is None else min(most, quarter))

    def metrics_port_of(self, role: Literal["worker", "accounting"]) -> int:
        """The port ``role`` serves its metrics on: ``metrics_port``, or the role's own."""
        return METRICS_PORTS[role] if self.metrics_port is None else self.metrics_port

    @property
    def requests_per_team(self) -> int:
        """``http_requests_per_team``, or a quarter of the connections."""
        return self._quarter(self.http_requests_per_team)

    @property
    def keyless_requests(self) -> int:
        """``http_keyless_requests``, or a quarter of the connections, at most 32."""
        return self._quarter(self.http_keyless_requests, most=32)

    @property
    def keyless_bodies(self) -> int:
        """``http_keyless_bodies``, or a quarter of the connections, at most 32."""
        return self._quarter(self.http_keyless_bodies, most=32)

    @property
    def max_body_bytes(self) -> int:
        """The largest body the front door reads of one request: twice ``max_job_bytes``.
        The limit is the request's as its job carries it, measured once the body is read
        (``request_limits.request_bytes``), as a batch's request is: a body is larger by
        what that leaves out (explicit nulls and empty defaults, whitespace, escapes), so
        is read up to this bound, past which it is refused 413 unread."""
        return 2 * self.max_job_bytes

    @property
    def body_bytes_per_team(self) -> int:
        """``http_body_bytes_per_team``, or a quarter of the bytes in flight (at least
        ``max_body_bytes``, so that a team can send its largest job)."""
        if self.http_body_bytes_per_team is not None:
            return self.http_body_bytes_per_team
        return max(self.max_body_bytes, self.http_body_bytes_in_flight // 4)

    @property
    def amqp_user(self) -> str | None:
        """The broker user of ``amqp_url``: the ``user_id`` this process publishes under."""
        return unquote(urlsplit(self.amqp_url).username or "") or None

    @property
    def vhost(self) -> str:
        """The broker vhost ``amqp_url`` names (``/`` when it names none): the gateway's
        queues, its teams' users' permissions and its policies are all in it."""
        return vhost_of(self.amqp_url)

    @property
    def operators(self) -> frozenset[str]:
        """The broker users trusted as operators (see ``operator_users``)."""
        named = {user.strip() for user in self.operator_users.split(",") if user.strip()}
        return frozenset(named or ({self.amqp_user} if self.amqp_user else set()))

    @property
    def frontdoor(self) -> frozenset[str]:
        """The broker users of the HTTP front door (see ``frontdoor_users``)."""
        named = {user.strip() for user in self.frontdoor_users.split(",") if user.strip()}
        return frozenset(named or ({self.amqp_user} if self.amqp_user else set()))

    @property
    def redis_prefix(self) -> str:
        return self.namespace

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """``redis_sentinels`` as (host, port) pairs; empty without Sentinel."""
        return sentinel_addresses(self.redis_sentinels or "")


def _checked(value: str, problem: str | None) -> str:
    if problem is not None:
        raise ValueError(problem)
    return value


def settings_problem(exc: ValidationError) -> str:
    """The first problem of settings refused, in one line naming its environment variable
    (``QUEUEGATE_CLAIM_LEASE``), never its value: a URL's may hold a password."""
    problem = exc.errors(include_input=False)[0]
    said = str(problem["msg"]).removeprefix("Value error, ")
    if not problem["loc"]:  # a check of several settings: its message names them
        return f"invalid settings: {said}"
    variable = _variable(str(problem["loc"][0]))
    if said.startswith(variable):  # its check named it already
        return said
    return f"invalid {variable}: {said}: correct it and run again"


def _variable(loc: str) -> str:
    """The environment variable of the setting ``loc`` names: a field, or the first name of a
    renamed one (its ``validation_alias``), said with its former names, any of which was read."""
    for field in Settings.model_fields.values():
        names = field.validation_alias
        if isinstance(names, AliasChoices) and loc in names.choices:
            return " or ".join(map(str, names.choices))
    return f"QUEUEGATE_{loc.upper()}"


def trusted_proxies(listed: str) -> list[str]:
    """``QUEUEGATE_HTTP_TRUSTED_PROXIES`` as the networks it names, written as uvicorn reads
    them (``10.0.0.5`` as ``10.0.0.5/32``); ValueError naming an entry that is no address or
    network (uvicorn would take it as a name no client address ever matches). An IPv4 network
    is named as IPv4-mapped IPv6 too: a listener on ``::`` sees its IPv4 peers so
    (``::ffff:10.0.0.5``)."""
    networks = []
    for entry in (part.strip() for part in listed.split(",")):
        if not entry:
            continue
        try:
            network = ipaddress.ip_network(entry, strict=False)
            networks.append(str(network))
            if network.version == 4:
                mapped = ipaddress.ip_address(f"::ffff:{network.network_address}")
                networks.append(f"{mapped}/{96 + network.prefixlen}")
        except ValueError:
            raise ValueError(
                f"QUEUEGATE_HTTP_TRUSTED_PROXIES: {entry!r} is no IP address or network: name "
                "your proxies' addresses (10.0.0.5,10.1.0.0/16), or leave it empty"
            ) from None
    return networks


def sentinel_addresses(listed: str) -> list[tuple[str, int]]:
    """``host:port,host:port`` as pairs (IPv6 hosts in brackets); ValueError naming a bad one."""
    addresses = []
    for entry in (part.strip() for part in listed.split(",")):
        if not entry:
            continue
        host, _, port = entry.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"QUEUEGATE_REDIS_SENTINELS: {entry!r} is not host:port "
                "(e.g. sentinel-1:26379,sentinel-2:26379)"
            )
        addresses.append((host, int(port)))
    return addresses


def management_url_for(amqp_url: str) -> str:
    """The management API of the broker at ``amqp_url``, as the same user.

    Of a cluster, its first node's: every node answers for the whole cluster, and the first
    listed is the one an operator expects (set QUEUEGATE_MANAGEMENT_URL when it is down).
    """
    parts = urlsplit(node_urls(amqp_url)[0])
    tls = parts.scheme == "amqps"
    credentials, _, _ = parts.netloc.rpartition("@")
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    netloc = f"{credentials}@" if credentials else ""
    netloc += f"{host or '127.0.0.1'}:{15671 if tls else 15672}"
    return urlunsplit(("https" if tls else "http", netloc, "/", "", ""))
