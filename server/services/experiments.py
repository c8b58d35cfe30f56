"""Experiment use cases for the API: create, read, list, trials, best, cancel."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Connection, Row, Select, bindparam, func, select
from sqlalchemy.orm import Session, aliased

from pruning.search.configs import SearchCommon
from pruning.task import TaskError, check_entrypoint
from server.db.models import Experiment, ExperimentStatus, Trial, TrialStatus, utcnow
from server.services import bundles, runs
from server.services.dispatch import ADVANCE
from server.services.errors import Conflict, InvalidInput, NotFound
from server.services.events import add_event
from server.services.limits import Limits, apply_caps, check_quotas
from server.services.runs import record_sent

# Ids are 32-bit integers in every database we run on; an offset beyond that is past any page that exists.
MAX_ID = 2**31 - 1
MAX_OFFSET = 2**31 - 1

__all__ = [
    "DETAIL_COLUMNS",
    "best_trial",
    "cancel_experiment",
    "create_experiment",
    "enqueue_failed",
    "experiment_detail",
    "find_by_idempotency_key",
    "get_experiment",
    "best_trials_of",
    "list_experiments",
    "list_trials",
    "pareto_trials",
    "request_hash",
]


def create_experiment(
    session: Session,
    *,
    owner: str,
    name: str,
    entrypoint: str,
    config: SearchCommon,
    allowed_prefixes: Sequence[str],
    idempotency_key: str | None = None,
    bundle: str | None = None,
    bundles_enabled: bool = True,
    limits: Limits | None = None,
) -> Experiment:
    """Store a new ``queued`` experiment, recorded as sent (the caller commits, then enqueues its id; when that
    fails, :func:`enqueue_failed`).

    With ``bundle`` (``sha256:<hex>``, one of ``owner``'s uploads) the entrypoint must be a module of that bundle
    and the allow-list does not apply; without it the entrypoint must be under ``allowed_prefixes``.

    With ``limits``, the config is held to the server's caps (422 naming the field and the cap; a missing
    ``max_minutes`` is filled with the default) and the owner to its quotas (:func:`server.services.limits.
    check_quotas`). With ``idempotency_key``, the hash of what was asked is stored with it (see
    :func:`request_hash`)."""
    if bundle is not None:
        row = bundles.usable_bundle(session, owner=owner, digest=bundle, enabled=bundles_enabled)
        bundles.check_bundle_entrypoint(entrypoint, row.modules, bundle)
    else:
        try:
            check_entrypoint(entrypoint, allowed_prefixes)
        except TaskError as exc:
            raise InvalidInput(str(exc), field="entrypoint") from exc
    config_json = config.model_dump(mode="json")
    config_bytes = len(json.dumps(config_json, separators=(",", ":")).encode("utf-8"))
    if limits is not None:
        config_bytes = apply_caps(config, config_json, limits)
        check_quotas(session, owner, config_bytes, limits)
    experiment = Experiment(
        owner=owner,
        idempotency_key=idempotency_key,
        idempotency_hash=request_hash(name, entrypoint, config, bundle) if idempotency_key else None,
        name=name,
        entrypoint=entrypoint,
        bundle=bundle,
        algorithm=config_json["algorithm"],
        config=config_json,
        config_bytes=config_bytes,
        status=ExperimentStatus.queued.value,
        progress_total=float(config.max_trials) if config.max_trials else None,
        phase="queued",
        enqueued_at=utcnow(),
    )
    session.add(experiment)
    session.flush()
    add_event(session, experiment.id, "status", status="queued")
    return experiment


def enqueue_failed(session: Session, experiment_id: int) -> None:
    """The send after the commit failed: no message is in flight, so a worker's reaper sends one after the lease
    grace (the caller commits)."""
    record_sent(session, [(ADVANCE, experiment_id)], sent=False)


def request_hash(name: str, entrypoint: str, config: SearchCommon, bundle: str | None = None) -> str:
    """SHA-256 of a submission as validated (name, entrypoint, bundle, config with its defaults), key order
    aside."""
    document = {"name": name, "entrypoint": entrypoint, "config": config.model_dump(mode="json")}
    if bundle is not None:
        document["bundle"] = bundle  # absent without one: hashes stored before bundles existed still match
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def find_by_idempotency_key(
    session: Session, owner: str, key: str, body_hash: str | None = None
) -> Experiment | None:
    """The experiment ``owner`` created with ``key``, or ``None``.

    With ``body_hash``, a key first used with another request is :class:`InvalidInput` (422) naming
    ``Idempotency-Key``, as Stripe answers: a retry must repeat the request, not change it. Experiments stored
    before hashes were kept match any body.
    """
    experiment = session.scalar(
        select(Experiment).where(Experiment.owner == owner, Experiment.idempotency_key == key)
    )
    if (
        experiment is not None
        and body_hash is not None
        and experiment.idempotency_hash is not None
        and experiment.idempotency_hash != body_hash
    ):
        raise InvalidInput(
            f"Idempotency-Key {key!r} was first used with a different request (experiment {experiment.id}); "
            "a retry must send the same body, a new request needs a new key",
            field="Idempotency-Key",
        )
    return experiment


def get_experiment(
    session: Session, experiment_id: int, owner: str | None = None, *, for_update: bool = False
) -> Experiment:
    """The experiment, or :class:`NotFound` (also when it belongs to another owner, so existence is not revealed).

    ``for_update`` locks the row (PostgreSQL) so a cancel and a worker's claim cannot interleave.
    """
    experiment = session.get(Experiment, experiment_id, with_for_update=for_update)
    if experiment is None or (owner is not None and experiment.owner != owner):
        raise NotFound(f"experiment {experiment_id} not found", field="id")
    return experiment


DETAIL_COLUMNS = (
    "id", "name", "owner", "entrypoint", "bundle", "algorithm", "status", "progress_done", "progress_total",
    "phase", "best_score", "error", "attempts", "created_at", "started_at", "finished_at", "config", "traceback",
)  # fmt: skip
"""The experiment's columns in an :func:`experiment_detail` row (under their own names)."""


@functools.cache
def detail_statement() -> Select[Any]:
    """Experiment ``:experiment_id``'s shown columns, its best trial's (outer join, ``best_*``) and its number of
    search trials (a correlated count), built once per process (one statement object reuses its compiled form).

    Columns, not entities: the row is read and shown, never changed, and loading ``Experiment`` and ``Trial``
    instances (the search state, the problem, the trial's per-layer maps, all JSON) through a session cost more
    than the query itself."""
    best = aliased(Trial)
    count = (
        select(func.count())
        .select_from(Trial)
        .where(Trial.experiment_id == Experiment.id, runs.SEARCH_TRIAL)
        .correlate(Experiment)
        .scalar_subquery()
    )
    shown = [getattr(Experiment, name) for name in DETAIL_COLUMNS]
    return (
        select(
            *shown,
            best.id.label("best_id"),
            best.score.label("best_trial_score"),
            best.overall_sparsity.label("best_overall_sparsity"),
            best.distribution.label("best_distribution"),
            count.label("trials_count"),
        )
        .outerjoin(best, best.id == Experiment.best_trial_id)
        .where(Experiment.id == bindparam("experiment_id"))
    )


def experiment_detail(db: Session | Connection, experiment_id: int, owner: str | None = None) -> Row[Any]:
    """What ``GET /experiments/{id}`` shows (the API's most polled route), in one query: a row of the experiment's
    :data:`DETAIL_COLUMNS`, its best trial's ``best_id``, ``best_trial_score``, ``best_overall_sparsity`` and
    ``best_distribution`` (all ``None`` without one) and ``trials_count`` (search trials); :class:`NotFound` as
    :func:`get_experiment`.

    ``db`` is a session (a route that has just changed the experiment) or a connection in autocommit (a plain read:
    one statement is consistent on its own, and needs no transaction around it)."""
    row = db.execute(detail_statement(), {"experiment_id": experiment_id}).first()
    return visible_detail(row, experiment_id, owner)


def visible_detail(row: Any, experiment_id: int, owner: str | None = None) -> Any:
    """``row`` (of :func:`detail_statement`, ``None`` when no experiment has the id) when ``owner`` may see it (any
    owner when ``None``), else :class:`NotFound`: someone else's experiment is as absent as a missing one."""
    if row is None or (owner is not None and row.owner != owner):
        raise NotFound(f"experiment {experiment_id} not found", field="id")
    return row


def best_trials_of(session: Session, experiments: Sequence[Experiment]) -> dict[int, Trial]:
    """The best trials of a page of experiments, by id, in one query (a list page is not one query per row)."""
    ids = [e.best_trial_id for e in experiments if e.best_trial_id is not None]
    if not ids:
        return {}
    return {trial.id: trial for trial in session.scalars(select(Trial).where(Trial.id.in_(ids)))}


_C = TypeVar("_C", bound=BaseModel)


class _IdCursor(BaseModel):
    """Where a newest-first page continues: below this id."""

    model_config = ConfigDict(extra="forbid", strict=True)

    before_id: int = Field(ge=1, le=MAX_ID)


class _OffsetCursor(BaseModel):
    """Where a ranked page continues: after this many rows."""

    model_config = ConfigDict(extra="forbid", strict=True)

    offset: int = Field(ge=0, le=MAX_OFFSET)


def _encode_cursor(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode()


def _decode_cursor(cursor: str | None, kind: type[_C]) -> _C | None:
    """The position a cursor this API returned names; anything else (hand-made, of the other ordering, out of
    range, not an integer) is :class:`InvalidInput` naming ``cursor``: it never reaches the database."""
    if not cursor:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor.encode("ascii")), parse_constant=_refuse_constant)
        return kind.model_validate(data)
    except (ValueError, UnicodeError, RecursionError) as exc:  # ValidationError is a ValueError
        raise InvalidInput("cursor is not a cursor this API returned for this listing", field="cursor") from exc


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} in a cursor")


def list_experiments(
    session: Session,
    *,
    owner: str | None = None,
    status: str | None = None,
    algorithm: str | None = None,
    entrypoint: str | None = None,
    order_by: Literal["created", "best_score"] = "created",
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[Experiment], str | None]:
    """Experiments newest first (or by best score, best first), with an opaque cursor to the next page."""
    query = select(Experiment)
    if owner is not None:
        query = query.where(Experiment.owner == owner)
    if status:
        query = query.where(Experiment.status == status)
    if algorithm:
        query = query.where(Experiment.algorithm == algorithm)
    if entrypoint:
        query = query.where(Experiment.entrypoint == entrypoint)
    if order_by == "created":
        position = _decode_cursor(cursor, _IdCursor)
        if position is not None:
            query = query.where(Experiment.id < position.before_id)
        rows = list(session.scalars(query.order_by(Experiment.id.desc()).limit(limit + 1)))
        next_cursor = _encode_cursor({"before_id": rows[limit - 1].id}) if len(rows) > limit else None
        return rows[:limit], next_cursor
    # Only experiments that have a best score, highest first: meant for comparing experiments of one entrypoint,
    # which share one evaluator (so one scale and one direction).
    ranked = _decode_cursor(cursor, _OffsetCursor)
    offset = ranked.offset if ranked else 0
    query = query.where(Experiment.best_score.is_not(None)).order_by(
        Experiment.best_score.desc(), Experiment.id.desc()
    )
    rows = list(session.scalars(query.offset(offset).limit(limit + 1)))
    next_cursor = _encode_cursor({"offset": offset + limit}) if len(rows) > limit else None
    return rows[:limit], next_cursor


def list_trials(
    session: Session,
    experiment: Experiment,
    *,
    status: str | None = None,
    context: dict[str, Any] | None = None,
    order_by: Literal["seq", "score"] = "seq",
    limit: int = 100,
    cursor: str | None = None,
) -> tuple[list[Trial], str | None, int]:
    """The experiment's trials in sequence order (or by score, best first), filtered by status and by
    equality on context keys; returns (page, next cursor, total matching)."""
    query = select(Trial).where(Trial.experiment_id == experiment.id, runs.SEARCH_TRIAL)
    if status:
        query = query.where(Trial.status == status)
    rows_all: list[Trial] | None = None
    if context:
        # Context is a JSON document whose keys vary by strategy: filter in Python, portable across databases.
        rows_all = [
            t
            for t in session.scalars(query.order_by(Trial.seq))
            if all(str(t.context.get(k)) == str(v) for k, v in context.items())
        ]
    ranked = _decode_cursor(cursor, _OffsetCursor)
    offset = ranked.offset if ranked else 0
    maximize = experiment.config.get("optimize_mode", "maximize") == "maximize"
    if rows_all is not None:
        if order_by == "score":
            rows_all.sort(key=lambda t: (t.score is None, -(t.score or 0) if maximize else (t.score or 0)))
        total = len(rows_all)
        page = rows_all[offset : offset + limit]
    else:
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        if order_by == "score":
            score_order = Trial.score.desc() if maximize else Trial.score.asc()
            query = query.order_by(Trial.score.is_(None), score_order, Trial.seq)
        else:
            query = query.order_by(Trial.seq)
        page = list(session.scalars(query.offset(offset).limit(limit)))
    next_cursor = _encode_cursor({"offset": offset + limit}) if offset + limit < total else None
    return page, next_cursor, total


def _feasible_trials(session: Session, experiment: Experiment) -> list[Trial]:
    """Succeeded, scored trials; under a budget only those whose measured ratio met it, and in a pattern search
    (``score_target_drop``) only those that met its score target."""
    query = select(Trial).where(
        Trial.experiment_id == experiment.id,
        Trial.status == TrialStatus.succeeded.value,
        Trial.score.is_not(None),
        runs.SEARCH_TRIAL,
    )
    if experiment.config.get("budget"):
        query = query.where(Trial.feasible.is_(True))
    trials = list(session.scalars(query.order_by(Trial.seq)))
    if experiment.config.get("score_target_drop") is not None:
        # A pattern search records its candidates below the score target as infeasible: never a best.
        trials = [t for t in trials if t.context.get("decision") != "infeasible"]
    return trials


def best_trial(
    session: Session,
    experiment: Experiment,
    *,
    objective: Literal["score", "flops", "params"] = "score",
    max_flops_ratio: float | None = None,
    max_params_ratio: float | None = None,
) -> Trial | None:
    """The best trial: the strategy's choice by default, or the best by ``objective`` under physical budgets."""
    if objective == "score" and max_flops_ratio is None and max_params_ratio is None:
        if experiment.best_trial_id is not None:
            return session.get(Trial, experiment.best_trial_id)
    candidates = _feasible_trials(session, experiment)
    if max_flops_ratio is not None:
        candidates = [t for t in candidates if t.flops_ratio is not None and t.flops_ratio <= max_flops_ratio]
    if max_params_ratio is not None:
        candidates = [t for t in candidates if t.params_ratio is not None and t.params_ratio <= max_params_ratio]
    if not candidates:
        return None
    maximize = experiment.config.get("optimize_mode", "maximize") == "maximize"
    if objective == "score":
        return max(candidates, key=lambda t: (t.score if maximize else -(t.score or 0.0), -t.seq))
    key = "flops" if objective == "flops" else "params"
    return min(candidates, key=lambda t: (getattr(t, key) or 0, -(t.score or 0) if maximize else t.score or 0))


def pareto_trials(session: Session, experiment: Experiment, resource: Literal["flops", "params"]) -> list[Trial]:
    """Non-dominated succeeded trials on (score, resource): better score and fewer FLOPs/params."""
    maximize = experiment.config.get("optimize_mode", "maximize") == "maximize"
    points = [t for t in _feasible_trials(session, experiment) if getattr(t, resource) is not None]
    # Sort by resource ascending, then best score first; sweep keeping strictly improving scores.
    points.sort(key=lambda t: (getattr(t, resource), -(t.score or 0) if maximize else t.score or 0))
    front: list[Trial] = []
    best: float | None = None
    for trial in points:
        score = trial.score if maximize else -(trial.score or 0.0)
        if best is None or (score is not None and score > best):
            front.append(trial)
            best = score
    return front


def cancel_experiment(session: Session, experiment: Experiment) -> Experiment:
    """Queued → ``cancelled`` at once; running → ``cancelling`` (the worker stops it between jobs)."""
    status = ExperimentStatus(experiment.status)
    if status.terminal:
        raise Conflict(f"experiment {experiment.id} is already {status.value}", field="status")
    if status is ExperimentStatus.queued:
        experiment.status = ExperimentStatus.cancelled.value
        experiment.finished_at = utcnow()
        experiment.phase = "cancelled"
        add_event(session, experiment.id, "status", status="cancelled")
    elif status is ExperimentStatus.running:
        experiment.status = ExperimentStatus.cancelling.value
        add_event(session, experiment.id, "status", status="cancelling")
    return experiment
