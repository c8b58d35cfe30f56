"""Every message the service sends: task names, their queues and the broker app, declared once.

A message carries one id and is sent after the commit that stored what it points at; the task re-reads the row.

============================  ===============  =============  ================================================
task                          queue            argument       sent by
============================  ===============  =============  ================================================
``experiments.run``           ``experiments``  experiment id  the API (a new experiment), the reaper, a queue
                                                              kick after a run ended, the last job of a step
                                                              whose joined advance failed (advance: tell, ask,
                                                              insert jobs; it runs on its own then)
``evaluations.run``           ``evaluations``  trial id       an advance (one per job of the step, including
                                                              the resolve and export jobs, less the one the
                                                              worker that advanced runs itself), a retry, the
                                                              reaper
============================  ===============  =============  ================================================

The API, the reaper and the runner's broker transport all send through :class:`CeleryDispatcher` (or anything
with its ``send``);
the worker registers its task functions under these names. Nothing here imports the worker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from server.settings import Settings

if TYPE_CHECKING:
    from celery import Celery

__all__ = [
    "ADVANCE",
    "EVALUATE",
    "EVALUATIONS_QUEUE",
    "EXPERIMENTS_QUEUE",
    "QUEUES",
    "ROUTES",
    "CeleryDispatcher",
    "Dispatcher",
    "Send",
    "make_broker_app",
]

EXPERIMENTS_QUEUE = "experiments"  # cheap coordination, no user code
EVALUATIONS_QUEUE = "evaluations"  # user code, one process per GPU
QUEUES = (EXPERIMENTS_QUEUE, EVALUATIONS_QUEUE)

ADVANCE = "experiments.run"
EVALUATE = "evaluations.run"

ROUTES: dict[str, str] = {
    ADVANCE: EXPERIMENTS_QUEUE,
    EVALUATE: EVALUATIONS_QUEUE,
}

Send = Callable[[str, int], None]
"""``send(task name, id)``: hand one id to the broker on the task's queue."""


class Dispatcher(Protocol):
    def send(self, task: str, target_id: int) -> None: ...

    def enqueue_experiment(self, experiment_id: int) -> None: ...

    def ping(self) -> None: ...


class CeleryDispatcher:
    """Sends tasks by name on the queue :data:`ROUTES` gives them: the sender never imports the task code."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def send(self, task: str, target_id: int) -> None:
        self.app.send_task(task, args=[target_id], queue=ROUTES[task])

    def enqueue_experiment(self, experiment_id: int) -> None:
        self.send(ADVANCE, experiment_id)

    def ping(self) -> None:
        with self.app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)


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


def make_broker_app(settings: Settings) -> Celery:
    """A Celery app that knows the broker, the queues and the routes: enough to send (the API, the reaper).
    ``worker.celery_app.make_celery`` adds what only a consuming worker needs. Nothing is created at import."""
    from celery import Celery
    from kombu import Exchange, Queue

    app = Celery("prunehub", broker=settings.broker_url, set_as_current=False)
    if settings.broker_url.startswith("filesystem://"):
        transport_options = _filesystem_options(settings)
    else:
        # Redis redelivers unacknowledged tasks after this; the database lease stops a duplicate from running.
        transport_options = {"visibility_timeout": 3600}
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_default_queue=EXPERIMENTS_QUEUE,
        task_queues=tuple(Queue(name, Exchange(name), routing_key=name) for name in QUEUES),
        task_default_exchange=EXPERIMENTS_QUEUE,
        task_default_routing_key=EXPERIMENTS_QUEUE,
        task_routes={task: {"queue": queue} for task, queue in ROUTES.items()},
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        timezone="UTC",
    )
    return app
