"""A team's own reply and results queues, given back when it no longer needs them."""

from __future__ import annotations

from typing import Any

from producer.client import GatewayClient
from queuegate.control import check_reply_queue_name
from queuegate.errors import ConfigError, ControlRefused
from queuegate.settings import Settings
from queuegate.topology import batch_lock_of, batch_of_results_queue
from queuegate.visible import clipped


async def delete_reply_queue(
    settings: Settings, name: str, *, team: str, durable: bool = True, **who: Any
) -> int | None:
    """Delete the team's results queue ``name`` (what ``GatewayClient(reply_queue=name)``
    reads; ``durable=False``: a client's own reply queue) and free its slot of the team's
    ``reply_queues_per_team``; how many unread results went with it, None when the team has
    no such queue. Asked of the gateway with the team's own credentials (``who``:
    ``api_key=`` where the team proves itself with one), which acts on that team's queues
    alone. Stop the queue's reader first: a client still reading it asks for it again.

    A batch's lock (``<batch>:collect``, ``<batch>:submit``) or results queue
    (``<batch>:results``) is refused, saying what removes it."""
    lock = batch_lock_of(name)
    if lock is not None:
        batch, role = lock
        raise ControlRefused(
            f"{clipped(name)!r} is the {role} lock of batch {clipped(batch)!r}, not a reply "
            f"queue: the broker removes it by itself once its holder (queuegate batch {role}) "
            "has stopped; to drop the batch and its results, run queuegate batch delete "
            f"{clipped(batch)}"
        )
    owner = batch_of_results_queue(name)
    if owner is not None:
        raise ControlRefused(
            f"{clipped(name)!r} is the results queue of batch {clipped(owner)!r}, not a reply "
            "queue: collect the batch (its queue goes with it), or run queuegate batch delete "
            f"{clipped(owner)}"
        )
    try:
        check_reply_queue_name(name)
    except ConfigError as exc:
        raise ControlRefused(str(exc)) from None
    async with GatewayClient(settings, team=team, listen=False, **who) as client:
        return await client.control.close_reply_queue(name, durable=durable)


__all__ = ["delete_reply_queue"]
