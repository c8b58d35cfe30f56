"""The distributed runner: one search across many GPUs, coordinated through the database.

Two kinds of Celery task, on two queues:

* ``experiments.run`` (queue ``experiments``, cheap, no user code): **advance** one step. Lock the experiment row;
  if every job of the current step has finished, ``tell`` the strategy their results; ``ask`` the next jobs; insert
  them as ``pending`` trials (unique job keys) with the state after the ask; commit; then enqueue one
  ``evaluations.run`` task per job. It never waits for a job.
* ``evaluations.run`` (queue ``evaluations``, one process per GPU): take one trial's lease, execute its job in the
  supervised task process, record the result, and — when the database says it was the last unfinished job of its
  step — enqueue the next advance. A failed job is retried once (on whichever worker takes it next), then recorded
  as a failed trial; the strategy decides what a step with failures means.

``evaluations.resolve`` builds the pruning problem (the user's ``model()`` is traced there, not in the coordinator)
and ``evaluations.export`` rebuilds the best trial's model for download before the experiment ends. Two advances
racing for one step are harmless: the second finds the step already asked (row lock on PostgreSQL; unique job keys
everywhere). Weights travel through the shared artifact store; messages carry ids only.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from server.db.models import Experiment, ExperimentStatus, Trial, TrialStatus, utcnow
from server.services import runs
from server.services.dispatch import ADVANCE, EVALUATE, EXPORT, RESOLVE, Send
from server.services.events import add_event
from server.settings import Settings
from worker.runner import (
    Heartbeat,
    elapsed_minutes,
    failure_reason,
    open_task_process,
    persist_told_state,
    transact,
    trial_to_result,
)

__all__ = ["advance", "evaluate", "export_best", "resolve"]

log = logging.getLogger(__name__)

MAX_JOB_ATTEMPTS = 2  # a job is retried once, then recorded as failed


def _load(settings: Settings, experiment: Experiment) -> tuple[Any, Any, Any]:
    from pruning.search import make_strategy, state_type
    from pruning.search.base import SearchProblem
    from pruning.search.configs import parse_algorithm_config

    config = parse_algorithm_config(experiment.config)
    problem = SearchProblem.model_validate(experiment.problem)
    strategy = make_strategy(config)
    state = (
        state_type(experiment.algorithm).model_validate(experiment.search_state)
        if experiment.search_state is not None
        else strategy.start(problem)
    )
    return config, strategy, state


def advance(experiment_id: int, *, session_factory: sessionmaker[Session], settings: Settings, send: Send) -> str:
    """Advance the experiment by at most one step; returns what happened (for logs and tests)."""
    outbox: list[tuple[str, int]] = []

    def work(session: Session) -> str:
        outbox.clear()
        experiment = session.get(Experiment, experiment_id, with_for_update=True)
        if experiment is None:
            return "missing"
        status = ExperimentStatus(experiment.status)
        if status.terminal:
            return "terminal"
        unfinished = session.scalar(
            select(func.count()).where(Trial.experiment_id == experiment_id, Trial.status.in_(runs.UNFINISHED))
        )
        if status is ExperimentStatus.cancelling:
            if unfinished:
                return "waiting for jobs to stop"
            runs.finish_experiment(session, experiment, ExperimentStatus.cancelled)
            return "cancelled"
        if status is ExperimentStatus.queued:
            experiment.status = ExperimentStatus.running.value
            experiment.started_at = experiment.started_at or utcnow()
            experiment.attempts += 1
            add_event(session, experiment_id, "status", status="running", attempt=experiment.attempts)
        experiment.heartbeat_at = utcnow()
        if experiment.problem is None:
            if experiment.phase != "resolving the problem":
                experiment.phase = "resolving the problem"
                outbox.append((RESOLVE, experiment_id))
            return "resolving"
        if unfinished:
            return "step still running"
        return _advance_step(session, experiment, settings, outbox)

    try:
        outcome = transact(session_factory, work, give_up_after_s=settings.db_retry_s)
    except IntegrityError:
        return "another advance won"  # it inserted this step's jobs first
    send_committed(outbox, send, session_factory, settings)
    return outcome


def send_committed(
    messages: list[tuple[str, int]], send: Send, session_factory: sessionmaker[Session], settings: Settings
) -> None:
    """Send messages whose rows the caller committed as sent (:func:`server.services.runs.record_sent`); a send that
    fails is recorded as not sent, so the reaper sends it after the lease grace instead of waiting for it."""
    failed = []
    for name, target in messages:
        try:
            send(name, target)
        except Exception:  # noqa: BLE001 - the broker is down; the reaper sends it later
            log.warning("could not send %s(%s); the reaper will", name, target, exc_info=True)
            failed.append((name, target))
    if failed:
        transact(session_factory, lambda session: runs.record_sent(session, failed, sent=False),
                 give_up_after_s=settings.db_retry_s)


def _advance_step(session: Session, experiment: Experiment, settings: Settings, outbox: list[tuple[str, int]]) -> str:
    config, strategy, state = _load(settings, experiment)
    experiment_id = experiment.id
    if experiment.step > 0:
        step_trials = select(Trial).where(Trial.experiment_id == experiment_id, Trial.step == experiment.step)
        trials = list(session.scalars(step_trials.order_by(Trial.seq)))
        state = strategy.tell(state, [trial_to_result(t) for t in trials])
        persist_told_state(session, experiment, state, {t.job_key for t in trials}, config.max_trials)
    finished = runs.finished_trials(session, experiment_id)
    stop_reason = None
    if config.max_minutes is not None and elapsed_minutes(experiment.started_at) >= config.max_minutes:
        stop_reason = f"stopped after max_minutes={config.max_minutes}"
    state, jobs = strategy.ask(state) if stop_reason is None else (state, [])
    if jobs and config.max_trials is not None and finished >= config.max_trials:
        stop_reason, jobs = f"stopped after max_trials={config.max_trials}", []
    if not jobs:
        return _finish(session, experiment, state, stop_reason or state.stop_reason, outbox)
    next_step = experiment.step + 1
    for job in jobs:
        # A job key asked twice (a racing advance) fails at the insert, before anything is sent.
        trial = runs.add_trial(session, experiment_id, job, status=TrialStatus.pending, step=next_step)
        trial.enqueued_at = utcnow()  # its message is sent right after this commit
        outbox.append((EVALUATE, trial.id))
    experiment.search_state = state.model_dump(mode="json")  # the state after ask: tell continues from it
    experiment.state_version += 1
    experiment.step = next_step
    experiment.phase = f"step {next_step}: {len(jobs)} job(s)"
    add_event(session, experiment_id, "step", step=next_step, jobs=len(jobs))
    return f"step {next_step}: {len(jobs)} job(s)"


def _finish(
    session: Session, experiment: Experiment, state: Any, reason: str | None, outbox: list[tuple[str, int]]
) -> str:
    experiment.search_state = state.model_dump(mode="json")
    if state.best_key is None:
        error = failure_reason(session, experiment.id, reason)
        runs.finish_experiment(session, experiment, ExperimentStatus.failed, error=error)
        return "failed"
    best = runs.trial_by_key(session, experiment.id, state.best_key)
    if best is not None and runs.model_rebuild_job(best) is not None:
        if experiment.phase != "saving the best pruned model":
            experiment.phase = "saving the best pruned model"
            if reason:
                add_event(session, experiment.id, "note", text=reason)
            outbox.append((EXPORT, experiment.id))
        return "exporting"
    runs.finish_experiment(session, experiment, ExperimentStatus.succeeded)
    if reason:
        experiment.phase = f"succeeded: {reason}"
    return "succeeded"


def evaluate(
    trial_id: int, *, session_factory: sessionmaker[Session], settings: Settings, worker_id: str, send: Send
) -> str:
    """Run one trial's job on this worker (lease, execute, record); enqueue the advance after a step's last job."""
    from pruning.search.base import Job, Result
    from worker.isolation import ChildDied, ChildError, JobCancelled, JobTimedOut

    def claim(session: Session) -> tuple[str, Any] | None:
        trial = session.get(Trial, trial_id, with_for_update=True)
        if trial is None or trial.step is None:
            return None  # an in-process trial runs inside its experiment, never from a message
        experiment = session.get(Experiment, trial.experiment_id)
        assert experiment is not None
        if trial.status in runs.FINISHED:
            return ("done", experiment.id)
        if trial.status == TrialStatus.running.value and trial.lease_owner != worker_id:
            if runs.lease_is_live_at(trial.heartbeat_at, settings.lease_grace_s):
                return None  # a duplicate delivery: another worker holds the job
        if experiment.status in (ExperimentStatus.cancelling.value, ExperimentStatus.cancelled.value):
            runs.record_result(session, trial, Result(key=trial.job_key, status="failed",
                                                      error="cancelled before it ran"))
            return ("cancelled", experiment.id)
        if trial.attempts >= MAX_JOB_ATTEMPTS:
            runs.record_result(
                session,
                trial,
                Result(key=trial.job_key, status="failed", error=f"the job was started {trial.attempts} times "
                       "without finishing; its workers died"),
            )
            return ("gave up", experiment.id)
        runs.take_trial_lease(trial, worker_id)
        return ("run", (experiment.id, experiment.entrypoint, experiment.bundle, experiment.problem, trial.extra["job"],
                        trial.attempts))

    claimed = transact(session_factory, claim, give_up_after_s=settings.db_retry_s)
    if claimed is None:
        return "skipped"
    outcome, payload = claimed
    if outcome != "run":
        _after_job(trial_id, session_factory, settings, send)
        return outcome
    experiment_id, entrypoint, bundle, problem_json, job_json, attempt = payload
    job = Job.model_validate(job_json)

    def cancelled() -> bool:
        with session_factory() as session:
            return runs.cancel_requested(session, experiment_id)

    def beat(session: Session) -> None:
        trial = session.get(Trial, trial_id)
        if trial is not None and trial.lease_owner == worker_id:
            trial.heartbeat_at = utcnow()

    deadline = time.monotonic() + settings.job_timeout_s if settings.job_timeout_s else None
    retry = False
    try:
        with open_task_process(entrypoint, settings, bundle=bundle, experiment_id=experiment_id) as child, Heartbeat(
            beat, session_factory, settings.worker_heartbeat_s, name=f"trial {trial_id}"
        ):
            answer = child.request(
                "job", {"problem": problem_json, "job": job_json}, should_stop=cancelled, deadline=deadline
            )
            result = Result.model_validate(answer["result"])
    except ChildError as exc:
        result = Result(key=job.key, status="failed", error=str(exc), extra={"traceback": exc.traceback})
        retry = not exc.fatal
    except ChildDied as exc:
        result, retry = Result(key=job.key, status="failed", error=str(exc)), True
    except JobTimedOut:
        result = Result(key=job.key, status="failed", error=f"job exceeded job_timeout={settings.job_timeout_s}s")
        retry = True
    except JobCancelled as exc:
        result = Result(key=job.key, status="failed", error=str(exc))
    if result.status == "failed" and retry and attempt < MAX_JOB_ATTEMPTS and not cancelled():
        # Retried once, by whichever evaluation worker takes the message next.
        def release(session: Session) -> None:
            trial = session.get(Trial, trial_id)
            if trial is not None and trial.lease_owner == worker_id:
                trial.status, trial.lease_owner = TrialStatus.pending.value, None
                runs.record_sent(session, [(EVALUATE, trial_id)])
                add_event(session, trial.experiment_id, "note", text=f"retrying {trial.job_key}: {result.error}")

        transact(session_factory, release, give_up_after_s=settings.db_retry_s)
        send_committed([(EVALUATE, trial_id)], send, session_factory, settings)
        return "retrying"

    def record(session: Session) -> None:
        trial = session.get(Trial, trial_id)
        assert trial is not None
        if trial.lease_owner == worker_id or trial.status == TrialStatus.running.value:
            runs.record_result(session, trial, result)

    transact(session_factory, record, give_up_after_s=settings.db_retry_s)
    _after_job(trial_id, session_factory, settings, send)
    return result.status


def _after_job(trial_id: int, session_factory: sessionmaker[Session], settings: Settings, send: Send) -> None:
    """Enqueue the next advance when no job of this trial's step is unfinished (decided in the database after
    this job's result was committed, so at least one of the step's last finishers sees zero)."""

    def remaining(session: Session) -> int | None:
        trial = session.get(Trial, trial_id)
        if trial is None:
            return None
        left = session.scalar(
            select(func.count()).where(
                Trial.experiment_id == trial.experiment_id, Trial.step == trial.step, Trial.status.in_(runs.UNFINISHED)
            )
        )
        if left:
            return None
        runs.record_sent(session, [(ADVANCE, trial.experiment_id)])
        return trial.experiment_id

    experiment_id = transact(session_factory, remaining, give_up_after_s=settings.db_retry_s)
    if experiment_id is not None:
        send_committed([(ADVANCE, experiment_id)], send, session_factory, settings)


def resolve(experiment_id: int, *, session_factory: sessionmaker[Session], settings: Settings, send: Send) -> str:
    """Build the experiment's pruning problem in a task process (user code), store it, and advance."""
    from worker.isolation import ChildDied, ChildError, JobTimedOut

    with session_factory() as session:
        experiment = session.get(Experiment, experiment_id)
        if experiment is None or ExperimentStatus(experiment.status).terminal:
            return "skipped"
        if experiment.problem is not None:
            send(ADVANCE, experiment_id)
            return "already resolved"
        entrypoint, config, bundle = experiment.entrypoint, experiment.config, experiment.bundle
    error: str | None = None
    problem: Any = None
    try:
        with open_task_process(entrypoint, settings, bundle=bundle, experiment_id=experiment_id) as child:
            problem = child.request("resolve", {"config": config}, deadline=None)["problem"]
    except (ChildError, ChildDied, JobTimedOut) as exc:
        error = str(exc) if isinstance(exc, ChildError) else f"{exc} while loading the task"

    def store(session: Session) -> None:
        experiment = session.get(Experiment, experiment_id, with_for_update=True)
        assert experiment is not None
        if ExperimentStatus(experiment.status).terminal:
            return
        if error is not None:
            runs.finish_experiment(session, experiment, ExperimentStatus.failed, error=error)
            return
        runs.store_problem(session, experiment, problem)
        runs.record_sent(session, [(ADVANCE, experiment_id)])

    transact(session_factory, store, give_up_after_s=settings.db_retry_s)
    if error is None:
        send_committed([(ADVANCE, experiment_id)], send, session_factory, settings)
    return "failed" if error else "resolved"


def export_best(
    experiment_id: int, *, session_factory: sessionmaker[Session], settings: Settings, send: Send
) -> str:
    """Rebuild the best trial's job with ``save_artifact`` so it downloads, then end the experiment."""
    from pruning.search.base import Job, Result
    from worker.isolation import ChildDied, ChildError, JobTimedOut

    with session_factory() as session:
        experiment = session.get(Experiment, experiment_id)
        if experiment is None or ExperimentStatus(experiment.status).terminal or experiment.best_trial_id is None:
            return "skipped"
        best = session.get(Trial, experiment.best_trial_id)
        assert best is not None
        job_json = runs.model_rebuild_job(best)
        entrypoint, problem_json, best_id = experiment.entrypoint, experiment.problem, best.id
        bundle = experiment.bundle
    if job_json is None:
        return "skipped"
    job = Job.model_validate(job_json)
    try:
        with open_task_process(entrypoint, settings, bundle=bundle, experiment_id=experiment_id) as child:
            answer = child.request("job", {"problem": problem_json, "job": job.model_dump(mode="json")})
            result = Result.model_validate(answer["result"])
    except (ChildError, ChildDied, JobTimedOut) as exc:
        result = Result(key=job.key, status="failed", error=str(exc))

    def finish(session: Session) -> None:
        experiment = session.get(Experiment, experiment_id, with_for_update=True)
        assert experiment is not None
        if ExperimentStatus(experiment.status).terminal:
            return
        trial = session.get(Trial, best_id)
        assert trial is not None
        runs.attach_model_result(session, trial, result)
        final = (
            ExperimentStatus.cancelled
            if experiment.status == ExperimentStatus.cancelling.value
            else ExperimentStatus.succeeded
        )
        runs.finish_experiment(session, experiment, final)

    transact(session_factory, finish, give_up_after_s=settings.db_retry_s)
    return "exported"
