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
        worker_max_tasks_per_child=50,
    )
    return app
