"""Handing experiment ids to the broker. Always after the commit that stored them: the worker re-reads the row."""

from __future__ import annotations

from typing import Protocol

__all__ = ["CeleryDispatcher", "Dispatcher"]


class Dispatcher(Protocol):
    def enqueue_experiment(self, experiment_id: int) -> None: ...

    def ping(self) -> None: ...


class CeleryDispatcher:
    """Sends ``experiments.run`` by name: the API never imports the worker's task code (or torch)."""

    def __init__(self, app: object) -> None:
        self.app = app

    def enqueue_experiment(self, experiment_id: int) -> None:
        from worker.celery_app import EXPERIMENTS_QUEUE
        from worker.tasks import RUN_EXPERIMENT

        self.app.send_task(RUN_EXPERIMENT, args=[experiment_id], queue=EXPERIMENTS_QUEUE)  # type: ignore[attr-defined]

    def ping(self) -> None:
        with self.app.connection_for_write() as connection:  # type: ignore[attr-defined]
            connection.ensure_connection(max_retries=1, timeout=2)
