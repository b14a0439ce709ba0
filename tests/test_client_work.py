"""What the client does per job, and no more: each check of a job once, no wait for a
result already here."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from producer import GatewayClient
from producer.replies import ReplyBook
from queuegate import messages
from queuegate.messages import ChatResult, GatewayInfo
from queuegate.settings import Settings

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


async def test_a_result_already_here_is_taken_without_waiting() -> None:
    # Given a result delivered before anyone waits for it
    book = ReplyBook()
    result = ChatResult(
        job_id="j1", team="alpha", status="ok", gateway=GatewayInfo(model_requested="m")
    )
    assert book.deliver(result)
    # When its job is waited for
    waiting = book.wait("j1", timeout=1)
    # Expect the result at once, the wait never suspended
    with pytest.raises(StopIteration) as done:
        waiting.send(None)
    assert done.value.value is result
