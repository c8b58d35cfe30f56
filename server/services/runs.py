"""Use cases of the worker: claim an experiment, record trials, persist the search state, finish.

Every function works inside the caller's transaction; the runner commits after each step so that the database,
not the broker or a process's memory, is the source of truth.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, bindparam, exists, func, literal, or_, select, text, update
from sqlalchemy.orm import Session, aliased

from server.db.models import Experiment, ExperimentStatus, Trial, TrialStatus, as_utc, utcnow
from server.services.dispatch import ADVANCE, EVALUATE
from server.services.events import add_event

__all__ = [
    "JobTrial",
    "TrialTally",
    "add_job_trial",
    "add_job_trials",
    "add_trial",
    "add_trials",
    "attach_model_result",
    "cancel_requested",
    "claim_experiment",
    "finished_trials",
    "last_failure",
    "model_rebuild_job",
    "experiments_to_resend",
    "fairest_queued",
    "heartbeat",
    "lease_is_live",
    "lease_is_live_at",
    "record_sent",
    "renew_trial_leases",
    "trials_to_resend",
    "finish_experiment",
    "record_decisions",
    "record_result",
    "save_progress",
    "take_trial_lease",
    "store_problem",
    "tally_trials",
    "trial_by_key",
    "trials_by_key",
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
    session: Session,
    experiment_id: int,
    worker_id: str,
    *,
    lease_grace_s: float = 30.0,
    max_attempts: int = 3,
    max_running_per_owner: int | None = None,
) -> Experiment | None:
    """Lock the row and take the lease for ``worker_id``; ``None`` when there is nothing to run.

    A running experiment with a stale lease is taken over and resumes from its persisted state. A ``cancelling``
    experiment that no worker holds becomes ``cancelled`` here. A message naming a queued experiment is a start
    token: the experiment started is :func:`fairest_queued`'s choice, which may be another one (or none, when
    every owner with a queued experiment is at ``max_running_per_owner``). So is a message naming a cancelled or
    finished experiment, a missing id, or one whose lease another worker holds (a duplicate delivery: Redis
    redelivers long tasks after its visibility timeout): that experiment is not touched.
    """
    experiment = session.get(Experiment, experiment_id, with_for_update=True)
    status = ExperimentStatus(experiment.status) if experiment is not None else ExperimentStatus.cancelled
    busy = experiment is not None and experiment.lease_owner != worker_id and lease_is_live(experiment, lease_grace_s)
    if experiment is None or status.terminal or status is ExperimentStatus.queued or busy:
        # A start token (see fairest_queued): also a duplicate or late message, whose experiment another worker
        # holds or that has ended, so a token spent on another experiment's start is never lost.
        experiment = fairest_queued(session, max_running_per_owner)
        if experiment is None:
            return None
        status = ExperimentStatus.queued
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


ACTIVE = (ExperimentStatus.running.value, ExperimentStatus.cancelling.value)


def _serialize_starts(session: Session) -> None:
    """Hold, until this transaction ends, the one lock every start takes, so that two workers starting at once
    count each other's starts (without it both see an owner under the cap and both start one of theirs)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(7218530441)"))  # a fixed key: "prunehub starts"
    else:
        # SQLite has one writer: a write (of nothing) takes its lock now, before the counts are read.
        session.execute(update(Experiment).where(Experiment.id == -1).values(status=Experiment.status)
                        .execution_options(synchronize_session=False))


def fairest_queued(session: Session, max_running_per_owner: int | None) -> Experiment | None:
    """Lock and return the queued experiment a free worker starts next: of the owners below
    ``max_running_per_owner`` running (or cancelling) experiments, the one with the fewest running (on a tie,
    the one whose last start is oldest, or who never started one); of theirs, the oldest. ``None`` when there is
    none. The database chooses, not the broker's order: every message that would start an experiment is a token
    for this choice, and each end of a run sends one more (``worker.runner.kick_queue``), so an experiment of an
    owner at the cap starts when one of theirs finishes.
    """
    _serialize_starts(session)
    other = aliased(Experiment)
    running = (
        select(func.count()).where(other.owner == Experiment.owner, other.status.in_(ACTIVE))
        .correlate(Experiment).scalar_subquery()
    )
    query = select(Experiment).where(Experiment.status == ExperimentStatus.queued.value)
    if max_running_per_owner is not None:
        query = query.where(running < max_running_per_owner)
    # Ties (often: nobody running, one worker) go to the owner served least recently, so owners take turns.
    last_start = (
        select(func.max(other.started_at)).where(other.owner == Experiment.owner)
        .correlate(Experiment).scalar_subquery()
    )
    query = query.order_by(running, last_start.asc().nulls_first(), Experiment.created_at, Experiment.id).limit(1)
    # SKIP LOCKED: a row another transaction holds (a cancel, say) is passed over rather than waited for.
    return session.scalar(query.with_for_update(skip_locked=True, of=Experiment))


def _no_message_in_flight(model: type[Experiment] | type[Trial], lost: datetime) -> ColumnElement[bool]:
    """No message for the row is waiting in the broker: none was sent, the last one is older than ``lost`` (presumed
    lost), or it was sent before the row's last heartbeat (a worker took it since)."""
    sent = model.enqueued_at
    in_flight = sent.is_not(None) & (sent >= lost) & (model.heartbeat_at.is_(None) | (sent > model.heartbeat_at))
    return ~in_flight


def _take(session: Session, model: type[Experiment] | type[Trial], candidates: Any, lost: datetime) -> list[int]:
    # One UPDATE ... RETURNING: of two reapers racing for a row, the second re-checks the in-flight condition on
    # the row the first updated (PostgreSQL) or waits for its write lock (SQLite), and so does not send it again.
    statement = (
        update(model)
        .where(model.id.in_(candidates), _no_message_in_flight(model, lost))
        .values(enqueued_at=utcnow())
        .returning(model.id)
        .execution_options(synchronize_session=False)
    )
    return sorted(session.scalars(statement))


def experiments_to_resend(session: Session, *, grace_s: float, lost_s: float) -> list[int]:
    """Experiments a reaper should send ``experiments.run`` for again, recorded as sent (commit, then send):

    * queued ones whose send after the commit failed (no message recorded, older than ``grace_s``);
    * in-process runs (a lease owner) whose lease went stale: their worker died, the next worker resumes them;
    * distributed runs (no owner between advances) with no unfinished trial and no advance for ``grace_s``: the
      advance after their step's last job was lost.

    Never one whose message is still in flight (sent after its last heartbeat, less than ``lost_s`` ago): a queue
    of experiments waiting behind a busy worker holds one message each, however long they wait.
    """
    now = utcnow()
    stale, lost = now - timedelta(seconds=grace_s), now - timedelta(seconds=lost_s)
    active = Experiment.status.in_((ExperimentStatus.running.value, ExperimentStatus.cancelling.value))
    silent = Experiment.heartbeat_at.is_(None) | (Experiment.heartbeat_at < stale)
    unfinished = exists().where(Trial.experiment_id == Experiment.id, Trial.status.in_(UNFINISHED))
    candidates = select(Experiment.id).where(
        or_(
            (Experiment.status == ExperimentStatus.queued.value) & (Experiment.created_at < stale),
            active & silent & Experiment.lease_owner.is_not(None),
            active & silent & Experiment.lease_owner.is_(None) & ~unfinished,
        )
    )
    return _take(session, Experiment, candidates, lost)


def trials_to_resend(session: Session, *, grace_s: float, lost_s: float) -> list[int]:
    """Trials a reaper should send ``evaluations.run`` for again, recorded as sent: running ones whose lease went
    stale (their evaluation worker died) and pending ones whose message was lost (none recorded after
    ``grace_s``, or older than ``lost_s``); never one whose message is in flight.

    Only trials of experiments no worker holds (the broker transport): an experiment run in one worker (the
    in-process transport) holds their jobs under its own lease, and when that goes stale the experiment is sent
    again (:func:`experiments_to_resend`) and its new worker takes over its unfinished jobs.
    """
    now = utcnow()
    stale, lost = now - timedelta(seconds=grace_s), now - timedelta(seconds=lost_s)
    active = select(Experiment.id).where(
        Experiment.status.in_((ExperimentStatus.running.value, ExperimentStatus.cancelling.value)),
        Experiment.lease_owner.is_(None),
    )
    candidates = select(Trial.id).where(
        Trial.experiment_id.in_(active),
        Trial.step.is_not(None),
        or_(
            (Trial.status == TrialStatus.running.value)
            & (Trial.heartbeat_at.is_(None) | (Trial.heartbeat_at < stale)),
            (Trial.status == TrialStatus.pending.value) & (Trial.created_at < stale),
        ),
    )
    return _take(session, Trial, candidates, lost)


def record_sent(session: Session, messages: Iterable[tuple[str, int]], *, sent: bool = True) -> None:
    """Record on each row that its message (``experiments.run`` on an experiment, ``evaluations.run`` on a trial)
    was sent, or with ``sent=False`` that the send failed, so the reaper sends it once ``lease_grace_s`` passed.
    Other tasks are not tracked."""
    at = utcnow() if sent else None
    tracked: dict[str, type[Experiment] | type[Trial]] = {ADVANCE: Experiment, EVALUATE: Trial}
    targets: dict[str, list[int]] = {}
    for task, target_id in messages:
        if task in tracked:
            targets.setdefault(task, []).append(target_id)
    for task, ids in targets.items():
        # One UPDATE per table (a step's jobs are sent together), not one per message.
        model = tracked[task]
        target = model.id == ids[0] if len(ids) == 1 else model.id.in_(ids)
        session.execute(update(model).where(target).values(enqueued_at=at).execution_options(synchronize_session=False))


FINISHED = (TrialStatus.succeeded.value, TrialStatus.failed.value)
# The runner's own jobs, run and leased like any trial but not part of the search's history.
RESOLVE_KIND, RESOLVE_KEY = "resolve", "resolve"
EXPORT_KIND, EXPORT_KEY = "export", "export"
SERVICE_KINDS = (RESOLVE_KIND, EXPORT_KIND)
# Plain bound values, not an expanding IN: that one is rendered anew on every execution of a cached statement
# (a fifth of the CPU of the query of GET /experiments/{id}, which counts search trials).
SEARCH_TRIAL: ColumnElement[bool] = Trial.kind.not_in([literal(kind) for kind in SERVICE_KINDS])
"""Filter for the trials a strategy asked for (not the runner's resolve and export jobs)."""
UNFINISHED = (TrialStatus.pending.value, TrialStatus.running.value)
REBUILDABLE_KINDS = ("evaluate", "finetune_and_evaluate")


def store_problem(session: Session, experiment: Experiment, problem: dict[str, Any]) -> None:
    """Keep the resolved search problem (JSON of :class:`~pruning.search.base.SearchProblem`) on the experiment."""
    experiment.problem = problem
    experiment.phase = "problem resolved"
    pruning = problem["pruning"]
    add_event(
        session, experiment.id, "problem", units=len(pruning["units"]), target_sparsity=pruning["target_sparsity"]
    )


@dataclass(frozen=True)
class TrialTally:
    """What an advance needs to know of an experiment's trials, counted in one query (:func:`tally_trials`)."""

    unfinished: int
    """Trials of any kind that are pending or running."""
    finished: int
    """Search trials (not resolve or export) with a result."""
    last_seq: int
    """The highest sequence number so far (0 without trials): the next trial gets ``last_seq + 1``."""
    exports: int
    """Export trials (at most one): the search ended and its best model's export was asked for."""
    in_step: int
    """Search trials of the step counted (``step`` of :func:`tally_trials`; 0 without one)."""


@functools.cache
def _tally_statement() -> Select[int, int, int, int, int]:
    # Built once (on first use): constructing it and its cache key was most of the tally's cost, run once per job.
    count = func.count(Trial.id)
    return select(
        count.filter(Trial.status.in_([literal(status) for status in UNFINISHED])),  # no expanding IN per execution
        count.filter(Trial.status.in_([literal(status) for status in FINISHED]), SEARCH_TRIAL),
        func.coalesce(func.max(Trial.seq), 0),
        count.filter(Trial.kind == EXPORT_KIND),
        count.filter(Trial.step == bindparam("step"), SEARCH_TRIAL),
    ).where(Trial.experiment_id == bindparam("experiment_id"))


def tally_trials(session: Session, experiment_id: int, step: int | None = None) -> TrialTally:
    """Count the experiment's unfinished and finished trials, its last sequence number, its export and the search
    trials of ``step`` in one query (an advance asked each in a statement of its own)."""
    values = {"experiment_id": experiment_id, "step": -1 if step is None else step}
    row = session.execute(_tally_statement(), values).one()
    return TrialTally(unfinished=int(row[0]), finished=int(row[1]), last_seq=int(row[2]), exports=int(row[3]),
                      in_step=int(row[4]))


def finished_trials(session: Session, experiment_id: int) -> int:
    """How many of the experiment's trials have a result (succeeded or failed)."""
    query = select(func.count()).where(
        Trial.experiment_id == experiment_id, Trial.status.in_(FINISHED), SEARCH_TRIAL
    )
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
    job = {**extra["job"], "save_artifact": True}
    if job.get("budget_ratio") is not None and trial.distribution:
        # Rebuild what was evaluated: the projected distribution, not a fresh projection (latency is re-measured).
        job |= {"distribution": dict(trial.distribution), "budget_ratio": None}
    return job


def heartbeat(session: Session, experiment_id: int, worker_id: str) -> bool:
    """Refresh the lease on the experiment and on the trial this worker runs in it; ``False`` when this worker no
    longer holds the experiment. The trial's lease is renewed either way while this worker holds it: the job is
    still running here, and a worker that took the experiment over must wait for it, not run it a second time."""
    now = utcnow()
    # The trial row first, then the experiment row (flushed at the commit): the order in which the job's record
    # locks them. In the other order a beat and a record each held one row and waited for the other (PostgreSQL
    # detected the deadlock after a second and aborted one of them; seen in the database-outage test's log).
    session.execute(
        update(Trial)
        .where(
            Trial.experiment_id == experiment_id,
            Trial.status == TrialStatus.running.value,
            Trial.lease_owner == worker_id,
        )
        .values(heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    experiment = session.get(Experiment, experiment_id)
    if experiment is None or experiment.lease_owner != worker_id:
        return False
    experiment.heartbeat_at = now
    return True


def cancel_requested(session: Session, experiment_id: int) -> bool:
    status = session.scalar(select(Experiment.status).where(Experiment.id == experiment_id))
    return status in (ExperimentStatus.cancelling.value, ExperimentStatus.cancelled.value)


def trial_by_key(session: Session, experiment_id: int, job_key: str) -> Trial | None:
    return session.scalar(select(Trial).where(Trial.experiment_id == experiment_id, Trial.job_key == job_key))


def trials_by_key(session: Session, experiment_id: int, job_keys: Collection[str]) -> dict[str, Trial]:
    """The experiment's trials with one of ``job_keys``, by key, in one query (those it has; none for no keys)."""
    if not job_keys:
        return {}
    keys = list(job_keys)
    where = Trial.job_key == keys[0] if len(keys) == 1 else Trial.job_key.in_(keys)
    return {t.job_key: t for t in session.scalars(select(Trial).where(Trial.experiment_id == experiment_id, where))}


def _known_or_query(
    session: Session, experiment_id: int, job_key: str, known: Mapping[str, Trial] | None
) -> Trial | None:
    if known is not None and job_key in known:
        return known[job_key]
    return trial_by_key(session, experiment_id, job_key)


@dataclass(frozen=True)
class JobTrial:
    """A trial row to insert for a job (JSON): what :func:`add_job_trials` takes."""

    key: str
    kind: str
    job: dict[str, Any]
    distribution: dict[str, float] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, job: Any) -> JobTrial:
        """The row of a strategy's :class:`~pruning.search.base.Job`."""
        return cls(key=job.key, kind=job.kind, job=job.model_dump(mode="json"), distribution=dict(job.distribution),
                   context=dict(job.context))


def add_job_trials(
    session: Session,
    experiment_id: int,
    rows: Sequence[JobTrial],
    *,
    status: TrialStatus = TrialStatus.pending,
    step: int | None = None,
    first_seq: int | None = None,
    lease_first: str | None = None,
) -> list[Trial]:
    """Insert one trial row per job of ``rows``, in order, numbered from ``first_seq`` (by default the next
    sequence number), in one INSERT (a step's jobs together), and return them with their ids. A job key the
    experiment already has fails at the flush (unique per experiment): the caller decides whether that is a replay
    or a lost race. ``lease_first``: the first row is inserted running under that worker's lease
    (:func:`take_trial_lease`), the worker that will run it next, instead of updating it after."""
    if first_seq is None:
        first_seq = (session.scalar(select(func.max(Trial.seq)).where(Trial.experiment_id == experiment_id)) or 0) + 1
    trials = [
        Trial(
            experiment_id=experiment_id,
            seq=first_seq + i,
            step=step,
            job_key=row.key,
            kind=row.kind,
            status=status.value,
            distribution=dict(row.distribution),
            context=dict(row.context),
            extra={"job": row.job},  # kept so the best model can be rebuilt for download
        )
        for i, row in enumerate(rows)
    ]
    if lease_first is not None and trials:
        trials[0].attempts = 0  # its column default applies only at the INSERT; the lease counts the first attempt
        take_trial_lease(trials[0], lease_first)
    session.add_all(trials)
    session.flush()
    return trials


def add_trials(
    session: Session,
    experiment_id: int,
    jobs: Sequence[Any],
    *,
    status: TrialStatus,
    step: int | None = None,
    first_seq: int | None = None,
    lease_first: str | None = None,
) -> list[Trial]:
    """Insert the trial rows of a strategy's ``jobs`` in one INSERT (:func:`add_job_trials`)."""
    return add_job_trials(session, experiment_id, [JobTrial.of(job) for job in jobs], status=status, step=step,
                          first_seq=first_seq, lease_first=lease_first)


def add_trial(session: Session, experiment_id: int, job: Any, *, status: TrialStatus, step: int | None = None) -> Trial:
    """Insert the trial row of ``job`` with the next sequence number (:func:`add_trials` of one job)."""
    return add_trials(session, experiment_id, [job], status=status, step=step)[0]


def add_job_trial(
    session: Session,
    experiment_id: int,
    *,
    key: str,
    kind: str,
    job: dict[str, Any],
    status: TrialStatus = TrialStatus.pending,
    step: int | None = None,
    seq: int | None = None,
    distribution: dict[str, float] | None = None,
    context: dict[str, Any] | None = None,
    lease: str | None = None,
) -> Trial:
    """Insert a trial row running ``job`` (JSON), by default with the next sequence number: what
    :func:`add_trial` does for a strategy's job, and the runner for its own (resolve, export); ``lease``: inserted
    running under that worker's lease (``lease_first`` of :func:`add_job_trials`)."""
    row = JobTrial(key=key, kind=kind, job=job, distribution=distribution or {}, context=context or {})
    return add_job_trials(session, experiment_id, [row], status=status, step=step, first_seq=seq,
                          lease_first=lease)[0]


def renew_trial_leases(session: Session, trial_ids: Collection[int], worker_id: str) -> int:
    """Renew the leases ``worker_id`` holds on ``trial_ids`` (a heartbeat of every job it runs) in one UPDATE;
    returns how many it still held. A trial whose lease another worker took over is not touched."""
    if not trial_ids:
        return 0
    ids = list(trial_ids)
    target = Trial.id == ids[0] if len(ids) == 1 else Trial.id.in_(ids)
    result = session.execute(
        update(Trial).where(target, Trial.lease_owner == worker_id).values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def take_trial_lease(trial: Trial, worker_id: str) -> None:
    """Mark ``trial`` running under ``worker_id``'s lease (one more attempt); the worker's heartbeat renews it."""
    trial.status = TrialStatus.running.value
    trial.lease_owner = worker_id
    trial.heartbeat_at = utcnow()
    trial.attempts += 1


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
    trial.lease_owner = None
    if trial.kind in SERVICE_KINDS:
        return trial  # the problem or the model it produced is reported by its own event
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


def record_decisions(
    session: Session, experiment_id: int, decisions: dict[str, dict[str, Any]], known: Mapping[str, Trial] | None = None
) -> None:
    """Store the strategy's decision (accepted, rejected, chosen, ...) in the context of each trial, with the
    acceptance probability of a worse-or-equal annealing proposal. ``known`` (job key → trial) are trials the
    caller has loaded already (the told step's): they are not queried again."""
    for job_key, record in decisions.items():
        decision = record["decision"]
        trial = _known_or_query(session, experiment_id, job_key, known)
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
    previous_best_key: str | None,
    known: Mapping[str, Trial] | None = None,
) -> None:
    """Persist the search state after a tell, with progress and the strategy's best so far (looked up in
    ``known``, the trials the caller has loaded, before the database). ``previous_best_key``: the best of the
    state saved before (the caller has it; the stored state is not read back for it)."""
    previous_best = previous_best_key
    experiment.search_state = state
    experiment.state_version += 1
    experiment.progress_done = progress
    experiment.progress_total = progress_total
    experiment.phase = phase
    experiment.heartbeat_at = utcnow()
    # The same best as after the last tell is the trial stored then: not looked up again (a query per step).
    unchanged = best_key == previous_best and experiment.best_trial_id is not None
    if best_key is not None and not unchanged:
        best = _known_or_query(session, experiment.id, best_key, known)
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
