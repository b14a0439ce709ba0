"""The dead-letter queue, for operators: what is in it, why, and sending it back.

Two kinds of dead letter land in ``<ns>.dead``. A worker dead-letters bad input itself, with
the ``x-queuegate-reason``/``-detail``/``-queue`` headers; the broker dead-letters a job that
ran out of deliveries (``delivery_limit``: it kept crashing workers) or outlived its TTL
(``expired``: no worker took it before its deadline), with its ``x-death`` header.

Listing takes the messages without acknowledging them and closes the channel, which returns
them all. Replay publishes the original body, ``message_id``, ``correlation_id`` and
``reply_to`` back to where it came from (the jobs exchange under its team, or the usage
exchange) and only then removes the dead letter: the job id is kept, so a job that had already
been answered is answered from the stored outcome and never counted twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from queuegate.broker import connect, json_message, publish
from queuegate.errors import PublishRefused
from queuegate.settings import Settings
from queuegate.topology import (
    HEADER_DEAD_DETAIL,
    HEADER_DEAD_QUEUE,
    HEADER_DEAD_REASON,
    MESSAGE_TYPE_JOB,
    Topology,
)

_DEAD_HEADERS = frozenset(
    {HEADER_DEAD_REASON, HEADER_DEAD_DETAIL, HEADER_DEAD_QUEUE, "x-death", "x-delivery-count"}
    | {f"x-first-death-{part}" for part in ("reason", "queue", "exchange")}
    | {f"x-last-death-{part}" for part in ("reason", "queue", "exchange")}
)
"""Headers that describe the dead-lettering itself; a replayed message leaves them behind."""


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered message and why it is there."""

    position: int
    message_id: str | None
    reason: str
    """``invalid_request``, ``unknown_model``, ``unauthorized`` (worker) or ``delivery_limit``,
    ``expired``, ``rejected`` (broker)."""
    detail: str
    queue: str
    """The queue it was dead-lettered from."""
    deaths: int
    """How many times the broker dead-lettered it (0 for the worker's own dead letters)."""
    at: datetime | None
    headers: Mapping[str, Any]
    body: bytes
    reply_to: str | None


async def peek(settings: Settings, *, limit: int | None = None) -> tuple[list[DeadLetter], int]:
    """Up to ``limit`` dead letters, oldest first, left where they are; and how many there are."""
    async with _taken(settings, limit) as (_, taken, total):
        return [_describe(i, message) for i, message in enumerate(taken, start=1)], total


async def replay(
    settings: Settings,
    job_ids: Collection[str] | None = None,
    *,
    on_replayed: Callable[[DeadLetter], None] | None = None,
) -> list[DeadLetter]:
    """Send dead letters back where they came from (all, or those of ``job_ids``).

    Each is removed only after the broker confirmed its republication. Raises PublishRefused
    when its team has no queue any more; that one and the rest stay dead-lettered.
    """
    topology = Topology(settings.namespace, settings.delivery_limit)
    replayed: list[DeadLetter] = []
    async with _taken(settings, None) as (channel, taken, _):
        jobs = await topology.declare_jobs_exchange(channel)
        usage = await topology.declare_usage(channel)
        for position, message in enumerate(taken, start=1):
            letter = _describe(position, message)
            if job_ids is not None and letter.message_id not in job_ids:
                continue
            again = json_message(
                message.body,
                message_type=message.type or MESSAGE_TYPE_JOB,
                message_id=message.message_id,
                correlation_id=message.correlation_id,
                reply_to=message.reply_to,
                headers={
                    k: v
                    for k, v in (message.headers or {}).items()
                    if k not in _DEAD_HEADERS and isinstance(v, str | int)
                },
            )
            if letter.queue == topology.accounting_queue:
                exchange, key = usage, ""
            else:
                exchange, key = jobs, topology.team_of_queue(letter.queue)
            try:
                await publish(channel, again, exchange=exchange.name, routing_key=key)
            except aiormq.exceptions.PublishError as exc:
                raise PublishRefused(
                    f"cannot replay {letter.message_id}: no queue takes routing key {key!r} "
                    f"(register the team with `queuegate teams add {key}`), then replay again"
                ) from exc
            await message.ack()
            replayed.append(letter)
            if on_replayed is not None:
                on_replayed(letter)
    return replayed


async def purge(settings: Settings) -> int:
    """Delete every dead letter; returns how many there were."""
    connection = await connect(settings.amqp_url, name="queuegate-dlq")
    async with connection:
        queue = await _dead_queue(await connection.channel(), settings)
        done = await queue.purge()
        return int(done.message_count or 0)


async def _dead_queue(channel: AbstractChannel, settings: Settings) -> AbstractQueue:
    topology = Topology(settings.namespace, settings.delivery_limit)
    await topology.declare_dead(channel)
    return await channel.get_queue(topology.dead_queue)


@contextlib.asynccontextmanager
async def _taken(
    settings: Settings, limit: int | None
) -> AsyncIterator[tuple[AbstractChannel, list[AbstractIncomingMessage], int]]:
    """Up to ``limit`` dead letters held unacknowledged, and the queue's depth; what is not
    acknowledged goes back to the queue on exit."""
    connection = await connect(settings.amqp_url, name="queuegate-dlq")
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await _dead_queue(channel, settings)
        # The count bounds the loop: a message returned meanwhile is not taken twice.
        total = queue.declaration_result.message_count or 0
        count = total if limit is None else min(total, limit)
        taken: list[AbstractIncomingMessage] = []
        while len(taken) < count:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            taken.append(message)
        yield channel, taken, total


def _describe(position: int, message: AbstractIncomingMessage) -> DeadLetter:
    headers = dict(message.headers or {})
    deaths = headers.get("x-death")
    first: Mapping[str, Any] = {}
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        first = deaths[0]
    reason = headers.get(HEADER_DEAD_REASON) or first.get("reason") or "unknown"
    queue = headers.get(HEADER_DEAD_QUEUE) or first.get("queue") or ""
    at = first.get("time") if isinstance(first.get("time"), datetime) else message.timestamp
    return DeadLetter(
        position=position,
        message_id=message.message_id,
        reason=_text(reason),
        detail=_text(headers.get(HEADER_DEAD_DETAIL, "")),
        queue=_text(queue),
        deaths=int(first.get("count", 0) or 0),
        at=at,
        headers=headers,
        body=message.body,
        reply_to=message.reply_to,
    )


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


__all__ = ["DeadLetter", "peek", "purge", "replay"]
