"""The checks of a batch's requests, by format: each as the synchronous endpoint of its API
checks a body (a Message Batch request's ``params`` as ``/v1/messages``, an OpenAI line's
``body`` as ``/v1/chat/completions``; ``queuegate.messages_request``,
``queuegate.openai_request``). The front door's batch runner and ``queuegate batch
submit``/``collect`` pass them to the batch pipeline, so a batch refuses, by name, what the
endpoint refuses, whichever way it came in, and the command line needs nothing of the HTTP
server for it::

    checks = batch_checks(Limits.of(settings, catalog))
    await submit_batch(settings, path, team=team, checks=checks)
"""

from __future__ import annotations

import functools

from producer.batch.formats import FormatName
from producer.batch.jobs import Check
from queuegate.messages_request import params_refusal
from queuegate.openai_request import body_refusal
from queuegate.request_limits import Limits


def batch_checks(limits: Limits) -> dict[FormatName, Check]:
    return {
        "openai": functools.partial(body_refusal, limits=limits),
        "anthropic": params_refusal,
    }


__all__ = ["batch_checks"]
