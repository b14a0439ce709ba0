"""What a job will cost before it runs: tokens and USD, reserved now and settled after.

Prompt tokens are estimated as characters / 4 plus a few per message, with no tokenizer:
one tokenizer would be wrong for every other provider (Anthropic and self-hosted models count
differently), the rule is OpenAI's own rule of thumb for English, and any error only affects
the reservation, which is settled with the provider's real usage after the call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

import orjson

from queuegate.messages import ChatJob
from queuegate.registry import TeamConfig
from queuegate.spend import to_nano
from router.catalog import Catalog, Deployment

PER_MESSAGE = 3
"""Tokens the chat format adds around each message (role, separators) on OpenAI's models."""
_PER_MTOK = Decimal(1_000_000)


@dataclass(frozen=True)
class Estimate:
    prompt_tokens: int
    output_tokens: int
    cost_nano: int
    """The dearest deployment along the job's chain: the worst case of its fallbacks."""

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens

    def usd_at(self, deployment: Deployment) -> Decimal:
        """What the estimated tokens cost at ``deployment``'s prices."""
        return _usd(deployment, self.prompt_tokens, self.output_tokens)


def _usd(deployment: Deployment, prompt: int, output: int) -> Decimal:
    return (prompt * deployment.input_per_mtok + output * deployment.output_per_mtok) / _PER_MTOK


def prompt_tokens(job: ChatJob) -> int:
    chars = 0
    for message in job.messages:
        if isinstance(message.content, str):
            chars += len(message.content)
        elif message.content is not None:
            chars += len(orjson.dumps(message.content))
        if message.tool_calls:
            chars += len(orjson.dumps(message.tool_calls))
    if job.params.tools:
        chars += len(orjson.dumps(job.params.tools))
    return math.ceil(chars / 4) + PER_MESSAGE * len(job.messages)


def estimate(job: ChatJob, catalog: Catalog, config: TeamConfig, default_output: int) -> Estimate:
    """What admission reserves for ``job`` of a team with ``config``. Its output is, for each
    of its ``n`` choices (the provider bills them all), the job's ``max_tokens`` or
    ``max_completion_tokens``, else the team's expected output, else ``default_output`` (the
    gateway's ``expected_output_tokens``)."""
    prompt = prompt_tokens(job)
    choice = job.params.output_limit or config.expected_output_tokens or default_output
    output = choice * job.params.choices
    price = max(
        _usd(d, prompt, output)
        for alias in catalog.chain(job.model, job.fallbacks)
        for d in catalog.resolve(alias).deployments
    )
    return Estimate(prompt, output, to_nano(price))
