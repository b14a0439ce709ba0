"""A team's PII policy applied to a job before it leaves for the provider.

Everything the provider would receive is screened, not only the messages' text: tool calls
and their arguments, names, ``params.user``, tool definitions and every parameter passed
through (see ``workers.pii.texts``).
"""

from __future__ import annotations

from pydantic import ValidationError

from queuegate.errors import InvalidRequest
from queuegate.messages import ChatJob
from queuegate.tenancy import PiiPolicy
from workers.pii.screening import Screening, screen
from workers.pii.texts import GATEWAY_ONLY, outgoing


async def screen_job(job: ChatJob) -> Screening:
    """The findings in everything of ``job`` that reaches a provider."""
    return await screen(outgoing(job))


def apply(job: ChatJob, policy: PiiPolicy, screening: Screening) -> ChatJob:
    """The job to send: redacted under ``redact`` when it holds PII, else unchanged.

    Raises InvalidRequest under ``block`` when it holds any, and under ``redact`` when PII
    sits where it cannot be rewritten (an id, a key); the message names the families, never
    the values.
    """
    found = screening.kinds
    if policy in ("off", "warn") or not found:
        return job
    if policy == "block":
        raise InvalidRequest(
            f"the prompt contains personal data ({', '.join(found)}) and team "
            f"{job.team!r} blocks it: remove it or ask for the redact policy"
        )
    fields = screening.redacted(keep_structure=True)
    try:
        return ChatJob.model_validate({**job.model_dump(include=set(GATEWAY_ONLY)), **fields})
    except ValidationError as exc:  # a rewritten value a field's type refuses
        where = ".".join(str(part) for part in exc.errors()[0]["loc"])
        raise InvalidRequest(
            f"personal data in {where} cannot be redacted without breaking the request: remove it"
        ) from exc
