"""The one runner: a search is advanced by two use cases, and a transport carries what they emit.

* :func:`advance` (``experiments.run``): lock the experiment; if every job of the current step has finished, ``tell``
  the strategy their results; ``ask`` the next jobs; insert them as ``pending`` trials (unique job keys); commit;
  emit one ``evaluations.run`` per job. Resolving the problem and exporting the best model are jobs too: the first
  advance inserts a ``resolve`` trial, the last one an ``export`` trial. It never waits for a job.
* :func:`evaluate` (``evaluations.run``): take one trial's lease (renewed by a heartbeat while it runs), execute its
  job in the supervised task process, and record the result. The advance after a step's last job runs in the
  transaction that records it (on both transports: sending it only brought it to a worker that locks the same
  row next), and when the transport lets it (:meth:`Transport.runs_next_job`) the worker goes on with the new
  step's first job, inserted under its own lease in that transaction, while the step's other jobs are emitted.
  That job is sent to the task process as soon as the strategy has asked for it, before the transaction writes
  the state and the new trials and commits (:func:`_send_ahead`): the job runs while the commit finishes, and a
  transaction that fails kills it (its trial never existed). One execution path, one mapping from an exception to
  a result, one retry rule.

Two transports carry the emits, both after the commit that stored what they point at:

* :class:`CeleryTransport` sends each message to the broker (the ``distributed`` runner: each job its own task on
  the ``evaluations`` queue, one process per GPU); an evaluation task goes on with the next job of a sequential
  search for up to ``chain_jobs_s``, then hands it to the broker;
* :class:`InProcessTransport` (the embedded default, one-GPU workers) drains them in the worker that holds the
  experiment's lease (:func:`run_inprocess`): no broker hop per job.

Per job of a sequential search that is one transaction of six statements (the trial and its experiment locked,
the result with the tell's decision, the tally, the state, the next trial under its lease, the events).

Either way the database is the source of truth: a job whose trial already finished is not run again (the
strategy is told its stored result), a job another worker holds under a live lease is not run (a broker delivery
of it is dropped; the in-process run that holds the experiment waits for that lease to end), and a step asked
twice (two advances racing) is inserted once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from sqlalchemy import event, func, select
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, defer, sessionmaker

from server.db.models import Experiment, ExperimentStatus, Trial, TrialStatus, as_utc, utcnow
from server.services import runs
from server.services.dispatch import ADVANCE, EVALUATE, Send
from server.services.events import add_event
from server.settings import Settings

__all__ = [
    "CeleryTransport",
    "Heartbeat",
    "InProcessTransport",
    "Message",
    "RunContext",
    "TrialLeases",
    "Transport",
    "advance",
    "evaluate",
    "kick_queue",
    "may_have_ended",
    "run_experiment",
    "run_inprocess",
    "transact",
    "trial_to_result",
]

log = logging.getLogger(__name__)

Message = tuple[str, int]
"""``(task name, id)``: an ``experiments.run`` for an experiment or an ``evaluations.run`` for a trial."""

MAX_JOB_ATTEMPTS = 2  # a job whose process died is run once more, then recorded as failed


# --------------------------------------------------------------------------------------------------- plumbing


# Errors of the connection rather than of the statement: worth waiting out (a restart, a failover).
DB_CONNECTION_ERRORS: tuple[type[Exception], ...] = (OperationalError, InterfaceError)

T = TypeVar("T")


def transact(session_factory: sessionmaker[Session], work: Callable[[Session], T], *, give_up_after_s: float) -> T:
    """Run ``work`` in a transaction and commit; on a connection error retry with backoff (a new session each
    time) until ``give_up_after_s`` has passed. ``work`` must be safe to repeat (ours are: keyed by ids)."""
    give_up_at = time.monotonic() + give_up_after_s
    delay = 0.2
    while True:
        try:
            with session_factory() as session:
                value = work(session)
                session.commit()
                return value
        except DB_CONNECTION_ERRORS:
            if time.monotonic() >= give_up_at:
                raise
            log.warning("database write failed; retrying in %.1fs", delay, exc_info=True)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class Heartbeat:
    """Calls ``beat(session)`` (and commits) every ``interval`` seconds from a daemon thread while a lease is held,
    so a duplicate delivery sees a live lease and a dead worker's lease goes stale."""

    def __init__(
        self, beat: Callable[[Session], object], session_factory: sessionmaker[Session], interval: float, name: str
    ) -> None:
        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    with session_factory() as session:
                        beat(session)
                        session.commit()
                except Exception:  # noqa: BLE001 - a missed beat is retried at the next interval
                    log.warning("heartbeat of %s failed", name, exc_info=True)

        self._thread = threading.Thread(target=loop, name=f"lease-{name}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class TrialLeases:
    """The leases on the jobs this process runs, renewed together by one daemon thread: every ``interval`` seconds
    one UPDATE (:func:`~server.services.runs.renew_trial_leases`) for all the trials held (:meth:`hold`), so a
    duplicate delivery of a running job sees a live lease and a dead worker's goes stale. A thread per job
    (started and joined around each one) cost milliseconds per job on a loaded machine; this one starts with the
    first job a process runs and sleeps while it holds none. :meth:`close` stops it."""

    def __init__(self, session_factory: sessionmaker[Session], interval: float) -> None:
        self._session_factory, self._interval = session_factory, interval
        self._held: dict[int, str] = {}  # trial id -> the worker id whose lease it is
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def hold(self, trial_id: int, worker_id: str) -> Iterator[None]:
        """Renew ``worker_id``'s lease on ``trial_id`` while the block runs (the lease itself was taken when the
        job was claimed, :func:`~server.services.runs.take_trial_lease`)."""
        with self._lock:
            self._held[trial_id] = worker_id
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._loop, name="trial-leases", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._held.pop(trial_id, None)

    def held(self) -> dict[int, str]:
        """The trials held now, with whose lease each is."""
        with self._lock:
            return dict(self._held)

    def renew(self) -> int:
        """One beat: renew every held lease now (one UPDATE per worker id, usually one) and commit; returns how
        many leases were still held in the database."""
        owners: dict[str, list[int]] = {}
        for trial_id, worker_id in self.held().items():
            owners.setdefault(worker_id, []).append(trial_id)
        if not owners:
            return 0
        with self._session_factory() as session:
            renewed = sum(runs.renew_trial_leases(session, ids, worker_id) for worker_id, ids in owners.items())
            session.commit()
        return renewed

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.renew()
            except Exception:  # noqa: BLE001 - a missed beat is retried at the next interval
                log.warning("renewing the trial leases %s failed", sorted(self.held()), exc_info=True)

    def close(self) -> None:
        """Stop renewing (the thread ends within its interval's wait; joined here)."""
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout=10)


class Transport(Protocol):
    """Carries the messages a use case emits after its commit."""

    tracks_sends: bool
    """Whether messages go through a broker, so the commit before a send records it on the row (the reaper then
    knows a message is in flight). The in-process transport's messages never leave the worker."""

    def emit(self, messages: Sequence[Message]) -> None: ...

    def runs_next_job(self) -> bool:
        """Whether the worker that advanced a step after recording its last job may run one job of the new step
        itself, claimed in the same transaction, instead of emitting it: a commit, a claim and (on a broker) a
        round trip less per job of a sequential search."""
        ...


class CeleryTransport:
    """Each message goes to the broker on the queue :mod:`server.services.dispatch` routes it to. A send that fails
    is recorded as not sent, so the reaper sends it after the lease grace instead of waiting for it."""

    tracks_sends = True

    def __init__(self, send: Send, session_factory: sessionmaker[Session], settings: Settings,
                 go_on: Callable[[], bool] | None = None) -> None:
        self._send, self._session_factory, self._settings = send, session_factory, settings
        self._go_on = go_on

    def runs_next_job(self) -> bool:
        """Whether :func:`evaluate` may go on with a job of the step it advanced (``go_on``; never without one):
        the step's other jobs are sent as ever, so other workers take them."""
        return self._go_on is not None and self._go_on()

    def emit(self, messages: Sequence[Message]) -> None:
        failed = []
        for name, target in messages:
            try:
                self._send(name, target)
            except Exception:  # noqa: BLE001 - the broker is down; the reaper sends it later
                log.warning("could not send %s(%s); the reaper will", name, target, exc_info=True)
                failed.append((name, target))
        if failed:
            transact(self._session_factory, lambda session: runs.record_sent(session, failed, sent=False),
                     give_up_after_s=self._settings.db_retry_s)


class InProcessTransport:
    """Messages wait in this worker's own queue; :func:`run_inprocess` drains it."""

    tracks_sends = False

    def __init__(self) -> None:
        self.queue: deque[Message] = deque()

    def emit(self, messages: Sequence[Message]) -> None:
        self.queue.extend(messages)

    def runs_next_job(self) -> bool:
        return True  # the worker holds the experiment: every job is drained here anyway


@dataclass
class RunContext:
    """What the use cases need: the database, the settings, who this worker is and how its emits travel."""

    session_factory: sessionmaker[Session]
    settings: Settings
    worker_id: str
    transport: Transport
    inprocess: bool = False
    """Set by :func:`run_inprocess`, whose worker holds the experiment and drains every message itself. Then
    :func:`evaluate` does not hold the job's lease in :attr:`leases` (the experiment's heartbeat renews the lease
    of the job it runs, :func:`~server.services.runs.heartbeat`)."""
    leases: TrialLeases | None = None
    """The process's lease registry (``worker.signals.WorkerContext.leases``) that renews the leases of the jobs
    :func:`evaluate` runs; without one, each job gets a registry of its own, closed after it."""

    def commit_and_emit(self, work: Callable[[Session, list[Message]], T]) -> T:
        """Run ``work(session, outbox)`` in a transaction, record the outbox's sends on their rows (broker
        transports), commit, then emit the outbox: commit first, so a message never points at nothing."""
        outbox: list[Message] = []

        def wrapped(session: Session) -> T:
            outbox.clear()
            value = work(session, outbox)
            if outbox and self.transport.tracks_sends:
                runs.record_sent(session, outbox)
            return value

        value = transact(self.session_factory, wrapped, give_up_after_s=self.settings.db_retry_s)
        if outbox:
            self.transport.emit(list(outbox))
        return value


def _task_process_settings(
    settings: Settings, bundle: str | None, experiment_id: int | None
) -> dict[str, Any]:
    """The keyword arguments of :func:`worker.isolation.task_process` (and ``send_ahead``) for these settings."""
    from worker.bundles import BundleSource

    source = None
    if bundle is not None:
        assert experiment_id is not None, "a bundled task process belongs to one experiment"
        source = BundleSource.of(bundle, experiment_id, settings)
    return {"artifacts_dir": str(settings.artifacts_dir), "device": settings.device,
            "memory_limit_mb": settings.job_memory_limit_mb, "bundle": source}


def open_task_process(
    entrypoint: str, settings: Settings, *, bundle: str | None = None, experiment_id: int | None = None
) -> Any:
    """The supervised task process for ``entrypoint`` (a context manager; reused when the settings allow), importing
    it from the experiment's uploaded ``bundle`` when it has one (:mod:`worker.bundles`)."""
    from worker.isolation import task_process

    return task_process(entrypoint, list(settings.allowed_entrypoints), reuse=settings.reuse_task_process,
                        **_task_process_settings(settings, bundle, experiment_id))


def _send_ahead(settings: Settings, experiment: Experiment, job: dict[str, Any]) -> None:
    """Start ``job``, the new step's first, in this worker's parked task process before the transaction that
    inserted it under this worker's lease commits: the job runs while the commit (and the record, tell and ask
    before it) finish, instead of after them. The request that follows the commit waits for its answer; when
    the transaction fails, :func:`worker.isolation.drop_ahead` kills the process running it (its trial does not
    exist, so nothing records it, and the advance that asks the step again starts it again)."""
    from worker.isolation import send_ahead

    send_ahead(experiment.entrypoint, list(settings.allowed_entrypoints), {"problem": experiment.problem, "job": job},
               **_task_process_settings(settings, experiment.bundle, experiment.id))


def trial_to_result(trial: Trial) -> Any:
    """The :class:`~pruning.search.base.Result` a finished trial recorded (what the strategy is told)."""
    from pruning.search.base import Result

    return Result(
        key=trial.job_key,
        status="succeeded" if trial.status == TrialStatus.succeeded.value else "failed",
        score=trial.score,
        requested=trial.requested or {},
        achieved=trial.achieved or {},
        overall_sparsity=trial.overall_sparsity,
        params=trial.params,
        flops=trial.flops,
        params_ratio=trial.params_ratio,
        flops_ratio=trial.flops_ratio,
        latency_ms=trial.latency_ms,
        budget_ratio=trial.budget_ratio,
        feasible=trial.feasible,
        evaluation=trial.evaluation or {},
        artifact=trial.artifact_id,
        error=trial.error,
        extra=dict(trial.extra or {}),
        duration_s=trial.duration_s or 0.0,
    )


def elapsed_minutes(started: datetime | None) -> float:
    """Minutes since ``started`` (0 before the experiment started)."""
    return 0.0 if started is None else (datetime.now(UTC) - as_utc(started)).total_seconds() / 60.0


def _max_minutes(config: dict[str, Any]) -> float | None:
    value = config.get("max_minutes")
    return float(value) if value is not None else None


# ----------------------------------------------------------------------------------------------------- advance


@dataclass(frozen=True)
class _Joined:
    """How an advance that joined the record of its step's last job differs from one of its own (``None``)."""

    lease_to: str | None
    """The worker that will run the new step's first job (or the export) itself (:func:`_claim_next`): it is
    inserted under its lease. ``None``: every job is emitted."""
    start: Callable[[dict[str, Any]], None] | None
    """Starts the job that will be leased to :attr:`lease_to` (this worker) ahead of the commit
    (:func:`_send_ahead`); ``None`` exactly when :attr:`lease_to` is: it starts when it is run."""
    recorded: Trial
    """The job just recorded: when it is the only search trial of the step told, it is told without reading the
    step's trials back. Its record is not flushed before the advance, so its result and the decision the tell
    makes on it are written in one UPDATE; the tally, counted in the database, is corrected for it (:meth:`counted`)."""

    def counted(self, tally: runs.TrialTally) -> runs.TrialTally:
        """``tally`` (counted in the database) as it is with the recorded job's status, while that is not flushed."""
        history = sa_inspect(self.recorded).attrs.status.history
        if not history.added or not history.deleted:
            return tally  # flushed already (a query of the record autoflushed it): the database counted it
        before, after = history.deleted[0], history.added[0]
        if before not in runs.UNFINISHED or after not in runs.FINISHED:
            return tally
        search = self.recorded.kind not in runs.SERVICE_KINDS
        return dataclasses.replace(tally, unfinished=tally.unfinished - 1, finished=tally.finished + int(search))


def _advance_locked(session: Session, experiment: Experiment, outbox: list[Message],
                    joined: _Joined | None = None) -> str:
    """:func:`advance` on an experiment this transaction has locked.

    Its reads come first and the experiment's row is written once, in the flush that inserts the step's trials
    (or at the commit): no autoflush writes it again before each query (three UPDATEs of the row per step)."""
    experiment_id = experiment.id
    status = ExperimentStatus(experiment.status)
    if status.terminal:
        return "terminal"
    with session.no_autoflush:
        tally = runs.tally_trials(session, experiment_id, experiment.step)
        if joined is not None:
            tally = joined.counted(tally)  # the record of the job before this advance is not flushed yet
        if status is ExperimentStatus.cancelling:
            if tally.unfinished:
                return "waiting for jobs to stop"
            runs.finish_experiment(session, experiment, ExperimentStatus.cancelled)
            return "cancelled"
        if status is ExperimentStatus.queued:
            experiment.status = ExperimentStatus.running.value
            experiment.started_at = experiment.started_at or utcnow()
            experiment.attempts += 1
            add_event(session, experiment_id, "status", status="running", attempt=experiment.attempts)
        experiment.heartbeat_at = utcnow()
        if tally.unfinished:
            return "step still running"
        if experiment.problem is None:
            return _resolve_step(session, experiment, outbox)
        return _advance_step(session, experiment, tally, outbox, joined)


def advance(experiment_id: int, ctx: RunContext) -> str:
    """Advance the experiment by at most one step; returns what happened (for logs and tests).

    An advance of a queued experiment is a start token: it starts :func:`~server.services.runs.fairest_queued`'s
    choice instead, and sends the token on when that was another experiment (whose own message then finds it
    running and does nothing)."""
    target = experiment_id  # the experiment this call works on (a start token may choose another)

    def work(session: Session, outbox: list[Message]) -> str:
        nonlocal target
        target = experiment_id
        experiment = session.get(Experiment, experiment_id, with_for_update=True,
                                 options=[defer(Experiment.search_state)])  # read by _load when it is needed
        if experiment is None:
            return "missing"
        status = ExperimentStatus(experiment.status)
        if status is ExperimentStatus.queued:
            chosen = runs.fairest_queued(session, ctx.settings.max_running_per_owner)
            if chosen is None:
                return "waiting: every owner with a queued experiment is at max_running_per_owner"
            if chosen.id != experiment_id:
                outbox.append((ADVANCE, experiment_id))  # still queued: its token rides on
                experiment, target = chosen, chosen.id
        return _advance_locked(session, experiment, outbox)

    try:
        return ctx.commit_and_emit(work)
    except IntegrityError:
        return "another advance won"  # it inserted this step's jobs first
    except DB_CONNECTION_ERRORS:
        raise
    except Exception as exc:  # noqa: BLE001 - a strategy or a stored state that fails ends its experiment only
        log.exception("advancing experiment %s failed", target)
        error, tb = f"{type(exc).__name__}: {exc}", traceback.format_exc()

        def fail(session: Session) -> None:
            experiment = session.get(Experiment, target, with_for_update=True)
            if experiment is not None and not ExperimentStatus(experiment.status).terminal:
                runs.finish_experiment(session, experiment, ExperimentStatus.failed, error=error, traceback=tb)

        transact(ctx.session_factory, fail, give_up_after_s=ctx.settings.db_retry_s)
        return "failed"


def _resolve_step(session: Session, experiment: Experiment, outbox: list[Message]) -> str:
    resolve = runs.trial_by_key(session, experiment.id, runs.RESOLVE_KEY)
    if resolve is not None:
        # Finished without storing a problem: its failure ended the experiment, or a racing advance saw it first.
        return "resolving"
    experiment.phase = "resolving the problem"  # before the flush that inserts the job: one write of the row
    # The runner's own job, not one the strategy asked for: seq 0, before every search trial.
    trial = runs.add_job_trial(session, experiment.id, key=runs.RESOLVE_KEY, kind=runs.RESOLVE_KIND,
                               job={"kind": "resolve"}, step=0, seq=0)
    outbox.append((EVALUATE, trial.id))
    return "resolving"


_LEASED = "prunehub.leased_trial"  # session.info: the trial this transaction's advance inserted under a lease


def _leased(session: Session, trials: Sequence[Trial], lease_to: str | None) -> None:
    """Hold the first of ``trials`` (inserted under ``lease_to``'s lease) for :func:`_claim_next`: the session keeps
    clean rows only while something refers to them, and reading the job back was a query per job."""
    if lease_to is not None and trials:
        session.info[_LEASED] = trials[0]


StateKey = tuple[int, Any, int]
_KEPT_STATES = 64
_kept: OrderedDict[StateKey, tuple[Any, Any, Any]] = OrderedDict()
"""The config, strategy and search state each advance of this process committed, for the experiment's next advance
here (a coordinator advances the same experiments again and again): reading the state back from its row and
validating it was a cost per step that grows with the search's history. The stored state stays the source of
truth; an entry is used only while it is still the stored one (:func:`_state_key`), and taken out when used, so a
failed advance leaves nothing behind (a state that the next advance reads back from the row)."""


def _state_key(experiment: Experiment) -> StateKey:
    # ``state_version`` grows with every write of the state (here or in another process), so an entry another
    # advance outdated never matches again; ``created_at`` tells apart two experiments with one id (two databases).
    return experiment.id, experiment.created_at, experiment.state_version


def _keep_state(session: Session, experiment: Experiment, loaded: tuple[Any, Any, Any]) -> None:
    """Keep ``loaded`` for the experiment's next advance once this transaction has committed (never before: a
    rolled-back advance's state was not stored)."""
    key = _state_key(experiment)

    def keep(_session: Session) -> None:
        _kept[key] = loaded
        _kept.move_to_end(key)
        while len(_kept) > _KEPT_STATES:
            _kept.popitem(last=False)

    event.listen(session, "after_commit", keep, once=True)


def _load(experiment: Experiment) -> tuple[Any, Any, Any]:
    kept = _kept.pop(_state_key(experiment), None)
    if kept is not None:
        return kept  # what the last advance here committed, and still the stored state: its row is not read
    from pruning.search import make_strategy, state_type
    from pruning.search.base import SearchProblem
    from pruning.search.configs import parse_algorithm_config

    config = parse_algorithm_config(experiment.config)
    strategy = make_strategy(config)
    state = (
        state_type(experiment.algorithm).model_validate(experiment.search_state)
        if experiment.search_state is not None
        else strategy.start(SearchProblem.model_validate(experiment.problem))
    )
    return config, strategy, state


def _advance_step(session: Session, experiment: Experiment, tally: runs.TrialTally, outbox: list[Message],
                  joined: _Joined | None) -> str:
    if tally.exports:  # the search ended and its export ran (its result is on the best trial)
        export = session.scalar(
            select(Trial).where(Trial.experiment_id == experiment.id, Trial.kind == runs.EXPORT_KIND)
        )
        assert export is not None
        return _finish(session, experiment, export.context.get("reason"))
    config, strategy, state = _load(experiment)
    lease_to = joined.lease_to if joined is not None else None
    previous_best = state.best_key
    experiment_id = experiment.id
    told: dict[str, Trial] = {}
    if experiment.step > 0:
        recorded = joined.recorded if joined is not None else None
        if (tally.in_step == 1 and recorded is not None and recorded.step == experiment.step
                and recorded.kind not in runs.SERVICE_KINDS):
            trials = [recorded]  # a one-job step (a sequential search): the job this transaction recorded
        else:
            step_trials = select(Trial).where(
                Trial.experiment_id == experiment_id, Trial.step == experiment.step, runs.SEARCH_TRIAL
            )
            trials = list(session.scalars(step_trials.order_by(Trial.seq)))
        state = strategy.tell(state, [trial_to_result(t) for t in trials])
        told = {t.job_key: t for t in trials}
    finished = tally.finished
    stop_reason = None
    if config.max_minutes is not None and elapsed_minutes(experiment.started_at) >= config.max_minutes:
        stop_reason = f"stopped after max_minutes={config.max_minutes}"
    state, jobs = strategy.ask(state) if stop_reason is None else (state, [])
    if jobs and config.max_trials is not None and finished >= config.max_trials:
        stop_reason, jobs = f"stopped after max_trials={config.max_trials}", []
    if jobs and joined is not None and joined.start is not None:
        joined.start(jobs[0].model_dump(mode="json"))  # the first is leased to this worker (add_trials below)
    # The state is serialised once per step, after ask (what the next tell continues from); the told step's
    # decisions are in its history already. Serialising it after tell too doubled the cost of every step.
    state_json = state.model_dump(mode="json")
    if told:
        persist_told_state(session, experiment, state, state_json, told, finished, config.max_trials, previous_best)
    if not jobs:
        if stop_reason is None and not state.done:
            raise RuntimeError("the strategy asked for no job but is not done")
        return _end_search(session, experiment, state, state_json, stop_reason or state.stop_reason, outbox, lease_to)
    next_step = experiment.step + 1
    # A job whose trial exists (recorded before a restart, by an older runner) is told its stored result, not run
    # again. The state is stored with the trials it asked for, so a joined advance does not look: a key that
    # exists fails its INSERT, which undoes the joined transaction, and the advance then runs on its own (here).
    known = {} if joined is not None else runs.trials_by_key(session, experiment_id, [job.key for job in jobs])
    for trial in known.values():
        if trial.step == next_step:
            raise IntegrityError("a racing advance asked this step", None, ValueError(trial.job_key))
        trial.step = next_step  # recorded before a restart (an older database): its result is told, not re-run
    if not told:
        experiment.search_state = state_json  # the first step's state (persist_told_state saved the others)
        experiment.state_version += 1
    experiment.step = next_step
    experiment.phase = f"step {next_step}: {len(jobs)} job(s)"
    add_event(session, experiment_id, "step", step=next_step, jobs=len(jobs))
    # One flush: the experiment's row, the told trials' decisions and one INSERT of the step's new trials.
    new = runs.add_trials(session, experiment_id, [job for job in jobs if job.key not in known],
                          status=TrialStatus.pending, step=next_step, first_seq=tally.last_seq + 1,
                          lease_first=lease_to)
    known.update((trial.job_key, trial) for trial in new)
    _leased(session, new, lease_to)
    outbox.extend((EVALUATE, known[job.key].id) for job in jobs if known[job.key].status not in runs.FINISHED)
    _keep_state(session, experiment, (config, strategy, state))  # the state just stored, for the next tell here
    if not outbox:
        outbox.append((ADVANCE, experiment_id))  # every job of the step was recorded already: tell at once
    return f"step {next_step}: {len(jobs)} job(s)"


def _end_search(
    session: Session, experiment: Experiment, state: Any, state_json: dict[str, Any], reason: str | None,
    outbox: list[Message], lease_to: str | None = None,
) -> str:
    """The strategy is done (or a budget ran out): export the best trial's model when it has none, else finish."""
    session.flush()  # the joined record of the last job: the failure reason reads the trials back
    experiment.search_state = state_json
    experiment.state_version += 1
    if state.best_key is None:
        runs.finish_experiment(session, experiment, ExperimentStatus.failed,
                               error=failure_reason(session, experiment.id, reason))
        return "failed"
    best = runs.trial_by_key(session, experiment.id, state.best_key)
    job = runs.model_rebuild_job(best) if best is not None else None
    if best is None or job is None:
        return _finish(session, experiment, reason)
    if reason:
        add_event(session, experiment.id, "note", text=reason)
    experiment.phase = "saving the best pruned model"
    trial = runs.add_job_trial(session, experiment.id, key=runs.EXPORT_KEY, kind=runs.EXPORT_KIND,
                               job={**job, "best_trial_id": best.id}, step=experiment.step + 1,
                               context={"reason": reason} if reason else {}, lease=lease_to)
    _leased(session, [trial], lease_to)
    outbox.append((EVALUATE, trial.id))
    return "exporting"


def _finish(session: Session, experiment: Experiment, reason: str | None) -> str:
    runs.finish_experiment(session, experiment, ExperimentStatus.succeeded)
    if reason:
        experiment.phase = f"succeeded: {reason}"
    return "succeeded"


def persist_told_state(
    session: Session, experiment: Experiment, state: Any, state_json: dict[str, Any], told: dict[str, Trial],
    finished: int, max_trials: int | None, previous_best: str | None,
) -> None:
    """After a tell: copy the strategy's decisions onto the told step's trials (``told``, by job key: accepted,
    rejected and chosen are known only now), then save the state (``state_json``, its serialised form), the
    progress (``finished`` trials) and the best so far (``previous_best``: the best key of the state told)."""
    decisions = _decisions(state_json, set(told))
    if decisions:
        runs.record_decisions(session, experiment.id, decisions, known=told)
    runs.save_progress(
        session,
        experiment,
        state=state_json,
        progress=state.progress if state.progress is not None else float(finished),
        progress_total=state.progress_total
        if state.progress_total is not None
        else (float(max_trials) if max_trials else None),
        phase=state.phase or f"{experiment.algorithm}: {finished} trial(s)",
        best_key=state.best_key,
        previous_best_key=previous_best,
        known=told,
    )


def _decisions(node: Any, keys: set[str]) -> dict[str, dict[str, Any]]:
    """``{job key: {"decision": ..., "acceptance_probability": ...}}`` for the given keys, from a strategy's state
    JSON (its history records carry ``key`` and ``decision``, possibly nested, as in AutoCompress's per-round
    searches; annealing adds the probability a worse-or-equal proposal had). The state grows with its history
    and is walked once per step: only containers are visited (a recursion into every number and string of it
    was the larger part of an advance's own time after a few dozen trials)."""
    found: dict[str, dict[str, Any]] = {}
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, dict):
            key, decision = current.get("key"), current.get("decision")
            if isinstance(key, str) and key in keys and isinstance(decision, str):
                found[key] = {"decision": decision}
                if current.get("acceptance_probability") is not None:
                    found[key]["acceptance_probability"] = current["acceptance_probability"]
            stack.extend(v for v in reversed(current.values()) if isinstance(v, (dict, list)))
        elif isinstance(current, list):
            stack.extend(v for v in reversed(current) if isinstance(v, (dict, list)))
    return found


def failure_reason(session: Session, experiment_id: int, reason: str | None) -> str:
    """Why a search that produced no successful trial failed: its own stop reason and the last trial failure."""
    reasons = [r for r in (reason, runs.last_failure(session, experiment_id)) if r]
    return "; ".join(reasons) or "the search produced no successful trial"


# ---------------------------------------------------------------------------------------------------- evaluate


@dataclass
class _Claimed:
    experiment_id: int
    entrypoint: str
    bundle: str | None
    kind: str
    config: dict[str, Any]
    problem: dict[str, Any] | None
    job: dict[str, Any]
    attempt: int
    started_at: datetime | None


@dataclass
class _Outcome:
    """What one execution produced: the trial's result, whether to run it again, and whether it ends the
    experiment (a broken task module, a problem that cannot be resolved)."""

    result: Any
    retry: bool = False
    fatal: str | None = None
    traceback: str | None = None
    problem: dict[str, Any] | None = None


def evaluate(trial_id: int, ctx: RunContext) -> str:
    """Run one trial's job on this worker (lease, execute, record); emit the advance after a step's last job."""
    from pruning.search.base import Result

    worker_id, settings = ctx.worker_id, ctx.settings

    def claim(session: Session, outbox: list[Message]) -> tuple[str, _Claimed | None]:
        # The trial (locked) with the columns of its experiment the job needs, in one query: not the experiment's
        # whole row, whose search state grows with the search and was read and parsed for every job.
        row = session.execute(
            select(Trial, Experiment.status, Experiment.entrypoint, Experiment.bundle, Experiment.config,
                   Experiment.problem, Experiment.started_at)
            .join(Experiment, Experiment.id == Trial.experiment_id)
            .where(Trial.id == trial_id)
            .with_for_update(of=Trial)
        ).one_or_none()
        if row is None:
            return "missing", None
        trial, experiment = row[0], row
        if trial.status in runs.FINISHED:
            _after_job(session, trial, outbox)  # a replay: the advance it should have caused may be lost
            return "done", None
        if trial.status == TrialStatus.running.value and trial.lease_owner != worker_id:
            if runs.lease_is_live_at(trial.heartbeat_at, settings.lease_grace_s):
                return "skipped", None  # a duplicate delivery: another worker holds the job
        status = ExperimentStatus(experiment.status)
        if status is ExperimentStatus.cancelling or status.terminal:
            why = "cancelled before it ran" if status in (ExperimentStatus.cancelling, ExperimentStatus.cancelled) \
                else f"not run: the experiment had {status.value}"
            runs.record_result(session, trial, Result(key=trial.job_key, status="failed", error=why))
            _after_job(session, trial, outbox)
            return "cancelled", None
        if trial.attempts >= MAX_JOB_ATTEMPTS:
            runs.record_result(session, trial, Result(
                key=trial.job_key, status="failed",
                error=f"the job was started {trial.attempts} times without finishing; its workers died"))
            _after_job(session, trial, outbox)
            return "gave up", None
        runs.take_trial_lease(trial, worker_id)
        return "run", _Claimed(trial.experiment_id, experiment.entrypoint, experiment.bundle, trial.kind,
                               experiment.config, experiment.problem, dict(trial.extra["job"]), trial.attempts,
                               experiment.started_at)

    outcome, claimed = ctx.commit_and_emit(claim)
    while claimed is not None:  # the job claimed, then each job of a new step this worker went on with
        outcome, chained = _run_claimed(trial_id, claimed, ctx)
        trial_id, claimed = chained if chained is not None else (trial_id, None)
    return outcome


def _run_claimed(trial_id: int, claimed: _Claimed, ctx: RunContext) -> tuple[str, tuple[int, _Claimed] | None]:
    """Execute a claimed job, record it, and advance when it was its step's last; returns the outcome and the job
    of the new step this worker claimed in the same transaction to run next (:meth:`Transport.runs_next_job`)."""
    worker_id = ctx.worker_id
    executed = _execute(trial_id, claimed, ctx)
    result = executed.result
    if executed.retry and claimed.attempt < MAX_JOB_ATTEMPTS:
        def release(session: Session, outbox: list[Message]) -> bool:
            trial = session.get(Trial, trial_id, with_for_update=True)
            if trial is None or trial.lease_owner != worker_id or runs.cancel_requested(session, trial.experiment_id):
                return False
            trial.status, trial.lease_owner = TrialStatus.pending.value, None
            add_event(session, trial.experiment_id, "note", text=f"retrying {trial.job_key}: {result.error}")
            outbox.append((EVALUATE, trial_id))  # run again by whichever worker takes it next
            return True

        if ctx.commit_and_emit(release):
            return "retrying", None

    def record(session: Session, outbox: list[Message], *, joined: bool = False) -> tuple[Trial, Experiment] | None:
        # Returns the trial it recorded and the experiment row it locked (None: nothing to advance). ``joined``:
        # the advance that follows in this transaction works on that row and decides itself whether the step is
        # over (its tally counts every unfinished job), so the step's own count (_after_job) is not made.
        # The trial and its experiment, both locked, in one query; the experiment's row lock serialises the step's
        # finishers (_after_job, the joined advance). Its search state is not read.
        row = session.execute(
            select(Trial, Experiment).join(Experiment, Experiment.id == Trial.experiment_id)
            .where(Trial.id == trial_id).options(defer(Experiment.search_state)).with_for_update()
        ).one()
        trial, experiment = row[0], row[1]
        if trial.lease_owner != worker_id and trial.status != TrialStatus.running.value:
            return None  # taken over (our lease went stale) and recorded by the other worker
        runs.record_result(session, trial, result)
        live = not ExperimentStatus(experiment.status).terminal
        if executed.problem is not None and live:
            runs.store_problem(session, experiment, executed.problem)
        elif trial.kind == runs.EXPORT_KIND:
            best = session.get(Trial, int(claimed.job["best_trial_id"]))
            if best is not None:
                runs.attach_model_result(session, best, result)
        if executed.fatal is not None and live:
            runs.finish_experiment(session, experiment, ExperimentStatus.failed, error=executed.fatal,
                                   traceback=executed.traceback)
            return None
        if not joined:
            _after_job(session, trial, outbox)
        return trial, experiment

    def record_and_advance(session: Session, outbox: list[Message]) -> tuple[str | None, tuple[int, _Claimed] | None]:
        # The advance a step's last job emits runs here, in the transaction that records the job, on both
        # transports: it would only be sent to (or queued in) a worker that locks the same row next, and sending
        # it cost a broker hop, a task and a commit per step. It runs after every recorded job and does nothing
        # while the step has unfinished jobs. Returns the advance's outcome (None: none ran) and the job of the
        # new step this worker claimed to run next.
        recorded = record(session, outbox, joined=True)
        if recorded is None:
            return None, None
        trial, experiment = recorded
        lease_to = worker_id if ctx.transport.runs_next_job() else None
        start = (lambda job: _send_ahead(ctx.settings, experiment, job)) if lease_to is not None else None
        advanced = _advance_locked(session, experiment, outbox, _Joined(lease_to, start, trial))
        return advanced, _claim_next(session, experiment, outbox)

    from worker.isolation import drop_ahead

    try:
        advanced, chained = ctx.commit_and_emit(record_and_advance)
    except DB_CONNECTION_ERRORS:
        drop_ahead()  # the job sent ahead was not committed: nothing will request it
        raise
    except Exception:  # noqa: BLE001 - the advance failed and its transaction was undone, the record with it:
        # record alone; the advance it emits runs on its own and reports the failure (as if never joined).
        drop_ahead()
        ctx.commit_and_emit(record)
        return str(result.status), None
    return (f"experiment {advanced}" if advanced in ENDED else str(result.status)), chained


def _claim_next(session: Session, experiment: Experiment, outbox: list[Message]) -> tuple[int, _Claimed] | None:
    """The job the advance in this transaction inserted under this worker's lease (:class:`_Joined`), taken out of
    the outbox: this worker runs it next. It is new (inserted under the experiment's row lock this transaction
    holds, invisible to every other worker until the commit), so the checks of a claim hold by construction, and
    no row is read: the advance left it in the session (:func:`_leased`)."""
    trial = session.info.pop(_LEASED, None)
    if trial is None:
        return None
    outbox.remove((EVALUATE, trial.id))
    return trial.id, _Claimed(experiment.id, experiment.entrypoint, experiment.bundle, trial.kind, experiment.config,
                              experiment.problem, dict(trial.extra["job"]), trial.attempts, experiment.started_at)


def _execute(trial_id: int, claimed: _Claimed, ctx: RunContext) -> _Outcome:
    """Execute a claimed job in the task process under the trial's heartbeat; every failure becomes a result."""
    from pruning.search.base import Result
    from worker.isolation import ChildDied, ChildError, JobCancelled, JobTimedOut

    settings, key = ctx.settings, str(claimed.job.get("key", claimed.kind))
    max_minutes = _max_minutes(claimed.config)
    experiment_deadline = None
    if max_minutes is not None and claimed.kind != runs.EXPORT_KIND:
        # The best model's export after the budget ran out is held to job_timeout only.
        experiment_deadline = time.monotonic() + max_minutes * 60.0 - elapsed_minutes(claimed.started_at) * 60.0
    deadline = experiment_deadline
    if settings.job_timeout_s is not None:
        job_deadline = time.monotonic() + settings.job_timeout_s
        deadline = job_deadline if deadline is None else min(deadline, job_deadline)

    def cancelled() -> bool:
        try:
            with ctx.session_factory() as session:
                return runs.cancel_requested(session, claimed.experiment_id)
        except DB_CONNECTION_ERRORS:
            return False  # the database is away: keep running and ask again at the next poll

    def failed(error: str, **extra: Any) -> Any:
        return Result(key=key, status="failed", error=error, extra=extra)

    started = time.monotonic()
    resolving = claimed.kind == runs.RESOLVE_KIND
    try:
        with open_task_process(claimed.entrypoint, settings, bundle=claimed.bundle,
                               experiment_id=claimed.experiment_id) as child, _job_lease(ctx, trial_id):
            if resolving:
                answer = child.request("resolve", {"config": claimed.config}, should_stop=cancelled,
                                       deadline=deadline)
                return _Outcome(Result(key=key, status="succeeded", duration_s=time.monotonic() - started),
                                problem=answer["problem"])
            job = {k: v for k, v in claimed.job.items() if k != "best_trial_id"}
            answer = child.request("job", {"problem": claimed.problem, "job": job}, should_stop=cancelled,
                                   deadline=deadline)
            return _Outcome(Result.model_validate(answer["result"]))
    except ChildError as exc:
        fatal = exc.fatal or resolving
        return _Outcome(failed(str(exc), traceback=exc.traceback), fatal=str(exc) if fatal else None,
                        traceback=exc.traceback if fatal else None)
    except ChildDied as exc:
        error = f"{exc} while loading the task" if resolving else str(exc)
        last_try = claimed.attempt >= MAX_JOB_ATTEMPTS
        return _Outcome(failed(error), retry=True, fatal=error if resolving and last_try else None)
    except JobCancelled:
        return _Outcome(failed(f"cancelled after {time.monotonic() - started:.1f} s of running; the task process "
                               "was killed"))
    except JobTimedOut:
        if experiment_deadline is not None and time.monotonic() >= experiment_deadline:
            error = f"stopped after max_minutes={max_minutes}"
            if resolving:
                return _Outcome(failed(error), fatal=f"max_minutes={max_minutes} reached while loading")
            return _Outcome(failed(error))
        error = f"job exceeded job_timeout={settings.job_timeout_s}s"
        return _Outcome(failed(error), fatal=error if resolving else None)
    except Exception as exc:  # noqa: BLE001 - the worker outlives anything one job does
        log.exception("trial %s could not run", trial_id)
        error = f"{type(exc).__name__}: {exc}"
        return _Outcome(failed(error, traceback=traceback.format_exc()), fatal=error if resolving else None)


@contextlib.contextmanager
def _job_lease(ctx: RunContext, trial_id: int) -> Iterator[None]:
    """Keep the lease on a running job alive: the process's :class:`TrialLeases` renews it (in-process, the
    experiment's heartbeat does, :attr:`RunContext.inprocess`)."""
    if ctx.inprocess:
        yield
        return
    leases = ctx.leases if ctx.leases is not None else TrialLeases(ctx.session_factory, ctx.settings.worker_heartbeat_s)
    try:
        with leases.hold(trial_id, ctx.worker_id):
            yield
    finally:
        if leases is not ctx.leases:
            leases.close()


def _after_job(session: Session, trial: Trial, outbox: list[Message]) -> None:
    """Emit the next advance when no job of this trial's step is unfinished (decided in the database in the
    transaction that recorded this job, so at least one of the step's last finishers sees zero)."""
    left = session.scalar(
        select(func.count()).where(
            Trial.experiment_id == trial.experiment_id, Trial.step == trial.step, Trial.status.in_(runs.UNFINISHED)
        )
    )
    if not left:
        outbox.append((ADVANCE, trial.experiment_id))


# ------------------------------------------------------------------------------------------ in-process transport


def run_inprocess(entry: Message, *, session_factory: sessionmaker[Session], settings: Settings,
                  worker_id: str) -> str:
    """Run an experiment in this worker from one message until it ends, draining every emit here.

    The worker takes the experiment's lease (a duplicate delivery while it is live exits at once; a dead
    worker's stale lease is taken over, at most ``max_attempts`` times) and renews it by a heartbeat. Its queue
    starts with the unfinished jobs a dead worker left, so a resumed run continues where the last one stopped.
    Returns the experiment's status at the end, or ``"skipped"``.
    """
    name, target = entry

    def claim(session: Session) -> int | None:
        experiment_id = target
        if name == EVALUATE:
            trial = session.get(Trial, target)
            if trial is None:
                return None
            experiment_id = trial.experiment_id
        experiment = runs.claim_experiment(
            session, experiment_id, worker_id, lease_grace_s=settings.lease_grace_s, max_attempts=settings.max_attempts,
            max_running_per_owner=settings.max_running_per_owner,
        )
        return experiment.id if experiment is not None else None

    experiment_id = transact(session_factory, claim, give_up_after_s=settings.db_retry_s)
    if experiment_id is None:
        return "skipped"
    transport = InProcessTransport()
    ctx = RunContext(session_factory, settings, worker_id, transport, inprocess=True)

    def unfinished(session: Session) -> list[int]:
        query = select(Trial.id).where(Trial.experiment_id == experiment_id, Trial.status.in_(runs.UNFINISHED))
        return list(session.scalars(query.order_by(Trial.seq)))

    # The jobs a dead worker left (an entry evaluations.run among them), then the advance that tells their step.
    left = transact(session_factory, unfinished, give_up_after_s=settings.db_retry_s)
    transport.emit([*((EVALUATE, trial_id) for trial_id in left), (ADVANCE, experiment_id)])
    beat = Heartbeat(
        lambda session: runs.heartbeat(session, experiment_id, worker_id),
        session_factory,
        settings.worker_heartbeat_s,
        name=f"experiment {experiment_id}",
    )

    def still_held(session: Session) -> bool:
        experiment = session.get(Experiment, experiment_id)
        return (experiment is not None and experiment.lease_owner == worker_id
                and not ExperimentStatus(experiment.status).terminal)

    # Jobs of this experiment that another worker's live trial lease held when this one came to them. The trial
    # lease is renewed by its own heartbeat (and set when the job started), so a dead worker's trial lease outlives
    # its experiment lease by up to a heartbeat: a worker that took over the stale experiment at once finds the
    # job still "held". Dropping it ended this run with its step unfinished and the lease released; the reaper
    # then re-sent the job and the experiment was claimed once more (an attempt lost to nothing). So it waits for
    # the job's lease to go stale (and runs it) or for the job to finish (and tells it), while it holds the
    # experiment: no job runs twice, and a run ends only when its experiment did or was taken over.
    held_elsewhere: list[int] = []
    announced: set[int] = set()
    with beat:
        while transport.queue or held_elsewhere:
            if not transport.queue:
                if not transact(session_factory, still_held, give_up_after_s=settings.db_retry_s):
                    break
                time.sleep(settings.worker_heartbeat_s)
                transport.emit([(EVALUATE, trial_id) for trial_id in held_elsewhere])
                held_elsewhere.clear()
                continue
            # Each use case waits out a database outage in its own transactions (transact).
            task, target_id = transport.queue.popleft()
            outcome = advance(target_id, ctx) if task == ADVANCE else evaluate(target_id, ctx)
            log.debug("%s(%s): %s", task, target_id, outcome)
            if task == EVALUATE and outcome == "skipped":
                if target_id not in announced:
                    announced.add(target_id)
                    log.info("trial %s is held under another worker's live lease; waiting for it", target_id)
                held_elsewhere.append(target_id)

    def release(session: Session) -> str:
        experiment = session.get(Experiment, experiment_id, with_for_update=True)
        assert experiment is not None
        if experiment.lease_owner == worker_id:
            experiment.lease_owner = None  # not ended here (work moved to another worker): the reaper watches it
        return experiment.status

    return transact(session_factory, release, give_up_after_s=settings.db_retry_s)


ENDED = frozenset(status.value for status in ExperimentStatus if status.terminal)
"""The outcomes of :func:`advance` (and of :func:`run_inprocess`) after which a run's place is free."""


def may_have_ended(task: str, outcome: str) -> bool:
    """Whether the use case ``task`` that returned ``outcome`` may have ended its experiment, so that
    :func:`kick_queue` should start who is next. An advance ends a run with one of :data:`ENDED`; an evaluation
    ends one with a job whose failure is fatal (a broken task module), whose outcome is ``"failed"``, or with the
    advance it joined ending it (``"experiment succeeded"``, ...). A job's ``"succeeded"`` (most jobs) ends
    nothing: kicking after each of those cost a transaction per job."""
    if task == EVALUATE:
        return outcome == TrialStatus.failed.value or (
            outcome.startswith("experiment ") and outcome.removeprefix("experiment ") in ENDED)
    return outcome in ENDED


def kick_queue(ctx: RunContext) -> int | None:
    """Send a start token (``experiments.run``) for the queued experiment that may start now, if any, and return
    its id. Called after a run ended, so that an experiment of an owner at ``max_running_per_owner`` (whose own
    message found the owner at the cap and did nothing) starts when one of theirs finishes, not when the reaper
    finds it. A token too many starts nothing that should not start: it only ever starts the fairest choice."""

    def work(session: Session, outbox: list[Message]) -> int | None:
        chosen = runs.fairest_queued(session, ctx.settings.max_running_per_owner)
        if chosen is None:
            return None
        outbox.append((ADVANCE, chosen.id))
        return chosen.id

    return ctx.commit_and_emit(work)


def run_experiment(
    experiment_id: int, *, session_factory: sessionmaker[Session], settings: Settings, worker_id: str
) -> str:
    """Run (or resume) experiment ``experiment_id`` in this process (the in-process transport); returns its
    final status, or ``"skipped"`` when another worker holds it or there is nothing to run."""
    return run_inprocess((ADVANCE, experiment_id), session_factory=session_factory, settings=settings,
                         worker_id=worker_id)
