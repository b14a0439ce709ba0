"""A job's proof of its team's API key, which never carries the key itself.

A job can outlive its call in a queue: the broker dead-letters it when it expires or keeps
crashing workers, and an operator reads and replays it later. So the producer sends, instead
of the key, its id and an HMAC-SHA256 over this job alone (job id, team, SHA-256 of the body),
keyed by the key's stored hash (``hash_api_key``). The worker looks the hash up by key id and
recomputes the proof; a proof copied from a dead letter proves nothing but that one job, which
the worker answers once (its outcome is stored under the job id)::

    headers = sign_job(api_key, job_id=job.job_id, team=job.team, body=body)
    ...
    if not proof_matches(stored_hash, headers[PROOF_HEADER], job_id=..., team=..., body=...):
        raise Unauthorized(...)

Whoever can read the stored hashes (the registry's database) could sign jobs: the database
is trusted like the workers that read it. A key itself is never stored or sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from queuegate.errors import ConfigError
from queuegate.tenancy import api_key_id, hash_api_key
from queuegate.topology import header_text

KEY_ID_HEADER = "x-queuegate-key-id"
PROOF_HEADER = "x-queuegate-proof"
API_KEY_VARIABLES = ("QUEUEGATE_API_KEY", "QUEUEGATE_TEAM_API_KEY")
"""The environment variables the CLI's team commands read a team's API key from, either."""
PASS_API_KEY = f"pass --api-key or set {API_KEY_VARIABLES[0]} (or {API_KEY_VARIABLES[1]})"
"""How a CLI user gives a team's API key: every message asking for one says it so."""


def job_proof(key_hash: str, *, job_id: str, team: str, body: bytes) -> str:
    """The HMAC of one job under a key's stored hash (hex)."""
    # JSON, so that no job id or team can be shifted into the other field.
    signed = json.dumps([job_id, team, hashlib.sha256(body).hexdigest()]).encode()
    return hmac.new(key_hash.encode(), signed, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Signer:
    """Signs jobs for one API key from its id and stored hash, which is all a proof needs.

    A client derives it from the key it holds (``Signer.of(key)``); the HTTP front door's
    batch runner reads it from ``api_keys`` by the id of the key that created a batch, so it
    can act for that key long after the request (and the key it carried) is gone, the key
    itself kept nowhere.
    """

    key_id: str
    key_hash: str = field(repr=False)

    @classmethod
    def of(cls, api_key: str) -> Signer:
        key_id = api_key_id(api_key)
        if key_id is None:
            raise ConfigError(
                "api_key is not a queuegate API key: pass the key `queuegate teams` printed"
            )
        return cls(key_id, hash_api_key(api_key))

    def sign(self, *, job_id: str, team: str, body: bytes) -> dict[str, str]:
        proof = job_proof(self.key_hash, job_id=job_id, team=team, body=body)
        return {KEY_ID_HEADER: self.key_id, PROOF_HEADER: proof}


ApiKey = str | Signer
"""What a client proves a team with: the key itself, or a Signer."""


def sign_job(api_key: ApiKey, *, job_id: str, team: str, body: bytes) -> dict[str, str]:
    """The headers that prove ``api_key`` for this job: its id and the job's proof."""
    signer = api_key if isinstance(api_key, Signer) else Signer.of(api_key)
    return signer.sign(job_id=job_id, team=team, body=body)


def proof_matches(key_hash: str, proof: str, *, job_id: str, team: str, body: bytes) -> bool:
    """Whether ``proof`` is this job's under the key whose stored hash is ``key_hash``."""
    expected = job_proof(key_hash, job_id=job_id, team=team, body=body)
    return hmac.compare_digest(expected.encode(), proof.encode())


class Sent(Protocol):
    """What ``message_digest`` reads of a message besides its body: the properties of a
    delivery (aio-pika's message) or of a publish (pamqp's) alike."""

    @property
    def content_type(self) -> str | None: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def user_id(self) -> str | None: ...
    @property
    def headers(self) -> Mapping[str, object] | None: ...


def message_digest(body: bytes, sent: Sent) -> str:
    """What tells one delivered message from another: 32 hex digits, half a
    ``request_digest``'s length, so that neither is ever taken for the other.

    A job refused before it was admitted (unreadable, or not proven its team's) has no
    request to name: its result names this digest of the message instead, which its own
    publisher knows. It covers all a worker reads of the message to refuse it: its body,
    content type and message id, its sender's ``user_id`` and key (``x-queuegate-key-id``,
    ``x-queuegate-proof``). A copy of a client's message refused for any of them (sent
    without its sender's identity, as ``text/plain``, under another message id, with
    another key id) names another message, and is not taken for the client's own."""
    headers = sent.headers or {}
    # JSON, so that no value can be shifted into another field; "" read as absent, as the
    # worker reads each of them.
    named = [
        sent.content_type or None,
        sent.message_id or None,
        sent.user_id or None,
        header_text(headers.get(KEY_ID_HEADER)) or None,
        header_text(headers.get(PROOF_HEADER)) or None,
    ]
    digest = hashlib.sha256(body)
    digest.update(json.dumps(named).encode())
    return digest.hexdigest()[:32]


__all__ = [
    "API_KEY_VARIABLES",
    "KEY_ID_HEADER",
    "PASS_API_KEY",
    "PROOF_HEADER",
    "ApiKey",
    "Sent",
    "Signer",
    "job_proof",
    "message_digest",
    "proof_matches",
    "sign_job",
]
