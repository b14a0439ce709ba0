"""How the mock provider behaves: latency and faults, per upstream model name.

Configs are strict (unknown fields are refused) so that a typo in a test fails loudly
instead of silently injecting nothing.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Behavior(BaseModel):
    """Latency and faults for calls to one model.

    Faults are decided in this order: the rate limit (429), then ``fail_first``, then
    ``timeout_rate``, then ``error_rate``. ``latency_ms`` delays every answer except a hang;
    requests the provider would refuse as invalid are answered 400 at once, free of faults.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_ms: float = Field(default=0, ge=0)
    error_rate: float = Field(default=0, ge=0, le=1)
    """Fraction of calls answered with ``error_status``."""
    error_status: int = Field(default=500, ge=400, le=599)
    error_body: dict[str, Any] | None = None
    """JSON body of injected errors instead of the provider's default for ``error_status``."""
    fail_first: int = Field(default=0, ge=0)
    """The first N calls for the model fail with ``error_status``: deterministic faults."""
    timeout_rate: float = Field(default=0, ge=0, le=1)
    """Fraction of calls that hang ``hang_s`` seconds, then close the connection unanswered."""
    hang_s: float = Field(default=30, ge=0)
    rate_limit_rpm: int | None = Field(default=None, ge=1)
    """Requests per minute the model admits, as a token bucket refilled continuously (a
    sixtieth of it every second); a call finding the bucket empty gets 429 and is not counted."""
    rate_limit_burst: int | None = Field(default=None, ge=1)
    """The bucket's capacity: calls admitted at once after a quiet spell; unset, a whole
    minute's. Real providers enforce their limits over shorter periods (OpenAI: 60,000 RPM
    may be enforced as 1,000 requests a second), which ``rate_limit_rpm / 60`` mimics."""
    chunk_gap_ms: float = Field(default=0, ge=0)
    """A streamed answer's events leave this far apart (the first after ``latency_ms``), as a
    provider generating slowly sends them."""
    stream_stall_after: int | None = Field(default=None, ge=1)
    """A streamed answer stops for ``hang_s`` seconds after this many events (a provider
    stalling mid-stream), then goes on."""
    stream_cut_after: int | None = Field(default=None, ge=0)
    """A streamed answer stops after this many events and the connection is closed mid-body
    (with ``stream_error``: the error event is sent there instead, and the body ends)."""
    body_cut_after: int | None = Field(default=None, ge=0)
    """A plain (not streamed) answer sends its 200 headers, with the whole body's
    Content-Length, and this many bytes of its body; then the connection is closed mid-body."""
    stream_error: dict[str, Any] | None = None
    """The ``error`` object of an error event a streamed answer carries (after a 200) in
    place of its end, as providers report failures mid-stream."""
    refusal: str | None = None
    """Every answer is this refusal, as OpenAI's ``refusal`` (``content`` null), whole or
    streamed as ``delta.refusal``; OpenAI's wire only (Anthropic's refusals end with
    ``stop_reason: refusal`` instead)."""
    layout: Literal["plain", "split", "tool_first"] = "plain"
    """How Anthropic answers lay out their blocks, as real ones may: ``plain`` one text (or
    tool_use) block, ``split`` the text in two text blocks (its first word, then the rest),
    ``tool_first`` a tool call followed by a text block (``TEXT_AFTER_TOOL``)."""
    tool_input: str | None = None
    """What the model calls a tool with, in place of ``{}``: an OpenAI function call's
    ``arguments`` as this very text (JSON or not: OpenAI's reference warns that a model's
    may not be valid JSON, and one cut by ``max_tokens`` is not), whole or streamed; an
    Anthropic ``tool_use`` block's ``input`` as this text parsed (an array, say, as a
    misbehaving deployment might send)."""
    usage: dict[str, Any] | None = None
    """Every answer reports this usage object in place of its own counts, whole or streamed
    (OpenAI's last chunk; Anthropic's message_start and message_delta), as a misbehaving
    server might: ``{}`` for none, negative or huge counts, counts as strings."""
    retry_after: float | None = Field(default=None, ge=0)
    """Seconds announced on 429s: ``Retry-After`` (rounded up) and ``retry-after-ms``. Unset,
    a rate-limit 429 announces when the bucket next admits a call, an injected 429 one second."""

    @model_validator(mode="after")
    def _burst_needs_a_rate(self) -> Behavior:
        if self.rate_limit_burst is not None and self.rate_limit_rpm is None:
            raise ValueError("rate_limit_burst: set rate_limit_rpm too")
        return self


class MockConfig(BaseModel):
    """The whole mock: a default behaviour and overrides keyed by the model named in requests."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: Behavior = Behavior()
    models: dict[str, Behavior] = Field(default_factory=dict)
    seed: int | None = None
    """Seeds the draws for ``error_rate`` and ``timeout_rate``, for reproducible runs."""
    log_size: int = Field(default=10_000, ge=0)
    """How many recent calls the request log keeps."""

    def behavior(self, model: str) -> Behavior:
        return self.models.get(model, self.default)
