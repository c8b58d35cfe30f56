"""Per-process resources of a worker. The engine is created lazily in the process that uses it (never inherited
across Celery's fork) and disposed in a forked child if the parent had one."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from server.db.session import make_engine, make_session_factory
from server.settings import Settings, get_settings
from worker.runner import TrialLeases

__all__ = ["WorkerContext", "get_context", "reset_context"]


@dataclass
class WorkerContext:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    pid: int
    leases: TrialLeases
    """Renews the leases of the jobs this process runs (one thread per process, not one per job)."""

    @property
    def worker_id(self) -> str:
        return f"{socket.gethostname()}:{self.pid}"


_context: WorkerContext | None = None


def get_context() -> WorkerContext:
    """This process's context, built on first use (and rebuilt after a fork)."""
    global _context
    if _context is None or _context.pid != os.getpid():
        if _context is not None:
            # Inherited from the parent: drop its pooled connections without closing the parent's sockets.
            _context.engine.dispose(close=False)
        settings = get_settings()
        # Its transactions are short (orchestration only): one idle for long lost its client (make_engine). No
        # pre-ping: every transaction of the runner retries on a connection error (worker.runner.transact).
        engine = make_engine(settings.database_url, idle_in_transaction_s=settings.db_idle_in_transaction_s,
                             pre_ping=False)
        factory = make_session_factory(engine)
        _context = WorkerContext(settings, engine, factory, os.getpid(),
                                 TrialLeases(factory, settings.worker_heartbeat_s))
    return _context


def reset_context() -> None:
    global _context
    if _context is not None:
        _context.leases.close()
        _context.engine.dispose()
    _context = None


def connect_signals() -> None:
    """Hook Celery's process signals (called by ``prunehub worker``, in its main process): each pool process dies
    with the main process (a SIGKILLed worker leaves no pool process running its task under PID 1), builds its
    context and starts its pre-warmed task process (:func:`worker.isolation.prewarm`)."""
    from celery.signals import worker_process_init

    from worker.child import die_with_parent

    main_pid = os.getpid()

    @worker_process_init.connect(weak=False)
    def _init_process(**_kwargs: object) -> None:
        # The watchdog only: the pool may fork from a thread of the main process that ends before it does.
        die_with_parent(main_pid, deathsig=False)
        settings = get_context().settings
        # The task process starts here, in the pool process, so the first job of a run finds torch imported; the
        # prefork parent never starts one (nor touches CUDA).
        from worker.isolation import prewarm

        prewarm(artifacts_dir=str(settings.artifacts_dir), device=settings.device,
                memory_limit_mb=settings.job_memory_limit_mb)
