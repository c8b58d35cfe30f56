"""``netadapt``: NetAdapt (Yang et al., ECCV 2018) with measured resource reductions.

Iteration ``i`` asks for a resource reduction ``ΔR_i = initial_reduction * R0 * reduction_decay**i``. For
every unit (coupled channel group) one independent ``netadapt_candidate`` job finds the smallest number of
whole filters of that unit, ranked by the base algorithm, whose *measured* resource (params, MACs or latency
of the dependency-aware shrunk model) falls at least ``ΔR_i`` below the current model's (never further than the
budget: the step that crosses it aims at the budget itself), fine-tunes that
candidate for ``short_term_finetune_epochs`` and evaluates it. The best-scoring candidate, with its fine-tuned
weights (a checkpoint artifact), becomes the next iteration's model. The search stops once the measured
resource is within ``target_resource_ratio * R0``; then ``finetune_epochs`` of long-term fine-tuning.

With ``uniform_move`` every iteration also asks one ``netadapt_candidate`` job whose unit is
:data:`UNIFORM_MOVE`: every unit keeps the same fraction of the channels it has left, the least pruning whose
measured resource meets the same target, so the greedy choice can take the flat step whenever it scores best
after the short-term fine-tune. It is off by default (the paper's per-unit greedy): on the budgets bench it won
some settings and lost others (``netadapt_uniform`` beside ``netadapt`` in docs/benchmarks.md, section 1).

When no unit can reach ``ΔR`` (every unit is nearly empty, or the reduction is coarser than any unit's
filters), the iteration is retried with ``ΔR`` halved, at most ``max_halvings`` times, after which the search
stops with ``state.stop_reason`` saying why (NNI looped forever here). Progress is the measured resource.

Job kind ``netadapt_candidate`` is executed by :func:`execute` in this module.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from pruning.search._common import TrialRecord, resource_value, trial_budget
from pruning.search.base import Job, Result, SearchProblem, SearchState, better
from pruning.search.configs import NetAdaptConfig
from pruning.search.finalists import FinalistsState

__all__ = ["NetAdaptSearch", "NetAdaptState", "UNIFORM_MOVE", "execute"]

# The unit name of a job that shrinks every unit at once (the uniform move).
UNIFORM_MOVE = "*"


class NetAdaptState(SearchState):
    version: int = 1
    problem: SearchProblem
    max_trials: int | None = None
    phase: Literal["baseline", "search", "final", "finished"] = "baseline"
    iteration: int = 0
    halvings: int = 0
    initial_resource: float | None = None  # R0, measured on the unpruned model
    budget: float | None = None  # target_resource_ratio * R0
    current_resource: float | None = None
    current_score: float | None = None
    current_distribution: dict[str, float] = Field(default_factory=dict)
    current_artifact: str | None = None  # checkpoint of the current model (None = the task's model())
    current_key: str | None = None
    pending: list[Job] = Field(default_factory=list)
    history: list[TrialRecord] = Field(default_factory=list)
    best_distribution: dict[str, float] | None = None
    finalists: FinalistsState | None = None  # the uniform guard (pruning.search.finalists), under a budget


class NetAdaptSearch:
    """NetAdapt over coupled channel groups; see the module docstring.

    Example::

        config = NetAdaptConfig(algorithm="netadapt", config_list=[...], target_resource_ratio=0.5)
        search = NetAdaptSearch(config)
        state = search.start(problem)
        state, jobs = search.ask(state)   # the baseline measurement, then one candidate job per unit
    """

    def __init__(self, config: NetAdaptConfig) -> None:
        self.config = config

    def start(self, problem: SearchProblem) -> NetAdaptState:
        if not problem.pruning.structured:
            raise ValueError("netadapt needs a structured base algorithm (it removes whole filters)")
        return NetAdaptState(
            problem=problem,
            max_trials=trial_budget(self.config.max_trials, problem.max_trials),
            current_distribution={name: 0.0 for name in problem.pruning.unit_names()},
        )

    # ------------------------------------------------------------------------------------------------- ask
    def ask(self, state: NetAdaptState) -> tuple[NetAdaptState, list[Job]]:
        if state.done:
            return state, []
        if state.pending:
            return state, list(state.pending)
        if state.phase == "baseline":
            job = Job(
                key="netadapt-base",
                kind="evaluate",
                distribution=state.current_distribution,
                context={"iteration": -1},
            )
            return self._asked(state, [job])
        if state.phase == "final":
            job = Job(
                key="netadapt-final",
                kind="finetune_and_evaluate",
                distribution=state.current_distribution,
                parent_artifact=state.current_artifact,
                finetune_epochs=self.config.finetune_epochs,
                save_artifact=True,
                context={"iteration": state.iteration, "final": True},
            )
            return self._asked(state, [job])
        if state.phase == "finished":
            return state.model_copy(update={"done": True}), []
        if state.iteration >= self.config.max_iterations:
            return self._stop(state, f"max_iterations ({self.config.max_iterations}) reached above the budget")
        assert state.initial_resource is not None and state.current_resource is not None
        reduction = (
            self.config.initial_reduction
            * state.initial_resource
            * self.config.reduction_decay**state.iteration
            * 0.5**state.halvings
        )
        # The last iteration aims at the budget itself, not past it: a full step from just above the budget would
        # hand out a model well below it (FLOPs x0.148 for a x0.25 budget in the budgets bench), paid in accuracy.
        target = max(state.current_resource - reduction, state.budget or 0.0)
        # Units still above their bound; nothing is left to offer in the others.
        moves = [
            (unit.name, unit.name)
            for unit in state.problem.pruning.units
            if _prunable_channels(unit) > unit.count(state.current_distribution[unit.name])
        ]
        if self.config.uniform_move and len(moves) > 1:  # with one unit left the flat step is that unit's
            moves.append((UNIFORM_MOVE, "uniform"))
        jobs = [
            Job(
                key=f"netadapt-{state.iteration}-h{state.halvings}-{suffix}",
                kind="netadapt_candidate",
                distribution=state.current_distribution,
                parent_artifact=state.current_artifact,
                finetune_epochs=self.config.short_term_finetune_epochs,
                save_artifact=True,
                params={"unit": unit, "target_resource": target},
                context={
                    "iteration": state.iteration,
                    "layer": unit,
                    "delta_resource": state.current_resource - target,  # the last step: only down to the budget
                    "halving": state.halvings,
                },
            )
            for unit, suffix in moves
        ]
        if not jobs:
            return self._stop(state, "every unit is at its max_sparsity before the resource budget was reached")
        if state.max_trials is not None and state.trials_asked + len(jobs) > state.max_trials:
            return self._stop(
                state,
                f"max_trials ({state.max_trials}) cannot pay for iteration {state.iteration}'s {len(jobs)} "
                f"candidates; stopped at resource {state.current_resource:g} above the budget "
                f"{state.budget:g}",
            )
        return self._asked(state, jobs)

    def _asked(self, state: NetAdaptState, jobs: list[Job]) -> tuple[NetAdaptState, list[Job]]:
        update = {"pending": jobs, "trials_asked": state.trials_asked + len(jobs)}
        return state.model_copy(update=update), jobs

    def _stop(self, state: NetAdaptState, reason: str) -> tuple[NetAdaptState, list[Job]]:
        return state.model_copy(update={"done": True, "phase": "finished", "stop_reason": reason}), []

    # ------------------------------------------------------------------------------------------------ tell
    def tell(self, state: NetAdaptState, results: list[Result]) -> NetAdaptState:
        by_key = {result.key: result for result in results}
        pending, state = state.pending, state.model_copy(update={"pending": []})
        if state.phase == "baseline":
            return self._tell_baseline(state, by_key.get(pending[0].key))
        if state.phase == "final":
            return self._tell_final(state, pending[0], by_key.get(pending[0].key))
        return self._tell_candidates(state, pending, by_key)

    def _tell_baseline(self, state: NetAdaptState, result: Result | None) -> NetAdaptState:
        resource = None if result is None else resource_value(result, state.problem.resource)
        if result is None or result.status != "succeeded" or not resource:
            error = "no result" if result is None else (result.error or f"no {state.problem.resource} measured")
            return state.model_copy(
                update={
                    "done": True,
                    "phase": "finished",
                    "stop_reason": f"baseline measurement failed: {error}",
                }
            )
        budget = self.config.target_resource_ratio * resource
        history = [*state.history, _record(result, resource, "baseline", {"iteration": -1})]
        return state.model_copy(
            update={
                "phase": "search",
                "initial_resource": resource,
                "budget": budget,
                "progress": 0.0,
                "progress_total": resource - budget,
                "current_resource": resource,
                "current_score": result.score,
                "history": history,
            }
        )

    def _tell_candidates(self, state: NetAdaptState, pending: list[Job], by_key: dict[str, Result]) -> NetAdaptState:
        mode = state.problem.optimize_mode
        chosen: tuple[Job, Result, float] | None = None
        history = list(state.history)
        for job in pending:
            result = by_key.get(job.key)
            resource = None if result is None else resource_value(result, state.problem.resource)
            ok = (
                result is not None
                and result.status == "succeeded"
                and result.score is not None
                and resource is not None
                and result.extra.get("distribution") is not None
            )
            if not ok:
                history.append(_record(result, resource, "unreachable", job.context, key=job.key))
                continue
            assert result is not None and result.score is not None and resource is not None
            history.append(_record(result, resource, "candidate", job.context))
            if chosen is None or better(result.score, chosen[1].score, mode):
                chosen = (job, result, resource)
        if chosen is None:
            halvings = state.halvings + 1
            if halvings > self.config.max_halvings:
                reason = (
                    f"no unit can reduce the {state.problem.resource} by the iteration's ΔR even after "
                    f"{self.config.max_halvings} halvings (iteration {state.iteration}, resource "
                    f"{state.current_resource:g}, budget {state.budget:g})"
                )
                return state.model_copy(
                    update={"done": True, "phase": "finished", "stop_reason": reason, "history": history}
                )
            return state.model_copy(update={"halvings": halvings, "history": history})
        job, result, resource = chosen
        for i in range(len(history) - 1, -1, -1):
            if history[i].key == job.key:
                history[i] = history[i].model_copy(update={"decision": "chosen"})
                break
        assert state.initial_resource is not None and state.budget is not None
        update: dict[str, Any] = {
            "iteration": state.iteration + 1,
            "halvings": 0,
            "current_resource": resource,
            "current_score": result.score,
            "current_distribution": dict(result.extra["distribution"]),
            "current_artifact": result.artifact,
            "current_key": result.key,
            # Progress is the measured resource: R0 - R of R0 - budget.
            "progress": state.initial_resource - resource,
            "progress_total": state.initial_resource - state.budget,
            "history": history,
        }
        if resource <= state.budget:
            # Every candidate of this iteration within the budget is feasible; the chosen one scores best.
            update |= {
                "best_key": result.key,
                "best_score": result.score,
                "best_distribution": dict(result.extra["distribution"]),
                "phase": "final" if self.config.finetune_epochs > 0 else "finished",
            }
            if self.config.finetune_epochs == 0:
                update |= {"done": True, "stop_reason": "resource budget reached"}
        return state.model_copy(update=update)

    def _tell_final(self, state: NetAdaptState, job: Job, result: Result | None) -> NetAdaptState:
        update: dict[str, Any] = {"done": True, "phase": "finished", "stop_reason": "resource budget reached"}
        if result is not None and result.status == "succeeded" and result.score is not None:
            resource = resource_value(result, state.problem.resource)
            update["history"] = [*state.history, _record(result, resource, "final", job.context)]
            # The long-term fine-tuned model is the deliverable whenever it evaluated.
            update |= {"best_key": result.key, "best_score": result.score}
        else:
            error = "no result" if result is None else result.error
            update["stop_reason"] = f"resource budget reached; the final fine-tune failed ({error})"
        return state.model_copy(update=update)


def _prunable_channels(unit: Any) -> int:
    """The most channels a unit may lose: its max_sparsity, and at least one channel always survives."""
    return min(unit.count(unit.max_sparsity), unit.channels - 1)


def _record(
    result: Result | None,
    resource: float | None,
    decision: str,
    context: dict[str, Any],
    key: str | None = None,
) -> TrialRecord:
    return TrialRecord(
        key=(key or "") if result is None else result.key,
        score=None if result is None else result.score,
        overall_sparsity=None if result is None else result.overall_sparsity,
        resource=resource,
        decision=decision,
        context=context,
    )


# ------------------------------------------------------------------------------------------------ execute
def execute(task: Any, problem: SearchProblem, job: Job, store: Any, device: str = "cpu") -> Result:
    """Run one ``netadapt_candidate`` job: the smallest pruning of ``job.params["unit"]`` (whole filters, the
    base algorithm's ranking, monotonic over the parent's masks) whose measured resource on the shrunk model
    is at most ``job.params["target_resource"]``; then fine-tune, evaluate, save a checkpoint. The unit
    :data:`UNIFORM_MOVE` prunes every unit by the same fraction of what it has left (a bisection on that fraction).

    A unit that cannot reach the target even at its bound gives a failed result whose error says so (no
    training or evaluation is spent on it). ``Result.extra["distribution"]`` is the candidate's unit-level
    distribution (original-model terms), ``extra["model_artifact"]`` the downloadable shrunk model.
    """
    from pruning.config import layer_distribution, overall_sparsity
    from pruning.jobs import load_checkpoint, measure_model, save_checkpoint, save_pruned_model
    from pruning.masks import achieved_sparsity, apply_masks, strip
    from pruning.pruner import collected_importance, compute_masks

    pruning = problem.pruning
    target = float(job.params["target_resource"])
    model, previous = load_checkpoint(task, store, job.parent_artifact)
    model.to(device)
    dummy = task.dummy_input()
    importance = collected_importance(model, pruning, task)  # statistics once for every probe below

    def measured(distribution: dict[str, float]) -> tuple[float, dict[str, float], dict[str, Any]]:
        # Monotonic: what the parent removed ranks first and stays removed.
        masks = compute_masks(model, pruning, distribution, importance=importance, previous=previous)
        metrics, _, _ = measure_model(model, masks, problem, dummy, device)
        value = {"params": metrics["params"], "flops": metrics["flops"]}.get(problem.resource)
        if value is None:
            value = metrics["latency_ms"]
        return float(value), distribution, masks

    if job.params["unit"] == UNIFORM_MOVE:
        found = _uniform_move(job, pruning, measured, target, problem.resource)
        name = UNIFORM_MOVE
    else:
        found = _unit_move(job, pruning.unit(str(job.params["unit"])), measured, target, problem.resource)
        name = str(job.params["unit"])
    if isinstance(found, Result):
        return found
    distribution, masks, pruned = found
    apply_masks(model, masks, structured=True)
    if job.finetune_epochs:
        task.fine_tune(model, job.finetune_epochs)
    score = task.evaluate(model)
    strip(model)
    metrics, shrunk, recipe = measure_model(model, masks, problem, dummy, device)
    result = Result(
        key=job.key,
        score=score,
        requested=layer_distribution(distribution, pruning),
        achieved=achieved_sparsity(masks, pruning),
        overall_sparsity=overall_sparsity(distribution, pruning),
        extra={"distribution": distribution, "reached": True, "pruned_channels": pruned, "unit": name},
        **metrics,
    )
    if job.save_artifact:
        checkpoint = save_checkpoint(store, model, masks)
        model_id = save_pruned_model(
            store, shrunk, recipe, entrypoint=task.entrypoint, base_algo=pruning.base_algo, score=score
        )
        result = result.model_copy(
            update={"artifact": checkpoint, "extra": {**result.extra, "model_artifact": model_id}}
        )
    return result


Probe = tuple[float, dict[str, float], dict[str, Any]]  # measured resource, distribution, masks
Move = tuple[dict[str, float], dict[str, Any], int]  # distribution, masks, channels pruned in the moved units


def _unit_move(job: Job, unit: Any, measured: Any, target: float, resource: str) -> Move | Result:
    """The fewest channels of ``unit`` whose measured resource reaches ``target``: a binary search over the
    count (resources fall monotonically with the channels removed), each probe measured on the shrunk model."""
    assert unit.channels is not None
    channels = unit.channels

    def probe(count: int) -> Probe:
        return measured({**job.distribution, unit.name: count / channels})

    low = unit.count(job.distribution[unit.name]) + 1
    high = _prunable_channels(unit)
    if low > high:
        return Result(key=job.key, status="failed", error=f"unit {unit.name} has no channel left to prune")
    top = probe(high)
    if top[0] > target:
        return Result(
            key=job.key,
            status="failed",
            error=(
                f"unit {unit.name} cannot reach {resource} {target:g}: pruning {high} of {channels} "
                f"channels measures {top[0]:g}"
            ),
            extra={"reached": False, "best_possible": top[0]},
        )
    found, hi, lo = top, high, low
    while lo < hi:
        mid = (lo + hi) // 2
        candidate = probe(mid)
        if candidate[0] <= target:
            found, hi = candidate, mid
        else:
            lo = mid + 1
    return found[1], found[2], hi


def _uniform_move(job: Job, pruning: Any, measured: Any, target: float, resource: str) -> Move | Result:
    """Every unit pruned by one fraction ``a`` of what it has left (``s_u = p_u + (1 - p_u) * a``, each unit
    capped where it keeps one channel): the least ``a`` whose measured resource reaches ``target``."""
    from pruning.budget import BudgetUnreachable, project

    def capped(distribution: dict[str, float]) -> dict[str, float]:
        return {u.name: min(distribution[u.name], _prunable_channels(u) / u.channels) for u in pruning.units}

    def signature(distribution: dict[str, float]) -> tuple[int, ...]:
        return tuple(u.count(distribution[u.name]) for u in pruning.units)

    probes: dict[tuple[int, ...], Probe] = {}  # one shrink-and-measure per distinct channel count

    def ratio_of(distribution: dict[str, float]) -> float:
        distribution = capped(distribution)
        key = signature(distribution)
        if key not in probes:
            probes[key] = measured(distribution)
        return probes[key][0]

    try:
        projection = project({u.name: 1.0 for u in pruning.units}, pruning, ratio_of, target, floor=job.distribution)
    except BudgetUnreachable:
        return Result(
            key=job.key,
            status="failed",
            error=f"the uniform move cannot reach {resource} {target:g} with every unit at its bound",
            extra={"reached": False},
        )
    chosen = capped(projection.distribution)
    ratio_of(chosen)
    _, distribution, masks = probes[signature(chosen)]
    return distribution, masks, sum(signature(chosen))
