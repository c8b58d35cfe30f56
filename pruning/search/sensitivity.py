"""``sensitivity``: profile how much each unit's pruning hurts, then allocate one threshold under the budget.

NNI's sensitivity analysis, NVIDIA modelopt's FastNAS profile and Neural Magic's loss profiles, done under a
physical budget and as two ask/tell steps:

1. **Profile** (skipped when ``config.curves`` is given). One baseline job (every unit dense) and one job per
   (unit, level) with only that unit pruned, all asked at once, so the step spreads over as many GPUs as there
   are. These jobs run exactly as given (``budget_ratio=None``): a unit's curve is its score and the measured ratio
   of the budget's resource (FLOPs without a budget) at each level.
2. **Allocate and refine.** With ``drop = sign * (baseline - score)`` (positive when pruning hurts) and
   ``saved = 1 - ratio`` (without a budget: the unit's share of the weights, ``s * w_u / W``), each unit's points
   ``(saved, drop)``, starting at ``(0, 0)`` and joined linearly, are replaced by their lower convex hull. One
   global threshold ``lambda`` on the *marginal* drop per unit of resource saved then decides every unit at once:
   a unit is pruned along its hull while the hull's slope stays below ``lambda``. The estimated saving is additive
   over units and piecewise linear in ``lambda``, so a binary search over the hulls' slopes finds the threshold
   at which it reaches the needed saving (``1 - budget.ratio``; without a budget the target sparsity), and the
   segment(s) at the threshold are interpolated so the estimate meets it exactly. This is the optimum of the
   additive model (a fractional knapsack over convex curves): no other allocation with the same estimated saving
   has a smaller estimated drop. A unit whose pruning hurts more per unit saved therefore stops earlier and gets
   less sparsity. A curve ends at the unit's highest profiled level: pruning collapses a layer abruptly past some
   point, and a line continued from milder levels cannot see it (on the digits CNN, a unit whose score barely moved
   at 50% was extrapolated to 95% and cost a quarter of the accuracy). When the curves cannot reach the needed
   saving, every unit goes to its highest level and the projection's one global scale does the rest.

   The additive estimate ignores interactions (pruning two adjacent layers saves less than the two savings added,
   and hurts differently), so the allocation is a shape, not an answer. The executor projects every candidate
   exactly onto the budget (one global scale, see :mod:`pruning.budget`); without a budget it is rescaled to the
   target sparsity. ``refine_candidates`` variants test how far to trust the curves: blends
   ``(1 - t) * allocation + t * uniform`` along the line from the allocation to the uniform distribution. The
   uniform end (``t = 1``) is the first variant, because the experiment is judged against uniform at the same
   budget: with it the search never returns a candidate that scores worse than uniform. The remaining variants
   sit evenly between (``t = j / refine_candidates``). Identical candidates are evaluated once.

The best is the best-scoring candidate that meets the budget (at the target sparsity without one), and
``best_distribution`` is what the executor actually evaluated. The profile's curves and the allocation stay in
the state (``GET /experiments/{id}/sensitivity`` serves them; ``POST /experiments/{id}/reallocate`` starts a new
experiment with ``config.curves`` set, which re-allocates for another budget without scoring again).

Everything here is deterministic: the strategy draws no random numbers.
"""

from __future__ import annotations

import bisect
from typing import Literal

from pydantic import BaseModel, Field

from pruning.config import PruningProblem, initial_distribution, rescale
from pruning.search._common import (
    TrialRecord,
    budget_ratio,
    direction,
    evaluated_distribution,
    measured_ratio,
    meets_goal,
    trial_budget,
)
from pruning.search.base import Job, JobKind, Result, SearchProblem, SearchState, better
from pruning.search.configs import SensitivityConfig, SensitivityCurves, SensitivityPoint, UnitCurve
from pruning.search.finalists import FinalistsState

__all__ = ["SensitivityAllocation", "SensitivitySearch", "SensitivityState", "allocate", "blends"]

# Slopes closer than this (relative) are one threshold: tied units share what is left at it.
_TIE = 1e-9


class SensitivityAllocation(BaseModel):
    """The allocation of step 2: per-unit sparsity and the threshold that produced it.

    ``threshold`` is the marginal score drop per unit of resource saved at which the estimate reaches
    ``needed_saving`` (``None`` when the curves cannot reach it: every unit then sits at its maximum and the
    projection decides the rest). Savings are fractions of the dense model's ``resource`` (``"weights"`` without
    a budget: the target sparsity weighted by weight counts).
    """

    distribution: dict[str, float]
    threshold: float | None
    needed_saving: float
    estimated_saving: float
    estimated_drop: float
    resource: str


class _Vertex(BaseModel):
    sparsity: float
    saved: float
    drop: float


def _unit_points(
    curve: UnitCurve, unit_weight_share: float, curves: SensitivityCurves, problem: SearchProblem, sign: float
) -> list[_Vertex]:
    """A unit's profiled points as (sparsity, saved, drop); points that cannot be read for this problem are left
    out (a level that failed to evaluate is bridged by its neighbours)."""
    resource = problem.budget.resource if problem.budget is not None else None
    out = []
    for point in curve.points:
        if resource is None:
            saved = point.sparsity * unit_weight_share
        else:
            ratio = _point_ratio(point, curves, resource)
            if ratio is None:
                continue
            saved = 1.0 - ratio
        out.append(_Vertex(sparsity=point.sparsity, saved=saved, drop=sign * (curves.baseline - point.score)))
    return out


def _point_ratio(point: SensitivityPoint, curves: SensitivityCurves, resource: str) -> float | None:
    if resource == curves.resource:
        return point.ratio
    if resource == "flops":
        return point.flops_ratio
    if resource == "params":
        return point.params_ratio
    return None


def _hull(points: list[_Vertex], max_sparsity: float) -> list[_Vertex]:
    """The lower convex hull, in the (saved, drop) plane, of the unit's curve from the dense origin."""
    chain = [_Vertex(sparsity=0.0, saved=0.0, drop=0.0)]
    for point in sorted(points, key=lambda p: p.sparsity):
        if point.sparsity > max_sparsity + 1e-12:
            continue
        # More pruning that saves nothing more is never worth it (latency noise, a unit too small to shrink).
        if point.saved <= chain[-1].saved:
            continue
        chain.append(point)
    hull: list[_Vertex] = []
    for point in chain:
        while len(hull) >= 2:
            o, a = hull[-2], hull[-1]
            cross = (a.saved - o.saved) * (point.drop - o.drop) - (a.drop - o.drop) * (point.saved - o.saved)
            if cross > 0:  # a turns counter-clockwise: it lies below the chord o -> point and stays
                break
            hull.pop()
        hull.append(point)
    return hull


def _sparsity_at(hull: list[_Vertex], saved: float) -> float:
    """The sparsity at which the unit's hull reaches ``saved`` (linear between its vertices)."""
    for a, b in zip(hull, hull[1:], strict=False):
        if saved <= b.saved + 1e-15:
            fraction = 0.0 if b.saved == a.saved else (saved - a.saved) / (b.saved - a.saved)
            return a.sparsity + min(max(fraction, 0.0), 1.0) * (b.sparsity - a.sparsity)
    return hull[-1].sparsity


def allocate(curves: SensitivityCurves, problem: SearchProblem) -> SensitivityAllocation:
    """Per-unit sparsities from ``curves`` at one global threshold (see the module docstring).

    Example: two units that each hold half the FLOPs (pruning one to ``s`` saves ``s / 2``); ``a`` scores
    ``1 - 0.2 s**2`` alone pruned, ``b`` ``1 - 0.6 s**2``, so ``b`` hurts three times as much per FLOP saved::

        allocation = allocate(curves, problem)   # problem.budget = {"flops": 0.6}: 0.4 of the FLOPs must go
        allocation.distribution                  # {"a": 0.55, "b": 0.25}
        allocation.estimated_saving              # 0.4 (== allocation.needed_saving)
        allocation.threshold                     # 0.5: the drop per FLOP saved of the last step taken
    """
    pruning = problem.pruning
    sign = direction(problem.optimize_mode)
    total_weights = sum(unit.weight_count for unit in pruning.units) or 1
    by_name = {curve.name: curve for curve in curves.units}
    hulls: list[list[_Vertex]] = []
    for unit in pruning.units:
        curve = by_name.get(unit.name)
        points = [] if curve is None else _unit_points(curve, unit.weight_count / total_weights, curves, problem, sign)
        hulls.append(_hull(points, unit.max_sparsity))
    resource: str = "weights"
    needed = pruning.target_sparsity
    if problem.budget is not None:
        needed, resource = 1.0 - problem.budget.ratio, problem.budget.resource
    # Every hull segment is one step a unit may take, priced by its slope (drop per unit saved). Within a unit the
    # slopes increase (convexity), so taking the cheapest steps first never skips one of a unit's earlier steps.
    segments = sorted(
        (
            ((b.drop - a.drop) / (b.saved - a.saved), index, k, b.saved - a.saved)
            for index, hull in enumerate(hulls)
            for k, (a, b) in enumerate(zip(hull, hull[1:], strict=False))
        ),
    )
    cumulative = []
    running = 0.0
    for segment in segments:
        running += segment[3]
        cumulative.append(running)
    taken = [0.0] * len(hulls)
    threshold: float | None = None
    if needed <= 0.0:
        threshold = None
    elif not segments or cumulative[-1] < needed:
        for _, index, _, width in segments:  # the curves fall short: everything, the projection does the rest
            taken[index] += width
    else:
        # The binary search on the threshold: the first slope at which the cumulative saving reaches the need.
        position = bisect.bisect_left(cumulative, needed)
        threshold = segments[position][0]
        tolerance = _TIE * (1.0 + abs(threshold))
        below = [s for s in segments if s[0] < threshold - tolerance]
        tied = [s for s in segments if abs(s[0] - threshold) <= tolerance]
        for _, index, _, width in below:
            taken[index] += width
        rest = needed - sum(s[3] for s in below)
        tied_width = sum(s[3] for s in tied)
        fraction = min(max(rest / tied_width, 0.0), 1.0) if tied_width > 0 else 0.0
        for _, index, _, width in tied:  # units at the threshold go the same fraction of their step
            taken[index] += fraction * width
    distribution = {
        unit.name: min(max(_sparsity_at(hull, saved), 0.0), unit.max_sparsity)
        for unit, hull, saved in zip(pruning.units, hulls, taken, strict=True)
    }
    drop = 0.0
    for hull, saved in zip(hulls, taken, strict=True):
        for a, b in zip(hull, hull[1:], strict=False):
            step = min(max(saved - a.saved, 0.0), b.saved - a.saved)
            drop += step * (b.drop - a.drop) / (b.saved - a.saved)
    return SensitivityAllocation(
        distribution=distribution,
        threshold=threshold,
        needed_saving=needed,
        estimated_saving=sum(taken),
        estimated_drop=drop,
        resource=resource,
    )


def blends(refine_candidates: int) -> list[float]:
    """The blend weights ``t`` of the candidates towards uniform: the allocation (0), uniform (1), then evenly
    between (``j / refine_candidates``)."""
    if refine_candidates <= 0:
        return [0.0]
    return [0.0, 1.0] + [j / refine_candidates for j in range(1, refine_candidates)]


def _candidates(
    allocation: SensitivityAllocation, problem: SearchProblem, refine_candidates: int
) -> list[tuple[float, dict[str, float]]]:
    """(blend, distribution) of each distinct candidate, in evaluation order."""
    pruning = problem.pruning
    uniform = initial_distribution(pruning)
    seen: set[tuple[float, ...]] = set()
    out = []
    for t in blends(refine_candidates):
        shape = {
            unit.name: (1.0 - t) * allocation.distribution[unit.name] + t * uniform[unit.name] for unit in pruning.units
        }
        if problem.budget is None:
            shape = _at_target(shape, pruning)
        signature = tuple(round(shape[unit.name], 9) for unit in pruning.units)
        if signature in seen:
            continue
        seen.add(signature)
        out.append((t, shape))
    return out


def _at_target(shape: dict[str, float], pruning: PruningProblem) -> dict[str, float]:
    # The library's bounded rescale: exact overall sparsity, clipping redistributed.
    return rescale(shape, pruning.target_sparsity, pruning)


Stage = Literal["profile", "candidates", "finished"]


class SensitivityState(SearchState):
    """The profile's jobs and curves, the allocation, and the candidates' outcomes. ``stage`` is what the search
    does next (internal); ``phase`` is the label people read."""

    version: int = 1
    problem: SearchProblem
    max_trials: int | None = None
    stage: Stage = "profile"
    reused: bool = False  # the curves came with the config (no profiling)
    curves: SensitivityCurves | None = None
    allocation: SensitivityAllocation | None = None
    pending: list[Job] = Field(default_factory=list)
    history: list[TrialRecord] = Field(default_factory=list)
    best_distribution: dict[str, float] | None = None
    finalists: FinalistsState | None = None  # the finalist round (pruning.search.finalists), when asked


class SensitivitySearch:
    """Sensitivity analysis, one global threshold, and refinement candidates (see the module docstring).

    Example::

        search = SensitivitySearch(SensitivityConfig(algorithm="sensitivity", config_list=[...],
                                                     budget={"flops": 0.35}))
        state = search.start(problem)
        state, jobs = search.ask(state)   # 1 + units x levels profiling jobs, all independent
        state = search.tell(state, results)
        state, jobs = search.ask(state)   # 1 + refine_candidates candidates, each projected onto the budget
    """

    def __init__(self, config: SensitivityConfig) -> None:
        self.config = config

    def start(self, problem: SearchProblem) -> SensitivityState:
        """The initial state; with ``config.curves`` the allocation is made at once (ValueError when the curves
        name units this problem does not have, or miss some of its units)."""
        state = SensitivityState(
            problem=problem, max_trials=trial_budget(self.config.max_trials, problem.max_trials), phase="profiling"
        )
        curves = self.config.curves
        if curves is None:
            return state.model_copy(update={"progress": 0.0, "progress_total": float(self._planned(state))})
        names = set(problem.pruning.unit_names())
        given = {curve.name for curve in curves.units}
        if given != names:
            raise ValueError(
                f"curves do not match this problem's units: unknown {sorted(given - names)}, "
                f"missing {sorted(names - given)}"
            )
        if problem.budget is not None and not curves.covers(problem.budget.resource):
            raise ValueError(f"curves do not measure {problem.budget.resource} on every point")
        state = state.model_copy(
            update={
                "stage": "candidates",
                "reused": True,
                "curves": curves,
                "allocation": allocate(curves, problem),
                "phase": "re-allocating reused curves",
            }
        )
        return state.model_copy(update={"progress": 0.0, "progress_total": float(self._planned(state))})

    # -- step 1 -------------------------------------------------------------------------------------------------

    def _profile_jobs(self, problem: SearchProblem) -> list[Job]:
        epochs = self.config.finetune_epochs
        kind: JobKind = "finetune_and_evaluate" if epochs else "evaluate"
        pruning = problem.pruning
        dense = {unit.name: 0.0 for unit in pruning.units}
        jobs = [
            Job(key="sensitivity-baseline", kind=kind, distribution=dense, finetune_epochs=epochs,
                context={"stage": "baseline"})
        ]
        for i, unit in enumerate(pruning.units):
            seen: set[float] = set()
            for k, level in enumerate(self.config.levels):
                sparsity = min(level, unit.max_sparsity)
                if unit.channels:
                    # Whole channels: profile the sparsity the shrunk model really has, each channel count once.
                    sparsity = unit.count(sparsity) / unit.channels
                if sparsity <= 0.0 or sparsity in seen:
                    continue
                seen.add(sparsity)
                jobs.append(
                    Job(
                        key=f"sensitivity-profile-{i}-{k}",
                        kind=kind,
                        distribution={**dense, unit.name: sparsity},
                        finetune_epochs=epochs,
                        context={"stage": "profile", "unit": unit.name, "level": level, "sparsity": sparsity},
                    )
                )
        return jobs

    def _curves(self, state: SensitivityState, results: list[Result]) -> tuple[SensitivityCurves | None, str | None]:
        problem = state.problem
        by_key = {result.key: result for result in results}
        baseline = by_key.get("sensitivity-baseline")
        if baseline is None or baseline.status != "succeeded" or baseline.score is None:
            reason = baseline.error if baseline is not None else "no result"
            return None, f"the unpruned baseline failed to evaluate ({reason}); no curve can be read without it"
        points: dict[str, list[SensitivityPoint]] = {unit.name: [] for unit in problem.pruning.units}
        for job in state.pending:
            result = by_key.get(job.key)
            if job.context.get("stage") != "profile" or result is None:
                continue
            if result.status != "succeeded" or result.score is None:
                continue
            ratio = measured_ratio(result, problem) if problem.budget is not None else result.flops_ratio
            points[str(job.context["unit"])].append(
                SensitivityPoint(
                    sparsity=float(job.context["sparsity"]),
                    score=float(result.score),
                    ratio=ratio,
                    flops_ratio=result.flops_ratio,
                    params_ratio=result.params_ratio,
                )
            )
        curves = SensitivityCurves(
            resource=problem.budget.resource if problem.budget is not None else "flops",
            baseline=float(baseline.score),
            units=[UnitCurve(name=unit.name, points=points[unit.name]) for unit in problem.pruning.units],
        )
        return curves, None

    # -- step 2 -------------------------------------------------------------------------------------------------

    def _candidate_jobs(self, state: SensitivityState) -> list[Job]:
        assert state.allocation is not None
        epochs = self.config.finetune_epochs
        remaining = None if state.max_trials is None else state.max_trials - state.trials_asked
        candidates = _candidates(state.allocation, state.problem, self.config.refine_candidates)
        if remaining is not None:
            candidates = candidates[: max(remaining, 0)]
        return [
            Job(
                key=f"sensitivity-candidate-{i}",
                kind="finetune_and_evaluate" if epochs else "evaluate",
                distribution=shape,
                finetune_epochs=epochs,
                context={"stage": "candidate", "candidate": i, "blend": t},
                budget_ratio=budget_ratio(state.problem),
            )
            for i, (t, shape) in enumerate(candidates)
        ]

    def _planned(self, state: SensitivityState) -> int:
        """Trials the whole search will take (progress_total)."""
        profile = 0 if state.stage != "profile" else len(self._profile_jobs(state.problem))
        candidates = 1 + self.config.refine_candidates
        if state.allocation is not None:
            candidates = len(_candidates(state.allocation, state.problem, self.config.refine_candidates))
        total = state.trials_asked + profile + candidates
        return total if state.max_trials is None else min(total, state.max_trials)

    # -- the protocol -------------------------------------------------------------------------------------------

    def ask(self, state: SensitivityState) -> tuple[SensitivityState, list[Job]]:
        if state.pending:
            return state, list(state.pending)  # asked before the crash: replay the same jobs
        if state.done:
            return state, []
        if state.stage == "profile":
            jobs = self._profile_jobs(state.problem)
            if state.max_trials is not None and state.max_trials < len(jobs) + 1:
                reason = (
                    f"max_trials ({state.max_trials}) is below the {len(jobs)} profiling jobs plus one candidate "
                    "this problem needs; raise max_trials or reuse curves of an earlier sensitivity experiment"
                )
                return state.model_copy(update={"done": True, "stop_reason": reason, "stage": "finished"}), []
        elif state.stage == "candidates":
            jobs = self._candidate_jobs(state)
            if not jobs:
                reason = f"max_trials ({state.max_trials}) reached before any candidate"
                return state.model_copy(update={"done": True, "stop_reason": reason, "stage": "finished"}), []
        else:
            finished: dict[str, object] = {"done": True}
            if state.best_key is None and state.stop_reason is None:
                finished["stop_reason"] = (
                    "no candidate met the budget" if state.problem.budget is not None else "no candidate succeeded"
                )
            return state.model_copy(update=finished), []
        phase = "evaluating candidates"
        if state.stage == "profile":
            phase = f"profiling {len(jobs) - 1} (unit, level) pairs"
        update = {"pending": jobs, "trials_asked": state.trials_asked + len(jobs), "phase": phase}
        return state.model_copy(update=update), jobs

    def tell(self, state: SensitivityState, results: list[Result]) -> SensitivityState:
        if state.stage == "profile":
            return self._tell_profile(state, results)
        if state.stage == "candidates":
            return self._tell_candidates(state, results)
        return state

    def _tell_profile(self, state: SensitivityState, results: list[Result]) -> SensitivityState:
        by_key = {result.key: result for result in results}
        history = list(state.history)
        for job in state.pending:
            result = by_key.get(job.key)
            ok = result is not None and result.status == "succeeded" and result.score is not None
            decision = ("baseline" if job.context.get("stage") == "baseline" else "profiled") if ok else "failed"
            history.append(
                TrialRecord(
                    key=job.key,
                    score=None if result is None else result.score,
                    overall_sparsity=None if result is None else result.overall_sparsity,
                    resource=None if result is None else measured_ratio(result, state.problem),
                    decision=decision,
                    context=job.context,
                )
            )
        curves, reason = self._curves(state, results)
        update: dict[str, object] = {"pending": [], "history": history, "progress": float(len(history))}
        if curves is None:
            update |= {"stage": "finished", "stop_reason": reason, "phase": "baseline failed"}
            return state.model_copy(update=update)
        allocation = allocate(curves, state.problem)
        told = state.model_copy(
            update=update | {"stage": "candidates", "curves": curves, "allocation": allocation, "phase": "allocated"}
        )
        return told.model_copy(update={"progress_total": float(self._planned(told))})

    def _tell_candidates(self, state: SensitivityState, results: list[Result]) -> SensitivityState:
        problem = state.problem
        by_key = {result.key: result for result in results}
        best: tuple[Job, Result] | None = None
        for job in state.pending:
            result = by_key.get(job.key)
            if result is None or result.status != "succeeded" or result.score is None:
                continue
            if meets_goal(result, job, problem) and better(
                result.score, None if best is None else best[1].score, problem.optimize_mode
            ):
                best = (job, result)
        history = list(state.history)
        for job in state.pending:
            result = by_key.get(job.key)
            if result is None or result.status != "succeeded" or result.score is None:
                decision = "failed"
            elif best is not None and job.key == best[0].key:
                decision = "chosen"
            else:
                decision = "candidate" if meets_goal(result, job, problem) else "infeasible"
            history.append(
                TrialRecord(
                    key=job.key,
                    score=None if result is None else result.score,
                    overall_sparsity=None if result is None else result.overall_sparsity,
                    resource=None if result is None else measured_ratio(result, problem),
                    decision=decision,
                    context=job.context,
                )
            )
        update: dict[str, object] = {
            "pending": [],
            "history": history,
            "stage": "finished",
            "progress": float(len(history)),
            "progress_total": float(len(history)),
            "phase": "finished",
        }
        if best is not None:
            job, result = best
            update |= {
                "best_key": job.key,
                "best_score": result.score,
                "best_distribution": evaluated_distribution(result, job),
            }
        return state.model_copy(update=update)
