"""Celery tasks: thin wrappers that decode ids and call the two use cases of :mod:`worker.runner`.

Their names and queues come from :mod:`server.services.dispatch`, and everything they send goes through it. With
``runner = "inprocess"`` a message starts the experiment in this worker and every later step is drained here
(:func:`worker.runner.run_inprocess`); with ``"distributed"`` each message advances or evaluates once (an
evaluation goes on with the jobs of a sequential search for up to ``chain_jobs_s``) and sends what follows to the
broker.
"""

from __future__ import annotations

import time

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
        # An evaluation goes on with one job of the step it advanced, for up to chain_jobs_s from the task's start
        # (a broker hop per job was most of a short job's cost); the step's other jobs go to the broker at once.
        chain_until = time.monotonic() + settings.chain_jobs_s
        go_on = (lambda: time.monotonic() < chain_until) if task == EVALUATE and settings.chain_jobs_s > 0 else None
        transport = CeleryTransport(send, factory, settings, go_on=go_on)
        ctx = RunContext(factory, settings, worker_id, transport, leases=context.leases)
        if settings.runner == "inprocess":
            outcome = run_inprocess((task, target_id), session_factory=factory, settings=settings,
                                    worker_id=worker_id)
        elif task == ADVANCE:
            outcome = advance(target_id, ctx)
        else:
            outcome = evaluate(target_id, ctx)
        # In-process, the message ran its experiment to the end; distributed, only an advance that finished it (on
        # its own or joined to a job's record) or a failed job (which may have ended it: a token too many is
        # harmless) frees a place. Start who is next.
        if may_have_ended(ADVANCE if settings.runner == "inprocess" else task, outcome):
            kick_queue(ctx)
        return outcome

    @app.task(name=ADVANCE, acks_late=True, ignore_result=True)
    def advance_experiment(experiment_id: int) -> str:
        return handle(ADVANCE, int(experiment_id))

    @app.task(name=EVALUATE, acks_late=True, ignore_result=True)
    def evaluate_trial(trial_id: int) -> str:
        return handle(EVALUATE, int(trial_id))
