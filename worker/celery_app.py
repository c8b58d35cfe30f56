"""The worker's Celery app: the broker app of :mod:`server.services.dispatch` plus what a consuming worker needs.

Nothing is created at import time; ``prunehub worker`` builds one. Reliability settings: late acks (a task is
acknowledged after it ran, so a dead worker's task is redelivered), ``task_reject_on_worker_lost``, one message
prefetched per process, JSON only, explicit queues. The database is the source of truth, so no result backend
is configured: tasks carry ids, never objects.
"""

from __future__ import annotations

from celery import Celery

from server.services.dispatch import make_broker_app
from server.settings import Settings

__all__ = ["make_celery"]


def make_celery(settings: Settings) -> Celery:
    """A configured Celery app for ``settings.broker_url`` (tasks registered by :mod:`worker.tasks`)."""
    app = make_broker_app(settings)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # The filesystem transport has no fanout exchange, so no remote control (pidbox) there.
        worker_enable_remote_control=not settings.broker_url.startswith("filesystem://"),
        worker_hijack_root_logger=False,
        # A pool process that grew past this (KiB; ours hold about 100 MiB: no torch, the user's code runs in the
        # task process) is replaced after its task. It was replaced every 50 tasks: with the distributed runner
        # (two tasks per job) every 25 jobs, and its pre-warmed task process with it, a second's stall each time
        # (measured on the no-op annealing run: ~1.2 s at the 25th trial, a third of the run's orchestration).
        worker_max_memory_per_child=512 * 1024,
    )
    return app
