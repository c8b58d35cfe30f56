"""The Celery app factory. Nothing is created at import time; ``prunehub worker`` and the API each build one.

Reliability settings: late acks (a task is acknowledged after it ran, so a dead worker's task is redelivered),
``task_reject_on_worker_lost``, one message prefetched per process, JSON only, explicit queues. The database is
the source of truth, so no result backend is configured: tasks carry ids, never objects.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from server.settings import Settings

__all__ = ["EVALUATIONS_QUEUE", "EXPERIMENTS_QUEUE", "make_celery"]

EXPERIMENTS_QUEUE = "experiments"
EVALUATIONS_QUEUE = "evaluations"


def _filesystem_options(settings: Settings) -> dict[str, object]:
    # Celery's filesystem transport: producer and consumer share one folder per direction; create them first.
    folder = settings.broker_folder.resolve()
    queue = folder / "queue"
    processed = folder / "processed"
    control = folder / "control"
    for path in (queue, processed, control):
        path.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(queue),
        "data_folder_out": str(queue),
        "processed_folder": str(processed),
        "control_folder": str(control),
        "store_processed": False,
    }


def make_celery(settings: Settings) -> Celery:
    """A configured Celery app for ``settings.broker_url`` (tasks registered by :mod:`worker.tasks`)."""
    app = Celery("prunehub", broker=settings.broker_url, set_as_current=False)
    transport_options: dict[str, object] = {}
    filesystem = settings.broker_url.startswith("filesystem://")
    if filesystem:
        transport_options = _filesystem_options(settings)
    else:
        # Redis redelivers unacknowledged tasks after this; the database lease stops a duplicate from running.
        transport_options = {"visibility_timeout": 3600}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_default_queue=EXPERIMENTS_QUEUE,
        task_queues=tuple(
            Queue(name, Exchange(name), routing_key=name) for name in (EXPERIMENTS_QUEUE, EVALUATIONS_QUEUE)
        ),
        task_default_exchange=EXPERIMENTS_QUEUE,
        task_default_routing_key=EXPERIMENTS_QUEUE,
        task_routes={"experiments.*": {"queue": EXPERIMENTS_QUEUE}, "evaluations.*": {"queue": EVALUATIONS_QUEUE}},
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        # The filesystem transport has no fanout exchange, so no remote control (pidbox) there.
        worker_enable_remote_control=not filesystem,
        worker_hijack_root_logger=False,
        worker_max_tasks_per_child=50,
        timezone="UTC",
    )
    return app
