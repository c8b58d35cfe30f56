"""Celery tasks: thin wrappers that decode ids and call :mod:`worker.runner`."""

from __future__ import annotations

from celery import Celery

__all__ = ["RUN_EXPERIMENT", "register_tasks"]

RUN_EXPERIMENT = "experiments.run"


def register_tasks(app: Celery) -> None:
    @app.task(name=RUN_EXPERIMENT, acks_late=True, ignore_result=True)
    def run_experiment(experiment_id: int) -> str:
        from worker.runner import run_experiment as run
        from worker.signals import get_context

        context = get_context()
        return run(
            int(experiment_id),
            session_factory=context.session_factory,
            settings=context.settings,
            worker_id=context.worker_id,
        )
