"""What the client does per job, and no more: each check of a job once, no wait for a
result already here."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import pytest
from pamqp import commands as spec
from pydantic import ValidationError

from producer import GatewayClient
from producer.replies import ReplyBook
from queuegate import messages
from queuegate.broker import json_message
from queuegate.messages import ChatResult, GatewayInfo
from queuegate.settings import Settings
from queuegate.signing import message_digest

HELLO = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def test_a_jobs_messages_and_parameters_are_checked_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a client, and the checks of messages and parameters counted
    calls = {"message": 0, "params": 0}

    def counted(name: str, check: Any) -> Any:
        def run(value: Any) -> Any:
            calls[name] += 1
            return check(value)

        return run

    monkeypatch.setattr(messages, "check_message", counted("message", messages.check_message))
    monkeypatch.setattr(messages, "check_params", counted("params", messages.check_params))
    client = GatewayClient(settings, team="alpha", listen=False)
    # When it builds a job of a message in parts and with tools
    job = client.job("gpt-4o-mini", HELLO, tools=TOOLS, max_tokens=5)
    # Expect each checked once, and the job as asked
    assert calls == {"message": 1, "params": 1}
    assert job.params.tools == TOOLS and job.messages[0].content == HELLO[0]["content"]


def test_a_bad_message_or_parameter_is_refused_naming_it(settings: Settings) -> None:
    # Given a client
    client = GatewayClient(settings, team="alpha", listen=False)
    # When a job has a message of no known role, or a bad parameter
    with pytest.raises(ValidationError) as bad_message:
        client.job("gpt-4o-mini", [{"role": "robot", "content": "Hi"}])
    with pytest.raises(ValidationError) as bad_param:
        client.job("gpt-4o-mini", HELLO, temperature=3)
    # Expect each refused, naming where
    assert bad_message.value.errors()[0]["loc"][:3] == ("messages", 0, "role")
    assert bad_param.value.errors()[0]["loc"] == ("params", "temperature")


def test_a_job_id_the_client_draws_is_a_random_uuids_32_hex_digits(settings: Settings) -> None:
    # Given a client
    client = GatewayClient(settings, team="alpha", listen=False)
    # When it draws the ids of jobs given none
    ids = [client.job("gpt-4o-mini", HELLO).job_id for _ in range(64)]
    # Expect each a version-4 UUID's 32 lowercase hex digits (uuid4().hex), no two alike
    assert all(re.fullmatch("[0-9a-f]{32}", job_id) for job_id in ids), ids
    assert {uuid.UUID(hex=job_id).version for job_id in ids} == {4}
    assert len(set(ids)) == len(ids)


async def test_a_result_already_here_is_taken_without_waiting() -> None:
    # Given a result delivered before anyone waits for it
    book = ReplyBook()
    result = _result("j1")
    assert book.deliver(result)
    # When its job is waited for
    waiting = book.wait("j1", timeout=1)
    # Expect the result at once, the wait never suspended
    with pytest.raises(StopIteration) as done:
        waiting.send(None)
    assert done.value.value is result


async def test_a_result_wakes_its_wait_in_the_turn_it_arrives() -> None:
    # Given a job waited for
    book = ReplyBook()
    waiting = asyncio.create_task(book.wait("j1", timeout=5))
    await asyncio.sleep(0)
    assert not waiting.done()
    # When its result arrives, and the loop takes one turn
    book.deliver(_result("j1"))
    await asyncio.sleep(0)
    # Expect the wait over with it, not a turn later
    assert waiting.done() and waiting.result().job_id == "j1"


async def test_a_wait_that_times_out_leaves_another_wait_of_the_job_waiting() -> None:
    # Given a job waited for twice (the same request submitted twice), once briefly
    book = ReplyBook()
    patient = asyncio.create_task(book.wait("j1", timeout=5))
    with pytest.raises(TimeoutError):
        await book.wait("j1", timeout=0.01)
    # When its result arrives
    book.deliver(_result("j1"))
    # Expect the other wait to get it
    assert (await patient).job_id == "j1"


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"message_id": "j1", "correlation_id": "j1", "reply_to": "q", "user_id": "u"},
        {"expiration_ms": 5000, "headers": {"x-queuegate-sent-ms": 1, "x-k": "v"}},
        {"message_id": "é" * 127, "persistent": False},
    ],
)
def test_a_messages_properties_are_marshalled_as_pamqp_does(values: dict[str, Any]) -> None:
    # Given a message's properties, ours and pamqp's of the same values
    ours = json_message(b"{}", message_type="job", **values).properties
    theirs = spec.Basic.Properties(**{name: getattr(ours, name) for name in ours.__slots__})
    # Expect the same bytes
    assert ours.marshal() == theirs.marshal()


def test_a_property_too_long_for_amqp_is_refused() -> None:
    with pytest.raises(TypeError):
        json_message(b"{}", message_type="job", message_id="x" * 256).properties.marshal()


async def test_a_refusal_of_the_jobs_own_message_is_taken_and_anothers_is_a_stray() -> None:
    # Given a job expected with its request and the message it was published in
    book = ReplyBook()
    sent = json_message(b'{"job_id": "j1"}', message_type="job", message_id="j1")
    other = json_message(b'{"job_id": "j1", "x": 1}', message_type="job", message_id="j1")
    book.expect("j1", "request-digest", sent)
    # When a refusal of another message under the id arrives, then one of its own
    foreign = book.deliver(_result("j1", request=message_digest(other.body, other.properties)))
    own = book.deliver(_result("j1", request=message_digest(sent.body, sent.properties)))
    # Expect the first dropped as a stray, the second taken
    assert (foreign, own, book.strays) == (False, True, 1)


async def test_a_job_published_again_holds_one_name_a_message() -> None:
    # Given a job published three times in the same message
    book = ReplyBook()
    sent = json_message(b'{"job_id": "j1"}', message_type="job", message_id="j1")
    for _ in range(3):
        book.expect("j1", "request-digest", sent)
    # Expect its request's name and its message's, once each
    book.deliver(_result("j1", request="another"))
    assert book._requests["j1"] == ["request-digest", message_digest(sent.body, sent.properties)]


def _result(job_id: str, request: str | None = None) -> ChatResult:
    return ChatResult(
        job_id=job_id,
        team="alpha",
        status="ok",
        gateway=GatewayInfo(model_requested="m"),
        request=request,
    )
