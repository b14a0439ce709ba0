"""OpenAI's chat messages, typed once as its API reference gives them: the front door checks
a request's ``messages`` against ``Message`` (``queuegate.openai_request.ChatRequest``), a
worker a job's (``queuegate.messages.ChatMessage``), so that both refuse the same messages,
naming the field (``messages.0.content.0.image_url.url``), before anything is called.

A job's messages are the canonical format an Anthropic-format request is carried in too
(``queuegate.provider_formats.openai_request``): an assistant turn may send Anthropic's
thinking blocks back (the OpenAI adapter leaves them out), a tool result hold images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal, Self

from pydantic import Discriminator, Field, Tag, TypeAdapter, ValidationError, model_validator

from queuegate.openai_params import OpenAIObject, ParamError, TextPart
from queuegate.value_errors import problem, shown, tagged_by


class ImageURL(OpenAIObject):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(OpenAIObject):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(OpenAIObject):
    data: str
    format: Literal["wav", "mp3"]


class AudioPart(OpenAIObject):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FilePart(OpenAIObject):
    type: Literal["file"]
    file: dict[str, Any]


class RefusalPart(OpenAIObject):
    type: Literal["refusal"]
    refusal: str


class ThinkingPart(OpenAIObject):
    """Anthropic's thinking block, sent back in an assistant turn (``THINKING_PARTS``)."""

    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingPart(OpenAIObject):
    type: Literal["redacted_thinking"]
    data: str


UserPart = Annotated[
    Annotated[TextPart, Tag("text part")]
    | Annotated[ImagePart, Tag("image_url part")]
    | Annotated[AudioPart, Tag("input_audio part")]
    | Annotated[FilePart, Tag("file part")],
    Discriminator(tagged_by("type", "part")),
]
AssistantPart = Annotated[
    Annotated[TextPart, Tag("text part")]
    | Annotated[RefusalPart, Tag("refusal part")]
    | Annotated[ThinkingPart, Tag("thinking part")]
    | Annotated[RedactedThinkingPart, Tag("redacted_thinking part")],
    Discriminator(tagged_by("type", "part")),
]
ToolPart = Annotated[
    Annotated[TextPart, Tag("text part")] | Annotated[ImagePart, Tag("image_url part")],
    Discriminator(tagged_by("type", "part")),
]


class CalledFunction(OpenAIObject):
    name: str
    arguments: str


class FunctionCall(OpenAIObject):
    id: str
    type: Literal["function"]
    function: CalledFunction


class CalledCustom(OpenAIObject):
    name: str
    input: str


class CustomCall(OpenAIObject):
    id: str
    type: Literal["custom"]
    custom: CalledCustom


ToolCall = Annotated[
    Annotated[FunctionCall, Tag("function call")] | Annotated[CustomCall, Tag("custom call")],
    Discriminator(tagged_by("type", "call")),
]


class SystemMessage(OpenAIObject):
    role: Literal["system"]
    content: str | list[TextPart]
    name: str | None = None


class DeveloperMessage(OpenAIObject):
    role: Literal["developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(OpenAIObject):
    role: Literal["user"]
    content: str | list[UserPart]
    name: str | None = None


class AssistantMessage(OpenAIObject):
    role: Literal["assistant"]
    content: str | list[AssistantPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(min_length=1)] | None = None
    function_call: CalledFunction | None = None
    audio: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _says_something(self) -> Self:
        if self.content is None and not self.tool_calls and self.function_call is None:
            raise ValueError("an assistant message needs content, or tool_calls")
        return self


class ToolMessage(OpenAIObject):
    role: Literal["tool"]
    content: str | list[ToolPart]
    tool_call_id: str


Message = Annotated[
    Annotated[SystemMessage, Tag("system message")]
    | Annotated[DeveloperMessage, Tag("developer message")]
    | Annotated[UserMessage, Tag("user message")]
    | Annotated[AssistantMessage, Tag("assistant message")]
    | Annotated[ToolMessage, Tag("tool message")],
    Discriminator(tagged_by("role", "message")),
]


_MESSAGE: TypeAdapter[Any] = TypeAdapter(Message)


def check_message(message: dict[str, Any]) -> None:
    """Refuse (ParamError, its path inside the message: ``content.0.image_url.url``) a message
    of another shape, type or value than OpenAI's."""
    try:
        _MESSAGE.validate_python(message)
    except ValidationError as exc:
        deepest = max(exc.errors(include_url=False), key=lambda e: len(e["loc"]))
        where, reason = problem(deepest, message)
        raise ParamError(where, reason) from None


def unanswered_tool_calls(messages: Sequence[Any]) -> ParamError | None:
    """The error of an assistant message's tool calls that a message other than a tool's
    answer follows before each call is answered (or that the conversation ends on once some
    are answered), of a tool message answering no call of the assistant message before it,
    and of an assistant message giving two of its calls one id, as OpenAI refuses them
    (attacks' were published and called); None when each call is answered, or the calls end
    the conversation unanswered. The messages are a request's (dicts) or a job's
    (``ChatMessage``: its fields are read as attributes)."""
    asked: set[Any] = set()
    answered = False
    at = 0
    for index, message in enumerate(messages):
        role = _field(message, "role")
        if role == "tool":
            answer = _field(message, "tool_call_id")
            if answer not in asked:
                return ParamError(
                    f"messages.{index}.tool_call_id",
                    f"{shown(str(answer))!r} answers no tool call of the assistant message "
                    "before it",
                )
            asked.discard(answer)
            answered = True
            continue
        if asked:
            return _unanswered(at, asked)
        calls = _field(message, "tool_calls") if role == "assistant" else None
        ids = [call.get("id") for call in calls or [] if isinstance(call, dict)]
        asked, answered, at = set(ids), False, index
        if len(asked) < len(ids):
            twice = next(id_ for id_ in ids if ids.count(id_) > 1)
            return ParamError(
                f"messages.{index}.tool_calls",
                f"two calls have the id {shown(str(twice))!r}: each call needs an id of its own",
            )
    return _unanswered(at, asked) if asked and answered else None


def _field(message: Any, name: str) -> Any:
    """A field of a request's message (a dict) or of a job's (``ChatMessage``)."""
    return message.get(name) if isinstance(message, dict) else getattr(message, name, None)


def _unanswered(at: int, asked: set[Any]) -> ParamError:
    return ParamError(
        f"messages.{at}.tool_calls",
        "an assistant message with tool_calls must be followed by tool messages answering "
        "each tool_call_id; unanswered: " + ", ".join(sorted(shown(str(call)) for call in asked)),
    )


__all__ = ["Message", "check_message", "unanswered_tool_calls"]
