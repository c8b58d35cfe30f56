"""Sensitivity use cases: read a ``sensitivity`` experiment's curves, and re-allocate them for another budget.

The curves and the allocation live in the experiment's stored search state
(:class:`pruning.search.sensitivity.SensitivityState`); a re-allocation is a new experiment whose config carries
the old curves (``config.curves``), so its worker skips the profile and evaluates only the new candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from pruning.budget import Budget
from pruning.search.configs import SensitivityCurves, SensitivityPoint, parse_algorithm_config
from pruning.search.sensitivity import SensitivityAllocation
from server.db.models import Experiment, ExperimentStatus
from server.services.errors import Conflict, InvalidInput, NotFound
from server.services.events import add_event
from server.services.experiments import create_experiment
from server.services.limits import Limits

__all__ = ["SensitivityReport", "UnitReport", "reallocate", "sensitivity_report"]

# Config-list fields that name a sparsity: a budget decides how much is pruned, so they go when one is set.
_SPARSITY_FIELDS = ("sparsity", "sparsity_per_layer", "total_sparsity")


@dataclass(frozen=True)
class UnitReport:
    """One unit's curve and the sparsity the allocation gave it (``None`` before the allocation)."""

    name: str
    points: list[SensitivityPoint]
    allocated: float | None


@dataclass(frozen=True)
class SensitivityReport:
    """What ``GET /experiments/{id}/sensitivity`` shows: the curves, the baseline, and the allocation."""

    experiment_id: int
    status: str
    resource: str
    baseline_score: float
    optimize_mode: str
    budget: dict[str, float] | None
    reused: bool
    units: list[UnitReport]
    allocation: SensitivityAllocation | None


def _stored(experiment: Experiment) -> tuple[SensitivityCurves, SensitivityAllocation | None, bool]:
    """The curves, allocation and reuse flag of a sensitivity experiment's stored state (:class:`NotFound` when it
    is another algorithm's experiment or has not profiled yet)."""
    if experiment.algorithm != "sensitivity":
        raise NotFound(
            f"experiment {experiment.id} is not a sensitivity experiment (algorithm {experiment.algorithm!r})",
            field="id",
        )
    state: dict[str, Any] = experiment.search_state or {}
    if not state.get("curves"):
        raise NotFound(
            f"experiment {experiment.id} has no sensitivity curves yet (status {experiment.status}): they are stored "
            "once its profiling step has finished",
            field="id",
        )
    curves = SensitivityCurves.model_validate(state["curves"])
    allocation = state.get("allocation")
    return curves, None if allocation is None else SensitivityAllocation.model_validate(allocation), bool(
        state.get("reused")
    )


def _compact(budget: dict[str, Any] | None) -> dict[str, float] | None:
    # Stored configs spell out every resource (None for the two a budget does not name): {"flops": 0.35}.
    return None if not budget else Budget.model_validate(budget).model_dump(exclude_none=True)


def sensitivity_report(experiment: Experiment) -> SensitivityReport:
    """The stored curves of ``experiment`` (per unit: sparsity, score, measured ratio), its baseline score, the
    resource the ratios measure and the allocation, in the problem's unit order."""
    curves, allocation, reused = _stored(experiment)
    allocated = allocation.distribution if allocation is not None else {}
    return SensitivityReport(
        experiment_id=experiment.id,
        status=experiment.status,
        resource=curves.resource,
        baseline_score=curves.baseline,
        optimize_mode=str(experiment.config.get("optimize_mode", "maximize")),
        budget=_compact(experiment.config.get("budget")),
        reused=reused,
        units=[UnitReport(name=u.name, points=list(u.points), allocated=allocated.get(u.name)) for u in curves.units],
        allocation=allocation,
    )


def reallocate(
    session: Session,
    source: Experiment,
    *,
    budget: Budget,
    name: str | None,
    allowed_prefixes: Sequence[str],
    bundles_enabled: bool = True,
    limits: Limits | None = None,
) -> Experiment:
    """Store a new ``queued`` sensitivity experiment that re-allocates ``source``'s curves for ``budget``: same
    owner, entrypoint, bundle and config (config list, base algorithm, evaluation, refinement) with the new budget and
    ``curves`` set, so nothing is profiled again. The caller commits, then enqueues its id.

    Raises :class:`NotFound` when ``source`` is not a sensitivity experiment, :class:`Conflict` when it has not
    finished or has no curves, :class:`InvalidInput` (field ``budget``) when its curves do not measure the
    budget's resource.
    """
    if source.algorithm != "sensitivity":
        raise NotFound(
            f"experiment {source.id} is not a sensitivity experiment (algorithm {source.algorithm!r})", field="id"
        )
    if not ExperimentStatus(source.status).terminal:
        raise Conflict(
            f"experiment {source.id} is {source.status}: re-allocate its curves once it has finished", field="status"
        )
    try:
        curves, _, _ = _stored(source)
    except NotFound as exc:
        raise Conflict(exc.message, field="status") from exc
    config = dict(source.config)
    # The budget decides how much is pruned: config-list entries only select layers (and may cap them).
    config["config_list"] = [
        {key: value for key, value in entry.items() if key not in _SPARSITY_FIELDS} for entry in config["config_list"]
    ]
    config |= {"budget": budget.model_dump(mode="json"), "curves": curves.model_dump(mode="json")}
    try:
        parsed = parse_algorithm_config(config)
    except ValidationError as exc:
        problems = "; ".join(error["msg"] for error in exc.errors())
        raise InvalidInput(f"cannot re-allocate experiment {source.id} for {budget.resource}: {problems}",
                           field="budget") from exc
    label = f"{budget.resource} {budget.ratio:g}"
    experiment = create_experiment(
        session,
        owner=source.owner,
        name=name or f"{source.name} (re-allocated, {label})"[:200],
        entrypoint=source.entrypoint,
        config=parsed,
        allowed_prefixes=allowed_prefixes,
        bundle=source.bundle,
        bundles_enabled=bundles_enabled,
        limits=limits,
    )
    add_event(
        session, experiment.id, "note", text=f"re-allocates the curves of experiment {source.id} for {label}",
        source_experiment_id=source.id,
    )
    return experiment
