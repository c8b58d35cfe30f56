"""Celery tasks: thin wrappers that decode ids and call :mod:`worker.runner` or :mod:`worker.distributed`.

Their names and queues come from :mod:`server.services.dispatch`, and everything they send goes through it.
"""

from __future__ import annotations

from celery import Celery

from server.services.dispatch import ADVANCE, EVALUATE, EXPORT, RESOLVE, CeleryDispatcher

__all__ = ["register_tasks"]


def register_tasks(app: Celery) -> None:
    send = CeleryDispatcher(app).send

    @app.task(name=ADVANCE, acks_late=True, ignore_result=True)
    def run_experiment(experiment_id: int) -> str:
        from worker.signals import get_context

        context = get_context()
        if context.settings.runner == "distributed":
            from worker.distributed import advance

            return advance(
                int(experiment_id), session_factory=context.session_factory, settings=context.settings, send=send
            )
        from worker.runner import run_experiment as run

        return run(
            int(experiment_id),
            session_factory=context.session_factory,
            settings=context.settings,
            worker_id=context.worker_id,
        )

    @app.task(name=EVALUATE, acks_late=True, ignore_result=True)
    def evaluate_job(trial_id: int) -> str:
        from worker.distributed import evaluate
        from worker.signals import get_context

        context = get_context()
        return evaluate(
            int(trial_id),
            session_factory=context.session_factory,
            settings=context.settings,
            worker_id=context.worker_id,
            send=send,
        )

    @app.task(name=RESOLVE, acks_late=True, ignore_result=True)
    def resolve_problem(experiment_id: int) -> str:
        from worker.distributed import resolve
        from worker.signals import get_context

        context = get_context()
        return resolve(int(experiment_id), session_factory=context.session_factory, settings=context.settings,
                       send=send)

    @app.task(name=EXPORT, acks_late=True, ignore_result=True)
    def export_model(experiment_id: int) -> str:
        from worker.distributed import export_best
        from worker.signals import get_context

        context = get_context()
        return export_best(int(experiment_id), session_factory=context.session_factory, settings=context.settings,
                           send=send)
