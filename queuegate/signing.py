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
from dataclasses import dataclass, field

from queuegate.errors import ConfigError
from queuegate.tenancy import api_key_id, hash_api_key

KEY_ID_HEADER = "x-queuegate-key-id"
PROOF_HEADER = "x-queuegate-proof"


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


__all__ = [
    "KEY_ID_HEADER",
    "PROOF_HEADER",
    "ApiKey",
    "Signer",
    "job_proof",
    "proof_matches",
    "sign_job",
]
