"""The worker pool: consume team queues, run each job through the router, answer and account."""

from workers.worker import Worker

__all__ = ["Worker"]
