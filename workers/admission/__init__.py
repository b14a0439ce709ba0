"""Admission control: token buckets, budgets and the Redis outage policy, one module each.

| module        | holds                                                           |
|---------------|-----------------------------------------------------------------|
| ``gate``      | ``Admission`` and the per-job ``Ticket``: wait, reserve, settle |
| ``buckets``   | requests/tokens per minute in Redis (``lua/take.lua``)          |
| ``budgets``   | monthly spend per team and model (``lua/spend.lua``)            |
| ``estimate``  | a job's tokens and cost before it runs                          |
| ``policy``    | what happens while Redis is down                                |
| ``scripts``   | the Lua scripts' calls, one or several a round trip (``batch``) |
"""

from workers.admission.gate import (
    Admission,
    Ahead,
    Check,
    Settlement,
    TeamStopped,
    Ticket,
    prefetch_for,
)

__all__ = ["Admission", "Ahead", "Check", "Settlement", "TeamStopped", "Ticket", "prefetch_for"]
