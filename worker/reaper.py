"""The reaper: hands experiments whose worker died (stale lease) or whose enqueue was lost back to the broker.

It runs once when a worker starts and then every ``reaper_interval_s`` in a daemon thread of the worker's main
process (database only: no torch, no CUDA there). Several workers may reap at once; duplicates are harmless
because a live lease makes a second delivery exit at once.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery

from server.services import runs
from worker.celery_app import EVALUATIONS_QUEUE, EXPERIMENTS_QUEUE
from worker.signals import get_context
from worker.tasks import EVALUATE, RUN_EXPERIMENT

__all__ = ["reap_once", "start_reaper"]

log = logging.getLogger(__name__)


def reap_once(app: Celery) -> list[int]:
    """Re-enqueue what needs it; returns the ids."""
    context = get_context()
    with context.session_factory() as session:
        ids = runs.experiments_to_requeue(session, context.settings.lease_grace_s)
        trial_ids = runs.trials_to_requeue(session, context.settings.lease_grace_s)
    for experiment_id in ids:
        app.send_task(RUN_EXPERIMENT, args=[experiment_id], queue=EXPERIMENTS_QUEUE)
    for trial_id in trial_ids:
        app.send_task(EVALUATE, args=[trial_id], queue=EVALUATIONS_QUEUE)
    if ids or trial_ids:
        log.warning("re-enqueued experiments %s and jobs %s (stale lease or lost message)", ids, trial_ids)
    return ids


def start_reaper(app: Celery, interval_s: float) -> threading.Event:
    """Reap now and then every ``interval_s`` seconds until the returned event is set."""
    stop = threading.Event()

    def loop() -> None:
        while True:
            try:
                reap_once(app)
            except Exception:  # noqa: BLE001 - the database may be restarting; try again next round
                log.warning("reaper round failed", exc_info=True)
            if stop.wait(interval_s):
                return

    threading.Thread(target=loop, name="prunehub-reaper", daemon=True).start()
    return stop
