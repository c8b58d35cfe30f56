"""Pieces the strategies share: running score statistics, feasibility, rescaling above a floor, records.

Pure logic on pydantic values (no torch): the API process may import strategy configs, and the strategies'
ask/tell must stay cheap and deterministic.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, Field

from pruning.budget import BUDGET_TOLERANCE
from pruning.config import PruningProblem, overall_sparsity, rescale
from pruning.search.base import Job, Result, SearchProblem

__all__ = [
    "SPARSITY_TOLERANCE",
    "RunningStats",
    "TrialRecord",
    "achieved_units",
    "budget_ratio",
    "evaluated_distribution",
    "measured_ratio",
    "meets_goal",
    "direction",
    "feasible_sparsity",
    "lift",
    "rescale_above",
    "resource_value",
    "rounding_slack",
    "rounding_tolerance",
    "trial_budget",
]

# The contract's tolerance on the overall sparsity of a result (0.5 percentage points).
SPARSITY_TOLERANCE = 0.005


class RunningStats(BaseModel):
    """Welford's running mean and variance of the scores seen so far (JSON, so it survives a resume)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, value: float) -> RunningStats:
        count = self.count + 1
        delta = value - self.mean
        mean = self.mean + delta / count
        return RunningStats(count=count, mean=mean, m2=self.m2 + delta * (value - mean))

    @property
    def std(self) -> float:
        """Sample standard deviation; 0 with fewer than two scores."""
        if self.count < 2:
            return 0.0
        return math.sqrt(max(self.m2, 0.0) / (self.count - 1))


class TrialRecord(BaseModel):
    """One evaluated job as the strategy saw it: its outcome and the decision it led to."""

    key: str
    score: float | None = None
    overall_sparsity: float | None = None
    resource: float | None = None
    decision: str | None = None  # "accepted" / "rejected" / "chosen" / "failed" / ...
    acceptance_probability: float | None = None  # annealing: the chance a worse-or-equal proposal had
    context: dict[str, Any] = Field(default_factory=dict)


def trial_budget(*limits: int | None) -> int | None:
    """The tightest of the given trial limits (``None`` = unlimited)."""
    given = [limit for limit in limits if limit is not None]
    return min(given) if given else None


def direction(mode: str) -> float:
    """+1 when higher scores are better, -1 when lower are."""
    return 1.0 if mode == "maximize" else -1.0


def resource_value(result: Result, resource: str) -> float | None:
    """The measured resource of ``result`` in the experiment's unit (params, MACs, or milliseconds)."""
    if resource == "params":
        return None if result.params is None else float(result.params)
    if resource == "flops":
        return None if result.flops is None else float(result.flops)
    return result.latency_ms


def budget_ratio(problem: SearchProblem) -> float | None:
    """The fraction every candidate is projected onto (``Job.budget_ratio``), or ``None`` without a budget."""
    return None if problem.budget is None else problem.budget.ratio


def measured_ratio(result: Result, problem: SearchProblem) -> float | None:
    """A result's measured value of the budget's resource over the dense model's."""
    if result.budget_ratio is not None or problem.budget is None:
        return result.budget_ratio
    resource = problem.budget.resource
    if resource == "latency":
        if result.latency_ms is None or not problem.dense_latency_ms:
            return None
        return result.latency_ms / problem.dense_latency_ms
    return result.flops_ratio if resource == "flops" else result.params_ratio


def evaluated_distribution(result: Result | None, job: Job) -> dict[str, float]:
    """What was actually evaluated: the projected (or emerged) distribution a result reports, else the job's."""
    emerged = None if result is None else result.extra.get("distribution")
    if isinstance(emerged, dict) and emerged:
        return {str(name): float(value) for name, value in emerged.items()}
    return dict(job.distribution)


def meets_goal(result: Result, job: Job, problem: SearchProblem, ratio: float | None = None) -> bool:
    """Whether a succeeded result may be the best: within the budget (measured on the shrunk model; ``ratio``
    overrides the budget's for a search towards an intermediate one) when the experiment has one, at the target
    sparsity otherwise."""
    if problem.budget is not None:
        measured = measured_ratio(result, problem)
        limit = problem.budget.ratio if ratio is None else ratio
        return measured is not None and measured <= limit + BUDGET_TOLERANCE
    return feasible_sparsity(job.distribution, problem)


def feasible_sparsity(distribution: dict[str, float], problem: SearchProblem) -> bool:
    """Whether a requested distribution meets the target overall sparsity (weighted by weight count)."""
    target = problem.pruning.target_sparsity
    return overall_sparsity(distribution, problem.pruning) >= target - SPARSITY_TOLERANCE


def rounding_slack(problem: PruningProblem) -> float:
    """The most overall sparsity rounding to whole channels can lose (half a channel per structured unit,
    weighted); 0 for fine-grained problems, whose elements are too many to matter."""
    if not problem.structured:
        return 0.0
    total = sum(unit.weight_count for unit in problem.units)
    if total == 0:
        return 0.0
    return sum(unit.weight_count * 0.5 / unit.channels for unit in problem.units if unit.channels) / total


def rounding_tolerance(problem: PruningProblem) -> float:
    """How far a measured overall sparsity may fall below the requested one and still count as reaching it:
    the contract's tolerance, or what rounding to whole channels can lose when that is more."""
    return max(SPARSITY_TOLERANCE, rounding_slack(problem))


def achieved_units(result: Result, problem: PruningProblem, requested: dict[str, float]) -> dict[str, float]:
    """Per-unit achieved sparsity from a result's per-layer ``achieved`` (a unit's members share one value;
    the mean guards against a member reported differently); ``requested`` for a unit none of whose members
    was reported (every unit when the result reports none)."""
    out = {}
    for unit in problem.units:
        values = [result.achieved[m] for m in unit.members if m in result.achieved]
        out[unit.name] = sum(values) / len(values) if values else requested[unit.name]
    return out


def lift(fractions: dict[str, float], floor: dict[str, float]) -> dict[str, float]:
    """Original-model sparsities from fractions of what ``floor`` left: ``s = p + (1 - p) * x``."""
    return {name: floor.get(name, 0.0) + (1.0 - floor.get(name, 0.0)) * x for name, x in fractions.items()}


def _remaining_problem(problem: PruningProblem, floor: dict[str, float]) -> PruningProblem:
    # A unit that already lost a fraction p of its weights has w * (1 - p) left to prune and at most
    # (max - p) / (1 - p) of them may go. The scale keeps integer weight counts precise.
    scale = 1_000_000
    units = []
    for unit in problem.units:
        p = floor.get(unit.name, 0.0)
        left = max(1.0 - p, 1e-12)
        units.append(
            unit.model_copy(
                update={
                    "weight_count": max(1, round(unit.weight_count * left * scale)),
                    "max_sparsity": min(max((unit.max_sparsity - p) / left, 0.0), 1.0),
                    "initial_sparsity": 0.0,
                }
            )
        )
    return problem.model_copy(update={"units": units})


def rescale_above(
    fractions: dict[str, float], floor: dict[str, float], target: float, problem: PruningProblem
) -> tuple[dict[str, float], dict[str, float]]:
    """Rescale a proposal so the original-model overall sparsity is ``target`` while no unit drops below
    ``floor`` (pruning is monotonic: a round never revives what an earlier round pruned).

    ``fractions`` are per-unit fractions of what the floor left. Returns ``(fractions, distribution)``, both
    rescaled. With an all-zero floor this is exactly the library's bounded :func:`pruning.config.rescale`;
    otherwise the same rescale runs on the problem of what remains (weights ``w * (1 - p)``, bounds
    ``(max - p) / (1 - p)``), so clipping and redistribution stay the library's.
    """
    if not any(floor.values()):
        scaled = rescale(fractions, target, problem)
        return scaled, dict(scaled)
    done = overall_sparsity(floor, problem)
    if target <= done:
        zero = {name: 0.0 for name in fractions}
        return zero, lift(zero, floor)
    remaining = _remaining_problem(problem, floor)
    scaled = rescale(fractions, (target - done) / (1.0 - done), remaining)
    return scaled, lift(scaled, floor)
