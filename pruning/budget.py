"""Physical budgets: a fraction of the dense model's measured FLOPs, params or latency, and the projection of a
proposed distribution onto it.

A budget (``{"flops": 0.25}``) is what a user pays for: the shrunk model's FLOPs (or params, or latency on the
worker's device) divided by the dense model's. Every strategy's proposal is *projected* onto the budget before
it is evaluated: a bounded 1-D search over one global scale ``alpha`` of the proposal's shape
(``s_u = min(alpha * d_u, max_u)``) for the least pruning whose predicted ratio meets the budget, then (with
``fill``) single channels given back where the budget still has room (one per unit at most), so that a coarse
network (a few channels per layer: the scale moves every layer's count at once) lands close below the budget,
not one whole step under it. The predictor
is passed in (the executor shrinks a copy of the model and counts it; the contract suite's fake computes the
same thing in closed form), so the search itself is pure logic and deterministic for FLOPs and params.

This module imports pydantic only: the API validates budgets with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pruning.config import PruningProblem

__all__ = [
    "BUDGET_TOLERANCE",
    "Budget",
    "BudgetUnreachable",
    "Projection",
    "fills_slack",
    "project",
    "project_scalar",
    "scaled",
]

# How far above the budget a measured ratio may lie and still count as meeting it (one point of the dense value).
BUDGET_TOLERANCE = 0.01
# Bisection steps of the projection: 2**-20 of the scale range, far below one channel of any real layer.
_MAX_STEPS = 20

BudgetResource = Literal["flops", "params", "latency"]


class Budget(BaseModel):
    """Exactly one of ``flops``, ``params`` or ``latency``: the shrunk model's value as a fraction of the dense
    model's measured value (``{"flops": 0.25}`` keeps a quarter of the dense MACs)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    flops: float | None = Field(default=None, gt=0, lt=1, description="fraction of the dense model's MACs")
    params: float | None = Field(default=None, gt=0, lt=1, description="fraction of the dense parameter count")
    latency: float | None = Field(
        default=None, gt=0, lt=1, description="fraction of the dense model's latency on the worker's device"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        given = [name for name in ("flops", "params", "latency") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"a budget names exactly one of flops, params or latency; got {given or 'none'}")
        return self

    @property
    def resource(self) -> BudgetResource:
        """Which measurement the budget limits."""
        for name in ("flops", "params", "latency"):
            if getattr(self, name) is not None:
                return name  # type: ignore[return-value]
        raise AssertionError("validated budget names no resource")

    @property
    def ratio(self) -> float:
        """The budget as a fraction of the dense value."""
        value = getattr(self, self.resource)
        assert value is not None
        return float(value)

    def met_by(self, measured_ratio: float | None) -> bool:
        """Whether a measured ratio meets the budget (within :data:`BUDGET_TOLERANCE`)."""
        return measured_ratio is not None and measured_ratio <= self.ratio + BUDGET_TOLERANCE


def fills_slack(budget: Budget | None) -> bool:
    """Whether projections onto ``budget`` spend its slack channel by channel: for FLOPs and params, whose
    prediction is exact and monotone in the channel counts; a measured latency is neither."""
    return budget is not None and budget.resource != "latency"


class BudgetUnreachable(ValueError):
    """Even the most pruning a proposal's shape allows (every unit at its ``max_sparsity``) misses the budget."""


class Projection(BaseModel):
    """A proposal projected onto a budget: the distribution to evaluate and its predicted ratio."""

    distribution: dict[str, float]
    ratio: float
    scale: float
    predictions: int  # predictor calls the search made


def scaled(shape: dict[str, float], alpha: float, problem: PruningProblem) -> dict[str, float]:
    """``shape`` scaled by ``alpha``, each unit clipped to ``[0, max_sparsity]``."""
    return {u.name: min(max(alpha * shape[u.name], 0.0), u.max_sparsity) for u in problem.units}


def _signature(distribution: dict[str, float], problem: PruningProblem) -> tuple[float | int, ...]:
    # Distributions that prune the same number of channels shrink to the same model: one prediction each.
    return tuple(
        u.count(distribution[u.name]) if u.channels else round(distribution[u.name], 6) for u in problem.units
    )


def project_scalar(
    family: Callable[[float], dict[str, float]],
    high: float,
    ratio_of: Callable[[dict[str, float]], float],
    target: float,
    problem: PruningProblem,
    *,
    fill: bool = False,
    floor: dict[str, float] | None = None,
) -> Projection:
    """The smallest ``x`` in ``[0, high]`` whose ``family(x)`` has ``ratio_of(...) <= target`` (bisection; the
    ratio must not increase with ``x``). Raises :class:`BudgetUnreachable` when ``family(high)`` misses it.

    With ``fill``, the slack the bisection leaves is then spent channel by channel (:func:`_fill`), never below
    ``floor`` (per unit). Only for predictors that are exact and monotone in the channel counts (FLOPs, params):
    a measured latency is neither."""
    cache: dict[tuple[float | int, ...], float] = {}

    def ratio(distribution: dict[str, float]) -> float:
        key = _signature(distribution, problem)
        if key not in cache:
            cache[key] = float(ratio_of(distribution))
        return cache[key]

    top = family(high)
    top_ratio = ratio(top)
    if top_ratio > target:
        raise BudgetUnreachable(
            f"budget {target:.4f} is unreachable for this proposal: with every unit it prunes at max_sparsity the "
            f"model keeps {top_ratio:.4f} of the dense value"
        )
    zero = family(0.0)
    if ratio(zero) <= target:
        return Projection(distribution=zero, ratio=ratio(zero), scale=0.0, predictions=len(cache))
    low, best, best_ratio, best_x = 0.0, top, top_ratio, high
    for _ in range(_MAX_STEPS):  # repeated channel counts hit the cache, so late steps cost no prediction
        middle = (low + best_x) / 2.0
        candidate = family(middle)
        candidate_ratio = ratio(candidate)
        if candidate_ratio <= target:
            best, best_ratio, best_x = candidate, candidate_ratio, middle
        else:
            low = middle
    if fill:
        best, best_ratio = _fill(best, family(best_x), ratio, target, problem, floor or {})
    return Projection(distribution=best, ratio=best_ratio, scale=best_x, predictions=len(cache))


def _fill(
    distribution: dict[str, float],
    wanted: dict[str, float],
    ratio: Callable[[dict[str, float]], float],
    target: float,
    problem: PruningProblem,
    floor: dict[str, float],
) -> tuple[dict[str, float], float]:
    """Give single channels back while the ratio stays within ``target``: at most one per unit, so every unit
    stays within one channel of the proposal's rounding (for ``uniform``, of the common sparsity).

    Units are tried in order of their sparsity one channel lighter minus the one the proposal wanted for them
    (``wanted``: the family at the found scale, before rounding to channels), largest first: the units rounding
    over-pruned most get theirs first; the finer unit first on ties. One prediction per unit at most.
    """
    current = dict(distribution)
    current_ratio = ratio(current)
    candidates = []
    for unit in problem.units:
        if not unit.channels:
            continue
        count = unit.count(current[unit.name])
        lowest = unit.count(floor[unit.name]) if floor.get(unit.name) else 0
        if count > lowest:
            lighter = (count - 1) / unit.channels
            candidates.append((wanted[unit.name] - lighter, -unit.channels, unit.name, lighter))  # ascending
    for _, _, name, lighter in sorted(candidates):
        candidate = current | {name: lighter}
        candidate_ratio = ratio(candidate)
        if candidate_ratio <= target:  # the ratio only grows as channels come back: a miss stays a miss
            current, current_ratio = candidate, candidate_ratio
    return current, current_ratio


def project(
    shape: dict[str, float],
    problem: PruningProblem,
    ratio_of: Callable[[dict[str, float]], float],
    target: float,
    floor: dict[str, float] | None = None,
    *,
    fill: bool = False,
) -> Projection:
    """Project a proposal onto ``ratio_of(distribution) <= target`` by one global scale of its shape.

    ``shape`` is the strategy's proposal (unit -> sparsity); only the proportions between units matter. An
    all-zero shape is read as uniform. Example (``ratio_of`` here is a closed form; the executor shrinks)::

        projection = project({"conv1": 0.2, "conv2": 0.6}, problem, flops_ratio, 0.25)
        projection.distribution   # the same proportions, scaled until the FLOPs ratio is <= 0.25

    With ``floor`` (what earlier rounds already pruned, per unit), the shape is read as fractions of what the floor
    left and the scale applies to those: no unit goes below its floor. With ``fill``, the budget's remaining slack
    is spent channel by channel afterwards (see :func:`project_scalar`).
    """
    if floor and any(floor.values()):
        return _project_above(shape, problem, ratio_of, target, floor, fill)
    if not any(shape.get(u.name, 0.0) > 0 for u in problem.units):
        shape = {u.name: 1.0 for u in problem.units}
    high = max(u.max_sparsity / shape[u.name] for u in problem.units if shape[u.name] > 0)
    return project_scalar(lambda alpha: scaled(shape, alpha, problem), high, ratio_of, target, problem, fill=fill)


def _project_above(
    shape: dict[str, float],
    problem: PruningProblem,
    ratio_of: Callable[[dict[str, float]], float],
    target: float,
    floor: dict[str, float],
    fill: bool,
) -> Projection:
    names = problem.unit_names()
    fractions = {n: (shape[n] - floor.get(n, 0.0)) / max(1.0 - floor.get(n, 0.0), 1e-12) for n in names}
    fractions = {n: min(max(v, 0.0), 1.0) for n, v in fractions.items()}
    if not any(v > 0 for v in fractions.values()):
        fractions = {n: 1.0 for n in names}
    caps = {u.name: max((u.max_sparsity - floor.get(u.name, 0.0)) / max(1.0 - floor.get(u.name, 0.0), 1e-12), 0.0)
            for u in problem.units}

    def family(alpha: float) -> dict[str, float]:
        out = {}
        for n in names:
            p = floor.get(n, 0.0)
            out[n] = p + (1.0 - p) * min(alpha * fractions[n], caps[n])
        return out

    high = max(caps[n] / fractions[n] for n in names if fractions[n] > 0)
    return project_scalar(family, high, ratio_of, target, problem, fill=fill, floor=floor)
