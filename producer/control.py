"""Asking the gateway for things a team may not do itself: the control plane's client side.

A request goes to the team's entry exchange under ``<team>.control``, proven like a job (the
connection's ``user_id``, the team's API key), and its answer comes back by direct reply-to:
the team needs no queue of its own for it, and no permission beyond publishing there.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiormq
from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import DeliveredMessage
from aiormq.exceptions import ChannelInvalidStateError
from pydantic import ValidationError

from queuegate.broker import json_message, publish, when_connected
from queuegate.control import (
    BATCH_ERROR,
    CONTROL_KEY_SUFFIX,
    CONTROL_WAIT,
    DIRECT_REPLY_TO,
    HEADER_REQUEST,
    MESSAGE_TYPE_CONTROL,
    TEAM_DISABLED,
    BatchCall,
    BatchCallName,
    CloseReplyQueue,
    ControlRequest,
    ControlResponse,
    OpenReplyQueue,
)
from queuegate.errors import BatchError, ControlRefused, ServiceUnavailable, TeamDisabled
from queuegate.signing import ApiKey, sign_job

SEND_AGAIN = 3.0
"""Seconds after which an unanswered request that may run twice is sent again (a worker
answers one in 1-20 ms here; a stalled worker holds the ones it took)."""


class ControlClient:
    """Control requests on one robust channel of the caller (direct reply-to needs the
    request and its consumer on the same channel)::

        control = ControlClient(
            channel, exchange="queuegate.in.search", queue="queuegate.control.search", ...
        )
        await control.start()
        queue = await control.open_reply_queue("nightly", durable=True)
    """

    def __init__(
        self,
        channel: AbstractRobustChannel,
        *,
        exchange: str,
        queue: str,
        team: str,
        user_id: str | None,
        api_key: ApiKey | None,
        reconnect_wait: float,
        nacks_within: float = 0.0,
        timeout: float = CONTROL_WAIT,
    ) -> None:
        self._channel = channel
        self._nacks_within = nacks_within
        self._exchange = exchange
        self._queue = queue
        self.team = team
        self._user_id = user_id
        self._api_key = api_key
        self._reconnect_wait = reconnect_wait
        self._timeout = timeout
        self._pending: dict[str, asyncio.Future[ControlResponse]] = {}
        self._consuming_on: object = None
        self._consuming = asyncio.Lock()

    async def start(self) -> None:
        await self._consume()
        self._channel.reopen_callbacks.add(self._on_reopen)

    async def _consume(self) -> None:
        """Consume direct replies on the channel as it is now (a reconnect replaces it).

        Checked before every request: a robust channel is usable again before its reopen
        callbacks have run, and a request sent with no reply consumer is refused.
        """
        async with self._consuming:
            underlay = await self._channel.get_underlay_channel()
            if underlay is not self._consuming_on:
                await underlay.basic_consume(DIRECT_REPLY_TO, self._on_reply, no_ack=True)
                self._consuming_on = underlay

    async def _on_reopen(self, channel: AbstractRobustChannel | None) -> None:
        # Answers to requests sent on the lost channel can never arrive: ask again.
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the channel was lost"))
                future.exception()  # its caller may have stopped waiting: no warning then

    async def _on_reply(self, message: DeliveredMessage) -> None:
        future = self._pending.get(message.header.properties.correlation_id or "")
        if future is None or future.done():
            return
        try:
            future.set_result(ControlResponse.model_validate_json(message.body))
        except ValidationError as exc:
            future.set_exception(ControlRefused(f"the gateway sent a malformed answer ({exc})"))

    async def call(self, request: OpenReplyQueue | CloseReplyQueue | BatchCall) -> Any:
        """The request's result; ControlRefused when the gateway says no."""
        body = ControlRequest(request=request).model_dump_json().encode()
        try:
            response = await when_connected(
                self._channel,
                lambda: self._round_trip(body, again=_may_run_twice(request)),
                within=self._reconnect_wait,
                what=f"asking the gateway ({request.op})",
                nacks_within=self._nacks_within,
            )
        except aiormq.exceptions.DeliveryError as exc:  # a nack: PublishError is answered above
            raise ServiceUnavailable(
                f"the broker refused the request to the gateway ({request.op}) for team "
                f"{self.team!r}: its control queue is full or, on a cluster, has no leader "
                "yet: try again in a few seconds"
            ) from exc
        if not response.ok:
            if response.code == "service_unavailable":
                raise ServiceUnavailable(response.error or "the gateway is unavailable")
            if response.code == BATCH_ERROR:
                raise BatchError(response.error or "the gateway refused the batch step")
            if response.code == TEAM_DISABLED:
                raise TeamDisabled(response.error or f"team {self.team} is disabled")
            raise ControlRefused(response.error or "the gateway refused the request")
        return response.result

    async def check_served(self) -> None:
        """ServiceUnavailable at once when no worker consumes the team's control queue: a
        read (``batch status``, ``batch list``) would otherwise wait out ``CONTROL_WAIT`` (30
        s) to be told so. A queue the broker has not is left to the request, which says so.

        Looked up by a passive declare on a channel of its own: the broker closes the channel
        of one that names a missing queue."""
        connection = (await self._channel.get_underlay_channel()).connection
        probe = await connection.channel()
        try:
            declared = await probe.queue_declare(self._queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return
        finally:
            if not probe.is_closed:
                await probe.close()
        if not declared.consumer_count:
            raise ServiceUnavailable(
                f"no worker serves team {self.team!r} now (its control queue has no "
                "consumer): start one (queuegate worker; queuegate status shows them) and "
                "try again"
            )

    async def _round_trip(self, body: bytes, *, again: bool) -> ControlResponse:
        """Send the request and wait for its answer; ``again``: a request that may run twice
        (opening or closing a reply queue) is sent again every ``SEND_AGAIN`` seconds while
        unanswered, any copy's answer taken. A worker that stalls (stopped, its loop hung)
        holds the requests it took until it resumes: the team's app starting waited out the
        whole timeout, though the other workers were serving."""
        if self._channel.is_closed:
            # As publish does: when_connected waits for the channel to come back.
            raise ChannelInvalidStateError(f"{self._channel} is closed")
        await self._consume()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        sent: list[str] = []
        # One for all its copies: a worker drops a copy of a request another copy answered.
        request = uuid.uuid4().hex
        try:
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    raise ServiceUnavailable(
                        f"no gateway answered within {self._timeout:.0f} s: check that "
                        "workers run (queuegate status)"
                    )
                sent.append(await self._send(body, left, request))
                futures = [self._pending[request_id] for request_id in sent]
                wait = min(SEND_AGAIN, left) if again else left
                done, _ = await asyncio.wait(
                    futures, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                if done:
                    return done.pop().result()
        finally:
            for request_id in sent:
                self._pending.pop(request_id, None)

    async def _send(self, body: bytes, ttl: float, request: str) -> str:
        """Publish one copy of ``request``, living ``ttl`` seconds in the queue; the copy's
        id, under which its answer's future waits in ``_pending``."""
        request_id = uuid.uuid4().hex
        self._pending[request_id] = asyncio.get_running_loop().create_future()
        message = json_message(
            body,
            message_type=MESSAGE_TYPE_CONTROL,
            message_id=request_id,
            correlation_id=request_id,
            reply_to=DIRECT_REPLY_TO,
            user_id=self._user_id,
            # Not served after its client stopped waiting for it.
            expiration_ms=max(1, int(ttl * 1000)),
            headers={
                HEADER_REQUEST: request,
                **(
                    {}
                    if self._api_key is None
                    else sign_job(self._api_key, job_id=request_id, team=self.team, body=body)
                ),
            },
            persistent=False,
        )
        try:
            await publish(
                self._channel,
                message,
                exchange=self._exchange,
                routing_key=self.team + CONTROL_KEY_SUFFIX,
            )
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise ControlRefused(
                f"the broker refused a request for team {self.team!r}: these credentials "
                f"are not {self.team!r}'s (or hold an earlier version's permissions, which "
                f"queuegate teams add {self.team} moves over); check the team name and "
                "QUEUEGATE_AMQP_URL"
            ) from exc
        except aiormq.exceptions.PublishError as exc:
            raise ServiceUnavailable(
                f"no control queue for team {self.team!r} in this namespace: add the "
                f"team (queuegate teams add {self.team}) or start a worker, and try again"
            ) from exc
        return request_id

    async def open_reply_queue(self, name: str, *, durable: bool) -> str:
        """Have the gateway declare one of the team's reply queues; its full name."""
        return str(await self.call(OpenReplyQueue(name=name, durable=durable)))

    async def close_reply_queue(self, name: str, *, durable: bool) -> int | None:
        """Have the gateway delete one of the team's reply queues and free its slot; how
        many unread results went with it, None when the team has no such queue."""
        dropped = await self.call(CloseReplyQueue(name=name, durable=durable))
        return None if dropped is None else int(dropped)

    async def batch(self, call: BatchCallName, batch: str = "", **args: Any) -> Any:
        """One step on one of the team's batches (see workers/control.py)."""
        return await self.call(BatchCall(call=call, batch=batch, args=args))


def _may_run_twice(request: OpenReplyQueue | CloseReplyQueue | BatchCall) -> bool:
    """Whether a copy of ``request`` run late (by a stalled worker, once another answered)
    does no harm: opening a queue again, or deleting a client's own reply queue, whose name
    no one takes again. Not deleting a named results queue, which a pipeline may have opened
    again meanwhile (its unread results would go), nor a batch step."""
    if isinstance(request, OpenReplyQueue):
        return True
    return isinstance(request, CloseReplyQueue) and not request.durable


__all__ = ["ControlClient"]
