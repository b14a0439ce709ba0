"""The control plane's wire contract: what a team's app asks the gateway, and the answer.

A team has no ``configure`` permission on the broker, so it cannot declare a queue (and so
cannot give one dead-letter arguments that would move messages into another team's queue).
It asks instead: it publishes a ControlRequest to its entry exchange under the routing key
``<team>.control`` with ``reply_to = amq.rabbitmq.reply-to`` (direct reply-to: no queue to
declare), proven like a job (``user_id`` or API key); a worker consuming the team's
``<ns>.control.<team>`` does it for the team whose queue that is, with the gateway's own
arguments, and answers a ControlResponse (to a direct reply-to name only).

| request            | does                                                               |
|--------------------|--------------------------------------------------------------------|
| open_reply_queue   | declare ``<ns>.replies.<team>.<name>`` (transient) or             |
|                    | ``<ns>.results.<team>.<name>`` (durable); both expire unused       |
| close_reply_queue  | delete one of them, freeing its slot; answered with how many      |
|                    | results unread went with it                                        |
| batch              | one step of a batch (record, progress, status, cancel, list,      |
|                    | delete) on the caller's team's batches only                        |
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, Field

from queuegate.errors import ConfigError
from queuegate.messages import WireModel
from queuegate.visible import clipped

MESSAGE_TYPE_CONTROL = "control"
MESSAGE_TYPE_CONTROL_REPLY = "control-reply"
CONTROL_KEY_SUFFIX = ".control"
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
BATCH_ERROR = "batch_error"
"""The ``code`` of an answer refusing a batch step (raised as BatchError to the client)."""
CONTROL_WAIT = 30.0
"""Seconds a client waits for the answer to a control request (also its time to live)."""
HEADER_REQUEST = "x-queuegate-request"
"""The request a control message is a copy of: the client sends a request that may run twice
again while unanswered, and a worker drops a copy of one another worker took first."""
REQUEST_ID = r"^[0-9a-f]{32}$"
TEAM_DISABLED = "team_disabled"
"""The ``code`` of an answer to a disabled team's request (raised as TeamDisabled)."""

QUEUE_NAME = r"^[A-Za-z0-9_-]{1,64}$"
"""A reply queue's own part of its name: no dot, so it stays inside the team's pattern."""


def check_reply_queue_name(name: str) -> str:
    """``name`` as a reply queue's own name (QUEUE_NAME); ConfigError, in one line, if not."""
    if not re.fullmatch(QUEUE_NAME, name):
        raise ConfigError(
            f"reply queue name {clipped(name)!r} is not valid: use 1-64 letters, digits, - and _ "
            "(the name the client was given, not the queue's full name)"
        )
    return name


BATCH_RESULTS_SUFFIX = ":results"
MAX_CUSTOM_ID = 64
"""A batch request's custom_id at most: Anthropic's limit, applied to both formats so a job
id always fits."""
STEP_MAX = 1_000
"""Custom ids one batch step (a control request: ``index``, ``line_numbers``, ...) carries
at most; a client sends more in several. A worker refuses a larger one unread: 10 steps of
200,000 ids, 5 MB each, held a worker 11 s and another team's jobs with it."""
BATCH_IDS_PER_HOUR = 2_000_000
"""Custom ids a team's batch steps may record in the gateway's Redis in an hour (``index``,
``mark_published``, ``mark_written``: about 660,000 requests submitted and collected, 13
times Anthropic's largest batch): steps cost a team nothing, and without a bound one team's
steps of any ids, under any batch names and runs, grew the shared Redis without end (eight
of 200,000 ids took it from 23 to 70 MB; steps of 1,000, about 100 KB each, still would)."""
CONTROL_BODY_MAX = 1 << 20
"""Bytes of a control request a worker reads at most: a step of ``STEP_MAX`` custom ids is
about 100 KB (400 KB were every character of its ids escaped); a larger one is refused
unparsed."""
"""Ends the last part of a batch's own results queue's name: ``:`` is outside QUEUE_NAME, so
no named reply queue of a pipeline is ever one."""


def batch_reply_name(batch: str, *, own: bool = True) -> str:
    """The last part of batch ``batch``'s results queue's name (``<ns>.results.<team>.`` and
    this); ``own=False``: a batch recorded before batches had a queue of their own."""
    return batch + BATCH_RESULTS_SUFFIX if own else batch


Category = Literal["done", "failed", "expired", "canceled"]
BatchLockRole = Literal["collect", "submit"]
"""What a batch's lock is held for: one collector at a time, and one submitter."""
CATEGORIES: tuple[Category, ...] = ("done", "failed", "expired", "canceled")

BatchCallName = Literal[
    "load",
    "create",
    "reset_index",
    "index",
    "line_numbers",
    "published_among",
    "written_among",
    "outcomes_among",
    "mark_published",
    "mark_written",
    "unwritten",
    "cancel",
    "is_canceled",
    "counts",
    "status",
    "lock",
    "list",
    "delete",
]


def no_such_batch(team: str, name: str) -> str:
    """What a step on a batch the team does not have is refused with."""
    return (
        f"no batch named {clipped(name)!r} for team {clipped(team)!r}: submit it first "
        "(queuegate batch submit), or see queuegate batch list"
    )


class OpenReplyQueue(WireModel):
    """Declare one of the team's reply queues; answered with its full name."""

    op: Literal["open_reply_queue"] = "open_reply_queue"
    name: str = Field(pattern=QUEUE_NAME)
    durable: bool = False
    """False: ``<ns>.replies.<team>.<name>``, one client's; True: ``<ns>.results.<team>.
    <name>``, a pipeline's, kept while nobody reads it (up to its expiry)."""


class CloseReplyQueue(WireModel):
    """Delete one of the team's reply queues (a closing client's own, or one the team gives
    back: ``queuegate replies delete``); answered with how many unread results it held."""

    op: Literal["close_reply_queue"] = "close_reply_queue"
    name: str = Field(pattern=QUEUE_NAME)
    durable: bool = False


class BatchCall(WireModel):
    """One step on one of the team's batches; ``args`` are the step's (see BatchState)."""

    op: Literal["batch"] = "batch"
    call: BatchCallName
    batch: str = Field(default="", pattern=r"^([a-z0-9][a-z0-9_-]{0,47})?$")
    args: dict[str, Any] = Field(default_factory=dict)


class ControlRequest(WireModel):
    v: int = 1
    request: Annotated[OpenReplyQueue | CloseReplyQueue | BatchCall, Field(discriminator="op")]


class ControlResponse(WireModel):
    """``ok`` with a ``result``, or an ``error`` saying what to do; ``code`` as job errors."""

    v: int = 1
    ok: bool
    result: Any = None
    code: str | None = None
    error: str | None = None


class BatchMeta(WireModel):
    name: str
    team: str
    format: Literal["openai", "anthropic"]
    total: int
    deadline: AwareDatetime
    fingerprint: str
    """sha256 of the submitted file: a re-run must submit the same file."""
    submission: str = ""
    """Set by the submit that created the batch, part of every job id: a name used again
    after collect gets new job ids, never the outcomes workers keep of the earlier ones."""
    model: str | None = None
    """The model submit put on every request (its ``--model``), over the file's."""
    source: str = ""
    """Where submit read the file (an absolute path on its machine): collect rebuilds from
    it the jobs whose results a full results queue refused, to ask for them again."""
    refused: int = 0
    """Requests submit's checks refused (``producer.batch.jobs.Refused``): not in ``total``,
    never published; collect writes each a failed line of its own from the submitted file."""
    own_queue: bool = False
    """Its results wait in a queue of its own, ``<ns>.results.<team>.<name>:results``
    (``Topology.batch_results_queue``), which no pipeline's named reply queue can be. False
    for a batch recorded by an earlier version (or submitted by one), whose results go to
    the named reply queue of its name, ``<ns>.results.<team>.<name>``."""
    front_door: bool = False
    """Submitted by the HTTP front door's batch runner (``frontdoor.batches.runner``), which
    deletes it once it ended the batch: the team's own ``queuegate batch collect`` of it
    leaves it be, so that runner, finding the lines that collect took written, ends the batch
    with an error line for each (rather than failing it as a batch the gateway lost); and the
    gateway refuses a ``delete`` of it. The runner clears it, in the gateway's record, before
    it deletes the batch, or when it gives the batch up to the team (the team's from then)."""

    @property
    def jobs(self) -> str:
        return submission_jobs(self.name, self.submission)

    @property
    def reply_name(self) -> str:
        """The last part of its results queue's name (``Topology.batch_results_queue``)."""
        return batch_reply_name(self.name, own=self.own_queue)


Outcome = Literal["stored", "held"]
"""What the gateway knows of a published request's job (``outcomes_among``): its outcome is
stored (answered, to be sent again when asked), or a delivery holds its claim (in a call)."""


def being_submitted(name: str) -> str:
    """Why a submit of batch ``name`` stops when another submit of it runs at once."""
    return (
        f"batch {name!r} is being submitted by another run at once: let that one finish, "
        "then run this again to resume it (nothing was published by this one)"
    )


def job_id(jobs: str, custom_id: str) -> str:
    """The job id of a request of the submission whose ids start with ``jobs``
    (``BatchMeta.jobs``): the same on every run of that submission, so a re-run is
    recognised, and new when the name is submitted again after collect."""
    return f"{jobs}:{custom_id}"


def submission_jobs(name: str, submission: str) -> str:
    """What every job id of a batch's submission starts with, before ``:<custom_id>``
    (batch names hold no dot; a batch recorded before submissions had ids has none)."""
    return f"{name}.{submission}" if submission else name


NANO = 10**9
"""A batch's spend is counted in nano-dollars, an integer Redis can add exactly: collect records
each line's so, and ``Counts.spend_usd`` is their sum over ``NANO``."""


class Counts(WireModel):
    total: int
    published: int
    done: int
    failed: int
    expired: int
    canceled: int
    spend_usd: float
    first_written: float | None
    last_written: float | None
    canceled_flag: bool

    @property
    def written(self) -> int:
        return self.done + self.failed + self.expired + self.canceled

    def to_collect(self, waiting: int) -> int:
        """Answers not collected yet, of ``waiting`` results in the batch's results queue: at
        most one per published request without a line. The queue can hold more: a result
        delivered again (each file's last line keeps its result unacknowledged until the next,
        so a collect stopped leaves it there, its line written) or asked for again while its
        first answer was on its way; counted all, a batch showed more answered than it has
        requests."""
        return max(0, min(waiting, self._unwritten))

    def unanswered(self, waiting: int) -> int:
        """Published requests not answered yet, with ``waiting`` results in the batch's
        results queue: never more than were published."""
        return max(0, self._unwritten - waiting)

    @property
    def _unwritten(self) -> int:
        """Published requests without a line yet."""
        return min(self.published, self.total - self.written)


class BatchSummary(WireModel):
    """One line of ``batch list``."""

    name: str
    format: str
    total: int
    written: int
    canceled: bool
    deadline: AwareDatetime
    waiting: int = 0
    """Results answered and not collected yet (``Counts.to_collect``)."""

    @classmethod
    def of(cls, meta: BatchMeta, counts: Counts, waiting: int) -> BatchSummary:
        """The line of a batch with ``waiting`` results in its results queue."""
        return cls(
            name=meta.name,
            format=meta.format,
            total=meta.total,
            written=counts.written,
            canceled=counts.canceled_flag,
            deadline=meta.deadline,
            waiting=counts.to_collect(waiting),
        )

    @property
    def state(self) -> str:
        """``to collect`` once every request is answered, ``done`` once every line is written."""
        if self.canceled:
            return "canceled"
        if self.written >= self.total:
            return "done"
        return "to collect" if self.written + self.waiting >= self.total else "running"
