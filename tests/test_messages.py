"""The wire contract: bodies round-trip, unknown fields are ignored, bad ones are refused."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest
from pydantic import ValidationError

from producer.client import job_message
from queuegate.messages import (
    _FIELD_SETS,
    FIELD_SETS_SHARED,
    HTTP_STATUS,
    Attempt,
    ChatJob,
    ChatParams,
    ChatResult,
    ErrorCode,
    ErrorInfo,
    GatewayInfo,
    StreamChunk,
    UsageBatch,
    UsageEvent,
    shared_fields,
)
from queuegate.topology import HEADER_SENT_MS

JOB = {
    "job_id": "j-1",
    "team": "alpha",
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ],
        },
    ],
    "params": {"max_tokens": 50, "temperature": 0.2, "stop": ["\n"], "logprobs": True},
    "fallbacks": ["claude-haiku"],
    "metadata": {"custom_id": "line-7"},
    "deadline": datetime(2030, 1, 1, tzinfo=UTC),
}
"""A job's fields as a producer gives them in Python (its JSON: ``orjson.dumps(JOB)``)."""


def test_job_round_trips_with_content_parts_and_extra_params() -> None:
    job = ChatJob.model_validate(JOB)
    again = ChatJob.model_validate_json(job.model_dump_json())
    assert again == job
    assert again.params.model_extra == {"logprobs": True}
    assert again.deadline == datetime(2030, 1, 1, tzinfo=UTC)


def test_unknown_fields_from_a_newer_producer_are_ignored() -> None:
    job = ChatJob.model_validate_json(orjson.dumps({**JOB, "v": 2, "priority": "high"}))
    assert job.job_id == "j-1"
    assert not hasattr(job, "priority")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"team": None}, "team"),
        ({"team": "Not A Team"}, "team"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"job_id": ""}, "job_id"),
        ({"params": {"max_tokens": 0}}, "params"),
        ({"params": {"n": 0}}, "params"),
        ({"params": {"n": -1}}, "params"),
        ({"params": {"n": 129}}, "params"),
        ({"params": {"n": "2"}}, "params"),
        ({"params": {"n": True}}, "params"),
        ({"deadline": "tomorrow-ish"}, "deadline"),
        # Strings PostgreSQL cannot store, where they would reach it (a call never billed)
        ({"job_id": "j\x00"}, "job_id"),
        ({"job_id": "j\ud800"}, "job_id"),
        ({"model": "gpt\x00"}, "model"),
        ({"fallbacks": ["claude\x00"]}, "fallbacks"),
        ({"metadata": {"custom_id": "line\x007"}}, "metadata"),
        ({"metadata": {"custom\x00id": "7"}}, "metadata"),
        ({"metadata": {"ids": [{"a": "\x00"}]}}, "metadata"),
        ({"params": {"user": "u\x00"}}, "params"),
        # Integers no worker can send (each worker failed on it and returned it)
        ({"params": {"seed": 2**64}}, "params"),
        ({"params": {"seed": -(2**63) - 1}}, "params"),
        ({"params": {"max_tokens": 10**20}}, "params"),
        ({"params": {"max_completion_tokens": 10**7}}, "params"),
        # Not a number: it passed, and the job's estimate failed on it in the worker
        ({"params": {"max_completion_tokens": "100"}}, "params"),
        ({"params": {"max_completion_tokens": 1.5}}, "params"),
        # Both output limits: OpenAI refuses the pair, after the estimate priced one of them
        ({"params": {"max_tokens": 5, "max_completion_tokens": 5}}, "params"),
        ({"params": {"logit_bias": {"50256": 2**64}}}, "params"),
        ({"metadata": {"n": 2**64}}, "metadata"),
    ],
)
def test_invalid_jobs_are_refused_naming_the_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        ChatJob.model_validate({**JOB, **change})
    assert info.value.errors()[0]["loc"][0] == field


LOOSE: list[tuple[dict[str, object], str]] = [
    ({"params": {"max_tokens": "5"}}, "params.max_tokens"),
    ({"params": {"max_tokens": 5.0}}, "params.max_tokens"),
    ({"params": {"max_tokens": True}}, "params.max_tokens"),
    ({"params": {"seed": "7"}}, "params.seed"),
    ({"params": {"temperature": "0.5"}}, "params.temperature"),
    ({"params": {"top_p": True}}, "params.top_p"),
    ({"stream": "yes"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"cache": "false"}, "cache"),
    ({"v": "1"}, "v"),
    ({"deadline": "2030-01-01T00:00:00"}, "deadline"),
    ({"deadline": 1_900_000_000}, "deadline"),
]
"""What a lax reading took as another value than was written: a string for a number, a
number for a boolean, a deadline without a timezone (read in the worker's own)."""


@pytest.mark.parametrize(("change", "where"), LOOSE)
def test_a_job_sent_with_a_value_of_another_type_is_refused_naming_the_field(
    change: dict[str, object], where: str
) -> None:
    # Given a job as it crosses the broker, one field of another type than the field's
    body = orjson.dumps({**JOB, **change})
    # When a worker reads it, Expect it refused naming the field, never taken as another value
    with pytest.raises(ValidationError) as info:
        ChatJob.model_validate_json(body)
    assert ".".join(str(part) for part in info.value.errors()[0]["loc"]) == where
    # ... and so when a producer builds it in Python
    with pytest.raises(ValidationError):
        ChatJob.model_validate({**JOB, **change})


def test_legitimate_jobs_are_read_as_before() -> None:
    # Given what OpenAI's API and its SDKs send: an integer for a number, any timezone
    params = {"temperature": 1, "top_p": 1, "max_tokens": 5, "seed": -3, "n": 2}
    changes = {"params": params, "deadline": "2030-01-01T02:00:00+02:00", "stream": True}
    # When a worker reads the job
    job = ChatJob.model_validate_json(orjson.dumps({**JOB, **changes}))
    # Expect each value as written, the integers as numbers where numbers are asked
    assert job.params.temperature == 1.0 and isinstance(job.params.temperature, float)
    assert job.params.top_p == 1.0 and job.params.max_tokens == 5 and job.params.seed == -3
    assert job.params.choices == 2 and job.stream is True
    assert job.deadline == datetime(2030, 1, 1, tzinfo=UTC)


MISTYPED_PARAMS: list[tuple[dict[str, object], str]] = [
    ({"logit_bias": {"5": "x"}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": 1.5}}, "logit_bias"),
    ({"logit_bias": ["5"]}, "logit_bias"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": "3"}, "top_logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": "1"}, "frequency_penalty"),
    ({"parallel_tool_calls": 1}, "parallel_tool_calls"),
    ({"store": "true"}, "store"),
    ({"metadata": {"k": 1}}, "metadata"),
    ({"modalities": "text"}, "modalities"),
    ({"reasoning_effort": 3}, "reasoning_effort"),
    ({"service_tier": ["auto"]}, "service_tier"),
    ({"prediction": "the answer"}, "prediction"),
    ({"response_format": {"schema": {}}}, "response_format"),
    ({"response_format": {"type": 1}}, "response_format"),
]
"""OpenAI parameters a job keeps among its extras, each of another type than OpenAI's (which
answers each with a 400): all were sent on, called and billed."""


@pytest.mark.parametrize(("params", "name"), MISTYPED_PARAMS)
def test_a_job_parameter_of_another_type_than_openais_is_refused_naming_it(
    params: dict[str, object], name: str
) -> None:
    # Given a job whose parameter has another type than OpenAI's API gives it
    body = orjson.dumps({**JOB, "params": params})
    # When a worker reads it, Expect it refused naming the parameter
    with pytest.raises(ValidationError) as info:
        ChatJob.model_validate_json(body)
    first = info.value.errors()[0]
    assert first["loc"][0] == "params"
    # ... by its path, as the front door's param does (logit_bias.5)
    param = first["ctx"]["error"].param
    assert param.split(".")[0] == name
    assert first["msg"].startswith(f"Value error, {param}: ")
    # ... and so when a producer builds it in Python
    with pytest.raises(ValidationError):
        ChatParams.model_validate(params)


def test_a_mistyped_parameter_is_named_in_a_line_of_bounded_length() -> None:
    with pytest.raises(ValidationError) as info:
        ChatParams.model_validate({"logit_bias": {"5" * 10_000: "x"}})
    assert len(info.value.errors()[0]["msg"]) < 200


def test_openai_parameters_of_openais_types_are_kept_as_sent() -> None:
    # Given what OpenAI's API takes (an integer for a number, null for a parameter left out),
    # and what Anthropic-format jobs carry beside (Anthropic's own tier, top_k, thinking)
    params = {
        "logit_bias": {"50256": -100, "11": 100},
        "logprobs": True,
        "top_logprobs": 0,
        "presence_penalty": 2,
        "frequency_penalty": -1.5,
        "parallel_tool_calls": False,
        "store": None,
        "metadata": {"run": "7"},
        "modalities": ["text"],
        "reasoning_effort": "low",
        "service_tier": "standard_only",
        "prediction": {"type": "content", "content": "the answer"},
        "response_format": {"type": "json_schema", "json_schema": {"name": "a"}},
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "top_k": 5,
        "thinking": {"type": "enabled", "budget_tokens": 2048},
    }
    # When a worker reads the job, Expect each as it was sent
    job = ChatJob.model_validate_json(orjson.dumps({**JOB, "params": params}))
    assert job.params.model_dump() == {**ChatParams().model_dump(), **params}


def test_results_and_usage_events_are_read_strictly_too() -> None:
    # Given a result and a usage event as workers write them
    gateway = GatewayInfo(model_requested="m", cost_usd=Decimal("0.25"), queued_ms=3)
    result = ChatResult(job_id="j", team="alpha", status="ok", gateway=gateway)
    event = UsageEvent(job_id="j", team="alpha", model_requested="m", status="ok")
    # Expect them read back, a cost written as text or a number alike
    assert ChatResult.model_validate_json(result.model_dump_json()) == result
    number = orjson.loads(result.model_dump_json())
    number["gateway"]["cost_usd"] = 0.25
    assert ChatResult.model_validate_json(orjson.dumps(number)).gateway.cost_usd == Decimal("0.25")
    # ... and refused with a count as text or a time without its timezone
    for change in ({"input_tokens": "12"}, {"ts": "2030-01-01T00:00:00"}, {"cached": "true"}):
        with pytest.raises(ValidationError):
            UsageEvent.model_validate_json(
                orjson.dumps(orjson.loads(event.model_dump_json()) | change)
            )


def test_the_largest_sensible_integers_are_kept() -> None:
    for limit in ("max_tokens", "max_completion_tokens"):
        params = {"seed": 2**63 - 1, limit: 1_000_000}
        job = ChatJob.model_validate({**JOB, "params": params, "metadata": {"n": -(2**63)}})
        assert job.params.seed == 2**63 - 1 and job.metadata == {"n": -(2**63)}
        assert job.params.output_limit == 1_000_000


def test_a_nul_in_a_field_is_said_without_the_nul() -> None:
    with pytest.raises(ValidationError) as info:
        ChatJob.model_validate({**JOB, "metadata": {"custom\x00id": "7"}})
    assert "\x00" not in str(info.value.errors()[0]["msg"])
    assert "a NUL byte is not allowed" in str(info.value)


def test_result_round_trips_with_attempts_and_exact_cost() -> None:
    result = ChatResult(
        job_id="j-1",
        team="alpha",
        status="ok",
        response={"choices": [{"message": {"role": "assistant", "content": "hi"}}]},
        gateway=GatewayInfo(
            model_requested="flaky-gpt",
            model_used="claude-haiku",
            provider="anthropic",
            fallback_used=True,
            attempts=[
                Attempt(model="flaky-gpt", deployment="d1", provider="openai", status=500),
                Attempt(model="claude-haiku", deployment="d2", provider="anthropic", status=200),
            ],
            cost_usd=Decimal("0.000123456789"),
        ),
    )
    again = ChatResult.model_validate_json(result.model_dump_json())
    assert again == result
    assert again.content == "hi"
    assert again.gateway.cost_usd == Decimal("0.000123456789")


def test_error_result_and_every_error_code_has_an_http_status() -> None:
    result = ChatResult(
        job_id="j-2",
        team="alpha",
        status="error",
        error=ErrorInfo(code="unknown_model", message="no model 'x'"),
        gateway=GatewayInfo(model_requested="x"),
    )
    assert ChatResult.model_validate_json(result.model_dump_json()) == result
    assert result.content is None
    assert set(HTTP_STATUS) == set(ErrorCode.__args__)  # type: ignore[attr-defined]


def test_stream_chunk_and_usage_event_round_trip() -> None:
    chunk = StreamChunk(job_id="j", seq=3, delta={"content": "lo"})
    assert StreamChunk.model_validate_json(chunk.model_dump_json()) == chunk
    event = UsageEvent(
        job_id="j", team="alpha", model_requested="m", status="error", error_code="rate_limited"
    )
    assert UsageEvent.model_validate_json(event.model_dump_json()) == event


def test_a_job_message_carries_its_send_time_to_the_nearest_millisecond(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Cut down, every job would look half a millisecond older on average; and the header
    # must stay an integer (pamqp sends a float in single precision: seconds off).
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.0007)
    message = job_message(ChatJob.model_validate(JOB), reply_to="replies", user_id=None)
    assert message.properties.headers is not None
    assert message.properties.headers[HEADER_SENT_MS] == 1_800_000_000_001


def test_a_client_job_with_zero_choices_is_refused_naming_n() -> None:
    with pytest.raises(ValidationError, match="n: the number of choices is a whole number"):
        ChatParams.model_validate({"n": 0})
    assert ChatParams.model_validate({"n": 1}).model_extra == {"n": 1}


def test_held_jobs_given_the_same_fields_share_one_fields_set_and_a_copy_changes_only_its_own() -> (
    None
):
    # Given two jobs given the same fields, held (as a worker holds them)
    first = shared_fields(ChatJob.model_validate(JOB))
    second = shared_fields(ChatJob.model_validate({**JOB, "job_id": "j-2"}))
    # Expect one set between them (and between their messages and parameters)
    assert first.model_fields_set is second.model_fields_set
    assert first.messages[0].model_fields_set is second.messages[0].model_fields_set
    assert first.params.model_fields_set is second.params.model_fields_set
    # When one is copied with a field it was not given
    copied = first.model_copy(update={"stream": True})
    # Expect the copy to say so, and neither original to have changed
    assert "stream" in copied.model_fields_set
    assert "stream" not in first.model_fields_set
    # And the copy's set shared again once it is held, with a job given the same fields
    held = shared_fields(ChatJob.model_validate({**JOB, "stream": True}))
    assert shared_fields(copied).model_fields_set is held.model_fields_set
    assert second.model_fields_set == set(JOB)


def test_models_not_held_keep_their_own_fields_sets() -> None:
    # Given the same job read twice, and a batch of two events read as accounting reads it
    body = orjson.dumps(JOB)
    first, second = (ChatJob.model_validate_json(body) for _ in "12")
    event = UsageEvent(job_id="j", team="alpha", model_requested="m", status="ok")
    events = UsageBatch.model_validate_json(
        orjson.dumps({"events": [event.model_dump(mode="json")] * 2})
    ).events
    # Expect each model's set its own (nested models' too): sharing is for held models only
    assert first == second
    assert first.model_fields_set == second.model_fields_set
    assert first.model_fields_set is not second.model_fields_set
    assert first.messages[0].model_fields_set is not second.messages[0].model_fields_set
    assert events[0].model_fields_set is not events[1].model_fields_set


def test_fields_sets_a_team_chooses_are_shared_only_up_to_the_bound() -> None:
    # Given more parameter extras, each under a name of its own, than sets are shared
    params = [
        shared_fields(ChatParams.model_validate({f"x_{i}": 1}))
        for i in range(FIELD_SETS_SHARED + 10)
    ]
    # Expect the table no larger than its bound, and each one's fields its own
    assert len(_FIELD_SETS) <= FIELD_SETS_SHARED
    assert [p.model_fields_set for p in params[-3:]] == [
        {f"x_{i}"} for i in range(FIELD_SETS_SHARED + 7, FIELD_SETS_SHARED + 10)
    ]
