"""The reaper: sends a message again for what has none in flight and needs one, by the rules of
:func:`server.services.runs.experiments_to_resend` and :func:`~server.services.runs.trials_to_resend` (a dead
worker's experiment or job, a send that failed after its commit).

It runs once when a worker starts and then every ``reaper_interval_s`` in a daemon thread of the worker's main
process (database only: no torch, no CUDA there). Each resend is recorded in the same transaction that picks it,
so several reapers never send one twice, and a message waiting in the broker is never duplicated.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery
from sqlalchemy.orm import Session

from server.services import runs
from server.services.dispatch import ADVANCE, EVALUATE, CeleryDispatcher, Send
from worker.runner import CeleryTransport, transact
from worker.signals import get_context

__all__ = ["reap_once", "start_reaper"]

log = logging.getLogger(__name__)


def reap_once(send: Send) -> list[tuple[str, int]]:
    """Send what needs it (``send`` is :meth:`CeleryDispatcher.send <server.services.dispatch.CeleryDispatcher.send>`
    in a worker); returns the messages sent."""
    context = get_context()
    settings = context.settings

    def take(session: Session) -> list[tuple[str, int]]:
        grace, lost = settings.lease_grace_s, settings.message_lost_s
        experiments = runs.experiments_to_resend(session, grace_s=grace, lost_s=lost)
        trials = runs.trials_to_resend(session, grace_s=grace, lost_s=lost)
        return [(ADVANCE, i) for i in experiments] + [(EVALUATE, i) for i in trials]

    messages = transact(context.session_factory, take, give_up_after_s=0)
    CeleryTransport(send, context.session_factory, settings).emit(messages)
    if messages:
        log.warning("sent again (stale lease or lost message): %s", messages)
    return messages


def start_reaper(app: Celery, interval_s: float) -> threading.Event:
    """Reap now and then every ``interval_s`` seconds until the returned event is set, sending through ``app``."""
    stop = threading.Event()
    send = CeleryDispatcher(app).send

    def loop() -> None:
        while True:
            try:
                reap_once(send)
            except Exception:  # noqa: BLE001 - the database may be restarting; try again next round
                log.warning("reaper round failed", exc_info=True)
            if stop.wait(interval_s):
                return

    threading.Thread(target=loop, name="prunehub-reaper", daemon=True).start()
    return stop
