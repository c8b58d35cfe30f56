"""Celery tasks: thin wrappers that decode ids and call the two use cases of :mod:`worker.runner`.

Their names and queues come from :mod:`server.services.dispatch`, and everything they send goes through it. With
``runner = "inprocess"`` a message starts the experiment in this worker and every later step is drained here
(:func:`worker.runner.run_inprocess`); with ``"distributed"`` each message advances or evaluates once and sends
what follows to the broker.
"""

from __future__ import annotations

from celery import Celery

from server.services.dispatch import ADVANCE, EVALUATE, CeleryDispatcher

__all__ = ["register_tasks"]


def register_tasks(app: Celery) -> None:
    send = CeleryDispatcher(app).send

    def handle(task: str, target_id: int) -> str:
        from worker.runner import (
            CeleryTransport,
            RunContext,
            advance,
            evaluate,
            kick_queue,
            may_have_ended,
            run_inprocess,
        )
        from worker.signals import get_context

        context = get_context()
        factory, settings, worker_id = context.session_factory, context.settings, context.worker_id
        ctx = RunContext(factory, settings, worker_id, CeleryTransport(send, factory, settings),
                         leases=context.leases)
        if settings.runner == "inprocess":
            outcome = run_inprocess((task, target_id), session_factory=factory, settings=settings,
                                    worker_id=worker_id)
        else:
            outcome = advance(target_id, ctx) if task == ADVANCE else evaluate(target_id, ctx)
        # In-process, the message ran its experiment to the end; distributed, only an advance that finished it or
        # a failed job (which may have ended it: a token too many is harmless) frees a place. Start who is next.
        if may_have_ended(ADVANCE if settings.runner == "inprocess" else task, outcome):
            kick_queue(ctx)
        return outcome

    @app.task(name=ADVANCE, acks_late=True, ignore_result=True)
    def advance_experiment(experiment_id: int) -> str:
        return handle(ADVANCE, int(experiment_id))

    @app.task(name=EVALUATE, acks_late=True, ignore_result=True)
    def evaluate_trial(trial_id: int) -> str:
        return handle(EVALUATE, int(trial_id))
