"""What a team's security settings do to a job: prove its publisher, apply the PII policy,
and mark its outcome for the audit log (identity, PII found, captured content).

    admitted = await gate.admit(message, job, team)  # Unauthorized
    sent = await admitted.screen()                    # InvalidRequest when the policy blocks
    outcome = served(sent, ..., marks=admitted.marks(digest))  # also for failed outcomes
    outcome = await admitted.stamp(outcome)           # only when marks was None (content kept)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aio_pika.abc import AbstractIncomingMessage

from queuegate.messages import AuditContent, ChatJob, request_digest, shared_fields
from queuegate.signing import KEY_ID_HEADER
from queuegate.tenancy import TeamSecurity
from queuegate.topology import (
    HEADER_FIRST_DETAIL,
    HEADER_FIRST_REASON,
    HEADER_REPLAY_OF,
    header_text,
)
from queuegate.visible import clipped
from workers.identity import Identities
from workers.outcome import Marks, Outcome
from workers.pii.policy import apply, screen_job
from workers.pii.screening import Screening, redacted


@dataclass
class Admitted:
    job: ChatJob
    identity: str
    security: TeamSecurity
    sent: ChatJob | None = None
    """The job as the provider sees it (redacted when the team's policy says so)."""
    pii: list[str] = field(default_factory=list)
    screening: Screening | None = None
    """The findings in the job, once screened: the audit's redaction reuses them."""

    @property
    def screens(self) -> bool:
        """Whether ``screen`` reads the prompt: it may then refuse or redact it."""
        return self.security.pii != "off" or self.security.capture == "redacted"

    async def screen(self) -> ChatJob:
        """Apply the team's PII policy; raises InvalidRequest when it refuses the prompt."""
        policy = self.security.pii
        if self.screens:
            self.screening = await screen_job(self.job)
            if policy != "off":
                self.pii = self.screening.kinds  # kept even when the policy then refuses
            # Held for the call, as the job is (see JobProcessor._decode).
            self.sent = shared_fields(apply(self.job, policy, self.screening))
        else:
            self.sent = self.job
        return self.sent

    def marks(self, digest: str) -> Marks | None:
        """What to build the job's outcome with (``served``, ``failed``), its request's
        ``digest`` given: None for a team that captures content, whose outcome is stamped
        once built (``stamp``), for that content is read from it."""
        if self.security.capture != "none":
            return None
        return Marks(self.identity, self._pii(), digest)

    def _pii(self) -> str | None:
        return ",".join(self.pii) or None

    async def stamp(self, outcome: Outcome, digest: str | None = None) -> Outcome:
        """The outcome with its usage event carrying identity, PII flags and captured content,
        and its result the digest of the request it answers (as sent, before any redaction):
        a conflict and the first request's answer share a job id on a reply queue.
        ``digest``: that digest, when the job's claim has it already (``Claim.fingerprint``)."""
        content = None
        capture = self.security.capture
        if capture != "none":
            response = outcome.result.response
            if capture == "full" and self.sent is not None:
                prompt = [m.model_dump(mode="json", exclude_none=True) for m in self.sent.messages]
            else:
                # An unscreened prompt (a refused job) is never kept in full.
                screening = self.screening or await screen_job(self.job)
                prompt = screening.redacted(keep_structure=False)["messages"]
                response = await redacted(response)
            content = AuditContent(capture=capture, prompt=prompt, response=response)
        update = {"identity": self.identity, "pii": self._pii(), "content": content}
        if digest is None:
            digest = request_digest(self.job)
        result = outcome.result.model_copy(update={"request": digest})
        return outcome.model_copy(
            update={"result": result, "usage": outcome.usage.model_copy(update=update)}
        )


class Gate:
    def __init__(self, identities: Identities) -> None:
        self._identities = identities

    async def admit(self, message: AbstractIncomingMessage, job: ChatJob, team: str) -> Admitted:
        proof = await self._identities.prove(message, team, job.job_id)
        return Admitted(job, proof.identity, proof.security)

    @staticmethod
    def claimed(message: AbstractIncomingMessage, outcome: Outcome) -> Outcome:
        """A refused job's outcome, its audit row naming who it claimed to come from."""
        parts = [f"user_id={message.user_id}"] if message.user_id else []
        key_id = header_text((message.headers or {}).get(KEY_ID_HEADER))
        if key_id is not None:
            parts.append(f"api_key={clipped(key_id)}")  # an id, never a key: the key is never sent
        identity = f"claimed:{','.join(parts) or 'nobody'}"
        usage = outcome.usage.model_copy(update={"identity": identity})
        return outcome.model_copy(update={"usage": usage})

    def from_frontdoor(self, message: AbstractIncomingMessage) -> bool:
        """Whether the front door itself published the job (its trace context is then the
        gateway's own, continued by the job's span)."""
        return self._identities.published_by_frontdoor(message)

    def first_user(self, message: AbstractIncomingMessage) -> str:
        """The user the job was first published under: an operator's replay names it."""
        if self._identities.is_operator(message):
            named = header_text((message.headers or {}).get(HEADER_REPLAY_OF))
            if named is not None:
                return named
        return message.user_id or ""

    def first_cause(self, message: AbstractIncomingMessage) -> tuple[str, str] | None:
        """Why a replayed job was first dead-lettered, as its operator's replay recorded it."""
        if not self._identities.is_operator(message):
            return None  # a team's own header proves nothing
        headers = message.headers or {}
        reason = header_text(headers.get(HEADER_FIRST_REASON))
        detail = header_text(headers.get(HEADER_FIRST_DETAIL))
        return None if reason is None else (reason, detail or "")

    async def reply_to(self, message: AbstractIncomingMessage, team: str) -> str | None:
        """Where the job's result may go: nowhere when a proven team names another's queue."""
        security = await self._identities.security(team)
        if security.identity == "queue" or self._identities.may_reply(team, message):
            return message.reply_to
        return None
