"""Every Redis key queuegate writes, in one place, under the namespace prefix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str

    def result(self, team: str, job_id: str) -> str:
        """A finished job's result and usage event, so a redelivery is answered, not re-run.

        Per team: job ids are chosen by producers, so one team's id must never find another's.
        """
        return f"{self.prefix}:result:{team}:{job_id}"

    def accepted(self, team: str, job_id: str) -> str:
        """Set by the HTTP front door when it publishes a job, for as long as its outcome is
        kept: ``GET /v1/jobs/<id>`` tells a job still on its way from an unknown one."""
        return f"{self.prefix}:accepted:{team}:{job_id}"

    def claim(self, team: str, job_id: str) -> str:
        """The delivery answering a job (hash: request fingerprint, owner, lease, the call in
        flight, calls lost with lapsed owners), from before its first call until its outcome
        is stored (workers/lua/claim.lua)."""
        return f"{self.prefix}:claim:{team}:{job_id}"

    def claimed(self, claim: str) -> tuple[str, str]:
        """The team and job id a claim key (``claim``) is of. The team is that of the queue
        the job came on (a worker checks the job's against it before claiming), and a team
        name has no ':', so the job id, which the producer chose, cannot name another team."""
        team, _, job_id = claim.removeprefix(f"{self.prefix}:claim:").partition(":")
        return team, job_id

    @property
    def lapsing(self) -> str:
        """Sorted set: the claim keys of jobs with a deadline whose delivery recorded a
        provider call, by when that deadline and a lease have passed; a claim leaves it when
        its outcome is stored. A job that expired in its queue after its worker died
        mid-call is billed from it (workers/lua/sweep.lua)."""
        return f"{self.prefix}:lapsing"

    def failures(self, team: str, job_id: str) -> str:
        """How many of a job's deliveries failed (died in a provider call, or were returned
        on a failure): past the delivery limit it is dead-lettered (workers/lua/claim.lua)."""
        return f"{self.prefix}:failures:{team}:{job_id}"

    @property
    def memory_epoch(self) -> str:
        """Milliseconds since the epoch from which Redis may be missing stored outcomes (it
        lost its data then, or a failover its last writes): jobs are checked against
        PostgreSQL's usage rows until ``result_ttl`` after it; 0: nothing to forget;
        negative: provisional, found missing then with nothing accounted before it yet (see
        workers.claims). Written by the first worker to find it missing; removed by the first
        claim on a new primary (``replication``)."""
        return f"{self.prefix}:memory-epoch"

    @property
    def replication(self) -> str:
        """The replication id of the Redis primary the claims last ran on: a new one (a
        replica promoted, a restart) may lack the last writes of the one before, so the
        memory epoch goes with it (workers/lua/claim.lua)."""
        return f"{self.prefix}:replication-id"

    def once(self, name: str) -> str:
        """The replies of one round trip of the admission scripts, kept a few seconds so that
        the round trip, sent again, is not run again (workers/admission/lua/batch.lua)."""
        return f"{self.prefix}:once:{name}"

    def dashboard_session(self, session_id: str) -> str:
        """A dashboard sign-in (hash: the key's owner and id, the CSRF token; never the key),
        expiring with the session."""
        return f"{self.prefix}:dashboard:session:{session_id}"

    def dashboard_sessions(self, key_id: str) -> str:
        """The dashboard sessions one key opened (sorted set: session id by when it began)."""
        return f"{self.prefix}:dashboard:sessions:{key_id}"

    def dashboard_generation(self, team: str) -> str:
        """The generation of a team's dashboard sessions (a random token): a session of the
        team lives while it holds the current one; disabling the team draws a new one."""
        return f"{self.prefix}:dashboard:generation:{team}"

    def dashboard_sign_in(self, form_id: str) -> str:
        """A sign-in form handed out (its CSRF token), until it is posted or expires."""
        return f"{self.prefix}:dashboard:sign-in:{form_id}"

    def failed_keys(self, client: str) -> str:
        """Wrong keys one client address presented in the current window (a count)."""
        return f"{self.prefix}:failed-keys:{client}"

    def proven_key(self, key_hash: str) -> str:
        """A key the front door found live (by its SHA-256, never the key): looked up even
        from an address locked out for wrong keys."""
        return f"{self.prefix}:proven-key:{key_hash}"

    # Live stats: written by workers every few seconds, read by `queuegate status`.

    @property
    def live_workers(self) -> str:
        """Sorted set: worker name → time of its last snapshot (seconds since the epoch)."""
        return f"{self.prefix}:live:workers"

    @property
    def live_draining(self) -> str:
        """Sorted set: worker name → time of its last snapshot, of the workers draining (a
        clean stop): out of ``live_workers``, so that no ``teams set`` waits for them."""
        return f"{self.prefix}:live:draining"

    def live_worker(self, worker: str) -> str:
        """A worker's snapshot (JSON): in-flight per team, breaker states, bucket fills;
        ``draining`` once it stops cleanly."""
        return f"{self.prefix}:live:worker:{worker}"

    def live_team(self, team: str, window: int) -> str:
        """Hash of one time window's counts for a team: taken, finished, errors."""
        return f"{self.prefix}:live:team:{team}:{window}"

    def live_team_seconds(self, team: str, window: int) -> str:
        """Hash of the same window's counts per second: ``<name>:<second of the window>``."""
        return f"{self.prefix}:live:team-seconds:{team}:{window}"

    def live_waits(self, team: str) -> str:
        """List of the team's most recent queue waits (ms), newest first."""
        return f"{self.prefix}:live:waits:{team}"

    def live_deployment(self, deployment: str, window: int) -> str:
        """Hash of one time window's provider calls for a deployment: calls, errors."""
        return f"{self.prefix}:live:deployment:{deployment}:{window}"

    def live_deployment_seconds(self, deployment: str, window: int) -> str:
        """Hash of the same window's calls per second: ``<name>:<second of the window>``."""
        return f"{self.prefix}:live:deployment-seconds:{deployment}:{window}"

    def live_spend(self, team: str, month: str) -> str:
        """The team's spend in a month (``YYYY-MM``) as the workers saw it: an integer of
        nano-USD, each job's cost as its ledger counts it (INCRBY, exact)."""
        # Not ``live:spend:``, the key workers of earlier versions add float USD to
        # (INCRBYFLOAT): during a rolling upgrade an old and a new worker never add to the same
        # key, where each would fail on or corrupt the other's number.
        return f"{self.prefix}:live:spend-nano:{team}:{month}"

    def team_bucket(self, team: str, model: str | None = None) -> str:
        """A team's token bucket (hash: requests, tokens, last refill), or one of its models'."""
        base = f"{self.prefix}:bucket:team:{team}"
        return base if model is None else f"{base}:model:{model}"

    def deployment_bucket(self, deployment: str) -> str:
        """A provider account's bucket, shared by every team and every worker."""
        return f"{self.prefix}:bucket:deployment:{deployment}"

    def deployment_line(self, deployment: str) -> str:
        """The teams waiting for a provider account's bucket, in every worker, in turn (hash:
        team -> when it started waiting, until when its entry holds; ``lua/take.lua``)."""
        return f"{self.prefix}:line:deployment:{deployment}"

    def spend(self, team: str, month: str, model: str | None = None) -> str:
        """A team's spend ledger for a UTC month (``YYYY-MM``), or its ledger on one model: a
        hash of nano-USD, ``base`` (the spend usage_log held when last reconciled), ``open``
        (the sum of the ``j:<job id>`` fields: what each job reserved, or spent, since and
        that is not in ``base`` yet). Spent and reserved = base + open (queuegate/spend.py)."""
        base = f"{self.prefix}:spend:{team}:{month}"
        return base if model is None else f"{base}:model:{model}"

    def spend_expiry(self, team: str, month: str, model: str | None = None) -> str:
        """Sorted set beside a spend ledger: job id → when its entry lapses (ms since epoch)."""
        return f"{self.spend(team, month, model)}:expiry"

    @property
    def spend_reconciler(self) -> str:
        """Held (with a token) by the one accountant reconciling the spend ledgers."""
        return f"{self.prefix}:spend-reconciler"

    def budget_alerted(self, team: str, month: str) -> str:
        """Set once the team's alert for the month has been emitted, so it fires only once."""
        return f"{self.prefix}:budget-alerted:{team}:{month}"

    @property
    def alerts(self) -> str:
        """A stream of budget alerts (XREAD it); entries: team, month, spent_usd, budget_usd."""
        return f"{self.prefix}:alerts"

    def breaker(self, deployment: str) -> str:
        """A deployment's circuit breaker: state, window counts (hash; router/lua/health.lua)."""
        return f"{self.prefix}:breaker:{deployment}"

    def paused(self, deployment: str) -> str:
        """Present while a deployment is paused after a provider 429; its TTL is the pause."""
        return f"{self.prefix}:paused:{deployment}"

    def cache(self, digest: str) -> str:
        """A cached response, by the hash of model, messages and parameters."""
        return f"{self.prefix}:cache:{digest}"

    # A batch's keys carry its team: a team reaches only its own, through the control plane.

    def batches(self, team: str) -> str:
        """The team's batches (sorted set: name → creation time), for ``batch list``."""
        return f"{self.prefix}:batches:{team}"

    def batch(self, team: str, name: str) -> str:
        """A batch's description and running counts (hash)."""
        return f"{self.prefix}:batch:{team}:{name}"

    def batch_lines(self, team: str, name: str) -> str:
        """custom_id → line number of every valid request of a batch (hash)."""
        return f"{self.prefix}:batch:{team}:{name}:lines"

    def batch_index(self, team: str, name: str, run: str = "") -> str:
        """The lines hash a submit (``run``) builds while it validates a batch file, renamed
        when valid: one per run, so submits of one name at once never mix their indexes."""
        return f"{self.prefix}:batch:{team}:{name}:index" + (f":{run}" if run else "")

    def batch_published(self, team: str, name: str) -> str:
        """custom_ids whose job the broker confirmed (set)."""
        return f"{self.prefix}:batch:{team}:{name}:published"

    def batch_written(self, team: str, name: str) -> str:
        """custom_ids whose result line is on disk (set)."""
        return f"{self.prefix}:batch:{team}:{name}:written"

    def batch_ids(self, team: str, hour: int) -> str:
        """Custom ids the team's batch steps recorded in ``hour`` (hours since the epoch),
        counted against ``BATCH_IDS_PER_HOUR``."""
        return f"{self.prefix}:batch-ids:{team}:{hour}"

    def batch_canceled(self, team: str, name: str) -> str:
        """Set when a batch is canceled; workers answer its remaining jobs ``canceled``."""
        return f"{self.prefix}:batch:{team}:{name}:canceled"

    def control_answered(self, team: str, request: str) -> str:
        """Set by the first copy of the team's control request ``request`` a worker takes
        (expiring after the client's wait): its other copies are dropped."""
        return f"{self.prefix}:control-answered:{team}:{request}"

    def reply_queues(self, team: str) -> str:
        """The team's reply and results queues (sorted set: name → when it may have expired),
        counted against ``reply_queues_per_team``."""
        return f"{self.prefix}:reply-queues:{team}"

    @property
    def held_full_look(self) -> str:
        """Taken for an interval by the one worker that looks at what the teams' reply queues
        hold (workers/held_results.py): one look per namespace, not one per worker."""
        return f"{self.prefix}:held-full:look"

    @property
    def held_full(self) -> str:
        """The team reply queues the last look found holding their bound, ready and
        unacknowledged together (JSON list of names), for every worker to read."""
        return f"{self.prefix}:held-full"

    def reply_queues_opening(self, team: str) -> str:
        """The team's reply and results queues a worker is declaring now (sorted set: name →
        when that declare is given up on): their slots are never reclaimed meanwhile."""
        return f"{self.prefix}:reply-queues-opening:{team}"
