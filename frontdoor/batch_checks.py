"""The checks of a batch's requests, by format: each as the synchronous endpoint of its API
checks a body (a Message Batch request's ``params`` as ``/v1/messages``, an OpenAI line's
``body`` as ``/v1/chat/completions``). The front door's batch runner and ``queuegate batch
submit``/``collect`` pass them to the batch pipeline (``producer.batch``, which may not
import the front door), so a batch refuses, by name, what the endpoint refuses, whichever
way it came in::

    checks = batch_checks(Limits.of(settings, catalog))
    await submit_batch(settings, path, team=team, checks=checks)
"""

from __future__ import annotations

import functools

from frontdoor.anthropic_request import params_refusal
from frontdoor.chat_request import Limits
from frontdoor.openai_request import body_refusal
from producer.batch.formats import FormatName
from producer.batch.jobs import Check


def batch_checks(limits: Limits) -> dict[FormatName, Check]:
    return {
        "openai": functools.partial(body_refusal, limits=limits),
        "anthropic": params_refusal,
    }


__all__ = ["batch_checks"]
