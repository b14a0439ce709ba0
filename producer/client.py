"""The client library apps use to publish chat jobs and await their results."""

from __future__ import annotations

import asyncio
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

import aiormq
from aio_pika.abc import (
    AbstractExchange,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from producer.control import ControlClient
from producer.replies import Inbox, ReplyingConnection, ReplyQueue
from producer.streams import ChatStream
from queuegate import tracing
from queuegate.broker import (
    Outgoing,
    json_message,
    nack_window,
    publish,
    when_connected,
)
from queuegate.control import check_reply_queue_name
from queuegate.errors import (
    ClientError,
    JobIdInFlight,
    PublishRefused,
    QueueFull,
    ResultTimeout,
    ServiceUnavailable,
)
from queuegate.messages import (
    ChatJob,
    ChatMessage,
    ChatResult,
    request_digest,
)
from queuegate.provider_formats import openai_id, openai_view
from queuegate.registry import check_team_name
from queuegate.settings import Settings
from queuegate.signing import ApiKey, sign_job
from queuegate.topology import HEADER_SENT_MS, MESSAGE_TYPE_JOB, Topology

DEFAULT_TIMEOUT = 120.0


def _answered(result: ChatResult) -> ChatResult:
    """``result`` as an app gets it: its response's id the gateway's (``chatcmpl-<job id>``,
    as the front door's and batch files' answers have), never the provider's, and without
    what the workers keep for Anthropic-format callers alone."""
    if result.response is None:
        return result
    response = openai_view(result.response, openai_id(result.job_id))
    return result.model_copy(update={"response": response})


@dataclass
class JobHandle:
    """A published job: ``await handle.result()`` waits for its answer, and gives it again
    when awaited again."""

    job_id: str
    _client: GatewayClient
    _answer: ChatResult | None = field(default=None, repr=False)
    _share: weakref.finalize = field(init=False, repr=False)  # type: ignore[type-arg]
    """Its share of the job's answer, which the client keeps for it (``ReplyBook``) until it
    has taken it, or is dropped unawaited: a wait by id or a stream of the job may take the
    answer first (before, this handle then waited out its timeout, or was told AnswerTaken),
    and a handle nobody awaits must not keep it for ever."""

    def __post_init__(self) -> None:
        release = self._client._inbox.replies.unexpect
        loop = asyncio.get_running_loop()
        self._share = weakref.finalize(self, _later, loop, release, self.job_id)

    async def result(self, timeout: float | None = DEFAULT_TIMEOUT) -> ChatResult:
        # Kept: the client gives a job's answer once to each handle (``ReplyBook``), and a
        # second wait was for an answer that had come and gone, until its timeout.
        if self._answer is None:
            self._answer = await self._client.wait(self.job_id, timeout)
            if self._share.detach() is not None:
                self._client._inbox.replies.unexpect(self.job_id)
        return self._answer


def _later(loop: asyncio.AbstractEventLoop, release: Callable[[str], object], job_id: str) -> None:
    """``release(job_id)`` in ``loop``'s next turn: a handle may be collected in the middle
    of anything, the book's own work too."""
    if not loop.is_closed():  # else the client is gone with it: nothing left to release
        loop.call_soon(release, job_id)


class GatewayClient(ReplyingConnection):
    """Publishes a team's chat jobs and awaits their results::

        async with GatewayClient(settings, team="search") as client:
            result = await client.chat("gpt-4o-mini", [{"role": "user", "content": "Hi"}])
            print(result.content)

    Replies arrive on the client's own queue (``<ns>.replies.<team>.<id>``), which the gateway
    declares when the client asks (one control round trip at start: a team may not declare
    queues itself), consumed on a channel of its own beside the one jobs are published on. It
    survives a dropped broker connection, so a reply in flight is not lost; the broker deletes
    it ``settings.reply_queue_expires`` seconds after the client is gone, and a client that was
    away longer, or whose queue an operator deleted, asks for it again. Opening asks the
    gateway, whose Redis counts the team's reply queues: while that is away the open fails with
    ServiceUnavailable naming Redis. While the connection is down, ``submit`` waits up to
    ``settings.reconnect_wait`` seconds for it to return. A pipeline that must survive its own
    restart passes ``reply_queue="nightly"``: a durable queue that keeps results while nobody
    listens, read again by the next client of that name. Do not share one named reply queue
    between two live clients: each takes half the results.

    Connect with the team's own broker user (``settings.amqp_url`` from ``queuegate teams
    add``): every job carries it as ``user_id``, which the broker checks. A team identified
    by API key passes ``api_key=``: each job carries the key's id and a proof bound to that job
    (``queuegate.signing``), never the key.

    ``listen=False`` opens no reply queue: for tools that only publish (``publish`` with a
    ``reply_to`` of their own, as batch submit does) or only ask the gateway (``control``).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        team: str,
        reply_queue: str | None = None,
        user_id: str | None = None,
        api_key: ApiKey | None = None,
        listen: bool = True,
    ) -> None:
        self._settings = settings
        self._listen = listen
        self._topology = Topology.of(settings)
        self.team = check_team_name(team)
        # Checked here, in one line (else as the open request's validation error, on enter).
        self._reply_name = None if reply_queue is None else check_reply_queue_name(reply_queue)
        # The broker checks user_id against the connection's user, so a worker can trust it.
        self._user_id = user_id or settings.amqp_user
        self._api_key = api_key
        self._inbox = Inbox()
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._reply_id = reply_queue or uuid.uuid4().hex
        # A named queue stays for the next client of that name; our own goes with us.
        self._replies = ReplyQueue(
            self._inbox,
            declare=self._open_reply_queue,
            delete=self._close_reply_queue if self._reply_name is None else None,
        )
        self._reply_queue: str | None = None
        self._control: ControlClient | None = None

    async def __aenter__(self) -> Self:
        # The application's own process: its callers are its own to heed, as OpenTelemetry
        # does by default.
        tracing.start("queuegate-producer", heed_callers=True)
        await self._connect(self._settings.amqp_url, name=f"producer:{self.team}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The waits under way end now, with GaveUp (before: each waited out its timeout, one
        # without a timeout for ever), and a publish after this is refused at once (it waited
        # 60 s for a connection closed for good).
        self._inbox.give_up()
        self._exchange = self._channel = None
        await super().__aexit__(exc_type, exc, tb)

    async def _setup(self, connection: AbstractRobustConnection) -> None:
        self._channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        # Passive: a team's broker user may publish to its entry exchange, the only one it
        # may, but not declare it.
        entry = self._topology.entry_exchange(self.team)
        try:
            self._exchange = await self._channel.get_exchange(entry)
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise PublishRefused(
                f"no team {self.team!r} in namespace {self._settings.namespace!r} (no "
                f"exchange {entry}): check the team name, or register the team "
                f"(queuegate teams add {self.team}, again for one of an earlier version)"
            ) from exc
        self._control = ControlClient(
            self._channel,
            exchange=self._exchange.name,
            queue=self._topology.control_queue(self.team),
            team=self.team,
            user_id=self._user_id,
            api_key=self._api_key,
            reconnect_wait=self._settings.reconnect_wait,
            nacks_within=nack_window(self._settings.amqp_url),
        )
        await self._control.start()
        if self._listen:
            # On a channel of its own, not ours (ReplyQueue.start): a refused consume
            # closes its channel.
            self._reply_queue = await self._replies.start(connection)

    @property
    def connection(self) -> AbstractRobustConnection:
        """The client's broker connection (a batch submit holds its lock on it)."""
        if self._connection is None:
            raise RuntimeError("use the client inside `async with`")
        return self._connection

    @property
    def reply_to(self) -> str:
        if self._reply_queue is None:
            raise RuntimeError("use the client inside `async with`")
        return self._reply_queue

    @property
    def control(self) -> ControlClient:
        """The team's control requests to the gateway (reply queues, batches)."""
        if self._control is None:
            raise RuntimeError("use the client inside `async with`")
        return self._control

    @property
    def duplicates(self) -> int:
        """Results dropped because the same job was already answered (after a redelivery)."""
        return self._inbox.replies.duplicates

    @property
    def strays(self) -> int:
        """Results dropped because they answer another request under a job id this client
        awaits (a conflict sent by someone else, the refusal of a bad message someone sent
        under the id, an earlier run's answer in a named queue)."""
        return self._inbox.replies.strays

    def job(
        self,
        model: str,
        messages: Sequence[dict[str, Any] | ChatMessage],
        *,
        job_id: str | None = None,
        deadline: datetime | timedelta | None = None,
        fallbacks: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        stream: bool = False,
        cache: bool | None = None,
        params: Mapping[str, Any] | None = None,
        **more_params: Any,
    ) -> ChatJob:
        """Build a ChatJob for this team.

        OpenAI chat parameters are the other keywords (``max_tokens=100``), or ``params``, a
        dict of them: the way to send one named as a keyword here is, OpenAI's own
        ``metadata`` (``params={"metadata": {"run": "nightly"}}, store=True``). ``metadata``
        is the job's own: kept with it, sent to no provider. A parameter given both ways is a
        TypeError, never one of them left out.

        ``cache``: True, an identical earlier request of the team may be answered from the
        cache; False, never; None, as the team's default (``queuegate teams set --cache``).
        """
        twice = sorted(set(params or {}) & set(more_params))
        if twice:
            raise TypeError(f"{', '.join(twice)} given twice: as a keyword and in params")
        if isinstance(deadline, timedelta):
            deadline = datetime.now(UTC) + deadline
        # Messages and parameters validated by the job itself, once: a model validated on its
        # own first has its checks (``ChatMessage``'s, ``ChatParams``') run again in the job.
        return ChatJob.model_validate(
            {
                "job_id": job_id or uuid.uuid4().hex,
                "team": self.team,
                "model": model,
                "messages": list(messages),
                "params": {**(params or {}), **more_params},
                "fallbacks": fallbacks,
                "metadata": metadata or {},
                "deadline": deadline,
                "stream": stream,
                "cache": cache,
            }
        )

    async def submit(self, job: ChatJob) -> JobHandle:
        """Publish a job and wait for the broker's confirm; the result comes later.

        Raises JobIdInFlight for a job id this client still awaits for a different request:
        both answers would come under the id, and each handle must get its own. The same
        request again shares the answer."""
        await self._submit(job, handle=True)
        return JobHandle(job.job_id, self)

    async def _submit(self, job: ChatJob, *, handle: bool) -> None:
        """Publish a job whose answer this client awaits: for a handle, or for a stream
        (not ``handle``), which takes its answer as it comes."""
        request = request_digest(job)
        if self._inbox.replies.request(job.job_id) not in (None, request):
            raise JobIdInFlight(
                f"job id {job.job_id!r} is in flight on this client with a different "
                "request: give each request its own job id"
            )
        message = self._message(job, reply_to=self.reply_to)
        # The refusal of this very message names its digest (sent before the broker's
        # confirm, it may come first): a refusal of anyone else's under the id is a stray.
        self._inbox.expect(job.job_id, request, message, handle=handle)
        try:
            await self._send(job, message)
        except (ServiceUnavailable, ClientError):
            self._inbox.unexpect(job.job_id, handle=handle)
            raise

    async def publish(self, job: ChatJob, *, reply_to: str, expires: bool = True) -> None:
        """Publish a job, proven as the team (``user_id``, API key), its result to go to
        ``reply_to`` (one of the team's reply queues); return once the broker confirms it.

        ``expires=False``: no TTL from its deadline, for a job sent again to be answered
        from its stored outcome after the deadline (the worker, not the broker, refuses it
        uncalled when it has none).

        To this client's own queue, its answer is awaited by id (``wait``), which takes only
        a result of this request or a refusal of this message: another's under the id (a
        copy someone publishing as the team sent changed) is a stray."""
        message = self._message(job, reply_to=reply_to, expires=expires)
        if reply_to == self._reply_queue:
            self._inbox.replies.expect(job.job_id, request_digest(job), message, handle=False)
        await self._send(job, message)

    def _message(self, job: ChatJob, *, reply_to: str, expires: bool = True) -> Outgoing:
        return job_message(
            job, reply_to=reply_to, user_id=self._user_id, api_key=self._api_key, expires=expires
        )

    async def _send(self, job: ChatJob, message: Outgoing) -> None:
        if self._exchange is None or self._channel is None:
            raise RuntimeError("use the client inside `async with`")
        await publish_to_team(
            self._channel,
            self._exchange.name,
            message,
            job,
            within=self._settings.reconnect_wait,
            nacks_within=nack_window(self._settings.amqp_url),
        )

    async def wait(self, job_id: str, timeout: float | None = DEFAULT_TIMEOUT) -> ChatResult:
        if self._reply_queue is None or self._channel is None:
            # No reply queue read: no answer would come (before: waited out its timeout).
            raise ClientError(
                f"this client reads no results, so no answer to job {job_id} comes to it: "
                "await it in a client opened with listen=True (the default), inside `async with`"
            )
        try:
            return _answered(await self._inbox.wait(job_id, timeout))
        except TimeoutError as exc:
            raise ResultTimeout(
                f"no result for job {job_id} within {timeout} s; it may still be answered: "
                "wait again, or check the workers (queuegate status)"
            ) from exc

    async def chat(
        self,
        model: str,
        messages: Sequence[dict[str, Any] | ChatMessage],
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        **params: Any,
    ) -> ChatResult:
        """Publish one chat job and await its result."""
        handle = await self.submit(self.job(model, messages, **params))
        return await handle.result(timeout)

    def stream(
        self,
        model: str,
        messages: Sequence[dict[str, Any] | ChatMessage],
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        **params: Any,
    ) -> ChatStream:
        """Publish a streamed chat job when iterated: ``async for chunk in client.stream(...)``.

        ``params`` are those of ``job``; see ChatStream for what iteration yields.
        ``timeout`` bounds the wait for the first chunk and for each next, not the stream:
        ``deadline=`` bounds the job.
        """
        job = self.job(model, messages, stream=True, **params)
        stream = ChatStream(
            job.job_id, lambda: self._submit_stream(stream, job), timeout, view=_answered
        )
        return stream

    async def _submit_stream(self, stream: ChatStream, job: ChatJob) -> None:
        self._inbox.open(stream)
        await self._submit(job, handle=False)

    async def _open_reply_queue(self, channel: AbstractRobustChannel) -> str:
        # Asked of the gateway (a team may not declare queues), on the control channel, not
        # the reply queue's ``channel``: the same name each time, declared again if it
        # expired while we were away.
        return await self.control.open_reply_queue(
            self._reply_id, durable=self._reply_name is not None
        )

    async def _close_reply_queue(self, channel: AbstractRobustChannel) -> None:
        await self.control.close_reply_queue(self._reply_id, durable=False)


def job_message(
    job: ChatJob,
    *,
    reply_to: str,
    user_id: str | None,
    api_key: ApiKey | None = None,
    expires: bool = True,
) -> Outgoing:
    """The AMQP message of a job: ids, reply queue, TTL from its deadline (unless not
    ``expires``), send time, and the proof of the team's API key where the team proves
    itself with one."""
    body = job.model_dump_json(exclude_defaults=True).encode()
    # Rounded: cut down, every job's queued_ms would read half a millisecond long on average.
    # An integer: pamqp sends a float as single precision, whole seconds off at this size.
    headers: dict[str, str | int] = {HEADER_SENT_MS: round(time.time() * 1000)}
    if api_key is not None:
        headers.update(sign_job(api_key, job_id=job.job_id, team=job.team, body=body))
    return json_message(
        body,
        message_type=MESSAGE_TYPE_JOB,
        message_id=job.job_id,
        correlation_id=job.job_id,
        reply_to=reply_to,
        user_id=user_id,
        expiration_ms=_expiration_ms(job.deadline) if expires else None,
        headers=headers,
    )


async def publish_to_team(
    channel: AbstractRobustChannel,
    exchange: str,
    message: Outgoing,
    job: ChatJob,
    *,
    within: float,
    nacks_within: float = 0.0,
) -> None:
    """Publish a job's message to the team's queue; return once the broker confirms it.

    Raises QueueFull (the team's queue is at its quota), PublishRefused (no queue for the
    team) or ServiceUnavailable (the broker is away longer than ``within`` seconds). A refused
    publish is sent again for ``nacks_within`` seconds first (``queuegate.broker.nack_window``).

    When tracing, in a span of its own whose context the message carries to the worker."""
    if not tracing.ON:
        await _publish_job(
            channel, exchange, message, job, within=within, nacks_within=nacks_within
        )
        return
    attributes = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.destination.name": exchange,
        "messaging.rabbitmq.destination.routing_key": job.team,
        "messaging.message.id": job.job_id,
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": job.model,
        "queuegate.team": job.team,
        "queuegate.job_id": job.job_id,
    }
    with tracing.span(f"publish {job.team}", kind="PRODUCER", attributes=attributes):
        if message.properties.headers is not None:
            tracing.inject(message.properties.headers)
        await _publish_job(
            channel, exchange, message, job, within=within, nacks_within=nacks_within
        )


async def _publish_job(
    channel: AbstractRobustChannel,
    exchange: str,
    message: Outgoing,
    job: ChatJob,
    *,
    within: float,
    nacks_within: float,
) -> None:
    try:
        await when_connected(
            channel,
            lambda: publish(channel, message, exchange=exchange, routing_key=job.team),
            within=within,
            what=f"publishing job {job.job_id}",
            nacks_within=nacks_within,
        )
    except aiormq.exceptions.DeliveryError as exc:  # PublishError is one too
        raise _publish_error(job, exc) from exc


def _publish_error(job: ChatJob, exc: aiormq.exceptions.DeliveryError) -> ClientError:
    """Our error for a job the broker returned (no team queue) or refused (queue full)."""
    if isinstance(exc, aiormq.exceptions.PublishError):
        return PublishRefused(
            f"no queue for team {job.team!r}: register it (queuegate teams add "
            f"{job.team}) or start a worker for it"
        )
    return QueueFull(
        f"the broker refused job {job.job_id}: team {job.team}'s queue is full (its quota of "
        "jobs or of bytes); retry once workers drain it, or ask an operator to raise it"
    )


def _expiration_ms(deadline: datetime | None) -> int | None:
    """Message TTL from the deadline, so the broker itself dead-letters an expired job."""
    if deadline is None:
        return None
    return max(1, int((deadline - datetime.now(UTC)).total_seconds() * 1000))


__all__ = ["GatewayClient", "JobHandle"]
