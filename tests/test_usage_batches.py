"""How a worker groups its usage events into batches (the broker's side: test_job_path.py)."""

from __future__ import annotations

import asyncio

import pytest

from queuegate.errors import ServiceUnavailable
from workers.usage_batches import MAX_EVENTS, UsageBatches

WAIT = 5.0


class Sends:
    """A send whose confirms the test gives one at a time: ``release()`` confirms the batch
    being sent, ``fail()`` fails it."""

    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []
        self._pending: asyncio.Future[None] | None = None
        self._started = asyncio.Event()

    async def __call__(self, events: list[bytes]) -> None:
        self.batches.append(events)
        self._pending = asyncio.get_running_loop().create_future()
        self._started.set()
        await self._pending

    async def sending(self) -> None:
        """Until a batch is being sent (its confirm not given yet)."""
        async with asyncio.timeout(WAIT):
            await self._started.wait()

    def release(self) -> None:
        self._settle(None)

    def fail(self, exc: Exception) -> None:
        self._settle(exc)

    def _settle(self, exc: Exception | None) -> None:
        pending, self._pending = self._pending, None
        assert pending is not None
        self._started.clear()
        if exc is None:
            pending.set_result(None)
        else:
            pending.set_exception(exc)


async def test_an_idle_worker_sends_the_events_finishing_within_the_linger_together() -> None:
    sends = Sends()
    batches = UsageBatches(sends, linger=0.05)
    loop = asyncio.get_running_loop()
    # Given an idle worker's event, and a second one finishing while the first lingers
    started = loop.time()
    first = batches.add(b"1")
    await asyncio.sleep(0)  # the sender has started, and waits
    second = batches.add(b"2")

    # When the batch goes
    await sends.sending()

    # Expect both in it, sent once the linger was over (one job at a time, one message
    # for several jobs rather than one each)
    assert sends.batches == [[b"1", b"2"]]
    assert loop.time() - started >= 0.05
    sends.release()
    async with asyncio.timeout(WAIT):
        await asyncio.gather(first, second)
    assert (batches.batches_sent, batches.events_sent) == (1, 2)


async def test_an_event_sent_alone_and_those_finishing_during_its_confirm_go_together() -> None:
    sends = Sends()
    batches = UsageBatches(sends)
    # Given one event sent alone, its confirm not yet back
    first = batches.add(b"1")
    await sends.sending()
    assert sends.batches == [[b"1"]]

    # When three more finish while that batch awaits its confirm
    later = [batches.add(b"2"), batches.add(b"3"), batches.add(b"4")]
    await asyncio.sleep(0)
    assert sends.batches == [[b"1"]]  # nothing more is sent meanwhile
    assert not first.done()
    sends.release()

    # Expect the first event confirmed, and the three sent together in the next batch
    async with asyncio.timeout(WAIT):
        await first
    await sends.sending()
    assert sends.batches == [[b"1"], [b"2", b"3", b"4"]]
    assert not any(f.done() for f in later)
    sends.release()
    async with asyncio.timeout(WAIT):
        await asyncio.gather(*later)
    assert (batches.batches_sent, batches.events_sent) == (2, 4)


async def test_a_failed_batch_fails_only_its_own_events() -> None:
    sends = Sends()
    batches = UsageBatches(sends)
    # Given a batch being sent and an event waiting for the next
    failing = batches.add(b"1")
    await sends.sending()
    waiting = batches.add(b"2")

    # When the first batch fails (the broker away past the reconnect wait)
    sends.fail(ServiceUnavailable("lost the RabbitMQ connection"))

    # Expect its event failed as unavailable (its job goes back to its queue), the next sent
    with pytest.raises(ServiceUnavailable, match="usage batch of 1 events"):
        await failing
    await sends.sending()
    assert sends.batches == [[b"1"], [b"2"]]
    sends.release()
    async with asyncio.timeout(WAIT):
        await waiting


async def test_a_cancelled_wait_leaves_the_rest_of_its_batch() -> None:
    sends = Sends()
    batches = UsageBatches(sends)
    # Given two events in one batch, the first one's job cancelled while it waits (shutdown)
    busy = batches.add(b"0")
    await sends.sending()
    cancelled, kept = batches.add(b"1"), batches.add(b"2")
    sends.release()
    await sends.sending()
    cancelled.cancel()

    # When that batch is confirmed
    sends.release()

    # Expect the other event confirmed all the same
    async with asyncio.timeout(WAIT):
        await asyncio.gather(busy, kept)
    assert sends.batches == [[b"0"], [b"1", b"2"]]


async def test_a_send_cancelled_cancels_the_waits_of_its_batch_and_ends_the_sender() -> None:
    sends = Sends()
    batches = UsageBatches(sends)
    # Given a batch being sent
    waiting = batches.add(b"1")
    await sends.sending()

    # When its send is cancelled (the worker's event loop shutting down)
    sends.fail(asyncio.CancelledError())  # type: ignore[arg-type]

    # Expect its event's wait cancelled rather than failed, and nothing more sent
    async with asyncio.timeout(WAIT):
        await batches.close()
    assert waiting.cancelled()
    assert sends.batches == [[b"1"]]


async def test_a_sender_cancelled_while_it_lingers_cancels_the_waits_and_sends_nothing() -> None:
    sends = Sends()
    batches = UsageBatches(sends, linger=WAIT)
    # Given an event lingering for others
    waiting = batches.add(b"1")
    await asyncio.sleep(0)  # the sender has started, and waits
    sender = next(
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", None) == "UsageBatches._send_waiting"
    )

    # When the sender is cancelled meanwhile (the worker's event loop shutting down)
    sender.cancel()

    # Expect the event's wait cancelled rather than left pending for ever, and nothing sent
    async with asyncio.timeout(WAIT):
        await batches.close()
    assert waiting.cancelled()
    assert sends.batches == []


async def test_a_burst_goes_in_messages_of_at_most_max_events() -> None:
    sends = Sends()
    batches = UsageBatches(sends)
    # Given a batch in flight and more than MAX_EVENTS events finishing meanwhile
    batches.add(b"first")
    await sends.sending()
    burst = [batches.add(b"x") for _ in range(MAX_EVENTS + 1)]

    # When the confirms come
    sends.release()
    await sends.sending()
    sends.release()
    await sends.sending()
    sends.release()
    async with asyncio.timeout(WAIT):
        await asyncio.gather(*burst)

    # Expect the burst in one full message and one of the rest
    assert [len(b) for b in sends.batches] == [1, MAX_EVENTS, 1]
    await batches.close()


async def test_the_tags_of_a_confirmed_batch_are_told_in_one_call_and_a_failed_ones_never() -> None:
    sends = Sends()
    told: list[list[str]] = []

    async def confirmed(tags: list[str]) -> None:
        told.append(tags)

    batches = UsageBatches(sends, linger=0.05, confirmed=confirmed)
    # Given a batch of three events, two of them tagged, whose send fails
    failing = [batches.add(b"1", "a"), batches.add(b"2"), batches.add(b"3", "b")]
    await sends.sending()
    sends.fail(ConnectionError("broker gone"))
    for future in failing:
        with pytest.raises(ServiceUnavailable):
            await future

    # When they are added again and that batch is confirmed
    again = [batches.add(b"1", "a"), batches.add(b"2"), batches.add(b"3", "b")]
    await sends.sending()
    sends.release()
    async with asyncio.timeout(WAIT):
        await asyncio.gather(*again)
        await batches.close()

    # Expect the confirmed batch's tags told once, together; none of the failed one's
    assert told == [["a", "b"]]
