"""Use cases of the worker: claim an experiment, record trials, persist the search state, finish.

Every function works inside the caller's transaction; the runner commits after each step so that the database,
not the broker or a process's memory, is the source of truth.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.db.models import Experiment, ExperimentStatus, Trial, TrialStatus, as_utc, utcnow
from server.services.events import add_event

__all__ = [
    "add_trial",
    "attach_model_result",
    "cancel_requested",
    "claim_experiment",
    "finished_trials",
    "last_failure",
    "model_rebuild_job",
    "experiments_to_requeue",
    "heartbeat",
    "lease_is_live",
    "lease_is_live_at",
    "trials_to_requeue",
    "finish_experiment",
    "record_decisions",
    "record_result",
    "save_progress",
    "start_trial",
    "store_problem",
    "trial_by_key",
]


def lease_is_live(experiment: Experiment, grace_s: float) -> bool:
    """Whether another worker holds the experiment: a lease whose heartbeat is younger than ``grace_s``."""
    if experiment.lease_owner is None:
        return False
    return lease_is_live_at(experiment.heartbeat_at, grace_s)


def lease_is_live_at(heartbeat_at: datetime | None, grace_s: float) -> bool:
    """Whether a heartbeat is younger than ``grace_s``."""
    if heartbeat_at is None:
        return False
    return (utcnow() - as_utc(heartbeat_at)).total_seconds() < grace_s


def claim_experiment(
    session: Session, experiment_id: int, worker_id: str, *, lease_grace_s: float = 30.0, max_attempts: int = 3
) -> Experiment | None:
    """Lock the row and take the lease for ``worker_id``; ``None`` when there is nothing to run.

    A cancelled or finished experiment, a missing id, or one whose lease another worker holds (a duplicate
    delivery: Redis redelivers long tasks after its visibility timeout) returns ``None`` without touching it. A
    running experiment with a stale lease is taken over and resumes from its persisted state. A ``cancelling``
    experiment that no worker holds becomes ``cancelled`` here.
    """
    experiment = session.get(Experiment, experiment_id, with_for_update=True)
    if experiment is None:
        return None
    status = ExperimentStatus(experiment.status)
    if status.terminal:
        return None
    if experiment.lease_owner != worker_id and lease_is_live(experiment, lease_grace_s):
        return None
    if experiment.attempts >= max_attempts:
        # Every delivery so far died mid-run (a worker killed, a machine lost): stop instead of looping.
        finish_experiment(
            session,
            experiment,
            ExperimentStatus.failed,
            error=f"the experiment was started {experiment.attempts} times without finishing (max_attempts="
            f"{max_attempts}); its workers died or were killed",
        )
        return None
    if status is ExperimentStatus.cancelling:
        finish_experiment(session, experiment, ExperimentStatus.cancelled)
        return None
    experiment.status = ExperimentStatus.running.value
    experiment.lease_owner = worker_id
    experiment.heartbeat_at = utcnow()
    experiment.attempts += 1
    if experiment.started_at is None:
        experiment.started_at = utcnow()
    experiment.phase = "starting"
    add_event(session, experiment.id, "status", status="running", attempt=experiment.attempts)
    return experiment


def experiments_to_requeue(session: Session, grace_s: float) -> list[int]:
    """Ids a reaper should hand to the broker again: running or cancelling experiments whose lease went stale
    (their worker died) and queued ones older than ``grace_s`` (an enqueue that failed after the commit).

    Re-enqueuing is harmless when the original message is still in the broker: the lease makes a duplicate
    delivery exit at once, and a finished experiment is skipped.
    """
    cutoff = utcnow() - timedelta(seconds=grace_s)
    stale = select(Experiment.id).where(
        Experiment.status.in_((ExperimentStatus.running.value, ExperimentStatus.cancelling.value)),
        (Experiment.heartbeat_at.is_(None)) | (Experiment.heartbeat_at < cutoff),
    )
    waiting = select(Experiment.id).where(
        Experiment.status == ExperimentStatus.queued.value, Experiment.created_at < cutoff
    )
    return sorted(set(session.scalars(stale)) | set(session.scalars(waiting)))


def trials_to_requeue(session: Session, grace_s: float) -> list[int]:
    """Distributed runner: trials whose evaluation worker died (running, stale lease) and pending trials whose
    message seems lost (pending much longer than a job could wait behind a busy queue)."""
    stale = utcnow() - timedelta(seconds=grace_s)
    lost = utcnow() - timedelta(seconds=max(grace_s * 10, 300.0))
    active = select(Experiment.id).where(
        Experiment.status.in_((ExperimentStatus.running.value, ExperimentStatus.cancelling.value))
    )
    running = select(Trial.id).where(
        Trial.experiment_id.in_(active),
        Trial.status == TrialStatus.running.value,
        (Trial.heartbeat_at.is_(None)) | (Trial.heartbeat_at < stale),
    )
    waiting = select(Trial.id).where(
        Trial.experiment_id.in_(active), Trial.status == TrialStatus.pending.value, Trial.created_at < lost
    )
    return sorted(set(session.scalars(running)) | set(session.scalars(waiting)))


FINISHED = (TrialStatus.succeeded.value, TrialStatus.failed.value)
REBUILDABLE_KINDS = ("evaluate", "finetune_and_evaluate")


def store_problem(session: Session, experiment: Experiment, problem: dict[str, Any]) -> None:
    """Keep the resolved search problem (JSON of :class:`~pruning.search.base.SearchProblem`) on the experiment."""
    experiment.problem = problem
    experiment.phase = "problem resolved"
    pruning = problem["pruning"]
    add_event(
        session, experiment.id, "problem", units=len(pruning["units"]), target_sparsity=pruning["target_sparsity"]
    )


def finished_trials(session: Session, experiment_id: int) -> int:
    """How many of the experiment's trials have a result (succeeded or failed)."""
    query = select(func.count()).where(Trial.experiment_id == experiment_id, Trial.status.in_(FINISHED))
    return int(session.scalar(query) or 0)


def last_failure(session: Session, experiment_id: int) -> str | None:
    """The most recent failed trial's error, reported when a search ends with nothing that succeeded."""
    trial = session.scalar(
        select(Trial)
        .where(Trial.experiment_id == experiment_id, Trial.status == TrialStatus.failed.value)
        .order_by(Trial.seq.desc())
        .limit(1)
    )
    return f"trial {trial.job_key} failed: {trial.error}" if trial is not None else None


def model_rebuild_job(trial: Trial) -> dict[str, Any] | None:
    """The job (JSON) to run again with ``save_artifact`` so ``trial`` downloads as a pruned model, or ``None``
    when it already has its model or is not a job a rebuild can repeat. Strategies keep weights only where they
    need them; both runners rebuild the best trial's model this way before an experiment ends."""
    extra = trial.extra or {}
    if extra.get("model_artifact") or "job" not in extra or trial.kind not in REBUILDABLE_KINDS:
        return None
    return {**extra["job"], "save_artifact": True}


def heartbeat(session: Session, experiment_id: int, worker_id: str) -> bool:
    """Refresh the lease; ``False`` when this worker no longer holds it."""
    experiment = session.get(Experiment, experiment_id)
    if experiment is None or experiment.lease_owner != worker_id:
        return False
    experiment.heartbeat_at = utcnow()
    return True


def cancel_requested(session: Session, experiment_id: int) -> bool:
    status = session.scalar(select(Experiment.status).where(Experiment.id == experiment_id))
    return status in (ExperimentStatus.cancelling.value, ExperimentStatus.cancelled.value)


def trial_by_key(session: Session, experiment_id: int, job_key: str) -> Trial | None:
    return session.scalar(select(Trial).where(Trial.experiment_id == experiment_id, Trial.job_key == job_key))


def add_trial(session: Session, experiment_id: int, job: Any, *, status: TrialStatus, step: int | None = None) -> Trial:
    """Insert the trial row of ``job`` with the next sequence number. A job key the experiment already has fails
    at the flush (unique per experiment): the caller decides whether that is a replay or a lost race."""
    seq = (session.scalar(select(func.max(Trial.seq)).where(Trial.experiment_id == experiment_id)) or 0) + 1
    trial = Trial(
        experiment_id=experiment_id,
        seq=seq,
        step=step,
        job_key=job.key,
        kind=job.kind,
        status=status.value,
        distribution=dict(job.distribution),
        context=dict(job.context),
        extra={"job": job.model_dump(mode="json")},  # kept so the best model can be rebuilt for download
    )
    session.add(trial)
    session.flush()
    return trial


def start_trial(session: Session, experiment: Experiment, job: Any) -> Trial:
    """The trial row of ``job`` (created ``running`` if new; a replayed job key returns the existing row)."""
    existing = trial_by_key(session, experiment.id, job.key)
    return existing if existing is not None else add_trial(session, experiment.id, job, status=TrialStatus.running)


def record_result(session: Session, trial: Trial, result: Any) -> Trial:
    """Store a job's :class:`~pruning.search.base.Result` on its trial and log it."""
    trial.status = TrialStatus.succeeded.value if result.status == "succeeded" else TrialStatus.failed.value
    emerged = result.extra.get("distribution")
    if isinstance(emerged, dict) and emerged:
        # Global ranking: the per-unit split emerged from the weights; the job only fixed the overall target.
        trial.distribution = {str(k): float(v) for k, v in emerged.items()}
    trial.score = result.score
    trial.requested = result.requested or None
    trial.achieved = result.achieved or None
    trial.overall_sparsity = result.overall_sparsity
    trial.params = result.params
    trial.flops = result.flops
    trial.params_ratio = result.params_ratio
    trial.flops_ratio = result.flops_ratio
    trial.latency_ms = result.latency_ms
    trial.budget_ratio = result.budget_ratio
    trial.feasible = result.feasible
    trial.evaluation = result.evaluation or None
    trial.error = result.error
    trial.artifact_id = result.artifact
    extra = {k: v for k, v in result.extra.items() if k != "traceback" or result.error}
    if "job" in (trial.extra or {}):
        extra["job"] = trial.extra["job"]
    trial.extra = extra
    trial.duration_s = result.duration_s
    trial.finished_at = utcnow()
    add_event(
        session,
        trial.experiment_id,
        "trial",
        trial_id=trial.id,
        seq=trial.seq,
        status=trial.status,
        score=trial.score,
        overall_sparsity=trial.overall_sparsity,
        flops_ratio=trial.flops_ratio,
        params_ratio=trial.params_ratio,
        budget_ratio=trial.budget_ratio,
        feasible=trial.feasible,
        context=trial.context,
        error=trial.error,
    )
    return trial


def attach_model_result(session: Session, trial: Trial, result: Any) -> None:
    """Record the pruned model a rebuild of ``trial``'s job produced (and the score the rebuilt model got), or a
    note saying why there is none."""
    artifact = result.extra.get("model_artifact") if result.status == "succeeded" else None
    if artifact:
        trial.extra = {**(trial.extra or {}), "model_artifact": artifact, "model_score": result.score}
        add_event(session, trial.experiment_id, "model", trial_id=trial.id, score=result.score)
    else:
        add_event(session, trial.experiment_id, "note", text=f"could not save the best model: {result.error}")


def record_decisions(session: Session, experiment_id: int, decisions: dict[str, dict[str, Any]]) -> None:
    """Store the strategy's decision (accepted, rejected, chosen, ...) in the context of each trial, with the
    acceptance probability of a worse-or-equal annealing proposal."""
    for job_key, record in decisions.items():
        decision = record["decision"]
        trial = trial_by_key(session, experiment_id, job_key)
        if trial is not None and trial.context.get("decision") != decision:
            context = dict(trial.context)
            context["decision"] = decision
            if decision in ("accepted", "rejected"):
                context["accepted"] = decision == "accepted"
            if record.get("acceptance_probability") is not None:
                context["acceptance_probability"] = record["acceptance_probability"]
            trial.context = context  # a new dict: JSON columns track assignment, not mutation
            add_event(session, experiment_id, "decision", trial_id=trial.id, seq=trial.seq, decision=decision)


def save_progress(
    session: Session,
    experiment: Experiment,
    *,
    state: dict[str, Any],
    progress: float,
    progress_total: float | None,
    phase: str | None,
    best_key: str | None,
) -> None:
    """Persist the search state after a tell, with progress and the strategy's best so far."""
    experiment.search_state = state
    experiment.state_version += 1
    experiment.progress_done = progress
    experiment.progress_total = progress_total
    experiment.phase = phase
    experiment.heartbeat_at = utcnow()
    if best_key is not None:
        best = trial_by_key(session, experiment.id, best_key)
        if best is not None and best.id != experiment.best_trial_id:
            experiment.best_trial_id = best.id
            experiment.best_score = best.score
            add_event(session, experiment.id, "best", trial_id=best.id, score=best.score)
    add_event(session, experiment.id, "progress", done=progress, total=progress_total, phase=phase)


def finish_experiment(
    session: Session,
    experiment: Experiment,
    status: ExperimentStatus,
    *,
    error: str | None = None,
    traceback: str | None = None,
) -> None:
    experiment.status = status.value
    experiment.finished_at = utcnow()
    experiment.lease_owner = None
    experiment.phase = status.value
    if error is not None:
        experiment.error = error
        experiment.traceback = traceback
    add_event(session, experiment.id, "status", status=status.value, error=error)
