"""``admm``: ADMM pruning (Zhang et al., ECCV 2018) of one per-unit distribution, then masked retraining.

Each outer iteration (one ``admm_train`` job) trains ``training_epochs`` with the user's trainer and optimizer
factory, adding the gradient ``rho * (W - Z + U)`` of the proximal term ``rho / 2 * ||W - Z + U||^2`` through
the trainer's ``callback`` (between ``loss.backward()`` and ``optimizer.step()``); then ``Z = proj(W + U)``
onto the sparsity constraint with the base algorithm (fine-grained or filter-wise, monotonic over the parent's
masks) and ``U = U + W - Z``. ``Z`` starts as a *copy* of ``proj(W)`` and ``U`` at zero, so the first
iteration is already penalised (NNI aliased Z with W, so its first iteration had no penalty; its square-root
penalty made NaN weights). ``rho`` is per layer (``layer_rho`` overrides ``rho``) and grows by
``rho_multiplier`` each iteration. ``W`` (a checkpoint), ``Z`` and ``U`` go to the artifact store; the state
keeps their ids and the primal residual ``||W - Z||`` of every iteration. Finally one
``finetune_and_evaluate`` job hard-prunes ``W`` to the distribution and retrains ``retrain_epochs`` with the
masks in place.

Job kind ``admm_train`` is executed by :func:`execute` in this module.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

from pruning.config import initial_distribution
from pruning.search._common import TrialRecord, budget_ratio, evaluated_distribution, meets_goal, trial_budget
from pruning.search.base import Job, Result, SearchProblem, SearchState
from pruning.search.configs import ADMMConfig
from pruning.search.finalists import FinalistsState

__all__ = ["ADMMSearch", "ADMMState", "admm_artifacts", "admm_job", "execute"]

ADMM_FORMAT = "prunehub.admm/1"


class ADMMState(SearchState):
    version: int = 1
    problem: SearchProblem
    distribution: dict[str, float]
    iterations: int  # outer iterations to run (num_iterations, capped by max_trials)
    phase: Literal["admm", "retrain", "finished"] = "admm"
    iteration: int = 0  # completed outer iterations
    w_artifact: str | None = None
    z_artifact: str | None = None
    u_artifact: str | None = None
    residuals: list[float] = Field(default_factory=list)
    pending: list[Job] = Field(default_factory=list)
    history: list[TrialRecord] = Field(default_factory=list)
    best_distribution: dict[str, float] | None = None
    finalists: FinalistsState | None = None  # the uniform guard (pruning.search.finalists), under a budget


def admm_job(
    config: Any,
    *,
    key: str,
    distribution: dict[str, float],
    iteration: int,
    w: str | None,
    z: str | None,
    u: str | None,
    context: dict[str, Any] | None = None,
    budget_ratio: float | None = None,
    floor: dict[str, float] | None = None,
) -> Job:
    """The ``admm_train`` job of outer iteration ``iteration`` (rho grows by ``rho_multiplier`` each one); with
    ``budget_ratio`` its distribution is projected onto the budget first (the same projection every iteration)."""
    factor = float(config.rho_multiplier) ** iteration
    return Job(
        key=key,
        kind="admm_train",
        distribution=distribution,
        parent_artifact=w,
        save_artifact=True,
        params={
            "z": z,
            "u": u,
            "rho": float(config.rho) * factor,
            "layer_rho": {name: value * factor for name, value in config.layer_rho.items()},
            "training_epochs": int(config.training_epochs),
        },
        context={**(context or {}), "iteration": iteration, "rho": float(config.rho) * factor},
        budget_ratio=budget_ratio,
        floor=floor or {},
    )


def admm_artifacts(result: Result) -> dict[str, str | None]:
    """The W, Z and U artifact ids an ``admm_train`` result hands to the next iteration (state field names)."""
    return {"w_artifact": result.artifact, "z_artifact": result.extra.get("z"), "u_artifact": result.extra.get("u")}


class ADMMSearch:
    """ADMM on the config list's distribution; see the module docstring.

    Example::

        search = ADMMSearch(ADMMConfig(algorithm="admm", config_list=[...], num_iterations=5))
        state = search.start(problem)
        state, jobs = search.ask(state)   # admm_train jobs one at a time, then the masked retraining
    """

    def __init__(self, config: ADMMConfig) -> None:
        self.config = config

    def start(self, problem: SearchProblem) -> ADMMState:
        self.config.check_layer_rho(layer.name for layer in problem.pruning.layers)
        limit = trial_budget(self.config.max_trials, problem.max_trials)
        # The retraining job always runs: ADMM iterations get what the trial budget leaves.
        iterations = self.config.num_iterations if limit is None else min(self.config.num_iterations, limit - 1)
        return ADMMState(
            problem=problem,
            distribution=initial_distribution(problem.pruning),
            iterations=max(iterations, 0),
            progress=0.0,
            progress_total=float(max(iterations, 0) + 1),
            phase="admm" if iterations > 0 else "retrain",
        )

    def ask(self, state: ADMMState) -> tuple[ADMMState, list[Job]]:
        if state.done:
            return state, []
        if state.pending:
            return state, list(state.pending)
        if state.phase == "admm":
            job = admm_job(
                self.config,
                key=f"admm-{state.iteration}",
                distribution=state.distribution,
                iteration=state.iteration,
                w=state.w_artifact,
                z=state.z_artifact,
                u=state.u_artifact,
                budget_ratio=budget_ratio(state.problem),
            )
        elif state.phase == "retrain":
            epochs = self.config.retrain_epochs
            job = Job(
                key="admm-retrain",
                kind="finetune_and_evaluate" if epochs else "evaluate",
                distribution=state.distribution,
                parent_artifact=state.w_artifact,
                finetune_epochs=epochs,
                save_artifact=True,
                context={"iteration": state.iteration, "retrain": True},
                budget_ratio=budget_ratio(state.problem),
            )
        else:
            return state.model_copy(update={"done": True}), []
        return state.model_copy(update={"pending": [job], "trials_asked": state.trials_asked + 1}), [job]

    def tell(self, state: ADMMState, results: list[Result]) -> ADMMState:
        job = state.pending[0]
        result = next((r for r in results if r.key == job.key), None)
        state = state.model_copy(update={"pending": []})
        ok = result is not None and result.status == "succeeded"
        error = "no result" if result is None else result.error
        if state.phase == "admm":
            if not ok or result is None or result.artifact is None:
                reason = f"ADMM iteration {state.iteration} failed: {error}"
                return state.model_copy(update={"done": True, "phase": "finished", "stop_reason": reason})
            residual = float(result.extra.get("primal_residual", math.nan))
            iteration = state.iteration + 1
            record = TrialRecord(key=job.key, decision="admm", context={**job.context, "primal_residual": residual})
            return state.model_copy(
                update={
                    "iteration": iteration,
                    **admm_artifacts(result),
                    "residuals": [*state.residuals, residual],
                    "history": [*state.history, record],
                    "phase": "admm" if iteration < state.iterations else "retrain",
                    "progress": float(iteration),
                    "progress_total": float(state.iterations + 1),
                }
            )
        update: dict[str, Any] = {"done": True, "phase": "finished", "progress": float(state.iterations + 1)}
        if (
            ok
            and result is not None
            and result.score is not None
            and meets_goal(result, job, state.problem)
        ):
            update |= {
                "best_key": result.key,
                "best_score": result.score,
                "best_distribution": evaluated_distribution(result, job),
                "stop_reason": "ADMM iterations and retraining done",
            }
        else:
            update["stop_reason"] = f"masked retraining failed: {error}"
        record = TrialRecord(
            key=job.key,
            score=None if result is None else result.score,
            overall_sparsity=None if result is None else result.overall_sparsity,
            decision="retrained",
            context=job.context,
        )
        update["history"] = [*state.history, record]
        return state.model_copy(update=update)


# ------------------------------------------------------------------------------------------------ execute
def _weight_params(model: Any, names: list[str]) -> dict[str, Any]:
    """The trainable tensor behind each layer's weight (the parametrization's ``original`` when masked)."""
    from torch.nn.utils import parametrize

    modules = dict(model.named_modules())
    out = {}
    for name in names:
        module = modules[name]
        if parametrize.is_parametrized(module, "weight"):
            out[name] = module.parametrizations.weight.original
        else:
            out[name] = module.weight
    return out


def _project(
    model: Any, values: dict[str, Any], problem: SearchProblem, job: Job, task: Any, previous: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Euclidean projection of ``values`` (layer -> tensor) onto the sparsity constraint: the base algorithm's
    masks computed on a copy of the model carrying ``values``, never reviving what the parent pruned."""
    import copy

    import torch

    from pruning.masks import strip
    from pruning.pruner import compute_masks

    work = strip(copy.deepcopy(model))
    modules = dict(work.named_modules())
    with torch.no_grad():
        for name, value in values.items():
            modules[name].weight.copy_(value)
    masks = compute_masks(work, problem.pruning, job.distribution, task=task, previous=previous)
    projected = {name: (values[name] * masks[name].to(values[name].device)).detach().clone() for name in values}
    return projected, masks


def execute(task: Any, problem: SearchProblem, job: Job, store: Any, device: str = "cpu") -> Result:
    """Run one ``admm_train`` job (one outer ADMM iteration) and return its result.

    ``job.parent_artifact`` is the W checkpoint to start from (``None``: the task's model, for the first
    iteration), ``job.params["z"]`` / ``["u"]`` the Z and U artifacts (``None``: Z = copy of proj(W), U = 0).
    ``Result.artifact`` is the new W checkpoint (masks = the parent's, so earlier rounds' zeros stay);
    ``Result.extra`` holds ``z``, ``u`` (artifact ids), ``primal_residual`` ``||W - Z||`` and
    ``relative_residual`` ``||W - Z|| / ||W||``.
    """
    import torch

    from pruning.jobs import load_checkpoint, save_checkpoint
    from pruning.masks import apply_masks, strip

    pruning = problem.pruning
    trainer = task.require("trainer", "ADMM")
    model, previous = load_checkpoint(task, store, job.parent_artifact)
    model.to(device)
    # Every weight a mask covers takes part (structured masks include the group's BatchNorm weights).
    names = [layer.name for layer in pruning.layers]
    modules = dict(model.named_modules())
    weights = {name: modules[name].weight.detach().clone() for name in names}
    if job.params.get("z"):
        z_tensors, _ = store.get(job.params["z"])
        u_tensors, _ = store.get(job.params["u"])
        z = {name: z_tensors[name].to(device) for name in names}
        u = {name: u_tensors[name].to(device) for name in names}
    else:
        z, _ = _project(model, weights, problem, job, task, previous)  # a copy, never an alias of W
        u = {name: torch.zeros_like(weights[name]) for name in names}
    if previous:
        apply_masks(model, {k: v.to(device) for k, v in previous.items()}, structured=pruning.structured)
    base_rho = float(job.params.get("rho", 1e-3))
    layer_rho = {name: float(job.params.get("layer_rho", {}).get(name, base_rho)) for name in names}
    params = _weight_params(model, names)
    masked = {name: previous[name].to(device) for name in names if name in previous}

    def proximal_gradient() -> None:
        # d/dW of rho/2 ||W - Z + U||^2 is rho (W - Z + U): squared norm, so no sqrt and no NaN at W = Z - U.
        with torch.no_grad():
            for name, param in params.items():
                if param.grad is None:
                    continue
                current = modules[name].weight
                grad = layer_rho[name] * (current - z[name] + u[name])
                if name in masked:
                    grad = grad * masked[name]
                param.grad.add_(grad)

    optimizer = task.make_optimizer(model)
    criterion = task.make_criterion()
    for epoch in range(int(job.params.get("training_epochs", 1))):
        trainer(model, optimizer, criterion, epoch, callback=proximal_gradient)
    strip(model)
    modules = dict(model.named_modules())
    weights = {name: modules[name].weight.detach().clone() for name in names}
    if not all(bool(torch.isfinite(w).all()) for w in weights.values()):
        return Result(key=job.key, status="failed", error="ADMM training produced non-finite weights")
    z, _ = _project(model, {name: weights[name] + u[name] for name in names}, problem, job, task, previous)
    u = {name: u[name] + weights[name] - z[name] for name in names}
    residual = math.sqrt(sum(float(((weights[n] - z[n]) ** 2).sum()) for n in names))
    norm = math.sqrt(sum(float((weights[n] ** 2).sum()) for n in names))
    w_id = save_checkpoint(store, model, previous)
    z_id = store.put(z, {"format": ADMM_FORMAT, "tensor": "Z"})
    u_id = store.put(u, {"format": ADMM_FORMAT, "tensor": "U"})
    return Result(
        key=job.key,
        artifact=w_id,
        overall_sparsity=None,
        extra={
            "z": z_id,
            "u": u_id,
            "primal_residual": residual,
            "relative_residual": residual / norm if norm else 0.0,
        },
    )
