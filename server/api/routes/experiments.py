"""Experiments: submit, list, read, trials, best, Pareto front, model download, cancel; a sensitivity
experiment's curves and their re-allocation for another budget."""

from __future__ import annotations

import io
import json
import logging
import zipfile
from typing import Any, Literal

from fastapi import APIRouter, Header, Query, status
from fastapi.responses import Response
from sqlalchemy import Row
from sqlalchemy.exc import IntegrityError

from pruning.search.configs import parse_algorithm_config
from server.api.deps import DispatcherDep, ExperimentId, PrincipalDep, ReaderDep, SessionDep, SettingsDep
from server.api.schemas import (
    BestPublic,
    BestSummary,
    ErrorPublic,
    ExperimentCreate,
    ExperimentPublic,
    ExperimentsPublic,
    ExperimentSummary,
    ParetoPoint,
    ParetoPublic,
    Progress,
    ReallocateCreate,
    SensitivityPublic,
    TrialPublic,
    TrialsPublic,
    ValidationErrorPublic,
    split_create,
)
from server.db.models import Experiment, Trial
from server.services import experiments as service
from server.services import sensitivity as sensitivity_service
from server.services.errors import NotFound
from server.services.limits import Limits

router = APIRouter(prefix="/experiments", tags=["experiments"])
log = logging.getLogger(__name__)

# Any route may answer 503 + Retry-After when the server is saturated (admission) or the database is busy.
_BUSY: dict[str, Any] = {"model": ErrorPublic, "headers": {"Retry-After": {"schema": {"type": "integer"}}}}
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorPublic},
    404: {"model": ErrorPublic},
    409: {"model": ErrorPublic},
    422: {"model": ValidationErrorPublic},
    503: _BUSY,
}
_CREATE_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorPublic},
    413: {"model": ErrorPublic},
    422: {"model": ValidationErrorPublic},
    429: {"model": ErrorPublic, "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
    503: _BUSY,
}


def _best_summary(trial: Trial | None) -> BestSummary | None:
    if trial is None:
        return None
    return BestSummary(
        trial_id=trial.id, score=trial.score, overall_sparsity=trial.overall_sparsity, distribution=trial.distribution
    )


def _summary(experiment: Experiment | Row[Any], best: BestSummary | None, trials_count: int = 0) -> dict[str, Any]:
    """The fields of an :class:`ExperimentSummary` from an experiment or a detail row (the same names)."""
    duration = None
    if experiment.started_at and experiment.finished_at:
        duration = (experiment.finished_at - experiment.started_at).total_seconds()
    return {
        "id": experiment.id,
        "name": experiment.name,
        "owner": experiment.owner,
        "entrypoint": experiment.entrypoint,
        "bundle": experiment.bundle,
        "algorithm": experiment.algorithm,
        "status": experiment.status,
        "progress": Progress(done=experiment.progress_done, total=experiment.progress_total, phase=experiment.phase),
        "best_score": experiment.best_score,
        "best": best,
        "trials_count": trials_count,
        "error": experiment.error,
        "attempts": experiment.attempts,
        "created_at": experiment.created_at,
        "started_at": experiment.started_at,
        "finished_at": experiment.finished_at,
        "duration_s": duration,
    }


def _public(detail: Row[Any]) -> ExperimentPublic:
    """An experiment in full from its :func:`service.experiment_detail` row."""
    best = None
    if detail.best_id is not None:
        best = BestSummary(
            trial_id=detail.best_id,
            score=detail.best_trial_score,
            overall_sparsity=detail.best_overall_sparsity,
            distribution=detail.best_distribution,
        )
    summary = _summary(detail, best, int(detail.trials_count or 0))
    return ExperimentPublic(**summary, config=detail.config, traceback=detail.traceback)


def _reread(session: SessionDep, experiment: Experiment) -> ExperimentPublic:
    """An experiment a route has just created or changed, as ``GET /experiments/{id}`` shows it (one query)."""
    return _public(service.experiment_detail(session, experiment.id))


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ExperimentPublic, responses=_CREATE_ERRORS)
def create_experiment(
    body: ExperimentCreate,
    session: SessionDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    principal: PrincipalDep,
    idempotency_key: str | None = Header(
        None,
        max_length=200,
        description="a retry with the same key and body returns the first experiment; another body is a 422",
    ),
) -> ExperimentPublic:
    """Submit an experiment. It is stored ``queued`` and handed to a worker after the commit.

    With an ``Idempotency-Key`` header, a repeated request (a client retrying after a timeout) returns the
    experiment the first one created instead of creating a second; the same key with a different body is a 422.

    The server's caps (trials, minutes, trainer epochs, config size) are 422s naming the field and the cap; an
    owner over the storage quota gets a 422, one with too many experiments queued a 429 with ``Retry-After``.
    """
    name, entrypoint, bundle, raw = split_create(body)
    config = parse_algorithm_config(raw)
    body_hash = service.request_hash(name, entrypoint, config, bundle) if idempotency_key else None
    if idempotency_key:
        existing = service.find_by_idempotency_key(session, principal.owner, idempotency_key, body_hash)
        if existing is not None:
            return _reread(session, existing)
    try:
        experiment = service.create_experiment(
            session,
            owner=principal.owner,
            name=name,
            entrypoint=entrypoint,
            config=config,
            allowed_prefixes=settings.allowed_entrypoints,
            idempotency_key=idempotency_key,
            bundle=bundle,
            bundles_enabled=settings.bundles,
            limits=Limits.from_settings(settings),
        )
        session.commit()
    except IntegrityError:
        # A concurrent request with the same idempotency key won the race: answer with its experiment.
        session.rollback()
        existing = service.find_by_idempotency_key(session, principal.owner, idempotency_key or "", body_hash)
        if existing is None:
            raise
        return _reread(session, existing)
    _enqueue_created(session, dispatcher, experiment.id)
    return _reread(session, experiment)


def _enqueue_created(session: SessionDep, dispatcher: DispatcherDep, experiment_id: int) -> None:
    """Hand a committed, queued experiment to the workers (every route that creates one ends here)."""
    try:
        dispatcher.enqueue_experiment(experiment_id)
    except Exception:  # noqa: BLE001 - stored and queued; a worker's reaper sends it after the lease grace
        log.exception("could not enqueue experiment %s; it stays queued", experiment_id)
        service.enqueue_failed(session, experiment_id)
        session.commit()


@router.get("", response_model=ExperimentsPublic, responses=_ERRORS)
def list_experiments(
    session: SessionDep,
    principal: PrincipalDep,
    status_: str | None = Query(None, alias="status", max_length=20),
    algorithm: str | None = Query(None, max_length=40),
    entrypoint: str | None = Query(None, max_length=300),
    order_by: Literal["created", "best_score"] = "created",
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = Query(None, max_length=500),
) -> ExperimentsPublic:
    """Experiments, newest first (``order_by=best_score`` ranks them by best score), cursor-paginated."""
    rows, next_cursor = service.list_experiments(
        session,
        owner=principal.scope,
        status=status_,
        algorithm=algorithm,
        entrypoint=entrypoint,
        order_by=order_by,
        limit=limit,
        cursor=cursor,
    )
    best = service.best_trials_of(session, rows)
    items = [
        ExperimentSummary(**_summary(row, _best_summary(best.get(row.best_trial_id) if row.best_trial_id else None)))
        for row in rows
    ]
    return ExperimentsPublic(items=items, next_cursor=next_cursor)


@router.get("/{experiment_id}", response_model=ExperimentPublic, responses=_ERRORS)
async def get_experiment(experiment_id: ExperimentId, read: ReaderDep, principal: PrincipalDep) -> Response:
    """Status, progress (done/total and phase), timings, best so far, and the error of a failed experiment."""
    # The API's most polled route: one query, no session (the key comes from the process's cache), on the event loop
    # on PostgreSQL (Reader). The body is serialised once: a returned model is validated against response_model and
    # serialised again, the larger part of the route's own time under load.
    row = await read.row(service.detail_statement(), {"experiment_id": experiment_id})
    detail = service.visible_detail(row, experiment_id, principal.scope)
    return Response(_public(detail).model_dump_json().encode(), media_type="application/json")


@router.get("/{experiment_id}/trials", response_model=TrialsPublic, responses=_ERRORS)
def list_trials(
    experiment_id: ExperimentId,
    session: SessionDep,
    principal: PrincipalDep,
    status_: str | None = Query(None, alias="status", max_length=20),
    order_by: Literal["seq", "score"] = "seq",
    context: str | None = Query(
        None, max_length=1000, description='JSON object of context keys to match, e.g. {"iteration": 2}'
    ),
    limit: int = Query(100, ge=1, le=1000),
    cursor: str | None = Query(None, max_length=500),
) -> TrialsPublic:
    """The search history: every trial with requested and achieved sparsity, score, params, FLOPs, context."""
    experiment = service.get_experiment(session, experiment_id, principal.scope)
    context_filter = None
    if context:
        try:
            context_filter = json.loads(context)
            if not isinstance(context_filter, dict):
                raise ValueError
        except ValueError as exc:
            from server.services.errors import InvalidInput

            raise InvalidInput("context must be a JSON object", field="context") from exc
    rows, next_cursor, total = service.list_trials(
        session, experiment, status=status_, context=context_filter, order_by=order_by, limit=limit, cursor=cursor
    )
    return TrialsPublic(
        items=[TrialPublic.model_validate(row) for row in rows], total=total, next_cursor=next_cursor
    )


@router.get("/{experiment_id}/best", response_model=BestPublic, responses=_ERRORS)
def get_best(
    experiment_id: ExperimentId,
    session: SessionDep,
    principal: PrincipalDep,
    objective: Literal["score", "flops", "params"] = "score",
    max_flops_ratio: float | None = Query(None, gt=0, le=1),
    max_params_ratio: float | None = Query(None, gt=0, le=1),
) -> BestPublic:
    """The best per-layer sparsity distribution with its score, overall sparsity, params and FLOPs before/after.

    ``max_flops_ratio`` / ``max_params_ratio`` ask for the best under a physical budget (shrunk model / dense).
    """
    experiment = service.get_experiment(session, experiment_id, principal.scope)
    trial = service.best_trial(
        session, experiment, objective=objective, max_flops_ratio=max_flops_ratio, max_params_ratio=max_params_ratio
    )
    if trial is None:
        raise NotFound(f"experiment {experiment_id} has no successful trial (under that budget)", field="id")
    pruning = (experiment.problem or {}).get("pruning", {})
    return BestPublic(
        experiment_id=experiment.id,
        trial_id=trial.id,
        score=trial.score,
        overall_sparsity=trial.overall_sparsity,
        distribution=trial.distribution,
        requested=trial.requested,
        achieved=trial.achieved,
        params_before=pruning.get("dense_params"),
        params_after=trial.params,
        flops_before=pruning.get("dense_flops"),
        flops_after=trial.flops,
        params_ratio=trial.params_ratio,
        flops_ratio=trial.flops_ratio,
        latency_ms=trial.latency_ms,
        budget={k: v for k, v in (experiment.config.get("budget") or {}).items() if v is not None} or None,
        budget_ratio=trial.budget_ratio,
        feasible=trial.feasible,
        evaluation=trial.evaluation,
        context=trial.context,
        model_available=bool((trial.extra or {}).get("model_artifact")),
    )


@router.get("/{experiment_id}/pareto", response_model=ParetoPublic, responses=_ERRORS)
def get_pareto(experiment_id: ExperimentId, session: SessionDep, principal: PrincipalDep) -> ParetoPublic:
    """Non-dominated trials: best score for fewer FLOPs, and for fewer params (every strategy)."""
    experiment = service.get_experiment(session, experiment_id, principal.scope)

    def points(resource: Literal["flops", "params"]) -> list[ParetoPoint]:
        return [
            ParetoPoint(
                trial_id=t.id,
                score=t.score,
                flops=t.flops,
                params=t.params,
                flops_ratio=t.flops_ratio,
                params_ratio=t.params_ratio,
                overall_sparsity=t.overall_sparsity,
            )
            for t in service.pareto_trials(session, experiment, resource)
        ]

    return ParetoPublic(experiment_id=experiment.id, flops=points("flops"), params=points("params"))


@router.get(
    "/{experiment_id}/model",
    responses={200: {"content": {"application/zip": {}}}, **_ERRORS},
    response_class=Response,
)
def download_model(
    experiment_id: ExperimentId, session: SessionDep, settings: SettingsDep, principal: PrincipalDep
) -> Response:
    """The best pruned model as a zip: ``model.safetensors`` (shrunk weights) and ``recipe.json`` (rebuilds the
    shape from the task's ``model()``; load with ``pruning.load_pruned(task, files)``). No pickles."""
    from pruning.artifacts import ArtifactNotFound, ArtifactStore

    experiment = service.get_experiment(session, experiment_id, principal.scope)
    trial = service.best_trial(session, experiment)
    artifact = (trial.extra or {}).get("model_artifact") if trial else None
    if not artifact:
        raise NotFound(f"experiment {experiment_id} has no pruned model yet", field="id")
    try:
        weights, recipe = ArtifactStore(settings.artifacts_dir).files(artifact)
    except ArtifactNotFound as exc:
        raise NotFound(f"the model artifact of experiment {experiment_id} is missing", field="id") from exc
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.write(weights, "model.safetensors")
        archive.write(recipe, "recipe.json")
    return Response(
        content=buffer.getvalue(),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="experiment-{experiment_id}-model.zip"'},
    )


@router.post("/{experiment_id}/cancel", response_model=ExperimentPublic, responses=_ERRORS)
def cancel_experiment(experiment_id: ExperimentId, session: SessionDep, principal: PrincipalDep) -> ExperimentPublic:
    """A queued experiment is cancelled at once; a running one goes ``cancelling`` then ``cancelled``."""
    experiment = service.get_experiment(session, experiment_id, principal.scope, for_update=True)
    service.cancel_experiment(session, experiment)
    session.commit()
    return _reread(session, experiment)


@router.get("/{experiment_id}/sensitivity", response_model=SensitivityPublic, responses=_ERRORS)
def get_sensitivity(experiment_id: ExperimentId, session: SessionDep, principal: PrincipalDep) -> SensitivityPublic:
    """The curves of a ``sensitivity`` experiment: per unit, the score and the measured ratio of ``resource`` with
    only that unit pruned to each profiled sparsity; the unpruned baseline score; and the allocation (one sparsity
    per unit) its threshold produced.

    404 when the experiment is not a sensitivity experiment, or has not finished profiling yet.
    """
    experiment = service.get_experiment(session, experiment_id, principal.scope)
    return SensitivityPublic.model_validate(sensitivity_service.sensitivity_report(experiment), from_attributes=True)


@router.post(
    "/{experiment_id}/reallocate",
    status_code=status.HTTP_201_CREATED,
    response_model=ExperimentPublic,
    responses={**_ERRORS, 422: {"model": ValidationErrorPublic}},
)
def reallocate(
    experiment_id: ExperimentId,
    body: ReallocateCreate,
    session: SessionDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    principal: PrincipalDep,
) -> ExperimentPublic:
    """Start a new sensitivity experiment that re-allocates this one's curves for ``budget``: same owner,
    entrypoint, config list and evaluation, no profiling, only the new candidates (each projected onto the new
    budget). Example body: ``{"budget": {"flops": 0.25}, "name": "a quarter of the FLOPs"}``.

    404 when the experiment is not a sensitivity experiment; 409 while it has not finished (or never profiled);
    422 when its curves do not measure the budget's resource (a latency budget needs latency curves).
    """
    source = service.get_experiment(session, experiment_id, principal.scope)
    experiment = sensitivity_service.reallocate(
        session,
        source,
        budget=body.budget,
        name=body.name,
        allowed_prefixes=settings.allowed_entrypoints,
        bundles_enabled=settings.bundles,
        limits=Limits.from_settings(settings),
    )
    session.commit()
    _enqueue_created(session, dispatcher, experiment.id)
    return _reread(session, experiment)
