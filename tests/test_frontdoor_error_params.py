"""An OpenAI-format refusal names the field at fault in ``param``, as OpenAI's own errors do,
so a caller can tell which of its parameters to fix without reading the message; sent with
the official ``openai`` SDK to a real front door."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from mockprovider import Behavior, MockConfig
from queuegate.settings import Settings
from tests.frontdoor_support import HELLO, Door, open_door

PARAMS: list[tuple[dict[str, Any], str | None]] = [
    ({"temperature": 3}, "temperature"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 5, "max_completion_tokens": 5}, "max_tokens"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"messages": []}, "messages"),
    ({"stream_options": {"include_usage": "yes"}, "stream": True}, "stream_options.include_usage"),
    # No one field is at fault: OpenAI's "Unrecognized request argument" has no param either.
    ({"extra_body": {"min_p": 0.1}}, None),
]
"""Invalid fields of a request, and the ``param`` of each refusal."""


@pytest.fixture
async def door(settings: Settings) -> AsyncIterator[Door]:
    async with open_door(settings) as opened:
        yield opened


async def test_a_refused_request_names_its_offending_parameter(door: Door) -> None:
    async with door.client() as client:
        for fields, param in PARAMS:
            # When a request is refused for one of its fields
            request: dict[str, Any] = {"model": "gpt-4o-mini", "messages": HELLO, **fields}
            with pytest.raises(openai.BadRequestError) as refused:
                await client.chat.completions.create(**request)

            # Expect param to be that field's path, the one the message starts with
            error = refused.value.body
            assert isinstance(error, dict)
            assert refused.value.param == error["param"] == param, (fields, error["message"])
            if param is not None:
                assert error["message"].startswith(param), error["message"]


PROVIDER_REFUSAL = {
    "error": {
        "message": "Invalid value for 'logit_bias': token 99999999 is out of range.",
        "type": "invalid_request_error",
        "param": "logit_bias",
        "code": "invalid_value",
    }
}
"""An OpenAI error object naming the field at fault, as a provider sends it with a 400."""


async def test_a_providers_refusal_keeps_the_field_it_names(settings: Settings) -> None:
    # Given a provider that refuses every request, naming the field at fault in param
    refusing = MockConfig(
        models={
            "gpt-4o-mini": Behavior(error_rate=1.0, error_status=400, error_body=PROVIDER_REFUSAL)
        }
    )
    async with open_door(settings, mock_config=refusing) as door, door.client() as client:
        # When a request is sent through the front door, whole and streamed
        with pytest.raises(openai.BadRequestError) as whole:
            await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        with pytest.raises(openai.BadRequestError) as streamed:
            await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True)
        # and as a job on the queue
        async with door.gateway.client("alpha") as queue:
            job = queue.job("gpt-4o-mini", HELLO)
            result = await (await queue.submit(job)).result(20)

    # Expect the provider's param in the job's result and in both OpenAI-format errors
    assert result.error is not None and result.error.code == "invalid_request"
    assert result.error.param == "logit_bias"
    for refused in (whole.value, streamed.value):
        assert refused.param == "logit_bias", refused.body
        assert isinstance(refused.body, dict) and refused.body["code"] == "invalid_request"
