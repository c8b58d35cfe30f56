"""The in-process search runner: ask, execute the jobs one after another, tell, persist — until done.

Resumable by construction: the search state is persisted after every tell, trials are unique per job key, and a
job whose trial already finished is not executed again (its stored result is replayed into ``tell``). A re-run
of the same experiment therefore continues where the last run stopped.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from server.db.models import Experiment, ExperimentStatus, Trial, TrialStatus, as_utc
from server.services import runs
from server.settings import Settings

__all__ = [
    "Heartbeat",
    "elapsed_minutes",
    "failure_reason",
    "open_task_process",
    "persist_told_state",
    "run_experiment",
    "transact",
    "trial_to_result",
]

log = logging.getLogger(__name__)


def trial_to_result(trial: Trial) -> Any:
    """The :class:`~pruning.search.base.Result` a finished trial recorded (for replay on resume)."""
    from pruning.search.base import Result

    extra = dict(trial.extra or {})
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
        extra=extra,
        duration_s=trial.duration_s or 0.0,
    )


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


def open_task_process(
    entrypoint: str, settings: Settings, *, bundle: str | None = None, experiment_id: int | None = None
) -> Any:
    """The supervised task process for ``entrypoint`` (a context manager; reused when the settings allow), importing
    it from the experiment's uploaded ``bundle`` when it has one (:mod:`worker.bundles`)."""
    from worker.bundles import BundleSource
    from worker.isolation import task_process

    source = None
    if bundle is not None:
        assert experiment_id is not None, "a bundled task process belongs to one experiment"
        source = BundleSource.of(bundle, experiment_id, settings)
    return task_process(
        entrypoint,
        list(settings.allowed_entrypoints),
        artifacts_dir=str(settings.artifacts_dir),
        device=settings.device,
        memory_limit_mb=settings.job_memory_limit_mb,
        reuse=settings.reuse_task_process,
        bundle=source,
    )


class _Stop(Exception):
    """Ends the run early with a final status."""

    def __init__(self, status: ExperimentStatus, reason: str | None = None) -> None:
        super().__init__(reason or status.value)
        self.status = status
        self.reason = reason


def run_experiment(
    experiment_id: int, *, session_factory: sessionmaker[Session], settings: Settings, worker_id: str
) -> str:
    """Run (or resume) experiment ``experiment_id`` to a terminal status; returns that status.

    A user's failing code fails the experiment (error and traceback stored), never the worker.
    """
    def claim(session: Session) -> bool:
        experiment = runs.claim_experiment(
            session, experiment_id, worker_id, lease_grace_s=settings.lease_grace_s, max_attempts=settings.max_attempts
        )
        return experiment is not None

    if not transact(session_factory, claim, give_up_after_s=settings.db_retry_s):
        return "skipped"
    beat = Heartbeat(
        lambda session: runs.heartbeat(session, experiment_id, worker_id),
        session_factory,
        settings.worker_heartbeat_s,
        name=f"experiment {experiment_id}",
    )
    try:
        with beat:
            status, reason = _run_until_done(experiment_id, session_factory, settings, worker_id)
        tb = None
    except _Stop as stop:
        status, reason, tb = stop.status, stop.reason, None
    except Exception as exc:  # noqa: BLE001 - anything from the user's code ends the experiment, not the worker
        log.exception("experiment %s failed", experiment_id)
        status, reason, tb = ExperimentStatus.failed, f"{type(exc).__name__}: {exc}", traceback.format_exc()

    def finish(session: Session) -> ExperimentStatus:
        experiment = session.get(Experiment, experiment_id, with_for_update=True)
        assert experiment is not None
        final = status
        if final is ExperimentStatus.succeeded and experiment.status == ExperimentStatus.cancelling.value:
            final = ExperimentStatus.cancelled
        runs.finish_experiment(
            session, experiment, final, error=reason if final is ExperimentStatus.failed else None, traceback=tb
        )
        if final is not ExperimentStatus.failed and reason:
            experiment.phase = f"{final.value}: {reason}"
        return final

    return transact(session_factory, finish, give_up_after_s=settings.db_retry_s).value


def _run_until_done(
    experiment_id: int, session_factory: sessionmaker[Session], settings: Settings, worker_id: str
) -> tuple[ExperimentStatus, str | None]:
    """:func:`_run`, restarted from the persisted state when the database connection fails mid-run (a
    PostgreSQL restart): recorded trials replay, the job whose result could not be written runs once more."""
    give_up_at = time.monotonic() + settings.db_retry_s
    delay = 0.5
    while True:
        try:
            return _run(experiment_id, session_factory, settings, worker_id)
        except DB_CONNECTION_ERRORS as exc:
            if time.monotonic() >= give_up_at:
                raise
            log.warning("database unavailable during experiment %s (%s); resuming in %.1fs", experiment_id,
                        type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _run(
    experiment_id: int, session_factory: sessionmaker[Session], settings: Settings, worker_id: str
) -> tuple[ExperimentStatus, str | None]:
    from pruning.search import make_strategy
    from pruning.search.base import Job, Result, SearchProblem
    from pruning.search.configs import parse_algorithm_config
    from worker.isolation import ChildDied, ChildError, JobCancelled, JobTimedOut

    with session_factory() as session:
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None
        entrypoint, raw_config, stored_state = experiment.entrypoint, experiment.config, experiment.search_state
        bundle = experiment.bundle
        stored_problem = experiment.problem
        started_at = experiment.started_at

    config = parse_algorithm_config(raw_config)
    experiment_deadline = None
    if config.max_minutes is not None:
        elapsed_s = elapsed_minutes(started_at) * 60.0
        experiment_deadline = time.monotonic() + config.max_minutes * 60.0 - elapsed_s

    def cancelled() -> bool:
        with session_factory() as session:
            return runs.cancel_requested(session, experiment_id)

    with open_task_process(entrypoint, settings, bundle=bundle, experiment_id=experiment_id) as child:
        if stored_problem is not None:
            problem = SearchProblem.model_validate(stored_problem)
        else:
            try:
                answer = child.request("resolve", {"config": raw_config}, should_stop=cancelled,
                                       deadline=experiment_deadline)
            except ChildError as exc:
                raise _Stop(ExperimentStatus.failed, str(exc)) from exc
            except ChildDied as exc:
                raise _Stop(ExperimentStatus.failed, f"{exc} while loading the task") from exc
            except JobCancelled as exc:
                raise _Stop(ExperimentStatus.cancelled, "cancelled by request") from exc
            except JobTimedOut as exc:
                raise _Stop(ExperimentStatus.failed, f"max_minutes={config.max_minutes} reached while loading") from exc
            problem = SearchProblem.model_validate(answer["problem"])
            with session_factory() as session:
                row = session.get(Experiment, experiment_id)
                assert row is not None
                runs.store_problem(session, row, answer["problem"])
                session.commit()

        strategy = make_strategy(config)
        initial = strategy.start(problem)
        state = type(initial).model_validate(stored_state) if stored_state is not None else initial
        problem_json = problem.model_dump(mode="json")

        def execute(job: Job, within_budget: bool = True) -> Result:
            # The best model's rebuild after the budget ran out is not held to max_minutes (only job_timeout).
            deadline = experiment_deadline if within_budget else None
            if settings.job_timeout_s is not None:
                job_deadline = time.monotonic() + settings.job_timeout_s
                deadline = job_deadline if deadline is None else min(deadline, job_deadline)
            try:
                answer = child.request("job", {"problem": problem_json, "job": job.model_dump(mode="json")},
                                       should_stop=cancelled, deadline=deadline)
            except ChildError as exc:
                if exc.fatal:
                    raise _Stop(ExperimentStatus.failed, str(exc)) from exc
                return Result(key=job.key, status="failed", error=str(exc), extra={"traceback": exc.traceback})
            except ChildDied as exc:
                return Result(key=job.key, status="failed", error=str(exc))
            except JobCancelled as exc:
                raise _Stop(ExperimentStatus.cancelled, "cancelled by request") from exc
            except JobTimedOut as exc:
                if within_budget and experiment_deadline is not None and time.monotonic() >= experiment_deadline:
                    raise _BudgetSpent(f"stopped after max_minutes={config.max_minutes}") from exc
                return Result(key=job.key, status="failed", error=f"job exceeded job_timeout={settings.job_timeout_s}s")
            return Result.model_validate(answer["result"])

        try:
            while True:
                if cancelled():
                    raise _Stop(ExperimentStatus.cancelled, "cancelled by request")
                if experiment_deadline is not None and time.monotonic() >= experiment_deadline:
                    raise _BudgetSpent(f"stopped after max_minutes={config.max_minutes}")
                with session_factory() as session:
                    finished = runs.finished_trials(session, experiment_id)
                state, jobs = strategy.ask(state)
                if not jobs:
                    if not state.done:
                        raise RuntimeError("the strategy asked for no job but is not done")
                    break
                if config.max_trials is not None and finished >= config.max_trials:
                    raise _BudgetSpent(f"stopped after max_trials={config.max_trials}")
                results = []
                for job in jobs:
                    with session_factory() as session:
                        trial = runs.trial_by_key(session, experiment_id, job.key)
                        if trial is not None and trial.status in runs.FINISHED:
                            results.append(trial_to_result(trial))  # recorded before a restart: replay
                            continue
                        experiment = session.get(Experiment, experiment_id)
                        assert experiment is not None
                        trial = runs.start_trial(session, experiment, job, worker_id)  # the heartbeat renews it
                        experiment.phase = f"running {job.kind} {job.key}"
                        session.commit()
                        trial_id = trial.id
                    result = execute(job)
                    with session_factory() as session:
                        trial = session.get(Trial, trial_id)
                        assert trial is not None
                        runs.record_result(session, trial, result)
                        session.commit()
                    results.append(result)
                state = strategy.tell(state, results)
                with session_factory() as session:
                    experiment = session.get(Experiment, experiment_id)
                    assert experiment is not None
                    persist_told_state(session, experiment, state, {job.key for job in jobs}, config.max_trials)
                    session.commit()
            reason = state.stop_reason
        except _BudgetSpent as spent:
            reason = str(spent)
        _ensure_model(experiment_id, state.best_key, session_factory, execute)
    return _final_status(experiment_id, session_factory, state, reason)


def _ensure_model(
    experiment_id: int,
    best_key: str | None,
    session_factory: sessionmaker[Session],
    execute: Callable[..., Any],
) -> None:
    """Make the best trial downloadable (see :func:`server.services.runs.model_rebuild_job`)."""
    from pruning.search.base import Job

    if best_key is None:
        return
    with session_factory() as session:
        trial = runs.trial_by_key(session, experiment_id, best_key)
        job_json = runs.model_rebuild_job(trial) if trial is not None else None
        if trial is None or job_json is None:
            return
        trial_id = trial.id
        experiment = session.get(Experiment, experiment_id)
        assert experiment is not None
        experiment.phase = "saving the best pruned model"
        session.commit()
    result = execute(Job.model_validate(job_json), False)
    with session_factory() as session:
        trial = session.get(Trial, trial_id)
        assert trial is not None
        runs.attach_model_result(session, trial, result)
        session.commit()


def persist_told_state(
    session: Session, experiment: Experiment, state: Any, keys: set[str], max_trials: int | None
) -> None:
    """After a tell: copy the strategy's decisions onto the step's trials (accepted, rejected and chosen are known
    only now), then save the state, the progress and the best so far. Shared by both runners."""
    state_json = state.model_dump(mode="json")
    decisions = _decisions(state_json, keys)
    if decisions:
        runs.record_decisions(session, experiment.id, decisions)
    finished = runs.finished_trials(session, experiment.id)
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
    )


def _decisions(node: Any, keys: set[str]) -> dict[str, dict[str, Any]]:
    """``{job key: {"decision": ..., "acceptance_probability": ...}}`` for the given keys, from a strategy's state
    JSON (its history records carry ``key`` and ``decision``, possibly nested, as in AutoCompress's per-round
    searches; annealing adds the probability a worse-or-equal proposal had)."""
    found: dict[str, dict[str, Any]] = {}
    if isinstance(node, dict):
        key, decision = node.get("key"), node.get("decision")
        if isinstance(key, str) and key in keys and isinstance(decision, str):
            found[key] = {"decision": decision}
            if node.get("acceptance_probability") is not None:
                found[key]["acceptance_probability"] = node["acceptance_probability"]
        for value in node.values():
            found.update(_decisions(value, keys))
    elif isinstance(node, list):
        for value in node:
            found.update(_decisions(value, keys))
    return found


class _BudgetSpent(Exception):
    """max_trials or max_minutes reached: the search ends with what it found."""


def elapsed_minutes(started: datetime | None) -> float:
    """Minutes since ``started`` (0 before the experiment started)."""
    return 0.0 if started is None else (datetime.now(UTC) - as_utc(started)).total_seconds() / 60.0


def failure_reason(session: Session, experiment_id: int, reason: str | None) -> str:
    """Why a search that produced no successful trial failed: its own stop reason and the last trial failure."""
    reasons = [r for r in (reason, runs.last_failure(session, experiment_id)) if r]
    return "; ".join(reasons) or "the search produced no successful trial"


def _final_status(
    experiment_id: int, session_factory: sessionmaker[Session], state: Any, reason: str | None
) -> tuple[ExperimentStatus, str | None]:
    """Succeeded when the search produced a best result; failed (with the reasons) otherwise."""
    if state.best_key is None:
        with session_factory() as session:
            raise _Stop(ExperimentStatus.failed, failure_reason(session, experiment_id, reason))
    return ExperimentStatus.succeeded, reason
